//! Trust files: which keys a device accepts for packages and for channel metadata, each role with
//! a threshold, the file itself signed by a threshold of root keys. Version N+1 replaces N only
//! when signed by thresholds of both N's and N+1's root keys (key rotation); revoked keys count
//! for nothing; one key counts once however many times it signed.

use std::collections::{BTreeMap, BTreeSet};

use bsi_sign::{KeyId, PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::ChannelSignature;

/// Format of trust files.
pub const TRUST_FORMAT: u32 = 1;

/// The keys of one role and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub keys: Vec<String>,
    pub threshold: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Sign trust files.
    pub root: Role,
    /// Sign packages (a package carries one signature, so its threshold is 1).
    pub packages: Role,
    /// Sign channel metadata.
    pub channel: Role,
}

/// The signed content of a trust file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    pub format: u32,
    /// 1 for the first; each rotation adds one.
    pub version: u64,
    /// Key id -> SPKI PEM.
    pub keys: BTreeMap<String, String>,
    pub roles: Roles,
    /// Key ids that count for nothing, in this version and every later one that keeps them.
    pub revoked: Vec<String>,
}

/// A trust file: content and signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTrust {
    pub signed: Trust,
    pub signatures: Vec<ChannelSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("trust file is not valid: {0}")]
    Malformed(String),
    #[error("trust format {0} is not {TRUST_FORMAT}")]
    Format(u32),
    #[error("key {0} of the trust file is not an ed25519 SPKI PEM, or its id does not match it")]
    BadKey(String),
    #[error("role {role} names key {key}, which the trust file does not hold")]
    UnknownKey { role: &'static str, key: String },
    #[error("role {role} needs {threshold} signatures but has {keys} usable key(s)")]
    Unreachable {
        role: &'static str,
        threshold: usize,
        keys: usize,
    },
    #[error("packages carry one signature: the packages role's threshold must be 1, not {0}")]
    PackageThreshold(usize),
    #[error("trust file version {version} carries {valid} valid signature(s) from the root keys of version {by}; {threshold} are needed")]
    BelowThreshold {
        version: u64,
        by: u64,
        valid: usize,
        threshold: usize,
    },
    #[error("trust file version {new} cannot follow version {old}; only {next} can")]
    Version { old: u64, new: u64, next: u64 },
}

impl Trust {
    /// The usable public keys of `role` (revoked ones left out).
    pub fn role_keys(&self, role: &Role) -> Vec<PublicKey> {
        role.keys
            .iter()
            .filter(|id| !self.revoked.contains(id))
            .filter_map(|id| self.keys.get(id))
            .filter_map(|pem| PublicKey::from_pem(pem).ok())
            .collect()
    }

    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a trust file always serialises")
    }

    /// Structure: every key parses and matches its id, every role names held keys and can
    /// reach its threshold without revoked keys, packages need one signature.
    pub fn check(&self) -> Result<(), TrustError> {
        if self.format != TRUST_FORMAT {
            return Err(TrustError::Format(self.format));
        }
        for (id, pem) in &self.keys {
            match PublicKey::from_pem(pem) {
                Ok(key) if key.key_id().as_str() == id => {}
                _ => return Err(TrustError::BadKey(id.clone())),
            }
        }
        for (name, role) in [
            ("root", &self.roles.root),
            ("packages", &self.roles.packages),
            ("channel", &self.roles.channel),
        ] {
            if let Some(key) = role.keys.iter().find(|k| !self.keys.contains_key(*k)) {
                return Err(TrustError::UnknownKey {
                    role: name,
                    key: key.clone(),
                });
            }
            let usable: BTreeSet<&String> = role
                .keys
                .iter()
                .filter(|k| !self.revoked.contains(k))
                .collect();
            if role.threshold == 0 || role.threshold > usable.len() {
                return Err(TrustError::Unreachable {
                    role: name,
                    threshold: role.threshold,
                    keys: usable.len(),
                });
            }
        }
        if self.roles.packages.threshold != 1 {
            return Err(TrustError::PackageThreshold(self.roles.packages.threshold));
        }
        Ok(())
    }
}

/// Distinct keys among `keys` with a valid signature over `bytes` in `signatures`.
pub(crate) fn count_valid(
    bytes: &[u8],
    signatures: &[ChannelSignature],
    keys: &[PublicKey],
) -> usize {
    let mut valid: BTreeSet<KeyId> = BTreeSet::new();
    for signature in signatures {
        let Some(key) = keys
            .iter()
            .find(|k| k.key_id().as_str() == signature.key_id)
        else {
            continue;
        };
        let sig = hex::decode(&signature.sig)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s.as_slice()).ok());
        if sig.is_some_and(|sig| key.verify(bytes, &sig).is_ok()) {
            valid.insert(key.key_id());
        }
    }
    valid.len()
}

impl SignedTrust {
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedTrust, TrustError> {
        let trust: SignedTrust =
            serde_json::from_slice(bytes).map_err(|e| TrustError::Malformed(e.to_string()))?;
        trust.signed.check()?;
        Ok(trust)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a trust file always serialises");
        bytes.push(b'\n');
        bytes
    }

    /// Sign `trust` with `keys` (root keys of this version, and of the previous one for a
    /// rotation).
    pub fn sign(trust: Trust, keys: &[&SecretKey]) -> SignedTrust {
        let signatures = crate::sign_all(&trust.canonical_bytes(), keys);
        SignedTrust {
            signed: trust,
            signatures,
        }
    }

    fn signed_by(&self, by: &Trust) -> Result<(), TrustError> {
        let keys = by.role_keys(&by.roles.root);
        let valid = count_valid(&self.signed.canonical_bytes(), &self.signatures, &keys);
        if valid < by.roles.root.threshold {
            return Err(TrustError::BelowThreshold {
                version: self.signed.version,
                by: by.version,
                valid,
                threshold: by.roles.root.threshold,
            });
        }
        Ok(())
    }

