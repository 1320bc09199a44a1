//! A program whose old version has nothing in common with it is packed by zstd-prefix with its
//! code converted, `bsi inspect` says whose code, and the package applies and reverts exactly.

use crate::support::*;

const LIBRARY: &str = "usr/lib/libexample.dylib";

/// A universal Mach-O program of an x86-64 slice and an arm64 one, their code calls to a few
/// functions (bsi-delta's test data).
fn universal_program() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bsi-delta/tests/data/macho-2.new");
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn a_new_universal_program_is_packed_with_its_code_converted() {
    let new = universal_program();
    let mut base = base_model();
    base.insert("usr/lib".into(), dir(0o755, T0));
    base.insert(LIBRARY.into(), file(noise(11, new.len()), 0o755, T0));
    // The rest of the tree changes as release 26.3 (a) does.
    let mut target = target_a_model();
    target.insert("usr/lib".into(), dir(0o755, T0));
    target.insert(LIBRARY.into(), file(new, 0o755, T1));
    let fx = Fixture::new(&base, &target);

    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let report: serde_json::Value =
        serde_json::from_str(&ok(&run(["inspect", p(&pkg), "--json"]))).expect("inspect JSON");
    let entries: Vec<&serde_json::Value> = ["added", "changed"]
        .iter()
        .flat_map(|key| report["components"][0][key].as_array().expect("entries"))
        .collect();
    let entry = entries
        .iter()
        .find(|e| e["path"] == LIBRARY)
        .unwrap_or_else(|| panic!("no {LIBRARY} in {report}"));
    assert_eq!(entry["encoder"], "zstd-prefix", "{entry}");
    assert_eq!(entry["code_converted"], "x86-64 and arm64", "{entry}");
    // Entries with other payloads say nothing of code.
    let others: Vec<_> = entries
        .iter()
        .filter(|e| e["path"] != LIBRARY && e["payload_bytes"].as_u64() > Some(0))
        .collect();
    assert!(others.len() >= 3, "{report}");
    assert!(others.iter().all(|e| e["code_converted"].is_null()));
    let text = ok(&run(["inspect", p(&pkg)]));
    assert!(
        text.contains("(zstd-prefix, x86-64 and arm64 code converted)"),
        "inspect lacks the conversion:\n{text}"
    );

    applies_and_reverts_exactly(&fx, &base, &pkg);
}
