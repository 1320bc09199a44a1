//! Opening a package (signature first, then structure) and proving it against a tree.

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use bsi_format::{
    ContainerError, Digest, Entry, EntryStore, Image, Manifest, Operation, PkgPath, RawPackage,
    Source, HEADER_LEN,
};
use bsi_sign::{BadSignature, PublicKey};

use crate::entries::{Entries, HELD};
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
    #[error("{path}: no package key is trusted")]
    NoKey { path: PathBuf },
    #[error("{path}: manifest names signer {named} but it verifies with key {trusted}")]
    Signer {
        path: PathBuf,
        named: String,
        trusted: String,
    },
}

/// Check the signature over a package's head with `trust`, then its manifest's structure (its
/// entries put into `entries`) and that it names `trust` as its signer.
fn check_head<S: EntryStore + serde::Serialize>(
    raw: &RawPackage<'_>,
    trust: &PublicKey,
    path: &Path,
    entries: S,
) -> Result<Manifest<S>, OpenError> {
    trust
        .verify(raw.signed, raw.signature)
        .map_err(|source| OpenError::Signature {
            path: path.to_owned(),
            source,
        })?;
    let manifest =
        Manifest::from_packed_into(raw.manifest, entries).map_err(|e| OpenError::Container {
            path: path.to_owned(),
            source: ContainerError::Manifest(e),
        })?;
    let trusted = trust.key_id().to_string();
    if manifest.signer != trusted {
        return Err(OpenError::Signer {
            path: path.to_owned(),
            named: manifest.signer,
            trusted,
        });
    }
    Ok(manifest)
}

/// Among `keys`, the one to verify package `bytes` with: the key whose id the (not yet verified)
/// manifest names as signer, else the first. The signature check decides; this only picks.
pub fn signer_key<'k>(bytes: &[u8], keys: &'k [PublicKey]) -> Option<&'k PublicKey> {
    // One key is the one whatever the manifest names (reading the signer unpacks and scans the
    // whole manifest: 20 MB for a tree of 50,250 changed entries).
    if let [only] = keys {
        return Some(only);
    }
    let named = RawPackage::split(bytes)
        .ok()
        .and_then(|raw| Manifest::signer_of_packed(raw.manifest));
    keys.iter()
        .find(|k| named.as_deref() == Some(k.key_id().as_str()))
        .or(keys.first())
}

/// A package whose signature and payload digests have been checked. What is used is exactly
/// what was verified, whatever happens to the file: bytes verified in memory are kept, and a
/// package opened from a file is read again one payload at a time, each checked against its
/// digest in the signed manifest before use, so that memory follows the largest payload
/// rather than the package.
#[derive(Debug)]
pub struct VerifiedPackage {
    section: Section,
    len: u64,
    /// Its entries held, or kept aside when they are many (see [`Entries`]).
    pub manifest: Manifest<Entries>,
    /// sha256 of the whole package file.
    pub digest: Digest,
    /// Where it was read from, for messages.
    pub path: PathBuf,
}

/// Where the payload section of a verified package is.
#[derive(Debug)]
enum Section {
    /// In these package bytes, from this offset.
    Memory(Vec<u8>, usize),
    /// In this open file (the package, or a private copy of its payload section), from this
    /// offset.
    File(File, u64),
}

/// A new file in `dir` that has no name (`O_TMPFILE`), readable and writable by this process
/// only; `None` when the filesystem cannot make one.
pub(crate) fn unnamed_file(dir: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::TMPFILE.bits() as i32)
        .open(dir);
    match opened {
        Ok(file) => Ok(Some(file)),
        Err(e) if matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::OPNOTSUPP.raw_os_error() || code == rustix::io::Errno::ISDIR.raw_os_error()) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Bytes read at a time while a package file is verified.
const READ_CHUNK: usize = 1 << 20;

impl VerifiedPackage {
    /// Verify the package file at `path` with the key of `keys` its manifest names (see
    /// [`signer_key`]), reading it once in chunks: head and signature first, then the
    /// manifest, then the payload section against the manifest's length and digests. Payloads
    /// are read from the file again when used; should it change meanwhile, they fail their
    /// digest check (see [`open_private`](Self::open_private) for a copy that cannot change).
    pub fn open(path: &Path, keys: &[PublicKey]) -> Result<VerifiedPackage, OpenError> {
        VerifiedPackage::open_with(path, keys, None)
    }

