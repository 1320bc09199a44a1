//! apply(build(a, b)) == b and revert == a, over random trees.

use std::path::{Path, PathBuf};

use bsi_engine::{
    apply, build, build_to_file, revert, scan, verify_against_tree, BuildOptions, NoProgress,
    VerifiedPackage,
};
use bsi_format::PkgPath;
use bsi_sign::SecretKey;
use proptest::prelude::*;

use crate::fixture::{apply_edits, edit_strategy, materialize, model_strategy, Model};

pub fn key() -> SecretKey {
    SecretKey::from_seed([42; 32])
}

fn tree_dir(parent: &Path, name: &str, model: &Model) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).expect("mkdir");
    materialize(model, &dir);
    dir
}

/// The base, (a) and (b) trees written under `parent`, a root holding the base, and the path of
/// a state directory for it (not made).
fn letters(
    parent: &Path,
    base: &Model,
    a: &Model,
    b: &Model,
) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        tree_dir(parent, "base", base),
        tree_dir(parent, "a", a),
        tree_dir(parent, "b", b),
        tree_dir(parent, "root", base),
        parent.join("state"),
    )
}

pub fn package(base: &Path, target: &Path, letter: char) -> VerifiedPackage {
    VerifiedPackage::from_bytes(
        package_bytes(base, target, letter),
        &key().public(),
        Path::new("test.bsi"),
    )
    .expect("verifies")
}

/// [`package`], its entries past the first `hold` kept aside in a file in `dir`, as those of a
/// package of many entries are (`None`: all held).
pub fn package_holding(
    base: &Path,
    target: &Path,
    letter: char,
    hold: Option<usize>,
    dir: &Path,
) -> VerifiedPackage {
    let Some(hold) = hold else {
        return package(base, target, letter);
    };
    VerifiedPackage::from_bytes_keeping_aside(
        package_bytes(base, target, letter),
        &key().public(),
        Path::new("test.bsi"),
        hold,
        dir,
    )
    .expect("verifies")
}

/// The signed package bytes of `base` -> `target` (macOS 26.3, `letter`).
pub fn package_bytes(base: &Path, target: &Path, letter: char) -> Vec<u8> {
    let key = key();
    let opts = BuildOptions {
        base: base.to_owned(),
        target: target.to_owned(),
        product: "macOS".to_owned(),
        base_version: "26.3".parse().expect("version"),
        base_build: Some("25D125".to_owned()),
        letter: letter.to_string().parse().expect("letter"),
        components: Vec::new(),
        key: &key,
    };
    let bytes = build(&opts, &NoProgress).expect("build").bytes;
    // Built to a file (payloads spilled beside it), the package is the same, and nothing else
    // is left in its directory.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("p.bsi");
    let (manifest, len) = build_to_file(&opts, &out, &NoProgress).expect("build to a file");
    assert_eq!(std::fs::read(&out).expect("read package"), bytes);
    assert_eq!(len, bytes.len() as u64);
    assert_eq!(manifest.letter.to_string(), letter.to_string());
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["p.bsi"]);
    bytes
}

fn same_tree(a: &Path, b: &Path) -> Result<(), TestCaseError> {
    let (ta, tb) = (scan(a, &[]).expect("scan a"), scan(b, &[]).expect("scan b"));
    for (path, image) in &ta.entries {
        prop_assert_eq!(Some(image), tb.get(path), "{} differs", path);
    }
    prop_assert_eq!(ta.entries.len(), tb.entries.len(), "entry counts differ");
    Ok(())
}

/// A letter that leaves the paths only the installed letter changed to go back to their base,
/// between and inside its own: a directory and file (a) added, a file (a) changed, a file and
/// a directory (a) removed, among files and a directory (b) adds or changes, one of them in the
/// directory (a) removed. The steps of the switch are the two lists merged in path order; out
/// of order, that file would be placed before its directory is made again.
#[test]
fn a_switch_sends_the_installed_letters_own_paths_back_between_its_own() {
    use crate::fixture::{pattern, put, Node};
    let file = |seed: u64| Node::File {
        bytes: pattern(seed, 3000),
        mode: 0o644,
        mtime: (1_650_000_000, 0),
    };
    let dir = Node::Dir {
        mode: 0o755,
        mtime: (1_650_000_000, 0),
    };
    let mut base = Model::new();
    for (path, seed) in [("a", 1), ("c", 2), ("e/f", 3), ("g", 4), ("k/old", 10)] {
        put(&mut base, path, file(seed));
    }
    let mut target_a = base.clone();
    put(&mut target_a, "b", dir.clone());
    put(&mut target_a, "b/x", file(5));
    put(&mut target_a, "e/f", file(6));
    target_a.remove("g");
    target_a.remove("k/old");
    target_a.remove("k");
    let mut target_b = base.clone();
    put(&mut target_b, "a", file(7));
    put(&mut target_b, "d", dir);
    put(&mut target_b, "d/y", file(8));
    put(&mut target_b, "e/z", file(9));
    // Into the directory (a) removed, which the switch puts back first.
    put(&mut target_b, "k/new", file(11));

    let tmp = tempfile::tempdir().expect("tempdir");
    let (base_dir, a_dir, b_dir, root, state) = letters(tmp.path(), &base, &target_a, &target_b);
    apply(&package(&base_dir, &a_dir, 'a'), &root, &state, &NoProgress).expect("apply a");
    holds(&root, &a_dir);
    apply(&package(&base_dir, &b_dir, 'b'), &root, &state, &NoProgress).expect("switch to b");
    holds(&root, &b_dir);
    revert(&root, &state).expect("revert b");
    holds(&root, &base_dir);
}

