//! `cargo xtask testdata`: three deterministic macOS-like release trees, `26.3`, `26.3a`, `26.3b`.
//!
//! Each tree is first built in memory (path -> file / symlink / directory with mode and mtime),
//! then written out. `26.3a` is derived from `26.3` by a list of edits, `26.3b` from `26.3a`
//! (cumulative), so files an edit does not touch stay byte-identical with the same mtime.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result};
use filetime::FileTime;

use crate::exe::Exe;
use crate::rng::{fnv1a, SplitMix64};

/// 2026-02-10 00:00:00 UTC, the "release date" of 26.3: every base entry's mtime (seconds).
const T_BASE: i64 = 1_770_681_600;
/// 2026-03-03: the mtime of everything (a) changes.
const T_A: i64 = 1_772_496_000;
/// 2026-03-24: the mtime of everything (b) changes.
const T_B: i64 = 1_774_310_400;

#[derive(Clone, Debug)]
enum Node {
    File { data: Rc<Vec<u8>>, mode: u32 },
    Symlink(String),
    Dir { mode: u32 },
}

#[derive(Clone, Debug)]
struct Entry {
    node: Node,
    mtime: FileTime,
}

/// A tree in memory. Paths are relative, `/`-separated.
#[derive(Clone, Debug)]
struct Tree {
    entries: BTreeMap<String, Entry>,
    /// Seconds of the mtime given to entries created or changed now.
    now: i64,
}

/// A deterministic mtime: `secs` plus nanoseconds derived from the path, so that nanosecond
/// preservation is exercised too.
fn stamp(secs: i64, path: &str) -> FileTime {
    FileTime::from_unix_time(secs, (fnv1a(path) % 1_000_000_000) as u32)
}

fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(p, _)| p)
}

impl Tree {
    fn new() -> Tree {
        Tree {
            entries: BTreeMap::new(),
            now: T_BASE,
        }
    }

    /// Creates missing parent directories; touches the parent's mtime when `path` is new.
    fn prepare_parent(&mut self, path: &str) {
        let is_new = !self.entries.contains_key(path);
        if let Some(p) = parent(path) {
            if !self.entries.contains_key(p) {
                self.dir(p, 0o755);
            } else if is_new {
                self.touch(p);
            }
        }
    }

    fn touch(&mut self, path: &str) {
        let mtime = stamp(self.now, path);
        if let Some(e) = self.entries.get_mut(path) {
            e.mtime = mtime;
        }
    }

    fn insert(&mut self, path: &str, node: Node) {
        self.prepare_parent(path);
        let mtime = stamp(self.now, path);
        self.entries.insert(path.to_string(), Entry { node, mtime });
    }

    fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, Node::Dir { mode });
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let data = Rc::new(data);
        self.insert(path, Node::File { data, mode });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_string()));
    }

    /// Replaces a file's contents, keeping its mode.
    fn update(&mut self, path: &str, data: Vec<u8>) {
        let mode = match self.entries.get(path) {
            Some(Entry {
                node: Node::File { mode, .. },
                ..
            }) => *mode,
            _ => panic!("testdata bug: {path} is not a file"),
        };
        self.file(path, data, mode);
    }

    fn chmod(&mut self, path: &str, new_mode: u32) {
        if let Some(Entry {
            node: Node::File { mode, .. } | Node::Dir { mode },
            ..
        }) = self.entries.get_mut(path)
        {
            *mode = new_mode;
        }
    }

    /// Removes an entry (and everything below it); touches the parent.
    fn remove(&mut self, path: &str) {
        let below = format!("{path}/");
        self.entries
            .retain(|p, _| p != path && !p.starts_with(&below));
        if let Some(p) = parent(path) {
            self.touch(p);
        }
    }

    /// Moves a file (keeping its mtime, like `rename(2)`); touches both parents.
    fn rename(&mut self, from: &str, to: &str) {
        let e = self
            .entries
            .get(from)
            .cloned()
            .expect("testdata bug: rename source exists");
        self.remove(from);
        self.prepare_parent(to);
        self.entries.insert(to.to_string(), e);
    }

    #[cfg(test)]
    fn data(&self, path: &str) -> Rc<Vec<u8>> {
        match self.entries.get(path) {
            Some(Entry {
                node: Node::File { data, .. },
                ..
            }) => Rc::clone(data),
            _ => panic!("testdata bug: {path} is not a file"),
        }
    }

    fn write(&self, root: &Path) -> Result<(usize, u64)> {
        if fs::symlink_metadata(root).is_ok() {
            fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
        }
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let (mut files, mut bytes) = (0, 0);
        for (path, e) in &self.entries {
            let p = root.join(path);
            match &e.node {
                Node::Dir { .. } => fs::create_dir(&p),
                Node::File { data, mode } => {
                    files += 1;
                    bytes += data.len() as u64;
                    fs::write(&p, data.as_slice())
                        .and_then(|()| fs::set_permissions(&p, fs::Permissions::from_mode(*mode)))
                }
                Node::Symlink(target) => std::os::unix::fs::symlink(target, &p),
            }
            .with_context(|| format!("writing {}", p.display()))?;
        }
        for (path, e) in &self.entries {
            let p = root.join(path);
            match e.node {
                Node::File { .. } => filetime::set_file_times(&p, e.mtime, e.mtime),
                Node::Symlink(_) => filetime::set_symlink_file_times(&p, e.mtime, e.mtime),
                Node::Dir { .. } => Ok(()),
            }
            .with_context(|| format!("setting times of {}", p.display()))?;
        }
        // directories last, deepest first (reverse sorted order puts children before parents)
        for (path, e) in self.entries.iter().rev() {
            if let Node::Dir { mode } = e.node {
                let p = root.join(path);
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                    .and_then(|()| filetime::set_file_times(&p, e.mtime, e.mtime))
                    .with_context(|| format!("setting metadata of {}", p.display()))?;
            }
        }
        let t = stamp(self.now, "");
        filetime::set_file_times(root, t, t)
            .with_context(|| format!("setting times of {}", root.display()))?;
        Ok((files, bytes))
    }
}

// ---------------------------------------------------------------------------------------------
// contents

fn system_version(extra: Option<&str>) -> Vec<u8> {
    let mut keys = vec![
        (
            "BuildID",
            "7C1F3A2E-25D1-11F0-9A41-5C2D3E8B1A10".to_string(),
        ),
        ("ProductBuildVersion", "25D125".to_string()),
        ("ProductCopyright", "1983-2026 Apple Inc.".to_string()),
        ("ProductName", "macOS".to_string()),
        (
            "ProductUserVisibleVersion",
            match extra {
                Some(x) => format!("26.3 {x}"),
                None => "26.3".to_string(),
            },
        ),
        ("ProductVersion", "26.3".to_string()),
    ];
    if let Some(x) = extra {
        keys.push(("ProductVersionExtra", x.to_string()));
    }
    keys.push(("iOSSupportVersion", "26.3".to_string()));
    plist(&keys)
}

fn plist(keys: &[(&str, String)]) -> Vec<u8> {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \
         \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n",
    );
    for (k, v) in keys {
        s.push_str(&format!("\t<key>{k}</key>\n\t<string>{v}</string>\n"));
    }
    s.push_str("</dict>\n</plist>\n");
    s.into_bytes()
}

fn info_plist(name: &str, id: &str, short: &str, version: &str) -> Vec<u8> {
    plist(&[
        ("CFBundleDevelopmentRegion", "en".to_string()),
        ("CFBundleExecutable", name.to_string()),
        ("CFBundleIdentifier", id.to_string()),
        ("CFBundleInfoDictionaryVersion", "6.0".to_string()),
        ("CFBundleName", name.to_string()),
        ("CFBundlePackageType", "FMWK".to_string()),
        ("CFBundleShortVersionString", short.to_string()),
        ("CFBundleVersion", version.to_string()),
        ("DTPlatformBuild", "25D125".to_string()),
        ("LSMinimumSystemVersion", "26.3".to_string()),
    ])
}

