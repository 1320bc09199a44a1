//! Channel metadata: for each product and base release, the letters published (file name, size,
//! sha256), the letters withdrawn (with the reason), a sequence number that only grows and an
//! expiry time; signed over its canonical JSON by one or more ed25519 keys.
//!
//! A channel is a directory of static files (`channel.json` and the packages); this crate is
//! only the metadata and its signatures: no filesystem, no clock (times are passed in).
#![forbid(unsafe_code)]

pub mod trust;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bsi_format::{BaseRelease, Digest, Letter};
use bsi_sign::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

/// Format of `channel.json`.
pub const CHANNEL_FORMAT: u32 = 1;
/// Name of the metadata file in a channel directory.
pub const CHANNEL_FILE: &str = "channel.json";
/// Largest `channel.json` a device reads.
pub const MAX_CHANNEL_LEN: u64 = 8 << 20;

/// The channel's signed content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub format: u32,
    /// Grows by one at every signing; a device refuses a lower one than it has seen.
    pub sequence: u64,
    /// Seconds since the Unix epoch after which the metadata is refused (0: never signed).
    pub expires: i64,
    /// Sorted by product, then base version, then build.
    pub releases: Vec<Release>,
}

/// The letters of one product's base release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub product: String,
    pub base: BaseRelease,
    /// Published letters, in order.
    pub letters: Vec<Listed>,
    /// Withdrawn letters, in order.
    pub withdrawn: Vec<Withdrawn>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listed {
    pub letter: Letter,
    /// File name of the package in the channel directory.
    pub file: String,
    pub size: u64,
    pub sha256: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdrawn {
    pub letter: Letter,
    pub reason: String,
}

/// One signature over the canonical bytes of a [`Channel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSignature {
    pub key_id: String,
    /// ed25519 signature, hex.
    pub sig: String,
}

/// `channel.json`: the content and its signatures (none until `bsi channel sign`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedChannel {
    pub signed: Channel,
    pub signatures: Vec<ChannelSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel metadata is not valid: {0}")]
    Malformed(String),
    #[error("channel format {0} is not {CHANNEL_FORMAT}")]
    Format(u32),
    #[error("{product} {version} ({letter}) is already in the channel as {file}")]
    AlreadyListed {
        product: String,
        version: String,
        letter: Letter,
        file: String,
    },
    #[error("{product} {version} ({letter}) is not newer than ({last}), the channel's latest letter for that base")]
    NotNewer {
        product: String,
        version: String,
        letter: Letter,
        last: Letter,
    },
    #[error("{product} {version} ({letter}) was withdrawn and cannot be published again")]
    WasWithdrawn {
        product: String,
        version: String,
        letter: Letter,
    },
    #[error("{product} {version} ({letter}) is not a published letter of the channel")]
    NotListed {
        product: String,
        version: String,
        letter: Letter,
    },
    #[error("{0:?} is neither a duration (30d, 12h) nor an RFC 3339 time (2026-12-24T00:00:00Z)")]
    Expiry(String),
    #[error("expiry {0} is not in the future")]
    ExpiryPast(String),
    #[error("channel metadata carries {valid} valid signature(s) from trusted keys; {threshold} are needed")]
    BelowThreshold { valid: usize, threshold: usize },
}

impl Channel {
    /// An empty channel, never signed.
    pub fn new() -> Channel {
        Channel {
            format: CHANNEL_FORMAT,
            sequence: 0,
            expires: 0,
            releases: Vec::new(),
        }
    }

