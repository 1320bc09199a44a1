//! Crash safety through the real binary: `kill -9` at moments spread over an apply and a revert
//! of a large tree, then `bsi recover`; the root lock; `status` of an interrupted operation.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bsi_engine::fault::{self, Crash, Fault};

use crate::support::*;

/// A tree of about 24 MB: libraries that the target edits (inserted and changed bytes), files it
/// adds and deletes, and a directory it replaces with a symlink.
fn large_models() -> (Model, Model) {
    let mut base = Model::new();
    base.insert("usr".into(), dir(0o755, T0));
    base.insert("usr/lib".into(), dir(0o755, T0));
    base.insert("usr/share".into(), dir(0o755, T0));
    for i in 0..24u64 {
        base.insert(
            format!("usr/lib/lib{i:02}.dylib"),
            file(noise(i, 1 << 20), 0o755, T0),
        );
    }
    base.insert("usr/share/old".into(), dir(0o755, T0));
    for d in ["System", "System/Library", "System/Library/CoreServices"] {
        base.insert(d.into(), dir(0o755, T0));
    }
    base.insert(PLIST.into(), file(system_version_plist(), 0o644, T0));
    base.insert(
        "usr/share/old/data".into(),
        file(pattern(99, 50_000), 0o644, T0),
    );
    let mut target = base.clone();
    for i in (0..24u64).step_by(2) {
        if let Some(Node::File { bytes, mtime, .. }) =
            target.get_mut(&format!("usr/lib/lib{i:02}.dylib"))
        {
            bytes.splice(1000..1000, pattern(i, 300));
            let n = bytes.len();
            bytes[n / 2] ^= 0x5a;
            *mtime = T1;
        }
    }
    target.remove("usr/lib/lib23.dylib");
    target.insert(
        "usr/lib/new.dylib".into(),
        file(noise(77, 200_000), 0o755, T1),
    );
    target.remove("usr/share/old/data");
    target.remove("usr/share/old");
    target.insert("usr/share/old".into(), link("../lib", T1));
    (base, target)
}

