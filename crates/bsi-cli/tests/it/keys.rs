//! Trust: a package verifies only with the key that signed it, and only a public key is a trust
//! root.

use crate::support::*;

#[test]
fn another_public_key_is_refused_by_verify_and_apply() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let keys = fx.path("keys");
    ok(&run(["keygen", "--out-dir", p(&keys), "--name", "other"]));
    let other = keys.join("other.pub.pem");

    ok(&run(["verify", p(&pkg), "--trust", p(&example_pub())]));
    refused(
        &run(["verify", p(&pkg), "--trust", p(&other)]),
        &["signature does not verify", p(&pkg)],
    );
    let root = fx.base_root("root");
    let before = tree_snapshot(&root);
    refused(
        &run(["apply", p(&pkg), "--root", p(&root), "--trust", p(&other)]),
        &["signature does not verify", p(&pkg)],
    );
    assert_eq!(tree_snapshot(&root), before);
    assert!(!root.join(".bsi").exists());
}

#[test]
fn a_private_key_is_not_a_trust_root() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let root = fx.base_root("root");
    let before = tree_snapshot(&root);
    let key = example_key();
    let phrases = ["is not an SPKI PEM ed25519 public key", p(&key)];
    refused(
        &run(["verify", p(&pkg), "--trust", p(&example_key())]),
        &phrases,
    );
    refused(
        &run([
            "apply",
            p(&pkg),
            "--root",
            p(&root),
            "--trust",
            p(&example_key()),
        ]),
        &phrases,
    );
    assert_eq!(tree_snapshot(&root), before);
    assert!(!root.join(".bsi").exists());
}

#[test]
fn keygen_refuses_to_overwrite_a_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["keygen", "--out-dir", p(dir.path()), "--name", "k"];
    ok(&run(args));
    let key = std::fs::read(dir.path().join("k.key.pem")).expect("key written");
    refused(&run(args), &["already exists"]);
    assert_eq!(
        std::fs::read(dir.path().join("k.key.pem")).expect("key kept"),
        key
    );
}
