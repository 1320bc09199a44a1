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
    let Published {
        fx,
        target_b,
        pkg_a,
        pkg_b,
        repo,
    } = published();
    let bytes_a = fs::read(&pkg_a).expect("read");
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
    // The same package again changes nothing; another (a) is refused.
    let listing = fs::read(repo.join("channel.json")).expect("read");
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]));
    assert_eq!(fs::read(repo.join("channel.json")).expect("read"), listing);
    let other_a = fx.path("other-a.bsi");
    build(
        &fx.base,
        &target_b,
        "a",
        &example_key(),
        &other_a,
        &COMPONENTS,
    );
    refused(
        &run(["channel", "add", "--dir", p(&repo), p(&other_a)]),
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
        &withdraw(&repo, "c", "x"),
        &["(c) is not a published letter"],
    );
    ok(&withdraw(&repo, "a", "broke sign-in on some websites"));
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

/// Release (a) and a (b) tree, both packages built, and where the channel goes.
struct Published {
    fx: Fixture,
    target_b: std::path::PathBuf,
    pkg_a: std::path::PathBuf,
    pkg_b: std::path::PathBuf,
    repo: std::path::PathBuf,
}

fn published() -> Published {
    let fx = Fixture::release_a();
    let target_b = fx.path("target-b");
    write_tree(&target_b, &target_b_model(), false);
    let (pkg_a, pkg_b) = (fx.path("a.bsi"), fx.path("b.bsi"));
    build(
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
    Published {
        fx,
        target_b,
        pkg_a,
        pkg_b,
        repo,
    }
}

/// Release (a), and a signed channel publishing it.
fn channel_with_a() -> (Fixture, std::path::PathBuf) {
    let fx = Fixture::release_a();
    let pkg_a = fx.path("a.bsi");
    build(
        &fx.base,
        &fx.target,
        "a",
        &example_key(),
        &pkg_a,
        &COMPONENTS,
    );
    let repo = fx.path("repo");
    ok(&run(["channel", "init", "--dir", p(&repo)]));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]));
    sign(&repo);
    (fx, repo)
}

/// `bsi channel withdraw` of macOS 26.3 (`letter`) from `repo`.
fn withdraw(repo: &Path, letter: &str, reason: &str) -> std::process::Output {
    run([
        "channel",
        "withdraw",
        "--dir",
        p(repo),
        "--product",
        "macOS",
        "--base-version",
        "26.3",
        "--letter",
        letter,
        "--reason",
        reason,
    ])
}

fn sign(repo: &Path) {
    ok(&run([
        "channel",
        "sign",
        "--dir",
        p(repo),
        "--key",
        p(&example_key()),
        "--expires",
        "30d",
    ]));
}

fn update(root: &Path, repo: &Path, install: bool) -> std::process::Output {
    let mut args = vec![
        "update".to_owned(),
        "--root".to_owned(),
        p(root).to_owned(),
        "--channel".to_owned(),
        p(repo).to_owned(),
        "--trust".to_owned(),
        p(&keys_dir().join("trust.json")).to_owned(),
    ];
    if install {
        args.push("--install".to_owned());
    }
    run(args)
}

