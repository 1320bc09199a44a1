//! Apply, revert and status on a root.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use bsi_format::{Digest, Entry, Image, Letter, PkgPath};
use rayon::prelude::*;
use serde::Serialize;

use crate::fsx;
use crate::package::{
    reference, source_matches, DecodeFailure, HashingWriter, InPlaceFailure, VerifiedPackage,
};
use crate::seen::{ReadWhole, Seen};
use crate::state::{InstalledEntry, Record, RecordEntries, StateDir, StateError, STATE_FORMAT};
use crate::tree::{image_mismatch, mtime_of, observe, observe_with, Content, ScanError};
use crate::txn::{self, Failed, Interrupted, Recovered, Step, TxnDir, TxnError, TxnKind};
use crate::{largest_first, Entries, FsContext, FsError, Progress, LARGE_FILE};
use bsi_delta::DeltaEncoder as _;

/// zstd level of revert data (copies and reverse deltas): made on the device while it applies,
/// so the fastest level (level 3 took a sixth of the apply time on the testdata, for copies
/// about 10% smaller; reverse deltas at level 19 took half of libxml2's apply time).
const REVERT_LEVEL: i32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    Installed,
    /// The same package was already installed; nothing changed.
    AlreadyInstalled,
    /// An older letter was installed; it was removed and this one installed.
    Replaced {
        previous: Letter,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("root {0} does not exist or is not a directory")]
    Root(PathBuf),
    #[error("another bsi operation is under way on {0}; try again later, or pass --wait")]
    Busy(PathBuf),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cannot recover the interrupted operation on {root}: {source}")]
    Recover { root: PathBuf, source: TxnError },
    #[error(
        "state directory {state} is not on the filesystem of root {root}; atomic renames into the root need one filesystem"
    )]
    OtherFilesystem { state: PathBuf, root: PathBuf },
    #[error("state directory {0} is not a directory (a symlink or a file is not accepted)")]
    StateNotDir(PathBuf),
}

/// The device of `path`, or of its nearest existing ancestor.
fn device_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    path.ancestors()
        .find_map(|p| {
            fs::metadata(if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            })
            .ok()
        })
        .map(|m| m.dev())
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("root {0} does not exist or is not a directory")]
    Root(PathBuf),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{root}: {source}")]
    Txn { root: PathBuf, source: Box<Failed> },
    #[error("{root} has {installed} installed; {package} is for another product or release")]
    OtherRelease {
        root: PathBuf,
        installed: String,
        package: String,
    },
    #[error("{root} already has {installed} installed; {package} is not newer")]
    NotNewer {
        root: PathBuf,
        installed: String,
        package: String,
    },
    #[error("{root}: {path} is not the package's pre-image: {reason}")]
    PreImage {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
    #[error("{root}: installed patch cannot be replaced: {path} changed since it was applied ({reason})")]
    InstalledChanged {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
    #[error("{root}: package path {path} lies inside the state directory")]
    InsideState { root: PathBuf, path: PkgPath },
    #[error("{root}: package path {path} would escape the root: {ancestor} is {what}")]
    Escape {
        root: PathBuf,
        path: PkgPath,
        ancestor: PkgPath,
        what: &'static str,
    },
    #[error("{root}: directory {path} would be removed but {child} would remain in it")]
    DirectoryNotEmpty {
        root: PathBuf,
        path: PkgPath,
        child: String,
    },
    #[error("{root}: not enough free space: {space}; nothing was written")]
    NoSpace { root: PathBuf, space: Space },
    #[error("{0}")]
    Decode(#[from] DecodeFailure),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Scan(#[from] ScanError),
}

#[derive(Debug, thiserror::Error)]
pub enum RevertError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("{root}: {source}")]
    Txn { root: PathBuf, source: Box<Failed> },
    #[error("root {0} does not exist or is not a directory")]
    Root(PathBuf),
    #[error("{0} has no patch installed")]
    NothingInstalled(PathBuf),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{root}: {path} changed since the patch was applied ({reason}); nothing was reverted")]
    Changed {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
    #[error("{root}: not enough free space: {space}; nothing was written")]
    NoSpace { root: PathBuf, space: Space },
    #[error(
        "{root}: {patch} is retired: a full release was installed over it; nothing was reverted"
    )]
    Retired { root: PathBuf, patch: String },
    #[error("revert data {file} for {path} is damaged")]
    RevertData { file: PathBuf, path: PkgPath },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Scan(#[from] ScanError),
}

impl From<RevertError> for ApplyError {
    fn from(e: RevertError) -> ApplyError {
        match e {
            RevertError::Changed { root, path, reason } => {
                ApplyError::InstalledChanged { root, path, reason }
            }
            RevertError::Fs(e) => ApplyError::Fs(e),
            RevertError::Scan(e) => ApplyError::Scan(e),
            RevertError::State(e) => ApplyError::State(e),
            RevertError::Root(r) | RevertError::NothingInstalled(r) => ApplyError::Root(r),
            RevertError::RevertData { file, path } => ApplyError::InstalledChanged {
                root: file,
                path,
                reason: "its revert data is damaged".to_owned(),
            },
            RevertError::Session(e) => ApplyError::Session(e),
            RevertError::NoSpace { root, space } => ApplyError::NoSpace { root, space },
            RevertError::Retired { root, patch } => ApplyError::InstalledChanged {
                root,
                path: PkgPath::new(SYSTEM_VERSION_PLIST).expect("a valid path"),
                reason: format!("{patch} is retired by a full release"),
            },
            RevertError::Txn { root, source } => ApplyError::Txn { root, source },
        }
    }
}

/// What an operation will write outside the root before it can commit, against what is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes of staged new files.
    pub staging: u64,
    /// Bytes of revert data (at most the replaced files' size).
    pub revert: u64,
    /// Bytes free on the state directory's filesystem.
    pub free: u64,
}

/// Room kept for the journal and the installed record.
const SPACE_MARGIN: u64 = 1 << 20;

impl Space {
    pub fn needed(&self) -> u64 {
        self.staging + self.revert + SPACE_MARGIN
    }

    /// Measure what is free next to `state_dir` and refuse when it is less than needed.
    fn check(staging: u64, revert: u64, state_dir: &Path) -> Result<(), Space> {
        let free = free_space(state_dir);
        let space = Space {
            staging,
            revert,
            free,
        };
        if space.needed() > free {
            return Err(space);
        }
        Ok(())
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "it needs {} bytes ({} of staged files, {} of revert data, 1 MiB for the journal) and {} are free",
            self.needed(),
            self.staging,
            self.revert,
            self.free
        )
    }
}

/// Bytes an unprivileged writer may still use on the filesystem of `path` (or of its nearest
/// existing ancestor); `u64::MAX` when that cannot be measured.
fn free_space(path: &Path) -> u64 {
    if let Some(bytes) = crate::fault::pretended_free_space(path) {
        return bytes;
    }
    path.ancestors()
        .find(|p| p.exists())
        .and_then(|p| rustix::fs::statvfs(p).ok())
        .map_or(u64::MAX, |st| st.f_bavail.saturating_mul(st.f_frsize))
}

fn file_size(image: Option<&Image>) -> u64 {
    match image {
        Some(Image::File { size, .. }) => *size,
        _ => 0,
    }
}

fn release_title(product: &str, version: &impl fmt::Display, letter: Letter) -> String {
    format!("{product} {version} ({letter})")
}

/// The base release as seen through an installed patch: paths it touched read from what it
/// recorded (each method is given the installed record's entry of its path, if any, see
/// [`Touched`]) and its revert data, every other path from disk.
struct BaseView<'a> {
    root: &'a Path,
    seen: &'a Seen,
    revert_dir: PathBuf,
}

