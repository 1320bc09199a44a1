//! Revert data: reverse deltas where they are smaller than compressed copies, checked on use.

use std::fs;
use std::path::{Path, PathBuf};

use bsi_engine::{apply, revert, scan, NoProgress};

use crate::fixture::{materialize, noise, Model, Node};
use crate::roundtrip::package;

/// A package from `base` to `target` applied to a copy of `base`, in a temporary directory.
struct Applied {
    _tmp: tempfile::TempDir,
    base_dir: PathBuf,
    target_dir: PathBuf,
    root: PathBuf,
    state: PathBuf,
}

fn applied(base: &Model, target: &Model) -> Applied {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = |name: &str, model: &Model| {
        let d = tmp.path().join(name);
        fs::create_dir(&d).expect("mkdir");
        materialize(model, &d);
        d
    };
    let (base_dir, target_dir) = (dir("base", base), dir("target", target));
    let pkg = package(&base_dir, &target_dir, 'a');
    let root = dir("root", base);
    let state = tmp.path().join("state");
    apply(&pkg, &root, &state, &NoProgress).expect("apply");
    Applied {
        _tmp: tmp,
        base_dir,
        target_dir,
        root,
        state,
    }
}

/// The revert data kept in `state`: file name and length, by name.
fn kept(state: &Path) -> Vec<(String, u64)> {
    let mut kept: Vec<(String, u64)> = fs::read_dir(state.join("revert"))
        .expect("revert dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().expect("meta").len(),
            )
        })
        .collect();
    kept.sort();
    kept
}

/// Files whose forward delta is not a `blocks` one: the reverse delta is encoded from the
/// staged new file while a compressed copy is made beside it, and the smaller one is kept.
#[test]
fn a_reverse_delta_or_a_copy_whichever_is_smaller() {
    // A one-byte edit every 64 bytes: bsdiff's forward delta wins, and the reverse (blocks)
    // delta of incompressible bytes is smaller than a copy, but not so small that the copy
    // is not made.
    let scattered = noise(7, 1 << 20);
    let mut edited = scattered.clone();
    for at in (0..edited.len()).step_by(64) {
        edited[at] ^= 0x42;
    }
    // A file replaced by unrelated bytes: the reverse delta can only hold the old bytes, as
    // the copy does, with its own framing around them, so the copy is smaller.
    let node = |bytes: Vec<u8>| Node::File {
        bytes,
        mode: 0o644,
        mtime: (1_600_000_000, 0),
    };
    let base: Model = [
        ("a.dylib".to_owned(), node(scattered)),
        ("b.bin".to_owned(), node(noise(10, 300_000))),
    ]
    .into();
    let target: Model = [
        ("a.dylib".to_owned(), node(edited)),
        ("b.bin".to_owned(), node(noise(13, 300_000))),
    ]
    .into();
    let Applied {
        _tmp,
        base_dir,
        root,
        state,
        ..
    } = applied(&base, &target);
    let kept = kept(&state);
    assert_eq!(kept.len(), 2, "{kept:?}");
    // Entries are numbered in path order: a.dylib, then b.bin.
    assert!(kept[0].0.ends_with(".rev"), "{kept:?}");
    assert!(
        ((1 << 20) / 64..(1 << 20) / 2).contains(&kept[0].1),
        "{kept:?}"
    );
    assert!(kept[1].0.ends_with(".zst"), "{kept:?}");

    revert(&root, &state).expect("revert");
    assert_eq!(
        scan(&root, &[]).expect("scan").entries,
        scan(&base_dir, &[]).expect("scan").entries
    );
}

#[test]
fn a_near_identical_file_keeps_a_tiny_reverse_delta_and_reverts_exactly() {
    let big = noise(5, 2 << 20); // incompressible: a copy would cost the whole file
    let mut edited = big.clone();
    for at in [10, 700_000, 2_000_000] {
        edited[at] ^= 0x42;
    }
    let node = |bytes: Vec<u8>, t| Node::File {
        bytes,
        mode: 0o755,
        mtime: (t, 0),
    };
    let base: Model = [("lib.dylib".to_owned(), node(big, 1_600_000_000))].into();
    let target: Model = [("lib.dylib".to_owned(), node(edited, 1_650_000_000))].into();
    let Applied {
        _tmp,
        base_dir,
        target_dir,
        root,
        state,
    } = applied(&base, &target);
    let kept = kept(&state);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].0.ends_with(".rev"), "{kept:?}");
    assert!(
        kept[0].1 < 1000,
        "reverse delta of 3 changed bytes: {kept:?}"
    );

    // A damaged reverse delta is refused before anything is written.
    let rev = state.join("revert").join(&kept[0].0);
    let good = fs::read(&rev).expect("read");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    fs::write(&rev, &bad).expect("damage");
    let err = revert(&root, &state).expect_err("damaged revert data");
    assert!(err.to_string().contains("is damaged"), "{err}");
    assert_eq!(
        scan(&root, &[]).expect("scan").entries,
        scan(&target_dir, &[]).expect("scan").entries
    );
    fs::write(&rev, &good).expect("repair");

    revert(&root, &state).expect("revert");
    assert_eq!(
        scan(&root, &[]).expect("scan").entries,
        scan(&base_dir, &[]).expect("scan").entries
    );
}
