//! A root that is not exactly the package's base is refused before the first write.

use std::fs;
use std::path::Path;

use crate::support::*;

/// Apply release (a) to a base root altered by `alter`; expect a refusal naming `path` and a
/// root left exactly as it was, with no letter installed.
fn refused_on_altered_base(alter: impl FnOnce(&Path), path: &str, reason: &str) {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let root = fx.base_root("root");
    alter(&root);
    let before = tree_snapshot(&root);
    assert_ne!(before, tree_snapshot(&fx.base), "the alteration shows");
    refused(
        &run([
            "apply",
            p(&pkg),
            "--root",
            p(&root),
            "--trust",
            p(&example_pub()),
        ]),
        &[path, "is not the package's pre-image", reason],
    );
    assert_eq!(tree_snapshot(&root), before);
    assert!(!root.join(".bsi/installed.json").exists());
    assert_eq!(ok(&run(["status", "--root", p(&root)])), "macOS 26.3\n");
    // The offline check says the same.
    refused(
        &run([
            "verify",
            p(&pkg),
            "--trust",
            p(&example_pub()),
            "--base-tree",
            p(&root),
        ]),
        &[path, "is not the package's pre-image"],
    );
}

#[test]
fn a_touched_file_that_differs_is_refused() {
    let path = "Applications/Safari.app/Contents/Info.plist";
    refused_on_altered_base(
        |root| fs::write(root.join(path), "<plist>locally edited</plist>\n").expect("edit"),
        path,
        "content differs",
    );
}

#[test]
fn the_delta_source_that_differs_is_refused() {
    let path = format!("{WEBKIT_DIR}/Versions/A/WebKit");
    refused_on_altered_base(
        |root| {
            let mut bytes = webkit_base();
            bytes[5] ^= 0xff;
            fs::write(root.join(&path), bytes).expect("edit");
        },
        &path,
        "content differs",
    );
}

#[test]
fn a_file_that_should_be_absent_is_refused() {
    let path = "Applications/Safari.app/Contents/Resources/new.bin";
    refused_on_altered_base(
        |root| fs::write(root.join(path), "squatter").expect("create"),
        path,
        "a file is present where nothing should be",
    );
}

#[test]
fn a_symlink_with_another_target_is_refused() {
    let path = format!("{WEBKIT_DIR}/WebKit");
    refused_on_altered_base(
        |root| {
            fs::remove_file(root.join(&path)).expect("remove link");
            std::os::unix::fs::symlink("Versions/B/WebKit", root.join(&path)).expect("relink");
        },
        &path,
        "link points to \"Versions/B/WebKit\"",
    );
}

#[test]
fn a_file_with_other_permission_bits_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let path = format!("{WEBKIT_DIR}/Versions/A/Resources/mode.txt");
    refused_on_altered_base(
        |root| {
            fs::set_permissions(root.join(&path), fs::Permissions::from_mode(0o600)).expect("chmod")
        },
        &path,
        "permission bits are 600, expected 644",
    );
}
