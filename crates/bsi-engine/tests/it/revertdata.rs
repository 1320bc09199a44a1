//! Revert data: base files kept as they were, reverse deltas where they are smaller than
//! compressed copies, checked on use.

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
    /// The inodes of the root's files before the apply (see [`inodes`]).
    inodes_before: Vec<(String, u64)>,
}

fn applied(base: &Model, target: &Model) -> Applied {
    applied_after(base, target, |_, _| {})
}

/// [`applied`], running `before` on the temporary directory and the root just before the apply.
fn applied_after(base: &Model, target: &Model, before: impl FnOnce(&Path, &Path)) -> Applied {
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
    before(tmp.path(), &root);
    let inodes_before = inodes(&root);
    apply(&pkg, &root, &state, &NoProgress).expect("apply");
    Applied {
        _tmp: tmp,
        base_dir,
        target_dir,
        root,
        state,
        inodes_before,
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

/// The inode of each file in `dir`, by name.
fn inodes(dir: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut inodes: Vec<(String, u64)> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("entry");
            let ino = e.metadata().expect("meta").ino();
            (e.file_name().to_string_lossy().into_owned(), ino)
        })
        .collect();
    inodes.sort();
    inodes
}

fn file(bytes: Vec<u8>) -> Node {
    Node::File {
        bytes,
        mode: 0o644,
        mtime: (1_600_000_000, 0),
    }
}

/// A one-byte edit every 64 bytes: a forward delta that is not a `blocks` one.
fn scattered_edit(bytes: &[u8]) -> Vec<u8> {
    let mut edited = bytes.to_vec();
    for at in (0..edited.len()).step_by(64) {
        edited[at] ^= 0x42;
    }
    edited
}

/// A base file the root holds is kept as it was: the revert data is the very file (its inode)
/// that left the root, nothing is compressed or written for it, and a later letter links the
/// same file into its own revert data.
#[test]
fn base_files_are_kept_as_they_were_and_shared_by_the_next_letter() {
    let old = noise(7, 1 << 20);
    let base: Model = [
        ("a.dylib".to_owned(), file(old.clone())),
        ("gone.bin".to_owned(), file(noise(10, 300_000))),
    ]
    .into();
    let target_a: Model = [("a.dylib".to_owned(), file(scattered_edit(&old)))].into();
    let Applied {
        _tmp,
        base_dir,
        root,
        state,
        inodes_before,
        ..
    } = applied(&base, &target_a);
    // Entries are numbered in path order: a.dylib, then gone.bin; each is the root's file.
    let kept_a = inodes(&state.join("revert"));
    let expected: Vec<(String, u64)> = inodes_before
        .iter()
        .enumerate()
        .map(|(i, (_, ino))| (format!("{i}.orig"), *ino))
        .collect();
    assert_eq!(kept_a, expected);
    // Setuid bits and all, the old files are reachable by the owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(state.join("revert"))
        .expect("revert dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");

    // Letter (b) edits a.dylib again: its revert data is the same base file, linked.
    let mut edited_b = scattered_edit(&old);
    edited_b[5] ^= 0x11;
    let tmp_b = tempfile::tempdir().expect("tempdir");
    let target_b_dir = tmp_b.path().join("b");
    fs::create_dir(&target_b_dir).expect("mkdir");
    materialize(
        &[("a.dylib".to_owned(), file(edited_b))].into(),
        &target_b_dir,
    );
    let pkg_b = package(&base_dir, &target_b_dir, 'b');
    apply(&pkg_b, &root, &state, &NoProgress).expect("apply (b)");
    assert_eq!(inodes(&state.join("revert")), kept_a);

    revert(&root, &state).expect("revert");
    assert_eq!(
        scan(&root, &[]).expect("scan").entries,
        scan(&base_dir, &[]).expect("scan").entries
    );
}