#[test]
fn update_follows_the_channel_from_a_to_withdrawn_a_to_b_and_refuses_what_it_must() {
    let Published {
        fx,
        target_b,
        pkg_a,
        pkg_b,
        repo,
    } = published();
    ok(&run(["channel", "init", "--dir", p(&repo)]));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]));
    sign(&repo);
    let first_channel = fs::read(repo.join("channel.json")).expect("read");
    let root = fx.base_root("root");
    let status = || ok(&run(["status", "--root", p(&root)]));

    // (a) published: reported, then installed with --install.
    let out = ok(&update(&root, &repo, false));
    assert!(out.contains("macOS 26.3 (a) is available"), "{out}");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));
    let out = ok(&update(&root, &repo, true));
    assert!(out.contains("installed macOS 26.3 (a)"), "{out}");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));
    assert!(ok(&update(&root, &repo, true)).contains("up to date"));

    // (a) withdrawn while installed: the device goes back to the base and says why.
    ok(&withdraw(&repo, "a", "broke sign-in"));
    sign(&repo);
    let out = ok(&update(&root, &repo, false));
    assert!(
        out.contains("(a) was withdrawn (broke sign-in); the root is now macOS 26.3"),
        "{out}"
    );
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));
    assert_eq!(status(), "macOS 26.3\n(a) was withdrawn: broke sign-in\n");

    // (b) published: installed.
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_b)]));
    sign(&repo);
    let good_channel = fs::read(repo.join("channel.json")).expect("read");
    let b_file = repo.join("macOS-26.3-25D125-b.bsi");
    let good_b = fs::read(&b_file).expect("read");

    // Mix and match: the package file's bytes differ from the listing.
    let mut bad = good_b.clone();
    bad[100] ^= 1;
    fs::write(&b_file, &bad).expect("write");
    refused(
        &update(&root, &repo, true),
        &["b.bsi", "its sha256 is", "refusing the package"],
    );
    fs::write(&b_file, &good_b[..good_b.len() - 1]).expect("write");
    refused(&update(&root, &repo, true), &["refusing the package"]);
    fs::write(&b_file, &good_b).expect("write");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));

    let out = ok(&update(&root, &repo, true));
    assert!(out.contains("installed macOS 26.3 (b)"), "{out}");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&target_b));
    assert_eq!(status(), "macOS 26.3 (b)\n");

    // Other content under the sequence already seen (signed again without a new number).
    let mut same_seq = SignedChannel::from_bytes(&good_channel)
        .expect("parse")
        .signed;
    same_seq.sequence -= 1;
    same_seq.releases[0].withdrawn[0].reason = "another reason".into();
    let same_seq = SignedChannel::sign(
        same_seq,
        bsi_channel::unix_seconds(std::time::SystemTime::now()) + 3600,
        &[&SecretKey::load(&example_key()).expect("key")],
    );
    fs::write(repo.join("channel.json"), same_seq.to_bytes()).expect("write");
    refused(
        &update(&root, &repo, true),
        &["changed without a new sequence number"],
    );

    // Rollback: the first channel metadata again.
    fs::write(repo.join("channel.json"), &first_channel).expect("write");
    refused(
        &update(&root, &repo, true),
        &["sequence 1", "refusing a rollback"],
    );
    // Below threshold: metadata signed by a key the trust file does not name for channels.
    let keys = fx.path("keys");
    ok(&run([
        "keygen",
        "--out-dir",
        p(&keys),
        "--name",
        "stranger",
    ]));
    fs::write(repo.join("channel.json"), &good_channel).expect("write");
    ok(&run([
        "channel",
        "sign",
        "--dir",
        p(&repo),
        "--key",
        p(&keys.join("stranger.key.pem")),
        "--expires",
        "30d",
    ]));
    refused(
        &update(&root, &repo, true),
        &["0 valid signature(s)", "1 are needed"],
    );
    // Freeze: validly signed, newer, but expired.
    let stale = bsi_channel::SignedChannel::sign(
        SignedChannel::from_bytes(&good_channel)
            .expect("parse")
            .signed,
        1_000_000_000,
        &[&SecretKey::load(&example_key()).expect("key")],
    );
    fs::write(repo.join("channel.json"), stale.to_bytes()).expect("write");
    refused(
        &update(&root, &repo, true),
        &["expired at 2001-09-09", "frozen"],
    );
    // A clock earlier than the last time seen.
    let record = root.join(".bsi/device.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&fs::read(&record).expect("record")).expect("json");
    json["last_time"] = serde_json::json!(4_000_000_000i64);
    fs::write(&record, serde_json::to_vec(&json).expect("json")).expect("write");
    fs::write(repo.join("channel.json"), &good_channel).expect("write");
    refused(
        &update(&root, &repo, true),
        &["the clock reads", "earlier than 2096"],
    );
    assert_eq!(
        tree_snapshot(&root),
        tree_snapshot(&target_b),
        "refusals changed the root"
    );
}

