//! The filesystem steps that change a root or a state directory. Each one names its path in
//! errors and passes through the fault-injection hook first ([`crate::fault`]).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bsi_format::{Mtime, PkgPath};
use filetime::FileTime;

use crate::fault;
use crate::{FsContext, FsError};

fn hooked<T>(
    action: &'static str,
    path: &Path,
    op: impl FnOnce() -> io::Result<T>,
) -> Result<T, FsError> {
    fault::step(action, path)
        .and_then(|()| op())
        .fs(action, path)
}

pub(crate) fn file_time(m: Mtime) -> FileTime {
    FileTime::from_unix_time(m.secs, m.nanos)
}

pub(crate) fn create_dir(path: &Path) -> Result<(), FsError> {
    hooked("create directory", path, || fs::create_dir(path))
}

/// Create `path` with mode 0700: only its owner may look inside or run what it holds.
pub(crate) fn create_private_dir(path: &Path) -> Result<(), FsError> {
    use std::os::unix::fs::DirBuilderExt;
    hooked("create directory", path, || {
        fs::DirBuilder::new().mode(0o700).create(path)
    })
}

/// Create `path` and its missing parents.
pub(crate) fn create_dir_all(path: &Path) -> Result<(), FsError> {
    if path.is_dir() {
        return Ok(());
    }
    hooked("create directory", path, || fs::create_dir_all(path))
}

pub(crate) fn remove_file(path: &Path) -> Result<(), FsError> {
    hooked("remove", path, || fs::remove_file(path))
}

/// Remove a file, symlink or directory tree; nothing there is fine.
pub(crate) fn remove_all(path: &Path) -> Result<(), FsError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::new("read", path, e)),
    };
    if meta.is_dir() {
        hooked("remove", path, || fs::remove_dir_all(path))
    } else {
        remove_file(path)
    }
}

pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), FsError> {
    hooked("move into place", to, || fs::rename(from, to))
}

pub(crate) fn hard_link(from: &Path, to: &Path) -> Result<(), FsError> {
    hooked("link", to, || fs::hard_link(from, to))
}

pub(crate) fn symlink(target: &str, path: &Path) -> Result<(), FsError> {
    hooked("create symlink", path, || {
        std::os::unix::fs::symlink(target, path)
    })
}

/// Set the modification time (and access time) of a file or directory.
pub(crate) fn set_mtime(path: &Path, mtime: Mtime) -> Result<(), FsError> {
    hooked("set the time of", path, || {
        filetime::set_file_mtime(path, file_time(mtime))
    })
}

/// Make the entries of directory `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), FsError> {
    hooked("sync", dir, || {
        fs::File::open(dir).and_then(|d| d.sync_all())
    })
}

/// Write a file through `fill` (which streams its bytes), give it its mode and mtime and sync
/// it. The file is removed again when `fill` fails.
pub(crate) fn write_file<E: From<FsError>>(
    path: &Path,
    mode: u32,
    mtime: Option<Mtime>,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    write(path, mode, mtime, fill, true)
}

/// Files staged for a transaction, synced together once all are written instead of one by one
/// as each is: each file's writeback starts as soon as it is written (the call returns at
/// once), and [`Unsynced::sync`] waits for all of them before anything relies on them (the
/// journal). A worker thread that synced each file it staged sat idle while the disk took it:
/// the testdata's (a) applied in 93.0 ms that way, 82.5 ms this way (medians of 11). A large
/// file's writeback starts every [`WRITEBACK_STRETCH`] as it is written (libssl3-next: 47.3
/// -> 44.3 ms, its sync waiting for libcrypto's last stretch only).
#[derive(Debug, Default)]
pub(crate) struct Unsynced(Mutex<Vec<PathBuf>>);

