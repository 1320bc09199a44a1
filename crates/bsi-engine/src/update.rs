//! `update`: read a channel, decide what the root should run, and install it: the newest letter
//! for the root's base that is not withdrawn, or the base release when the installed letter was
//! withdrawn and nothing newer replaces it. Refuses what The Update Framework names: metadata
//! older than seen (rollback), expired (freeze), signed below threshold, a clock earlier than the
//! last time seen, and packages whose bytes differ from the listing (mix and match).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bsi_channel::{rfc3339, unix_seconds, Listed, SignedChannel, CHANNEL_FILE, MAX_CHANNEL_LEN};
use bsi_format::{BaseRelease, Digest, Letter};
use bsi_sign::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::apply::{ApplyError, RevertError, Session, SessionError};
use crate::state::StateDir;
use crate::{status, NoProgress, VerifiedPackage};
use crate::{FsContext, FsError};

/// What a device remembers of the channels it read, beside its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Highest channel sequence number accepted.
    pub sequence: u64,
    /// sha256 of the canonical metadata accepted at that sequence.
    pub digest: Option<Digest>,
    /// Latest clock reading seen (Unix seconds).
    pub last_time: i64,
    /// Why the device last left a letter, for `status`.
    pub note: Option<String>,
}

const RECORD: &str = "device.json";
const POLICY: &str = "policy.json";

/// What the owner or an administrator decided for a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// `update` installs new letters by itself (otherwise only with `--install`).
    pub auto_install: bool,
    /// New letters may be installed at all (an administrator's restriction when off); installed
    /// letters stay removable either way.
    pub allow: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            auto_install: false,
            allow: true,
        }
    }
}

impl Policy {
    pub fn load(state_dir: &Path) -> Result<Policy, UpdateError> {
        load_or_default(state_dir.join(POLICY))
    }

    /// Write the policy atomically (taking the root's lock, so that no update runs meanwhile).
    pub fn save(&self, root: &Path, state_dir: &Path) -> Result<(), UpdateError> {
        let _session = Session::open(root, state_dir, true)?;
        crate::fsx::create_dir_all(state_dir)?;
        let bytes = serde_json::to_vec_pretty(self).expect("a policy always serialises");
        Ok(crate::fsx::write_atomically(
            &state_dir.join(POLICY),
            &bytes,
        )?)
    }
}

/// A JSON file of the state directory, or its default when there is none.
fn load_or_default<T: Default + for<'de> Deserialize<'de>>(
    path: PathBuf,
) -> Result<T, UpdateError> {
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| UpdateError::Record {
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(FsError::new("read", &path, e).into()),
    }
}

impl DeviceRecord {
    pub fn load(state_dir: &Path) -> Result<DeviceRecord, UpdateError> {
        load_or_default(state_dir.join(RECORD))
    }

    fn save(&self, state_dir: &Path) -> Result<(), FsError> {
        crate::fsx::create_dir_all(state_dir)?;
        let bytes = serde_json::to_vec_pretty(self).expect("a record always serialises");
        crate::fsx::write_atomically(&state_dir.join(RECORD), &bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {reason}")]
    Channel { path: PathBuf, reason: String },
    #[error(
        "{path} is at sequence {got}, older than sequence {seen} already seen; refusing a rollback"
    )]
    Rollback { path: PathBuf, got: u64, seen: u64 },
    #[error("{path} changed without a new sequence number ({seq}); refusing it")]
    SameSequence { path: PathBuf, seq: u64 },
    #[error("{path} expired at {expired}; refusing frozen metadata")]
    Expired { path: PathBuf, expired: String },
    #[error("the clock reads {now}, earlier than {seen} already seen; refusing to trust it")]
    Clock { now: String, seen: String },
    #[error("cannot tell the root's release: {0}")]
    Release(String),
    #[error("{file}: {reason} (the channel lists {listed}); refusing the package")]
    Mismatch {
        file: PathBuf,
        reason: String,
        listed: String,
    },
    #[error("{file} is {got}, but the channel lists it as {listed}; refusing the package")]
    WrongPackage {
        file: PathBuf,
        got: String,
        listed: String,
    },
    #[error("{path} is damaged: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error(transparent)]
    Open(#[from] crate::OpenError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Revert(#[from] RevertError),
    #[error(transparent)]
    Status(#[from] crate::StatusError),
}

/// What `update` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Nothing newer for this base.
    UpToDate { title: String },
    /// A newer letter exists; not installed (no `--install` and automatic install off).
    Available { title: String },
    /// A newer letter exists; the policy forbids installing it.
    Forbidden { title: String },
    /// Installed (or switched to) this release.
    Installed { title: String },
    /// The installed letter was withdrawn: the root now runs `title`.
    LeftWithdrawn {
        letter: Letter,
        reason: String,
        title: String,
    },
}

/// The keys `update` trusts.
#[derive(Debug, Clone)]
pub struct UpdateTrust {
    pub channel_keys: Vec<PublicKey>,
    pub channel_threshold: usize,
    pub package_keys: Vec<PublicKey>,
}

fn release_title(product: &str, base: &BaseRelease, letter: Option<Letter>) -> String {
    match letter {
        Some(l) => format!("{product} {} ({l})", base.version),
        None => format!("{product} {}", base.version),
    }
}

/// Where a channel is: a local directory, or an http(s) URL serving the same files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSource {
    Dir(PathBuf),
    Url(String),
}