/// A PNG-like resource: signature, IHDR, and an incompressible IDAT like real compressed pixels.
fn png(name: &str, size: usize) -> Vec<u8> {
    let mut rng = SplitMix64::named(name);
    let mut out = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\x02\0\0\0\x02\0\x08\x06\0\0\0".to_vec();
    out.extend_from_slice(&(rng.next_u64() as u32).to_be_bytes());
    out.extend_from_slice(&((size - out.len() - 12) as u32).to_be_bytes());
    out.extend_from_slice(b"IDAT");
    let start = out.len();
    out.resize(size - 8, 0);
    rng.fill(&mut out[start..]);
    out.extend_from_slice(b"IEND\xaeB`\x82");
    out
}

fn strings_file(name: &str, lines: usize) -> Vec<u8> {
    let words = [
        "Open",
        "Close",
        "Tab",
        "Window",
        "Bookmark",
        "History",
        "Reload",
        "Page",
        "Private",
        "Reader",
        "Download",
        "Share",
        "Website",
        "Settings",
        "Password",
        "Extension",
        "Clear",
    ];
    let mut rng = SplitMix64::named(name);
    let mut s = String::from("/* Localizable.strings */\n\n");
    for i in 0..lines {
        let a = words[rng.below(words.len() as u64) as usize];
        let b = words[rng.below(words.len() as u64) as usize];
        s.push_str(&format!("\"{a}_{b}_{i}\" = \"{a} {b}\";\n"));
    }
    s.into_bytes()
}

fn random_bytes(name: &str, size: usize) -> Vec<u8> {
    let mut v = vec![0; size];
    SplitMix64::named(name).fill(&mut v);
    v
}

const MB: usize = 1 << 20;
const KB: usize = 1 << 10;

const SAFARI: &str = "Applications/Safari.app/Contents";
const WEBKIT: &str = "System/Library/Frameworks/WebKit.framework";
const JSC: &str = "System/Library/Frameworks/JavaScriptCore.framework";
const WEBCORE: &str = "System/Library/PrivateFrameworks/WebCore.framework";
const SYSVER: &str = "System/Library/CoreServices/SystemVersion.plist";

/// The executables, kept as models so (a) and (b) can be relinked from them.
#[derive(Clone, Debug)]
struct Exes {
    safari: Exe,
    webkit: Exe,
    jsc: Exe,
    crypto: Exe,
    sqlite: Exe,
}

/// A versioned framework with the usual symlinks.
fn framework(t: &mut Tree, fw: &str, name: &str, binary: Vec<u8>, short: &str, version: &str) {
    t.file(&format!("{fw}/Versions/A/{name}"), binary, 0o755);
    t.file(
        &format!("{fw}/Versions/A/Resources/Info.plist"),
        info_plist(name, &format!("com.apple.{name}"), short, version),
        0o644,
    );
    t.symlink(&format!("{fw}/Versions/Current"), "A");
    t.symlink(&format!("{fw}/{name}"), &format!("Versions/Current/{name}"));
    t.symlink(&format!("{fw}/Resources"), "Versions/Current/Resources");
}

