//! Trees a package cannot carry are refused when building, and no package is written.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use crate::support::*;

#[test]
fn a_fifo_in_the_target_is_refused() {
    let fx = Fixture::release_a();
    let fifo = fx.target.join("Applications/Safari.app/Contents/pipe");
    let status = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo failed");
    let pkg = fx.path("a.bsi");
    refused(
        &run(build_args(
            &fx.base,
            &fx.target,
            "a",
            &example_key(),
            &pkg,
            &COMPONENTS,
        )),
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
    let status = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo failed");
    let pkg = fx.path("a.bsi");
    refused(
        &run(build_args(
            &fx.base,
            &fx.target,
            "a",
            &example_key(),
            &pkg,
            &[],
        )),
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
        &run(build_args(
            &fx.base,
            &fx.target,
            "a",
            &example_key(),
            &pkg,
            &COMPONENTS,
        )),
        &[p(&dir), "bad", "has a name that is not UTF-8"],
    );
    assert!(!pkg.exists(), "--out is not created on failure");
    assert_eq!(
        dir_listing(fx.dir.path()),
        ["base", "target"],
        "no temporary file is left beside --out"
    );
}