impl<'a> BaseView<'a> {
    fn new(root: &'a Path, state: &StateDir, seen: &'a Seen) -> BaseView<'a> {
        BaseView {
            root,
            seen,
            revert_dir: state.revert_dir(),
        }
    }

    /// The base image of `path`, which the installed patch touched as `touched` says.
    fn image(
        &self,
        path: &PkgPath,
        touched: Option<&InstalledEntry>,
    ) -> Result<Option<Image>, ScanError> {
        match touched {
            Some(entry) => Ok(entry.before.clone()),
            None => observe_with(self.root, path, Content::Read(Some(self.seen))),
        }
    }

    /// Whether `entry`'s base is read from the root by its decoding (a delta against its own
    /// base, which the disk holds: the installed patch did not touch it), so that it is hashed
    /// then rather than first: a `blocks` delta's base on disk, beside the decoding (for a 92
    /// MB library that is the time of one hash), any other's as it is read into memory for the
    /// decoder (one read instead of two, and no hashing before the decoding starts).
    fn hashed_with_decoding(&self, entry: &Entry, touched: bool) -> bool {
        let changes = matches!((&entry.pre, &entry.post),
            (Some(pre @ Image::File { .. }), Some(post)) if !pre.same_content(post));
        changes
            && entry.payload.is_some()
            && matches!(reference(entry), Some((_, None)))
            && !touched
    }

    /// The base file at `path`, read once for its decoder, whose pre-image `pre` is checked by
    /// [`check_read`](Self::check_read) (see [`hashed_with_decoding`](Self::hashed_with_decoding)).
    fn read_base(&self, path: &PkgPath, pre: &Image) -> Result<ReadWhole, ApplyError> {
        let full = self.root.join(path.as_str());
        let size = match pre {
            Image::File { size, .. } => *size,
            _ => 0,
        };
        self.seen
            .read(&full, size)?
            .ok_or_else(|| ApplyError::PreImage {
                root: self.root.to_owned(),
                path: path.clone(),
                reason: format!("it holds more than the {size} bytes expected"),
            })
    }

    /// Check the bytes `bytes` of the base file at `path`, as [`read_base`](Self::read_base)
    /// read them (`read`), against `pre`.
    fn check_read(
        &self,
        path: &PkgPath,
        pre: &Image,
        read: &ReadWhole,
        bytes: &[u8],
    ) -> Result<(), ApplyError> {
        use sha2::Digest as _;
        let sha256 = Digest(sha2::Sha256::digest(bytes).into());
        self.seen.record(read, sha256);
        self.check_file(path, pre, sha256, bytes.len() as u64, &read.meta)
    }

    /// Check a base file at `path` whose bytes have digest `sha256` and length `size`, and
    /// whose metadata is `meta`, against `pre`, the pre-image promised for it.
    fn check_file(
        &self,
        path: &PkgPath,
        pre: &Image,
        sha256: Digest,
        size: u64,
        meta: &fs::Metadata,
    ) -> Result<(), ApplyError> {
        use std::os::unix::fs::MetadataExt as _;
        let actual = Image::File {
            sha256,
            size,
            mode: meta.mode() & 0o7777,
            mtime: mtime_of(meta),
        };
        match image_mismatch(Some(pre), Some(&actual)) {
            None => Ok(()),
            Some(reason) => Err(ApplyError::PreImage {
                root: self.root.to_owned(),
                path: path.clone(),
                reason,
            }),
        }
    }

    /// [`image`](Self::image) of a path [`hashed_with_decoding`](Self::hashed_with_decoding):
    /// a file's digest is taken to be `promised` until then.
    fn image_unread(&self, path: &PkgPath, promised: Digest) -> Result<Option<Image>, ScanError> {
        observe_with(self.root, path, Content::Assume(promised))
    }

    /// Hash the base file at `path` on disk and check it against `pre`, the pre-image promised
    /// for it (see [`hashed_with_decoding`](Self::hashed_with_decoding)).
    fn check_base(&self, path: &PkgPath, pre: &Image) -> Result<(), ApplyError> {
        let full = self.root.join(path.as_str());
        let meta = fs::symlink_metadata(&full).fs("read", &full)?;
        let (sha256, size) = self.seen.digest(&full, &meta)?;
        self.check_file(path, pre, sha256, size, &meta)
    }

    /// The base file at `path`, whose base image is `image`: left on disk when `in_place` and the
    /// disk holds it, else its bytes.
    /// `revert`: the installed patch's revert data of it, if any.
    fn base(
        &self,
        path: &PkgPath,
        image: &Image,
        in_place: bool,
        revert: Option<&str>,
    ) -> Result<Base, RevertError> {
        let on_disk = revert.is_none();
        if let (true, true, Image::File { size, .. }) = (in_place, on_disk, image) {
            let full = self.root.join(path.as_str());
            let file = fs::File::open(&full).fs("open", &full)?;
            return Ok(Base::OnDisk {
                file,
                len: *size,
                path: full,
            });
        }
        self.bytes(path, image, revert).map(Base::Bytes)
    }

    /// The base bytes of a file whose base image is `image`, from the installed patch's revert
    /// data `revert` if there is one.
    fn bytes(
        &self,
        path: &PkgPath,
        image: &Image,
        revert: Option<&str>,
    ) -> Result<Vec<u8>, RevertError> {
        match revert {
            Some(name) => read_revert(
                &self.revert_dir.join(name),
                path,
                image,
                &self.root.join(path.as_str()),
            ),
            None => {
                let full = self.root.join(path.as_str());
                Ok(fs::read(&full).fs("read", &full)?)
            }
        }
    }

    /// Where revert data of the base file at `path` can come from without being made: the
    /// root's file, which holds the base bytes (kept as it was), unless another name in the
    /// tree shares it (a write through that name would change the revert data); or the
    /// installed patch's revert data of it when that is a copy or the base file itself (linked).
    fn keep(&self, path: &PkgPath, revert: Option<&str>) -> Keep {
        use std::os::unix::fs::MetadataExt as _;
        match revert {
            None => {
                let full = self.root.join(path.as_str());
                match fs::symlink_metadata(full).is_ok_and(|m| m.nlink() == 1) {
                    true => Keep::Root,
                    false => Keep::Make,
                }
            }
            Some(name) if name.ends_with(".zst") || name.ends_with(".orig") => {
                Keep::Link(self.revert_dir.join(name))
            }
            Some(_) => Keep::Make,
        }
    }

    /// Names of the entries of directory `dir` in the base release; `touched` holds the
    /// installed record's entries of paths in it, if any.
    fn children(&self, dir: &PkgPath, touched: &Touched) -> Result<BTreeSet<String>, FsError> {
        let full = self.root.join(dir.as_str());
        let mut names = BTreeSet::new();
        let on_disk = matches!(observe(self.root, dir), Ok(Some(Image::Dir { .. })));
        if let (true, Ok(read)) = (on_disk, fs::read_dir(&full)) {
            for item in read {
                let item = item.fs("read directory", &full)?;
                names.insert(item.file_name().to_string_lossy().into_owned());
            }
        }
        for entry in touched.children(dir) {
            let name = entry
                .path
                .as_str()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            if entry.before.is_some() {
                names.insert(name);
            } else {
                names.remove(&name);
            }
        }
        Ok(names)
    }
}

fn read_revert(
    file: &Path,
    path: &PkgPath,
    image: &Image,
    post: &Path,
) -> Result<Vec<u8>, RevertError> {
    let mut bytes = Vec::new();
    read_revert_into(file, path, image, post, &mut bytes)?;
    Ok(bytes)
}

/// A base file for decoding and revert data: its bytes, or for a `blocks` payload (which reads
/// only the ranges it copies) the file itself, so that a 92 MB library is not read into memory
/// for the few bytes that change.
enum Base {
    Bytes(Vec<u8>),
    OnDisk {
        file: fs::File,
        len: u64,
        path: PathBuf,
    },
}

impl Base {
    fn len(&self) -> u64 {
        match self {
            Base::Bytes(bytes) => bytes.len() as u64,
            Base::OnDisk { len, .. } => *len,
        }
    }

    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Base::Bytes(bytes) => Some(bytes),
            Base::OnDisk { .. } => None,
        }
    }
}

/// Decode `entry`'s payload into `out` against its reference: `source`, the bytes of a file
/// elsewhere that the package names, or else its own base `old`.
fn decode_entry(
    pkg: &VerifiedPackage,
    entry: &Entry,
    source: Option<&[u8]>,
    old: Option<&Base>,
    out: &mut dyn std::io::Write,
) -> Result<(), ApplyError> {
    match (source, old) {
        (None, Some(Base::OnDisk { file, len, path })) => pkg
            .decode_file_into(entry, file, *len, out)
            .map_err(|e| match e {
                InPlaceFailure::Payload(failure) => failure.into(),
                InPlaceFailure::Base(e) => FsError::new("read", path, e).into(),
            }),
        _ => Ok(pkg.decode_into(entry, source.or(old.and_then(Base::bytes)), out)?),
    }
}

