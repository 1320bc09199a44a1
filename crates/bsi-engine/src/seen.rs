//! Files whose bytes this process has already hashed or written. A transaction looks at every
//! path it changes twice more after the pre-images were checked (before replacing it, and once
//! the new tree is in place); while a file's metadata says it cannot have changed, its digest
//! is the one already known and the file is not read again. On a 92 MB library that is two
//! reads and hashes of 92 MB out of four.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bsi_format::Digest;

use crate::tree::hash_open;
use crate::{FsContext, FsError};

/// What changes whenever a file's bytes do: which file it is, its size, its modification time,
/// and its time of change, which the kernel moves on every write and nobody can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// How far a time of change can lag behind the write that set it: the kernel's clock moves in
/// ticks (10 ms at most), and a filesystem whose times have no sub-second part keeps seconds
/// (FAT keeps two).
const FINE_GRAIN: Duration = Duration::from_millis(20);
const COARSE_GRAIN: Duration = Duration::from_secs(2);

/// Whether a file whose time of change is `ctime` (seconds, nanoseconds) when a read of it
/// started at `started` would show any later write in its time of change: only when that time
/// is older than the read by more than the granularity. Otherwise a write in the same tick
/// could leave the stamp as it was (git's "racily clean" files).
pub(crate) fn settled(ctime: (i64, i64), started: SystemTime) -> bool {
    let grain = if ctime.1 == 0 {
        COARSE_GRAIN
    } else {
        FINE_GRAIN
    };
    let (Ok(secs), Ok(nanos)) = (u64::try_from(ctime.0), u32::try_from(ctime.1)) else {
        return false;
    };
    UNIX_EPOCH
        .checked_add(Duration::new(secs, nanos.min(999_999_999)))
        .and_then(|t| t.checked_add(grain))
        .is_some_and(|t| t < started)
}

/// A file read whole by [`Seen::read`].
pub(crate) struct ReadWhole {
    pub bytes: Vec<u8>,
    /// Its metadata after the read.
    pub meta: fs::Metadata,
    /// Its stamp, when it stood still during the read and was settled.
    still: Option<Stamp>,
}

/// A file's record moved along with it by a rename, see [`Seen::take`].
pub(crate) struct Carried {
    stamp: Stamp,
    digest: Digest,
}

/// The digest of each file this process read or wrote, with the file's stamp at the time, by
/// the file's device and inode: a stamp names its file, whatever path leads to it (keyed by
/// path, a tree of 50,250 files took 9.8 MB here, 6.9 MB now). Past [`ROOM`] records, only
/// files of [`WORTH`] bytes or more are recorded: what is saved is a read, worth little on a
/// small file, and every record takes about 137 bytes (13.8 MB for a tree of 100,500 files).
#[derive(Default)]
pub(crate) struct Seen {
    files: Mutex<HashMap<(u64, u64), Kept>>,
    hashed: AtomicUsize,
}

/// A record of [`Seen`]: the digest of a file and its stamp but for the device and inode, which
/// are the record's key (64 bytes where a stamp and a digest took 88: a full table of 2^16
/// buckets takes 5.2 MB instead of 6.9).
#[derive(Debug, Clone, Copy)]
struct Kept {
    size: u64,
    mtime: i64,
    ctime: i64,
    mtime_nanos: u32,
    ctime_nanos: u32,
    digest: Digest,
}

impl Kept {
    /// `None` for a stamp whose nanoseconds are out of range (none a kernel gives).
    fn new(stamp: Stamp, digest: Digest) -> Option<Kept> {
        Some(Kept {
            size: stamp.size,
            mtime: stamp.mtime.0,
            ctime: stamp.ctime.0,
            mtime_nanos: u32::try_from(stamp.mtime.1).ok()?,
            ctime_nanos: u32::try_from(stamp.ctime.1).ok()?,
            digest,
        })
    }

    /// The stamp it was kept with, of `file` (device, inode).
    fn stamp(&self, file: (u64, u64)) -> Stamp {
        Stamp {
            dev: file.0,
            ino: file.1,
            size: self.size,
            mtime: (self.mtime, i64::from(self.mtime_nanos)),
            ctime: (self.ctime, i64::from(self.ctime_nanos)),
        }
    }
}

