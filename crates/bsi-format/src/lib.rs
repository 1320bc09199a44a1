//! The bsi package format: lettered versions, validated package paths, the manifest and the
//! one-file container that carries it.
//!
//! This crate is pure: it never touches the filesystem, the clock or the network. It is what the
//! fuzzers hit, so every length is checked before it is used.
#![forbid(unsafe_code)]

mod container;
mod digest;
mod fields;
mod manifest;
mod name;
mod path;
mod stream;
mod version;

pub use container::{
    signed_bytes, write_package, ContainerError, RawPackage, HEADER_LEN, MAGIC, MAX_MANIFEST_LEN,
    SIGNATURE_LEN,
};
pub use digest::{sha256, Digest};
pub use manifest::{
    pack_manifest, unpack_manifest, BaseRelease, Component, Entry, Image, Manifest, ManifestError,
    Mtime, Operation, Packing, Payload, Source, FORMAT_VERSION,
};
pub use name::Name;
pub use path::{PathError, PkgPath};
pub use stream::EntryStore;
pub use version::{Letter, LetteredVersion, Version, VersionError};