    /// The bytes signatures cover: compact JSON of the content, releases sorted.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("channel metadata always serialises")
    }

    fn release_mut(&mut self, product: &str, base: &BaseRelease) -> &mut Release {
        let at = match self
            .releases
            .iter()
            .position(|r| r.product == product && &r.base == base)
        {
            Some(at) => at,
            None => {
                self.releases.push(Release {
                    product: product.to_owned(),
                    base: base.clone(),
                    letters: Vec::new(),
                    withdrawn: Vec::new(),
                });
                self.releases.sort_by(|a, b| {
                    (&a.product, a.base.version.to_string(), &a.base.build).cmp(&(
                        &b.product,
                        b.base.version.to_string(),
                        &b.base.build,
                    ))
                });
                self.releases
                    .iter()
                    .position(|r| r.product == product && &r.base == base)
                    .expect("just inserted")
            }
        };
        &mut self.releases[at]
    }

    /// The release entry of `product` on `base`, if the channel has one.
    pub fn release(&self, product: &str, base: &BaseRelease) -> Option<&Release> {
        self.releases
            .iter()
            .find(|r| r.product == product && &r.base == base)
    }

    /// Publish a letter: it must be newer than every letter listed or withdrawn for its base.
    pub fn add(
        &mut self,
        product: &str,
        base: &BaseRelease,
        listed: Listed,
    ) -> Result<(), ChannelError> {
        let release = self.release_mut(product, base);
        let version = base.version.to_string();
        if let Some(same) = release.letters.iter().find(|l| l.letter == listed.letter) {
            if same == &listed {
                // The same package again (builds are reproducible): nothing to do.
                return Ok(());
            }
            return Err(ChannelError::AlreadyListed {
                product: product.to_owned(),
                version,
                letter: listed.letter,
                file: same.file.clone(),
            });
        }
        if release.withdrawn.iter().any(|w| w.letter == listed.letter) {
            return Err(ChannelError::WasWithdrawn {
                product: product.to_owned(),
                version,
                letter: listed.letter,
            });
        }
        let last = release
            .letters
            .iter()
            .map(|l| l.letter)
            .chain(release.withdrawn.iter().map(|w| w.letter))
            .max();
        if let Some(last) = last.filter(|&last| last > listed.letter) {
            return Err(ChannelError::NotNewer {
                product: product.to_owned(),
                version,
                letter: listed.letter,
                last,
            });
        }
        release.letters.push(listed);
        Ok(())
    }

    /// Withdraw a published letter, with the reason devices will show; returns its listing.
    pub fn withdraw(
        &mut self,
        product: &str,
        base: &BaseRelease,
        letter: Letter,
        reason: &str,
    ) -> Result<Listed, ChannelError> {
        let not_listed = || ChannelError::NotListed {
            product: product.to_owned(),
            version: base.version.to_string(),
            letter,
        };
        let release = self
            .releases
            .iter_mut()
            .find(|r| r.product == product && &r.base == base)
            .ok_or_else(not_listed)?;
        let at = release
            .letters
            .iter()
            .position(|l| l.letter == letter)
            .ok_or_else(not_listed)?;
        let listed = release.letters.remove(at);
        release.withdrawn.push(Withdrawn {
            letter,
            reason: reason.to_owned(),
        });
        release.withdrawn.sort_by_key(|w| w.letter);
        Ok(listed)
    }
}

impl Default for Channel {
    fn default() -> Self {
        Channel::new()
    }
}

/// One signature per key over `bytes`, sorted by key id, one per key.
pub(crate) fn sign_all(bytes: &[u8], keys: &[&SecretKey]) -> Vec<ChannelSignature> {
    let mut signatures: Vec<ChannelSignature> = keys
        .iter()
        .map(|key| ChannelSignature {
            key_id: key.public().key_id().to_string(),
            sig: hex::encode(key.sign(bytes)),
        })
        .collect();
    signatures.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    signatures.dedup_by(|a, b| a.key_id == b.key_id);
    signatures
}