fn base() -> (Tree, Exes) {
    let mut t = Tree::new();
    let exes = Exes {
        safari: Exe::generate(fnv1a("Safari"), 3 * MB, "SF", "Safari-21623.2.7.11.6"),
        webkit: Exe::generate(fnv1a("WebKit"), 8 * MB, "WK", "WebKit-621.2.7.11.6"),
        jsc: Exe::generate(fnv1a("JSC"), 5 * MB, "JSC", "JavaScriptCore-621.2.7.11.6"),
        crypto: Exe::generate(
            fnv1a("libcrypto"),
            3 * MB,
            "EVP_",
            "OpenSSL 3.4.1 11 Feb 2025",
        ),
        sqlite: Exe::generate(fnv1a("libsqlite3"), 3 * MB / 2, "sqlite3_", "3.45.3"),
    };

    // Safari
    t.file(
        &format!("{SAFARI}/Info.plist"),
        info_plist("Safari", "com.apple.Safari", "26.3", "21623.2.7.11.6"),
        0o644,
    );
    t.file(
        &format!("{SAFARI}/MacOS/Safari"),
        exes.safari.to_bytes(),
        0o755,
    );
    for (name, size) in [
        ("AppIcon.png", 180 * KB),
        ("Toolbar.png", 40 * KB),
        ("Bookmarks.png", 24 * KB),
        ("ReadingList.png", 24 * KB),
        ("PrivateBrowsing.png", 60 * KB),
        ("StartPage.png", 120 * KB),
    ] {
        t.file(
            &format!("{SAFARI}/Resources/{name}"),
            png(name, size),
            0o644,
        );
    }
    t.file(
        &format!("{SAFARI}/Resources/safaridriver-helper"),
        b"#!/bin/sh\nexec /usr/bin/safaridriver \"$@\"\n".to_vec(),
        0o644,
    );
    for lang in ["en", "fr", "de"] {
        t.file(
            &format!("{SAFARI}/Resources/{lang}.lproj/Localizable.strings"),
            strings_file(lang, 400),
            0o644,
        );
    }
    t.dir(&format!("{SAFARI}/PlugIns"), 0o755);

    // frameworks
    framework(
        &mut t,
        WEBKIT,
        "WebKit",
        exes.webkit.to_bytes(),
        "21623",
        "21623.2.7.11.6",
    );
    t.file(
        &format!("{WEBKIT}/Versions/A/Resources/legacy-plugin-blocklist.plist"),
        plist(&[("com.adobe.flashplayer", "blocked".to_string())]),
        0o644,
    );
    t.file(
        &format!("{WEBKIT}/Versions/A/Resources/WebInspectorUI.png"),
        png("WebInspectorUI", 90 * KB),
        0o644,
    );
    framework(
        &mut t,
        JSC,
        "JavaScriptCore",
        exes.jsc.to_bytes(),
        "21623",
        "21623.2.7.11.6",
    );
    let webcore = Exe::generate(fnv1a("WebCore"), 5 * MB, "WC", "WebCore-621.2.7.11.6");
    framework(
        &mut t,
        WEBCORE,
        "WebCore",
        webcore.to_bytes(),
        "21623",
        "21623.2.7.11.6",
    );
    let css = "html { display: block }\nbody { margin: 8px }\np { margin: 1em 0 }\n".repeat(40);
    t.file(
        &format!("{WEBCORE}/Versions/A/Resources/html.css"),
        css.into_bytes(),
        0o644,
    );
    t.symlink(
        &format!("{WEBCORE}/Versions/A/Resources/Default.css"),
        "html.css",
    );
    t.file(
        &format!("{WEBCORE}/Versions/A/Resources/WebCoreLegacy.png"),
        png("WebCoreLegacy", 50 * KB),
        0o644,
    );

    // CoreServices, caches
    t.file(SYSVER, system_version(None), 0o644);
    t.file(
        "System/Library/CoreServices/boot.efi",
        random_bytes("boot.efi", 600 * KB),
        0o644,
    );
    t.dir("System/Library/Caches/com.apple.safari/empty", 0o755);
    t.dir("Library/Updates", 0o755);

    // usr/lib
    let lib = |name: &str, size: usize, version: &str| {
        Exe::generate(fnv1a(name), size, "_", version).to_bytes()
    };
    t.file(
        "usr/lib/libSystem.B.dylib",
        lib("libSystem", 3 * MB / 2, "libSystem-1351"),
        0o755,
    );
    t.file("usr/lib/libcrypto.3.dylib", exes.crypto.to_bytes(), 0o755);
    t.symlink("usr/lib/libcrypto.dylib", "libcrypto.3.dylib");
    t.file("usr/lib/libsqlite3.dylib", exes.sqlite.to_bytes(), 0o755);
    t.file(
        "usr/lib/libz.1.dylib",
        lib("libz", 150 * KB, "1.3.1"),
        0o755,
    );
    t.symlink("usr/lib/libz.dylib", "libz.1.dylib");
    let cxx = lib("libc++", MB, "libc++-1900.180");
    t.file("usr/lib/libc++.1.dylib", cxx.clone(), 0o755);
    t.file("usr/lib/libc++.dylib", cxx, 0o755);

    // etc
    t.file(
        "etc/hosts",
        b"127.0.0.1\tlocalhost\n255.255.255.255\tbroadcasthost\n::1\tlocalhost\n".to_vec(),
        0o644,
    );
    t.file(
        "etc/shells",
        b"/bin/bash\n/bin/csh\n/bin/sh\n/bin/zsh\n".to_vec(),
        0o644,
    );
    t.file(
        "etc/ssl/openssl.cnf",
        b"openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n".repeat(20),
        0o644,
    );
    t.file(
        "etc/zshrc",
        b"setopt BEEP\nHISTFILE=${ZDOTDIR:-$HOME}/.zsh_history\n".to_vec(),
        0o444,
    );
    (t, exes)
}