/// Whether `entry` is a `blocks` delta against its own base.
fn is_own_blocks(entry: &Entry) -> bool {
    matches!(&entry.op, bsi_format::Operation::Delta { encoder, source: None } if encoder == "blocks")
}

/// Where a changed base file's revert data comes from (see [`BaseView::keep`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Keep {
    /// The root's file holds the base bytes: the transaction moves it to `undo/` as it places
    /// the new file, and the commit links it from there into the revert data (`{i}.orig`).
    Root,
    /// The installed patch's revert data holds them in a form that does not depend on the
    /// post-image: linked into the new revert data.
    Link(PathBuf),
    /// Only as bytes (decoded from a reverse delta): a reverse delta or a copy is made.
    Make,
}

/// The revert data of one entry: written while preparing, or the root's base file, which the
/// commit links from `undo/` (see [`Keep::Root`]).
enum Revert {
    Written(String),
    Kept(String),
}

/// Revert data this small is kept without trying a compressed copy (1/64 of the file).
const SURELY_SMALLER: u64 = 64;
/// A reverse delta needs the new file in memory; up to this size, any file gets one.
const REVERSE_IN_MEMORY: u64 = 16 << 20;

/// Keep the base file of entry `i`, whose bytes are `old` when they were read, in `dir`: as
/// a reverse delta from its post-image (`{i}.rev`, a `blocks` payload) derived from the forward
/// `blocks` payload when that is surely smaller, else as `keep` says; what must be made is the
/// smaller of a reverse delta (encoded from the staged new file when it is small enough to
/// read) and a compressed copy (`{i}.zst`).
#[allow(clippy::too_many_arguments)]
fn keep_revert(
    dir: &Path,
    i: usize,
    old: Option<&Base>,
    keep: Keep,
    pkg: &VerifiedPackage,
    entry: &Entry,
    staged: Option<&Path>,
) -> Result<Revert, ApplyError> {
    let post_size = match &entry.post {
        Some(Image::File { size, .. }) => Some(*size),
        _ => None,
    };
    // The forward payload was read and checked when the file was decoded; should reading it
    // again fail, there is no reverse delta from it.
    let forward = match is_own_blocks(entry) {
        true => pkg.payload(entry).ok().flatten(),
        false => None,
    };
    let from_forward = match (post_size, forward, old) {
        (Some(size), Some(payload), Some(Base::Bytes(old))) => {
            bsi_delta::reverse_blocks(old, &payload, size, REVERT_LEVEL).ok()
        }
        (Some(size), Some(payload), Some(Base::OnDisk { file, len, .. })) => {
            bsi_delta::reverse_blocks_file(file, *len, &payload, size, REVERT_LEVEL).ok()
        }
        _ => None,
    };
    let write = |name: &str, bytes: &[u8]| -> Result<(), ApplyError> {
        let file = dir.join(name);
        fsx::write_file(&file, 0o644, None, |out| -> Result<(), ApplyError> {
            out.write_all(bytes).fs("write", &file)?;
            Ok(())
        })
    };
    let (rev_name, copy_name) = (format!("{i}.rev"), format!("{i}.zst"));
    if let (Some(rev), Some(old)) = (&from_forward, old) {
        if rev.len() as u64 <= old.len() / SURELY_SMALLER {
            write(&rev_name, rev)?;
            return Ok(Revert::Written(rev_name));
        }
    }
    match keep {
        Keep::Root => return Ok(Revert::Kept(format!("{i}.orig"))),
        Keep::Link(file) => {
            let ext = file
                .extension()
                .map_or("zst".into(), |e| e.to_string_lossy());
            let name = format!("{i}.{ext}");
            fsx::hard_link(&file, &dir.join(&name))?;
            return Ok(Revert::Written(name));
        }
        Keep::Make => {}
    }
    let Some(old) = old else {
        return Err(ApplyError::PreImage {
            root: dir.to_owned(),
            path: entry.path.clone(),
            reason: "its base bytes are not available".to_owned(),
        });
    };
    // A compressed copy made beside the reverse delta, if any.
    let (reverse, copied) = match (post_size, from_forward, staged, old) {
        (_, Some(reverse), _, _) => (Some(reverse), None),
        // Encoding the reverse delta reads both files; the copy it must beat reads only the
        // old one, so it is made at the same time, on another core (libcrypto: 34 ms and
        // 16 ms).
        (Some(size), None, Some(staged), Base::Bytes(old)) if size <= REVERSE_IN_MEMORY => {
            let (reverse, copied) = rayon::join(
                || -> Result<_, ApplyError> {
                    let new = fs::read(staged).fs("read", staged)?;
                    Ok(bsi_delta::Blocks::encode_at(&new, old, REVERT_LEVEL).ok())
                },
                || {
                    let mut copy = Vec::new();
                    bsi_delta::compress_into(old, REVERT_LEVEL, &mut copy).map(|()| copy)
                },
            );
            (reverse?, copied.ok())
        }
        _ => (None, None),
    };
    if let Some(rev) = reverse
        .as_deref()
        .filter(|r| r.len() as u64 <= old.len() / SURELY_SMALLER)
    {
        write(&rev_name, rev)?;
        return Ok(Revert::Written(rev_name));
    }
    if let Some(copied) = copied {
        return match reverse {
            Some(rev) if rev.len() < copied.len() => {
                write(&rev_name, &rev)?;
                Ok(Revert::Written(rev_name))
            }
            _ => {
                write(&copy_name, &copied)?;
                Ok(Revert::Written(copy_name))
            }
        };
    }
    let copy = dir.join(&copy_name);
    fsx::write_file(&copy, 0o644, None, |out| -> Result<(), ApplyError> {
        match old {
            Base::Bytes(old) => bsi_delta::compress_into(old, REVERT_LEVEL, out).fs("write", &copy),
            // A base cut short since its check fails here, as it is read.
            Base::OnDisk { file, len, path } => {
                let input = std::io::BufReader::with_capacity(1 << 20, file);
                bsi_delta::compress_stream_into(input, *len, REVERT_LEVEL, out)
                    .fs("keep a copy of", path)
            }
        }?;
        Ok(())
    })?;
    let copy_len = fs::metadata(&copy).fs("read", &copy)?.len();
    match reverse {
        Some(rev) if (rev.len() as u64) < copy_len => {
            write(&rev_name, &rev)?;
            fsx::remove_file(&copy)?;
            Ok(Revert::Written(rev_name))
        }
        _ => Ok(Revert::Written(copy_name)),
    }
}

/// Stream the revert data `file` of `path`, whose base image is `image`, into `out`, checking
/// its length and digest; `out` must be discarded on error. A reverse delta (`.rev`) is decoded
/// against the post-image at `post`, which the caller has checked.
fn read_revert_into(
    file: &Path,
    path: &PkgPath,
    image: &Image,
    post: &Path,
    out: &mut dyn std::io::Write,
) -> Result<(), RevertError> {
    let damaged = || RevertError::RevertData {
        file: file.to_owned(),
        path: path.clone(),
    };
    let Image::File { sha256, size, .. } = image else {
        return Err(damaged());
    };
    let mut hashing = HashingWriter::new(out);
    let kind = file.extension().and_then(|e| e.to_str());
    let decoded = if kind == Some("orig") {
        // The base file itself: its bytes as they are.
        let mut input = fs::File::open(file).fs("read", file)?;
        if input.metadata().fs("read", file)?.len() != *size {
            return Err(damaged());
        }
        std::io::copy(&mut input, &mut hashing)
            .map(drop)
            .map_err(bsi_delta::DecodeError::Output)
    } else if kind == Some("rev") {
        let payload = fs::read(file).fs("read", file)?;
        let new = fs::read(post).fs("read", post)?;
        bsi_delta::Blocks.decode_into(&new, &payload, *size, &mut hashing)
    } else {
        let input = std::io::BufReader::new(fs::File::open(file).fs("read", file)?);
        bsi_delta::decompress_stream_into(input, *size, &mut hashing)
    };
    decoded.map_err(|e| match e {
        bsi_delta::DecodeError::Output(source) => {
            RevertError::Fs(FsError::new("write", file, source))
        }
        _ => damaged(),
    })?;
    if hashing.digest() != *sha256 {
        return Err(damaged());
    }
    Ok(())
}

