//! Fault injection: apply, switch and revert are stopped after each of their filesystem steps
//! in turn (a crash, then ENOSPC, then EIO at that step), then recovered; the root must be
//! exactly the old tree or exactly the new one, and the state must say which.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

use bsi_engine::fault::{self, Crash, Fault};
use bsi_engine::{apply, recover, revert, scan, status, NoProgress, Tree, VerifiedPackage};

use crate::fixture::{materialize, pattern, Model, Node};
use crate::roundtrip::{package, package_bytes};

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

fn file(seed: u64, len: usize, mode: u32, t: i64) -> Node {
    Node::File {
        bytes: pattern(seed, len),
        mode,
        mtime: (t, 0),
    }
}

fn dir(t: i64) -> Node {
    Node::Dir {
        mode: 0o755,
        mtime: (t, 0),
    }
}

fn link(target: &str, t: i64) -> Node {
    Node::Symlink {
        target: target.to_owned(),
        mtime: (t, 0),
    }
}

/// A base and two letters that between them add, delete, replace, change kinds both ways,
/// change only metadata, and add and remove nested directories.
fn trees() -> (Model, Model, Model) {
    let mut base = Model::new();
    base.insert("Lib".into(), dir(1_600_000_000));
    base.insert("Lib/core.dylib".into(), file(1, 9000, 0o755, 1_600_000_100));
    base.insert("Lib/gone.dylib".into(), file(2, 700, 0o644, 1_600_000_200));
    base.insert("Lib/swap".into(), file(3, 300, 0o644, 1_600_000_300));
    base.insert("Lib/link".into(), link("core.dylib", 1_600_000_400));
    base.insert("Lib/meta.plist".into(), file(4, 200, 0o644, 1_600_000_500));
    base.insert("Old".into(), dir(1_600_000_600));
    base.insert("Old/a.txt".into(), file(5, 100, 0o644, 1_600_000_700));
    base.insert("Flat".into(), file(6, 50, 0o644, 1_600_000_800));

    let mut a = base.clone();
    if let Some(Node::File { bytes, .. }) = a.get_mut("Lib/core.dylib") {
        bytes.splice(100..100, pattern(9, 64));
        bytes[5000] ^= 0x5a;
    }
    a.remove("Lib/gone.dylib");
    a.insert("Lib/swap".into(), link("core.dylib", 1_650_000_000));
    a.insert("Lib/link".into(), file(7, 400, 0o644, 1_650_000_100));
    a.insert(
        "Lib/meta.plist".into(),
        Node::File {
            bytes: pattern(4, 200),
            mode: 0o600,
            mtime: (1_650_000_200, 5),
        },
    );
    a.remove("Old/a.txt");
    a.remove("Old");
    a.insert("Old".into(), file(8, 80, 0o644, 1_650_000_300));
    a.remove("Flat");
    a.insert("Flat".into(), dir(1_650_000_400));
    a.insert("Flat/new".into(), dir(1_650_000_500));
    a.insert(
        "Flat/new/n.bin".into(),
        file(10, 3000, 0o644, 1_650_000_600),
    );

    let mut b = a.clone();
    if let Some(Node::File { bytes, .. }) = b.get_mut("Lib/core.dylib") {
        bytes[7000] ^= 0x11;
    }
    b.insert("Lib/swap".into(), file(3, 300, 0o644, 1_600_000_300));
    b.insert("Lib/extra".into(), file(11, 500, 0o644, 1_660_000_000));
    (base, a, b)
}

fn materialized(parent: &Path, name: &str, model: &Model) -> std::path::PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).expect("mkdir");
    materialize(model, &dir);
    dir
}

/// Quiet the expected panics of injected crashes; keep every other panic's message.
fn quiet_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crash>().is_none() {
                default(info);
            }
        }));
    });
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Apply,
    Switch,
    Revert,
}

struct Case {
    base: Tree,
    a: Tree,
    b: Tree,
    base_model: Model,
    pkg_a: VerifiedPackage,
    pkg_b: VerifiedPackage,
}