    /// [`open`](Self::open), copying the payload section as it is verified into a private,
    /// unnamed file in `dir` (on the device, the state directory or the root), from which
    /// payloads are read when used: whatever happens to the package file afterwards, apply goes
    /// on with exactly what was verified, in memory bounded by the largest payload. The file
    /// has no name at any instant, so nothing is left behind, even by a crash; on a filesystem
    /// that cannot make one, this is [`open`](Self::open).
    pub fn open_private(
        path: &Path,
        keys: &[PublicKey],
        dir: &Path,
    ) -> Result<VerifiedPackage, OpenError> {
        VerifiedPackage::open_with(path, keys, Some(dir))
    }

    fn open_with(
        path: &Path,
        keys: &[PublicKey],
        private_in: Option<&Path>,
    ) -> Result<VerifiedPackage, OpenError> {
        let container = |source| OpenError::Container {
            path: path.to_owned(),
            source,
        };
        let read = |e| FsError::new("read package", path, e);
        let mut file = bsi_sign::open_regular(path).map_err(read)?;
        let file_len = file.metadata().map_err(read)?.len();
        let mut head = vec![0; HEADER_LEN.min(file_len as usize)];
        file.read_exact(&mut head).map_err(read)?;
        let head_len = RawPackage::head_len(&head).map_err(container)?;
        if file_len < head_len as u64 {
            return Err(container(ContainerError::Truncated {
                needed: head_len as u64,
                actual: file_len,
            }));
        }
        head.resize(head_len, 0);
        file.read_exact(&mut head[HEADER_LEN..]).map_err(read)?;
        let key = signer_key(&head, keys).ok_or_else(|| OpenError::NoKey {
            path: path.to_owned(),
        })?;
        let raw = RawPackage::split(&head).map_err(container)?;
        let manifest = check_head(&raw, key, path, Entries::new(path, private_in))?;
        let declared = manifest.payload_len;
        let actual = file_len - head_len as u64;
        if actual != declared {
            return Err(container(ContainerError::PayloadSection {
                actual,
                declared,
            }));
        }
        let mut whole = Sha256::new();
        whole.update(&head);
        let mut copy = match private_in {
            Some(dir) => unnamed_file(dir).fs("create a private copy of a package in", dir)?,
            None => None,
        };
        let mut chunk = vec![0; READ_CHUNK];
        let mut done = 0u64;
        // validate() proved the payloads contiguous in the entries' order, covering the whole
        // section.
        let entries = &manifest.entries;
        entries.walk(0..entries.len(), HELD, &mut |_, block| {
            for entry in block {
                let Some(payload) = &entry.payload else {
                    continue;
                };
                let mut hasher = Sha256::new();
                let mut left = payload.len;
                while left > 0 {
                    let want = left.min(READ_CHUNK as u64) as usize;
                    let got = file.read(&mut chunk[..want]).map_err(read)?;
                    if got == 0 {
                        // The file shrank since its length was taken.
                        return Err(container(ContainerError::PayloadSection {
                            actual: done,
                            declared,
                        }));
                    }
                    hasher.update(&chunk[..got]);
                    whole.update(&chunk[..got]);
                    if let (Some(copy), Some(dir)) = (&mut copy, private_in) {
                        copy.write_all(&chunk[..got])
                            .fs("write a private copy of a package in", dir)?;
                    }
                    left -= got as u64;
                    done += got as u64;
                }
                if Digest(hasher.finalize().into()) != payload.sha256 {
                    return Err(container(ContainerError::PayloadDigest {
                        path: entry.path.to_string(),
                    }));
                }
            }
            Ok(())
        })?;
        if file.read(&mut chunk[..1]).map_err(read)? != 0 {
            // The file grew since its length was taken.
            return Err(container(ContainerError::PayloadSection {
                actual: done + 1,
                declared,
            }));
        }
        let section = match copy {
            Some(copy) => Section::File(copy, 0),
            None => Section::File(file, head_len as u64),
        };
        Ok(VerifiedPackage {
            section,
            len: file_len,
            manifest,
            digest: Digest(whole.finalize().into()),
            path: path.to_owned(),
        })
    }