/// The root holds exactly the tree at `dir`, times and modes included.
fn holds(root: &Path, dir: &Path) {
    assert_eq!(
        scan(root, &[]).expect("scan the root"),
        scan(dir, &[]).expect("scan the tree"),
        "{}",
        dir.display()
    );
}

/// A switch walks the installed record beside its package's entries, and looks up out of
/// path order what the installed letter did: inside a directory the new letter removes, (a)
/// added a file (the directory holds nothing of the base but what (b) removes); the source of
/// a copy (b) adds, which lies after it, is a file (a) changed (its base bytes are in the
/// revert data, not on disk); and the directory of a file (b) changes, which (b) leaves as it
/// is, (a) removed (it is a directory in the base, though not on disk), 5,000 paths of (a)
/// lying between them, so that the record is walked past the directory before the file.
#[test]
fn a_switch_finds_what_the_installed_letter_did_out_of_path_order() {
    use crate::fixture::{pattern, put, Node};
    let file = |bytes: Vec<u8>| Node::File {
        bytes,
        mode: 0o644,
        mtime: (1_650_000_000, 0),
    };
    let library = pattern(21, 300_000);
    let mut changed = library.clone();
    changed[5000..5008].copy_from_slice(b"patched!");
    let mut base = Model::new();
    put(&mut base, "x/old", file(pattern(22, 2000)));
    put(&mut base, "z/lib.so", file(library.clone()));
    put(&mut base, "m/keep", file(pattern(23, 2000)));
    put(&mut base, "d/f", file(pattern(25, 2000)));
    let mut target_a = base.clone();
    put(&mut target_a, "x/new", file(pattern(24, 2000)));
    put(&mut target_a, "z/lib.so", file(changed));
    target_a.remove("d/f");
    target_a.remove("d");
    // Between `d` and `d/f`: `.` comes before `/`.
    for i in 0..5000 {
        put(
            &mut target_a,
            &format!("d.x/{i:04}"),
            file(vec![i as u8; 3]),
        );
    }
    let mut target_b = base.clone();
    target_b.remove("x/old");
    target_b.remove("x");
    put(&mut target_b, "a/lib.so", file(library));
    put(&mut target_b, "d/f", file(pattern(26, 2000)));

    let tmp = tempfile::tempdir().expect("tempdir");
    let (base_dir, a_dir, b_dir, root, state) = letters(tmp.path(), &base, &target_a, &target_b);
    // (a)'s 5,006 entries are many: past 4,096 they are kept aside; (b)'s all but one.
    let pkg_a = package(&base_dir, &a_dir, 'a');
    let pkg_b = package_holding(&base_dir, &b_dir, 'b', Some(1), tmp.path());
    assert!(pkg_a.manifest.entries.kept_aside() && pkg_b.manifest.entries.kept_aside());
    let copy_path = PkgPath::new("a/lib.so").expect("a path");
    let (_, copy) = pkg_b
        .manifest
        .entries
        .find(&copy_path)
        .expect("entries")
        .expect("the copy's entry");
    assert!(
        matches!(&copy.op, bsi_format::Operation::Delta { source: Some(src), .. } if src.path.as_str() == "z/lib.so"),
        "{:?}",
        copy.op
    );
    apply(&pkg_a, &root, &state, &NoProgress).expect("apply a");
    apply(&pkg_b, &root, &state, &NoProgress).expect("switch to b");
    holds(&root, &b_dir);
    revert(&root, &state).expect("revert b");
    holds(&root, &base_dir);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn apply_then_revert_restores_exactly(
        base in model_strategy(),
        edits_a in proptest::collection::vec(edit_strategy(), 1..10),
        edits_b in proptest::collection::vec(edit_strategy(), 1..10),
        hold in proptest::option::of(0usize..4),
    ) {
        let target_a = apply_edits(&base, &edits_a);
        let target_b = apply_edits(&target_a, &edits_b);
        let tmp = tempfile::tempdir().expect("tempdir");
        let (base_dir, a_dir, b_dir, root, state) = letters(tmp.path(), &base, &target_a, &target_b);

        // Their entries held, or some kept aside as a large package's are.
        let pkg_a = package_holding(&base_dir, &a_dir, 'a', hold, tmp.path());
        let pkg_b = package_holding(&base_dir, &b_dir, 'b', hold, tmp.path());
        verify_against_tree(&pkg_a, &base_dir).expect("a verifies against its base");

        apply(&pkg_a, &root, &state, &NoProgress).expect("apply a");
        same_tree(&root, &a_dir)?;
        apply(&pkg_b, &root, &state, &NoProgress).expect("switch to b");
        same_tree(&root, &b_dir)?;
        revert(&root, &state).expect("revert b");
        same_tree(&root, &base_dir)?;
        prop_assert!(std::fs::read_dir(&state).expect("state dir").next().is_none(), "state dir not empty");

        // The default state directory inside the root is not part of the tree.
        apply(&pkg_a, &root, &bsi_engine::default_state_dir(&root), &NoProgress).expect("apply a in place");
        same_tree(&root, &a_dir)?;
        revert(&root, &bsi_engine::default_state_dir(&root)).expect("revert a in place");
        same_tree(&root, &base_dir)?;
    }
}