impl Case {
    fn new() -> Case {
        let (base, a, b) = trees();
        let trees_dir = tempfile::tempdir().expect("tempdir");
        let base_dir = materialized(trees_dir.path(), "base", &base);
        let a_dir = materialized(trees_dir.path(), "a", &a);
        let b_dir = materialized(trees_dir.path(), "b", &b);
        Case {
            base: scan(&base_dir, &[]).expect("scan"),
            a: scan(&a_dir, &[]).expect("scan"),
            b: scan(&b_dir, &[]).expect("scan"),
            pkg_a: package(&base_dir, &a_dir, 'a'),
            pkg_b: package(&base_dir, &b_dir, 'b'),
            base_model: base,
        }
    }

    /// A fresh root in the state before `op`, and the trees before and after it.
    fn setup(&self, dir: &Path, op: Op) -> (&Tree, &Tree, Option<char>, Option<char>) {
        let root = materialized(dir, "root", &self.base_model);
        let state = dir.join("state");
        match op {
            Op::Apply => (&self.base, &self.a, None, Some('a')),
            Op::Switch => {
                apply(&self.pkg_a, &root, &state, &NoProgress).expect("apply a");
                (&self.a, &self.b, Some('a'), Some('b'))
            }
            Op::Revert => {
                apply(&self.pkg_a, &root, &state, &NoProgress).expect("apply a");
                (&self.a, &self.base, Some('a'), None)
            }
        }
    }

    /// Run `op` on the root under `dir`; `Ok(true)` when it succeeded.
    fn run(&self, dir: &Path, op: Op) -> bool {
        let (root, state) = (dir.join("root"), dir.join("state"));
        match op {
            Op::Apply => apply(&self.pkg_a, &root, &state, &NoProgress)
                .inspect_err(|e| eprintln!("{e}"))
                .is_ok(),
            Op::Switch => apply(&self.pkg_b, &root, &state, &NoProgress)
                .inspect_err(|e| eprintln!("{e}"))
                .is_ok(),
            Op::Revert => revert(&root, &state)
                .inspect_err(|e| eprintln!("{e}"))
                .is_ok(),
        }
    }
}

/// The root is exactly `old` or exactly `new`, and the installed letter says which.
fn settled(
    dir: &Path,
    old: (&Tree, Option<char>),
    new: (&Tree, Option<char>),
) -> Result<bool, String> {
    let (root, state) = (dir.join("root"), dir.join("state"));
    let now = scan(&root, &[]).map_err(|e| e.to_string())?;
    let status = status(&root, &state).map_err(|e| e.to_string())?;
    if let Some(i) = &status.interrupted {
        return Err(format!("status still reports {i}"));
    }
    let letter = status.letter.map(|l| l.to_string());
    let is = |(tree, l): (&Tree, Option<char>)| {
        now.entries == tree.entries && letter == l.map(|c| c.to_string())
    };
    if is(new) {
        Ok(true)
    } else if is(old) {
        Ok(false)
    } else {
        Err(format!(
            "the root is neither tree (installed letter {letter:?}); {} entries",
            now.entries.len()
        ))
    }
}

/// The staged files are synced together once all are written (see `fsx::Unsynced`), but
/// always before the journal that names them is moved into place (a revert writes the journal
/// as it stages): once the journal is there, recovery may complete the transaction from them.
#[test]
fn every_staged_file_is_synced_before_the_journal_is_written() {
    let case = Case::new();
    for op in [Op::Apply, Op::Switch, Op::Revert] {
        let tmp = tempfile::tempdir().expect("tempdir");
        case.setup(tmp.path(), op);
        fault::arm_trace(tmp.path());
        let ok = case.run(tmp.path(), op);
        let steps = fault::take_trace(tmp.path());
        assert!(ok, "{op:?} succeeds");
        let stage = tmp.path().join("state/txn/stage");
        let at =
            |action: &str, path: &Path| steps.iter().position(|(a, p)| *a == action && p == path);
        let journal = at(
            "move into place",
            &tmp.path().join("state/txn/journal.json"),
        )
        .unwrap_or_else(|| panic!("{op:?} wrote no journal"));
        let staged: Vec<&Path> = steps
            .iter()
            .filter(|(a, p)| *a == "create" && p.parent() == Some(stage.as_path()))
            .map(|(_, p)| p.as_path())
            .collect();
        assert!(!staged.is_empty(), "{op:?} staged no file");
        for file in staged {
            let created = at("create", file).expect("created");
            let synced = at("sync", file)
                .unwrap_or_else(|| panic!("{op:?}: {} never synced", file.display()));
            assert!(
                created < synced && synced < journal,
                "{op:?}: {} created at step {created}, synced at {synced}, journal at {journal}",
                file.display()
            );
        }
    }
}

