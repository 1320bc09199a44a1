//! `cargo xtask killbench [--trials N]`: `kill -9` at random moments during `bsi apply` and
//! `bsi revert` of the testdata release (a), then `bsi recover`; every trial must end with the
//! root byte-identical to 26.3 or to 26.3 (a), and `bsi status` must say which.
//!
//! The test suite runs 24 such trials on a smaller tree; this runs as many as asked on the
//! synthetic release with the release binary, and prints how the trials ended.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::rng::SplitMix64;
use crate::tree::{compare_trees, copy_tree};

const BSI: &str = "target/release/bsi";
const WORK: &str = "target/killbench";
const STATE: &str = ".bsi";

/// Run the release bsi binary in the workspace: its stdout and stderr, or its stderr as the
/// error when it fails.
pub fn bsi<S: AsRef<OsStr>>(ws: &Path, args: &[S]) -> Result<String> {
    let out = Command::new(ws.join(BSI))
        .args(args)
        .current_dir(ws)
        .output()
        .context("could not start bsi")?;
    if !out.status.success() {
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        bail!(
            "`bsi {}` failed: {}",
            shown.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Run bsi and SIGKILL it after `delay` if it is still running; true when it was killed.
fn run_and_kill<S: AsRef<OsStr>>(ws: &Path, args: &[S], delay: Duration) -> Result<bool> {
    let mut child = Command::new(ws.join(BSI))
        .args(args)
        .current_dir(ws)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("could not start bsi")?;
    let deadline = Instant::now() + delay;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(true);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn same(root: &Path, expected: &Path) -> Result<bool> {
    Ok(compare_trees(root, expected, &[STATE])?.is_empty())
}

pub fn killbench(ws: &Path, args: &[&str]) -> Result<()> {
    let trials: u64 = match args {
        [] => 200,
        ["--trials", n] => n.parse().context("--trials needs a number")?,
        _ => bail!("usage: cargo xtask killbench [--trials N]"),
    };
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "-p", "bsi-cli"])
        .current_dir(ws)
        .status()?;
    if !status.success() {
        bail!("cargo build --release -p bsi-cli failed");
    }
    let data = ws.join("target/testdata");
    crate::testdata::generate(&data)?;
    let (base, target) = (data.join("26.3"), data.join("26.3a"));
    let work = ws.join(WORK);
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    let pkg = work.join("a.bsi");
    let key = ws.join("keys-example/example.key.pem");
    let trust = ws.join("keys-example/example.pub.pem");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    bsi(
        ws,
        &[
            "build",
            "--base",
            &s(&base),
            "--target",
            &s(&target),
            "--product",
            "macOS",
            "--base-version",
            "26.3",
            "--letter",
            "a",
            "--key",
            &s(&key),
            "--out",
            &s(&pkg),
            "--quiet",
        ],
    )?;
    let root = work.join("root");
    let apply_args = |root: &Path| {
        vec![
            "apply".to_owned(),
            s(&pkg),
            "--root".to_owned(),
            s(root),
            "--trust".to_owned(),
            s(&trust),
            "--quiet".to_owned(),
        ]
    };
    let revert_args = |root: &Path| {
        vec![
            "revert".to_owned(),
            "--root".to_owned(),
            s(root),
            "--quiet".to_owned(),
        ]
    };

    // How long each operation takes, to spread the kills over it.
    copy_tree(&base, &root)?;
    let t = Instant::now();
    bsi(ws, &apply_args(&root))?;
    let apply_time = t.elapsed();
    let t = Instant::now();
    bsi(ws, &revert_args(&root))?;
    let revert_time = t.elapsed();
    fs::remove_dir_all(&root)?;

    let mut rng = SplitMix64::named("killbench");
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    for trial in 0..trials {
        let reverting = trial % 2 == 1;
        copy_tree(&base, &root)?;
        let (args, span) = if reverting {
            bsi(ws, &apply_args(&root))?;
            (revert_args(&root), revert_time)
        } else {
            (apply_args(&root), apply_time)
        };
        let delay = span.mul_f64(rng.below(1000) as f64 / 1000.0);
        let killed = run_and_kill(ws, &args, delay)?;
        bsi(ws, &["recover", "--root", &s(&root)])?;
        let letter = bsi(ws, &["status", "--root", &s(&root)])?;
        let ended = if same(&root, &target)? && letter.trim() == "macOS 26.3 (a)" {
            "26.3 (a)"
        } else if same(&root, &base)? && letter.trim() == "macOS 26.3" {
            "26.3"
        } else {
            bail!(
                "trial {trial}: after kill -9 at {delay:?} and recover, the root is neither tree (status {:?})",
                letter.trim()
            );
        };
        let op = if reverting { "revert" } else { "apply" };
        let how = if killed { "killed" } else { "finished" };
        *outcomes
            .entry(format!("{op} {how}, ended {ended}"))
            .or_default() += 1;
        fs::remove_dir_all(&root)?;
    }
    println!(
        "kill -9 bench: {trials} trials on testdata 26.3 -> 26.3 (a) (apply {:.0} ms, revert {:.0} ms unkilled), {:.0} s",
        apply_time.as_secs_f64() * 1e3,
        revert_time.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64()
    );
    println!("\n| outcome | trials |\n| --- | ---: |");
    for (outcome, n) in &outcomes {
        println!("| {outcome} | {n} |");
    }
    println!("\nevery trial ended in exactly 26.3 or 26.3 (a), with the matching status");
    Ok(())
}