impl Unsynced {
    /// [`write_file`], but the file is synced by [`Unsynced::sync`].
    pub fn write_file<E: From<FsError>>(
        &self,
        path: &Path,
        mode: u32,
        mtime: Option<Mtime>,
        fill: impl FnOnce(&mut dyn Write) -> Result<(), E>,
    ) -> Result<(), E> {
        write(path, mode, mtime, fill, false)?;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_owned());
        Ok(())
    }

    /// Make every file written through [`Unsynced::write_file`] durable. One thread is enough:
    /// their writeback is under way, and syncing them from two at once was no faster.
    pub fn sync(self) -> Result<(), FsError> {
        let paths = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        paths.iter().try_for_each(|path| {
            hooked("sync", path, || {
                fs::File::open(path).and_then(|f| f.sync_all())
            })
        })
    }
}

fn write<E: From<FsError>>(
    path: &Path,
    mode: u32,
    mtime: Option<Mtime>,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), E>,
    sync: bool,
) -> Result<(), E> {
    let file = hooked("create", path, || fs::File::create(path))?;
    let file = WritingBack {
        file,
        written: 0,
        started: 0,
        early: !sync,
    };
    let mut out = io::BufWriter::with_capacity(256 * 1024, file);
    if let Err(e) = fill(&mut out) {
        drop(out);
        let _ = fs::remove_file(path);
        return Err(e);
    }
    let written = out
        .into_inner()
        .map_err(|e| FsError::new("write", path, e.into_error()))?;
    let file = &written.file;
    hooked("set permissions of", path, || {
        file.set_permissions(fs::Permissions::from_mode(mode))
    })?;
    if sync {
        hooked("sync", path, || file.sync_all())?;
    } else {
        start_writeback(file, written.started, None);
    }
    drop(written);
    if let Some(mtime) = mtime {
        set_mtime(path, mtime)?;
    }
    Ok(())
}

/// Start writing `len` bytes of `file` from `offset` (to its end for `None`) back without
/// waiting for them: on Linux, this advice writes the dirty pages of the range back and drops
/// only its clean ones, of which bytes just written have none (so each stretch is advised once,
/// as it is written, and a stretch written back already stays cached). Without it the syncs
/// left to the end took longer than syncing each file at once. A failure, or another system,
/// only leaves the whole writeback to the sync.
fn start_writeback(file: &fs::File, offset: u64, len: Option<std::num::NonZeroU64>) {
    #[cfg(target_os = "linux")]
    let _ = rustix::fs::fadvise(file, offset, len, rustix::fs::Advice::DontNeed);
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// How much of a staged file is written before its writeback starts: the disk takes each
/// stretch while the rest is decoded, instead of the whole file once it is complete.
const WRITEBACK_STRETCH: u64 = 1 << 20;

/// A file whose writeback starts every [`WRITEBACK_STRETCH`] bytes as it is written (when
/// `early`), so that the sync before the journal waits for the last stretch only.
struct WritingBack {
    file: fs::File,
    written: u64,
    started: u64,
    early: bool,
}

impl Write for WritingBack {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.early && self.written - self.started >= WRITEBACK_STRETCH {
            let len = std::num::NonZeroU64::new(self.written - self.started);
            start_writeback(&self.file, self.started, len);
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Replace `path` with `bytes` (mode 0644) through a temporary file beside it, synced, so that
/// `path` is either the old file or the complete new one; then sync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_atomically_with(path, |out| out.write_all(bytes))
}

/// [`write_atomically`] with the bytes streamed by `fill`, so that a large record (a journal
/// or installed record of 50,000 entries takes tens of megabytes of JSON) is never held whole
/// in memory.
pub(crate) fn write_atomically_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), FsError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    write_file(&tmp, 0o644, None, |out| -> Result<(), FsError> {
        fill(out).fs("write", &tmp)
    })?;
    rename(&tmp, path)?;
    sync_dir(&dir)
}

/// A root opened once. Every change below it goes through directory handles opened one
/// component at a time without following symlinks (`O_NOFOLLOW | O_DIRECTORY`, through
/// cap-std, whose resolution stays beneath the handle), so that a symlink planted at any level
/// of a path can neither redirect a write nor lead it out of the root: the step fails instead.
#[derive(Debug)]
pub(crate) struct RootDir {
    path: PathBuf,
    dir: cap_std::fs::Dir,
}

/// A directory of ours (staging, undo) that files move to and from the root.
#[derive(Debug)]
pub(crate) struct OwnDir {
    dir: cap_std::fs::Dir,
}

