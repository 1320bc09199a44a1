//! `cargo xtask`: the workspace's pipelines.
//!
//! - `cargo xtask testdata [--out DIR]`: deterministic example release trees (see testdata/README.md)
//! - `cargo xtask demo`: the end-to-end build / verify / apply / revert example
//! - `cargo xtask bench [--smoke] [--pairs NAME,...] [--out FILE]`: bsi against peer delta tools
//! - `cargo xtask encoders OLD NEW [--min BYTES] [--max BYTES]`: every encoder on every changed file
//! - `cargo xtask killbench [--trials N]`: kill -9 during apply and revert, then recover
//! - `cargo xtask release PLAN`: build, sign, verify and publish the packages of a release plan
//! - `cargo xtask fuzz-seeds [--out DIR]`: starting corpora for the fuzz targets

mod bench;
mod demo;
mod encoders;
mod exe;
mod killbench;
mod release;
mod rng;
mod seeds;
mod testdata;
mod tree;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  testdata [--out DIR]   generate the example trees 26.3, 26.3a, 26.3b (default DIR: target/testdata)
  demo                   run the end-to-end example: build, verify, apply, revert, compare
  bench [--smoke] [--pairs NAME,...] [--out FILE]
                         compare bsi with bsdiff, xdelta3 and zstd on synthetic and Debian pairs
                         (tables on stdout; default FILE: BENCHMARKS.md, none with --smoke)
  encoders OLD NEW [--min BYTES] [--max BYTES]
                         every delta encoder on every changed file of two trees: bytes, seconds,
                         plain zstd, and the encoder bsi chooses
  killbench [--trials N] kill -9 bsi apply/revert at random moments, recover, compare (default 200)
  release PLAN           build, sign, verify and publish a release plan's packages to its channel
                         (example: testdata/release-plan.toml)
  fuzz-seeds [--out DIR] starting corpora for the fuzz targets, from real payloads and packages
                         (default DIR: target/fuzz-seeds)";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ws = demo::workspace_root();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["testdata"] => testdata::generate(&ws.join("target/testdata")),
        ["testdata", "--out", dir] => testdata::generate(&PathBuf::from(dir)),
        ["demo"] => demo::demo(&ws),
        ["bench", rest @ ..] => bench::bench(&ws, rest),
        ["encoders", rest @ ..] => encoders::encoders(rest),
        ["killbench", rest @ ..] => killbench::killbench(&ws, rest),
        ["release", rest @ ..] => release::release(&ws, rest),
        ["fuzz-seeds", rest @ ..] => seeds::fuzz_seeds(&ws, rest),
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
