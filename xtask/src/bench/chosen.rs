//! What each encoder contributed to bsi's package of a pair: the files it was chosen for and
//! the payload bytes it took, read from `bsi inspect --json` of the package the bench built.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::{os, thousands, Runner, BSI_COPY};

/// The parts of `bsi inspect --json` read here (its other fields are ignored).
#[derive(Deserialize)]
struct Inspected {
    package_bytes: u64,
    payload_bytes: u64,
    components: Vec<Component>,
}

#[derive(Deserialize)]
struct Component {
    added: Vec<Entry>,
    changed: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    encoder: Option<String>,
    new_size: Option<u64>,
    payload_bytes: u64,
    code_converted: Option<String>,
    source: Option<String>,
}

/// The files one encoder was chosen for.
#[derive(Debug, Default)]
pub(super) struct Use {
    pub files: u64,
    /// Of them, encoded against an old file at another path (a rename or a copy).
    pub elsewhere: u64,
    /// Of them, with their code converted before encoding.
    pub converted: u64,
    pub new_bytes: u64,
    pub payload: u64,
}

/// A package's payload bytes by encoder, and what the rest of it took.
#[derive(Debug)]
pub(super) struct Chosen {
    pub by_encoder: BTreeMap<String, Use>,
    pub package: u64,
    pub payloads: u64,
}

/// Reads the package at `pkg` with `bsi inspect --json`.
pub(super) fn of_package(r: &Runner, pkg: &Path) -> Result<Chosen> {
    r.run(BSI_COPY, &os(&[&"inspect", &"--json", &pkg]))?;
    let json =
        std::fs::read_to_string(r.stdout()).context("reading the output of bsi inspect --json")?;
    parse(&json).with_context(|| format!("bsi inspect --json {}", pkg.display()))
}

fn parse(json: &str) -> Result<Chosen> {
    let inspected: Inspected = serde_json::from_str(json).context("unexpected output")?;
    let mut by_encoder = BTreeMap::<String, Use>::new();
    let entries = inspected
        .components
        .iter()
        .flat_map(|c| c.added.iter().chain(&c.changed));
    for e in entries {
        let Some(encoder) = &e.encoder else { continue };
        let u = by_encoder.entry(encoder.clone()).or_default();
        u.files += 1;
        u.elsewhere += u64::from(e.source.is_some());
        u.converted += u64::from(e.code_converted.is_some());
        u.new_bytes += e.new_size.unwrap_or(0);
        u.payload += e.payload_bytes;
    }
    let payloads: u64 = by_encoder.values().map(|u| u.payload).sum();
    anyhow::ensure!(
        payloads == inspected.payload_bytes && payloads <= inspected.package_bytes,
        "its entries' payloads add up to {payloads} B, not its {} B of payloads in {} B",
        inspected.payload_bytes,
        inspected.package_bytes
    );
    Ok(Chosen {
        by_encoder,
        package: inspected.package_bytes,
        payloads,
    })
}

/// One table for every pair: a row per encoder chosen, and one for the rest of the package.
pub(super) fn table<'a>(pairs: impl Iterator<Item = (&'a str, &'a Chosen)>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| pair | encoder | files | from another path | code converted | new bytes | package B | % of package |"
    );
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (pair, c) in pairs {
        let share = |bytes: u64| 100.0 * bytes as f64 / c.package.max(1) as f64;
        for (encoder, u) in &c.by_encoder {
            let _ = writeln!(
                s,
                "| {pair} | {encoder} | {} | {} | {} | {} | {} | {:.1}% |",
                u.files,
                u.elsewhere,
                u.converted,
                thousands(u.new_bytes),
                thousands(u.payload),
                share(u.payload)
            );
        }
        let rest = c.package - c.payloads;
        let _ = writeln!(
            s,
            "| {pair} | manifest, signature, framing | | | | | {} | {:.1}% |",
            thousands(rest),
            share(rest)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as `bsi inspect --json` writes it.
    fn entry(
        encoder: Option<&str>,
        new: u64,
        payload: u64,
        converted: bool,
        source: bool,
    ) -> String {
        let text = |v: Option<&str>| v.map_or("null".to_string(), |v| format!("\"{v}\""));
        format!(
            r#"{{"path": "p", "op": "delta", "old_kind": "file", "new_kind": "file",
                "old_size": 1, "new_size": {new}, "encoder": {}, "payload_bytes": {payload},
                "code_converted": {}, "source": {}}}"#,
            text(encoder),
            text(converted.then_some("arm64")),
            text(source.then_some("old/name")),
        )
    }

    fn inspected(package: u64, payloads: u64, added: &[String], changed: &[String]) -> String {
        format!(
            r#"{{"product": "bench", "package_bytes": {package}, "payload_bytes": {payloads},
                "entries": 9, "components": [{{"name": "bench", "path": "",
                "added": [{}], "deleted": [], "changed": [{}]}}]}}"#,
            added.join(","),
            changed.join(",")
        )
    }

    #[test]
    fn payloads_are_summed_by_encoder() {
        let json = inspected(
            1_000,
            700,
            &[entry(Some("zstd"), 50, 30, false, false)],
            &[
                entry(Some("bsdiff"), 400, 200, false, false),
                entry(Some("bsdiff"), 600, 300, false, true),
                entry(Some("zstd-prefix"), 900, 170, true, true),
                entry(None, 80, 0, false, false),
            ],
        );
        let c = parse(&json).expect("parsed");
        assert_eq!((c.package, c.payloads), (1_000, 700));
        let names: Vec<&str> = c.by_encoder.keys().map(String::as_str).collect();
        assert_eq!(names, ["bsdiff", "zstd", "zstd-prefix"]);
        let bsdiff = &c.by_encoder["bsdiff"];
        assert_eq!(
            (
                bsdiff.files,
                bsdiff.elsewhere,
                bsdiff.converted,
                bsdiff.new_bytes,
                bsdiff.payload
            ),
            (2, 1, 0, 1_000, 500)
        );
        let prefix = &c.by_encoder["zstd-prefix"];
        assert_eq!((prefix.elsewhere, prefix.converted), (1, 1));
        let t = table([("pair", &c)].into_iter());
        assert!(
            t.contains("| pair | bsdiff | 2 | 1 | 0 | 1,000 | 500 | 50.0% |"),
            "{t}"
        );
        assert!(t.contains("| pair | manifest, signature, framing | | | | | 300 | 30.0% |"));
    }

    #[test]
    fn payloads_that_do_not_add_up_are_refused() {
        let json = inspected(
            1_000,
            600,
            &[],
            &[entry(Some("bsdiff"), 400, 200, false, false)],
        );
        let err = parse(&json).expect_err("refused").to_string();
        assert!(err.contains("add up to 200 B, not its 600 B"), "{err}");
        assert!(parse("{}").is_err());
    }
}
