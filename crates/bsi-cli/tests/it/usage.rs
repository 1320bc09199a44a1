//! Missing files are refusals (exit 1) that name the file; malformed command lines are usage
//! errors (exit 2).

use crate::support::*;

#[test]
fn a_missing_root_is_refused() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let missing = fx.path("no-such-root");
    let phrases = [p(&missing), "does not exist or is not a directory"];
    refused(
        &run([
            "apply",
            p(&pkg),
            "--root",
            p(&missing),
            "--trust",
            p(&example_pub()),
        ]),
        &phrases,
    );
    refused(&run(["revert", "--root", p(&missing)]), &phrases);
    refused(&run(["status", "--root", p(&missing)]), &phrases);
    assert!(!missing.exists(), "nothing created the missing root");
}

#[test]
fn a_missing_package_is_refused_naming_it() {
    let fx = Fixture::release_a();
    let missing = fx.path("no-such.bsi");
    let root = fx.base_root("root");
    refused(
        &run(["verify", p(&missing), "--trust", p(&example_pub())]),
        &[p(&missing), "No such file"],
    );
    refused(
        &run([
            "apply",
            p(&missing),
            "--root",
            p(&root),
            "--trust",
            p(&example_pub()),
        ]),
        &[p(&missing), "No such file"],
    );
    refused(&run(["inspect", p(&missing)]), &[p(&missing)]);
    assert!(!root.join(".bsi").exists());
}

#[test]
fn a_missing_key_is_refused_naming_it() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    let key = fx.path("no-such.key.pem");
    refused(
        &run(build_args(&fx.base, &fx.target, "a", &key, &pkg, &[])),
        &[p(&key)],
    );
    assert!(!pkg.exists());
}

#[test]
fn usage_errors_exit_with_2() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    usage_error(&run(["verify", p(&pkg)]), &["--trust"]);
    usage_error(
        &run(["apply", p(&pkg), "--trust", p(&example_pub())]),
        &["--root"],
    );
    usage_error(&run(["no-such-command"]), &["no-such-command"]);
    usage_error(&run(Vec::<&str>::new()), &["Usage"]);
    usage_error(
        &run(build_args(
            &fx.base,
            &fx.target,
            "A",
            &example_key(),
            &pkg,
            &[],
        )),
        &["letter \"A\" is not a single lower-case letter"],
    );
    usage_error(
        &run(build_args(
            &fx.base,
            &fx.target,
            "ab",
            &example_key(),
            &pkg,
            &[],
        )),
        &["letter \"ab\""],
    );
    let mut bad_version = build_args(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let at = bad_version
        .iter()
        .position(|a| a == "--base-version")
        .expect("has --base-version");
    bad_version[at + 1] = "26.x".to_owned();
    usage_error(
        &run(&bad_version),
        &["release version \"26.x\" is not dotted numbers"],
    );
    usage_error(
        &run(build_args(
            &fx.base,
            &fx.target,
            "a",
            &example_key(),
            &pkg,
            &["Safari"],
        )),
        &["component \"Safari\" is not of the form NAME=SUBPATH"],
    );
    usage_error(
        &run(build_args(
            &fx.base,
            &fx.target,
            "a",
            &example_key(),
            &pkg,
            &["Safari=../Applications"],
        )),
        &["contains `..`"],
    );
    assert!(!pkg.exists(), "no usage error writes a package");
}

#[test]
fn output_to_a_closed_pipe_or_a_full_disk_never_panics() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);

    // The reader has gone before bsi writes (`bsi inspect pkg | head -0`): quiet success.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let bin = assert_cmd::cargo::cargo_bin("bsi");
    let out = std::process::Command::new(&bin)
        .args(["inspect", p(&pkg)])
        .stdout(writer)
        .output()
        .expect("run bsi");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stderr(&out), "");

    // Standard output on a full device: one sentence and status 1.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full exists on Linux");
    let out = std::process::Command::new(&bin)
        .args(["inspect", p(&pkg), "--json"])
        .stdout(full)
        .output()
        .expect("run bsi");
    refused(&out, &["cannot write to standard output", "No space left"]);
}