/// Where the state directory lies inside the root, if it does.
fn state_inside_root(root: &Path, state_dir: &Path) -> Option<String> {
    let root = fs::canonicalize(root).ok()?;
    let state = match fs::canonicalize(state_dir) {
        Ok(s) => s,
        Err(_) => {
            let parent = fs::canonicalize(state_dir.parent()?).ok()?;
            parent.join(state_dir.file_name()?)
        }
    };
    let rel = state.strip_prefix(&root).ok()?;
    rel.to_str().map(str::to_owned)
}

/// Check the installed patch's post-images are all on disk.
/// A file or symlink rewritten since, even with the same bytes (a full OS update does that), has
/// another time; directories are not held to theirs, which change whenever an entry is added.
fn check_installed(
    root: &Path,
    entries: &[InstalledEntry],
    seen: &Seen,
) -> Result<(), RevertError> {
    for entry in entries {
        let actual = observe_with(root, &entry.path, Content::Read(Some(seen)))?;
        let reason = image_mismatch(entry.after.as_ref(), actual.as_ref()).or_else(|| {
            match (&entry.after, &actual) {
                (Some(after), Some(now))
                    if !matches!(after, Image::Dir { .. }) && after.mtime() != now.mtime() =>
                {
                    Some(format!(
                        "it was rewritten (time {:?}, expected {:?})",
                        now.mtime(),
                        after.mtime()
                    ))
                }
                _ => None,
            }
        });
        if let Some(reason) = reason {
            return Err(RevertError::Changed {
                root: root.to_owned(),
                path: entry.path.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// Install `pkg` on `root` (taking the root's lock and recovering first). Every pre-image is
/// checked and every payload decoded and checked before the first write into the root; a newer
/// letter for the same release replaces an installed one in the same transaction.
pub fn apply(
    pkg: &VerifiedPackage,
    root: &Path,
    state_dir: &Path,
    progress: &dyn Progress,
) -> Result<ApplyOutcome, ApplyError> {
    Session::open(root, state_dir, false)?.apply(pkg, progress)
}

/// Remove the installed patch (taking the root's lock and recovering first); see
/// [`Session::revert`].
pub fn revert(root: &Path, state_dir: &Path) -> Result<Letter, RevertError> {
    Session::open(root, state_dir, false)?.revert()
}

/// Complete or roll back an interrupted operation on `root`; `None` when there was none.
pub fn recover(
    root: &Path,
    state_dir: &Path,
    wait: bool,
) -> Result<Option<Recovered>, SessionError> {
    Ok(Session::open(root, state_dir, wait)?.recovered)
}

/// The right to change a root: its lock, held until the session is dropped. Opening a session
/// completes or rolls back an interrupted operation first.
#[derive(Debug)]
pub struct Session {
    root: PathBuf,
    state: StateDir,
    _lock: fs::File,
    /// What recovery did when the session opened.
    pub recovered: Option<Recovered>,
}

impl Session {
    /// Lock `root` (an advisory lock on the directory itself, so that no file is added to the
    /// tree); refused at once when another operation holds it, unless `wait`.
    pub fn open(root: &Path, state_dir: &Path, wait: bool) -> Result<Session, SessionError> {
        if !root.is_dir() {
            return Err(SessionError::Root(root.to_owned()));
        }
        let lock = fs::File::open(root).fs("open", root)?;
        if wait {
            lock.lock().fs("lock", root)?;
        } else {
            match lock.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(SessionError::Busy(root.to_owned()))
                }
                Err(fs::TryLockError::Error(e)) => return Err(FsError::new("lock", root, e).into()),
            }
        }
        if fs::symlink_metadata(state_dir).is_ok_and(|m| !m.is_dir()) {
            return Err(SessionError::StateNotDir(state_dir.to_owned()));
        }
        if device_of(root) != device_of(state_dir) {
            return Err(SessionError::OtherFilesystem {
                state: state_dir.to_owned(),
                root: root.to_owned(),
            });
        }
        let state = StateDir::new(state_dir);
        let recovered = txn::recover(root, &state).map_err(|source| SessionError::Recover {
            root: root.to_owned(),
            source,
        })?;
        Ok(Session {
            root: root.to_owned(),
            state,
            _lock: lock,
            recovered,
        })
    }

    /// Install `pkg`; see [`apply`].
    pub fn apply(
        &self,
        pkg: &VerifiedPackage,
        progress: &dyn Progress,
    ) -> Result<ApplyOutcome, ApplyError> {
        apply_locked(pkg, &self.root, &self.state, progress)
    }

    /// Remove the installed patch: the root returns to its base release exactly, and nothing of
    /// the patch stays in the state directory. Refused, writing nothing, when any patched path
    /// changed.
    pub fn revert(&self) -> Result<Letter, RevertError> {
        revert_locked(&self.root, &self.state)
    }
}

/// What an apply keeps of the installed record of the letter it replaces, which it walks a
/// block at a time and never holds whole (a switch of 150,750 entries held 25 MiB of it): the
/// entries it looks up out of path order. Those are the entries' ancestors', the sources' that
/// deltas name, and those of paths right inside the directories the package removes.
#[derive(Default)]
struct Touched {
    aside: std::collections::BTreeMap<PkgPath, InstalledEntry>,
}

/// The paths an apply looks up out of path order: the package's entries' ancestors (one for
/// each directory above an entry), the sources its deltas name, the directories it removes.
#[derive(Default)]
struct Wanted {
    ancestors: BTreeSet<PkgPath>,
    sources: BTreeSet<PkgPath>,
    removed_dirs: BTreeSet<PkgPath>,
}

impl Wanted {
    fn of(entries: &Entries) -> Result<Wanted, FsError> {
        let mut wanted = Wanted::default();
        entries.walk(0..entries.len(), txn::BLOCK, &mut |_, block| {
            for entry in block {
                if let Some((_, Some(src))) = reference(entry) {
                    wanted.sources.insert(src.path.clone());
                }
                if removes_dir(entry) {
                    wanted.removed_dirs.insert(entry.path.clone());
                }
                let mut up = entry.path.parent();
                // Those above one already known are known.
                while let Some(dir) = up.filter(|d| !wanted.ancestors.contains(d)) {
                    up = dir.parent();
                    wanted.ancestors.insert(dir);
                }
            }
            Ok::<(), FsError>(())
        })?;
        Ok(wanted)
    }
}

/// Whether `entry` removes a directory (or puts something else in its place).
fn removes_dir(entry: &Entry) -> bool {
    matches!(entry.pre, Some(Image::Dir { .. })) && !matches!(entry.post, Some(Image::Dir { .. }))
}

impl Touched {
    /// Keep aside what is wanted of a block of the installed record.
    fn keep(&mut self, block: &[InstalledEntry], wanted: &Wanted) {
        for e in block {
            let inside_removed = || {
                e.path
                    .parent()
                    .is_some_and(|p| wanted.removed_dirs.contains(&p))
            };
            if wanted.ancestors.contains(&e.path)
                || wanted.sources.contains(&e.path)
                || inside_removed()
            {
                self.aside.insert(e.path.clone(), e.clone());
            }
        }
    }

    fn get(&self, path: &PkgPath) -> Option<&InstalledEntry> {
        self.aside.get(path)
    }

    /// The entries kept aside of paths right inside `dir`.
    fn children<'t>(&'t self, dir: &'t PkgPath) -> impl Iterator<Item = &'t InstalledEntry> {
        // The paths that begin with the text of `dir` lie together from it, those below it
        // among them.
        self.aside
            .range(dir..)
            .map(|(_, e)| e)
            .take_while(move |e| e.path.as_str().starts_with(dir.as_str()))
            .filter(move |e| e.path.parent().as_ref() == Some(dir))
    }
}

/// The installed record's entry of a path, looked up in the block of it being walked, else
/// among those kept aside.
#[derive(Clone, Copy)]
struct Lookup<'t> {
    block: &'t [InstalledEntry],
    touched: &'t Touched,
}

impl<'t> Lookup<'t> {
    /// Where `path` lies in the block, if it does.
    fn index(&self, path: &PkgPath) -> Option<usize> {
        self.block.binary_search_by(|e| e.path.cmp(path)).ok()
    }

    fn get(&self, path: &PkgPath) -> Option<&'t InstalledEntry> {
        match self.block.binary_search_by(|e| e.path.cmp(path)) {
            Ok(i) => Some(&self.block[i]),
            Err(_) => self.touched.get(path),
        }
    }
}

/// What the entries say of the directories above the entries being checked, looked up by path
/// (among entries kept aside, a binary search reads one entry a step): the images before and
/// after of each directory's entry, if it has one. The entries are checked in path order, so
/// that those above them repeat; a few thousand are kept.
struct DirEntries<'m> {
    entries: &'m Entries,
    known: std::collections::HashMap<PkgPath, Option<DirImages>>,
}

