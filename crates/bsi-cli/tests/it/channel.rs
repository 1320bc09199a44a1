//! `bsi channel`: init, add, withdraw and sign a channel directory.

use std::fs;
use std::path::Path;

use bsi_channel::SignedChannel;
use bsi_sign::{PublicKey, SecretKey};

use crate::support::*;

fn metadata(dir: &Path) -> SignedChannel {
    SignedChannel::from_bytes(&fs::read(dir.join("channel.json")).expect("read")).expect("parses")
}

#[test]
fn a_channel_is_made_filled_signed_and_withdrawn_from() {
    let fx = Fixture::new(&base_model(), &target_a_model());
    let target_b = fx.path("target-b");
    write_tree(&target_b, &target_b_model(), false);
    let (pkg_a, pkg_b) = (fx.path("a.bsi"), fx.path("b.bsi"));
    let bytes_a = build(
        &fx.base,
        &fx.target,
        "a",
        &example_key(),
        &pkg_a,
        &COMPONENTS,
    );
    build(
        &fx.base,
        &target_b,
        "b",
        &example_key(),
        &pkg_b,
        &COMPONENTS,
    );
    let repo = fx.path("repo");

    ok(&run(["channel", "init", "--dir", p(&repo)]));
    refused(
        &run(["channel", "init", "--dir", p(&repo)]),
        &["already exists"],
    );
    assert_eq!(metadata(&repo).signed.sequence, 0);

    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]));
    let listed = &metadata(&repo).signed.releases[0].letters[0];
    assert_eq!(listed.file, "macOS-26.3-25D125-a.bsi");
    assert_eq!(listed.size, bytes_a.len() as u64);
    assert_eq!(
        fs::read(repo.join(&listed.file)).expect("copied package"),
        bytes_a
    );
    refused(
        &run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]),
        &["already in the channel"],
    );
    let junk = fx.path("junk.bsi");
    fs::write(&junk, b"not a package").expect("write");
    refused(
        &run(["channel", "add", "--dir", p(&repo), p(&junk)]),
        &["junk.bsi", "is not a bsi package"],
    );

    // Signing: sequence 1, valid under the example key; a second key makes two signatures.
    let keys = fx.path("keys");
    ok(&run(["keygen", "--out-dir", p(&keys), "--name", "second"]));
    let second = keys.join("second.key.pem");
    ok(&run([
        "channel",
        "sign",
        "--dir",
        p(&repo),
        "--key",
        p(&example_key()),
        "--key",
        p(&second),
        "--expires",
        "30d",
    ]));
    let signed = metadata(&repo);
    assert_eq!(signed.signed.sequence, 1);
    let trusted = [
        PublicKey::load(&example_pub()).expect("pub"),
        SecretKey::load(&second).expect("key").public(),
    ];
    signed.verify(&trusted, 2).expect("two valid signatures");
    let in_a_month = bsi_channel::unix_seconds(std::time::SystemTime::now()) + 30 * 86_400;
    assert!((signed.signed.expires - in_a_month).abs() < 60);

    // Adding (b) and withdrawing (a) drop the signatures until the next sign.
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_b)]));
    assert!(metadata(&repo).signatures.is_empty());
    refused(
        &run([
            "channel",
            "withdraw",
            "--dir",
            p(&repo),
            "--product",
            "macOS",
            "--base-version",
            "26.3",
            "--letter",
            "c",
            "--reason",
            "x",
        ]),
        &["(c) is not a published letter"],
    );
    ok(&run([
        "channel",
        "withdraw",
        "--dir",
        p(&repo),
        "--product",
        "macOS",
        "--base-version",
        "26.3",
        "--letter",
        "a",
        "--reason",
        "broke sign-in on some websites",
    ]));
    ok(&run([
        "channel",
        "sign",
        "--dir",
        p(&repo),
        "--key",
        p(&example_key()),
        "--expires",
        "2099-01-01T00:00:00Z",
    ]));
    let signed = metadata(&repo);
    assert_eq!(signed.signed.sequence, 2);
    assert_eq!(signed.signed.expires, 4_070_908_800);
    let release = &signed.signed.releases[0];
    assert_eq!(
        release
            .letters
            .iter()
            .map(|l| l.letter.to_string())
            .collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(
        release.withdrawn[0].reason,
        "broke sign-in on some websites"
    );
    signed
        .verify(&trusted[..1], 1)
        .expect("signed by the example key");

    // Bad expiry and a withdrawn letter coming back are refused, changing nothing.
    let before = fs::read(repo.join("channel.json")).expect("read");
    refused(
        &run([
            "channel",
            "sign",
            "--dir",
            p(&repo),
            "--key",
            p(&example_key()),
            "--expires",
            "2001-01-01T00:00:00Z",
        ]),
        &["is not in the future"],
    );
    refused(
        &run([
            "channel",
            "sign",
            "--dir",
            p(&repo),
            "--key",
            p(&example_key()),
            "--expires",
            "someday",
        ]),
        &["neither a duration"],
    );
    assert_eq!(fs::read(repo.join("channel.json")).expect("read"), before);
    refused(
        &run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]),
        &["was withdrawn"],
    );
    refused(
        &run(["channel", "add", "--dir", p(&fx.path("nowhere")), p(&pkg_a)]),
        &["bsi channel init"],
    );
}

#[test]
fn a_trust_file_names_the_package_keys_and_is_checked_against_its_root() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let keys = fx.path("keys");
    for name in ["root", "other"] {
        ok(&run(["keygen", "--out-dir", p(&keys), "--name", name]));
    }
    let trust = fx.path("trust.json");
    let init = |out: &Path, packages: &Path| {
        run([
            "trust",
            "init",
            "--out",
            p(out),
            "--root",
            p(&keys.join("root.key.pem")),
            "--packages",
            p(packages),
            "--channel",
            p(&example_pub()),
        ])
    };
    ok(&init(&trust, &example_pub()));
    refused(&init(&trust, &example_pub()), &["already exists"]);

    // verify and apply take the trust file where they took a public key; so does the example.
    ok(&run(["verify", p(&pkg), "--trust", p(&trust)]));
    ok(&run([
        "verify",
        p(&pkg),
        "--trust",
        p(&keys_dir().join("trust.json")),
    ]));
    let root = fx.base_root("root");
    ok(&run([
        "apply",
        p(&pkg),
        "--root",
        p(&root),
        "--trust",
        p(&trust),
        "--quiet",
    ]));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));

    // A trust file whose packages key is another one refuses the package.
    let other_trust = fx.path("other-trust.json");
    ok(&init(&other_trust, &keys.join("other.pub.pem")));
    refused(
        &run(["verify", p(&pkg), "--trust", p(&other_trust)]),
        &["a.bsi", "not signed by that key"],
    );

    // Editing the trust file (adding a key to the packages role) breaks its root signature.
    let mut edited: serde_json::Value =
        serde_json::from_slice(&fs::read(&other_trust).expect("read")).expect("json");
    let example_id = PublicKey::load(&example_pub())
        .expect("pub")
        .key_id()
        .to_string();
    let pem = fs::read_to_string(example_pub()).expect("pem");
    edited["signed"]["keys"][&example_id] = serde_json::Value::String(pem);
    edited["signed"]["roles"]["packages"]["keys"]
        .as_array_mut()
        .expect("keys")
        .push(serde_json::Value::String(example_id));
    fs::write(&other_trust, serde_json::to_vec(&edited).expect("json")).expect("write");
    refused(
        &run(["verify", p(&pkg), "--trust", p(&other_trust)]),
        &["other-trust.json", "valid signature(s) from the root keys"],
    );
}