/// Records kept of files of any size: 7/8 of 2^16, what a table of 2^16 buckets holds (5.2
/// MB). Past it every file is read once more by a transaction: with room for 28,672, a tree
/// of 50,250 small files applied in 2.30 s instead of 1.95.
const ROOM: usize = 57_344;

/// Size from which a file is recorded however many are.
const WORTH: u64 = 1 << 20;

/// Record `digest` for the file `stamp` names, as [`Seen`] keeps them. (Not through
/// `HashMap::entry`, which makes room for a new key before it is known to go in: a full table
/// of 2^16 buckets grew to 2^17, 13.8 MB, for a record it then refused.)
fn keep(files: &mut HashMap<(u64, u64), Kept>, stamp: Stamp, digest: Digest) {
    let Some(kept) = Kept::new(stamp, digest) else {
        files.remove(&stamp.file());
        return;
    };
    if let Some(known) = files.get_mut(&stamp.file()) {
        *known = kept;
    } else if files.len() < ROOM || stamp.size >= WORTH {
        files.insert(stamp.file(), kept);
    }
}

impl Stamp {
    /// The file it stamps: its device and inode.
    fn file(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

impl Seen {
    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Kept>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The digest and size of the file at `full`, whose (lstat) metadata is `meta`: the known
    /// ones while its stamp is the one recorded, else read and hashed, and recorded when the
    /// file stood still during the read and its stamp is settled.
    pub fn digest(&self, full: &Path, meta: &fs::Metadata) -> Result<(Digest, u64), FsError> {
        let now = Stamp::of(meta);
        if let Some(kept) = self.files().get(&now.file()) {
            if kept.stamp(now.file()) == now {
                return Ok((kept.digest, now.size));
            }
        }
        let mut file = fs::File::open(full).fs("open", full)?;
        let before = Stamp::of(&file.metadata().fs("read", full)?);
        let started = SystemTime::now();
        let (digest, size) = hash_open(&mut file, full)?;
        let after = Stamp::of(&file.metadata().fs("read", full)?);
        let still = (before == after && settled(after.ctime, started)).then_some(after);
        self.note(after.file(), still, digest);
        Ok((digest, size))
    }

    /// The bytes of the file at `full`, at most `limit` of them, with the file's metadata and
    /// what [`record`](Self::record) needs to record their digest, once it is taken, as
    /// [`digest`](Self::digest) records one. `None` when the file holds more than `limit` bytes
    /// (nothing is read then).
    pub fn read(&self, full: &Path, limit: u64) -> Result<Option<ReadWhole>, FsError> {
        use std::io::Read as _;
        let mut file = fs::File::open(full).fs("open", full)?;
        let meta = file.metadata().fs("read", full)?;
        if meta.len() > limit {
            return Ok(None);
        }
        let before = Stamp::of(&meta);
        let started = SystemTime::now();
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        (&mut file)
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .fs("read", full)?;
        if bytes.len() as u64 > limit {
            return Ok(None);
        }
        let meta = file.metadata().fs("read", full)?;
        let after = Stamp::of(&meta);
        let still =
            before == after && settled(after.ctime, started) && after.size == bytes.len() as u64;
        Ok(Some(ReadWhole {
            bytes,
            meta,
            still: still.then_some(after),
        }))
    }

    /// `digest` is that of the bytes of `read`: recorded when the file stood still while it
    /// was read.
    pub fn record(&self, read: &ReadWhole, digest: Digest) {
        self.note(Stamp::of(&read.meta).file(), read.still, digest);
    }

    /// The file `file` (device, inode) was just hashed to `digest`: recorded with its stamp
    /// `still` when it stood still during the read, forgotten otherwise.
    fn note(&self, file: (u64, u64), still: Option<Stamp>, digest: Digest) {
        self.hashed.fetch_add(1, Ordering::Relaxed);
        let mut files = self.files();
        match still {
            Some(stamp) => keep(&mut files, stamp, digest),
            None => drop(files.remove(&file)),
        };
    }

    /// `full` was just written by this process with bytes whose digest, checked as they were
    /// written, is `digest`.
    pub fn wrote(&self, full: &Path, digest: Digest) {
        if let Ok(meta) = fs::symlink_metadata(full) {
            keep(&mut self.files(), Stamp::of(&meta), digest);
        }
    }

    /// `from` is about to be renamed: its record, if it has one and is unchanged since.
    pub fn take(&self, from: &Path) -> Option<Carried> {
        let now = Stamp::of(&fs::symlink_metadata(from).ok()?);
        let kept = self.files().remove(&now.file())?;
        let stamp = kept.stamp(now.file());
        (now == stamp).then_some(Carried {
            stamp,
            digest: kept.digest,
        })
    }

    /// `carried` was taken from the file just renamed to `to`: a rename moves its time of change
    /// and nothing else, so the record holds at `to` if everything else is the same.
    pub fn carry(&self, carried: Carried, to: &Path) {
        let Ok(meta) = fs::symlink_metadata(to) else {
            return;
        };
        let now = Stamp::of(&meta);
        let was = Stamp {
            ctime: now.ctime,
            ..carried.stamp
        };
        if now == was {
            keep(&mut self.files(), now, carried.digest);
        }
    }

    /// How many files were read and hashed.
    #[cfg(test)]
    pub fn hashed(&self) -> usize {
        self.hashed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_of_change_is_settled_only_past_its_granularity() {
        let at = |secs: u64, nanos: u32| UNIX_EPOCH + Duration::new(secs, nanos);
        // (ctime, read started, settled)
        let cases = [
            ((100, 500_000_000), at(100, 510_000_000), false),
            ((100, 500_000_000), at(100, 520_000_000), false),
            ((100, 500_000_000), at(100, 520_000_001), true),
            ((100, 500_000_000), at(99, 0), false),
            // Whole seconds: the filesystem may keep nothing finer.
            ((100, 0), at(101, 500_000_000), false),
            ((100, 0), at(102, 1), true),
            // Before 1970 or out of range: never trusted.
            ((-5, 1), at(200, 0), false),
            ((100, -1), at(200, 0), false),
        ];
        for (ctime, started, expected) in cases {
            assert_eq!(settled(ctime, started), expected, "{ctime:?} {started:?}");
        }
    }

    #[test]
    fn past_its_room_only_large_files_and_known_ones_are_recorded() {
        let stamp = |ino: u64, size: u64| Stamp {
            dev: 1,
            ino,
            size,
            mtime: (5, 0),
            ctime: (ino as i64, 0),
        };
        let mut files = HashMap::new();
        for ino in 0..ROOM as u64 {
            keep(&mut files, stamp(ino, 10), Digest([1; 32]));
        }
        assert_eq!(files.len(), ROOM);
        let capacity = files.capacity();
        // A new small file is not recorded, and the table does not grow for it; a known one is
        // updated; a large one is recorded.
        keep(&mut files, stamp(ROOM as u64, WORTH - 1), Digest([2; 32]));
        assert!(!files.contains_key(&(1, ROOM as u64)));
        assert_eq!(files.capacity(), capacity);
        let changed = Stamp {
            size: 11,
            ..stamp(7, 10)
        };
        keep(&mut files, changed, Digest([3; 32]));
        let kept = files.get(&(1, 7)).expect("a known file's record");
        assert_eq!(
            (kept.stamp((1, 7)), kept.digest),
            (changed, Digest([3; 32]))
        );
        keep(&mut files, stamp(ROOM as u64 + 1, WORTH), Digest([4; 32]));
        assert!(files.contains_key(&(1, ROOM as u64 + 1)));
        assert_eq!(files.len(), ROOM + 1);
        // The room is what the table held without growing.
        assert!(
            capacity < 2 * ROOM,
            "room for {capacity} records, {ROOM} kept"
        );
    }

    /// A record is its key and 64 bytes, and gives back the stamp it was kept with; a stamp
    /// that does not fit one is not kept, and forgets what was known of its file.
    #[test]
    fn a_record_keeps_its_stamp_in_64_bytes() {
        assert_eq!(std::mem::size_of::<Kept>(), 64);
        let stamp = Stamp {
            dev: 3,
            ino: 9,
            size: 1 << 40,
            mtime: (-7, 999_999_999),
            ctime: (i64::MAX, 1),
        };
        let kept = Kept::new(stamp, Digest([5; 32])).expect("a record");
        assert_eq!((kept.stamp((3, 9)), kept.digest), (stamp, Digest([5; 32])));
        let mut files = HashMap::new();
        keep(&mut files, stamp, Digest([5; 32]));
        for odd in [(-7, -1), (-7, i64::from(u32::MAX) + 1)] {
            assert!(Kept::new(
                Stamp {
                    mtime: odd,
                    ..stamp
                },
                Digest([6; 32])
            )
            .is_none());
        }
        keep(
            &mut files,
            Stamp {
                ctime: (1, -1),
                ..stamp
            },
            Digest([6; 32]),
        );
        assert!(files.is_empty());
    }

    fn digest_of(seen: &Seen, path: &Path) -> Digest {
        let meta = fs::symlink_metadata(path).expect("lstat");
        seen.digest(path, &meta).expect("digest").0
    }

    #[test]
    fn a_settled_file_is_read_once_and_again_after_any_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, b"first bytes").expect("write");
        let seen = Seen::default();
        // Just written: its time of change is too recent to vouch for a later write.
        digest_of(&seen, &path);
        digest_of(&seen, &path);
        assert_eq!(seen.hashed(), 2);

        std::thread::sleep(FINE_GRAIN * 2);
        let first = digest_of(&seen, &path);
        assert_eq!(digest_of(&seen, &path), first);
        assert_eq!(seen.hashed(), 3, "read again though nothing changed");

        // Same size, same modification time: only the bytes and the time of change differ.
        let mtime =
            filetime::FileTime::from_last_modification_time(&fs::metadata(&path).expect("stat"));
        fs::write(&path, b"other bytes").expect("rewrite");
        filetime::set_file_mtime(&path, mtime).expect("set mtime");
        let second = digest_of(&seen, &path);
        assert_ne!(
            second, first,
            "a rewritten file was taken for the one seen before"
        );
        assert_eq!(second, bsi_format::sha256(b"other bytes"));
    }

    /// A record belongs to the file, not to a path: another link to it is known, and another
    /// file put at the path, even of the same size and time, is read.
    #[test]
    fn a_record_names_its_file_whatever_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, link, other) = (
            dir.path().join("f"),
            dir.path().join("link"),
            dir.path().join("other"),
        );
        fs::write(&path, b"first bytes").expect("write");
        fs::hard_link(&path, &link).expect("link");
        fs::write(&other, b"other bytes").expect("write");
        let mtime =
            filetime::FileTime::from_last_modification_time(&fs::metadata(&path).expect("stat"));
        filetime::set_file_mtime(&other, mtime).expect("set mtime");
        std::thread::sleep(FINE_GRAIN * 2);
        let seen = Seen::default();
        let first = digest_of(&seen, &path);
        assert_eq!(digest_of(&seen, &link), first);
        assert_eq!(
            seen.hashed(),
            1,
            "the same file was read again by its other path"
        );

        fs::rename(&other, &path).expect("rename");
        assert_eq!(digest_of(&seen, &path), bsi_format::sha256(b"other bytes"));
        assert_eq!(seen.hashed(), 2);
    }

    #[test]
    fn a_record_follows_a_rename_but_not_a_write_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (staged, placed) = (dir.path().join("staged"), dir.path().join("placed"));
        let digest = bsi_format::sha256(b"new bytes");

        fs::write(&staged, b"new bytes").expect("write");
        let seen = Seen::default();
        seen.wrote(&staged, digest);
        let carried = seen.take(&staged).expect("unchanged since written");
        fs::rename(&staged, &placed).expect("rename");
        seen.carry(carried, &placed);
        assert_eq!(digest_of(&seen, &placed), digest);
        assert_eq!(seen.hashed(), 0);

        // Written to in place between the record and the rename: nothing is carried.
        fs::write(&staged, b"new bytes").expect("write");
        seen.wrote(&staged, digest);
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&staged, b"bad bytes").expect("rewrite");
        assert!(seen.take(&staged).is_none());
    }
}
