//! The package container. One file, read front to back:
//!
//! ```text
//! offset 0   8 bytes   magic "BSIPKG\0\x01"
//! offset 8   4 bytes   manifest length N, little-endian u32
//! offset 12  N bytes   manifest: a zstd frame of canonical JSON
//! 12+N       64 bytes  ed25519 signature over bytes 0 .. 12+N
//! 76+N       ...       payload section, exactly `payload_len` bytes as the manifest declares
//! ```
//!
//! Every byte is either signed (header, manifest) or the signature, or covered by a payload
//! digest that the signed manifest names; nothing may follow the payload section.

use std::io::{self, Write};

use crate::{sha256, Manifest, ManifestError};

pub const MAGIC: [u8; 8] = *b"BSIPKG\x00\x01";
pub const HEADER_LEN: usize = 12;
pub const SIGNATURE_LEN: usize = 64;
/// A manifest larger than this (64 MiB, about 200,000 entries) is refused before parsing.
pub const MAX_MANIFEST_LEN: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("not a bsi package (bad magic bytes)")]
    Magic,
    #[error("package is truncated: {needed} bytes needed, {actual} present")]
    Truncated { needed: u64, actual: u64 },
    #[error("manifest length {0} exceeds the limit of {MAX_MANIFEST_LEN} bytes")]
    ManifestTooLarge(u64),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("payload section is {actual} bytes but the manifest declares {declared}")]
    PayloadSection { actual: u64, declared: u64 },
    #[error("payload of {path} does not match its digest")]
    PayloadDigest { path: String },
}

/// A package split into its parts, nothing trusted yet.
#[derive(Debug, Clone, Copy)]
pub struct RawPackage<'a> {
    /// The bytes the signature covers: header and manifest.
    pub signed: &'a [u8],
    pub manifest: &'a [u8],
    pub signature: &'a [u8; SIGNATURE_LEN],
    pub payloads: &'a [u8],
}

impl<'a> RawPackage<'a> {
    /// Length of a package's head (header, manifest and signature: everything before the
    /// payload section), from its first bytes; at least [`HEADER_LEN`] of them are needed.
    pub fn head_len(start: &[u8]) -> Result<usize, ContainerError> {
        let header = start.get(..HEADER_LEN).ok_or(ContainerError::Truncated {
            needed: HEADER_LEN as u64,
            actual: start.len() as u64,
        })?;
        if header[..8] != MAGIC {
            return Err(ContainerError::Magic);
        }
        let len_bytes: [u8; 4] = header[8..12].try_into().expect("slice of 4 bytes");
        let manifest_len = u32::from_le_bytes(len_bytes) as usize;
        if manifest_len > MAX_MANIFEST_LEN {
            return Err(ContainerError::ManifestTooLarge(manifest_len as u64));
        }
        Ok(HEADER_LEN + manifest_len + SIGNATURE_LEN)
    }

    /// Split a package file (or only its head, see [`head_len`](Self::head_len)) into its
    /// parts, checking only lengths.
    pub fn split(bytes: &'a [u8]) -> Result<RawPackage<'a>, ContainerError> {
        let sig_end = RawPackage::head_len(bytes)?;
        let signed_end = sig_end - SIGNATURE_LEN;
        if bytes.len() < sig_end {
            return Err(ContainerError::Truncated {
                needed: sig_end as u64,
                actual: bytes.len() as u64,
            });
        }
        Ok(RawPackage {
            signed: &bytes[..signed_end],
            manifest: &bytes[HEADER_LEN..signed_end],
            signature: bytes[signed_end..sig_end]
                .try_into()
                .expect("slice of SIGNATURE_LEN bytes"),
            payloads: &bytes[sig_end..],
        })
    }

    /// Parse the manifest and check that the payload section is exactly what it declares and
    /// that every payload matches its digest. Call only after the signature over `signed` has
    /// been checked.
    pub fn check_after_signature(&self) -> Result<Manifest, ContainerError> {
        let manifest = self.manifest_after_signature()?;
        self.check_payloads(&manifest)?;
        Ok(manifest)
    }

    /// Check that the payload section is exactly what `manifest` (this package's, validated)
    /// declares and that every payload matches its digest.
    pub fn check_payloads(&self, manifest: &Manifest) -> Result<(), ContainerError> {
        let actual = self.payloads.len() as u64;
        if actual != manifest.payload_len {
            return Err(ContainerError::PayloadSection {
                actual,
                declared: manifest.payload_len,
            });
        }
        for entry in &manifest.entries {
            if let Some(p) = &entry.payload {
                // validate() proved the payloads are contiguous and sum to payload_len.
                let bytes = &self.payloads[p.offset as usize..(p.offset + p.len) as usize];
                if sha256(bytes) != p.sha256 {
                    return Err(ContainerError::PayloadDigest {
                        path: entry.path.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Parse and validate the manifest only, for a reader that checks the payload section as
    /// it streams it. Call only after the signature over `signed` has been checked.
    pub fn manifest_after_signature(&self) -> Result<Manifest, ContainerError> {
        Ok(Manifest::from_packed(self.manifest)?)
    }

    /// The payload bytes of an entry of a manifest checked by `check_after_signature`.
    pub fn payload(&self, payload: &crate::Payload) -> &'a [u8] {
        &self.payloads[payload.offset as usize..(payload.offset + payload.len) as usize]
    }
}

/// The bytes a signature covers for this manifest: header and manifest.
pub fn signed_bytes(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + manifest_bytes.len());
    out.extend_from_slice(&MAGIC);
    let len = u32::try_from(manifest_bytes.len()).expect("manifest length checked by caller");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(manifest_bytes);
    out
}

/// Write a package: the signed bytes from [`signed_bytes`], the signature, then the payloads in
/// manifest order.
pub fn write_package<'p>(
    mut out: impl Write,
    signed: &[u8],
    signature: &[u8; SIGNATURE_LEN],
    payloads: impl IntoIterator<Item = &'p [u8]>,
) -> io::Result<()> {
    out.write_all(signed)?;
    out.write_all(signature)?;
    for p in payloads {
        out.write_all(p)?;
    }
    out.flush()
}