impl ChannelSource {
    /// An `http://` or `https://` prefix makes a URL; anything else is a directory.
    pub fn parse(text: &str) -> ChannelSource {
        if text.starts_with("http://") || text.starts_with("https://") {
            ChannelSource::Url(text.trim_end_matches('/').to_owned())
        } else {
            ChannelSource::Dir(PathBuf::from(text))
        }
    }

    /// Where `name` is, for messages.
    pub fn locate(&self, name: &str) -> PathBuf {
        match self {
            ChannelSource::Dir(dir) => dir.join(name),
            ChannelSource::Url(url) => PathBuf::from(format!("{url}/{name}")),
        }
    }

    /// The bytes of `name`, at most `limit` of them: a longer file is refused as soon as the
    /// limit is passed, so a hostile server cannot make a device download more.
    pub fn read(&self, name: &str, limit: u64) -> Result<Vec<u8>, UpdateError> {
        let location = self.locate(name);
        let mut bytes = Vec::new();
        match self {
            ChannelSource::Dir(_) => {
                let file = bsi_sign::open_regular(&location).fs("read", &location)?;
                file.take(limit + 1)
                    .read_to_end(&mut bytes)
                    .fs("read", &location)?;
            }
            ChannelSource::Url(_) => {
                let url = location.to_string_lossy().into_owned();
                let agent = ureq::AgentBuilder::new()
                    .timeout(std::time::Duration::from_secs(60))
                    .redirects(0)
                    .build();
                let response = agent.get(&url).call().map_err(|e| UpdateError::Channel {
                    path: location.clone(),
                    reason: match e {
                        ureq::Error::Status(code, _) => format!("the server answered {code}"),
                        ureq::Error::Transport(t) => transport_reason(&t),
                    },
                })?;
                response
                    .into_reader()
                    .take(limit + 1)
                    .read_to_end(&mut bytes)
                    .fs("download", &location)?;
            }
        }
        if bytes.len() as u64 > limit {
            return Err(UpdateError::Channel {
                path: location,
                reason: format!("larger than the {limit} bytes allowed"),
            });
        }
        Ok(bytes)
    }
}

/// Why a request failed before any answer, without the URL that ureq's own message starts
/// with (the error names it already): "connection failed: Connect error: Connection refused".
fn transport_reason(t: &ureq::Transport) -> String {
    let mut reason = t.kind().to_string().to_lowercase();
    for more in [
        t.message().map(str::to_owned),
        std::error::Error::source(t).map(ToString::to_string),
    ]
    .into_iter()
    .flatten()
    {
        reason = format!("{reason}: {more}");
    }
    reason
}

