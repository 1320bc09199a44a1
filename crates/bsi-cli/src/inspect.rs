//! `bsi inspect`: what a package contains, per component.

use std::path::Path;

use anyhow::{Context, Result};
use bsi_format::{Image, Manifest, Operation, RawPackage};
use serde_json::json;

pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let bytes = crate::read_input(path)
        .with_context(|| format!("cannot read package {}", path.display()))?;
    let raw = RawPackage::split(&bytes).with_context(|| format!("{}", path.display()))?;
    let manifest =
        Manifest::from_packed(raw.manifest).with_context(|| format!("{}", path.display()))?;
    let report = report(&manifest, raw.payloads, bytes.len() as u64);
    if as_json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(path, &report);
    }
    Ok(())
}

fn size(image: &Option<Image>) -> Option<u64> {
    match image {
        Some(Image::File { size, .. }) => Some(*size),
        _ => None,
    }
}

/// `payloads` is the package's payload section, whose first bytes of a zstd-prefix payload say
/// whose code was converted (`None` where they are out of the section).
fn report(m: &Manifest, payloads: &[u8], package_bytes: u64) -> serde_json::Value {
    let components: Vec<_> = m
        .components
        .iter()
        .map(|c| {
            let (mut added, mut deleted, mut changed) = (Vec::new(), Vec::new(), Vec::new());
            for e in m.entries.iter().filter(|e| e.component == c.name) {
                let encoder = match e.op.encoder() {
                    Some(encoder) => Some(encoder.as_str()),
                    None if e.payload.is_some() => Some(bsi_delta_plain()),
                    None => None,
                };
                let payload_bytes = e.payload.as_ref().map_or(0, |p| p.len);
                let converted = match (encoder, &e.payload) {
                    (Some("zstd-prefix"), Some(p)) => {
                        let at = usize::try_from(p.offset).ok();
                        let len = usize::try_from(p.len).ok();
                        at.zip(len)
                            .and_then(|(at, len)| payloads.get(at..at.checked_add(len)?))
                            .and_then(bsi_delta::converted_code)
                    }
                    _ => None,
                };
                let item = json!({
                    "path": e.path.as_str(),
                    "op": e.op.name(),
                    "old_kind": e.pre.as_ref().map(Image::kind_name),
                    "new_kind": e.post.as_ref().map(Image::kind_name),
                    "old_size": size(&e.pre),
                    "new_size": size(&e.post),
                    "encoder": encoder,
                    "payload_bytes": payload_bytes,
                    "code_converted": converted,
                    "source": match &e.op {
                        Operation::Delta { source: Some(src), .. } => Some(src.path.as_str()),
                        _ => None,
                    },
                });
                match e.op {
                    Operation::Add { .. } => added.push(item),
                    Operation::Delete => deleted.push(item),
                    _ => changed.push(item),
                }
            }
            json!({"name": c.name, "path": c.path, "added": added, "deleted": deleted, "changed": changed})
        })
        .collect();
    json!({
        "product": m.product,
        "base_version": m.base.version.to_string(),
        "base_build": m.base.build,
        "letter": m.letter.to_string(),
        "title": format!("{} {} ({})", m.product, m.base.version, m.letter),
        "signer": m.signer,
        "signature_checked": false,
        "package_bytes": package_bytes,
        "payload_bytes": m.payload_len,
        "entries": m.entries.len(),
        "components": components,
    })
}

fn bsi_delta_plain() -> &'static str {
    "zstd"
}

fn print_text(path: &Path, r: &serde_json::Value) {
    out!(
        "package    {} ({} bytes)",
        path.display(),
        r["package_bytes"]
    );
    out!("title      {}", r["title"].as_str().unwrap_or_default());
    out!("product    {}", r["product"].as_str().unwrap_or_default());
    let build = r["base_build"]
        .as_str()
        .map(|b| format!(" ({b})"))
        .unwrap_or_default();
    out!(
        "base       {}{build}",
        r["base_version"].as_str().unwrap_or_default()
    );
    out!("letter     {}", r["letter"].as_str().unwrap_or_default());
    out!(
        "signer     {} (not checked here: run `bsi verify`)",
        r["signer"].as_str().unwrap_or_default()
    );
    out!(
        "entries    {}, payloads {} bytes",
        r["entries"],
        r["payload_bytes"]
    );
    for c in r["components"].as_array().into_iter().flatten() {
        let path = c["path"].as_str().unwrap_or_default();
        let path = if path.is_empty() { "whole tree" } else { path };
        out!(
            "\ncomponent {} ({path})",
            c["name"].as_str().unwrap_or_default()
        );
        for (label, key) in [
            ("added", "added"),
            ("deleted", "deleted"),
            ("changed", "changed"),
        ] {
            let items = c[key].as_array().map(Vec::as_slice).unwrap_or_default();
            out!("  {label}: {}", items.len());
            for item in items {
                let sizes = match (item["old_size"].as_u64(), item["new_size"].as_u64()) {
                    (Some(a), Some(b)) => format!("{a} -> {b} bytes"),
                    (None, Some(b)) => format!("{b} bytes"),
                    (Some(a), None) => format!("{a} bytes"),
                    (None, None) => item["new_kind"]
                        .as_str()
                        .or(item["old_kind"].as_str())
                        .unwrap_or_default()
                        .to_owned(),
                };
                let converted = item["code_converted"]
                    .as_str()
                    .map(|code| format!(", {code} code converted"))
                    .unwrap_or_default();
                let payload = match (item["encoder"].as_str(), item["source"].as_str()) {
                    (Some(enc), Some(src)) => {
                        format!(
                            ", payload {} bytes ({enc}{converted} from {src})",
                            item["payload_bytes"]
                        )
                    }
                    (Some(enc), None) => {
                        format!(
                            ", payload {} bytes ({enc}{converted})",
                            item["payload_bytes"]
                        )
                    }
                    _ => String::new(),
                };
                out!(
                    "    {:<8} {}  {sizes}{payload}",
                    item["op"].as_str().unwrap_or_default(),
                    item["path"].as_str().unwrap_or_default()
                );
            }
        }
    }
}