impl OwnDir {
    pub fn open(path: &Path) -> Result<OwnDir, FsError> {
        let dir = cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority())
            .fs("open", path)?;
        Ok(OwnDir { dir })
    }
}

impl RootDir {
    pub fn open(root: &Path) -> Result<RootDir, FsError> {
        let dir = cap_std::fs::Dir::open_ambient_dir(root, cap_std::ambient_authority())
            .fs("open", root)?;
        Ok(RootDir {
            path: root.to_owned(),
            dir,
        })
    }

    pub fn full(&self, rel: &PkgPath) -> PathBuf {
        self.path.join(rel.as_str())
    }

    /// Run `op` on the directory holding the last component of `rel`, reached without
    /// following any symlink (the root's own handle for a path at the top), and that component.
    fn step<T>(
        &self,
        action: &'static str,
        rel: &PkgPath,
        op: impl FnOnce(&cap_std::fs::Dir, &str) -> io::Result<T>,
    ) -> Result<T, FsError> {
        use cap_fs_ext::DirExt;
        let full = self.full(rel);
        hooked(action, &full, || match rel.as_str().rsplit_once('/') {
            None => op(&self.dir, rel.as_str()),
            Some((dirs, name)) => {
                let mut parts = dirs.split('/');
                let first = parts.next().unwrap_or(dirs);
                let mut dir = self.dir.open_dir_nofollow(first)?;
                for part in parts {
                    dir = dir.open_dir_nofollow(part)?;
                }
                op(&dir, name)
            }
        })
    }

    pub fn create_dir(&self, rel: &PkgPath) -> Result<(), FsError> {
        self.step("create directory", rel, |d, n| d.create_dir(n))
    }

    pub fn remove_dir(&self, rel: &PkgPath) -> Result<(), FsError> {
        self.step("remove directory", rel, |d, n| d.remove_dir(n))
    }

    /// Remove a file or a symlink (never what it points to).
    pub fn remove_file(&self, rel: &PkgPath) -> Result<(), FsError> {
        use cap_fs_ext::DirExt;
        self.step("remove", rel, |d, n| d.remove_file_or_symlink(n))
    }

    /// Move what `rel` holds (a file or symlink) to `to/name`.
    pub fn move_out(&self, rel: &PkgPath, to: &OwnDir, name: &str) -> Result<(), FsError> {
        self.step("move aside", rel, |d, n| d.rename(n, &to.dir, name))
    }

    /// Give what `rel` holds (a file or symlink) a second name `to/name`.
    pub fn link_out(&self, rel: &PkgPath, to: &OwnDir, name: &str) -> Result<(), FsError> {
        self.step("link", rel, |d, n| d.hard_link(n, &to.dir, name))
    }

    /// Move `from/name` to `rel`, replacing a file or symlink there.
    pub fn move_in(&self, from: &OwnDir, name: &str, rel: &PkgPath) -> Result<(), FsError> {
        self.step("move into place", rel, |d, n| from.dir.rename(name, d, n))
    }

    /// Permission bits of a file or directory (`rel` is not a symlink: checked by the caller,
    /// and a symlink raced in would resolve beneath its own directory only).
    pub fn set_mode(&self, rel: &PkgPath, mode: u32) -> Result<(), FsError> {
        use cap_std::fs::PermissionsExt as _;
        self.step("set permissions of", rel, |d, n| {
            d.set_permissions(n, cap_std::fs::Permissions::from_mode(mode))
        })
    }

