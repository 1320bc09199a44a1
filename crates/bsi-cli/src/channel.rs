//! `bsi channel`: publish lettered packages in a channel directory (static files: `channel.json`
//! and the packages), withdraw letters, and sign the metadata.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use bsi_channel::{parse_expiry, rfc3339, Channel, Listed, SignedChannel, CHANNEL_FILE};
use bsi_format::{BaseRelease, Digest, Letter, Manifest, RawPackage, Version};
use bsi_sign::SecretKey;
use clap::Subcommand;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Make an empty channel directory.
    Init {
        #[arg(long, value_name = "REPO")]
        dir: PathBuf,
    },
    /// Copy a package into the channel and list its letter (unsigned until `sign`).
    Add {
        #[arg(long, value_name = "REPO")]
        dir: PathBuf,
        package: PathBuf,
    },
    /// Withdraw a published letter, with the reason devices will show.
    Withdraw {
        #[arg(long, value_name = "REPO")]
        dir: PathBuf,
        #[arg(long, value_name = "P")]
        product: String,
        #[arg(long, value_name = "V")]
        base_version: Version,
        #[arg(long, value_name = "BUILD")]
        base_build: Option<String>,
        #[arg(long, value_name = "L")]
        letter: Letter,
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Sign the channel metadata: next sequence number, new expiry, one signature per key.
    Sign {
        #[arg(long, value_name = "REPO")]
        dir: PathBuf,
        /// Signing key (repeatable, for a threshold of signatures)
        #[arg(long = "key", value_name = "KEY.pem", required = true)]
        keys: Vec<PathBuf>,
        /// How long the metadata stays valid (30d, 12h) or until when (RFC 3339)
        #[arg(long, value_name = "DURATION_OR_RFC3339")]
        expires: String,
    },
}

fn metadata_path(dir: &Path) -> PathBuf {
    dir.join(CHANNEL_FILE)
}

fn load(dir: &Path) -> Result<SignedChannel> {
    let path = metadata_path(dir);
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "cannot read {}; make the channel with `bsi channel init --dir {}`",
            path.display(),
            dir.display()
        )
    })?;
    SignedChannel::from_bytes(&bytes).with_context(|| format!("{}", path.display()))
}

/// Write the content back without signatures: it changed, so the old ones no longer hold.
fn store_unsigned(dir: &Path, channel: Channel) -> Result<()> {
    let unsigned = SignedChannel {
        signed: channel,
        signatures: Vec::new(),
    };
    bsi_engine::write_atomically(&metadata_path(dir), &unsigned.to_bytes())?;
    Ok(())
}

/// `macOS-26.3-25D125-a.bsi`: the product, base and letter, in characters safe in a URL.
fn package_file_name(product: &str, base: &BaseRelease, letter: Letter) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let build = base
        .build
        .as_deref()
        .map(|b| format!("-{}", safe(b)))
        .unwrap_or_default();
    format!("{}-{}{build}-{letter}.bsi", safe(product), base.version)
}

pub fn run(command: ChannelCommand) -> Result<()> {
    match command {
        ChannelCommand::Init { dir } => {
            let path = metadata_path(&dir);
            if path.exists() {
                bail!(
                    "{} already exists; the channel is already made",
                    path.display()
                );
            }
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            store_unsigned(&dir, Channel::new())?;
            eprintln!("made an empty channel in {}", dir.display());
        }
        ChannelCommand::Add { dir, package } => {
            let mut channel = load(&dir)?.signed;
            let bytes = fs::read(&package)
                .with_context(|| format!("cannot read package {}", package.display()))?;
            let raw = RawPackage::split(&bytes)
                .with_context(|| format!("{} is not a bsi package", package.display()))?;
            let manifest = Manifest::from_packed(raw.manifest)
                .with_context(|| format!("{} has a damaged manifest", package.display()))?;
            let file = package_file_name(&manifest.product, &manifest.base, manifest.letter);
            let listed = Listed {
                letter: manifest.letter,
                file: file.clone(),
                size: bytes.len() as u64,
                sha256: Digest(Sha256::digest(&bytes).into()),
            };
            channel
                .add(&manifest.product, &manifest.base, listed)
                .with_context(|| format!("cannot add {}", package.display()))?;
            bsi_engine::write_atomically(&dir.join(&file), &bytes)?;
            store_unsigned(&dir, channel)?;
            eprintln!(
                "added {} {} ({}) as {}; sign the channel to publish it",
                manifest.product, manifest.base.version, manifest.letter, file
            );
        }
        ChannelCommand::Withdraw {
            dir,
            product,
            base_version,
            base_build,
            letter,
            reason,
        } => {
            anyhow::ensure!(!reason.trim().is_empty(), "--reason must say why");
            let mut channel = load(&dir)?.signed;
            let base = match base_build {
                Some(build) => BaseRelease {
                    version: base_version.clone(),
                    build: Some(build),
                },
                None => {
                    // The one release of that product and version, whatever its build.
                    let matches: Vec<&BaseRelease> = channel
                        .releases
                        .iter()
                        .filter(|r| r.product == product && r.base.version == base_version)
                        .map(|r| &r.base)
                        .collect();
                    match matches.as_slice() {
                        [one] => (*one).clone(),
                        [] => bail!("the channel has no {product} {base_version}"),
                        _ => bail!(
                            "the channel has several builds of {product} {base_version}; name one with --base-build"
                        ),
                    }
                }
            };
            channel.withdraw(&product, &base, letter, &reason)?;
            store_unsigned(&dir, channel)?;
            eprintln!(
                "withdrew {product} {base_version} ({letter}): {reason}; sign the channel to publish it"
            );
        }
        ChannelCommand::Sign { dir, keys, expires } => {
            let channel = load(&dir)?.signed;
            let expires = parse_expiry(&expires, SystemTime::now())?;
            let keys: Vec<SecretKey> = keys
                .iter()
                .map(|k| SecretKey::load(k))
                .collect::<Result<_, _>>()?;
            let refs: Vec<&SecretKey> = keys.iter().collect();
            let signed = SignedChannel::sign(channel, expires, &refs);
            bsi_engine::write_atomically(&metadata_path(&dir), &signed.to_bytes())?;
            eprintln!(
                "signed {} at sequence {} with {} key(s), valid until {}",
                metadata_path(&dir).display(),
                signed.signed.sequence,
                signed.signatures.len(),
                rfc3339(expires)
            );
        }
    }
    Ok(())
}