/// The images before and after of an entry.
type DirImages = (Option<Image>, Option<Image>);

impl<'m> DirEntries<'m> {
    fn new(entries: &'m Entries) -> DirEntries<'m> {
        DirEntries {
            entries,
            known: std::collections::HashMap::new(),
        }
    }

    fn get(&mut self, dir: &PkgPath) -> Result<Option<DirImages>, FsError> {
        if let Some(known) = self.known.get(dir) {
            return Ok(known.clone());
        }
        if self.known.len() >= txn::BLOCK {
            self.known.clear();
        }
        let found = self
            .entries
            .find(dir)?
            .map(|(_, e)| (e.pre.clone(), e.post.clone()));
        self.known.insert(dir.clone(), found.clone());
        Ok(found)
    }
}

/// A step that has something to prepare (a file to stage, a base file to keep in the revert
/// data), taken out of the walk that makes the steps: 40 bytes, and what the installed record
/// says of its path when the installed letter touched it (the record being walked is not
/// held). Its entry is read again when it is prepared.
struct Work {
    /// Its index among the steps.
    j: usize,
    /// The larger of its file before and after.
    weight: u64,
    of: WorkOf,
}

/// Whose step a [`Work`] is.
enum WorkOf {
    /// The entry of this index, and the installed record's entry of its path, if any.
    Entry(usize, Option<Box<InstalledEntry>>),
    /// A path only the installed letter touched, going back to its base.
    Touched(Box<InstalledEntry>),
}

impl Work {
    /// Its entry's index, unless the installed letter alone touched its path.
    fn entry(&self) -> Option<usize> {
        match self.of {
            WorkOf::Entry(i, _) => Some(i),
            WorkOf::Touched(_) => None,
        }
    }

    /// Its entry read again, unless the installed letter alone touched its path.
    fn resolve<'e>(&self, entries: &'e Entries) -> Result<Resolved<'_, 'e>, FsError> {
        Ok(match &self.of {
            WorkOf::Entry(i, touched) => Resolved::Entry(*i, entries.get(*i)?, touched.as_deref()),
            WorkOf::Touched(t) => Resolved::Touched(t),
        })
    }
}

/// A [`Work`] with its entry (one at a time, while it is prepared).
#[allow(clippy::large_enum_variant)]
enum Resolved<'w, 'e> {
    /// The entry of this index, and the installed record's entry of its path, if any.
    Entry(usize, Cow<'e, Entry>, Option<&'w InstalledEntry>),
    /// A path only the installed letter touched, going back to its base.
    Touched(&'w InstalledEntry),
}

impl Resolved<'_, '_> {
    /// The step, with the images `found` at the entries' paths.
    fn step<'s>(&'s self, found: &'s [Option<Box<Image>>]) -> Step<'s> {
        match self {
            Resolved::Entry(i, entry, touched) => entry_step(entry, &found[*i], *touched),
            Resolved::Touched(t) => back_to_base(&t.path, t),
        }
    }

    fn entry(&self) -> Option<(usize, &Entry)> {
        match self {
            Resolved::Entry(i, entry, _) => Some((*i, entry)),
            Resolved::Touched(_) => None,
        }
    }

    /// What the installed record says of its path, if anything.
    fn touched(&self) -> Option<&InstalledEntry> {
        match self {
            Resolved::Entry(_, _, touched) => *touched,
            Resolved::Touched(t) => Some(t),
        }
    }
}

/// The step of `entry`, with the image `found` at its path (where not its pre-image exactly)
/// and the installed record's entry of its path (`on`), if any.
fn entry_step<'a>(
    entry: &'a Entry,
    found: &'a Option<Box<Image>>,
    on: Option<&'a InstalledEntry>,
) -> Step<'a> {
    Step {
        path: &entry.path,
        from: on.map_or(crate::state::before(entry, found), |t| t.after.as_ref()),
        to: entry.post.as_ref(),
    }
}