/// Read the channel's metadata, check it against the trust and the device record, and record it.
fn read_channel(
    channel_dir: &ChannelSource,
    state_dir: &Path,
    trust: &UpdateTrust,
    now: SystemTime,
) -> Result<(bsi_channel::Channel, DeviceRecord), UpdateError> {
    let path = channel_dir.locate(CHANNEL_FILE);
    let bytes = channel_dir.read(CHANNEL_FILE, MAX_CHANNEL_LEN)?;
    let signed = SignedChannel::from_bytes(&bytes).map_err(|e| UpdateError::Channel {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let channel = signed
        .verify(&trust.channel_keys, trust.channel_threshold)
        .map_err(|e| UpdateError::Channel {
            path: path.clone(),
            reason: e.to_string(),
        })?
        .clone();
    let mut record = DeviceRecord::load(state_dir)?;
    let now = unix_seconds(now);
    if now < record.last_time {
        return Err(UpdateError::Clock {
            now: rfc3339(now),
            seen: rfc3339(record.last_time),
        });
    }
    let digest = Digest(Sha256::digest(channel.canonical_bytes()).into());
    if channel.sequence < record.sequence {
        return Err(UpdateError::Rollback {
            path,
            got: channel.sequence,
            seen: record.sequence,
        });
    }
    if channel.sequence == record.sequence && record.digest.is_some_and(|d| d != digest) {
        return Err(UpdateError::SameSequence {
            path,
            seq: channel.sequence,
        });
    }
    if channel.expires <= now {
        return Err(UpdateError::Expired {
            path,
            expired: rfc3339(channel.expires),
        });
    }
    record.sequence = channel.sequence;
    record.digest = Some(digest);
    record.last_time = now;
    record.save(state_dir)?;
    Ok((channel, record))
}

/// Fetch a listed package: exactly the size and sha256 listed, signed by a package key, and
/// for the product, base and letter listed.
fn fetch(
    channel_dir: &ChannelSource,
    product: &str,
    base: &BaseRelease,
    listed: &Listed,
    trust: &UpdateTrust,
) -> Result<VerifiedPackage, UpdateError> {
    let file = channel_dir.locate(&listed.file);
    let title = release_title(product, base, Some(listed.letter));
    let mismatch = |reason: String| UpdateError::Mismatch {
        file: file.clone(),
        reason,
        listed: format!("{} bytes, sha256 {}", listed.size, listed.sha256),
    };
    if listed.file.contains('/') || listed.file.starts_with('.') {
        return Err(mismatch(
            "the listed file name is not a plain name".to_owned(),
        ));
    }
    let bytes = match channel_dir.read(&listed.file, listed.size) {
        Err(UpdateError::Channel { reason, .. }) if reason.starts_with("larger than") => {
            return Err(mismatch("it is larger than listed".to_owned()))
        }
        other => other?,
    };
    if bytes.len() as u64 != listed.size {
        return Err(mismatch(format!("it is {} bytes", bytes.len())));
    }
    let digest = Digest(Sha256::digest(&bytes).into());
    if digest != listed.sha256 {
        return Err(mismatch(format!("its sha256 is {digest}")));
    }
    let key = crate::package::signer_key(&bytes, &trust.package_keys)
        .ok_or_else(|| mismatch("no package key is trusted".to_owned()))?;
    let pkg = VerifiedPackage::from_bytes(bytes, key, &file)?;
    let m = &pkg.manifest;
    if m.product != product || &m.base != base || m.letter != listed.letter {
        return Err(UpdateError::WrongPackage {
            file,
            got: pkg.title(),
            listed: title,
        });
    }
    Ok(pkg)
}

/// Bring `root` to what the channel says, installing only when `install`.
pub fn update(
    root: &Path,
    state_dir: &Path,
    channel_dir: &ChannelSource,
    trust: &UpdateTrust,
    install: bool,
    now: SystemTime,
) -> Result<UpdateOutcome, UpdateError> {
    let session = Session::open(root, state_dir, false)?;
    let policy = Policy::load(state_dir)?;
    let install = policy.allow && (install || policy.auto_install);
    let (channel, mut record) = read_channel(channel_dir, state_dir, trust, now)?;
    // A patch that a full release retired no longer decides the base: the plist does.
    let installed = StateDir::new(state_dir)
        .load_head()
        .map_err(ApplyError::from)?
        .filter(|i| crate::apply::retired_by(root, &i.product, &i.base, i.letter).is_none());
    let (product, base, letter) = match &installed {
        Some(i) => (i.product.clone(), i.base.clone(), Some(i.letter)),
        None => {
            let s = status(root, state_dir)?;
            let (Some(product), Some(version)) = (s.product, s.version) else {
                return Err(UpdateError::Release(format!(
                    "{} names no product and version",
                    root.join(crate::apply::SYSTEM_VERSION_PLIST).display()
                )));
            };
            let version = version
                .parse()
                .map_err(|e| UpdateError::Release(format!("version {version:?}: {e}")))?;
            (
                product,
                BaseRelease {
                    version,
                    build: s.build,
                },
                None,
            )
        }
    };
    let Some(release) = channel.release(&product, &base) else {
        return Ok(UpdateOutcome::UpToDate {
            title: release_title(&product, &base, letter),
        });
    };
    let newest = release.letters.iter().max_by_key(|l| l.letter);
    let withdrawn = letter.and_then(|l| release.withdrawn.iter().find(|w| w.letter == l));

    if let (Some(gone), Some(current)) = (withdrawn, letter) {
        // Leave the withdrawn letter whatever the install setting: it was pulled for a reason.
        // With installs forbidden, leaving means going back to the base.
        let newest = newest.filter(|_| policy.allow);
        let title = match newest {
            Some(next) if next.letter > current => {
                session.apply(
                    &fetch(channel_dir, &product, &base, next, trust)?,
                    &NoProgress,
                )?;
                release_title(&product, &base, Some(next.letter))
            }
            _ => {
                session.revert()?;
                match newest {
                    Some(older) => {
                        let pkg = fetch(channel_dir, &product, &base, older, trust)?;
                        session.apply(&pkg, &NoProgress)?;
                        release_title(&product, &base, Some(older.letter))
                    }
                    None => release_title(&product, &base, None),
                }
            }
        };
        record.note = Some(format!("({current}) was withdrawn: {}", gone.reason));
        record.save(state_dir)?;
        return Ok(UpdateOutcome::LeftWithdrawn {
            letter: current,
            reason: gone.reason.clone(),
            title,
        });
    }
    match newest {
        Some(next) if letter.is_none_or(|l| next.letter > l) => {
            let title = release_title(&product, &base, Some(next.letter));
            if !policy.allow {
                return Ok(UpdateOutcome::Forbidden { title });
            }
            if !install {
                return Ok(UpdateOutcome::Available { title });
            }
            let pkg = fetch(channel_dir, &product, &base, next, trust)?;
            session.apply(&pkg, &NoProgress)?;
            record.note = None;
            record.save(state_dir)?;
            Ok(UpdateOutcome::Installed { title })
        }
        _ => Ok(UpdateOutcome::UpToDate {
            title: release_title(&product, &base, letter),
        }),
    }
}
