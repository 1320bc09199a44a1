//! A package is a function of the trees, options and key: not of thread count, file creation
//! order, tree location or build time.

use std::fs;

use crate::support::*;

#[test]
fn builds_are_byte_identical() {
    let fx = Fixture::release_a();
    let args = |out: &std::path::Path| {
        build_args(&fx.base, &fx.target, "a", &example_key(), out, &COMPONENTS)
    };
    let one = fx.path("threads-1.bsi");
    let two = fx.path("threads-2.bsi");
    ok(&bsi()
        .env("RAYON_NUM_THREADS", "1")
        .args(args(&one))
        .output()
        .expect("run bsi"));
    ok(&bsi()
        .env("RAYON_NUM_THREADS", "2")
        .args(args(&two))
        .output()
        .expect("run bsi"));

    // The same trees elsewhere, every entry created in the opposite order.
    let other = tempfile::tempdir().expect("tempdir");
    let (base, target) = (other.path().join("b"), other.path().join("t"));
    write_tree(&base, &base_model(), true);
    write_tree(&target, &target_a_model(), true);
    assert_eq!(tree_snapshot(&base), tree_snapshot(&fx.base));
    assert_eq!(tree_snapshot(&target), tree_snapshot(&fx.target));
    let three = other.path().join("reordered.bsi");
    ok(&run(build_args(
        &base,
        &target,
        "a",
        &example_key(),
        &three,
        &COMPONENTS,
    )));

    let first = fs::read(&one).expect("read");
    assert_eq!(
        first,
        fs::read(&two).expect("read"),
        "thread count changed the package"
    );
    assert_eq!(
        first,
        fs::read(&three).expect("read"),
        "creation order or location changed the package"
    );

    // And it is not that every build is the same: another letter differs.
    let b = fx.path("letter-b.bsi");
    let other_letter = build(&fx.base, &fx.target, "b", &example_key(), &b, &COMPONENTS);
    assert_ne!(first, other_letter);
}