fn apply_locked(
    pkg: &VerifiedPackage,
    root: &Path,
    state: &StateDir,
    progress: &dyn Progress,
) -> Result<ApplyOutcome, ApplyError> {
    let m = &pkg.manifest;
    let installed = state.load_head()?;
    let seen = Seen::default();
    let package_title = pkg.title();
    if let Some(inst) = &installed {
        let installed_title = release_title(&inst.product, &inst.base.version, inst.letter);
        if inst.product != m.product || inst.base != m.base {
            return Err(ApplyError::OtherRelease {
                root: root.to_owned(),
                installed: installed_title,
                package: package_title,
            });
        }
        if inst.letter == m.letter && inst.package_sha256 == pkg.digest {
            state.walk_entries(txn::BLOCK, &mut |_, block| -> Result<(), ApplyError> {
                Ok(check_installed(root, block, &seen)?)
            })?;
            return Ok(ApplyOutcome::AlreadyInstalled);
        }
        if inst.letter >= m.letter {
            return Err(ApplyError::NotNewer {
                root: root.to_owned(),
                installed: installed_title,
                package: package_title,
            });
        }
    }
    let view = BaseView::new(root, state, &seen);
    let state_rel = state_inside_root(root, &state.dir);
    let entries = &m.entries;
    let mut dirs = DirEntries::new(entries);

    // 1. Every pre-image, every ancestor, before any write; with a letter installed, every
    //    path as it left it, its record walked a block at a time beside the entries (both
    //    sorted by path). What each entry's path holds, in the entries' order, where it is not
    //    the entry's pre-image exactly (its time differs; `None`: it is): the installed
    //    record's `before`, which the record after borrows, as it borrows the rest from the
    //    entries (8 bytes an entry, where an image of its own takes 64).
    let mut found_images: Vec<Option<Box<Image>>> = Vec::with_capacity(entries.len());
    let inside_state = |path: &PkgPath| state_rel.as_deref().is_some_and(|s| path.is_within(s));
    // The room the staging and the revert data take.
    let (mut staging_bytes, mut revert_bytes) = (0u64, 0u64);
    // The entries whose checks need what lies after them in the installed record: a removed
    // directory's children, a delta's source.
    let mut later = Vec::new();
    // The room the staging and the revert data of entries `range` take; `matched` marks the
    // entries of the record's block that have an entry.
    let mut check = |range: std::ops::Range<usize>,
                     touched: Lookup,
                     matched: &mut [bool],
                     found_images: &mut Vec<Option<Box<Image>>>|
     -> Result<(u64, u64), ApplyError> {
        let (mut staging_bytes, mut revert_bytes) = (0u64, 0u64);
        // Read and hash on every core (not what lies in the state directory, refused below,
        // nor a base hashed beside its decoding), a few thousand entries at a time (what was
        // found, with room for an error each, took 17.6 MB for 100,500 entries at once); what
        // was found is looked at in order.
        entries.walk(range, txn::BLOCK, &mut |first, chunk| {
            let images: Vec<Result<Option<Image>, ScanError>> = chunk
                .par_iter()
                .map(|e| {
                    let on = touched.get(&e.path);
                    match (inside_state(&e.path), &e.pre) {
                        (true, _) => Ok(None),
                        (false, Some(Image::File { sha256, .. }))
                            if view.hashed_with_decoding(e, on.is_some()) =>
                        {
                            view.image_unread(&e.path, *sha256)
                        }
                        (false, _) => view.image(&e.path, on),
                    }
                })
                .collect();
            for (k, (entry, image)) in chunk.iter().zip(images).enumerate() {
                let i = first + k;
                if inside_state(&entry.path) {
                    return Err(ApplyError::InsideState {
                        root: root.to_owned(),
                        path: entry.path.clone(),
                    });
                }
                // Ancestors first: a path below a symlink reads as missing, which would hide
                // the reason.
                check_ancestors(root, &view, &mut dirs, entry, touched)?;
                let actual = image?;
                if let Some(reason) = image_mismatch(entry.pre.as_ref(), actual.as_ref()) {
                    return Err(ApplyError::PreImage {
                        root: root.to_owned(),
                        path: entry.path.clone(),
                        reason,
                    });
                }
                if removes_dir(entry) || matches!(reference(entry), Some((_, Some(_)))) {
                    later.push(i);
                }
                found_images.push(
                    actual
                        .filter(|a| entry.pre.as_ref() != Some(a))
                        .map(Box::new),
                );
                let on = match touched.index(&entry.path) {
                    Some(k) => {
                        matched[k] = true;
                        Some(&touched.block[k])
                    }
                    None => touched.get(&entry.path),
                };
                let base = crate::state::before(entry, &found_images[i]);
                let step = entry_step(entry, &found_images[i], on);
                if step.needs_content() {
                    staging_bytes += file_size(step.to);
                }
                let changes =
                    !matches!((base, &entry.post), (Some(b), Some(p)) if b.same_content(p));
                if changes {
                    // A base file kept as it is, or linked, takes no room, but a reverse delta
                    // from a blocks payload may be kept instead (up to 1/64 of it).
                    let size = file_size(base);
                    let revert = on.and_then(|t| t.revert.as_deref());
                    revert_bytes += match view.keep(&entry.path, revert) == Keep::Make {
                        true => size,
                        false => size / SURELY_SMALLER,
                    };
                }
            }
            Ok(())
        })?;
        Ok((staging_bytes, revert_bytes))
    };
    let mut touched = Touched::default();
    let mut next = 0;
    let walked = match installed {
        None => None,
        Some(_) => {
            let wanted = Wanted::of(entries)?;
            state.walk_entries(txn::BLOCK, &mut |_, block| -> Result<(), ApplyError> {
                check_installed(root, block, &seen)?;
                touched.keep(block, &wanted);
                let Some(last) = block.last() else {
                    return Ok(());
                };
                let end = entries.after(next, &last.path)?;
                let lookup = Lookup {
                    block,
                    touched: &touched,
                };
                let mut matched = vec![false; block.len()];
                let (staging, revert) = check(next..end, lookup, &mut matched, &mut found_images)?;
                (staging_bytes, revert_bytes) = (staging_bytes + staging, revert_bytes + revert);
                next = end;
                // The paths only the installed letter touched go back to their base.
                for (t, _) in block.iter().zip(matched).filter(|(_, m)| !m) {
                    let step = back_to_base(&t.path, t);
                    if step.needs_content() {
                        staging_bytes += file_size(step.to);
                    }
                }
                Ok(())
            })?
        }
    };
    let rest = Lookup {
        block: &[],
        touched: &touched,
    };
    let (staging, revert) = check(next..entries.len(), rest, &mut [], &mut found_images)?;
    (staging_bytes, revert_bytes) = (staging_bytes + staging, revert_bytes + revert);
    for i in later {
        let entry = entries.get(i)?;
        if removes_dir(&entry) {
            for child in view.children(&entry.path, &touched)? {
                let child_path = PkgPath::new(&format!("{}/{child}", entry.path)).map_err(|e| {
                    FsError::new(
                        "read",
                        &root.join(entry.path.as_str()),
                        std::io::Error::other(e),
                    )
                })?;
                let removed = entries
                    .find(&child_path)?
                    .is_some_and(|(_, c)| c.post.is_none());
                if !removed {
                    return Err(ApplyError::DirectoryNotEmpty {
                        root: root.to_owned(),
                        path: entry.path.clone(),
                        child: child_path.to_string(),
                    });
                }
            }
        }
        if let Some((_, Some(src))) = reference(&entry) {
            let image = view.image(&src.path, touched.get(&src.path))?;
            let inside_state = state_rel.as_deref().is_some_and(|s| src.path.is_within(s));
            if inside_state || !source_matches(src, image.as_ref()) {
                return Err(ApplyError::PreImage {
                    root: root.to_owned(),
                    path: src.path.clone(),
                    reason: format!("it is not the source of {} the package names", entry.path),
                });
            }
        }
    }

    // 2. Prepare, writing nothing in the root: stage every new file (decoding payloads against
    //    the base) and keep a compressed copy of every base file this package changes; first
    //    check that the disk has room for both. The steps from the tree as it is to the tree
    //    this package makes are written into the journal as they are made, in path order: its
    //    entries (sorted by path, which the manifest's validation checked), and merged between
    //    them the paths only the installed letter touched, which go back to their base; those
    //    with something to prepare are taken aside.
    Space::check(staging_bytes, revert_bytes, &state.dir).map_err(|space| ApplyError::NoSpace {
        root: root.to_owned(),
        space,
    })?;
    let txn = TxnDir::begin(state)?;
    let base_title = format!("{} {}", m.product, m.base.version);
    let (kind, from_title) = match &installed {
        Some(i) => (
            TxnKind::Switch,
            release_title(&i.product, &i.base.version, i.letter),
        ),
        None => (TxnKind::Apply, base_title),
    };
    let titles = (from_title.as_str(), package_title.as_str());
    let found_images = &found_images;
    let written = txn::write_journal(&txn, kind, titles, root, |write| {
        let mut works: Vec<Work> = Vec::new();
        // The bytes of the files to decode or copy into the staging.
        let mut staged_bytes = 0u64;
        let mut j = 0;
        let mut step = |step: Step,
                        entry: Option<(usize, &Entry)>,
                        on: Option<&InstalledEntry>|
         -> Result<(), ApplyError> {
            write(&step)?;
            let keeps_bytes = match entry {
                Some((i, entry)) => {
                    let base = crate::state::before(entry, &found_images[i]);
                    let post = entry.post.as_ref();
                    !matches!(base, Some(Image::File { .. }))
                        || post.is_some_and(|p| base.is_some_and(|b| b.same_content(p)))
                }
                None => true,
            };
            if step.needs_content() || !keeps_bytes {
                let on = on.cloned().map(Box::new);
                // A step without an entry is of a path the installed letter touched.
                let of = match (entry, on) {
                    (Some((i, _)), on) => Some(WorkOf::Entry(i, on)),
                    (None, on) => on.map(WorkOf::Touched),
                };
                if step.needs_content() {
                    staged_bytes += file_size(step.to);
                }
                let weight = file_size(step.from).max(file_size(step.to));
                works.extend(of.map(|of| Work { j, weight, of }));
            }
            j += 1;
            Ok(())
        };
        let mut next = 0;
        let again = match installed {
            None => None,
            Some(_) => {
                state.walk_entries(txn::BLOCK, &mut |_, block| -> Result<(), ApplyError> {
                    let Some(last) = block.last() else {
                        return Ok(());
                    };
                    let end = entries.after(next, &last.path)?;
                    // Both in path order, each path once: a record's entry without an entry
                    // comes between them; one with an entry, with it.
                    let mut record = block.iter().peekable();
                    entries.walk::<ApplyError>(next..end, txn::BLOCK, &mut |first, chunk| {
                        for (k, entry) in chunk.iter().enumerate() {
                            let i = first + k;
                            while let Some(t) = record.next_if(|t| t.path < entry.path) {
                                step(back_to_base(&t.path, t), None, Some(t))?;
                            }
                            let on = record.next_if(|t| t.path == entry.path);
                            let step_i = entry_step(entry, &found_images[i], on);
                            step(step_i, Some((i, entry)), on)?;
                        }
                        Ok(())
                    })?;
                    for t in record {
                        step(back_to_base(&t.path, t), None, Some(t))?;
                    }
                    next = end;
                    Ok(())
                })?
            }
        };
        if again != walked {
            return Err(ApplyError::State(StateError::Damaged {
                path: state.installed_path(),
                reason: "it changed while it was read".to_owned(),
            }));
        }
        entries.walk::<ApplyError>(next..entries.len(), txn::BLOCK, &mut |first, chunk| {
            for (k, entry) in chunk.iter().enumerate() {
                let i = first + k;
                let step_i = entry_step(entry, &found_images[i], None);
                step(step_i, Some((i, entry)), None)?;
            }
            Ok(())
        })?;
        let kept_and_names = prepare_works(
            pkg,
            root,
            &txn,
            &view,
            &touched,
            (works, staged_bytes),
            found_images,
            progress,
        )?;
        let (kept, revert_names) = kept_and_names;

        // 3. The record after, staged before the journal that names it.
        let record = Record {
            format: STATE_FORMAT,
            product: &m.product,
            base: &m.base,
            letter: m.letter,
            package_sha256: pkg.digest,
            signer: &m.signer,
            entries: RecordEntries::Planned {
                entries,
                found: found_images,
                names: &revert_names,
            },
        };
        txn.stage_record(&record)?;
        Ok(txn::Tail { kept, record: true })
    });
    let written = written.inspect_err(|_| txn.abandon())?;

    // 4. The transaction: write, check, record.
    txn::run_written(root, state, &txn, written, &seen).map_err(|source| ApplyError::Txn {
        root: root.to_owned(),
        source: Box::new(source),
    })?;
    Ok(match installed {
        Some(previous) => ApplyOutcome::Replaced {
            previous: previous.letter,
        },
        None => ApplyOutcome::Installed,
    })
}

