//! Shared helpers: fixture trees written exactly (contents, modes, times), snapshots of what is
//! on disk, and a thin layer over the `bsi` binary.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use filetime::FileTime;

/// Times used by the fixtures (seconds, nanoseconds).
pub const T0: (i64, u32) = (1_700_000_000, 123_456_789);
pub const T1: (i64, u32) = (1_710_000_000, 987_654_321);
pub const T2: (i64, u32) = (1_720_000_000, 5);

/// One node of a fixture tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        bytes: Vec<u8>,
        mode: u32,
        mtime: (i64, u32),
    },
    Link {
        target: String,
        mtime: (i64, u32),
    },
    Dir {
        mode: u32,
        mtime: (i64, u32),
    },
}

/// Paths (`a/b/c`) to nodes; every ancestor of a path is a `Dir` in the map.
pub type Model = BTreeMap<String, Node>;

pub fn file(bytes: impl Into<Vec<u8>>, mode: u32, mtime: (i64, u32)) -> Node {
    Node::File {
        bytes: bytes.into(),
        mode,
        mtime,
    }
}

pub fn link(target: &str, mtime: (i64, u32)) -> Node {
    Node::Link {
        target: target.to_owned(),
        mtime,
    }
}

pub fn dir(mode: u32, mtime: (i64, u32)) -> Node {
    Node::Dir { mode, mtime }
}

/// Deterministic bytes: compressible runs mixed with xorshift noise, so that deltas pay off.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            if i % 64 < 40 {
                (i / 64) as u8
            } else {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            }
        })
        .collect()
}

/// Deterministic bytes that barely compress.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn file_time((secs, nanos): (i64, u32)) -> FileTime {
    FileTime::from_unix_time(secs, nanos)
}

/// Write `model` under `root` (created if needed). With `reverse`, entries are created in the
/// opposite order (so directory listings come out differently). Modes and times are set last,
/// children before parents, so they are exactly what the model says.
pub fn write_tree(root: &Path, model: &Model, reverse: bool) {
    fs::create_dir_all(root).expect("create root");
    let order: Vec<(&String, &Node)> = if reverse {
        model.iter().rev().collect()
    } else {
        model.iter().collect()
    };
    for (path, node) in &order {
        let full = root.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).expect("create parent");
        }
        match node {
            Node::File { bytes, mode, .. } => {
                fs::write(&full, bytes).expect("write file");
                fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).expect("chmod");
            }
            Node::Link { target, .. } => {
                std::os::unix::fs::symlink(target, &full).expect("symlink");
            }
            Node::Dir { .. } => fs::create_dir_all(&full).expect("create dir"),
        }
    }
    // Children sort after their parents, so reverse order sets a directory after its content.
    for (path, node) in model.iter().rev() {
        let full = root.join(path);
        match node {
            Node::File { mtime, .. } => {
                filetime::set_file_mtime(&full, file_time(*mtime)).expect("set file time")
            }
            Node::Link { mtime, .. } => {
                filetime::set_symlink_file_times(&full, file_time(*mtime), file_time(*mtime))
                    .expect("set link time")
            }
            Node::Dir { mode, mtime } => {
                fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).expect("chmod dir");
                filetime::set_file_mtime(&full, file_time(*mtime)).expect("set dir time");
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Symlink,
    Dir,
    Other,
}

/// What one path holds: kind, bytes (file) or target (symlink), permission bits, mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub kind: Kind,
    pub data: Vec<u8>,
    pub mode: u32,
    pub mtime: (i64, i64),
}

/// Everything under `dir` (not `dir` itself, not a top-level `.bsi`), symlinks not followed.
pub fn tree_snapshot(dir: &Path) -> BTreeMap<String, Snap> {
    let mut out = BTreeMap::new();
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && e.file_name() == ".bsi"));
    for item in walker {
        let item = item.expect("walk");
        let meta = item.path().symlink_metadata().expect("lstat");
        let ft = meta.file_type();
        let (kind, data) = if ft.is_symlink() {
            let target = fs::read_link(item.path()).expect("readlink");
            (Kind::Symlink, target.into_os_string().into_encoded_bytes())
        } else if ft.is_dir() {
            (Kind::Dir, Vec::new())
        } else if ft.is_file() {
            (Kind::File, fs::read(item.path()).expect("read"))
        } else {
            (Kind::Other, Vec::new())
        };
        let rel = item
            .path()
            .strip_prefix(dir)
            .expect("below dir")
            .to_string_lossy()
            .into_owned();
        out.insert(
            rel,
            Snap {
                kind,
                data,
                mode: meta.mode() & 0o7777,
                mtime: (meta.mtime(), meta.mtime_nsec()),
            },
        );
    }
    out
}

