//! Opening a package (signature first, then structure) and proving it against a tree.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use bsi_format::{
    ContainerError, Digest, Entry, Image, Manifest, Operation, PkgPath, RawPackage, Source,
};
use bsi_sign::{BadSignature, PublicKey};

use crate::tree::{image_mismatch, observe, ScanError};
use crate::{FsContext, FsError};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Read(#[from] FsError),
    #[error("{path}: {source}")]
    Container {
        path: PathBuf,
        source: ContainerError,
    },
    #[error("{path}: {source}; the package was not signed by that key or was altered")]
    Signature { path: PathBuf, source: BadSignature },
    #[error("{path}: manifest names signer {named} but it verifies with key {trusted}")]
    Signer {
        path: PathBuf,
        named: String,
        trusted: String,
    },
}

/// Among `keys`, the one to verify package `bytes` with: the key whose id the (not yet verified)
/// manifest names as signer, else the first. The signature check decides; this only picks.
pub fn signer_key<'k>(bytes: &[u8], keys: &'k [PublicKey]) -> Option<&'k PublicKey> {
    let named = RawPackage::split(bytes)
        .ok()
        .and_then(|raw| Manifest::from_packed(raw.manifest).ok())
        .map(|m| m.signer);
    keys.iter()
        .find(|k| named.as_deref() == Some(k.key_id().as_str()))
        .or(keys.first())
}

/// A package whose signature and payload digests have been checked. It owns the bytes it was
/// checked on, so that what is used is exactly what was verified, whatever happens to the file.
#[derive(Debug)]
pub struct VerifiedPackage {
    bytes: Vec<u8>,
    pub manifest: Manifest,
    /// sha256 of the whole package file.
    pub digest: Digest,
    /// Where it was read from, for messages.
    pub path: PathBuf,
}

impl VerifiedPackage {
    /// Read `path` once and verify it with `trust`.
    pub fn open(path: &Path, trust: &PublicKey) -> Result<VerifiedPackage, OpenError> {
        let bytes = std::fs::read(path).fs("read package", path)?;
        VerifiedPackage::from_bytes(bytes, trust, path)
    }

    /// Verify package bytes: signature over the header and manifest first, then the manifest's
    /// structure, then every payload digest.
    pub fn from_bytes(
        bytes: Vec<u8>,
        trust: &PublicKey,
        path: &Path,
    ) -> Result<VerifiedPackage, OpenError> {
        let container = |source| OpenError::Container {
            path: path.to_owned(),
            source,
        };
        let raw = RawPackage::split(&bytes).map_err(container)?;
        trust
            .verify(raw.signed, raw.signature)
            .map_err(|source| OpenError::Signature {
                path: path.to_owned(),
                source,
            })?;
        let manifest = raw.check_after_signature().map_err(container)?;
        let trusted = trust.key_id().to_string();
        if manifest.signer != trusted {
            return Err(OpenError::Signer {
                path: path.to_owned(),
                named: manifest.signer,
                trusted,
            });
        }
        let digest = bsi_format::sha256(&bytes);
        Ok(VerifiedPackage {
            bytes,
            manifest,
            digest,
            path: path.to_owned(),
        })
    }