    /// Verify package bytes: signature over the header and manifest first, then the manifest's
    /// structure, then every payload digest.
    pub fn from_bytes(
        bytes: Vec<u8>,
        trust: &PublicKey,
        path: &Path,
    ) -> Result<VerifiedPackage, OpenError> {
        VerifiedPackage::from_bytes_into(bytes, trust, path, Entries::new(path, None))
    }

    /// [`from_bytes`](Self::from_bytes), its entries past the first `hold` kept aside in `dir`,
    /// as those of a package of many entries are: for testing that with small packages.
    #[doc(hidden)]
    pub fn from_bytes_keeping_aside(
        bytes: Vec<u8>,
        trust: &PublicKey,
        path: &Path,
        hold: usize,
        dir: &Path,
    ) -> Result<VerifiedPackage, OpenError> {
        let entries = Entries::holding(hold, path, Some(dir));
        VerifiedPackage::from_bytes_into(bytes, trust, path, entries)
    }

    fn from_bytes_into(
        bytes: Vec<u8>,
        trust: &PublicKey,
        path: &Path,
        entries: Entries,
    ) -> Result<VerifiedPackage, OpenError> {
        let container = |source| OpenError::Container {
            path: path.to_owned(),
            source,
        };
        let raw = RawPackage::split(&bytes).map_err(container)?;
        let manifest = check_head(&raw, trust, path, entries)?;
        let actual = raw.payloads.len() as u64;
        if actual != manifest.payload_len {
            return Err(container(ContainerError::PayloadSection {
                actual,
                declared: manifest.payload_len,
            }));
        }
        let entries = &manifest.entries;
        entries.walk(0..entries.len(), HELD, &mut |_, block| {
            // validate() proved the payloads lie inside the section.
            for entry in block {
                let Some(payload) = &entry.payload else {
                    continue;
                };
                if bsi_format::sha256(raw.payload(payload)) != payload.sha256 {
                    return Err(container(ContainerError::PayloadDigest {
                        path: entry.path.to_string(),
                    }));
                }
            }
            Ok(())
        })?;
        let head_len = bytes.len() - raw.payloads.len();
        let digest = bsi_format::sha256(&bytes);
        Ok(VerifiedPackage {
            len: bytes.len() as u64,
            section: Section::Memory(bytes, head_len),
            manifest,
            digest,
            path: path.to_owned(),
        })
    }

