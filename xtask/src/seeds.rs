//! `cargo xtask fuzz-seeds [--out DIR]`: starting corpora for the fuzz targets in `fuzz/`, made
//! of real payloads and packages, so that a run starts inside the formats instead of spending
//! its first minutes finding magic numbers and varints.
//!
//! - `DIR/decoders`: each delta encoder's payload for stored pairs of
//!   `crates/bsi-delta/tests/data` whose old file fits the target's 2-byte old length (two
//!   gcc-built x86-64 libraries, a Mach-O file, two gzip-compressed changelogs), and plain zstd
//!   of each new file, laid out as the `decoders` target reads its input.
//! - `DIR/package` and `DIR/verify`: packages of small trees made from those pairs (a changed
//!   library and changelog, a new and a removed file, symlinks, an empty directory, a mode
//!   change), signed with the key the `verify` target trusts, so that they pass its signature
//!   check as they are.
//!
//! The `elf` target damages libraries it carries itself (the AArch64 ones too, whose old files
//! are too large for `decoders`) and needs no corpus.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bsi_engine::{BuildOptions, NoProgress};
use bsi_sign::SecretKey;

/// The seed of the key the `verify` fuzz target trusts (`fuzz/fuzz_targets/verify.rs`).
const VERIFY_KEY_SEED: [u8; 32] = [9; 32];

/// The stored pairs of `crates/bsi-delta/tests/data`: (name, old file, new file).
const PAIRS: &[(&str, &str, &str)] = &[
    ("elf-1", "elf-1.old.so", "elf-1.new.so"),
    ("elf-2", "elf-2.old.so", "elf-2.new.so"),
    ("macho-3", "macho-3.old", "macho-3.new"),
    ("gzip-1", "gzip-1.old.gz", "gzip-1.new.gz"),
    ("gzip-2", "gzip-2.old.gz", "gzip-2.new.gz"),
];

