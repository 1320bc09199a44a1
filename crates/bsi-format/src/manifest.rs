use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::stream::{EntryRules, EntryStore};
use crate::{Digest, Letter, Name, PkgPath, Version};

/// The manifest format this crate writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest file a manifest may name (1 TiB): sizes come from the manifest and are checked
/// against this before anything is allocated for them.
pub const MAX_FILE_SIZE: u64 = 1 << 40;

/// A modification time: seconds and nanoseconds since the Unix epoch. Its nanoseconds are
/// below 10^9: a time spelled otherwise is refused where it is read (the kernel refuses to
/// set one, and it could never match the time a file shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "MtimeFields")]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

/// [`Mtime`] as spelled, before its nanoseconds are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MtimeFields {
    secs: i64,
    nanos: u32,
}

impl TryFrom<MtimeFields> for Mtime {
    type Error = String;

    fn try_from(t: MtimeFields) -> Result<Mtime, String> {
        if t.nanos >= 1_000_000_000 {
            return Err(format!(
                "a time of {} nanoseconds past a second (at most 999999999)",
                t.nanos
            ));
        }
        Ok(Mtime {
            secs: t.secs,
            nanos: t.nanos,
        })
    }
}

/// What one path holds, before or after the patch. (Parsed by hand: see `fields`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Image {
    File {
        sha256: Digest,
        size: u64,
        mode: u32,
        mtime: Mtime,
    },
    Symlink {
        target: String,
        mtime: Mtime,
    },
    Dir {
        mode: u32,
        mtime: Mtime,
    },
}

impl Image {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Image::File { .. } => "file",
            Image::Symlink { .. } => "symlink",
            Image::Dir { .. } => "directory",
        }
    }

    pub fn mtime(&self) -> Mtime {
        match self {
            Image::File { mtime, .. } | Image::Symlink { mtime, .. } | Image::Dir { mtime, .. } => {
                *mtime
            }
        }
    }

    /// True when both images hold the same content (bytes or link target) and kind, whatever
    /// their metadata.
    pub fn same_content(&self, other: &Image) -> bool {
        match (self, other) {
            (
                Image::File {
                    sha256: a,
                    size: sa,
                    ..
                },
                Image::File {
                    sha256: b,
                    size: sb,
                    ..
                },
            ) => a == b && sa == sb,
            (Image::Symlink { target: a, .. }, Image::Symlink { target: b, .. }) => a == b,
            (Image::Dir { .. }, Image::Dir { .. }) => true,
            _ => false,
        }
    }
}

/// How the post-image of an entry is produced. (Parsed by hand with its entry: see `fields`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Operation {
    /// Nothing was there; the post-image is created (a file's bytes come from its payload).
    Add {
        /// See [`Operation::plain_encoder`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoder: Option<Name>,
    },
    /// The pre-image is removed.
    Delete,
    /// The pre-image is replaced whole (a file's bytes come from its payload).
    Replace {
        /// See [`Operation::plain_encoder`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encoder: Option<Name>,
    },
    /// A file is rebuilt from a reference file and a payload written by the named encoder. The
    /// reference is the entry's own pre-image, or `source` (a renamed or copied old file),
    /// boxed since few entries have one (an entry is 64 bytes smaller for it).
    Delta {
        encoder: Name,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<Box<Source>>,
    },
    /// Same content; only permission bits or times change.
    Metadata,
}

impl Operation {
    /// An add or a replace whose payload is plain zstd (every package before 2026-12-07).
    pub const ADD: Operation = Operation::Add { encoder: None };
    pub const REPLACE: Operation = Operation::Replace { encoder: None };

    pub fn name(&self) -> &'static str {
        match self {
            Operation::Add { .. } => "add",
            Operation::Delete => "delete",
            Operation::Replace { .. } => "replace",
            Operation::Delta { .. } => "delta",
            Operation::Metadata => "metadata",
        }
    }

    /// The delta encoder whose payload against the empty file an add's or a replace's payload
    /// is, where it is not plain zstd: zstd-prefix, whose code filter makes a new executable
    /// about 8% smaller than plain zstd does (see `bsi_delta::encode_best`).
    pub fn plain_encoder(&self) -> Option<&Name> {
        match self {
            Operation::Add { encoder } | Operation::Replace { encoder } => encoder.as_ref(),
            _ => None,
        }
    }

    /// The encoder whose payload the entry carries: a delta's, or an add's or a replace's
    /// [`plain_encoder`](Self::plain_encoder); none for plain zstd.
    pub fn encoder(&self) -> Option<&Name> {
        match self {
            Operation::Delta { encoder, .. } => Some(encoder),
            _ => self.plain_encoder(),
        }
    }
}

/// The old file a delta is computed against when it is not the entry's own pre-image: another
/// path of the base release, with the digest and size it must have there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub path: PkgPath,
    pub sha256: Digest,
    pub size: u64,
}

/// Where an entry's payload lies in the payload section, and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub offset: u64,
    pub len: u64,
    pub sha256: Digest,
}

/// One changed path. (Parsed by hand, unknown fields refused: see `fields`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub path: PkgPath,
    pub component: Name,
    pub pre: Option<Image>,
    pub post: Option<Image>,
    #[serde(flatten)]
    pub op: Operation,
    /// Boxed: most entries of a large package carry none (a change of time), and an entry is
    /// 40 bytes smaller for it (200 bytes).
    pub payload: Option<Box<Payload>>,
}

/// A named subtree of the root that the package covers; an empty path is the whole root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub name: String,
    pub path: String,
}

/// The full release a package is built against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRelease {
    pub version: Version,
    pub build: Option<String>,
}