/// Names of the entries of `dir`, empty when it does not exist.
pub fn dir_listing(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(read) => {
            let mut names: Vec<String> = read
                .map(|e| {
                    e.expect("read dir entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            names.sort();
            names
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    }
}

pub fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../keys-example")
}

pub fn example_key() -> PathBuf {
    keys_dir().join("example.key.pem")
}

pub fn example_pub() -> PathBuf {
    keys_dir().join("example.pub.pem")
}

pub fn bsi() -> Command {
    let mut cmd = Command::cargo_bin("bsi").expect("the bsi binary is built");
    cmd.env_remove("RAYON_NUM_THREADS");
    cmd
}

/// Run `bsi` with `args`; the output whatever the exit code.
pub fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    bsi().args(args).output().expect("run bsi")
}

/// Make a FIFO at `path` (with mkfifo(1): the tests forbid unsafe code).
pub fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo failed");
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Assert success and return stdout.
#[track_caller]
pub fn ok(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected success\nstdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Assert a refusal: exit code 1, exactly one line on stderr, containing every phrase.
#[track_caller]
pub fn refused(out: &Output, phrases: &[&str]) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit code 1\nstdout: {}\nstderr: {err}",
        stdout(out)
    );
    assert_eq!(
        err.lines().count(),
        1,
        "expected one line on stderr, got: {err}"
    );
    assert!(
        err.starts_with("bsi: error: "),
        "stderr does not start with `bsi: error: `: {err}"
    );
    for phrase in phrases {
        assert!(err.contains(phrase), "stderr lacks {phrase:?}: {err}");
    }
    err
}

/// Assert a usage error: exit code 2 and stderr containing every phrase.
#[track_caller]
pub fn usage_error(out: &Output, phrases: &[&str]) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit code 2\nstdout: {}\nstderr: {err}",
        stdout(out)
    );
    for phrase in phrases {
        assert!(err.contains(phrase), "stderr lacks {phrase:?}: {err}");
    }
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `bsi build` of `base` -> `target` for macOS 26.3 (25D125) with `letter`, signed with `key`.
pub fn build_args(
    base: &Path,
    target: &Path,
    letter: &str,
    key: &Path,
    out: &Path,
    components: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "build",
        "--base",
        p(base),
        "--target",
        p(target),
        "--product",
        "macOS",
        "--base-version",
        "26.3",
        "--base-build",
        "25D125",
        "--letter",
        letter,
        "--key",
        p(key),
        "--out",
        p(out),
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for c in components {
        args.push("--component".to_owned());
        args.push(c.to_string());
    }
    args
}

/// Build a package and return its bytes.
#[track_caller]
pub fn build(
    base: &Path,
    target: &Path,
    letter: &str,
    key: &Path,
    out: &Path,
    components: &[&str],
) -> Vec<u8> {
    ok(&run(build_args(base, target, letter, key, out, components)));
    fs::read(out).expect("read built package")
}

pub const SAFARI: &str = "Safari=Applications/Safari.app";
pub const WEBKIT: &str = "WebKit=System/Library/Frameworks/WebKit.framework/";
pub const COMPONENTS: [&str; 2] = [SAFARI, WEBKIT];

pub const SAFARI_DIR: &str = "Applications/Safari.app";
pub const WEBKIT_DIR: &str = "System/Library/Frameworks/WebKit.framework";

pub const PLIST: &str = "System/Library/CoreServices/SystemVersion.plist";

pub fn system_version_plist() -> Vec<u8> {
    br#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>ProductBuildVersion</key>
	<string>25D125</string>
	<key>ProductName</key>
	<string>macOS</string>
	<key>ProductVersion</key>
	<string>26.3</string>
</dict>
</plist>
"#
    .to_vec()
}