#[test]
fn every_step_of_apply_switch_and_revert_recovers_to_old_or_new() {
    quiet_crashes();
    let case = Case::new();
    let mut report = Vec::new();
    for op in [Op::Apply, Op::Switch, Op::Revert] {
        // Count the steps of a clean run.
        let tmp = tempfile::tempdir().expect("tempdir");
        let (old, new, old_letter, new_letter) = case.setup(tmp.path(), op);
        fault::arm(tmp.path(), usize::MAX, Fault::Crash);
        let ok = case.run(tmp.path(), op);
        let steps = fault::disarm(tmp.path());
        assert!(ok, "{op:?} succeeds without faults");
        assert_eq!(
            settled(tmp.path(), (old, old_letter), (new, new_letter)),
            Ok(true)
        );
        assert!(steps > 20, "{op:?} counted only {steps} steps");

        let mut outcomes = [0usize; 2];
        for fault_kind in [Fault::Crash, Fault::Errno(ENOSPC), Fault::Errno(EIO)] {
            for at in 1..=steps {
                let tmp = tempfile::tempdir().expect("tempdir");
                let dir = tmp.path();
                case.setup(dir, op);
                fault::arm(dir, at, fault_kind);
                let result = panic::catch_unwind(AssertUnwindSafe(|| case.run(dir, op)));
                fault::disarm(dir);
                let what = format!("{op:?}, {fault_kind:?} at step {at} of {steps}");
                match (fault_kind, &result) {
                    (Fault::Crash, Err(payload)) => assert!(
                        payload.downcast_ref::<Crash>().is_some(),
                        "{what}: a panic that is not the injected crash"
                    ),
                    (Fault::Crash, Ok(_)) => panic!("{what}: the crash did not happen"),
                    (Fault::Errno(_), Err(_)) => panic!("{what}: panicked"),
                    (Fault::Errno(_), Ok(_)) => {
                        // The operation cleaned up by itself: old or new, nothing pending.
                        settled(dir, (old, old_letter), (new, new_letter))
                            .unwrap_or_else(|e| panic!("{what}, before recovery: {e}"));
                    }
                }
                let recovered = recover(&dir.join("root"), &dir.join("state"), false);
                assert!(recovered.is_ok(), "{what}: recover failed: {recovered:?}");
                let is_new = settled(dir, (old, old_letter), (new, new_letter))
                    .unwrap_or_else(|e| panic!("{what}, after recovery: {e}"));
                outcomes[usize::from(is_new)] += 1;
                assert!(
                    !dir.join("state/txn").exists(),
                    "{what}: transaction files left behind"
                );
                // Whatever letter ended installed, its revert data is whole: removing it
                // gives back the base release.
                if status(&dir.join("root"), &dir.join("state")).is_ok_and(|s| s.letter.is_some()) {
                    revert(&dir.join("root"), &dir.join("state"))
                        .unwrap_or_else(|e| panic!("{what}: revert after recovery: {e}"));
                    settled(dir, (&case.base, None), (&case.base, None))
                        .unwrap_or_else(|e| panic!("{what}: after revert: {e}"));
                }
            }
        }
        report.push(format!(
            "{op:?}: K = {steps} steps, {} runs, {} ended old, {} ended new",
            3 * steps,
            outcomes[0],
            outcomes[1]
        ));
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{op:?}: {outcomes:?}");
    }
    println!("{}", report.join("\n"));
}