/// Everything a package promises, signed as one canonical byte string. Its entries are held in
/// a vector, or kept by an [`EntryStore`] of the reader's (see [`Manifest::from_packed_into`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest<E = Vec<Entry>> {
    pub format: u32,
    pub product: String,
    pub base: BaseRelease,
    pub letter: Letter,
    /// Key id (see `bsi-sign`) of the key that signed the package.
    pub signer: String,
    pub components: Vec<Component>,
    pub entries: E,
    /// Length of the payload section that follows the signature.
    pub payload_len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest cannot be unpacked: {0}")]
    Packing(String),
    #[error("manifest is not in canonical form")]
    NotCanonical,
    #[error("manifest format {0} is not supported (this bsi reads format {FORMAT_VERSION})")]
    Format(u32),
    #[error("manifest names {what} {value:?}, which is not allowed")]
    BadName { what: &'static str, value: String },
    #[error("component {0:?} is named twice")]
    DuplicateComponent(String),
    #[error("components {0:?} and {1:?} overlap")]
    OverlappingComponents(String, String),
    #[error("entries are not sorted by path or repeat one: {0}")]
    EntryOrder(PkgPath),
    #[error("entry {path} names component {component:?}, which does not hold it")]
    EntryComponent { path: PkgPath, component: String },
    #[error("entry {path}: operation {op} does not fit its pre- and post-image ({reason})")]
    Inconsistent {
        path: PkgPath,
        op: &'static str,
        reason: &'static str,
    },
    #[error("entry {path}: file size {size} exceeds the limit")]
    TooLarge { path: PkgPath, size: u64 },
    #[error(
        "entry {path}: payload at offset {offset} does not follow the previous one at {expected}"
    )]
    PayloadGap {
        path: PkgPath,
        offset: u64,
        expected: u64,
    },
    #[error("payloads cover {covered} bytes but the manifest declares {declared}")]
    PayloadLength { covered: u64, declared: u64 },
    #[error("entry {path}: payloads cover more than 2^64 bytes")]
    PayloadOverflow { path: PkgPath },
    #[error("manifest entries cannot be kept aside: {0}")]
    Store(String),
    #[error(
        "manifest is {0} bytes, over the limit of {limit} that every reader holds to; make fewer changes per package",
        limit = crate::MAX_MANIFEST_LEN
    )]
    Oversized(u64),
}

/// zstd level of packed manifests. Manifests repeat themselves (paths, kinds, equal digests of
/// entries whose only change is a time), so they shrink about tenfold.
const PACK_LEVEL: i32 = 19;

/// Canonical manifests of more than this many bytes are packed with [`LARGE_PARAMETERS`] on up
/// to [`LARGE_WORKERS`] threads. Level 19 packs manifest JSON at about 1 MB/s (a tree of
/// 150,750 changed entries, 60 MB of JSON, built in 63 to 69 s, a minute of it packing), and
/// past about 12 MB also packs it larger than the large form does: the manifest of a copy of
/// this machine's /usr/share with every time changed (50,138 entries), cut after 12 MB packed
/// 0.15% smaller at level 19, after 14 MB 0.9% larger, after 16 MB 2.0% larger, whole (20 MB)
/// 1.4% larger. Below, level 19 takes about 10 s at most and is kept: /usr/include's 3.5 MB
/// packed 0.8% smaller than in the large form, the bench's real pairs' (up to 56 KB) within
/// 81 B of it either way.
const LARGE_FROM: u64 = 12 << 20;

/// Level 19's parameters but for the strategy (btopt instead of btultra2) and the window and
/// tables (2 MiB, 2^21 and 2^20 entries, instead of 8 MiB, 2^24 and 2^22): four to five times
/// faster on one core, in a sixth of the tables' memory. zstd cuts the input into jobs of 8
/// MiB whatever the number of workers, so the bytes are the same on every machine.
const LARGE_PARAMETERS: [zstd::stream::raw::CParameter; 7] = {
    use zstd::stream::raw::CParameter as P;
    [
        P::WindowLog(21),
        P::ChainLog(21),
        P::HashLog(20),
        P::SearchLog(7),
        P::MinMatch(3),
        P::TargetLength(256),
        P::Strategy(zstd::zstd_safe::Strategy::ZSTD_btopt),
    ]
};

/// Threads that pack a large manifest at most: each holds about 14 MB, within what a build of
/// a tree of small files may take (256 MiB).
const LARGE_WORKERS: usize = 4;

/// Bytes of canonical manifest gathered before each write to zstd.
const PACK_BUFFER: usize = 128 << 10;

/// A zstd frame of `len` bytes of canonical manifest being packed into a vector, its size
/// declared in the frame, that tells a MiB at a time how many bytes zstd has packed. zstd's
/// threads take a large manifest's bytes jobs ahead of packing them: told as they were taken,
/// entries-50k's 18.9 MiB were all told 0.8 s into a packing of 5.5 s.
struct Packer<'t> {
    cctx: zstd::zstd_safe::CCtx<'static>,
    packed: Vec<u8>,
    told: &'t mut dyn FnMut(Packing),
    /// Of the bytes zstd has packed, those told.
    told_len: u64,
}

impl<'t> Packer<'t> {
    /// At level 19 on the calling thread where `len` is at most [`LARGE_FROM`], else with
    /// [`LARGE_PARAMETERS`] on up to [`LARGE_WORKERS`] threads.
    fn new(len: u64, told: &'t mut dyn FnMut(Packing)) -> std::io::Result<Self> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let large_on = (len > LARGE_FROM).then_some(workers.clamp(1, LARGE_WORKERS));
        Self::on(len, large_on, told)
    }