#[test]
fn policy_decides_whether_update_installs() {
    let Published {
        fx,
        target_b: _,
        pkg_a,
        pkg_b,
        repo,
    } = published();
    ok(&run(["channel", "init", "--dir", p(&repo)]));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]));
    sign(&repo);
    let root = fx.base_root("root");
    let policy = |args: &[&str]| {
        let mut all = vec!["policy", "--root", p(&root)];
        all.extend_from_slice(args);
        ok(&run(all))
    };
    assert_eq!(policy(&[]), "auto-install off, allow on\n");

    // Automatic install on: update installs without --install.
    assert_eq!(
        policy(&["--auto-install", "on"]),
        "auto-install on, allow on\n"
    );
    assert!(ok(&update(&root, &repo, false)).contains("installed macOS 26.3 (a)"));

    // An administrator forbids new letters: (b) is reported, not installed, even with --install.
    assert_eq!(policy(&["--allow", "off"]), "auto-install on, allow off\n");
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_b)]));
    sign(&repo);
    let out = ok(&update(&root, &repo, true));
    assert!(
        out.contains("macOS 26.3 (b) is available, but the root's policy does not allow"),
        "{out}"
    );
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));
    // Installed letters stay removable.
    ok(&run(["revert", "--root", p(&root), "--quiet"]));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));
    usage_error(
        &run(["policy", "--root", p(&root), "--allow", "maybe"]),
        &["maybe"],
    );
    assert_eq!(policy(&[]), "auto-install on, allow off\n");
}

#[test]
fn a_full_release_retires_the_old_base_letters() {
    let (fx, repo) = channel_with_a();
    let root = fx.base_root("root");
    assert!(ok(&update(&root, &repo, true)).contains("installed macOS 26.3 (a)"));

    // The full release 26.4 moves the release description on.
    let plist = String::from_utf8(system_version_plist())
        .expect("utf-8")
        .replace("26.3", "26.4")
        .replace("25D125", "25E100");
    fs::write(root.join(PLIST), plist).expect("write");
    assert_eq!(
        ok(&run(["status", "--root", p(&root)])),
        "macOS 26.4\nmacOS 26.3 (a) is retired: a full release was installed over it\n"
    );
    let before = tree_snapshot(&root);
    refused(&run(["revert", "--root", p(&root)]), &["is retired"]);
    let out = ok(&update(&root, &repo, true));
    assert!(out.contains("macOS 26.4 is up to date"), "{out}");
    assert_eq!(tree_snapshot(&root), before);
}

/// A static file server on loopback for `dir`, answering until the test ends: GET only, 404
/// for what is missing. Returns its base URL.
fn serve(dir: &Path) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = String::new();
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut header = String::new();
                match reader.read_line(&mut header) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if header == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let file = dir.join(path.trim_start_matches('/'));
            let response = match fs::read(&file) {
                Ok(body) if !path.contains("..") => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&body);
                    r
                }
                _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&response);
        }
    });
    url
}

#[test]
fn update_reads_a_channel_over_http_with_bounded_downloads() {
    let (fx, repo) = channel_with_a();
    let url = serve(&repo);
    let root = fx.base_root("root");
    let update_url = |channel: &str| {
        run([
            "update",
            "--root",
            p(&root),
            "--channel",
            channel,
            "--trust",
            p(&keys_dir().join("trust.json")),
            "--install",
        ])
    };

    // A server whose package is longer than listed: refused after the listed size.
    let file = repo.join("macOS-26.3-25D125-a.bsi");
    let good = fs::read(&file).expect("read");
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    fs::write(&file, &longer).expect("write");
    refused(
        &update_url(&url),
        &["it is larger than listed", "refusing the package"],
    );
    fs::write(&file, &good).expect("write");
    refused(
        &update_url(&format!("{url}/nowhere")),
        &["nowhere/channel.json", "the server answered 404"],
    );
    // No server at all: the reason, and the address once.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("addr"))
    };
    let err = refused(&update_url(&closed), &["connection failed"]);
    assert_eq!(err.matches(&closed).count(), 1, "{err}");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));

    let out = ok(&update_url(&url));
    assert!(out.contains("installed macOS 26.3 (a)"), "{out}");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));
}

#[test]
fn update_refuses_a_package_listed_under_another_release() {
    let Published {
        fx,
        target_b: _,
        pkg_a,
        pkg_b,
        repo,
    } = published();
    ok(&run(["channel", "init", "--dir", p(&repo)]));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_b)]));
    // The listing of (b) names (a)'s bytes: right size and hash for that file, wrong package.
    let mut signed = SignedChannel::from_bytes(&fs::read(repo.join("channel.json")).expect("read"))
        .expect("parse");
    let a_bytes = fs::read(&pkg_a).expect("read");
    fs::write(repo.join("swapped.bsi"), &a_bytes).expect("write");
    let listed = &mut signed.signed.releases[0].letters[0];
    listed.file = "swapped.bsi".into();
    listed.size = a_bytes.len() as u64;
    listed.sha256 = bsi_format::Digest(sha256(&a_bytes));
    let resigned = SignedChannel::sign(
        signed.signed,
        bsi_channel::unix_seconds(std::time::SystemTime::now()) + 3600,
        &[&SecretKey::load(&example_key()).expect("key")],
    );
    fs::write(repo.join("channel.json"), resigned.to_bytes()).expect("write");
    let root = fx.base_root("root");
    refused(
        &update(&root, &repo, true),
        &[
            "swapped.bsi is macOS 26.3 (a)",
            "lists it as macOS 26.3 (b)",
        ],
    );
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

