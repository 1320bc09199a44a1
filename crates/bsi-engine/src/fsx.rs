//! The filesystem steps that change a root or a state directory. Each one names its path in
//! errors and passes through the fault-injection hook first ([`crate::fault`]).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bsi_format::Mtime;
use filetime::FileTime;

use crate::fault;
use crate::{FsContext, FsError};

fn hooked<T>(
    action: &'static str,
    path: &Path,
    op: impl FnOnce() -> io::Result<T>,
) -> Result<T, FsError> {
    fault::step(path).and_then(|()| op()).fs(action, path)
}

pub(crate) fn file_time(m: Mtime) -> FileTime {
    FileTime::from_unix_time(m.secs, m.nanos)
}

pub(crate) fn create_dir(path: &Path) -> Result<(), FsError> {
    hooked("create directory", path, || fs::create_dir(path))
}

/// Create `path` and its missing parents.
pub(crate) fn create_dir_all(path: &Path) -> Result<(), FsError> {
    if path.is_dir() {
        return Ok(());
    }
    hooked("create directory", path, || fs::create_dir_all(path))
}

pub(crate) fn remove_dir(path: &Path) -> Result<(), FsError> {
    hooked("remove directory", path, || fs::remove_dir(path))
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

/// A second name for the file or symlink `existing` (never following a symlink).
pub(crate) fn hard_link(existing: &Path, new: &Path) -> Result<(), FsError> {
    hooked("link", new, || fs::hard_link(existing, new))
}

pub(crate) fn symlink(target: &str, path: &Path) -> Result<(), FsError> {
    hooked("create symlink", path, || {
        std::os::unix::fs::symlink(target, path)
    })
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), FsError> {
    hooked("set permissions of", path, || {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    })
}

/// Set the modification time (and access time) of a file or directory.
pub(crate) fn set_mtime(path: &Path, mtime: Mtime) -> Result<(), FsError> {
    hooked("set the time of", path, || {
        filetime::set_file_mtime(path, file_time(mtime))
    })
}

/// Set the times of a symlink itself.
pub(crate) fn set_symlink_mtime(path: &Path, mtime: Mtime) -> Result<(), FsError> {
    hooked("set the time of", path, || {
        filetime::set_symlink_file_times(path, file_time(mtime), file_time(mtime))
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
    let file = hooked("create", path, || fs::File::create(path))?;
    let mut out = io::BufWriter::with_capacity(256 * 1024, file);
    if let Err(e) = fill(&mut out) {
        drop(out);
        let _ = fs::remove_file(path);
        return Err(e);
    }
    let file = out
        .into_inner()
        .map_err(|e| FsError::new("write", path, e.into_error()))?;
    hooked("set permissions of", path, || {
        file.set_permissions(fs::Permissions::from_mode(mode))
    })?;
    hooked("sync", path, || file.sync_all())?;
    drop(file);
    if let Some(mtime) = mtime {
        set_mtime(path, mtime)?;
    }
    Ok(())
}

/// Replace `path` with `bytes` (mode 0644) through a temporary file beside it, synced, so that
/// `path` is either the old file or the complete new one; then sync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
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
        out.write_all(bytes).fs("write", &tmp)
    })?;
    rename(&tmp, path)?;
    sync_dir(&dir)
}
