//! New executables are encoded against the empty file with their code converted.

use std::fs;
use std::path::Path;

use bsi_engine::{apply, build, revert, scan, NoProgress, VerifiedPackage};
use bsi_format::{Entry, Name, Operation};
use bsi_sign::SecretKey;

use crate::fixture::{opts, pattern, write};

/// A small library of bsi-delta's stored test data.
fn library(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bsi-delta/tests/data")
        .join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn entry<'m>(manifest: &'m bsi_format::Manifest, path: &str) -> &'m Entry {
    manifest
        .entries
        .iter()
        .find(|e| e.path.as_str() == path)
        .unwrap_or_else(|| panic!("{path} has an entry"))
}

#[test]
fn new_executables_are_encoded_with_their_code_converted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (base, target, root) = (
        tmp.path().join("base"),
        tmp.path().join("target"),
        tmp.path().join("root"),
    );
    for tree in [&base, &target, &root] {
        write(tree, "lib/kept.so", &library("elf-2.new.so"));
    }
    for tree in [&base, &root] {
        fs::create_dir_all(tree.join("lib")).expect("mkdir");
        std::os::unix::fs::symlink("kept.so", tree.join("lib/libswap.so")).expect("symlink");
    }
    write(&target, "lib/libnew.so", &library("elf-1.new.so"));
    write(&target, "lib/libswap.so", &library("elf-1.arm64.new.so"));
    write(&target, "share/notes.txt", &pattern(4, 20_000));

    let key = SecretKey::from_seed([6; 32]);
    let built = build(&opts(&base, &target, &key, &[]), &NoProgress).expect("build");
    let m = &built.manifest;
    let by_code = Some(Name::from("zstd-prefix"));
    assert_eq!(
        entry(m, "lib/libnew.so").op,
        Operation::Add {
            encoder: by_code.clone()
        }
    );
    assert_eq!(
        entry(m, "lib/libswap.so").op,
        Operation::Replace { encoder: by_code }
    );
    assert_eq!(entry(m, "share/notes.txt").op, Operation::ADD);
    for (path, name) in [
        ("lib/libnew.so", "elf-1.new.so"),
        ("lib/libswap.so", "elf-1.arm64.new.so"),
    ] {
        let payload = entry(m, path).payload.as_ref().expect("a payload").len;
        let plain = bsi_delta::compress(&library(name)).expect("compress").len() as u64;
        assert!(payload < plain, "{path}: {payload} B against {plain} B");
    }

    // Read back as it was signed, applied and reverted byte for byte.
    let pkg = VerifiedPackage::from_bytes(built.bytes, &key.public(), Path::new("p.bsi"))
        .expect("verify");
    let state = tmp.path().join("state");
    let before = scan(&root, &[]).expect("scan");
    apply(&pkg, &root, &state, &NoProgress).expect("apply");
    assert_eq!(
        scan(&root, &[]).expect("scan"),
        scan(&target, &[]).expect("scan")
    );
    revert(&root, &state).expect("revert");
    assert_eq!(scan(&root, &[]).expect("scan"), before);
}
