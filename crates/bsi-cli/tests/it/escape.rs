//! Nothing a package says can make bsi write outside the root: validly signed manifests with
//! escaping paths are refused, and so is a root whose directories are symlinks leading out.

use std::fs;
use std::path::Path;

use bsi_format::RawPackage;

use crate::support::*;

fn escape_base() -> Model {
    let mut m = Model::new();
    m.insert("d".into(), dir(0o755, T0));
    m.insert("d/file".into(), file("same content\n", 0o644, T0));
    m
}

/// Adds `a`, changes `d/file`, adds `d/new`.
fn escape_target() -> Model {
    let mut m = escape_base();
    m.insert("a".into(), file("added at the top\n", 0o644, T1));
    m.insert("d/file".into(), file("patched content\n", 0o644, T1));
    m.insert("d/new".into(), file("added below d\n", 0o644, T1));
    m
}

#[test]
fn signed_manifests_with_escaping_paths_are_refused() {
    let fx = Fixture::new(&escape_base(), &escape_target());
    let pkg = fx.path("pkg.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let raw = RawPackage::split(&bytes).expect("package splits");
    let manifest = bsi_format::unpack_manifest(raw.manifest).expect("manifest unpacks");
    let paths: Vec<String> = manifest_json(&bytes)["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["path"].as_str().expect("path").to_owned())
        .collect();
    assert_eq!(paths, ["a", "d/file", "d/new"]);

    // Re-signing the unchanged manifest reproduces the package: the crafting is sound.
    assert_eq!(resign(&bytes, &manifest), bytes);
    let control = fx.path("control.bsi");
    let renamed = replace_once(&manifest, br#""path":"a""#, br#""path":"b""#);
    fs::write(&control, resign(&bytes, &renamed)).expect("write control");
    ok(&run(["verify", p(&control), "--trust", p(&example_pub())]));

    let outer = fx.path("outer");
    let root = outer.join("root");
    write_tree(&root, &escape_base(), false);
    let etc_x_existed = Path::new("/etc/x").exists();
    let before = tree_snapshot(&outer);
    for (bad, reason) in [
        ("/etc/x", "is absolute"),
        ("../x", "contains `..`"),
        ("a/../../x", "contains `..`"),
    ] {
        let crafted_manifest = replace_once(
            &manifest,
            br#""path":"a""#,
            format!(r#""path":"{bad}""#).as_bytes(),
        );
        let crafted = fx.path("crafted.bsi");
        let crafted_bytes = resign(&bytes, &crafted_manifest);
        assert_eq!(
            manifest_len(&crafted_bytes),
            bsi_format::pack_manifest(&crafted_manifest).len()
        );
        fs::write(&crafted, &crafted_bytes).expect("write crafted package");
        refused(
            &run(["verify", p(&crafted), "--trust", p(&example_pub())]),
            &[p(&crafted), bad, reason],
        );
        refused(
            &run([
                "apply",
                p(&crafted),
                "--root",
                p(&root),
                "--trust",
                p(&example_pub()),
            ]),
            &[p(&crafted), bad, reason],
        );
        assert_eq!(
            tree_snapshot(&outer),
            before,
            "{bad}: something was written"
        );
        assert_eq!(Path::new("/etc/x").exists(), etc_x_existed, "{bad}");
    }
}

/// A root whose `d` is a symlink to a directory outside it holding the base's `d/file`.
fn root_with_symlinked_dir(outer: &Path) -> std::path::PathBuf {
    let root = outer.join("root");
    write_tree(&root, &escape_base(), false);
    let elsewhere = outer.join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("create elsewhere");
    fs::rename(root.join("d/file"), elsewhere.join("file")).expect("move file out");
    fs::remove_dir(root.join("d")).expect("remove d");
    std::os::unix::fs::symlink(&elsewhere, root.join("d")).expect("symlink d");
    root
}

#[test]
fn a_symlinked_directory_leading_out_of_the_root_is_refused_for_a_changed_file() {
    let fx = Fixture::new(&escape_base(), &escape_target());
    let pkg = fx.path("pkg.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let outer = fx.path("outer");
    let root = root_with_symlinked_dir(&outer);
    assert_eq!(
        fs::read(root.join("d/file")).expect("read through the link"),
        b"same content\n",
        "through the symlink, the root looks like the base"
    );
    let before = tree_snapshot(&outer);
    refused(
        &run([
            "apply",
            p(&pkg),
            "--root",
            p(&root),
            "--trust",
            p(&example_pub()),
        ]),
        &["d/file", "would escape the root", "d is a symlink"],
    );
    assert_eq!(tree_snapshot(&outer), before);
    assert_eq!(
        fs::read(outer.join("elsewhere/file")).expect("read"),
        b"same content\n"
    );
}

#[test]
fn a_symlinked_directory_leading_out_of_the_root_is_refused_for_an_added_file() {
    let mut target = escape_base();
    target.insert("d/new".into(), file("added below d\n", 0o644, T1));
    let fx = Fixture::new(&escape_base(), &target);
    let pkg = fx.path("pkg.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let outer = fx.path("outer");
    let root = root_with_symlinked_dir(&outer);
    let before = tree_snapshot(&outer);
    refused(
        &run([
            "apply",
            p(&pkg),
            "--root",
            p(&root),
            "--trust",
            p(&example_pub()),
        ]),
        &["d/new", "would escape the root", "d is a symlink"],
    );
    assert_eq!(tree_snapshot(&outer), before);
    assert!(!outer.join("elsewhere/new").exists());
}