    /// [`Packer::new`] at level 19 on the calling thread (`large_on` `None`), or with
    /// [`LARGE_PARAMETERS`] on `large_on` threads (at least one).
    fn on(
        len: u64,
        large_on: Option<usize>,
        told: &'t mut dyn FnMut(Packing),
    ) -> std::io::Result<Self> {
        use zstd::stream::raw::CParameter as P;
        let mut cctx = zstd::zstd_safe::CCtx::try_create()
            .ok_or_else(|| std::io::Error::other("no memory for zstd's context"))?;
        let mut parameters = vec![P::CompressionLevel(PACK_LEVEL), P::ContentSizeFlag(true)];
        if let Some(workers) = large_on {
            parameters.extend(LARGE_PARAMETERS);
            parameters.push(P::NbWorkers(workers.max(1) as u32));
        }
        for parameter in parameters {
            cctx.set_parameter(parameter).map_err(zstd_error)?;
        }
        cctx.set_pledged_src_size(Some(len)).map_err(zstd_error)?;
        Ok(Packer {
            cctx,
            packed: Vec::new(),
            told,
            told_len: 0,
        })
    }

    /// One call of zstd's streaming compression over what is left of `input`; what is left
    /// to flush.
    fn step(
        &mut self,
        input: &mut zstd::zstd_safe::InBuffer<'_>,
        end: zstd::zstd_safe::zstd_sys::ZSTD_EndDirective,
    ) -> std::io::Result<usize> {
        self.packed.reserve(PACK_BUFFER);
        let at = self.packed.len();
        let mut output = zstd::zstd_safe::OutBuffer::around_pos(&mut self.packed, at);
        let left = self
            .cctx
            .compress_stream2(&mut output, input, end)
            .map_err(zstd_error)?;
        self.tell(1 << 20);
        Ok(left)
    }

    /// Tells the bytes zstd has packed since the last telling, if they are at least `least`.
    fn tell(&mut self, least: u64) {
        let packed = self.cctx.get_frame_progression().consumed;
        let more = packed.saturating_sub(self.told_len);
        if more > 0 && more >= least {
            (self.told)(Packing::Packed(more));
            self.told_len = packed;
        }
    }

    /// Ends the frame; the packed bytes.
    fn finish(mut self) -> std::io::Result<Vec<u8>> {
        let mut empty = zstd::zstd_safe::InBuffer::around(&[]);
        while self.step(
            &mut empty,
            zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
        )? > 0
        {}
        self.tell(0);
        Ok(self.packed)
    }
}

impl std::io::Write for Packer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut input = zstd::zstd_safe::InBuffer::around(buf);
        while input.pos < buf.len() {
            self.step(
                &mut input,
                zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue,
            )?;
        }
        Ok(buf.len())
    }

    /// Nothing: a flush would end a block (and a job) there, and the bytes would depend on
    /// where the writes fell.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A zstd error code as an I/O error.
fn zstd_error(code: usize) -> std::io::Error {
    std::io::Error::other(zstd::zstd_safe::get_error_name(code))
}

/// Compress canonical manifest JSON into the form a package carries (and signs).
pub fn pack_manifest(json: &[u8]) -> Vec<u8> {
    let pack = || -> std::io::Result<Vec<u8>> {
        let mut untold = |_| {};
        let mut packer = Packer::new(json.len() as u64, &mut untold)?;
        std::io::Write::write_all(&mut packer, json)?;
        packer.finish()
    };
    pack().expect("compressing into memory cannot fail")
}

/// Decompress a packed manifest, refusing anything that would exceed `MAX_MANIFEST_LEN`.
pub fn unpack_manifest(packed: &[u8]) -> Result<Vec<u8>, ManifestError> {
    use std::io::Read;
    // Room for the size the frame declares (bsi writes it), within the limit: a buffer grown
    // by doubling took up to twice a large manifest (a tree of 50,000 changed entries: 20 MB
    // of JSON in 33.5 MB).
    let declared = zstd::zstd_safe::get_frame_content_size(packed)
        .ok()
        .flatten()
        .unwrap_or(0);
    let limit = crate::MAX_MANIFEST_LEN as u64;
    let mut json = Vec::with_capacity(usize::try_from(declared.min(limit)).unwrap_or(0));
    unpacking(packed)?
        .read_to_end(&mut json)
        .map_err(|e| ManifestError::Packing(e.to_string()))?;
    Ok(json)
}

/// A packed manifest's JSON as it is decompressed, failing once it would exceed
/// `MAX_MANIFEST_LEN`.
fn unpacking(packed: &[u8]) -> Result<impl std::io::Read + '_, ManifestError> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(packed)
        .map_err(|e| ManifestError::Packing(e.to_string()))?;
    decoder
        .window_log_max(26)
        .map_err(|e| ManifestError::Packing(e.to_string()))?;
    Ok(Limited {
        inner: decoder,
        left: crate::MAX_MANIFEST_LEN as u64,
    })
}

/// A reader that fails rather than yield more than `left` bytes.
struct Limited<R> {
    inner: R,
    left: u64,
}

impl<R: std::io::Read> std::io::Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // One byte more than is left may be asked for, to tell the limit from the end.
        let room = usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX);
        let len = buf.len().min(room);
        let n = self.inner.read(&mut buf[..len])?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!(
                "it unpacks to more than {} bytes",
                crate::MAX_MANIFEST_LEN
            ))
        })?;
        Ok(n)
    }
}

/// A writer that holds nothing and compares what is written to it with what `expected` still
/// yields; it fails at the first difference. Written through a buffer of [`COMPARED`] bytes
/// (see [`Manifest::serialises_to`]).
struct SameAs<R> {
    expected: R,
    chunk: Vec<u8>,
    /// Whether a difference was found (else a failure came from the bytes written).
    differs: bool,
}

/// How many bytes of canonical JSON are compared at a time: the serialiser writes a few bytes
/// at a time, and comparing each write on its own took 21% of opening a package of 150,750
/// entries.
const COMPARED: usize = 64 << 10;

