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
    let bytes = crate::read_input(&path).with_context(|| {
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
            say!("made an empty channel in {}", dir.display());
        }
        ChannelCommand::Add { dir, package } => {
            let mut channel = load(&dir)?.signed;
            let bytes = crate::read_input(&package)
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
            say!(
                "added {} {} ({}) as {}; sign the channel to publish it",
                manifest.product,
                manifest.base.version,
                manifest.letter,
                file
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
            say!(
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
            say!(
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

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Write a first trust file (version 1), signed by its root keys.
    Init {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Root private key (repeatable): signs trust files
        #[arg(long = "root", value_name = "KEY.pem", required = true)]
        roots: Vec<PathBuf>,
        #[arg(long, value_name = "N", default_value_t = 1)]
        root_threshold: usize,
        /// Public key accepted for packages (repeatable)
        #[arg(long = "packages", value_name = "PUB.pem", required = true)]
        packages: Vec<PathBuf>,
        /// Public key accepted for channel metadata (repeatable)
        #[arg(long = "channel", value_name = "PUB.pem", required = true)]
        channel: Vec<PathBuf>,
        #[arg(long, value_name = "N", default_value_t = 1)]
        channel_threshold: usize,
    },
    /// Write the next version of a trust file: new root keys (and optionally new package and
    /// channel keys, revoked keys), signed by the old root keys and the new ones.
    Rotate {
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Root private key of the current version (repeatable)
        #[arg(long = "old-root", value_name = "KEY.pem", required = true)]
        old_roots: Vec<PathBuf>,
        /// Root private key of the new version (repeatable)
        #[arg(long = "root", value_name = "KEY.pem", required = true)]
        roots: Vec<PathBuf>,
        #[arg(long, value_name = "N", default_value_t = 1)]
        root_threshold: usize,
        /// New package keys (repeatable; default: keep the current ones)
        #[arg(long = "packages", value_name = "PUB.pem")]
        packages: Vec<PathBuf>,
        /// New channel keys (repeatable; default: keep the current ones)
        #[arg(long = "channel", value_name = "PUB.pem")]
        channel: Vec<PathBuf>,
        /// Key id that counts for nothing from this version on (repeatable)
        #[arg(long = "revoke", value_name = "KEY_ID")]
        revoke: Vec<String>,
    },
}

pub fn run_trust(command: TrustCommand) -> Result<()> {
    use bsi_channel::trust::{Role, Roles, SignedTrust, Trust, TRUST_FORMAT};
    use bsi_sign::PublicKey;
    match command {
        TrustCommand::Init {
            out,
            roots,
            root_threshold,
            packages,
            channel,
            channel_threshold,
        } => {
            if out.exists() {
                bail!(
                    "{} already exists; a trust file is replaced by rotation, not rewritten",
                    out.display()
                );
            }
            let roots: Vec<SecretKey> = roots
                .iter()
                .map(|k| SecretKey::load(k))
                .collect::<Result<_, _>>()?;
            let load = |paths: &[PathBuf]| -> Result<Vec<PublicKey>> {
                Ok(paths
                    .iter()
                    .map(|p| PublicKey::load(p))
                    .collect::<Result<_, _>>()?)
            };
            let (packages, channel) = (load(&packages)?, load(&channel)?);
            let mut keys = std::collections::BTreeMap::new();
            let ids = |list: &[PublicKey]| -> Vec<String> {
                let mut ids: Vec<String> = list.iter().map(|k| k.key_id().to_string()).collect();
                ids.sort();
                ids.dedup();
                ids
            };
            let root_public: Vec<PublicKey> = roots.iter().map(SecretKey::public).collect();
            for key in root_public.iter().chain(&packages).chain(&channel) {
                keys.insert(key.key_id().to_string(), key.to_pem());
            }
            let trust = Trust {
                format: TRUST_FORMAT,
                version: 1,
                keys,
                roles: Roles {
                    root: Role {
                        keys: ids(&root_public),
                        threshold: root_threshold,
                    },
                    packages: Role {
                        keys: ids(&packages),
                        threshold: 1,
                    },
                    channel: Role {
                        keys: ids(&channel),
                        threshold: channel_threshold,
                    },
                },
                revoked: Vec::new(),
            };
            trust.check()?;
            let refs: Vec<&SecretKey> = roots.iter().collect();
            let signed = SignedTrust::sign(trust, &refs);
            signed.verify_initial()?;
            bsi_engine::write_atomically(&out, &signed.to_bytes())?;
            say!(
                "wrote {} (version 1; root {} of {}, packages {} key(s), channel {} of {})",
                out.display(),
                root_threshold,
                signed.signed.roles.root.keys.len(),
                signed.signed.roles.packages.keys.len(),
                channel_threshold,
                signed.signed.roles.channel.keys.len()
            );
        }
        TrustCommand::Rotate {
            from,
            out,
            old_roots,
            roots,
            root_threshold,
            packages,
            channel,
            revoke,
        } => {
            if out.exists() {
                bail!("{} already exists", out.display());
            }
            let current = SignedTrust::from_bytes(
                &crate::read_input(&from)
                    .with_context(|| format!("cannot read {}", from.display()))?,
            )
            .with_context(|| format!("{}", from.display()))?;
            let load_secret = |paths: &[PathBuf]| -> Result<Vec<SecretKey>> {
                Ok(paths
                    .iter()
                    .map(|k| SecretKey::load(k))
                    .collect::<Result<_, _>>()?)
            };
            let load_public = |paths: &[PathBuf]| -> Result<Vec<PublicKey>> {
                Ok(paths
                    .iter()
                    .map(|p| PublicKey::load(p))
                    .collect::<Result<_, _>>()?)
            };
            let (old_roots, roots) = (load_secret(&old_roots)?, load_secret(&roots)?);
            let mut next = current.signed.clone();
            next.version += 1;
            let mut add = |key: &PublicKey| -> String {
                let id = key.key_id().to_string();
                next.keys.insert(id.clone(), key.to_pem());
                id
            };
            let root_ids: Vec<String> = roots.iter().map(|k| add(&k.public())).collect();
            let package_ids: Vec<String> = load_public(&packages)?.iter().map(&mut add).collect();
            let channel_ids: Vec<String> = load_public(&channel)?.iter().map(&mut add).collect();
            next.roles.root = Role {
                keys: root_ids,
                threshold: root_threshold,
            };
            if !package_ids.is_empty() {
                next.roles.packages.keys = package_ids;
            }
            if !channel_ids.is_empty() {
                next.roles.channel.keys = channel_ids;
            }
            next.revoked.extend(revoke);
            next.revoked.sort();
            next.revoked.dedup();
            next.check()?;
            let refs: Vec<&SecretKey> = old_roots.iter().chain(&roots).collect();
            let signed = SignedTrust::sign(next, &refs);
            signed.verify_rotation(&current.signed)?;
            bsi_engine::write_atomically(&out, &signed.to_bytes())?;
            say!(
                "wrote {} (version {}, signed by the roots of versions {} and {})",
                out.display(),
                signed.signed.version,
                current.signed.version,
                signed.signed.version
            );
        }
    }
    Ok(())
}