/// `26.3 (a)`: a security fix in Safari, WebKit, JavaScriptCore and libcrypto, plus every kind of
/// tree change a patch must carry.
fn letter_a(mut t: Tree, mut x: Exes) -> (Tree, Exes) {
    t.now = T_A;
    let mut rng = SplitMix64::named("26.3a");

    x.safari.insert_run(&mut rng, 6, None);
    x.safari.insert_run(&mut rng, 3, None);
    x.safari.replace_run(&mut rng, 4);
    x.safari.set_version("Safari-21623.2.7.11.7");
    t.update(&format!("{SAFARI}/MacOS/Safari"), x.safari.to_bytes());
    t.update(
        &format!("{SAFARI}/Info.plist"),
        info_plist("Safari", "com.apple.Safari", "26.3", "21623.2.7.11.7"),
    );

    let s = x
        .webkit
        .add_string(&mut rng, "_WKSecurityPolicyEnforceSameOrigin");
    x.webkit.insert_run(&mut rng, 8, Some(s));
    x.webkit.insert_run(&mut rng, 4, None);
    x.webkit.insert_run(&mut rng, 5, None);
    x.webkit.replace_run(&mut rng, 3);
    x.webkit.set_version("WebKit-621.2.7.11.7");
    t.update(&format!("{WEBKIT}/Versions/A/WebKit"), x.webkit.to_bytes());
    t.update(
        &format!("{WEBKIT}/Versions/A/Resources/Info.plist"),
        info_plist("WebKit", "com.apple.WebKit", "21623", "21623.2.7.11.7"),
    );

    x.jsc.insert_run(&mut rng, 5, None);
    x.jsc.insert_run(&mut rng, 2, None);
    x.jsc.replace_run(&mut rng, 2);
    t.update(
        &format!("{JSC}/Versions/A/JavaScriptCore"),
        x.jsc.to_bytes(),
    );

    // rename with changed content, and the symlink that points to it
    x.crypto.insert_run(&mut rng, 4, None);
    x.crypto.set_version("OpenSSL 3.4.2 11 Mar 2026");
    t.remove("usr/lib/libcrypto.3.dylib");
    t.file("usr/lib/libcrypto.3.1.dylib", x.crypto.to_bytes(), 0o755);
    t.remove("usr/lib/libcrypto.dylib");
    t.symlink("usr/lib/libcrypto.dylib", "libcrypto.3.1.dylib");

    // added / deleted / purely renamed files
    t.file(
        &format!("{WEBKIT}/Versions/A/Resources/SecurityPolicy.plist"),
        plist(&[
            ("EnforceSameOriginForWorkers", "true".to_string()),
            ("BlockedSchemes", "x-legacy-plugin".to_string()),
        ]),
        0o644,
    );
    t.remove(&format!(
        "{WEBKIT}/Versions/A/Resources/legacy-plugin-blocklist.plist"
    ));
    t.rename(
        &format!("{WEBCORE}/Versions/A/Resources/WebCoreLegacy.png"),
        &format!("{WEBCORE}/Versions/A/Resources/WebCoreCompat.png"),
    );

    // mode changes (content unchanged)
    t.chmod(&format!("{SAFARI}/Resources/safaridriver-helper"), 0o755);
    t.chmod("usr/lib/libSystem.B.dylib", 0o555);

    // file -> symlink, symlink -> file
    t.remove("usr/lib/libc++.dylib");
    t.symlink("usr/lib/libc++.dylib", "libc++.1.dylib");
    t.remove(&format!("{WEBCORE}/Versions/A/Resources/Default.css"));
    t.file(
        &format!("{WEBCORE}/Versions/A/Resources/Default.css"),
        b"@import url(html.css);\nimg { image-orientation: from-image }\n".to_vec(),
        0o644,
    );

    // new nested directory, removed empty directory
    t.file(
        &format!("{SAFARI}/Resources/SecurityRules/v1/rules.json"),
        b"{\"version\":1,\"rules\":[{\"block\":\"javascript:\",\"scope\":\"navigation\"}]}\n"
            .to_vec(),
        0o644,
    );
    t.file(
        &format!("{SAFARI}/Resources/SecurityRules/v1/blocklist.bin"),
        random_bytes("blocklist.bin", 16 * KB),
        0o644,
    );
    t.remove(&format!("{SAFARI}/PlugIns"));

    t.update(SYSVER, system_version(Some("(a)")));
    (t, x)
}

