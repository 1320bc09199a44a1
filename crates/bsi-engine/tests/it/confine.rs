//! Confinement: a symlink planted in the root while an apply runs, at any level of a patched
//! path and before any of the apply's steps, never lets a write or a permission or time change
//! land outside the root.

use std::path::Path;

use bsi_engine::fault;
use bsi_engine::{apply, recover, scan, NoProgress};

use crate::fixture::{materialize, pattern, Model, Node};
use crate::roundtrip::package;

fn dir(t: i64) -> Node {
    Node::Dir {
        mode: 0o755,
        mtime: (t, 0),
    }
}

fn file(seed: u64, len: usize, mode: u32, t: i64) -> Node {
    Node::File {
        bytes: pattern(seed, len),
        mode,
        mtime: (t, 0),
    }
}

fn trees() -> (Model, Model) {
    let mut base = Model::new();
    base.insert("A".into(), dir(1_600_000_000));
    base.insert("A/B".into(), dir(1_600_000_000));
    base.insert("A/B/C".into(), dir(1_600_000_000));
    base.insert(
        "A/B/C/lib.dylib".into(),
        file(1, 5000, 0o755, 1_600_000_000),
    );
    base.insert("A/B/C/mode.txt".into(), file(2, 100, 0o644, 1_600_000_000));
    base.insert("A/B/old.txt".into(), file(3, 300, 0o644, 1_600_000_000));
    let mut target = base.clone();
    target.insert(
        "A/B/C/lib.dylib".into(),
        file(4, 5100, 0o755, 1_650_000_000),
    );
    target.insert(
        "A/B/C/mode.txt".into(),
        Node::File {
            bytes: pattern(2, 100),
            mode: 0o600,
            mtime: (1_650_000_000, 0),
        },
    );
    target.insert("A/B/C/new.txt".into(), file(5, 200, 0o644, 1_650_000_000));
    target.remove("A/B/old.txt");
    target.insert("A/D".into(), dir(1_650_000_000));
    (base, target)
}

pub fn materialized(parent: &Path, name: &str, model: &Model) -> std::path::PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    materialize(model, &dir);
    dir
}

/// `model` restricted to the subtree at `level`, re-rooted there.
fn subtree(model: &Model, level: &str) -> Model {
    let prefix = format!("{level}/");
    model
        .iter()
        .filter_map(|(p, n)| {
            p.strip_prefix(&prefix)
                .map(|rest| (rest.to_owned(), n.clone()))
        })
        .collect()
}

#[test]
fn symlinks_planted_at_every_level_and_step_never_redirect_a_write() {
    let (base, target) = trees();
    let trees_dir = tempfile::tempdir().expect("tempdir");
    let pkg = package(
        &materialized(trees_dir.path(), "base", &base),
        &materialized(trees_dir.path(), "target", &target),
        'a',
    );

    // Steps of a clean apply.
    let probe = tempfile::tempdir().expect("tempdir");
    let root = materialized(probe.path(), "root", &base);
    fault::arm(probe.path(), usize::MAX, fault::Fault::Crash);
    apply(&pkg, &root, &probe.path().join("state"), &NoProgress).expect("clean apply");
    let steps = fault::disarm(probe.path());

    let mut runs = 0;
    for level in ["A", "A/B", "A/B/C"] {
        for at in 1..=steps {
            let tmp = tempfile::tempdir().expect("tempdir");
            let case = tmp.path().join("case");
            let root = materialized(&case, "root", &base);
            // The symlink's target is scanned with the directory that holds it, so that a change
            // to the target itself shows too.
            let outside = tmp.path().join("outside");
            materialized(&outside, "X", &subtree(&base, level));
            let before = scan(&outside, &[]).expect("scan outside");

            let (planted, moved) = (root.join(level), case.join("moved"));
            let link_to = outside.join("X");
            fault::arm_action(&case, at, move |_| {
                std::fs::rename(&planted, &moved).expect("move the directory away");
                std::os::unix::fs::symlink(&link_to, &planted).expect("plant the symlink");
            });
            let _ = apply(&pkg, &root, &case.join("state"), &NoProgress);
            fault::disarm(&case);
            let _ = recover(&root, &case.join("state"), false);

            let after = scan(&outside, &[]).expect("scan outside");
            assert_eq!(
                before.entries, after.entries,
                "symlink at {level} planted before step {at} of {steps}: something outside the root changed"
            );
            runs += 1;
        }
    }
    println!("{runs} runs: symlinks planted at 3 levels before each of {steps} steps");
}
