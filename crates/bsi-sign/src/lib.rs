//! ed25519 keys and signatures for bsi packages.
//!
//! Private keys are PKCS#8 PEM, public keys SPKI PEM, so that `openssl` reads both. A key is
//! named by its key id: the first 8 bytes of the sha256 of the raw 32-byte public key, in hex.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

pub use ed25519_dalek::SIGNATURE_LENGTH;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is not a PKCS#8 PEM ed25519 private key")]
    NotPrivateKey { path: PathBuf },
    #[error("key file {path} is not an SPKI PEM ed25519 public key")]
    NotPublicKey { path: PathBuf },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot obtain randomness for a new key: {0}")]
    Random(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify with trusted key {key_id}")]
pub struct BadSignature {
    pub key_id: KeyId,
}

/// Text that is not an ed25519 public key in SPKI PEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an ed25519 public key in SPKI PEM")]
pub struct BadPem;

/// Short name of a public key: first 8 bytes of sha256(raw public key), hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        KeyId(hex::encode(&digest[..8]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A private key that signs packages.
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public().key_id())
    }
}

impl SecretKey {
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        rand_core::OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
        let text = read_text(path, |path| KeyError::NotPrivateKey { path })?;
        SigningKey::from_pkcs8_pem(&text)
            .map(SecretKey)
            .map_err(|_| KeyError::NotPrivateKey {
                path: path.to_owned(),
            })
    }

    pub fn to_pem(&self) -> String {
        self.0
            .to_pkcs8_pem(LineEnding::LF)
            .expect("an ed25519 key always encodes as PKCS#8")
            .to_string()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Deterministic ed25519 signature (RFC 8032) over `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LENGTH] {
        self.0.sign(message).to_bytes()
    }
}

/// A public key that a verifier trusts.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl PublicKey {
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let text = read_text(path, |path| KeyError::NotPublicKey { path })?;
        PublicKey::from_pem(&text).map_err(|BadPem| KeyError::NotPublicKey {
            path: path.to_owned(),
        })
    }

    /// Parse an SPKI PEM held in memory (a trust file carries its keys that way).
    pub fn from_pem(text: &str) -> Result<PublicKey, BadPem> {
        VerifyingKey::from_public_key_pem(text)
            .map(PublicKey)
            .map_err(|_| BadPem)
    }

    pub fn to_pem(&self) -> String {
        self.0
            .to_public_key_pem(LineEnding::LF)
            .expect("an ed25519 key always encodes as SPKI")
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.0)
    }

    /// Strict verification (rejects small-order keys and non-canonical signatures).
    pub fn verify(
        &self,
        message: &[u8],
        signature: &[u8; SIGNATURE_LENGTH],
    ) -> Result<(), BadSignature> {
        let sig = Signature::from_bytes(signature);
        self.0
            .verify_strict(message, &sig)
            .map_err(|_| BadSignature {
                key_id: self.key_id(),
            })
    }
}

/// Write a new key pair as `DIR/NAME.key.pem` (mode 0600) and `DIR/NAME.pub.pem`; refuses to
/// overwrite either.
pub fn write_keypair(
    dir: &Path,
    name: &str,
    key: &SecretKey,
) -> Result<(PathBuf, PathBuf), KeyError> {
    let secret_path = dir.join(format!("{name}.key.pem"));
    let public_path = dir.join(format!("{name}.pub.pem"));
    for path in [&secret_path, &public_path] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write_new(&secret_path, key.to_pem().as_bytes(), 0o600)?;
    write_new(&public_path, key.public().to_pem().as_bytes(), 0o644)?;
    Ok((secret_path, public_path))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let wrap = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(wrap)?;
    file.write_all(bytes).map_err(wrap)?;
    file.sync_all().map_err(wrap)
}

/// A key file is a few hundred bytes: a larger one is not a key.
const KEY_FILE_MAX: u64 = 64 << 10;

/// The text of a key file, at most [`KEY_FILE_MAX`] bytes; `not_key` for anything else.
fn read_text(path: &Path, not_key: fn(PathBuf) -> KeyError) -> Result<String, KeyError> {
    let read_error = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    open_regular(path)
        .and_then(|file| file.take(KEY_FILE_MAX + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > KEY_FILE_MAX {
        return Err(not_key(path.to_owned()));
    }
    String::from_utf8(bytes).map_err(|_| not_key(path.to_owned()))
}

/// Open a file that a user names as input (a key, a trust file, a package) for reading,
/// refusing anything but a regular file (after symlinks) with an error that says so: a device
/// such as `/dev/zero` would be read without end. The file is opened without blocking, so that
/// a FIFO is refused at once instead of waiting for a writer; reads of a regular file never
/// block on that flag.
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    match file.metadata()?.is_file() {
        true => Ok(file),
        false => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )),
    }
}

use rand_core::RngCore as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_signature() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SecretKey::from_seed([7; 32]);
        let (sk, pk) = write_keypair(dir.path(), "t", &key).expect("write");
        let loaded = SecretKey::load(&sk).expect("load secret");
        let public = PublicKey::load(&pk).expect("load public");
        assert_eq!(public, key.public());
        let sig = loaded.sign(b"hello");
        assert_eq!(sig, key.sign(b"hello"), "ed25519 is deterministic");
        public.verify(b"hello", &sig).expect("verifies");
        assert_eq!(
            public.verify(b"hellp", &sig),
            Err(BadSignature {
                key_id: public.key_id()
            })
        );
        assert!(matches!(
            write_keypair(dir.path(), "t", &key),
            Err(KeyError::Exists { .. })
        ));
        assert!(matches!(
            SecretKey::load(&pk),
            Err(KeyError::NotPrivateKey { .. })
        ));
        assert!(matches!(
            PublicKey::load(&sk),
            Err(KeyError::NotPublicKey { .. })
        ));
    }

    #[test]
    fn key_ids_differ_between_keys() {
        let a = SecretKey::from_seed([1; 32]).public().key_id();
        let b = SecretKey::from_seed([2; 32]).public().key_id();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 16);
    }

    /// What is not a key file is refused as the kind of key asked for, and a directory or a
    /// FIFO (opened without waiting for a writer) as not a regular file.
    #[test]
    fn files_that_cannot_be_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = SecretKey::from_seed([3; 32]).to_pem();
        // A valid key followed by more than a key file can hold.
        let long = dir.path().join("long.pem");
        let mut text = pem.clone().into_bytes();
        text.resize(KEY_FILE_MAX as usize + 1, b'\n');
        std::fs::write(&long, &text).expect("write");
        assert!(matches!(
            SecretKey::load(&long),
            Err(KeyError::NotPrivateKey { .. })
        ));
        let binary = dir.path().join("binary.pem");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        assert!(matches!(
            PublicKey::load(&binary),
            Err(KeyError::NotPublicKey { .. })
        ));
        assert!(matches!(
            SecretKey::load(&binary),
            Err(KeyError::NotPrivateKey { .. })
        ));

        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        for path in [dir.path(), fifo.as_path()] {
            let err = open_regular(path).expect_err("not a regular file");
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidInput,
                "{}",
                path.display()
            );
            let err = SecretKey::load(path).expect_err("not a key");
            assert!(
                err.to_string().ends_with("not a regular file"),
                "{}: {err}",
                path.display()
            );
        }
    }
}