/// The 200 KB WebKit binary of the base release.
pub fn webkit_base() -> Vec<u8> {
    pattern(7, 200_000)
}

/// The WebKit binary of the patched release: 64 bytes edited in place.
pub fn webkit_patched() -> Vec<u8> {
    let mut bytes = webkit_base();
    for (i, b) in bytes[100_000..100_064].iter_mut().enumerate() {
        *b = b.wrapping_add(1 + i as u8);
    }
    bytes
}

/// The base release 26.3: two components, a release description, an empty directory outside
/// the components, a symlink, nested and empty directories, varied modes and times.
pub fn base_model() -> Model {
    let mut m = Model::new();
    let d = |m: &mut Model, path: &str| {
        m.insert(path.to_owned(), dir(0o755, T0));
    };
    d(&mut m, "Applications");
    d(&mut m, SAFARI_DIR);
    d(&mut m, "Applications/Safari.app/Contents");
    m.insert(
        "Applications/Safari.app/Contents/Info.plist".into(),
        file("<plist>CFBundleVersion 26.3</plist>\n", 0o644, T0),
    );
    d(&mut m, "Applications/Safari.app/Contents/MacOS");
    m.insert(
        "Applications/Safari.app/Contents/MacOS/Safari".into(),
        file(pattern(1, 30_000), 0o755, T1),
    );
    m.insert(
        "Applications/Safari.app/Contents/Resources".into(),
        dir(0o750, T0),
    );
    d(&mut m, "System");
    d(&mut m, "System/Library");
    d(&mut m, "System/Library/CoreServices");
    m.insert(PLIST.into(), file(system_version_plist(), 0o444, T0));
    d(&mut m, "System/Library/Frameworks");
    d(&mut m, WEBKIT_DIR);
    m.insert(
        format!("{WEBKIT_DIR}/WebKit"),
        link("Versions/Current/WebKit", T1),
    );
    d(&mut m, &format!("{WEBKIT_DIR}/Versions"));
    m.insert(format!("{WEBKIT_DIR}/Versions/Current"), link("A", T0));
    d(&mut m, &format!("{WEBKIT_DIR}/Versions/A"));
    m.insert(
        format!("{WEBKIT_DIR}/Versions/A/WebKit"),
        file(webkit_base(), 0o755, T1),
    );
    d(&mut m, &format!("{WEBKIT_DIR}/Versions/A/Resources"));
    m.insert(
        format!("{WEBKIT_DIR}/Versions/A/Resources/old.txt"),
        file("an old resource\n", 0o644, T0),
    );
    m.insert(
        format!("{WEBKIT_DIR}/Versions/A/Resources/mode.txt"),
        file("mode changes only\n", 0o644, T0),
    );
    m.insert(format!("{WEBKIT_DIR}/Versions/A/empty"), dir(0o700, T1));
    d(&mut m, "usr");
    d(&mut m, "usr/share");
    m.insert("usr/share/empty".into(), dir(0o755, T2));
    m
}

/// 26.3 (a). Safari: added 2, deleted 0, changed 2. WebKit: added 2, deleted 2, changed 3.
pub fn target_a_model() -> Model {
    let mut m = base_model();
    // Safari
    m.insert(
        "Applications/Safari.app/Contents/Info.plist".into(),
        file("<plist>CFBundleVersion 26.3 (a)</plist>\n", 0o644, T2),
    );
    m.insert(
        "Applications/Safari.app/Contents/Resources".into(),
        dir(0o750, T2),
    );
    m.insert(
        "Applications/Safari.app/Contents/Resources/new.bin".into(),
        file(pattern(3, 1500), 0o600, T2),
    );
    m.insert(
        "Applications/Safari.app/Contents/Plugins".into(),
        dir(0o755, T2),
    );
    // WebKit
    m.insert(
        format!("{WEBKIT_DIR}/Versions/A/WebKit"),
        file(webkit_patched(), 0o755, T2),
    );
    m.remove(&format!("{WEBKIT_DIR}/Versions/A/Resources/old.txt"));
    m.insert(
        format!("{WEBKIT_DIR}/Versions/A/Resources/mode.txt"),
        file("mode changes only\n", 0o755, T0),
    );
    m.insert(
        format!("{WEBKIT_DIR}/WebKit"),
        link("Versions/A/WebKit", T2),
    );
    m.remove(&format!("{WEBKIT_DIR}/Versions/A/empty"));
    m.insert(format!("{WEBKIT_DIR}/Versions/A/new-dir"), dir(0o755, T2));
    m.insert(
        format!("{WEBKIT_DIR}/Versions/A/new-dir/nested.txt"),
        file("nested and new\n", 0o644, T1),
    );
    m
}

