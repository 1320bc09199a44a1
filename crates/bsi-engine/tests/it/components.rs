//! Components limit a package to named subtrees; refused applies leave no trace.

use std::fs;
use std::path::Path;

use bsi_engine::{apply, build, scan, ApplyError, ComponentSpec, NoProgress, VerifiedPackage};
use bsi_format::{Image, Operation};
use bsi_sign::SecretKey;

use crate::fixture::opts;

/// Give every entry of `root` the same time, so that only content differs between trees.
fn pin_times(root: &Path) {
    let t = filetime::FileTime::from_unix_time(1_700_000_000, 0);
    let mut paths: Vec<_> = walk(root);
    paths.reverse(); // children before parents
    for p in paths {
        filetime::set_symlink_file_times(&p, t, t).expect("set time");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir).expect("read dir") {
        let path = item.expect("entry").path();
        out.push(path.clone());
        if fs::symlink_metadata(&path).expect("lstat").is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let full = root.join(rel);
    fs::create_dir_all(full.parent().expect("has parent")).expect("mkdir");
    fs::write(full, bytes).expect("write");
}

#[test]
fn only_named_subtrees_are_packaged_and_symlinked_roots_are_not_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (base, target) = (tmp.path().join("base"), tmp.path().join("target"));
    for tree in [&base, &target] {
        write(tree, "Safari.app/Contents/Info.plist", b"same");
        write(tree, "real/lib.dylib", b"library");
        std::os::unix::fs::symlink("real", tree.join("Linked")).expect("symlink");
    }
    write(&target, "Safari.app/Contents/Info.plist", b"changed");
    write(&target, "outside/changed", b"not in any component");
    write(&target, "real/lib.dylib", b"changed through the symlink");
    pin_times(&base);
    pin_times(&target);

    let key = SecretKey::from_seed([3; 32]);
    let built = build(
        &opts(
            &base,
            &target,
            &key,
            &["Safari=Safari.app", "Linked=Linked"],
        ),
        &NoProgress,
    )
    .expect("build");
    let paths: Vec<&str> = built
        .manifest
        .entries
        .iter()
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(
        paths,
        ["Safari.app/Contents/Info.plist"],
        "only Safari changed inside the components"
    );
    assert_eq!(built.manifest.components.len(), 2);
    assert_eq!(built.manifest.entries[0].component, "Safari");

    let tree = scan(&base, &["Linked"]).expect("scan");
    assert_eq!(
        tree.entries.len(),
        1,
        "a symlinked component root is one entry, not its target's files"
    );
    assert!(matches!(
        tree.entries.first().map(|(_, image)| image),
        Some(Image::Symlink { .. })
    ));

    let err = "Safari"
        .parse::<ComponentSpec>()
        .expect_err("needs NAME=SUBPATH");
    assert!(err.contains("NAME=SUBPATH"), "{err}");
    assert!("X=../etc".parse::<ComponentSpec>().is_err());
    assert!("X=/etc".parse::<ComponentSpec>().is_err());
}

#[test]
fn a_refused_apply_leaves_no_state_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (base, target, root) = (
        tmp.path().join("base"),
        tmp.path().join("target"),
        tmp.path().join("root"),
    );
    write(&base, "lib/a.dylib", &vec![7u8; 10_000]);
    write(&base, "lib/b.dylib", b"b");
    write(&target, "lib/a.dylib", &vec![8u8; 10_000]);
    write(&target, "lib/b.dylib", b"b2");
    write(&root, "lib/a.dylib", &vec![7u8; 10_000]);
    write(&root, "lib/b.dylib", b"edited on the device");

    let key = SecretKey::from_seed([4; 32]);
    let built = build(&opts(&base, &target, &key, &[]), &NoProgress).expect("build");
    assert!(built
        .manifest
        .entries
        .iter()
        .any(|e| matches!(e.op, Operation::Replace { .. } | Operation::Delta { .. })));
    let pkg = VerifiedPackage::from_bytes(built.bytes, &key.public(), Path::new("p.bsi"))
        .expect("verify");
    let before = scan(&root, &[]).expect("scan");
    let err = apply(
        &pkg,
        &root,
        &bsi_engine::default_state_dir(&root),
        &NoProgress,
    )
    .expect_err("refused");
    assert!(
        matches!(&err, ApplyError::PreImage { path, .. } if path.as_str() == "lib/b.dylib"),
        "{err}"
    );
    assert_eq!(scan(&root, &[]).expect("scan"), before, "root changed");
    assert!(!root.join(".bsi").exists(), "state directory left behind");
}