pub fn fuzz_seeds(ws: &Path, args: &[&str]) -> Result<()> {
    let out = match args {
        [] => ws.join("target/fuzz-seeds"),
        ["--out", dir] => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask fuzz-seeds [--out DIR]"),
    };
    let data = ws.join("crates/bsi-delta/tests/data");
    let mut pairs = Vec::new();
    for &(name, old, new) in PAIRS {
        let read = |file: &str| {
            let path = data.join(file);
            fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        pairs.push((name, read(old)?, read(new)?));
    }
    let decoders = decoder_seeds(&pairs)?;
    write_all(&out.join("decoders"), &decoders)?;
    let packages = package_seeds(&pairs)?;
    write_all(&out.join("package"), &packages)?;
    write_all(&out.join("verify"), &packages)?;
    println!(
        "{} decoder inputs in {}, {} packages in {} and {}",
        decoders.len(),
        out.join("decoders").display(),
        packages.len(),
        out.join("package").display(),
        out.join("verify").display()
    );
    println!(
        "run one: cd fuzz && cargo +nightly fuzz run decoders {} -- -max_total_time=600 -rss_limit_mb=2048",
        out.join("decoders").display()
    );
    Ok(())
}

/// Writes each `(name, bytes)` to a file of that name in `dir`, made anew.
fn write_all(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, bytes) in files {
        let path = dir.join(name);
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// An input of the `decoders` target: 1 byte choosing the decoder (an index into
/// `delta_encoders()`, or one past them for plain zstd), 3 bytes of the new file's length, 2
/// of the old file's, the old file, the payload. `None` where a length does not fit.
fn decoder_input(choice: usize, old: &[u8], new_len: usize, payload: &[u8]) -> Option<Vec<u8>> {
    let choice = u8::try_from(choice).ok()?;
    let old_len = u16::try_from(old.len()).ok()?;
    let new_len = u32::try_from(new_len).ok().filter(|&n| n < 1 << 24)?;
    let mut input = vec![choice];
    input.extend_from_slice(&new_len.to_le_bytes()[..3]);
    input.extend_from_slice(&old_len.to_le_bytes());
    input.extend_from_slice(old);
    input.extend_from_slice(payload);
    Some(input)
}

/// Every encoder's payload for each pair, and plain zstd of each new file.
fn decoder_seeds(pairs: &[(&str, Vec<u8>, Vec<u8>)]) -> Result<Vec<(String, Vec<u8>)>> {
    let encoders = bsi_delta::delta_encoders();
    let mut seeds = Vec::new();
    for (name, old, new) in pairs {
        for (choice, encoder) in encoders.iter().enumerate() {
            let Some(payload) = encoder
                .encode(old, new)
                .with_context(|| format!("{} on {name}", encoder.name()))?
            else {
                continue;
            };
            if let Some(input) = decoder_input(choice, old, new.len(), &payload) {
                seeds.push((format!("{name}-{}", encoder.name()), input));
            }
        }
        let plain = bsi_delta::compress(new).with_context(|| format!("zstd on {name}"))?;
        if let Some(input) = decoder_input(encoders.len(), &[], new.len(), &plain) {
            seeds.push((format!("{name}-plain"), input));
        }
    }
    Ok(seeds)
}

/// Packages of two small trees made from the pairs, as letters (a) and (b), and of a tree
/// against itself.
fn package_seeds(pairs: &[(&str, Vec<u8>, Vec<u8>)]) -> Result<Vec<(String, Vec<u8>)>> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let file = |name: &str| {
        pairs
            .iter()
            .find(|(n, ..)| *n == name)
            .with_context(|| format!("no stored pair {name}"))
    };
    let (_, lib_old, lib_new) = file("elf-2")?;
    let (_, log_old, log_new) = file("gzip-1")?;
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let (base, target) = (scratch.path().join("base"), scratch.path().join("target"));
    for (root, lib, log) in [(&base, lib_old, log_old), (&target, lib_new, log_new)] {
        fs::create_dir_all(root.join("lib"))?;
        fs::create_dir_all(root.join("doc"))?;
        fs::write(root.join("lib/libx.so"), lib)?;
        fs::write(root.join("doc/changelog.gz"), log)?;
        symlink("libx.so", root.join("lib/libx.so.1"))?;
    }
    fs::write(base.join("doc/removed.txt"), "gone in the new tree\n")?;
    fs::write(target.join("doc/added.txt"), "new in the new tree\n")?;
    symlink("added.txt", target.join("doc/latest"))?;
    fs::create_dir(target.join("empty"))?;
    fs::set_permissions(target.join("lib"), fs::Permissions::from_mode(0o700))?;
    // One time for every entry of both trees: the packages hold the changes above and no
    // change of time, whatever the clock did while the trees were written, and are the same
    // bytes on every run.
    let time = filetime::FileTime::from_unix_time(1_770_681_600, 0);
    for root in [&base, &target] {
        for entry in walkdir::WalkDir::new(root).contents_first(true) {
            let path = entry?.into_path();
            filetime::set_symlink_file_times(&path, time, time)
                .with_context(|| format!("setting the time of {}", path.display()))?;
        }
    }

    let key = SecretKey::from_seed(VERIFY_KEY_SEED);
    let mut seeds = Vec::new();
    for (name, from, letter) in [
        ("letter-a", &base, "a"),
        ("letter-b", &base, "b"),
        ("unchanged", &target, "a"),
    ] {
        let opts = BuildOptions {
            base: from.clone(),
            target: target.clone(),
            product: "fuzz".into(),
            base_version: "26.3".parse().context("version")?,
            base_build: None,
            letter: letter.parse().context("letter")?,
            components: Vec::new(),
            key: &key,
        };
        let built = bsi_engine::build(&opts, &NoProgress)
            .with_context(|| format!("building the {name} package"))?;
        seeds.push((format!("{name}.bsi"), built.bytes));
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_pairs() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
        let data = crate::demo::workspace_root().join("crates/bsi-delta/tests/data");
        PAIRS
            .iter()
            .map(|&(name, old, new)| {
                let read = |f: &str| fs::read(data.join(f)).expect("a stored pair");
                (name, read(old), read(new))
            })
            .collect()
    }

    /// Each decoder input, read as the `decoders` target reads it, decodes to its pair's new
    /// file with the decoder it names: a seed laid out otherwise would start the fuzzer
    /// outside the format.
    #[test]
    fn decoder_seeds_decode_as_the_target_reads_them() {
        let pairs = stored_pairs();
        let seeds = decoder_seeds(&pairs).expect("seeds");
        let encoders = bsi_delta::delta_encoders();
        let mut seen = std::collections::BTreeSet::new();
        for (name, input) in &seeds {
            let [which, l0, l1, l2, o0, o1, rest @ ..] = &input[..] else {
                panic!("{name}: shorter than the header");
            };
            let new_len = u64::from(u32::from_le_bytes([*l0, *l1, *l2, 0]));
            let old_len = usize::from(u16::from_le_bytes([*o0, *o1]));
            let (old, payload) = rest.split_at(old_len);
            // The longest pair name that begins the seed's: "elf-2-arm64-..." is not elf-2's.
            let pair = pairs
                .iter()
                .filter(|(n, ..)| name.starts_with(&format!("{n}-")))
                .max_by_key(|(n, ..)| n.len())
                .expect("a seed is named after its pair");
            let decoded = match encoders.get(usize::from(*which)) {
                Some(encoder) => {
                    seen.insert(encoder.name());
                    encoder.decode(old, payload, new_len).expect(name)
                }
                None => bsi_delta::decompress(payload, new_len).expect(name),
            };
            assert!(decoded == pair.2, "{name} decodes to another file");
        }
        for encoder in encoders {
            assert!(
                seen.contains(encoder.name()),
                "no seed for {}",
                encoder.name()
            );
        }
    }

    /// The packages pass the `verify` target's signature check; the letters hold an entry for
    /// each change (library, changelog, removed and added files, new symlink, new directory,
    /// mode of `lib`), the tree against itself none.
    #[test]
    fn package_seeds_verify_with_the_targets_key() {
        let seeds = package_seeds(&stored_pairs()).expect("packages");
        let trust = SecretKey::from_seed(VERIFY_KEY_SEED).public();
        for (name, bytes) in seeds {
            let pkg = bsi_engine::VerifiedPackage::from_bytes(bytes, &trust, Path::new(&name))
                .expect(&name);
            let entries = pkg.manifest.entries.len();
            let expected = if name.starts_with("letter-") { 7 } else { 0 };
            assert_eq!(entries, expected, "{name}");
        }
    }
}