#[test]
fn an_apply_or_revert_the_disk_cannot_hold_is_refused_before_writing() {
    let case = Case::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    case.setup(dir, Op::Apply);
    let (root, state) = (dir.join("root"), dir.join("state"));
    let before = scan(&root, &[]).expect("scan");

    fault::pretend_free_space(dir, Some(1000));
    let err = apply(&case.pkg_a, &root, &state, &NoProgress).expect_err("refused");
    let bsi_engine::ApplyError::NoSpace { space, .. } = &err else {
        panic!("not a space refusal: {err}");
    };
    let message = err.to_string();
    assert!(message.contains("not enough free space") && message.contains("1000 are free"));
    // The base files are kept as they are: revert data needs room only for the reverse deltas
    // of blocks payloads (1/64 of their files at most).
    assert!(
        space.staging > 0 && space.revert * 16 < space.staging,
        "{space:?}"
    );
    assert_eq!(scan(&root, &[]).expect("scan").entries, before.entries);
    assert!(
        !state.exists(),
        "the refused apply created the state directory"
    );

    // One byte short is refused; exactly enough installs.
    fault::pretend_free_space(dir, Some(space.needed() - 1));
    assert!(apply(&case.pkg_a, &root, &state, &NoProgress).is_err());
    fault::pretend_free_space(dir, Some(space.needed()));
    apply(&case.pkg_a, &root, &state, &NoProgress).expect("apply with just enough room");
    assert_eq!(scan(&root, &[]).expect("scan").entries, case.a.entries);

    // Revert stages the base files again.
    fault::pretend_free_space(dir, Some(1000));
    let err = revert(&root, &state).expect_err("refused");
    assert!(err.to_string().contains("not enough free space"), "{err}");
    assert_eq!(scan(&root, &[]).expect("scan").entries, case.a.entries);
    fault::pretend_free_space(dir, None);
    revert(&root, &state).expect("revert");
    assert_eq!(scan(&root, &[]).expect("scan").entries, case.base.entries);
}

#[test]
fn a_state_directory_that_is_a_symlink_is_refused() {
    let case = Case::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    case.setup(dir, Op::Apply);
    let root = dir.join("root");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    std::os::unix::fs::symlink(&elsewhere, root.join(".bsi")).expect("plant");
    let err = apply(&case.pkg_a, &root, &root.join(".bsi"), &NoProgress).expect_err("refused");
    assert!(err.to_string().contains("is not a directory"), "{err}");
    assert!(std::fs::read_dir(&elsewhere)
        .expect("read")
        .next()
        .is_none());
}

/// Open package (a) from a file, arm `fault` to overwrite the file with package (b) partway
/// through the apply, and apply (a). Returns the apply's result, the case and its root and state.
fn apply_while_the_file_changes(
    private: bool,
) -> (
    Result<bsi_engine::ApplyOutcome, bsi_engine::ApplyError>,
    Case,
    tempfile::TempDir,
) {
    let case = Case::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("case");
    std::fs::create_dir(&dir).expect("mkdir");
    case.setup(&dir, Op::Apply);
    let (root, state) = (dir.join("root"), dir.join("state"));
    // The package file on disk: (a), opened and verified once.
    let pkg_file = tmp.path().join("pkg.bsi");
    let trees_dir = tempfile::tempdir().expect("tempdir");
    let (base, a, b) = trees();
    let (base_dir, a_dir, b_dir) = (
        materialized(trees_dir.path(), "base", &base),
        materialized(trees_dir.path(), "a", &a),
        materialized(trees_dir.path(), "b", &b),
    );
    let key = crate::roundtrip::key();
    let bytes_of = |target: &Path, letter: char| package_bytes(&base_dir, target, letter);
    std::fs::write(&pkg_file, bytes_of(&a_dir, 'a')).expect("write package");
    let keys = [key.public()];
    let pkg = match private {
        true => VerifiedPackage::open_private(&pkg_file, &keys, &root),
        false => VerifiedPackage::open(&pkg_file, &keys),
    }
    .expect("verifies");
    // Before anything is decoded, the file is overwritten in place by another signed package.
    let (file, other) = (pkg_file.clone(), bytes_of(&b_dir, 'b'));
    fault::arm_action(&dir, 1, move |_| {
        std::fs::write(&file, other).expect("swap the package file");
    });
    let result = apply(&pkg, &root, &state, &NoProgress);
    fault::disarm(&dir);
    (result, case, tmp)
}

