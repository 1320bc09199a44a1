//! Trees a package cannot carry are refused when building, and no package is written.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;

/// `bsi build` of letter (a) from `fx`'s trees into `out`, with the example key.
fn build_a(fx: &Fixture, out: &Path, components: &[&str]) -> Output {
    run(build_args(
        &fx.base,
        &fx.target,
        "a",
        &example_key(),
        out,
        components,
    ))
}

#[test]
fn a_fifo_in_the_target_is_refused() {
    let fx = Fixture::release_a();
    let fifo = fx.target.join("Applications/Safari.app/Contents/pipe");
    mkfifo(&fifo);
    let pkg = fx.path("a.bsi");
    refused(
        &build_a(&fx, &pkg, &COMPONENTS),
        &[
            p(&fifo),
            "is a fifo, which a package cannot carry",
            "target tree",
        ],
    );
    assert!(!pkg.exists(), "--out is not created on failure");
}

#[test]
fn a_fifo_in_the_base_is_refused() {
    let fx = Fixture::release_a();
    let fifo = fx.base.join("usr/share/empty/pipe");
    mkfifo(&fifo);
    let pkg = fx.path("a.bsi");
    refused(
        &build_a(&fx, &pkg, &[]),
        &[p(&fifo), "is a fifo", "base tree"],
    );
    assert!(!pkg.exists(), "--out is not created on failure");
}

#[test]
fn a_name_that_is_not_utf8_is_refused() {
    let fx = Fixture::release_a();
    let dir = fx.target.join("Applications/Safari.app/Contents/Resources");
    std::fs::write(dir.join(OsStr::from_bytes(b"bad\xff")), "x").expect("write");
    let pkg = fx.path("a.bsi");
    refused(
        &build_a(&fx, &pkg, &COMPONENTS),
        &[p(&dir), "bad", "has a name that is not UTF-8"],
    );
    assert!(!pkg.exists(), "--out is not created on failure");
    assert_eq!(
        dir_listing(fx.dir.path()),
        ["base", "target"],
        "no temporary file is left beside --out"
    );
}

/// An unreadable file stops the build naming it. Root reads every file, so when the tests run as
/// root (as CI does) bsi runs as `nobody` through util-linux's `setpriv`.
#[test]
fn an_unreadable_file_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().expect("tempdir");
    let top = tmp.path();
    let open = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    for tree in ["base", "target"] {
        std::fs::create_dir_all(top.join(tree).join("lib")).expect("mkdir");
        std::fs::write(top.join(tree).join("lib/readable.dylib"), tree).expect("write");
        std::fs::write(top.join(tree).join("lib/secret.dylib"), tree).expect("write");
        open(&top.join(tree).join("lib/readable.dylib"), 0o644);
        open(&top.join(tree).join("lib"), 0o755);
        open(&top.join(tree), 0o755);
    }
    let secret = top.join("target/lib/secret.dylib");
    open(&top.join("base/lib/secret.dylib"), 0o644);
    open(&secret, 0o000);
    let out_dir = top.join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    open(&out_dir, 0o777);
    let key = top.join("key.pem");
    std::fs::copy(example_key(), &key).expect("copy key");
    open(&key, 0o644);
    open(top, 0o755);

    let pkg = out_dir.join("a.bsi");
    let args = build_args(&top.join("base"), &top.join("target"), "a", &key, &pkg, &[]);
    let we_are_root = std::fs::metadata(&key).expect("stat").uid() == 0;
    let output = if we_are_root {
        let bsi = assert_cmd::cargo::cargo_bin("bsi");
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bsi)
            .args(&args)
            .output()
            .expect("setpriv (util-linux) runs bsi as nobody")
    } else {
        run(&args)
    };
    refused(&output, &[p(&secret), "Permission denied", "target tree"]);
    assert!(!pkg.exists(), "--out is not created on failure");
}

/// An `--out` that is a directory, or a symlink to one, is refused before the trees are read
/// (the target's FIFO would be reported otherwise), and stays as it was: the rename that puts
/// the package in place would have failed on the one only once the package was made, and
/// replaced the other with the package.
#[test]
fn an_out_that_is_a_directory_is_refused_before_the_trees_are_read() {
    let fx = Fixture::release_a();
    mkfifo(&fx.target.join("Applications/Safari.app/Contents/pipe"));
    let dir = fx.path("packages");
    std::fs::create_dir(&dir).expect("make the directory");
    let link = fx.path("packages-link");
    std::os::unix::fs::symlink(&dir, &link).expect("make the symlink");
    for out in [&dir, &link] {
        refused(
            &build_a(&fx, out, &COMPONENTS),
            &["cannot write", p(out), "Is a directory"],
        );
    }
    assert!(dir_listing(&dir).is_empty(), "the directory was written in");
    assert!(link.is_symlink(), "the symlink was replaced");
    assert_eq!(
        dir_listing(fx.dir.path()),
        ["base", "packages", "packages-link", "target"]
    );
}