    /// A first trust file (shipped with the device): signed by a threshold of its own root keys.
    pub fn verify_initial(&self) -> Result<&Trust, TrustError> {
        self.signed.check()?;
        self.signed_by(&self.signed)?;
        Ok(&self.signed)
    }

    /// This file as the successor of `current`: the next version, signed by thresholds of both
    /// `current`'s and its own root keys.
    pub fn verify_rotation(&self, current: &Trust) -> Result<&Trust, TrustError> {
        self.signed.check()?;
        if self.signed.version != current.version + 1 {
            return Err(TrustError::Version {
                old: current.version,
                new: self.signed.version,
                next: current.version + 1,
            });
        }
        self.signed_by(current)?;
        self.signed_by(&self.signed)?;
        Ok(&self.signed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn id(k: &SecretKey) -> String {
        k.public().key_id().to_string()
    }

    fn trust(version: u64, root: &[&SecretKey], threshold: usize, others: &[&SecretKey]) -> Trust {
        let mut keys = BTreeMap::new();
        for k in root.iter().chain(others) {
            keys.insert(id(k), k.public().to_pem());
        }
        Trust {
            format: TRUST_FORMAT,
            version,
            keys,
            roles: Roles {
                root: Role {
                    keys: root.iter().map(|k| id(k)).collect(),
                    threshold,
                },
                packages: Role {
                    keys: others.iter().map(|k| id(k)).collect(),
                    threshold: 1,
                },
                channel: Role {
                    keys: others.iter().map(|k| id(k)).collect(),
                    threshold: 1,
                },
            },
            revoked: Vec::new(),
        }
    }

    #[test]
    fn a_first_trust_file_needs_a_threshold_of_its_own_root_keys() {
        let (r1, r2, r3, p) = (key(1), key(2), key(3), key(9));
        let t = trust(1, &[&r1, &r2, &r3], 2, &[&p]);
        assert!(SignedTrust::sign(t.clone(), &[&r1, &r2])
            .verify_initial()
            .is_ok());
        let one = SignedTrust::sign(t.clone(), &[&r1]);
        assert!(matches!(
            one.verify_initial(),
            Err(TrustError::BelowThreshold {
                valid: 1,
                threshold: 2,
                ..
            })
        ));
        // The same key twice counts once; a non-root key counts for nothing.
        let mut twice = SignedTrust::sign(t.clone(), &[&r1]);
        twice.signatures.push(twice.signatures[0].clone());
        assert!(twice.verify_initial().is_err());
        assert!(SignedTrust::sign(t.clone(), &[&r1, &p])
            .verify_initial()
            .is_err());
        // A revoked root key counts for nothing.
        let mut revoked = t.clone();
        revoked.revoked.push(id(&r2));
        assert!(SignedTrust::sign(revoked, &[&r1, &r2])
            .verify_initial()
            .is_err());
        // Round trip, and tampering.
        let good = SignedTrust::sign(t, &[&r1, &r2]);
        assert_eq!(
            SignedTrust::from_bytes(&good.to_bytes()).as_ref(),
            Ok(&good)
        );
        let mut tampered = good.clone();
        tampered.signed.roles.channel.threshold = 1;
        tampered.signed.version = 7;
        assert!(tampered.verify_initial().is_err());
    }

    #[test]
    fn rotation_needs_the_old_and_the_new_root_keys() {
        let (a, b, c, p) = (key(1), key(2), key(3), key(9));
        let v1 = trust(1, &[&a, &b], 1, &[&p]);
        // Version 2 moves the root from {a, b} to {c}.
        let v2 = trust(2, &[&c], 1, &[&p]);
        assert!(SignedTrust::sign(v2.clone(), &[&a, &c])
            .verify_rotation(&v1)
            .is_ok());
        assert!(
            SignedTrust::sign(v2.clone(), &[&c])
                .verify_rotation(&v1)
                .is_err(),
            "new keys alone"
        );
        assert!(
            SignedTrust::sign(v2.clone(), &[&a])
                .verify_rotation(&v1)
                .is_err(),
            "old keys alone"
        );
        let v3 = trust(3, &[&c], 1, &[&p]);
        assert!(matches!(
            SignedTrust::sign(v3, &[&a, &c]).verify_rotation(&v1),
            Err(TrustError::Version { next: 2, .. })
        ));
        // Revoking the old key in v1's successor: it still had to sign as v1's root.
        let mut v2r = v2;
        v2r.revoked.push(id(&a));
        assert!(SignedTrust::sign(v2r, &[&a, &c])
            .verify_rotation(&v1)
            .is_ok());
    }

    #[test]
    fn structure_is_checked() {
        let (r, p) = (key(1), key(9));
        let mut t = trust(1, &[&r], 2, &[&p]);
        assert!(matches!(
            t.check(),
            Err(TrustError::Unreachable { role: "root", .. })
        ));
        t.roles.root.threshold = 1;
        t.roles.packages.keys.push("0123456789abcdef".into());
        assert!(matches!(
            t.check(),
            Err(TrustError::UnknownKey {
                role: "packages",
                ..
            })
        ));
        t.roles.packages.keys.pop();
        t.roles.packages.threshold = 2;
        t.roles.packages.keys.push(id(&r));
        assert!(matches!(t.check(), Err(TrustError::PackageThreshold(2))));
        t.roles.packages.threshold = 1;
        t.keys.insert(id(&p), r.public().to_pem());
        assert!(matches!(t.check(), Err(TrustError::BadKey(_))));
    }
}
