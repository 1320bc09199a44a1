//! Letters: a later letter supersedes an earlier one, an earlier one is refused once a later
//! is installed, and revert always returns to the base release.

use crate::support::*;

#[test]
fn letter_b_supersedes_a_and_revert_returns_to_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base");
    let target_a = dir.path().join("target-a");
    let target_b = dir.path().join("target-b");
    write_tree(&base, &base_model(), false);
    write_tree(&target_a, &target_a_model(), false);
    write_tree(&target_b, &target_b_model(), false);
    let pkg_a = dir.path().join("a.bsi");
    let pkg_b = dir.path().join("b.bsi");
    build(&base, &target_a, "a", &example_key(), &pkg_a, &COMPONENTS);
    build(&base, &target_b, "b", &example_key(), &pkg_b, &COMPONENTS);
    let report: serde_json::Value =
        serde_json::from_str(&ok(&run(["inspect", p(&pkg_b), "--json"]))).expect("JSON");
    assert_eq!(report["letter"], "b");
    assert_eq!(
        report["entries"], 13,
        "(b) carries (a)'s 11 changes and 2 more"
    );

    let root = dir.path().join("root");
    write_tree(&root, &base_model(), false);
    let trust = example_pub();
    let apply =
        |pkg: &std::path::Path| run(["apply", p(pkg), "--root", p(&root), "--trust", p(&trust)]);
    let status = || ok(&run(["status", "--root", p(&root)]));

    ok(&apply(&pkg_a));
    assert_eq!(status(), "macOS 26.3 (a)\n");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&target_a));

    let out = apply(&pkg_b);
    ok(&out);
    assert!(
        stderr(&out).contains("installed macOS 26.3 (b)") && stderr(&out).contains("replacing (a)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(status(), "macOS 26.3 (b)\n");
    let b_snap = tree_snapshot(&target_b);
    assert_eq!(tree_snapshot(&root), b_snap);

    let out = apply(&pkg_b);
    ok(&out);
    assert!(
        stderr(&out).contains("already installed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(tree_snapshot(&root), b_snap);

    let state = tree_snapshot(&root.join(".bsi"));
    refused(
        &apply(&pkg_a),
        &[
            "already has macOS 26.3 (b) installed",
            "macOS 26.3 (a) is not newer",
        ],
    );
    assert_eq!(tree_snapshot(&root), b_snap);
    assert_eq!(tree_snapshot(&root.join(".bsi")), state);
    assert_eq!(status(), "macOS 26.3 (b)\n");

    let out = run(["revert", "--root", p(&root)]);
    ok(&out);
    assert!(stderr(&out).contains("removed (b)"), "{}", stderr(&out));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&base));
    assert_eq!(dir_listing(&root.join(".bsi")), Vec::<String>::new());
    assert_eq!(status(), "macOS 26.3\n");
}

#[test]
fn a_package_for_another_release_is_refused_over_an_installed_letter() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let root = fx.base_root("root");
    ok(&run([
        "apply",
        p(&pkg),
        "--root",
        p(&root),
        "--trust",
        p(&example_pub()),
    ]));
    let other = fx.path("other.bsi");
    let mut args = build_args(&fx.target, &fx.base, "b", &example_key(), &other, &[]);
    let at = args
        .iter()
        .position(|a| a == "--base-version")
        .expect("has --base-version");
    args[at + 1] = "26.4".to_owned();
    ok(&run(&args));
    let before = tree_snapshot(&root);
    refused(
        &run([
            "apply",
            p(&other),
            "--root",
            p(&root),
            "--trust",
            p(&example_pub()),
        ]),
        &[
            "has macOS 26.3 (a) installed",
            "macOS 26.4 (b) is for another product or release",
        ],
    );
    assert_eq!(tree_snapshot(&root), before);
}
