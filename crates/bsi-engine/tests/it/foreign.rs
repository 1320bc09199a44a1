//! A foreign write into a file that an apply replaces, before any of the apply's steps, is never
//! lost and never taken for the applied file: the transaction's checks skip reading a file again
//! only while none of its metadata has moved, its time of change included.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bsi_engine::fault;
use bsi_engine::{apply, recover, NoProgress};

use crate::confine::{materialized, trees};
use crate::roundtrip::package;

const VICTIM: &str = "A/B/C/lib.dylib";

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

#[test]
fn a_file_rewritten_in_place_before_any_step_is_never_lost_or_taken_for_applied() {
    let (base, target) = trees();
    let trees_dir = tempfile::tempdir().expect("tempdir");
    let pkg = package(
        &materialized(trees_dir.path(), "base", &base),
        &materialized(trees_dir.path(), "target", &target),
        'a',
    );
    let probe = tempfile::tempdir().expect("tempdir");
    let root = materialized(probe.path(), "root", &base);
    fault::arm(probe.path(), usize::MAX, fault::Fault::Crash);
    apply(&pkg, &root, &probe.path().join("state"), &NoProgress).expect("clean apply");
    let steps = fault::disarm(probe.path());
    let old = fs::read(trees_dir.path().join("base").join(VICTIM)).expect("read the base");
    let new = fs::read(trees_dir.path().join("target").join(VICTIM)).expect("read the target");

    let (mut applied, mut refused, mut raced) = (0, 0, 0);
    for at in 1..=steps {
        let tmp = tempfile::tempdir().expect("tempdir");
        let case = tmp.path().join("case");
        let root = materialized(&case, "root", &base);
        // Old enough that its metadata vouches for its bytes: the checks may skip reading it.
        std::thread::sleep(Duration::from_millis(50));
        let landed = Arc::new(Mutex::new(None));
        let (victim, slot, old) = (root.join(VICTIM), Arc::clone(&landed), old.clone());
        fault::arm_action(&case, at, move |step| {
            let was_old = fs::read(&victim).ok().as_ref() == Some(&old);
            let bytes = rewrite_in_place(&victim);
            *slot.lock().expect("lock") = Some(Landed {
                bytes,
                into_the_replaced: step == victim && was_old,
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
                let now = fs::read(root.join(VICTIM)).expect("read the victim");
                let expected = match landed.into_the_replaced {
                    true => &new,
                    false => &landed.bytes,
                };
                assert!(
                    now == *expected,
                    "rewritten before step {at} of {steps}: the apply succeeded and the write is gone"
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
        "{steps} steps: {refused} applies refused, {applied} kept the write made after their \
         checks, {raced} replaced the file written to as they replaced it"
    );
}
