//! The whole life of a patch through the CLI: keygen, build, inspect, verify, status, apply,
//! apply again, revert, revert again.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::*;

fn component<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["components"]
        .as_array()
        .expect("components array")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no component {name} in {report}"))
}

fn paths(items: &serde_json::Value) -> Vec<&str> {
    items
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["path"].as_str().expect("path"))
        .collect()
}

fn round_trip(external_state: bool) {
    let fx = Fixture::release_a();
    let keys = fx.path("keys");

    // keygen
    let out = run(["keygen", "--out-dir", p(&keys), "--name", "release-1"]);
    ok(&out);
    let (key, public) = (
        keys.join("release-1.key.pem"),
        keys.join("release-1.pub.pem"),
    );
    assert!(stderr(&out).contains("key id"), "{}", stderr(&out));
    assert_eq!(
        fs::metadata(&key)
            .expect("key written")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(fs::read_to_string(&key)
        .expect("read key")
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(fs::read_to_string(&public)
        .expect("read public key")
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    let key_id = bsi_sign::PublicKey::load(&public)
        .expect("public key loads")
        .key_id()
        .to_string();

    // build
    let pkg = fx.path("macOS-26.3-a.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &key, &pkg, &COMPONENTS);
    assert!(bytes.starts_with(&bsi_format::MAGIC));

    // inspect --json
    let report: serde_json::Value =
        serde_json::from_str(&ok(&run(["inspect", p(&pkg), "--json"]))).expect("inspect JSON");
    assert_eq!(report["product"], "macOS");
    assert_eq!(report["base_version"], "26.3");
    assert_eq!(report["base_build"], "25D125");
    assert_eq!(report["letter"], "a");
    assert_eq!(report["title"], "macOS 26.3 (a)");
    assert_eq!(report["signer"], key_id.as_str());
    assert_eq!(report["package_bytes"], bytes.len() as u64);
    assert_eq!(report["entries"], 11);
    let safari = component(&report, "Safari");
    assert_eq!(safari["path"], SAFARI_DIR);
    assert_eq!(
        paths(&safari["added"]),
        [
            "Applications/Safari.app/Contents/Plugins",
            "Applications/Safari.app/Contents/Resources/new.bin"
        ]
    );
    assert_eq!(paths(&safari["deleted"]), Vec::<&str>::new());
    assert_eq!(
        paths(&safari["changed"]),
        [
            "Applications/Safari.app/Contents/Info.plist",
            "Applications/Safari.app/Contents/Resources"
        ]
    );
    let webkit = component(&report, "WebKit");
    assert_eq!(webkit["path"], WEBKIT_DIR);
    assert_eq!(webkit["added"].as_array().expect("added").len(), 2);
    assert_eq!(
        paths(&webkit["deleted"]),
        [
            format!("{WEBKIT_DIR}/Versions/A/Resources/old.txt"),
            format!("{WEBKIT_DIR}/Versions/A/empty")
        ]
    );
    assert_eq!(webkit["changed"].as_array().expect("changed").len(), 3);
    let binary = webkit["changed"]
        .as_array()
        .expect("changed")
        .iter()
        .find(|i| i["path"] == format!("{WEBKIT_DIR}/Versions/A/WebKit"))
        .expect("the WebKit binary changed");
    assert_eq!(binary["op"], "delta", "{binary}");
    assert!(
        binary["payload_bytes"].as_u64().expect("payload bytes") < 2_000,
        "a 64-byte edit of a 200 KB file costs little: {binary}"
    );
    let mode_only = webkit["changed"]
        .as_array()
        .expect("changed")
        .iter()
        .find(|i| i["path"] == format!("{WEBKIT_DIR}/Versions/A/Resources/mode.txt"))
        .expect("mode.txt changed");
    assert_eq!(mode_only["op"], "metadata");
    assert_eq!(mode_only["payload_bytes"], 0);

    // inspect (text)
    let text = ok(&run(["inspect", p(&pkg)]));
    for line in [
        "title      macOS 26.3 (a)",
        "base       26.3 (25D125)",
        "letter     a",
        "component Safari (Applications/Safari.app)",
        "component WebKit (System/Library/Frameworks/WebKit.framework)",
        "  added: 2",
        "  deleted: 0",
        "  changed: 2",
        "  deleted: 2",
        "  changed: 3",
    ] {
        assert!(text.contains(line), "inspect lacks {line:?}:\n{text}");
    }

    // verify, and verify against the base tree (and not against the target)
    let verified = ok(&run(["verify", p(&pkg), "--trust", p(&public)]));
    assert!(verified.contains("good signature"), "{verified}");
    assert!(verified.contains(&key_id), "{verified}");
    let against = ok(&run([
        "verify",
        p(&pkg),
        "--trust",
        p(&public),
        "--base-tree",
        p(&fx.base),
    ]));
    assert!(against.contains("turns"), "{against}");
    refused(
        &run([
            "verify",
            p(&pkg),
            "--trust",
            p(&public),
            "--base-tree",
            p(&fx.target),
        ]),
        &["is not the package's pre-image"],
    );

    // status, apply
    let root = fx.base_root("root");
    let state = fx.path("state");
    let state_args: Vec<String> = if external_state {
        vec!["--state-dir".to_owned(), p(&state).to_owned()]
    } else {
        Vec::new()
    };
    let state_dir = if external_state {
        state.clone()
    } else {
        root.join(".bsi")
    };
    let with_state = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(state_args.iter().cloned());
        run(all)
    };
    let status = |json: bool| {
        let mut args = vec!["status", "--root", p(&root)];
        if json {
            args.push("--json");
        }
        ok(&with_state(&args))
    };
    let base_snap = tree_snapshot(&fx.base);
    let target_snap = tree_snapshot(&fx.target);
    assert_eq!(tree_snapshot(&root), base_snap);
    assert_ne!(base_snap, target_snap);
    assert_eq!(status(false), "macOS 26.3\n");

    let out = with_state(&["apply", p(&pkg), "--root", p(&root), "--trust", p(&public)]);
    ok(&out);
    assert!(
        stderr(&out).contains("installed macOS 26.3 (a)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(status(false), "macOS 26.3 (a)\n");
    let json: serde_json::Value = serde_json::from_str(&status(true)).expect("status JSON");
    assert_eq!(json["display"], "macOS 26.3 (a)");
    assert_eq!(json["letter"], "a");
    assert_eq!(json["product"], "macOS");
    assert_eq!(json["version"], "26.3");
    assert_eq!(json["build"], "25D125");
    assert_eq!(tree_snapshot(&root), target_snap);
    assert!(state_dir.join("installed.json").is_file());
    if external_state {
        assert!(
            !root.join(".bsi").exists(),
            "--state-dir leaves the root alone"
        );
    }

    // apply again: nothing changes
    let state_before = tree_snapshot(&state_dir);
    let out = with_state(&["apply", p(&pkg), "--root", p(&root), "--trust", p(&public)]);
    ok(&out);
    assert!(
        stderr(&out).contains("already installed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(tree_snapshot(&root), target_snap);
    assert_eq!(tree_snapshot(&state_dir), state_before);

    // revert
    let out = with_state(&["revert", "--root", p(&root)]);
    ok(&out);
    assert!(
        stderr(&out).contains("removed (a)") && stderr(&out).contains("macOS 26.3"),
        "{}",
        stderr(&out)
    );
    assert_eq!(tree_snapshot(&root), base_snap);
    assert_eq!(
        dir_listing(&state_dir),
        Vec::<String>::new(),
        "the state directory keeps nothing of a reverted patch"
    );
    assert_eq!(status(false), "macOS 26.3\n");
    let json: serde_json::Value = serde_json::from_str(&status(true)).expect("status JSON");
    assert_eq!(json["display"], "macOS 26.3");
    assert_eq!(json["letter"], serde_json::Value::Null);

    // revert again
    refused(
        &with_state(&["revert", "--root", p(&root)]),
        &["no patch installed", p(&root)],
    );
    assert_eq!(tree_snapshot(&root), base_snap);
}

#[test]
fn round_trip_with_state_in_root() {
    round_trip(false);
}

#[test]
fn round_trip_with_state_dir_outside_root() {
    round_trip(true);
}

#[test]
fn whole_tree_package_round_trips() {
    // No --component: the whole tree is one component named after the product.
    let fx = Fixture::release_a();
    let pkg = fx.path("whole.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let report: serde_json::Value =
        serde_json::from_str(&ok(&run(["inspect", p(&pkg), "--json"]))).expect("inspect JSON");
    let components = report["components"].as_array().expect("components");
    assert_eq!(components.len(), 1);
    assert_eq!(components[0]["name"], "macOS");
    assert_eq!(components[0]["path"], "");
    let root = fx.base_root("root");
    ok(&run([
        "apply",
        p(&pkg),
        "--root",
        p(&root),
        "--trust",
        p(&example_pub()),
    ]));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));
    ok(&run(["revert", "--root", p(&root)]));
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.base));
    assert!(!Path::new(&root.join(".bsi/installed.json")).exists());
}

#[test]
fn revert_is_refused_when_a_patched_file_changed_since_apply() {
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
    let edited = "Applications/Safari.app/Contents/Resources/new.bin";
    fs::write(root.join(edited), "edited after apply").expect("edit");
    let before = tree_snapshot(&root);
    let state = tree_snapshot(&root.join(".bsi"));
    refused(
        &run(["revert", "--root", p(&root)]),
        &[
            edited,
            "changed since the patch was applied",
            "nothing was reverted",
        ],
    );
    assert_eq!(tree_snapshot(&root), before);
    assert_eq!(tree_snapshot(&root.join(".bsi")), state);
    assert_eq!(ok(&run(["status", "--root", p(&root)])), "macOS 26.3 (a)\n");
}