/// Seconds since the Unix epoch of `time` (negative before it).
pub fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// `2026-12-24T00:00:00Z` for a Unix time.
pub fn rfc3339(seconds: i64) -> String {
    let time = if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The expiry `text` names at `now`: a duration from now (`30d`, `12h`, `90min`) or an RFC 3339
/// time; it must lie in the future.
pub fn parse_expiry(text: &str, now: SystemTime) -> Result<i64, ChannelError> {
    let at = match humantime::parse_duration(text) {
        Ok(d) => now
            .checked_add(d)
            .ok_or_else(|| ChannelError::Expiry(text.to_owned()))?,
        Err(_) => humantime::parse_rfc3339_weak(text)
            .map_err(|_| ChannelError::Expiry(text.to_owned()))?,
    };
    let seconds = unix_seconds(at);
    if seconds <= unix_seconds(now) {
        return Err(ChannelError::ExpiryPast(rfc3339(seconds)));
    }
    Ok(seconds)
}

impl SignedChannel {
    /// Read `channel.json` bytes: structure only, signatures not checked.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedChannel, ChannelError> {
        let signed: SignedChannel =
            serde_json::from_slice(bytes).map_err(|e| ChannelError::Malformed(e.to_string()))?;
        if signed.signed.format != CHANNEL_FORMAT {
            return Err(ChannelError::Format(signed.signed.format));
        }
        Ok(signed)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes =
            serde_json::to_vec_pretty(self).expect("channel metadata always serialises");
        bytes.push(b'\n');
        bytes
    }

    /// The next version of `channel`: sequence one higher, the given expiry, signed by `keys`.
    pub fn sign(mut channel: Channel, expires: i64, keys: &[&SecretKey]) -> SignedChannel {
        channel.sequence += 1;
        channel.expires = expires;
        let signatures = sign_all(&channel.canonical_bytes(), keys);
        SignedChannel {
            signed: channel,
            signatures,
        }
    }

    /// The content, when at least `threshold` distinct keys among `trusted` signed it. Two
    /// signatures by one key count once; signatures by other keys are ignored.
    pub fn verify(
        &self,
        trusted: &[PublicKey],
        threshold: usize,
    ) -> Result<&Channel, ChannelError> {
        let valid = trust::count_valid(&self.signed.canonical_bytes(), &self.signatures, trusted);
        if threshold == 0 || valid < threshold {
            return Err(ChannelError::BelowThreshold {
                valid,
                threshold: threshold.max(1),
            });
        }
        Ok(&self.signed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseRelease {
        BaseRelease {
            version: "26.3".parse().expect("version"),
            build: Some("25D125".to_owned()),
        }
    }

    fn listed(letter: char) -> Listed {
        Listed {
            letter: letter.to_string().parse().expect("letter"),
            file: format!("macOS-26.3-{letter}.bsi"),
            size: 1000,
            sha256: Digest([letter as u8; 32]),
        }
    }

    #[test]
    fn letters_are_added_in_order_and_withdrawn_for_good() {
        let mut ch = Channel::new();
        ch.add("macOS", &base(), listed('a')).expect("a");
        ch.add("macOS", &base(), listed('c')).expect("c");
        assert!(matches!(
            ch.add("macOS", &base(), listed('b')),
            Err(ChannelError::NotNewer { .. })
        ));
        ch.add("macOS", &base(), listed('c'))
            .expect("the same listing again is a no-op");
        let mut other_c = listed('c');
        other_c.size += 1;
        assert!(matches!(
            ch.add("macOS", &base(), other_c),
            Err(ChannelError::AlreadyListed { .. })
        ));
        let a: Letter = "a".parse().expect("letter");
        ch.withdraw("macOS", &base(), a, "broke websites")
            .expect("withdraw");
        assert!(matches!(
            ch.withdraw("macOS", &base(), a, "again"),
            Err(ChannelError::NotListed { .. })
        ));
        let release = ch.release("macOS", &base()).expect("release");
        assert_eq!(release.letters.len(), 1);
        assert_eq!(release.withdrawn[0].reason, "broke websites");
        // Another product keeps its own letters.
        ch.add("iOS", &base(), listed('a')).expect("iOS a");
        assert_eq!(ch.releases[0].product, "iOS");
    }

    #[test]
    fn signatures_count_distinct_trusted_keys() {
        let (k1, k2, k3) = (
            SecretKey::from_seed([1; 32]),
            SecretKey::from_seed([2; 32]),
            SecretKey::from_seed([3; 32]),
        );
        let mut ch = Channel::new();
        ch.add("macOS", &base(), listed('a')).expect("a");
        let signed = SignedChannel::sign(ch.clone(), 2_000_000_000, &[&k1, &k2, &k1]);
        assert_eq!(signed.signed.sequence, 1);
        assert_eq!(signed.signatures.len(), 2, "one key signs once");
        let trusted = [k1.public(), k2.public()];
        assert!(signed.verify(&trusted, 2).is_ok());
        assert_eq!(
            signed.verify(&trusted, 3),
            Err(ChannelError::BelowThreshold {
                valid: 2,
                threshold: 3
            })
        );
        assert!(signed.verify(&[k3.public()], 1).is_err(), "untrusted key");
        // A duplicated signature still counts once.
        let mut doubled = signed.clone();
        doubled.signatures.push(doubled.signatures[0].clone());
        assert!(doubled.verify(&trusted, 3).is_err());
        // Any change to the content breaks every signature.
        let mut tampered = signed.clone();
        tampered.signed.releases[0].letters[0].size += 1;
        assert!(tampered.verify(&trusted, 1).is_err());
        let mut later = signed.clone();
        later.signed.expires += 1;
        assert!(later.verify(&trusted, 1).is_err());
        // Round trip through the file format.
        let back = SignedChannel::from_bytes(&signed.to_bytes()).expect("parses");
        assert_eq!(back, signed);
        assert!(SignedChannel::from_bytes(b"{}").is_err());
    }

    #[test]
    fn expiry_is_a_duration_or_a_time_in_the_future() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_expiry("30d", now), Ok(1_800_000_000 + 30 * 86_400));
        assert_eq!(parse_expiry("12h", now), Ok(1_800_000_000 + 12 * 3600));
        assert_eq!(
            parse_expiry("2027-06-01T12:30:00Z", now).map(rfc3339),
            Ok("2027-06-01T12:30:00Z".to_owned())
        );
        assert!(matches!(
            parse_expiry("2020-01-01T00:00:00Z", now),
            Err(ChannelError::ExpiryPast(_))
        ));
        assert!(matches!(
            parse_expiry("soon", now),
            Err(ChannelError::Expiry(_))
        ));
    }
}