fn apply_args(pkg: &Path, root: &Path) -> Vec<String> {
    [
        "apply",
        p(pkg),
        "--root",
        p(root),
        "--trust",
        p(&example_pub()),
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn revert_args(root: &Path) -> Vec<String> {
    ["revert", "--root", p(root), "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Run `bsi` and kill it with SIGKILL after `delay` (if it is still running); true if killed.
fn run_and_kill(args: &[String], delay: Duration) -> bool {
    let bin = assert_cmd::cargo::cargo_bin("bsi");
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bsi");
    let deadline = Instant::now() + delay;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        if Instant::now() >= deadline {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn timed(args: &[String]) -> Duration {
    let start = Instant::now();
    ok(&run(args));
    start.elapsed()
}

#[test]
fn kill_9_during_apply_and_revert_then_recover() {
    let (base, target) = large_models();
    let fx = Fixture::new(&base, &target);
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let base_snap = tree_snapshot(&fx.base);
    let target_snap = tree_snapshot(&fx.target);

    // How long a whole apply and revert take here, to spread the kills over them.
    let probe = fx.path("probe");
    write_tree(&probe, &base, false);
    let apply_time = timed(&apply_args(&pkg, &probe));
    let revert_time = timed(&revert_args(&probe));

    const TRIALS: u64 = 24;
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for trial in 0..TRIALS {
        let reverting = trial % 2 == 1;
        let root = fx.path(&format!("root{trial}"));
        write_tree(&root, &base, false);
        let (args, span, before, after) = if reverting {
            ok(&run(apply_args(&pkg, &root)));
            (revert_args(&root), revert_time, &target_snap, &base_snap)
        } else {
            (
                apply_args(&pkg, &root),
                apply_time,
                &base_snap,
                &target_snap,
            )
        };
        // Spread over the operation: trial k of n stops at k/n of its length, give or take.
        let share = (trial / 2) as f64 / (TRIALS / 2) as f64;
        let killed = run_and_kill(&args, span.mul_f64(share * 1.1));
        ok(&run(["recover", "--root", p(&root)]));
        let now = tree_snapshot(&root);
        let status = ok(&run(["status", "--root", p(&root)]));
        let ended = if &now == after {
            assert_eq!(
                status.trim(),
                if reverting {
                    "macOS 26.3"
                } else {
                    "macOS 26.3 (a)"
                }
            );
            "new"
        } else if &now == before {
            assert_eq!(
                status.trim(),
                if reverting {
                    "macOS 26.3 (a)"
                } else {
                    "macOS 26.3"
                }
            );
            "old"
        } else {
            panic!("trial {trial} (reverting: {reverting}, killed: {killed}): the root is neither tree");
        };
        assert!(
            !root.join(".bsi/txn").exists(),
            "trial {trial}: transaction files left"
        );
        *outcomes
            .entry(match (reverting, killed, ended) {
                (false, true, "old") => "apply killed, ended old",
                (false, true, _) => "apply killed, ended new",
                (false, false, _) => "apply finished",
                (true, true, "old") => "revert killed, ended old",
                (true, true, _) => "revert killed, ended new",
                (true, false, _) => "revert finished",
            })
            .or_default() += 1;
        fs::remove_dir_all(&root).expect("remove trial root");
    }
    println!(
        "{TRIALS} kill -9 trials (apply {apply_time:?}, revert {revert_time:?}): {outcomes:?}"
    );
    let killed: usize = outcomes
        .iter()
        .filter(|(k, _)| k.contains("killed"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        killed >= 12,
        "only {killed} trials were killed mid-operation: {outcomes:?}"
    );
}

#[test]
fn a_second_operation_on_the_root_is_refused_or_waits() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let root = fx.base_root("root");
    let before = tree_snapshot(&root);

    let holder = fs::File::open(&root).expect("open root");
    holder.try_lock().expect("the test takes the root's lock");
    let out = run(apply_args(&pkg, &root));
    refused(
        &out,
        &["another bsi operation is under way on", p(&root), "--wait"],
    );
    refused(&run(revert_args(&root)), &["another bsi operation"]);
    refused(
        &run(["recover", "--root", p(&root)]),
        &["another bsi operation"],
    );
    assert_eq!(
        tree_snapshot(&root),
        before,
        "refused operations changed the root"
    );
    assert!(!root.join(".bsi").exists());

    // With --wait, apply waits for the lock and then installs.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(holder);
    });
    let start = Instant::now();
    let mut args = apply_args(&pkg, &root);
    args.push("--wait".into());
    ok(&run(&args));
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "apply did not wait"
    );
    release.join().expect("release thread");
    assert_eq!(
        stdout(&run(["status", "--root", p(&root)])).trim(),
        "macOS 26.3 (a)"
    );
}

#[test]
fn status_reports_an_interrupted_apply_and_recover_completes_it() {
    let fx = Fixture::release_a();
    let pkg_path = fx.path("a.bsi");
    let bytes = build(
        &fx.base,
        &fx.target,
        "a",
        &example_key(),
        &pkg_path,
        &COMPONENTS,
    );
    let trust = bsi_sign::PublicKey::load(&example_pub()).expect("example key");
    let pkg = bsi_engine::VerifiedPackage::from_bytes(bytes, &trust, &pkg_path).expect("verifies");

    // Crash an in-process apply at a late step: after the journal, before the commit.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<Crash>().is_none() {
            default_hook(info);
        }
    }));
    let probe = fx.base_root("probe");
    fault::arm(&probe, usize::MAX, Fault::Crash);
    bsi_engine::apply(&pkg, &probe, &probe.join(".bsi"), &bsi_engine::NoProgress).expect("apply");
    let steps = fault::disarm(&probe);
    let root = fx.base_root("root");
    fault::arm(&root, steps * 3 / 4, Fault::Crash);
    let crashed = std::panic::catch_unwind(|| {
        let _ = bsi_engine::apply(&pkg, &root, &root.join(".bsi"), &bsi_engine::NoProgress);
    });
    fault::disarm(&root);
    let payload = crashed.expect_err("the apply crashed");
    assert!(payload.downcast_ref::<Crash>().is_some());

    let snapshot = |dir: &Path| (tree_snapshot(dir), dir_listing(&dir.join(".bsi")));
    let before = snapshot(&root);
    let out = ok(&run(["status", "--root", p(&root)]));
    assert!(
        out.contains("an interrupted apply from macOS 26.3 to macOS 26.3 (a) awaits recovery"),
        "status: {out}"
    );
    assert!(out.contains("bsi recover --root"), "status: {out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&run(["status", "--root", p(&root), "--json"]))).expect("json");
    assert_eq!(json["interrupted"]["kind"], "apply");
    assert_eq!(snapshot(&root), before, "status changed something");

    let out = ok(&run(["recover", "--root", p(&root)]));
    assert!(
        out.contains("completed the interrupted apply: the root is macOS 26.3 (a)"),
        "recover: {out}"
    );
    assert_eq!(tree_snapshot(&root), tree_snapshot(&fx.target));
    assert_eq!(
        stdout(&run(["status", "--root", p(&root)])).trim(),
        "macOS 26.3 (a)"
    );
    let out = ok(&run(["recover", "--root", p(&root)]));
    assert!(out.contains("nothing to recover"), "recover: {out}");
}