#[test]
fn what_is_applied_is_what_was_verified_even_if_the_file_changes() {
    let (result, case, tmp) = apply_while_the_file_changes(true);
    result.expect("apply from the private copy");
    let (root, state) = (tmp.path().join("case/root"), tmp.path().join("case/state"));
    assert_eq!(scan(&root, &[]).expect("scan").entries, case.a.entries);
    assert_eq!(
        status(&root, &state)
            .expect("status")
            .letter
            .map(|l| l.to_string()),
        Some("a".to_owned())
    );
}

#[test]
fn a_package_read_in_place_that_changes_is_refused_and_nothing_changes() {
    let (result, case, tmp) = apply_while_the_file_changes(false);
    let message = result
        .expect_err("the changed payloads fail their digests")
        .to_string();
    assert!(
        message.contains("changed after it was verified"),
        "{message}"
    );
    let (root, state) = (tmp.path().join("case/root"), tmp.path().join("case/state"));
    assert_eq!(scan(&root, &[]).expect("scan").entries, case.base.entries);
    assert_eq!(status(&root, &state).expect("status").letter, None);
}

/// What the root holds once the new tree is in place is checked path by path on every core;
/// files damaged at that instant are reported by the first of them in the transaction's order
/// (paths sorted), and nothing is recorded as installed.
#[test]
fn the_new_tree_is_checked_and_the_first_damaged_path_reported() {
    let case = Case::new();
    // Find the step after which the new tree is checked.
    let traced = tempfile::tempdir().expect("tempdir");
    case.setup(traced.path(), Op::Apply);
    fault::arm_trace(traced.path());
    assert!(case.run(traced.path(), Op::Apply));
    let last_sync = last_step_before_check(&fault::take_trace(traced.path()), traced.path());

    let tmp = tempfile::tempdir().expect("tempdir");
    case.setup(tmp.path(), Op::Apply);
    let root = tmp.path().join("root");
    // Just before that step, two files of the new tree change; the error names the first of
    // them in path order, whichever core finds its damage first.
    fault::arm_action(tmp.path(), last_sync + 1, {
        let root = root.clone();
        move |_| {
            std::fs::write(root.join("Lib/meta.plist"), b"changed").expect("write");
            std::fs::write(root.join("Lib/core.dylib"), b"changed").expect("write");
        }
    });
    let err = apply(&case.pkg_a, &root, &tmp.path().join("state"), &NoProgress)
        .expect_err("a damaged new tree is refused");
    fault::disarm(tmp.path());
    let message = err.to_string();
    assert!(
        message.contains("Lib/core.dylib is not as written") && !message.contains("meta.plist"),
        "{message}"
    );
    let state = status(&root, &tmp.path().join("state")).expect("status");
    assert_eq!(state.letter, None, "nothing installed: {message}");
}

/// The index of the last traced step before the new tree's check: the undo directory synced.
/// Only the commit's steps, in the state directory, follow it.
fn last_step_before_check(steps: &[(&'static str, std::path::PathBuf)], dir: &Path) -> usize {
    let undo = dir.join("state/txn/undo");
    let last_sync = steps
        .iter()
        .rposition(|(action, path)| *action == "sync" && *path == undo)
        .expect("the undo directory is synced");
    let root = dir.join("root");
    let after = &steps[last_sync + 1..];
    assert!(
        after.iter().all(|(_, path)| !path.starts_with(&root)),
        "nothing under the root changes after the check: {after:?}"
    );
    last_sync
}