/// 26.3 (b): everything (a) changes and more. Safari: added 2, changed 3. WebKit: added 3,
/// deleted 2, changed 3.
pub fn target_b_model() -> Model {
    let mut m = target_a_model();
    let mut safari = pattern(1, 30_000);
    safari[20_000..20_010].copy_from_slice(b"FIXED-(b)!");
    m.insert(
        "Applications/Safari.app/Contents/MacOS/Safari".into(),
        file(safari, 0o755, T2),
    );
    m.insert(
        format!("{WEBKIT_DIR}/Versions/A/Resources/b.txt"),
        file("added by (b)\n", 0o644, T2),
    );
    m
}

/// A temporary directory holding `base/` and `target/` trees (and room for more).
#[derive(Debug)]
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub target: PathBuf,
}

impl Fixture {
    pub fn new(base: &Model, target: &Model) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_dir = dir.path().join("base");
        let target_dir = dir.path().join("target");
        write_tree(&base_dir, base, false);
        write_tree(&target_dir, target, false);
        Fixture {
            dir,
            base: base_dir,
            target: target_dir,
        }
    }

    /// The base release and 26.3 (a).
    pub fn release_a() -> Fixture {
        Fixture::new(&base_model(), &target_a_model())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh root holding the base release, at `name` in the fixture directory.
    pub fn base_root(&self, name: &str) -> PathBuf {
        let root = self.path(name);
        write_tree(&root, &base_model(), false);
        root
    }
}

/// Apply `pkg` to a new root holding `base` (the fixture's base tree), check that it holds the
/// fixture's target, revert it, and check that it holds the base again.
pub fn applies_and_reverts_exactly(fx: &Fixture, base: &Model, pkg: &Path) {
    let root = fx.path("root");
    write_tree(&root, base, false);
    ok(&run([
        "apply",
        p(pkg),
        "--root",
        p(&root),
        "--trust",
        p(&example_pub()),
    ]));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));
    ok(&run(["revert", "--root", p(&root)]));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));
}

/// The parsed manifest of package bytes (signature not checked).
pub fn manifest_json(bytes: &[u8]) -> serde_json::Value {
    let raw = bsi_format::RawPackage::split(bytes).expect("package splits");
    let json = bsi_format::unpack_manifest(raw.manifest).expect("manifest unpacks");
    serde_json::from_slice(&json).expect("manifest is JSON")
}

/// Length N of the manifest of package bytes.
pub fn manifest_len(bytes: &[u8]) -> usize {
    u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize
}

/// `original` with its manifest replaced by `manifest` (JSON), packed and re-signed with the
/// example key.
pub fn resign(original: &[u8], manifest: &[u8]) -> Vec<u8> {
    let raw = bsi_format::RawPackage::split(original).expect("package splits");
    let key = bsi_sign::SecretKey::load(&example_key()).expect("example key loads");
    let signed = bsi_format::signed_bytes(&bsi_format::pack_manifest(manifest));
    let mut out = signed.clone();
    out.extend_from_slice(&key.sign(&signed));
    out.extend_from_slice(raw.payloads);
    out
}

pub fn replace_once(haystack: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    let at: Vec<usize> = haystack
        .windows(old.len())
        .enumerate()
        .filter(|(_, w)| *w == old)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        at.len(),
        1,
        "{:?} occurs once",
        String::from_utf8_lossy(old)
    );
    let mut out = haystack[..at[0]].to_vec();
    out.extend_from_slice(new);
    out.extend_from_slice(&haystack[at[0] + old.len()..]);
    out
}