#[test]
fn a_state_directory_on_another_filesystem_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let root = fx.base_root("root");
    let shm = Path::new("/dev/shm");
    let other = match fs::metadata(shm) {
        Ok(m) if m.dev() != fs::metadata(&root).expect("root").dev() => {
            tempfile::tempdir_in(shm).expect("tempdir in /dev/shm")
        }
        _ => {
            println!("skipped: /dev/shm is missing or on the root's filesystem");
            return;
        }
    };
    let state = other.path().join("state");
    let before = tree_snapshot(&root);
    let mut args = apply_args(&pkg, &root);
    args.extend(["--state-dir".to_owned(), p(&state).to_owned()]);
    refused(
        &run(&args),
        &["is not on the filesystem of root", p(&state)],
    );
    assert_eq!(tree_snapshot(&root), before);
    assert!(
        !state.exists(),
        "the refused apply created the state directory"
    );
}

#[test]
fn revert_after_a_full_os_update_is_refused_and_writes_nothing() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let root = fx.base_root("root");
    ok(&run(apply_args(&pkg, &root)));

    // The same bytes written again (new time) count as a change too.
    let webkit = root.join(WEBKIT_DIR).join("Versions/A/WebKit");
    let time =
        filetime::FileTime::from_last_modification_time(&fs::metadata(&webkit).expect("stat"));
    filetime::set_file_mtime(&webkit, filetime::FileTime::from_unix_time(T2.0, 0)).expect("touch");
    refused(
        &run(revert_args(&root)),
        &["Versions/A/WebKit", "was rewritten"],
    );
    filetime::set_file_mtime(&webkit, time).expect("untouch");

    // A full update to 26.4 rewrites the tree under the installed patch: a new WebKit, a new
    // release description, every file written anew (new times).
    let mut next = target_b_model();
    let mut webkit = webkit_patched();
    webkit[150_000] ^= 0x77;
    next.insert(
        format!("{WEBKIT_DIR}/Versions/A/WebKit"),
        file(webkit, 0o755, T2),
    );
    for node in next.values_mut() {
        if let Node::File { mtime, .. } | Node::Link { mtime, .. } = node {
            *mtime = T2;
        }
    }
    next.insert(
        PLIST.into(),
        file(
            String::from_utf8(system_version_plist())
                .expect("utf-8")
                .replace("26.3", "26.4"),
            0o644,
            T2,
        ),
    );
    for entry in fs::read_dir(&root).expect("read root") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n != ".bsi") {
            if path.is_dir() {
                fs::remove_dir_all(&path).expect("remove");
            } else {
                fs::remove_file(&path).expect("remove");
            }
        }
    }
    write_tree(&root, &next, false);

    let before = (tree_snapshot(&root), tree_snapshot(&root.join(".bsi")));
    refused(
        &run(revert_args(&root)),
        &["macOS 26.3 (a) is retired", "nothing was reverted"],
    );
    assert_eq!(
        (tree_snapshot(&root), tree_snapshot(&root.join(".bsi"))),
        before,
        "the refused revert wrote something"
    );
    assert_eq!(
        ok(&run(["status", "--root", p(&root)])),
        "macOS 26.4\nmacOS 26.3 (a) is retired: a full release was installed over it\n"
    );

    // An update that kept the release description (same version) is still caught by the
    // patched files themselves.
    fs::write(root.join(PLIST), system_version_plist()).expect("write");
    refused(
        &run(revert_args(&root)),
        &[
            "changed since the patch was applied",
            "nothing was reverted",
        ],
    );
}
