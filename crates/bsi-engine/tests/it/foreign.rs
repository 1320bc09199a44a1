//! A foreign write into a file that an apply replaces, before any of the apply's steps, is never
//! lost and never taken for the applied file: the transaction's checks skip reading a file again
//! only while none of its metadata has moved, its time of change included.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bsi_engine::fault;
use bsi_engine::{apply, recover, ApplyError, NoProgress};
use bsi_format::Operation;

use crate::confine::materialized;
use crate::fixture::{noise, Model, Node};
use crate::roundtrip::package;

/// Rewrite the first byte of `path` in place, size and modification time kept; the new bytes.
fn rewrite_in_place(path: &Path) -> Vec<u8> {
    let mtime = filetime::FileTime::from_last_modification_time(
        &fs::symlink_metadata(path).expect("stat the victim"),
    );
    let mut bytes = fs::read(path).expect("read the victim");
    bytes[0] ^= 0xff;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the victim");
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.write_all(&bytes[..1]).expect("write");
    drop(file);
    filetime::set_file_mtime(path, mtime).expect("restore the time");
    bytes
}

/// What the foreign writer did.
struct Landed {
    bytes: Vec<u8>,
    /// It wrote into the old file as the apply was replacing it (the step at hand was the
    /// victim's own, the old file still there): the write leaves with that file, as it would
    /// with any replacement by rename.
    into_the_replaced: bool,
}

