//! `cargo xtask encoders OLD NEW [--min BYTES] [--max BYTES]`: every delta encoder on every
//! changed regular file of two trees (paired by path), with the bytes each payload took and the
//! seconds its encoding and its decoding took (each decoding checked against the new file),
//! plain zstd beside them, and the encoder `encode_best` chooses. This is how the limits of the
//! encoders (`max_new_len`, `max_text_len`, `max_far_len`) were measured; run it on a new pair
//! before changing one.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use walkdir::WalkDir;

pub fn encoders(args: &[&str]) -> Result<()> {
    let (mut min, mut max) = (0usize, usize::MAX);
    let mut roots = Vec::new();
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        let mut bound = |name: &str| -> Result<usize> {
            let value = rest
                .next()
                .with_context(|| format!("{name} needs a number"))?;
            value
                .parse()
                .with_context(|| format!("{name} {value:?} is not a number of bytes"))
        };
        match arg {
            "--min" => min = bound("--min")?,
            "--max" => max = bound("--max")?,
            _ if arg.starts_with("--") => bail!("unknown option {arg}"),
            _ => roots.push(Path::new(arg)),
        }
    }
    let [old_root, new_root] = roots[..] else {
        bail!("usage: cargo xtask encoders OLD NEW [--min BYTES] [--max BYTES]");
    };
    println!("file | new bytes | text | encoder: payload bytes / encode s / decode s ... | chosen");
    for entry in WalkDir::new(new_root).sort_by_file_name() {
        let entry = entry.with_context(|| format!("walking {}", new_root.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(new_root)
            .expect("walkdir yields paths below its root");
        let old_path = old_root.join(rel);
        if !old_path.symlink_metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let new = std::fs::read(entry.path())
            .with_context(|| format!("reading {}", entry.path().display()))?;
        if new.len() < min || new.len() > max {
            continue;
        }
        let old =
            std::fs::read(&old_path).with_context(|| format!("reading {}", old_path.display()))?;
        if old == new {
            continue;
        }
        let mut line = format!(
            "{} | {} | {} |",
            rel.display(),
            new.len(),
            bsi_delta::is_text_like(&new)
        );
        // bsdiff without reference prediction beside the encoders: what the predictor wins.
        let unpredicted: &dyn bsi_delta::DeltaEncoder = &bsi_delta::Bsdiff::UNPREDICTED;
        let encoders = bsi_delta::delta_encoders().iter().copied();
        for (i, encoder) in encoders.chain([unpredicted]).enumerate() {
            let label = match i < bsi_delta::delta_encoders().len() {
                true => encoder.name(),
                false => "bsdiff unpredicted",
            };
            let start = Instant::now();
            let payload = encoder
                .encode(&old, &new)
                .with_context(|| format!("{} on {}", encoder.name(), rel.display()))?;
            let took = start.elapsed().as_secs_f64();
            let Some(payload) = payload else {
                line += &format!(" {label}: -");
                continue;
            };
            let start = Instant::now();
            let decoded = encoder
                .decode(&old, &payload, new.len() as u64)
                .with_context(|| format!("{} decoding {}", encoder.name(), rel.display()))?;
            let decode_took = start.elapsed().as_secs_f64();
            if decoded != new {
                bail!("{} decodes {} wrongly", encoder.name(), rel.display());
            }
            line += &format!(" {label}: {} / {took:.2} / {decode_took:.3}", payload.len());
        }
        let start = Instant::now();
        let plain = bsi_delta::compress(&new).context("plain zstd")?;
        line += &format!(
            " zstd: {} / {:.2} |",
            plain.len(),
            start.elapsed().as_secs_f64()
        );
        let best = bsi_delta::encode_best(Some(&old), &new).context("encode_best")?;
        line += &format!(" {} {}", best.encoder.unwrap_or("zstd"), best.payload.len());
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_refused_with_a_reason() {
        let err = |args: &[&str]| encoders(args).expect_err("refused").to_string();
        assert!(err(&["a"]).contains("usage"));
        assert!(err(&["a", "b", "--min"]).contains("--min needs a number"));
        assert!(err(&["a", "b", "--max", "x"]).contains("not a number"));
        assert!(err(&["a", "b", "--fast"]).contains("unknown option --fast"));
        assert!(err(&["/nonexistent/a", "/nonexistent/b"]).contains("walking"));
    }

    #[test]
    fn runs_every_encoder_on_a_changed_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        for root in [&old, &new] {
            std::fs::create_dir(root).expect("mkdir");
            std::fs::write(root.join("same"), b"unchanged").expect("write");
        }
        let text: Vec<u8> = (0..5000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        std::fs::write(old.join("log"), &text).expect("write");
        std::fs::write(new.join("log"), [&text[..], b"one more\n"].concat()).expect("write");
        let (old, new) = (old.to_str().expect("utf-8"), new.to_str().expect("utf-8"));
        encoders(&[old, new]).expect("runs");
        encoders(&[old, new, "--min", "1", "--max", "10"]).expect("runs on nothing");
    }
}
