//! `cargo xtask release PLAN`: build every package a release plan names, sign it, verify it
//! against its base tree, add it to the channel, sign the channel, and print a summary table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::killbench::bsi;

/// A release plan (TOML): the channel, the keys, and one entry per package.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    channel: PathBuf,
    key: PathBuf,
    trust: PathBuf,
    expires: String,
    #[serde(rename = "package")]
    packages: Vec<Planned>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Planned {
    product: String,
    base: PathBuf,
    target: PathBuf,
    base_version: String,
    base_build: Option<String>,
    letter: String,
    #[serde(default)]
    components: Vec<String>,
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn release(ws: &Path, args: &[&str]) -> Result<()> {
    let [plan_path] = args else {
        bail!("usage: cargo xtask release PLAN.toml");
    };
    let plan_path = ws.join(plan_path);
    let plan: Plan = toml::from_str(
        &std::fs::read_to_string(&plan_path)
            .with_context(|| format!("cannot read plan {}", plan_path.display()))?,
    )
    .with_context(|| format!("{} is not a valid release plan", plan_path.display()))?;
    if plan.packages.is_empty() {
        bail!("{} names no package", plan_path.display());
    }

    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "-p", "bsi-cli"])
        .current_dir(ws)
        .status()?;
    if !status.success() {
        bail!("cargo build --release -p bsi-cli failed");
    }
    if plan
        .packages
        .iter()
        .any(|p| p.base.starts_with("target/testdata") || p.target.starts_with("target/testdata"))
    {
        crate::testdata::generate(&ws.join("target/testdata"))?;
    }
    let channel = ws.join(&plan.channel);
    if !channel.join("channel.json").exists() {
        bsi(ws, &["channel", "init", "--dir", &text(&channel)])?;
    }
    let out_dir = ws.join("target/release-packages");
    std::fs::create_dir_all(&out_dir)?;

    let mut rows = Vec::new();
    for p in &plan.packages {
        let title = format!("{} {} ({})", p.product, p.base_version, p.letter);
        let pkg = out_dir.join(format!("{}-{}-{}.bsi", p.product, p.base_version, p.letter));
        let (base, target) = (ws.join(&p.base), ws.join(&p.target));
        let mut args: Vec<String> = [
            "build",
            "--base",
            &text(&base),
            "--target",
            &text(&target),
            "--product",
            &p.product,
            "--base-version",
            &p.base_version,
            "--letter",
            &p.letter,
            "--key",
            &text(&ws.join(&plan.key)),
            "--out",
            &text(&pkg),
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(build) = &p.base_build {
            args.extend(["--base-build".to_owned(), build.clone()]);
        }
        for c in &p.components {
            args.extend(["--component".to_owned(), c.clone()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        bsi(ws, &argv).with_context(|| format!("building {title}"))?;
        let build_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        bsi(
            ws,
            &[
                "verify",
                &text(&pkg),
                "--trust",
                &text(&ws.join(&plan.trust)),
                "--base-tree",
                &text(&base),
            ],
        )
        .with_context(|| format!("verifying {title} against {}", base.display()))?;
        let verify_s = t.elapsed().as_secs_f64();
        bsi(
            ws,
            &["channel", "add", "--dir", &text(&channel), &text(&pkg)],
        )
        .with_context(|| format!("adding {title} to the channel"))?;
        let bytes = std::fs::metadata(&pkg)?.len();
        println!("{title}: {bytes} bytes, built in {build_s:.2} s, verified in {verify_s:.2} s");
        rows.push((title, bytes, build_s, verify_s));
    }
    let signed = bsi(
        ws,
        &[
            "channel",
            "sign",
            "--dir",
            &text(&channel),
            "--key",
            &text(&ws.join(&plan.key)),
            "--expires",
            &plan.expires,
        ],
    )?;
    print!("{signed}");

    println!("\n| package | bytes | build s | verify s |\n| --- | ---: | ---: | ---: |");
    for (title, bytes, build_s, verify_s) in &rows {
        println!("| {title} | {bytes} | {build_s:.2} | {verify_s:.2} |");
    }
    println!(
        "\n{} package(s) built, verified against their base trees and published in {}",
        rows.len(),
        channel.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_plan_parses() {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(ws.join("testdata/release-plan.toml")).expect("read");
        let plan: Plan = toml::from_str(&text).expect("valid plan");
        let products: Vec<&str> = plan.packages.iter().map(|p| p.product.as_str()).collect();
        assert_eq!(products, ["macOS", "iOS", "iPadOS"]);
        assert!(toml::from_str::<Plan>("channel = 1").is_err());
    }
}