/// `26.3 (b)`: everything in (a), plus more WebKit fixes, a libsqlite3 fix and a new file.
fn letter_b(mut t: Tree, mut x: Exes) -> Tree {
    t.now = T_B;
    let mut rng = SplitMix64::named("26.3b");

    x.webkit.insert_run(&mut rng, 7, None);
    x.webkit.insert_run(&mut rng, 3, None);
    x.webkit.replace_run(&mut rng, 2);
    x.webkit.set_version("WebKit-621.2.7.11.8");
    t.update(&format!("{WEBKIT}/Versions/A/WebKit"), x.webkit.to_bytes());
    t.update(
        &format!("{WEBKIT}/Versions/A/Resources/Info.plist"),
        info_plist("WebKit", "com.apple.WebKit", "21623", "21623.2.7.11.8"),
    );

    x.sqlite.insert_run(&mut rng, 6, None);
    x.sqlite.insert_run(&mut rng, 4, None);
    x.sqlite.set_version("3.45.3.1");
    t.update("usr/lib/libsqlite3.dylib", x.sqlite.to_bytes());

    t.file(
        &format!("{JSC}/Versions/A/Resources/JITPolicy.plist"),
        plist(&[("DisableJITForUntrustedFrames", "true".to_string())]),
        0o644,
    );
    t.update(SYSVER, system_version(Some("(b)")));
    t
}

/// Writes `out/26.3`, `out/26.3a` and `out/26.3b`, replacing earlier copies, and prints a summary.
pub fn generate(out: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let (base, exes) = base();
    let (a, exes_a) = letter_a(base.clone(), exes);
    let b = letter_b(a.clone(), exes_a);
    for (name, tree) in [("26.3", &base), ("26.3a", &a), ("26.3b", &b)] {
        let dir = out.join(name);
        let (files, bytes) = tree.write(&dir)?;
        println!(
            "{:<28} {:>3} files {:>3} symlinks {:>3} dirs {:>11} bytes",
            dir.display(),
            files,
            tree.entries
                .values()
                .filter(|e| matches!(e.node, Node::Symlink(_)))
                .count(),
            tree.entries
                .values()
                .filter(|e| matches!(e.node, Node::Dir { .. }))
                .count(),
            bytes
        );
    }
    println!("generated in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_change_only_what_they_should() {
        let (base, exes) = base();
        let (a, exes_a) = letter_a(base.clone(), exes);
        let b = letter_b(a.clone(), exes_a);
        // untouched files keep bytes and mtime across all three trees
        let hosts = |t: &Tree| t.entries.get("etc/hosts").map(|e| e.mtime);
        assert_eq!(hosts(&base), hosts(&b));
        assert_eq!(
            base.data("usr/lib/libz.1.dylib"),
            b.data("usr/lib/libz.1.dylib")
        );
        // (a) changes carried into (b) unchanged
        let safari = format!("{SAFARI}/MacOS/Safari");
        assert_ne!(base.data(&safari), a.data(&safari));
        assert_eq!(a.data(&safari), b.data(&safari));
        assert!(!a.entries.contains_key("usr/lib/libcrypto.3.dylib"));
        assert!(b.entries.contains_key("usr/lib/libcrypto.3.1.dylib"));
        let sysver = String::from_utf8(b.data(SYSVER).to_vec()).expect("utf-8");
        assert!(sysver.contains("\t<key>ProductVersionExtra</key>\n\t<string>(b)</string>\n"));
    }
}
