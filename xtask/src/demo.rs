//! `cargo xtask demo`: build, inspect, verify, apply, revert the example packages and check that
//! every tree comes out byte for byte (and mtime for mtime) as expected.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::tree::{changed_bytes, compare_trees, copy_tree, count_entries};

const KEY: &str = "keys-example/example.key.pem";
const TRUST: &str = "keys-example/example.pub.pem";
const BASE: &str = "target/testdata/26.3";
const WORK: &str = "target/demo";
const ROOT: &str = "target/demo/root";
/// The engine's state directory inside the root, which is not part of the patched tree.
const STATE: &str = ".bsi";

const COMPONENTS: &[&str] = &[
    "Safari=Applications/Safari.app",
    "WebKit=System/Library/Frameworks/WebKit.framework",
    "JavaScriptCore=System/Library/Frameworks/JavaScriptCore.framework",
    "WebCore=System/Library/PrivateFrameworks/WebCore.framework",
    "libSystem=usr/lib",
    "CoreServices=System/Library/CoreServices",
];

/// Prints a command like a shell line, runs it in the workspace root, and returns its
/// combined output (which is also echoed).
fn run(ws: &Path, program: &str, args: &[&str]) -> Result<String> {
    let shown = Path::new(program)
        .file_name()
        .map_or(program.into(), |n| n.to_string_lossy());
    println!("$ {} {}", shown, args.join(" "));
    let out = Command::new(if program == "bsi" {
        "target/release/bsi"
    } else {
        program
    })
    .args(args)
    .current_dir(ws)
    .output()
    .with_context(|| format!("could not start {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    if !out.status.success() {
        bail!("`{program} {}` failed ({})", args.join(" "), out.status);
    }
    Ok(format!("{stdout}{stderr}"))
}

fn timed(ws: &Path, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    run(ws, "bsi", args)?;
    Ok(t.elapsed().as_secs_f64())
}

fn expect_same(ws: &Path, root: &str, expected: &str) -> Result<()> {
    println!("$ compare {root} {expected} (ignoring {STATE}/)");
    let diffs = compare_trees(&ws.join(root), &ws.join(expected), &[STATE])?;
    if !diffs.is_empty() {
        for d in diffs.iter().take(40) {
            eprintln!("  {d}");
        }
        bail!("{root} differs from {expected} in {} places", diffs.len());
    }
    println!(
        "trees identical: {} entries compared",
        count_entries(&ws.join(expected), &[STATE])?
    );
    Ok(())
}

/// `bsi status`; `expected` is the letter that must be shown ("(a)"), or None for the bare base.
fn status(ws: &Path, expected: Option<&str>) -> Result<()> {
    let out = run(ws, "bsi", &["status", "--root", ROOT])?;
    let shown = ["(a)", "(b)"].into_iter().find(|l| out.contains(l));
    if shown != expected {
        bail!(
            "bsi status shows {} but {} is expected",
            shown.unwrap_or("no letter"),
            expected.unwrap_or("no letter")
        );
    }
    Ok(())
}

#[derive(Debug)]
struct Row {
    letter: &'static str,
    package: u64,
    changed: u64,
    build: f64,
    verify: f64,
    apply: f64,
    revert: f64,
}

fn build(ws: &Path, letter: &'static str, target: &str) -> Result<(String, Row)> {
    let pkg = format!("{WORK}/macOS-26.3-{letter}.bsi");
    let mut args = vec![
        "build",
        "--base",
        BASE,
        "--target",
        target,
        "--product",
        "macOS",
        "--base-version",
        "26.3",
        "--base-build",
        "25D125",
        "--letter",
        letter,
        "--key",
        KEY,
        "--out",
        &pkg,
    ];
    for c in COMPONENTS {
        args.extend(["--component", c]);
    }
    let build = timed(ws, &args)?;
    run(ws, "bsi", &["inspect", &pkg])?;
    let verify = timed(ws, &["verify", &pkg, "--trust", TRUST, "--base-tree", BASE])?;
    let package = fs::metadata(ws.join(&pkg))
        .with_context(|| format!("bsi build did not write {pkg}"))?
        .len();
    let changed = changed_bytes(&ws.join(BASE), &ws.join(target))?;
    let row = Row {
        letter,
        package,
        changed,
        build,
        verify,
        apply: 0.0,
        revert: 0.0,
    };
    Ok((pkg, row))
}

pub fn demo(ws: &Path) -> Result<()> {
    println!("$ cargo xtask testdata");
    crate::testdata::generate(&ws.join("target/testdata"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    run(ws, &cargo, &["build", "--release", "-p", "bsi-cli"])?;
    let work = ws.join(WORK);
    if work.exists() {
        println!("$ rm -rf {WORK}");
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    // (a): build, install on a copy of 26.3, revert
    let (pkg_a, mut a) = build(ws, "a", "target/testdata/26.3a")?;
    println!("$ cp -a {BASE} {ROOT}");
    copy_tree(&ws.join(BASE), &ws.join(ROOT))?;
    status(ws, None)?;
    a.apply = timed(ws, &["apply", &pkg_a, "--root", ROOT, "--trust", TRUST])?;
    status(ws, Some("(a)"))?;
    expect_same(ws, ROOT, "target/testdata/26.3a")?;
    a.revert = timed(ws, &["revert", "--root", ROOT])?;
    status(ws, None)?;
    expect_same(ws, ROOT, BASE)?;

    // (b): cumulative, installed over (a), then reverted to the base
    let (pkg_b, mut b) = build(ws, "b", "target/testdata/26.3b")?;
    run(
        ws,
        "bsi",
        &["apply", &pkg_a, "--root", ROOT, "--trust", TRUST],
    )?;
    status(ws, Some("(a)"))?;
    b.apply = timed(ws, &["apply", &pkg_b, "--root", ROOT, "--trust", TRUST])?;
    status(ws, Some("(b)"))?;
    expect_same(ws, ROOT, "target/testdata/26.3b")?;
    b.revert = timed(ws, &["revert", "--root", ROOT])?;
    status(ws, None)?;
    expect_same(ws, ROOT, BASE)?;

    println!();
    println!(
        "{:<8} {:>12} {:>14} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "letter",
        "package B",
        "changed new B",
        "ratio",
        "build s",
        "verify s",
        "apply s",
        "revert s"
    );
    for r in [&a, &b] {
        println!(
            "{:<8} {:>12} {:>14} {:>7.2}% {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            format!("26.3 ({})", r.letter),
            r.package,
            r.changed,
            100.0 * r.package as f64 / r.changed.max(1) as f64,
            r.build,
            r.verify,
            r.apply,
            r.revert
        );
    }
    println!("demo passed");
    Ok(())
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}
