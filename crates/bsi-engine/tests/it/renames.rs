//! Renamed, copied and re-versioned files are encoded against their old file elsewhere.

use std::path::Path;

use bsi_engine::{apply, build, revert, scan, ApplyError, NoProgress, VerifiedPackage};
use bsi_format::{Operation, Source};
use bsi_sign::SecretKey;

use crate::fixture::{opts, pattern, write};

fn source_of<'m>(manifest: &'m bsi_format::Manifest, path: &str) -> (Option<&'m Source>, u64) {
    let entry = manifest
        .entries
        .iter()
        .find(|e| e.path.as_str() == path)
        .expect("entry present");
    let payload = entry.payload.as_ref().map_or(0, |p| p.len);
    match &entry.op {
        Operation::Delta { source, .. } => (source.as_deref(), payload),
        _ => (None, payload),
    }
}

#[test]
fn renames_copies_and_new_versions_use_the_old_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (base, target, root) = (
        tmp.path().join("base"),
        tmp.path().join("target"),
        tmp.path().join("root"),
    );
    let library = pattern(1, 300_000);
    let mut next_version = library.clone();
    next_version[1000..1010].copy_from_slice(b"patched!!!");
    let resource = pattern(2, 100_000);
    for tree in [&base, &root] {
        write(tree, "usr/lib/libcrypto.3.dylib", &library);
        write(tree, "Resources/old-name.png", &resource);
    }
    write(&target, "usr/lib/libcrypto.3.1.dylib", &next_version); // re-versioned, edited
                                                                  // Another version kept: of the same stem too, but further in size.
    for tree in [&base, &target, &root] {
        write(tree, "usr/lib/libcrypto.2.dylib", &pattern(3, 200_000));
    }
    write(&target, "Resources/new-name.png", &resource); // pure rename
    write(&target, "Resources/copy.png", &resource); // copy
    for dir in ["usr/lib", "usr", "Resources"] {
        for tree in [&base, &target, &root] {
            filetime::set_file_mtime(
                tree.join(dir),
                filetime::FileTime::from_unix_time(1_700_000_000, 0),
            )
            .expect("dir mtime");
        }
    }

    let key = SecretKey::from_seed([5; 32]);
    let built = build(&opts(&base, &target, &key, &[]), &NoProgress).expect("build");
    let m = &built.manifest;
    let (src, bytes) = source_of(m, "usr/lib/libcrypto.3.1.dylib");
    assert_eq!(
        src.map(|s| s.path.as_str()),
        Some("usr/lib/libcrypto.3.dylib")
    );
    assert!(bytes < 1_000, "re-versioned library costs {bytes} bytes");
    for copy in ["Resources/new-name.png", "Resources/copy.png"] {
        let (src, bytes) = source_of(m, copy);
        assert_eq!(
            src.map(|s| s.path.as_str()),
            Some("Resources/old-name.png"),
            "{copy}"
        );
        assert!(bytes < 200, "{copy} costs {bytes} bytes");
    }

    let pkg = VerifiedPackage::from_bytes(built.bytes, &key.public(), Path::new("p.bsi"))
        .expect("verify");
    let state = tmp.path().join("state");
    apply(&pkg, &root, &state, &NoProgress).expect("apply");
    assert_eq!(
        scan(&root, &[]).expect("scan"),
        scan(&target, &[]).expect("scan")
    );
    revert(&root, &state).expect("revert");
    assert_eq!(
        scan(&root, &[]).expect("scan"),
        scan(&base, &[]).expect("scan")
    );

    // A device whose source file differs is refused, naming the source, before any write.
    write(&root, "Resources/old-name.png", b"not the resource");
    let before = scan(&root, &[]).expect("scan");
    let err = apply(&pkg, &root, &state, &NoProgress).expect_err("refused");
    assert!(
        matches!(&err, ApplyError::PreImage { path, .. } if path.as_str() == "Resources/old-name.png"),
        "{err}"
    );
    assert_eq!(scan(&root, &[]).expect("scan"), before);
}