/// A base file the root no longer holds (an installed letter changed it, and its revert data
/// is a reverse delta from that letter's post-image) gets new revert data: a reverse delta from
/// the staged new file or a compressed copy, whichever is smaller.
#[test]
fn a_reverse_delta_or_a_copy_whichever_is_smaller() {
    let scattered = noise(7, 1 << 20);
    let other = noise(10, 300_000);
    let base: Model = [
        ("a.dylib".to_owned(), file(scattered.clone())),
        ("b.bin".to_owned(), file(other.clone())),
    ]
    .into();
    // (a): one byte of each, a `blocks` delta whose reverse is tiny.
    let tiny = |bytes: &[u8]| {
        let mut edited = bytes.to_vec();
        edited[1000] ^= 0x42;
        edited
    };
    let target_a: Model = [
        ("a.dylib".to_owned(), file(tiny(&scattered))),
        ("b.bin".to_owned(), file(tiny(&other))),
    ]
    .into();
    let Applied {
        _tmp,
        base_dir,
        root,
        state,
        ..
    } = applied(&base, &target_a);
    let kept_a = kept(&state);
    assert!(
        kept_a.iter().all(|(n, _)| n.ends_with(".rev")),
        "{kept_a:?}"
    );

    // (b): bsdiff's forward delta wins for a.dylib, and its reverse (blocks) delta of
    // incompressible bytes is smaller than a copy, but not so small that the copy is not made;
    // b.bin is replaced by unrelated bytes, whose reverse delta can only hold the old bytes,
    // as the copy does, with its own framing around them, so the copy is smaller.
    let tmp_b = tempfile::tempdir().expect("tempdir");
    let target_b_dir = tmp_b.path().join("b");
    fs::create_dir(&target_b_dir).expect("mkdir");
    let target_b: Model = [
        ("a.dylib".to_owned(), file(scattered_edit(&scattered))),
        ("b.bin".to_owned(), file(noise(13, 300_000))),
    ]
    .into();
    materialize(&target_b, &target_b_dir);
    let pkg_b = package(&base_dir, &target_b_dir, 'b');
    apply(&pkg_b, &root, &state, &NoProgress).expect("apply (b)");
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
        ..
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

/// A base file that another name in the tree shares (a hard link) is not kept as it is: a write
/// through that name would change the revert data. A copy or a reverse delta is made instead,
/// and a later write through the other name leaves the revert exact.
#[test]
fn a_base_file_with_another_name_gets_its_own_revert_data() {
    let old = noise(7, 1 << 20);
    let base: Model = [("a.dylib".to_owned(), file(old.clone()))].into();
    let target: Model = [("a.dylib".to_owned(), file(scattered_edit(&old)))].into();
    let Applied {
        _tmp,
        base_dir,
        root,
        state,
        ..
    } = applied_after(&base, &target, |tmp, root| {
        fs::hard_link(root.join("a.dylib"), tmp.join("alias")).expect("link");
    });
    let kept = kept(&state);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(!kept[0].0.ends_with(".orig"), "{kept:?}");
    // The other name still holds the old file; writing through it touches no revert data.
    fs::write(_tmp.path().join("alias"), b"rewritten").expect("write");
    revert(&root, &state).expect("revert");
    assert_eq!(
        scan(&root, &[]).expect("scan").entries,
        scan(&base_dir, &[]).expect("scan").entries
    );
}

/// The installed record says which revert data it may hold: format 1 (copies and reverse
/// deltas, from an earlier bsi, which wrote it as pretty JSON) still reads, and a format this
/// bsi does not know is refused by name rather than misread.
#[test]
fn installed_records_of_earlier_formats_read_and_later_ones_are_refused() {
    let old = noise(3, 200_000);
    let base: Model = [("a.dylib".to_owned(), file(old.clone()))].into();
    let target: Model = [("a.dylib".to_owned(), file(scattered_edit(&old)))].into();
    let Applied {
        _tmp,
        base_dir,
        root,
        state,
        ..
    } = applied(&base, &target);
    let record = state.join("installed.json");
    let written = fs::read_to_string(&record).expect("record");
    assert!(written.contains("\"format\":2"), "{written}");
    fs::write(&record, written.replace("\"format\":2", "\"format\":3")).expect("write");
    let err = revert(&root, &state).expect_err("a later format is refused");
    assert!(err.to_string().contains("state format 3"), "{err}");
    let format_1 = written.replace("\"format\":2", "\"format\":1");
    let value: serde_json::Value = serde_json::from_str(&format_1).expect("JSON");
    let pretty = serde_json::to_string_pretty(&value).expect("serialised");
    assert!(pretty.contains("\"format\": 1"), "{pretty}");
    fs::write(&record, pretty).expect("write");
    revert(&root, &state).expect("revert from a format 1 record");
    assert_eq!(
        scan(&root, &[]).expect("scan").entries,
        scan(&base_dir, &[]).expect("scan").entries
    );
}