    /// The payload bytes of one of this package's entries (`None` when it carries none),
    /// read from the package file and checked against the digest verified at opening.
    pub fn payload(&self, entry: &Entry) -> Result<Option<Cow<'_, [u8]>>, DecodeFailure> {
        let Some(payload) = &entry.payload else {
            return Ok(None);
        };
        // validate() and opening proved the range lies inside the section.
        match &self.section {
            Section::Memory(bytes, start) => {
                let from = start + payload.offset as usize;
                Ok(Some(Cow::Borrowed(
                    &bytes[from..from + payload.len as usize],
                )))
            }
            Section::File(file, start) => {
                let mut stream = PayloadStream::new(file, start + payload.offset, payload.len);
                let mut bytes = Vec::with_capacity(payload.len as usize);
                // A failed read stays in the stream, and `finish` names it.
                let _ = stream.read_to_end(&mut bytes);
                stream.finish(payload.sha256).map_err(|why| DecodeFailure {
                    path: entry.path.clone(),
                    reason: why.describe(&self.path),
                })?;
                Ok(Some(Cow::Owned(bytes)))
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// [`decode_into`](Self::decode_into) for a `blocks` delta, reading its base from `old`
    /// (`old_len` bytes, the verified pre-image's size) where the payload copies from it.
    pub(crate) fn decode_file_into(
        &self,
        entry: &Entry,
        old: &std::fs::File,
        old_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), InPlaceFailure> {
        let fail = |reason: &str| {
            InPlaceFailure::Payload(DecodeFailure {
                path: entry.path.clone(),
                reason: reason.to_owned(),
            })
        };
        let Some(Image::File { sha256, size, .. }) = &entry.post else {
            return Err(fail("entry carries no file payload"));
        };
        if !matches!(&entry.op, Operation::Delta { encoder, .. } if encoder == "blocks") {
            return Err(fail("only a blocks delta reads its base in place"));
        }
        let payload = self
            .payload(entry)
            .map_err(InPlaceFailure::Payload)?
            .ok_or_else(|| fail("entry carries no file payload"))?;
        let (decoded, digest) = hashed_writing(out, *size, |hashing| {
            bsi_delta::Blocks.decode_file_into(old, old_len, &payload, *size, hashing)
        });
        match decoded {
            Ok(()) => {}
            Err(bsi_delta::DecodeError::Input(e)) => return Err(InPlaceFailure::Base(e)),
            Err(e) => return Err(fail(&e.to_string())),
        }
        if digest != *sha256 {
            return Err(fail("decoded bytes do not match the post-image sha256"));
        }
        Ok(())
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
        let (Some(Image::File { sha256, size, .. }), Some(payload)) = (&entry.post, &entry.payload)
        else {
            return Err(fail("entry carries no file payload".to_owned()));
        };
        let encoder = |name: &str| bsi_delta::delta_encoder(name).map_err(|e| fail(e.to_string()));
        let delta = match &entry.op {
            Operation::Delta { encoder: name, .. } => Some((
                encoder(name)?,
                old.ok_or_else(|| fail("delta has no reference bytes".to_owned()))?,
            )),
            // An add's or a replace's payload by an encoder is against the empty file.
            op => match op.plain_encoder() {
                Some(name) => Some((encoder(name)?, &[][..])),
                None => None,
            },
        };
        let (decoded, digest) = hashed_writing(out, *size, |hashing| match &self.section {
            // validate() and opening proved the range lies inside the section.
            Section::Memory(bytes, start) => {
                let from = start + payload.offset as usize;
                let bytes = &bytes[from..from + payload.len as usize];
                Ok(match delta {
                    Some((encoder, old)) => encoder.decode_into(old, bytes, *size, hashing),
                    None => bsi_delta::decompress_into(bytes, *size, hashing),
                })
            }
            // Read as it is decoded, so that a 45 MiB payload is not held whole where its
            // encoder streams; whether the bytes were the verified ones is known at the end.
            Section::File(file, start) => {
                let mut stream = PayloadStream::new(file, start + payload.offset, payload.len);
                let decoded = match delta {
                    Some((encoder, old)) => {
                        encoder.decode_stream_into(old, &mut stream, payload.len, *size, hashing)
                    }
                    None => bsi_delta::decompress_stream_into(&mut stream, *size, hashing),
                };
                // Whatever the decoder made of them, bytes other than the verified ones are
                // the reason to give.
                stream
                    .finish(payload.sha256)
                    .map_err(|why| fail(why.describe(&self.path)))?;
                Ok(decoded)
            }
        });
        decoded?.map_err(|e| fail(e.to_string()))?;
        if digest != *sha256 {
            return Err(fail(
                "decoded bytes do not match the post-image sha256".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Size of a post-image from which [`hashed_writing`] hashes it on a thread of its own.
const HASHED_BESIDE_FROM: u64 = 1 << 20;

/// Bytes of a post-image handed to its hashing thread at a time.
const HASH_CHUNK: usize = 256 << 10;

/// Chunks that wait for the hashing thread. With the one it hashes, the one being filled and
/// one waiting to be sent, at most five chunks (1.25 MiB) exist at once; hashed ones come
/// back to be filled again.
const HASH_QUEUE: usize = 2;

/// `write` to a writer that passes its bytes to `out` and hashes them, with the digest of all
/// the bytes it passed. From [`HASHED_BESIDE_FROM`] bytes (`size`, the post-image's) the
/// hashing runs on a thread of its own, in chunks, so that it leaves the decoding's chain for
/// a core that is free: the `cryptography` wheel's library is decoded slice by slice, and its
/// last 8.2 MB, decoded beside the first slice, were hashed (5 ms) after the first slice was
/// written, with the other core idle.
pub(crate) fn hashed_writing<T>(
    out: &mut dyn Write,
    size: u64,
    write: impl FnOnce(&mut dyn Write) -> T,
) -> (T, Digest) {
    if size < HASHED_BESIDE_FROM {
        return hashed_inline(out, write);
    }
    std::thread::scope(|scope| {
        let (full, to_hash) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE);
        let (empty, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE + 3);
        let hashing = std::thread::Builder::new().spawn_scoped(scope, move || {
            let mut hasher = Sha256::new();
            for chunk in to_hash {
                hasher.update(&chunk);
                // The writer may be gone (it failed); the chunk is then dropped.
                let _ = empty.try_send(chunk);
            }
            Digest(hasher.finalize().into())
        });
        // Without a thread, the hashing goes along with the writing.
        let Ok(hashing) = hashing else {
            return hashed_inline(out, write);
        };
        let mut writer = HandingOff {
            inner: out,
            chunk: Vec::with_capacity(HASH_CHUNK),
            full: Some(full),
            spare,
        };
        let written = write(&mut writer);
        writer.hand_off();
        // Closing the channel ends the hashing.
        drop(writer);
        let digest = hashing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (written, digest)
    })
}

/// [`hashed_writing`] on this thread.
fn hashed_inline<T>(out: &mut dyn Write, write: impl FnOnce(&mut dyn Write) -> T) -> (T, Digest) {
    let mut hashing = HashingWriter::new(out);
    let written = write(&mut hashing);
    (written, hashing.digest())
}

/// Passes bytes through to `inner` and copies them, a chunk at a time, to a hashing thread,
/// reusing the chunks it hashed.
struct HandingOff<'w> {
    inner: &'w mut dyn Write,
    chunk: Vec<u8>,
    full: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl HandingOff<'_> {
    /// Send the chunk gathered so far to be hashed, and start another.
    fn hand_off(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let next = match self.spare.try_recv() {
            Ok(mut spare) => {
                spare.clear();
                spare
            }
            Err(_) => Vec::with_capacity(HASH_CHUNK),
        };
        let chunk = std::mem::replace(&mut self.chunk, next);
        if let Some(full) = &self.full {
            // Only a hashing thread that panicked is gone: its join says so.
            if full.send(chunk).is_err() {
                self.full = None;
            }
        }
    }
}

impl Write for HandingOff<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = rest.len().min(HASH_CHUNK - self.chunk.len());
            self.chunk.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.chunk.len() == HASH_CHUNK {
                self.hand_off();
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
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

/// One payload read in order from the package file, hashed as it goes, so that [`finish`]
/// can tell whether the bytes were the ones verified at opening.
///
/// [`finish`]: PayloadStream::finish
struct PayloadStream<'f> {
    file: &'f File,
    at: u64,
    left: u64,
    hasher: Sha256,
    /// The first failed read: a decoder sees only an error, `finish` says what it was.
    failure: Option<Unverified>,
}

/// Why a payload read from the package file is not the one verified at opening.
enum Unverified {
    Shorter,
    Changed,
    Unreadable(String),
}

impl Unverified {
    fn describe(&self, package: &Path) -> String {
        let package = package.display();
        match self {
            Unverified::Shorter => {
                format!("{package} changed after it was verified: it is shorter")
            }
            Unverified::Changed => format!(
                "{package} changed after it was verified: the payload no longer matches its digest"
            ),
            Unverified::Unreadable(e) => format!("cannot read its payload from {package}: {e}"),
        }
    }
}

impl<'f> PayloadStream<'f> {
    fn new(file: &'f File, at: u64, len: u64) -> PayloadStream<'f> {
        PayloadStream {
            file,
            at,
            left: len,
            hasher: Sha256::new(),
            failure: None,
        }
    }

    /// Read what the decoder left, then check the whole payload against `expected`.
    fn finish(mut self, expected: Digest) -> Result<(), Unverified> {
        // A failed read is recorded in `self.failure`.
        let _ = std::io::copy(&mut self, &mut std::io::sink());
        if let Some(failure) = self.failure {
            return Err(failure);
        }
        match Digest(self.hasher.finalize().into()) == expected {
            true => Ok(()),
            false => Err(Unverified::Changed),
        }
    }
}

impl Read for PayloadStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let failed = match self.file.read_at(&mut buf[..want], self.at) {
            Ok(0) => Unverified::Shorter,
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.at += n as u64;
                self.left -= n as u64;
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Err(e),
            Err(e) => Unverified::Unreadable(e.to_string()),
        };
        self.failure.get_or_insert(failed);
        Err(std::io::Error::other("the package file is not as verified"))
    }
}

/// Why [`VerifiedPackage::decode_file_into`] failed.
#[derive(Debug)]
pub(crate) enum InPlaceFailure {
    /// The payload does not rebuild the post-image.
    Payload(DecodeFailure),
    /// The base could not be read where the payload copies from it: the disk's error.
    Base(std::io::Error),
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

impl From<FsError> for TreeVerifyError {
    fn from(e: FsError) -> TreeVerifyError {
        TreeVerifyError::Scan(ScanError::from(e))
    }
}

/// Prove offline that `pkg` turns the tree at `root` into its target: every pre-image matches
/// and every payload decodes against it to the post-image. Writes nothing. Returns the number of
/// payloads decoded.
pub fn verify_against_tree(pkg: &VerifiedPackage, root: &Path) -> Result<usize, TreeVerifyError> {
    if !root.is_dir() {
        return Err(TreeVerifyError::NotADirectory(root.to_owned()));
    }
    let entries = &pkg.manifest.entries;
    entries.walk(0..entries.len(), HELD, &mut |_, block| {
        for entry in block {
            let image = observe(root, &entry.path)?;
            if let Some(reason) = image_mismatch(entry.pre.as_ref(), image.as_ref()) {
                return Err(TreeVerifyError::PreImage {
                    tree: root.to_owned(),
                    path: entry.path.clone(),
                    reason,
                });
            }
        }
        Ok(())
    })?;
    let mut decoded = 0;
    entries.walk(0..entries.len(), HELD, &mut |_, block| {
        for entry in block.iter().filter(|e| e.payload.is_some()) {
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
        Ok(())
    })?;
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use sha2::{Digest as _, Sha256};

    use super::{hashed_writing, HASHED_BESIDE_FROM, HASH_CHUNK};

    /// Bytes that do not repeat within a chunk: the digests of 0, 1, 2...
    fn bytes(len: usize) -> Vec<u8> {
        (0u64..)
            .flat_map(|i| <[u8; 32]>::from(Sha256::digest(i.to_le_bytes())))
            .take(len)
            .collect()
    }

    /// Whatever the size and however the bytes come (one write larger than a chunk, writes of
    /// odd lengths across chunk edges, a writer that takes a few bytes at a time), the digest is
    /// that of the bytes passed on, and they are passed on whole, in order.
    #[test]
    fn hashed_writing_digests_what_it_passes_on() {
        struct Trickle(Vec<u8>);
        impl Write for Trickle {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = buf.len().min(1000);
                self.0.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let large = HASHED_BESIDE_FROM as usize * 3 + 12_345;
        for len in [0, 1, 4096, HASHED_BESIDE_FROM as usize - 1, large] {
            let data = bytes(len);
            let expected: [u8; 32] = Sha256::digest(&data).into();
            for piece in [usize::MAX, HASH_CHUNK + 1, 777] {
                let mut out = Trickle(Vec::new());
                let (written, digest) = hashed_writing(&mut out, len as u64, |w| {
                    data.chunks(piece.min(len.max(1)))
                        .try_for_each(|c| w.write_all(c))
                });
                assert!(written.is_ok(), "{len} B in pieces of {piece}");
                assert_eq!(digest.0, expected, "{len} B in pieces of {piece}");
                assert!(out.0 == data, "{len} B in pieces of {piece}: the bytes");
            }
        }
    }

    /// A writer that fails part way gives its error back, and the hashing ends.
    #[test]
    fn hashed_writing_gives_back_a_failure() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("disk full"));
                }
                let n = buf.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let data = bytes(HASHED_BESIDE_FROM as usize * 2);
        let mut out = Full(HASH_CHUNK * 3 + 5);
        let (written, _) = hashed_writing(&mut out, data.len() as u64, |w| w.write_all(&data));
        let error = written.expect_err("the writer is full");
        assert_eq!(error.to_string(), "disk full");
    }
}
