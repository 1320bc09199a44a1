//! A gzip-compressed changelog that grows by a few entries costs about those entries: the
//! package carries a delta of the decompressed contents, and apply compresses the new content
//! again into exactly the bytes `gzip -9n` wrote.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::*;

const CHANGELOG: &str = "usr/share/doc/changelog.gz";

/// What Debian ships: the text compressed by the real `gzip -9n`.
fn gzip_9n(text: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip runs (.ci/run installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().expect("writer").expect("write to gzip");
    assert!(out.status.success());
    out.stdout
}

fn changelog(entries: u32) -> Vec<u8> {
    (1..=entries)
        .rev()
        .flat_map(|i| {
            format!(
                "webkit (2.50.{i}) stable-security; urgency=high\n\n  * Fix CVE-2026-{:05} \
                 (use after free in {}).\n\n -- Security Team <security@example.org>  {} Nov \
                 2026\n\n",
                i * 7919 % 100_000,
                ["layout", "JIT", "WebRTC", "parser"][(i % 4) as usize],
                i % 28 + 1
            )
            .into_bytes()
        })
        .collect()
}

#[test]
fn a_grown_changelog_gz_costs_its_new_entries_and_applies_exactly() {
    let mut base = base_model();
    base.insert("usr/share/doc".into(), dir(0o755, T0));
    base.insert(CHANGELOG.into(), file(gzip_9n(&changelog(3000)), 0o644, T0));
    let mut target = base.clone();
    let new_gz = gzip_9n(&changelog(3003));
    target.insert(CHANGELOG.into(), file(new_gz.clone(), 0o644, T1));
    let fx = Fixture::new(&base, &target);

    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let report: serde_json::Value =
        serde_json::from_str(&ok(&run(["inspect", p(&pkg), "--json"]))).expect("inspect JSON");
    let entry = report["components"][0]["changed"]
        .as_array()
        .expect("changed entries")
        .iter()
        .find(|e| e["path"] == CHANGELOG)
        .unwrap_or_else(|| panic!("no {CHANGELOG} in {report}"));
    assert_eq!(entry["encoder"], "gzip", "{entry}");
    let payload = entry["payload_bytes"].as_u64().expect("payload bytes");
    assert!(
        payload < new_gz.len() as u64 / 50,
        "{payload} bytes of payload for a {}-byte file",
        new_gz.len()
    );

    applies_and_reverts_exactly(&fx, &base, &pkg);
}