#[test]
fn a_rotated_trust_file_is_adopted_only_when_both_roots_signed_it() {
    let fx = Fixture::release_a();
    let keys = fx.path("keys");
    for name in ["root2", "other"] {
        ok(&run(["keygen", "--out-dir", p(&keys), "--name", name]));
    }
    let (other_key, other_pub) = (keys.join("other.key.pem"), keys.join("other.pub.pem"));
    // Packages and channel move to the `other` key, the root to `root2`.
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &other_key, &pkg, &COMPONENTS);
    let repo = fx.path("repo");
    ok(&run(["channel", "init", "--dir", p(&repo)]));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg)]));
    ok(&run([
        "channel",
        "sign",
        "--dir",
        p(&repo),
        "--key",
        p(&other_key),
        "--expires",
        "30d",
    ]));
    let rotate = |out: &Path, old_root: &Path| {
        run([
            "trust",
            "rotate",
            "--from",
            p(&keys_dir().join("trust.json")),
            "--out",
            p(out),
            "--old-root",
            p(old_root),
            "--root",
            p(&keys.join("root2.key.pem")),
            "--packages",
            p(&other_pub),
            "--channel",
            p(&other_pub),
        ])
    };
    let root = fx.base_root("root");

    // Without the rotation the device trusts only the example key: the channel is refused.
    refused(&update(&root, &repo, true), &["0 valid signature(s)"]);

    // A version 2 signed by the new root alone (the "old root" given is the new one) is refused.
    let bad = repo.join("trust.json");
    refused(
        &rotate(&bad, &keys.join("root2.key.pem")),
        &["root keys of version 1"],
    );
    assert!(!bad.exists());

    // Signed by the old and the new root: adopted, then the update installs.
    ok(&rotate(&bad, &keys_dir().join("root.key.pem")));
    let out = ok(&update(&root, &repo, true));
    assert!(out.contains("installed macOS 26.3 (a)"), "{out}");
    let stored = bsi_channel::trust::SignedTrust::from_bytes(
        &fs::read(root.join(".bsi/trust.json")).expect("adopted trust"),
    )
    .expect("parses");
    assert_eq!(stored.signed.version, 2);
}

#[test]
fn update_switches_from_a_to_b_in_one_transaction() {
    let Published {
        fx,
        target_b,
        pkg_a,
        pkg_b,
        repo,
    } = published();
    ok(&run(["channel", "init", "--dir", p(&repo)]));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]));
    sign(&repo);
    let root = fx.base_root("root");
    ok(&update(&root, &repo, true));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_b)]));
    sign(&repo);
    let out = ok(&update(&root, &repo, true));
    assert!(out.contains("installed macOS 26.3 (b)"), "{out}");
    assert_eq!(tree_snapshot(&root), tree_snapshot(&target_b));
    assert_eq!(ok(&run(["status", "--root", p(&root)])), "macOS 26.3 (b)\n");
    // One letter installed: reverting (b) goes straight back to the base.
    ok(&run(["revert", "--root", p(&root), "--quiet"]));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));
}

#[test]
fn a_package_the_channel_does_not_list_is_never_installed() {
    let Published {
        fx,
        target_b: _,
        pkg_a,
        pkg_b,
        repo,
    } = published();
    ok(&run(["channel", "init", "--dir", p(&repo)]));
    ok(&run(["channel", "add", "--dir", p(&repo), p(&pkg_a)]));
    sign(&repo);
    // (b) lies in the channel directory under the name a listing would give it, unlisted.
    fs::copy(&pkg_b, repo.join("macOS-26.3-25D125-b.bsi")).expect("copy");
    let root = fx.base_root("root");
    let out = ok(&update(&root, &repo, true));
    assert!(out.contains("installed macOS 26.3 (a)"), "{out}");
    assert!(ok(&update(&root, &repo, true)).contains("macOS 26.3 (a) is up to date"));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));
}