    /// The modification time of a file or directory, or of a symlink itself (a symlink's time
    /// of access is set to it too), set by name in the directory that holds it, never through
    /// a symlink: `utimensat` on that directory's handle, without following the last
    /// component. (cap-std opened a file, or a directory, to set its times through the handle:
    /// two more calls, and an open for writing first. Applying 50,250 changed times, the
    /// placements took 580 ms.)
    pub fn set_mtime(&self, rel: &PkgPath, mtime: Mtime, symlink: bool) -> Result<(), FsError> {
        use rustix::fs::{AtFlags, Timespec, Timestamps, UTIME_OMIT};
        let time = Timespec {
            tv_sec: mtime.secs,
            tv_nsec: mtime.nanos.into(),
        };
        let omit = Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        };
        let times = Timestamps {
            last_access: if symlink { time } else { omit },
            last_modification: time,
        };
        self.step("set the time of", rel, |d, n| {
            // `n` is one component, neither `.` nor `..` (see `PkgPath`).
            Ok(rustix::fs::utimensat(
                d,
                n,
                &times,
                AtFlags::SYMLINK_NOFOLLOW,
            )?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staged file never has more than one stretch written and not yet under writeback, and
    /// its bytes are the ones written, whatever the pieces; a synced file starts none early.
    #[test]
    fn writeback_starts_every_stretch_and_keeps_the_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..5 * WRITEBACK_STRETCH / 2)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for early in [true, false] {
            let path = dir.path().join(format!("{early}"));
            let file = fs::File::create(&path).expect("create");
            let mut out = WritingBack {
                file,
                written: 0,
                started: 0,
                early,
            };
            for piece in data.chunks(100_000) {
                out.write_all(piece).expect("write");
                match early {
                    true => assert!(out.written - out.started < WRITEBACK_STRETCH),
                    false => assert_eq!(out.started, 0),
                }
            }
            assert_eq!(out.written, data.len() as u64);
            if early {
                assert!(out.started >= 2 * WRITEBACK_STRETCH, "{}", out.started);
            }
            drop(out);
            assert!(
                fs::read(&path).expect("read") == data,
                "{early}: bytes differ"
            );
        }
    }

    /// A time is set on the path itself: a file's and a directory's modification time (their
    /// access time kept), a symlink's own times (not its target's), at the top and below; a
    /// path through a symlinked directory is refused, and nothing is changed.
    #[test]
    fn times_are_set_by_name_never_through_a_symlink() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("a/d")).expect("mkdir");
        fs::write(root.join("a/f"), b"f").expect("write");
        fs::write(root.join("top"), b"t").expect("write");
        std::os::unix::fs::symlink("f", root.join("a/l")).expect("symlink");
        std::os::unix::fs::symlink("a", root.join("via")).expect("symlink");
        let old = FileTime::from_unix_time(1_600_000_000, 0);
        for p in ["a/f", "top", "a/d"] {
            filetime::set_file_times(root.join(p), old, old).expect("times");
        }
        filetime::set_symlink_file_times(root.join("a/l"), old, old).expect("times");
        let confined = RootDir::open(&root).expect("open");
        let path = |p: &str| PkgPath::new(p).expect("path");
        let new = Mtime {
            secs: 1_700_000_000,
            nanos: 250,
        };
        for (p, symlink) in [
            ("a/f", false),
            ("top", false),
            ("a/d", false),
            ("a/l", true),
        ] {
            confined.set_mtime(&path(p), new, symlink).expect("set");
            let meta = fs::symlink_metadata(root.join(p)).expect("lstat");
            assert_eq!((meta.mtime(), meta.mtime_nsec()), (new.secs, 250), "{p}");
            let atime = match symlink {
                true => (new.secs, 250),
                false => (old.unix_seconds(), 0),
            };
            assert_eq!((meta.atime(), meta.atime_nsec()), atime, "{p}");
        }
        // The symlink's target kept the time set on it above, not the symlink's.
        let target = fs::metadata(root.join("a/f")).expect("stat");
        assert_eq!(target.mtime(), new.secs);
        filetime::set_file_times(root.join("a/f"), old, old).expect("times");
        confined
            .set_mtime(
                &path("a/l"),
                Mtime {
                    secs: 1_800_000_000,
                    nanos: 0,
                },
                true,
            )
            .expect("set");
        assert_eq!(
            fs::metadata(root.join("a/f")).expect("stat").mtime(),
            old.unix_seconds()
        );
        // Through the symlinked directory: refused, the file beyond it untouched.
        let err = confined.set_mtime(&path("via/f"), new, false);
        assert!(err.is_err(), "set a time through a symlink");
        assert_eq!(
            fs::metadata(root.join("a/f")).expect("stat").mtime(),
            old.unix_seconds()
        );
    }
}