/// The step of a path only the installed letter touched: back to its base.
fn back_to_base<'a>(path: &'a PkgPath, touched: &'a InstalledEntry) -> Step<'a> {
    Step {
        path,
        from: touched.after.as_ref(),
        to: touched.before.as_ref(),
    }
}

/// What the revert data keeps as the root's base file (the step, its name), and the revert
/// data's name of each entry that has one, by entry, in order.
type Kept = (Vec<(usize, String)>, Vec<(usize, String)>);

/// Stage what each of `works` needs (decoding payloads against the base, checked against the
/// pre-images read) and keep the revert data of each base file whose bytes change.
#[allow(clippy::too_many_arguments)]
fn prepare_works(
    pkg: &VerifiedPackage,
    root: &Path,
    txn: &TxnDir,
    view: &BaseView,
    touched: &Touched,
    (works, total): (Vec<Work>, u64),
    found_images: &[Option<Box<Image>>],
    progress: &dyn Progress,
) -> Result<Kept, ApplyError> {
    let m = &pkg.manifest;
    let seen = view.seen;
    progress.start("decoding", total);
    let unsynced = fsx::Unsynced::default();
    let prepare = |w: &Work| -> Result<Option<Revert>, ApplyError> {
        let resolved = w.resolve(&m.entries)?;
        let step = resolved.step(found_images);
        let was_touched = resolved.touched().is_some();
        let j = w.j;
        let entry = resolved.entry().map(|(_, e)| e);
        let base = match resolved.entry() {
            Some((i, entry)) => crate::state::before(entry, &found_images[i]),
            // A path only the installed letter touched goes back to its base.
            None => step.to,
        };
        let revert = resolved.touched().and_then(|t| t.revert.as_deref());
        let keeps_bytes = match (entry, &base) {
            (Some(e), Some(b)) => e.post.as_ref().is_some_and(|p| b.same_content(p)),
            _ => true,
        };
        let own_is_reference = entry.is_some_and(|e| matches!(reference(e), Some((_, None))));
        let needs_base = step.needs_content() && entry.is_none_or(|e| e.payload.is_none());
        let in_place = entry.is_some_and(|e| e.payload.is_some() && is_own_blocks(e));
        // How the revert data keeps a base file whose bytes change.
        let keep = match (&base, keeps_bytes) {
            (Some(Image::File { .. }), false) => Some(view.keep(step.path, revert)),
            _ => None,
        };
        let made = keep == Some(Keep::Make);
        // A base the decoding reads whole is read once, and hashed and checked against its
        // pre-image beside the decoding.
        let read_whole = entry
            .filter(|e| !in_place && view.hashed_with_decoding(e, was_touched))
            .and_then(|e| e.pre.as_ref());
        let mut unchecked = None;
        let old = match (&base, read_whole) {
            (Some(Image::File { .. }), Some(pre)) => {
                let mut read = view.read_base(step.path, pre)?;
                let bytes = std::mem::take(&mut read.bytes);
                unchecked = Some((pre, read));
                Some(Base::Bytes(bytes))
            }
            (Some(img @ Image::File { .. }), None) if own_is_reference || made || needs_base => {
                Some(view.base(step.path, img, in_place, revert)?)
            }
            _ => None,
        };
        if let (
            true,
            Some(Image::File {
                mode,
                mtime,
                size,
                sha256,
            }),
        ) = (step.needs_content(), &step.to)
        {
            let file = txn.stage(j);
            match entry.filter(|e| e.payload.is_some()) {
                Some(entry) => {
                    let source_bytes = match reference(entry) {
                        Some((_, Some(src))) => {
                            let on = touched.get(&src.path).and_then(|t| t.revert.as_deref());
                            Some(view.bytes(&src.path, &source_image(src), on)?)
                        }
                        _ => None,
                    };
                    let stage = || {
                        unsynced.write_file(&file, *mode, Some(*mtime), |out| {
                            decode_entry(pkg, entry, source_bytes.as_deref(), old.as_ref(), out)
                        })
                    };
                    // The decoding starts at once on this core; the hashing of the base is
                    // what another core takes once it is free, else this one after the decoding
                    // (the other way round, libcrypto's 4.7 MB were hashed before its decoding
                    // while the other core was busy: libssl3's apply took 91 ms, now 74 ms).
                    match &entry.pre {
                        // Its base is read on disk as it is decoded: hashed beside the
                        // decoding, on another core.
                        Some(pre) if in_place && view.hashed_with_decoding(entry, was_touched) => {
                            let (staged, checked) =
                                rayon::join(stage, || view.check_base(step.path, pre));
                            checked.and(staged)?;
                        }
                        // Its base was read whole: hashed beside the decoding, on another core.
                        _ => match (unchecked.take(), old.as_ref().and_then(Base::bytes)) {
                            (Some((pre, read)), Some(bytes)) => {
                                let check = || view.check_read(step.path, pre, &read, bytes);
                                let (staged, checked) = rayon::join(stage, check);
                                checked.and(staged)?;
                            }
                            _ => stage()?,
                        },
                    }
                    // The decoded bytes were checked against the post-image as written.
                    seen.wrote(&file, *sha256);
                }
                None => {
                    let old =
                        old.as_ref()
                            .and_then(Base::bytes)
                            .ok_or_else(|| ApplyError::PreImage {
                                root: root.to_owned(),
                                path: step.path.clone(),
                                reason: "its base bytes are not available".to_owned(),
                            })?;
                    unsynced.write_file(
                        &file,
                        *mode,
                        Some(*mtime),
                        |out| -> Result<(), ApplyError> {
                            out.write_all(old).fs("write", &file)?;
                            Ok(())
                        },
                    )?;
                }
            }
            progress.advance(*size);
        }
        // A base read whole whose file needed no decoding is checked all the same.
        if let (Some((pre, read)), Some(bytes)) = (unchecked, old.as_ref().and_then(Base::bytes)) {
            view.check_read(step.path, pre, &read, bytes)?;
        }
        let staged = txn.stage(j);
        let revert = match (keep, entry) {
            (Some(keep), Some(entry)) => Some(keep_revert(
                &txn.revert_dir(),
                resolved.entry().map_or(j, |(i, _)| i),
                old.as_ref(),
                keep,
                pkg,
                entry,
                staged.exists().then_some(staged.as_path()),
            )?),
            _ => None,
        };
        Ok(revert)
    };
    // Large files one at a time, so that memory stays near the largest file, and first, largest
    // first: the small files, decoded in parallel, leave the allocator's heaps holding freed
    // memory that a large file would otherwise find there (Firefox: 248 MiB at libxul.so's
    // peak after them, 208 MiB before them); then the rest in parallel.
    let weight = |k: usize| works[k].weight;
    let (mut large, small): (Vec<usize>, Vec<usize>) =
        (0..works.len()).partition(|&k| weight(k) >= LARGE_FILE);
    large.sort_by_key(|&k| std::cmp::Reverse(weight(k)));
    // What the revert data keeps, for the steps that change a base file's bytes only.
    let made = std::sync::Mutex::new(Vec::new());
    let prepare_step = |k: usize| -> Result<(), ApplyError> {
        if let Some(revert) = prepare(&works[k])? {
            made.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((k, revert));
        }
        Ok(())
    };
    let prepared = large
        .into_iter()
        .try_for_each(&prepare_step)
        .and_then(|()| largest_first(small, weight, prepare_step).map(drop));
    progress.finish();
    prepared?;
    unsynced.sync()?;
    let mut made = made.into_inner().unwrap_or_else(|e| e.into_inner());
    made.sort_unstable_by_key(|(k, _)| *k);
    let mut kept = Vec::new();
    let mut revert_names: Vec<(usize, String)> = Vec::with_capacity(made.len());
    for (k, revert) in made {
        let Some(i) = works[k].entry() else {
            continue;
        };
        let name = match revert {
            Revert::Written(name) => name,
            Revert::Kept(name) => {
                kept.push((works[k].j, name.clone()));
                name
            }
        };
        revert_names.push((i, name));
    }
    Ok((kept, revert_names))
}