/// A writer that only counts the bytes written to it.
struct Counted(u64);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What [`Manifest::to_packed_bytes_within_limit`] tells as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// The canonical bytes are this long; their packing begins.
    Counted(u64),
    /// This many more of them are packed.
    Packed(u64),
}

impl<R: std::io::Read> SameAs<R> {
    /// Whether `expected` has nothing left.
    fn at_end(&mut self) -> bool {
        matches!(self.expected.read(&mut self.chunk[..1]), Ok(0))
    }
}

impl<R: std::io::Read> std::io::Write for SameAs<R> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for piece in buf.chunks(self.chunk.len()) {
            let expected = &mut self.chunk[..piece.len()];
            let read = self.expected.read_exact(expected);
            if read.is_err() || expected != piece {
                self.differs = true;
                return Err(std::io::Error::other("not the canonical bytes"));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<E> Manifest<E> {
    /// This manifest with its entries `kept` elsewhere.
    pub fn map_entries<F>(self, kept: impl FnOnce(E) -> F) -> Manifest<F> {
        Manifest {
            format: self.format,
            product: self.product,
            base: self.base,
            letter: self.letter,
            signer: self.signer,
            components: self.components,
            entries: kept(self.entries),
            payload_len: self.payload_len,
        }
    }
}

impl<E: Serialize> Manifest<E> {
    /// The packed canonical bytes of this manifest: what a package carries and signs, the same
    /// bytes as [`pack_manifest`] of its canonical bytes. Those are compressed as they are
    /// written, never held: a tree of 150,750 changed entries has 60 MB of manifest JSON, which
    /// took 67 MB as a vector and 60 MB more as room for one-shot compression's output.
    /// zstd picks its parameters from the size pledged, counted by writing the bytes once first.
    pub fn to_packed_bytes(&self) -> Vec<u8> {
        self.pack(self.canonical_len(), &mut |_| {})
    }

    /// [`to_packed_bytes`](Self::to_packed_bytes), refused where every reader would refuse
    /// it: over [`MAX_MANIFEST_LEN`](crate::MAX_MANIFEST_LEN) bytes unpacked (checked before
    /// packing) or packed. `told` hears the canonical length once counted, then the bytes
    /// packed a MiB at a time: 66 MB of small entries take about 20 s on 2 cores.
    pub fn to_packed_bytes_within_limit(
        &self,
        told: &mut dyn FnMut(Packing),
    ) -> Result<Vec<u8>, ManifestError> {
        let limit = crate::MAX_MANIFEST_LEN as u64;
        let len = self.canonical_len();
        if len > limit {
            return Err(ManifestError::Oversized(len));
        }
        told(Packing::Counted(len));
        let packed = self.pack(len, told);
        match packed.len() as u64 > limit {
            true => Err(ManifestError::Oversized(packed.len() as u64)),
            false => Ok(packed),
        }
    }

    /// The length of the canonical bytes, counted as they are written.
    fn canonical_len(&self) -> u64 {
        let mut counted = Counted(0);
        self.write_canonical(&mut counted)
            .expect("a manifest always serialises: it holds no maps or floats");
        counted.0
    }

    /// The canonical bytes, `len` of them, packed as they are written, `told` of them.
    fn pack(&self, len: u64, told: &mut dyn FnMut(Packing)) -> Vec<u8> {
        let mut pack = || -> std::io::Result<Vec<u8>> {
            let mut packer = Packer::new(len, &mut *told)?;
            // serde_json writes a few bytes at a time; each write to zstd's threads takes a
            // lock (the 60 MB manifest: 13 s of system time unbuffered).
            let mut buffered = std::io::BufWriter::with_capacity(PACK_BUFFER, &mut packer);
            self.write_canonical(&mut buffered)?;
            buffered.into_inner().map_err(|e| e.into_error())?;
            packer.finish()
        };
        pack().expect("compressing into memory cannot fail")
    }

    /// The canonical bytes of this manifest (JSON), before packing.
    pub fn to_canonical_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.write_canonical(&mut bytes)
            .expect("a manifest always serialises: it holds no maps or floats");
        bytes
    }

    /// Write the canonical bytes of this manifest to `out`.
    fn write_canonical(&self, out: impl std::io::Write) -> std::io::Result<()> {
        serde_json::to_writer(out, self).map_err(std::io::Error::from)
    }

    /// Whether the canonical bytes of this manifest are what `json` reads, compared as they are
    /// written rather than held: they are as large as the manifest's JSON. Fails only when its
    /// entries cannot be read back from their store.
    fn serialises_to(&self, json: impl std::io::Read) -> Result<bool, ManifestError> {
        let same = SameAs {
            expected: std::io::BufReader::new(json),
            chunk: vec![0; COMPARED],
            differs: false,
        };
        let mut rest = std::io::BufWriter::with_capacity(COMPARED, same);
        let written = self.write_canonical(&mut rest);
        if rest.get_ref().differs {
            return Ok(false);
        }
        written.map_err(|e| ManifestError::Store(e.to_string()))?;
        // The last bytes are compared as they are flushed.
        Ok(rest.into_inner().is_ok_and(|mut same| same.at_end()))
    }

    /// Check the rules of a manifest's head: supported format, sane names, components named
    /// once that do not overlap.
    fn validate_head(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::Format(self.format));
        }
        check_name("product", &self.product)?;
        if let Some(build) = &self.base.build {
            check_name("base build", build)?;
        }
        let mut names = BTreeSet::new();
        for (i, c) in self.components.iter().enumerate() {
            check_name("component", &c.name)?;
            if !c.path.is_empty() {
                PkgPath::new(&c.path).map_err(|_| ManifestError::BadName {
                    what: "component path",
                    value: c.path.clone(),
                })?;
            }
            if !names.insert(c.name.as_str()) {
                return Err(ManifestError::DuplicateComponent(c.name.clone()));
            }
            for other in &self.components[..i] {
                let overlap = match (PkgPath::new(&c.path), PkgPath::new(&other.path)) {
                    (Ok(a), Ok(b)) => a.is_within(b.as_str()) || b.is_within(a.as_str()),
                    _ => true,
                };
                if overlap {
                    return Err(ManifestError::OverlappingComponents(
                        other.name.clone(),
                        c.name.clone(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl<S: EntryStore + Serialize> Manifest<S> {
    /// Unpack and parse a packed manifest, each entry handed to `store` as it is parsed, and
    /// check it as [`Manifest::from_bytes`] does. It is unpacked twice, as it is parsed and as
    /// its canonical form is compared (its entries read back from `store`), and never held
    /// whole: a tree of 50,250 changed entries has 20 MB of manifest JSON.
    pub fn from_packed_into(packed: &[u8], store: S) -> Result<Manifest<S>, ManifestError> {
        Manifest::from_json_into(|| unpacking(packed), store)
    }

    /// Parse the manifest JSON `json()` reads into `store`, check that it is this manifest's
    /// canonical form, read a second time from `json()`, and check every structural rule.
    fn from_json_into<R: std::io::Read>(
        json: impl Fn() -> Result<R, ManifestError>,
        store: S,
    ) -> Result<Manifest<S>, ManifestError> {
        let mut failed = None;
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(json()?));
        let parsed = crate::stream::parse(&mut de, store, &mut failed).and_then(|parsed| {
            de.end()?;
            Ok(parsed)
        });
        let parsed = match (parsed, failed) {
            (_, Some(why)) => return Err(ManifestError::Store(why)),
            (Err(e), None) if e.is_io() => {
                return Err(ManifestError::Packing(std::io::Error::from(e).to_string()))
            }
            (Err(e), None) => return Err(ManifestError::Json(e)),
            (Ok(parsed), None) => parsed,
        };
        if !parsed.manifest.serialises_to(json()?)? {
            return Err(ManifestError::NotCanonical);
        }
        parsed.manifest.validate_head()?;
        let covered = parsed.entries.ok_or(ManifestError::NotCanonical)??;
        crate::stream::covers(covered, parsed.manifest.payload_len)?;
        Ok(parsed.manifest)
    }
}

impl Manifest {
    /// Unpack and parse a packed manifest (see [`Manifest::from_bytes`]), its entries into a
    /// vector.
    pub fn from_packed(packed: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::from_packed_into(packed, Vec::new())
    }

    /// Parse canonical manifest bytes and check every structural rule.
    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::from_json_into(|| Ok(bytes), Vec::new())
    }

    /// The signer a packed manifest names, read without checking anything else, for picking
    /// the key to check its signature with (the signature check decides, see
    /// `Manifest::from_packed` for the checked manifest).
    pub fn signer_of_packed(packed: &[u8]) -> Option<String> {
        /// The top-level object read up to its `signer`, which is kept; the rest is left unread
        /// (the parser then fails on it, which does not matter here): the signer comes fifth,
        /// and reading a manifest of 150,750 entries through took 0.3 s.
        struct UpToSigner<'s>(&'s mut Option<String>);
        impl<'de> serde::de::Visitor<'de> for UpToSigner<'_> {
            type Value = ();

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a manifest")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                while let Some(key) = map.next_key::<std::borrow::Cow<'_, str>>()? {
                    if key == "signer" {
                        *self.0 = Some(map.next_value()?);
                        return Ok(());
                    }
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(())
            }
        }
        let mut signer = None;
        let mut de =
            serde_json::Deserializer::from_reader(std::io::BufReader::new(unpacking(packed).ok()?));
        let _ = serde::Deserializer::deserialize_map(&mut de, UpToSigner(&mut signer));
        signer
    }

    /// Check the rules every manifest obeys: supported format, sane names, sorted unique paths
    /// inside their components, operations consistent with their images, payloads contiguous.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_head()?;
        let mut rules = EntryRules::new(&self.components);
        for entry in &self.entries {
            rules.check(entry)?;
        }
        rules.finish(self.payload_len)
    }
}

impl Entry {
    pub(crate) fn check_consistent(&self) -> Result<(), ManifestError> {
        let fail = |reason| ManifestError::Inconsistent {
            path: self.path.clone(),
            op: self.op.name(),
            reason,
        };
        for image in [&self.pre, &self.post].into_iter().flatten() {
            if let Image::File { size, .. } = image {
                if *size > MAX_FILE_SIZE {
                    return Err(ManifestError::TooLarge {
                        path: self.path.clone(),
                        size: *size,
                    });
                }
            }
            if let Image::Symlink { target, .. } = image {
                if target.is_empty()
                    || target.contains('\0')
                    || target.len() > crate::path::MAX_PATH_LEN
                {
                    return Err(fail("symlink target is empty, too long or holds NUL"));
                }
            }
        }
        let post_is_file = matches!(self.post, Some(Image::File { .. }));
        match (&self.op, &self.pre, &self.post) {
            (Operation::Add { .. }, None, Some(_)) => {}
            (Operation::Add { .. }, _, _) => {
                return Err(fail("add needs no pre-image and a post-image"))
            }
            (Operation::Delete, Some(_), None) => {}
            (Operation::Delete, _, _) => return Err(fail("delete needs a pre-image only")),
            (Operation::Replace { .. }, Some(_), Some(_)) => {}
            (Operation::Replace { .. }, _, _) => return Err(fail("replace needs both images")),
            (Operation::Delta { encoder, source }, pre, Some(Image::File { .. })) => {
                check_name("encoder", encoder)?;
                match source {
                    Some(src) if src.path == self.path => {
                        return Err(fail("a delta's source is another path"))
                    }
                    Some(src) if src.size > MAX_FILE_SIZE => {
                        return Err(ManifestError::TooLarge {
                            path: src.path.clone(),
                            size: src.size,
                        })
                    }
                    Some(_) => {}
                    None if matches!(pre, Some(Image::File { .. })) => {}
                    None => return Err(fail("a delta needs a pre-image file or a source")),
                }
            }
            (Operation::Delta { .. }, _, _) => return Err(fail("delta needs a file post-image")),
            (Operation::Metadata, Some(pre), Some(post)) if pre.same_content(post) => {}
            (Operation::Metadata, _, _) => {
                return Err(fail("metadata needs the same content on both sides"))
            }
        }
        if let Some(encoder) = self.op.plain_encoder() {
            check_name("encoder", encoder)?;
            if !post_is_file {
                return Err(fail("only a file's bytes have an encoder"));
            }
        }
        let wants_payload = post_is_file && !matches!(self.op, Operation::Metadata);
        if wants_payload != self.payload.is_some() {
            return Err(fail(
                "a payload is present exactly when a file's bytes are written",
            ));
        }
        Ok(())
    }
}

/// Names (product, build, component, encoder) are short printable ASCII without `/`.
fn check_name(what: &'static str, value: &str) -> Result<(), ManifestError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+ ".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName {
            what,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest of two entries whose only change is a time, as canonical bytes.
    fn sample() -> (Manifest, Vec<u8>) {
        let entry = |path: &str, kind: &str, secs: u64| {
            format!(
                r#"{{"path":"{path}","component":"webkit","pre":{kind},"post":{post},"op":"metadata","payload":null}}"#,
                kind = kind.replace("SECS", "1000"),
                post = kind.replace("SECS", &secs.to_string()),
            )
        };
        let dir = r#"{"kind":"dir","mode":493,"mtime":{"secs":SECS,"nanos":0}}"#;
        let file = format!(
            r#"{{"kind":"file","sha256":"{}","size":3,"mode":420,"mtime":{{"secs":SECS,"nanos":7}}}}"#,
            "ab".repeat(32)
        );
        let json = format!(
            r#"{{"format":1,"product":"macOS","base":{{"version":"26.3","build":null}},"letter":"a","signer":"df0f1484c5634cb1","components":[{{"name":"webkit","path":""}}],"entries":[{},{}],"payload_len":0}}"#,
            entry("lib", dir, 2000),
            entry("lib/libwebkit.so", &file, 3000),
        );
        let manifest = Manifest::from_bytes(json.as_bytes()).expect("a canonical manifest");
        (manifest, json.into_bytes())
    }

    #[test]
    fn canonical_bytes_are_accepted_and_any_other_spelling_is_refused() {
        let (manifest, bytes) = sample();
        assert_eq!(manifest.to_canonical_bytes(), bytes);
        let json = String::from_utf8(bytes).expect("JSON is text");
        let spellings = [
            format!("{json} "),
            format!(" {json}"),
            json.replacen(r#""format":1,"#, r#""format": 1,"#, 1),
            json.replacen(r#""nanos":7"#, r#""nanos":7.0"#, 1),
            json.replacen(
                r#""product":"macOS","base":{"version":"26.3","build":null}"#,
                r#""base":{"version":"26.3","build":null},"product":"macOS""#,
                1,
            ),
        ];
        for other in spellings {
            assert_ne!(other, json, "the spelling changes something");
            match Manifest::from_bytes(other.as_bytes()) {
                Err(ManifestError::NotCanonical) | Err(ManifestError::Json(_)) => {}
                got => panic!("{other} gave {got:?}"),
            }
        }
    }

    /// A time's nanoseconds are below 10^9; 10^9 or more is refused with a reason that says so.
    #[test]
    fn a_time_past_its_second_is_refused() {
        let (_, bytes) = sample();
        let json = String::from_utf8(bytes).expect("JSON is text");
        let edge = json.replacen(r#""nanos":7"#, r#""nanos":999999999"#, 1);
        assert!(
            Manifest::from_bytes(edge.as_bytes()).is_ok(),
            "999999999 is a time"
        );
        let past = json.replacen(r#""nanos":7"#, r#""nanos":1000000000"#, 1);
        match Manifest::from_bytes(past.as_bytes()) {
            Err(ManifestError::Json(e)) => {
                assert!(e.to_string().contains("1000000000 nanoseconds"), "{e}")
            }
            got => panic!("10^9 nanoseconds gave {got:?}"),
        }
    }

    #[test]
    fn the_signer_is_read_from_a_packed_manifest_without_the_rest() {
        let (manifest, bytes) = sample();
        let packed = pack_manifest(&bytes);
        assert_eq!(
            Manifest::signer_of_packed(&packed).as_deref(),
            Some(manifest.signer.as_str())
        );
        // Only the signer is read: a manifest that is not canonical still names one.
        let loose = String::from_utf8(bytes.clone())
            .expect("text")
            .replace(",", ", ");
        assert_eq!(
            Manifest::signer_of_packed(&pack_manifest(loose.as_bytes())).as_deref(),
            Some("df0f1484c5634cb1")
        );
        // Only what comes before it is read: what follows may be anything.
        let cut = format!(
            "{}\"signer\":\"abc\", this is not JSON",
            String::from_utf8_lossy(
                &bytes[..bytes
                    .windows(9)
                    .position(|w| w == b"\"signer\":")
                    .unwrap_or(0)]
            )
        );
        assert_eq!(
            Manifest::signer_of_packed(&pack_manifest(cut.as_bytes())).as_deref(),
            Some("abc")
        );
        let unsigned = String::from_utf8_lossy(&bytes).replace("\"signer\"", "\"signed\"");
        assert_eq!(
            Manifest::signer_of_packed(&pack_manifest(unsigned.as_bytes())),
            None
        );
        assert_eq!(Manifest::signer_of_packed(b"not a zstd frame"), None);
        assert_eq!(Manifest::signer_of_packed(&pack_manifest(b"{}")), None);
    }

    /// An add or a replace names its encoder only where its payload is not plain zstd, so that
    /// the canonical bytes of every earlier package stay what they were; only a file's bytes
    /// have an encoder, and its name is checked as a delta's is.
    #[test]
    fn an_adds_encoder_is_spelled_only_where_it_has_one() {
        let (mut manifest, _) = sample();
        let file = manifest.entries[1].post.clone();
        let dir = manifest.entries[0].post.clone();
        let payload = |offset| {
            Some(Box::new(Payload {
                offset,
                len: 5,
                sha256: Digest([1; 32]),
            }))
        };
        let new = |path: &str, pre: Option<Image>, post, op, payload| Entry {
            path: PkgPath::new(path).expect("a path"),
            component: "webkit".into(),
            pre,
            post,
            op,
            payload,
        };
        let by_code = Some(Name::from("zstd-prefix"));
        manifest.entries = vec![
            new("a", None, file.clone(), Operation::ADD, payload(0)),
            new(
                "b",
                None,
                file.clone(),
                Operation::Add {
                    encoder: by_code.clone(),
                },
                payload(5),
            ),
            new(
                "c",
                dir.clone(),
                file.clone(),
                Operation::Replace {
                    encoder: by_code.clone(),
                },
                payload(10),
            ),
        ];
        manifest.payload_len = 15;
        let bytes = manifest.to_canonical_bytes();
        let json = String::from_utf8(bytes.clone()).expect("JSON is text");
        assert!(json.contains(r#""path":"a","#), "{json}");
        assert_eq!(json.matches(r#""op":"add","payload""#).count(), 1, "{json}");
        assert_eq!(
            json.matches(r#""op":"add","encoder":"zstd-prefix","payload""#)
                .count(),
            1,
            "{json}"
        );
        assert_eq!(
            json.matches(r#""op":"replace","encoder":"zstd-prefix","payload""#)
                .count(),
            1,
            "{json}"
        );
        assert_eq!(Manifest::from_bytes(&bytes).expect("read back"), manifest);

        let mut of_a_dir = manifest.clone();
        of_a_dir.entries[1].post = dir;
        of_a_dir.entries[1].payload = None;
        of_a_dir.entries[2].payload = payload(5);
        of_a_dir.payload_len = 10;
        assert!(
            matches!(
                of_a_dir.validate(),
                Err(ManifestError::Inconsistent { ref path, .. }) if path.as_str() == "b"
            ),
            "{:?}",
            of_a_dir.validate()
        );
        let mut badly_named = manifest.clone();
        badly_named.entries[2].op = Operation::Replace {
            encoder: Some(Name::from("a/b")),
        };
        assert!(matches!(
            badly_named.validate(),
            Err(ManifestError::BadName { .. })
        ));
        assert!(manifest.validate().is_ok());
    }

    /// What an apply holds of each entry of a package: a change of time, which most entries of a
    /// large package are, holds nothing more (its payload is boxed, its names shared).
    #[test]
    fn an_entry_without_a_payload_is_small() {
        assert!(
            std::mem::size_of::<Entry>() <= 200,
            "{} bytes",
            std::mem::size_of::<Entry>()
        );
        let (manifest, _) = sample();
        assert!(manifest.entries.iter().all(|e| e.payload.is_none()));
    }

    /// `sample()` with `n` entries more, each a file of its own with a size and time of its
    /// own: 4,000 of them take a little over 1 MiB of canonical JSON.
    fn sample_of(n: u32) -> Manifest {
        let (mut manifest, _) = sample();
        let file = manifest.entries[1].clone();
        for i in 0..n {
            let mut entry = file.clone();
            entry.path = PkgPath::new(&format!("lib/w{i:05}")).expect("a path");
            if let Some(Image::File { mtime, size, .. }) = &mut entry.post {
                (mtime.secs, *size) = (i64::from(i % 977) * 7_919, u64::from(i) * 31 % 1_000);
            }
            if let Some(Image::File { size, .. }) = &mut entry.pre {
                *size = u64::from(i) * 31 % 1_000;
            }
            manifest.entries.push(entry);
        }
        manifest
    }

    /// A manifest packed as it is written is what compression of its canonical bytes at once
    /// gives, over many of zstd's blocks (128 KiB each), and unpacks to the same manifest.
    #[test]
    fn a_manifest_packed_as_it_is_written_has_the_one_shot_bytes() {
        let manifest = sample_of(4000);
        let canonical = manifest.to_canonical_bytes();
        assert!(
            canonical.len() > 8 * 128 * 1024,
            "{} bytes",
            canonical.len()
        );
        let packed = manifest.to_packed_bytes();
        assert!(packed == pack_manifest(&canonical), "the one-shot bytes");
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&packed).ok(),
            Some(Some(canonical.len() as u64)),
            "the frame declares its size"
        );
        assert_eq!(Manifest::from_packed(&packed).expect("unpacks"), manifest);

        // Within the limit, the same bytes, told as they are packed: the length first, then
        // every byte once, a MiB at a time but the last.
        let mut heard = Vec::new();
        let within = manifest
            .to_packed_bytes_within_limit(&mut |t| heard.push(t))
            .expect("within the limit");
        assert!(within == packed, "the same bytes");
        let len = canonical.len() as u64;
        assert_eq!(heard.first(), Some(&Packing::Counted(len)));
        let parts: Vec<u64> = heard[1..]
            .iter()
            .map(|t| match t {
                Packing::Packed(n) => *n,
                Packing::Counted(_) => 0,
            })
            .collect();
        assert_eq!(parts.iter().sum::<u64>(), len);
        let (last, whole) = parts.split_last().expect("some packed");
        assert!(
            !whole.is_empty() && whole.iter().all(|&n| n >= 1 << 20),
            "{parts:?}"
        );
        assert!(*last > 0, "{parts:?}");
    }

    /// A manifest over [`LARGE_FROM`] is packed in the large form (a window of 2 MiB), into
    /// the same bytes whatever the number of threads (zstd cuts it into jobs of a size of its
    /// own); a smaller one into level 19's bytes (a window of 8 MiB past 8 MiB).
    #[test]
    fn packed_bytes_do_not_depend_on_the_machine() {
        use std::io::Write;
        let pack_on = |json: &[u8], large_on| {
            let mut untold = |_| {};
            let mut packer = Packer::on(json.len() as u64, large_on, &mut untold).expect("packer");
            packer.write_all(json).expect("write");
            packer.finish().expect("finish")
        };
        // The window a frame declares, where it declares one (not a single segment).
        let window = |frame: &[u8]| {
            let (single_segment, descriptor) = (frame[4] & 0x20 != 0, frame[5]);
            (!single_segment).then(|| {
                let base = 1u64 << (10 + (descriptor >> 3));
                base + base / 8 * u64::from(descriptor & 7)
            })
        };

        let large = sample_of(36_000).to_canonical_bytes();
        assert!(large.len() as u64 > LARGE_FROM, "{}", large.len());
        let packed = pack_manifest(&large);
        assert_eq!(window(&packed), Some(2 << 20), "the large form");
        assert!(
            packed == pack_on(&large, Some(3)),
            "the same bytes on 3 threads"
        );
        assert!(unpack_manifest(&packed).expect("unpacks") == large);

        let small = sample_of(25_000).to_canonical_bytes();
        assert!(
            small.len() as u64 <= LARGE_FROM && small.len() > 8 << 20,
            "{}",
            small.len()
        );
        let packed = pack_manifest(&small);
        assert_eq!(window(&packed), Some(8 << 20), "level 19");
        let mut level_19 = zstd::stream::write::Encoder::new(Vec::new(), 19).expect("encoder");
        level_19
            .set_pledged_src_size(Some(small.len() as u64))
            .expect("pledged");
        level_19.write_all(&small).expect("write");
        let level_19 = level_19.finish().expect("finish");
        assert!(packed == level_19, "level 19's bytes, on one thread");
    }

    /// A manifest every reader would refuse (over the limit unpacked) is refused when it is
    /// packed, before packing (every build packs its manifest this way, within the limit).
    #[test]
    fn a_manifest_over_the_readers_limit_is_refused_when_packed() {
        let (mut manifest, _) = sample();
        let target = "t".repeat(4000);
        let link = |secs| Image::Symlink {
            target: target.clone(),
            mtime: Mtime { secs, nanos: 0 },
        };
        let one = |i: usize| Entry {
            path: PkgPath::new(&format!("lib/l{i:05}")).expect("a path"),
            component: "webkit".into(),
            pre: Some(link(1)),
            post: Some(link(2)),
            op: Operation::Metadata,
            payload: None,
        };
        // Each entry and its comma; one entry more than fits.
        let per = serde_json::to_vec(&one(0)).expect("serialised").len() as u64 + 1;
        let limit = crate::MAX_MANIFEST_LEN as u64;
        let fit = (limit - manifest.canonical_len()) / per;
        manifest.entries.extend((0..=fit as usize).map(one));
        let len = manifest.canonical_len();
        assert!(len > limit && len - per <= limit, "{len}");
        let mut heard = Vec::new();
        match manifest.to_packed_bytes_within_limit(&mut |t| heard.push(t)) {
            Err(ManifestError::Oversized(refused)) => assert_eq!(refused, len),
            other => panic!("{:?}", other.map(|p| p.len())),
        }
        assert_eq!(heard, [], "refused before packing");
    }

    /// A frame without its content size (a streaming encoder's) unpacks as well, and one that
    /// declares more than it holds or more than the limit is refused.
    #[test]
    fn frames_unpack_whatever_size_they_declare() {
        use std::io::Write;
        let (_, bytes) = sample();
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
        encoder.include_contentsize(false).expect("option");
        encoder.write_all(&bytes).expect("write");
        let sizeless = encoder.finish().expect("finish");
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&sizeless).ok(),
            Some(None),
            "the frame declares no size"
        );
        assert_eq!(unpack_manifest(&sizeless).expect("unpacks"), bytes);

        let declaring = |size: u64| {
            let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
            encoder.set_pledged_src_size(Some(size)).expect("pledge");
            encoder
                .write_all(&vec![b' '; size as usize])
                .expect("write");
            encoder.finish().expect("finish")
        };
        // The frame header declares 4 KiB; the frame is cut after its first block's header.
        let cut = declaring(4096);
        assert!(unpack_manifest(&cut[..cut.len() - 4]).is_err());
        let over = declaring(crate::MAX_MANIFEST_LEN as u64 + 1);
        assert!(matches!(
            unpack_manifest(&over),
            Err(ManifestError::Packing(_))
        ));
        // Parsed as it is unpacked, it is refused at the limit all the same (JSON's whitespace
        // would otherwise be read to the end of the frame).
        assert!(matches!(
            Manifest::from_packed(&over),
            Err(ManifestError::Packing(_))
        ));
        assert!(matches!(
            Manifest::from_packed(&cut[..cut.len() - 4]),
            Err(ManifestError::Packing(_))
        ));
    }
}