/// For every step of a clean apply of `base` -> `target`: rewrite `victim` in place before
/// that step, apply, and check that the write is neither lost nor taken for the applied file.
fn rewrite_before_every_step(base: &Model, target: &Model, victim: &str, encoder: &str) {
    let trees_dir = tempfile::tempdir().expect("tempdir");
    let pkg = package(
        &materialized(trees_dir.path(), "base", base),
        &materialized(trees_dir.path(), "target", target),
        'a',
    );
    let victim_path = bsi_format::PkgPath::new(victim).expect("a path");
    let op = pkg.manifest.entries.find(&victim_path).expect("entries");
    let op = op.map(|(_, e)| e.into_owned());
    assert!(
        matches!(op.as_ref().map(|e| &e.op), Some(Operation::Delta { encoder: e, .. }) if e == encoder),
        "{victim} is not a {encoder} delta: {op:?}"
    );
    let probe = tempfile::tempdir().expect("tempdir");
    let root = materialized(probe.path(), "root", base);
    fault::arm(probe.path(), usize::MAX, fault::Fault::Crash);
    apply(&pkg, &root, &probe.path().join("state"), &NoProgress).expect("clean apply");
    let steps = fault::disarm(probe.path());
    let old = fs::read(trees_dir.path().join("base").join(victim)).expect("read the base");
    let new = fs::read(trees_dir.path().join("target").join(victim)).expect("read the target");

    let (mut applied, mut refused, mut raced) = (0, 0, 0);
    for at in 1..=steps {
        let tmp = tempfile::tempdir().expect("tempdir");
        let case = tmp.path().join("case");
        let root = materialized(&case, "root", base);
        // Old enough that its metadata vouches for its bytes: the checks may skip reading it.
        std::thread::sleep(Duration::from_millis(50));
        let landed = Arc::new(Mutex::new(None));
        let (path, slot, old) = (root.join(victim), Arc::clone(&landed), old.clone());
        fault::arm_action(&case, at, move |step| {
            let was_old = fs::read(&path).ok().as_ref() == Some(&old);
            let bytes = rewrite_in_place(&path);
            *slot.lock().expect("lock") = Some(Landed {
                bytes,
                into_the_replaced: step == path && was_old,
            });
        });
        let result = apply(&pkg, &root, &case.join("state"), &NoProgress);
        fault::disarm(&case);
        let landed = landed
            .lock()
            .expect("lock")
            .take()
            .unwrap_or_else(|| panic!("no step {at} of {steps}"));
        match result {
            Ok(_) => {
                let now = fs::read(root.join(victim)).expect("read the victim");
                let expected = match landed.into_the_replaced {
                    true => &new,
                    false => &landed.bytes,
                };
                assert!(
                    now == *expected,
                    "{victim} rewritten before step {at} of {steps}: the apply succeeded and the write is gone"
                );
                match landed.into_the_replaced {
                    true => raced += 1,
                    false => applied += 1,
                }
            }
            Err(_) => {
                let _ = recover(&root, &case.join("state"), false);
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0 && applied > 0,
        "{refused} refused, {applied} applied"
    );
    println!(
        "{victim} ({encoder}), {steps} steps: {refused} applies refused, {applied} kept the write \
         made after their checks, {raced} replaced the file written to as they replaced it"
    );
}

/// A tree of one library, `edit`ed in the target.
fn one_library(edit: impl Fn(&mut Vec<u8>)) -> (Model, Model) {
    let old = noise(5, 1 << 20);
    let mut new = old.clone();
    edit(&mut new);
    let node = |bytes: Vec<u8>, t| Node::File {
        bytes,
        mode: 0o755,
        mtime: (t, 0),
    };
    (
        [("lib.dylib".to_owned(), node(old, 1_600_000_000))].into(),
        [("lib.dylib".to_owned(), node(new, 1_650_000_000))].into(),
    )
}

#[test]
fn a_base_read_into_memory_and_rewritten_before_any_step_is_never_lost() {
    // A byte in every 40 changed: a bsdiff delta, whose base is read whole.
    let (base, target) = one_library(|new| new.iter_mut().step_by(40).for_each(|b| *b ^= 1));
    rewrite_before_every_step(&base, &target, "lib.dylib", "bsdiff");
}

#[test]
fn a_base_read_in_place_and_rewritten_before_any_step_is_never_lost() {
    // Near-identical: a blocks delta, whose base is read on disk where it is copied from.
    let (base, target) = one_library(|new| {
        for at in [10, 700_000, 1_000_000] {
            new[at] ^= 0x42;
        }
    });
    rewrite_before_every_step(&base, &target, "lib.dylib", "blocks");
}

/// A package of one library whose byte 500,000 changes (a blocks delta: the new file copies
/// all of the base but that byte), and a root holding the base under `case/`; the temporary
/// directory holding both.
fn one_byte_changed() -> (
    bsi_engine::VerifiedPackage,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let (base, target) = one_library(|new| new[500_000] ^= 1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let pkg = package(
        &materialized(tmp.path(), "base", &base),
        &materialized(tmp.path(), "target", &target),
        'a',
    );
    let root = materialized(&tmp.path().join("case"), "root", &base);
    (pkg, tmp, root)
}

#[test]
fn a_base_cut_short_after_its_check_is_refused_by_name() {
    let (pkg, tmp, root) = one_byte_changed();
    let case = tmp.path().join("case");
    let state = case.join("state");
    let victim = root.join("lib.dylib");
    // Cut just before its new file is staged: after the pre-image check, before the decode.
    let (path, stage) = (victim.clone(), state.join("txn/stage"));
    let cut = Arc::new(Mutex::new(false));
    let done = Arc::clone(&cut);
    for at in 1.. {
        let (path, stage, done) = (path.clone(), stage.clone(), Arc::clone(&done));
        fault::arm_action(&case, at, move |step| {
            if step.starts_with(&stage) && step != stage {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open");
                file.set_len(300_000).expect("cut the base short");
                *done.lock().expect("lock") = true;
            }
        });
        let result = apply(&pkg, &root, &state, &NoProgress);
        fault::disarm(&case);
        if !*cut.lock().expect("lock") {
            assert!(result.is_ok(), "nothing was cut before step {at}");
            // Start again from the base.
            let _ = bsi_engine::revert(&root, &state);
            continue;
        }
        // The base is hashed beside its decoding: whichever reads the cut first tells.
        let err = result.expect_err("a base cut short is refused");
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot read {}", victim.display()))
                || matches!(&err, ApplyError::PreImage { path, .. } if path.as_str() == "lib.dylib"),
            "{message}"
        );
        assert_eq!(fs::metadata(&victim).expect("stat").len(), 300_000);
        assert!(
            !state.join("txn").exists(),
            "the staging area was left behind"
        );
        return;
    }
}

#[test]
fn a_base_hashed_beside_its_decoding_that_differs_is_refused_as_a_pre_image() {
    // The new file does not copy byte 500,000 from the base, so a base that differs there alone
    // decodes as if it were right; only its hash tells.
    let (pkg, tmp, root) = one_byte_changed();
    let victim = root.join("lib.dylib");
    let mut bytes = fs::read(&victim).expect("read");
    bytes[500_000] ^= 0x80;
    fs::write(&victim, &bytes).expect("write");
    let state = tmp.path().join("case/state");
    let err = apply(&pkg, &root, &state, &NoProgress).expect_err("a base that differs is refused");
    assert!(matches!(err, ApplyError::PreImage { .. }), "{err}");
    assert!(err.to_string().contains("content differs"), "{err}");
    assert_eq!(fs::read(&victim).expect("read"), bytes, "the root changed");
    assert!(
        !state.join("txn").exists(),
        "the staging area was left behind"
    );
}

/// A base the decoder reads whole is hashed as it is read, not before: one changed in place
/// with its size and time kept passes the first look, and is refused by name as it is read.
#[test]
fn a_base_hashed_as_it_is_read_that_differs_is_refused_as_a_pre_image() {
    let (base, target) = one_library(|bytes| {
        for at in (0..bytes.len()).step_by(40) {
            bytes[at] ^= 0x42;
        }
    });
    let trees_dir = tempfile::tempdir().expect("tempdir");
    let pkg = package(
        &materialized(trees_dir.path(), "base", &base),
        &materialized(trees_dir.path(), "target", &target),
        'a',
    );
    let first = pkg.manifest.entries.get(0).expect("an entry");
    assert!(
        matches!(&first.op, Operation::Delta { encoder, .. } if encoder == "bsdiff"),
        "{:?}",
        first.op
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = materialized(tmp.path(), "root", &base);
    let bytes = rewrite_in_place(&root.join("lib.dylib"));
    let state = tmp.path().join("state");
    let err = apply(&pkg, &root, &state, &NoProgress).expect_err("a base that differs is refused");
    assert!(matches!(err, ApplyError::PreImage { .. }), "{err}");
    assert!(err.to_string().contains("content differs"), "{err}");
    assert_eq!(fs::read(root.join("lib.dylib")).expect("read"), bytes);
    assert!(
        !state.join("txn").exists(),
        "the staging area was left behind"
    );
}