/// Every ancestor of an entry is a real directory before (when the entry has a pre-image) and
/// after (when it has a post-image): no write may go through a symlink or a file.
fn check_ancestors(
    root: &Path,
    view: &BaseView<'_>,
    dirs: &mut DirEntries,
    entry: &Entry,
    touched: Lookup,
) -> Result<(), ApplyError> {
    let mut ancestor = entry.path.parent();
    while let Some(dir) = ancestor {
        let on_base = view.image(&dir, touched.get(&dir))?;
        let (pre, post) = match dirs.get(&dir)? {
            Some(images) => images,
            None => (on_base.clone(), on_base.clone()),
        };
        for (needed, image) in [(entry.pre.is_some(), &pre), (entry.post.is_some(), &post)] {
            let what = match image {
                _ if !needed => continue,
                Some(Image::Dir { .. }) => continue,
                Some(Image::Symlink { .. }) => "a symlink",
                Some(Image::File { .. }) => "a file",
                None => "missing",
            };
            return Err(ApplyError::Escape {
                root: root.to_owned(),
                path: entry.path.clone(),
                ancestor: dir,
                what,
            });
        }
        ancestor = dir.parent();
    }
    Ok(())
}

fn revert_locked(root: &Path, state: &StateDir) -> Result<Letter, RevertError> {
    let head = state
        .load_head()?
        .ok_or_else(|| RevertError::NothingInstalled(root.to_owned()))?;
    if let Some(patch) = retired_by(root, &head.product, &head.base, head.letter) {
        return Err(RevertError::Retired {
            root: root.to_owned(),
            patch,
        });
    }
    let seen = Seen::default();
    fn step_of(e: &InstalledEntry) -> Step<'_> {
        Step {
            path: &e.path,
            from: e.after.as_ref(),
            to: e.before.as_ref(),
        }
    }
    // The installed record is walked a block at a time, never held whole: once to check every
    // path as the letter left it and write the journal's steps, then, only where base files
    // must be restored, to stage them.
    let txn = TxnDir::begin(state)?;
    let revert_dir = state.revert_dir();
    let titles = (
        release_title(&head.product, &head.base.version, head.letter),
        format!("{} {}", head.product, head.base.version),
    );
    let titles = (titles.0.as_str(), titles.1.as_str());
    let written = txn::write_journal(&txn, TxnKind::Revert, titles, root, |write| {
        // 1. Every path as the letter left it, its step, and the room the staging takes.
        let (mut staging_bytes, mut staged) = (0u64, 0usize);
        let walked =
            state.walk_entries(txn::BLOCK, &mut |_, block| -> Result<(), RevertError> {
                check_installed(root, block, &seen)?;
                block.iter().map(step_of).try_for_each(|step| {
                    if step.needs_content() {
                        staging_bytes += file_size(step.to);
                        staged += 1;
                    }
                    write(&step)
                })
            })?;
        let walked = walked.ok_or_else(|| RevertError::NothingInstalled(root.to_owned()))?;
        Space::check(staging_bytes, 0, &state.dir).map_err(|space| RevertError::NoSpace {
            root: root.to_owned(),
            space,
        })?;
        if staged == 0 {
            return Ok(txn::Tail::default());
        }
        // 2. Every base file restored from its revert data (checked as it is written), before
        //    the journal is, from the record checked above.
        let unsynced = fsx::Unsynced::default();
        let stage = |j: usize, entry: &InstalledEntry| -> Result<(), RevertError> {
            let (
                Some(
                    img @ Image::File {
                        mode,
                        mtime,
                        sha256,
                        ..
                    },
                ),
                Some(name),
            ) = (&entry.before, &entry.revert)
            else {
                return Err(RevertError::RevertData {
                    file: revert_dir.clone(),
                    path: entry.path.clone(),
                });
            };
            let file = txn.stage(j);
            unsynced.write_file(&file, *mode, Some(*mtime), |out| {
                read_revert_into(
                    &revert_dir.join(name),
                    &entry.path,
                    img,
                    &root.join(entry.path.as_str()),
                    out,
                )
            })?;
            // The restored bytes were checked against the base image as written.
            seen.wrote(&file, *sha256);
            Ok(())
        };
        let again = state.walk_entries(txn::BLOCK, &mut |first, block| {
            block
                .par_iter()
                .enumerate()
                .filter(|(_, e)| step_of(e).needs_content())
                .try_for_each(|(i, entry)| stage(first + i, entry))
        })?;
        if again != Some(walked) {
            return Err(RevertError::State(StateError::Damaged {
                path: state.installed_path(),
                reason: "it changed while it was read".to_owned(),
            }));
        }
        unsynced.sync()?;
        Ok(txn::Tail::default())
    });
    let written = written.inspect_err(|_| txn.abandon())?;
    txn::run_written(root, state, &txn, written, &seen).map_err(|source| RevertError::Txn {
        root: root.to_owned(),
        source: Box::new(source),
    })?;
    Ok(head.letter)
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("root {0} does not exist or is not a directory")]
    Root(PathBuf),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Txn(#[from] TxnError),
}

/// What a person sees in Settings: the release and the installed letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub product: Option<String>,
    pub version: Option<String>,
    pub build: Option<String>,
    pub letter: Option<Letter>,
    /// An operation that was interrupted and awaits `bsi recover` (or the next apply or revert).
    pub interrupted: Option<Interrupted>,
    /// The installed patch a full release retired (the root runs another release now).
    pub retired: Option<String>,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.product, &self.version) {
            (Some(p), Some(v)) => write!(f, "{p} {v}")?,
            _ => f.write_str("unknown release")?,
        }
        if let Some(letter) = self.letter {
            write!(f, " ({letter})")?;
        }
        Ok(())
    }
}

/// Path of the release description a root carries.
pub const SYSTEM_VERSION_PLIST: &str = "System/Library/CoreServices/SystemVersion.plist";

/// The installed patch if there is one, else the release the root's SystemVersion.plist names;
/// and an interrupted operation, if any. Reads only.
pub fn status(root: &Path, state_dir: &Path) -> Result<Status, StatusError> {
    if !root.is_dir() {
        return Err(StatusError::Root(root.to_owned()));
    }
    let state = StateDir::new(state_dir);
    let interrupted = txn::pending(&state)?;
    let installed = state.load_head()?;
    let retired = installed
        .as_ref()
        .and_then(|inst| retired_by(root, &inst.product, &inst.base, inst.letter));
    if let (Some(inst), None) = (installed, &retired) {
        return Ok(Status {
            product: Some(inst.product),
            version: Some(inst.base.version.to_string()),
            build: inst.base.build,
            letter: Some(inst.letter),
            interrupted,
            retired: None,
        });
    }
    let plist = fs::read_to_string(root.join(SYSTEM_VERSION_PLIST)).unwrap_or_default();
    Ok(Status {
        product: plist_string(&plist, "ProductName"),
        version: plist_string(&plist, "ProductVersion"),
        build: plist_string(&plist, "ProductBuildVersion"),
        letter: None,
        interrupted,
        retired,
    })
}

/// When the root's release description names another release than the installed patch's base
/// (a full release was installed over it), the patch's title: the patch is retired.
pub(crate) fn retired_by(
    root: &Path,
    product: &str,
    base: &bsi_format::BaseRelease,
    letter: Letter,
) -> Option<String> {
    let plist = fs::read_to_string(root.join(SYSTEM_VERSION_PLIST)).ok()?;
    let version = plist_string(&plist, "ProductVersion")?;
    let build = plist_string(&plist, "ProductBuildVersion");
    let same = version == base.version.to_string() && (base.build.is_none() || build == base.build);
    (!same).then(|| release_title(product, &base.version, letter))
}

/// The `<string>` following `<key>KEY</key>` in an XML plist.
fn plist_string(plist: &str, key: &str) -> Option<String> {
    let after = plist.split_once(&format!("<key>{key}</key>"))?.1;
    let value = after.trim_start().strip_prefix("<string>")?;
    Some(value.split_once("</string>")?.0.trim().to_owned())
}

/// A file image with a source record's digest and size (all that reading its bytes needs).
fn source_image(src: &bsi_format::Source) -> Image {
    Image::File {
        sha256: src.sha256,
        size: src.size,
        mode: 0,
        mtime: bsi_format::Mtime { secs: 0, nanos: 0 },
    }
}