    /// The payload bytes of one of this package's entries.
    pub fn payload(&self, entry: &Entry) -> Option<&[u8]> {
        let raw =
            RawPackage::split(&self.bytes).expect("split succeeded when the package was opened");
        entry.payload.as_ref().map(|p| raw.payload(p))
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// `product version (letter)` as a person reads it.
    pub fn title(&self) -> String {
        format!(
            "{} {} ({})",
            self.manifest.product, self.manifest.base.version, self.manifest.letter
        )
    }

    /// Rebuild the post-image bytes of a file entry from the reference bytes (`old`, for a
    /// delta) and check them against the post-image digest and size.
    pub fn decode(&self, entry: &Entry, old: Option<&[u8]>) -> Result<Vec<u8>, DecodeFailure> {
        let mut out = Vec::new();
        self.decode_into(entry, old, &mut out)?;
        Ok(out)
    }

    /// Like [`decode`](Self::decode), writing the bytes to `out` as they are produced; the
    /// digest is checked when the last byte is written, so `out` must be discarded on error.
    pub fn decode_into(
        &self,
        entry: &Entry,
        old: Option<&[u8]>,
        out: &mut dyn Write,
    ) -> Result<(), DecodeFailure> {
        let fail = |reason: String| DecodeFailure {
            path: entry.path.clone(),
            reason,
        };
        let (Some(Image::File { sha256, size, .. }), Some(payload)) =
            (&entry.post, self.payload(entry))
        else {
            return Err(fail("entry carries no file payload".to_owned()));
        };
        let mut hashing = HashingWriter::new(out);
        match &entry.op {
            Operation::Delta { encoder, .. } => {
                let old = old.ok_or_else(|| fail("delta has no reference bytes".to_owned()))?;
                bsi_delta::delta_encoder(encoder)
                    .and_then(|e| e.decode_into(old, payload, *size, &mut hashing))
                    .map_err(|e| fail(e.to_string()))?
            }
            _ => bsi_delta::decompress_into(payload, *size, &mut hashing)
                .map_err(|e| fail(e.to_string()))?,
        };
        if hashing.digest() != *sha256 {
            return Err(fail(
                "decoded bytes do not match the post-image sha256".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Passes bytes through and hashes them.
pub(crate) struct HashingWriter<'w> {
    pub inner: &'w mut dyn Write,
    pub hasher: Sha256,
}

impl<'w> HashingWriter<'w> {
    pub fn new(inner: &'w mut dyn Write) -> HashingWriter<'w> {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
        }
    }

    pub fn digest(self) -> Digest {
        Digest(self.hasher.finalize().into())
    }
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A payload that does not rebuild its post-image.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct DecodeFailure {
    pub path: PkgPath,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeVerifyError {
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{tree}: {path} is not the package's pre-image: {reason}")]
    PreImage {
        tree: PathBuf,
        path: PkgPath,
        reason: String,
    },
    #[error("{tree}: payload of {0} does not rebuild its post-image: {1}", .failure.path, .failure.reason)]
    Decode {
        tree: PathBuf,
        failure: DecodeFailure,
    },
}

/// Prove offline that `pkg` turns the tree at `root` into its target: every pre-image matches
/// and every payload decodes against it to the post-image. Writes nothing. Returns the number of
/// payloads decoded.
pub fn verify_against_tree(pkg: &VerifiedPackage, root: &Path) -> Result<usize, TreeVerifyError> {
    if !root.is_dir() {
        return Err(TreeVerifyError::NotADirectory(root.to_owned()));
    }
    for entry in &pkg.manifest.entries {
        let image = observe(root, &entry.path)?;
        if let Some(reason) = image_mismatch(entry.pre.as_ref(), image.as_ref()) {
            return Err(TreeVerifyError::PreImage {
                tree: root.to_owned(),
                path: entry.path.clone(),
                reason,
            });
        }
    }
    let mut decoded = 0;
    for entry in pkg.manifest.entries.iter().filter(|e| e.payload.is_some()) {
        let old = match reference(entry) {
            Some((path, source)) => {
                if let Some(src) = source {
                    let image = observe(root, &src.path)?;
                    if !source_matches(src, image.as_ref()) {
                        return Err(TreeVerifyError::PreImage {
                            tree: root.to_owned(),
                            path: src.path.clone(),
                            reason: format!(
                                "it is not the source of {} the package names",
                                entry.path
                            ),
                        });
                    }
                }
                let full = root.join(path.as_str());
                Some(
                    std::fs::read(&full)
                        .fs("read", &full)
                        .map_err(ScanError::from)?,
                )
            }
            None => None,
        };
        pkg.decode_into(entry, old.as_deref(), &mut std::io::sink())
            .map_err(|failure| TreeVerifyError::Decode {
                tree: root.to_owned(),
                failure,
            })?;
        decoded += 1;
    }
    Ok(decoded)
}

/// The path whose old bytes a delta entry is decoded against, and its source record when that
/// is not the entry's own pre-image. `None` for entries that are not deltas.
pub(crate) fn reference(entry: &Entry) -> Option<(&PkgPath, Option<&Source>)> {
    match &entry.op {
        Operation::Delta {
            source: Some(src), ..
        } => Some((&src.path, Some(src))),
        Operation::Delta { source: None, .. } => Some((&entry.path, None)),
        _ => None,
    }
}

/// True when `image` is the file a delta's source record names.
pub(crate) fn source_matches(src: &Source, image: Option<&Image>) -> bool {
    matches!(image, Some(Image::File { sha256, size, .. }) if *sha256 == src.sha256 && *size == src.size)
}
