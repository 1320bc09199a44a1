//! Carrying out a list of changes on a root: the one place that writes into a tree.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bsi_format::{Image, Mtime, PkgPath};
use filetime::FileTime;

use crate::tree::mtime_of;
use crate::{FsContext, FsError};

/// Turn `from` into `to` at `path`. `content` is a staged file holding the bytes of `to` (with
/// its mode and mtime already set) when `to` is a file whose bytes change.
#[derive(Debug)]
pub(crate) struct Change {
    pub path: PkgPath,
    pub from: Option<Image>,
    pub to: Option<Image>,
    pub content: Option<PathBuf>,
}

fn file_time(m: Mtime) -> FileTime {
    FileTime::from_unix_time(m.secs, m.nanos)
}

fn same_kind(a: &Image, b: &Image) -> bool {
    a.kind_name() == b.kind_name()
}

/// Write a staged file through `fill` (which streams its bytes), then give it its mode and
/// mtime and sync it. The file is removed again when `fill` fails.
pub(crate) fn stage_with<E: From<FsError>>(
    path: &Path,
    mode: u32,
    mtime: Mtime,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    let file = fs::File::create(path).fs("create staging file", path)?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    if let Err(e) = fill(&mut out) {
        drop(out);
        let _ = fs::remove_file(path);
        return Err(e);
    }
    let file = out
        .into_inner()
        .map_err(|e| FsError::new("write staging file", path, e.into_error()))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .fs("set permissions of", path)?;
    file.sync_all().fs("sync", path)?;
    drop(file);
    filetime::set_file_mtime(path, file_time(mtime)).fs("set the time of", path)?;
    Ok(())
}

/// Apply `changes` (sorted by path) under `root`. Directories above the changes keep the
/// modification time they had before, unless a change sets it.
pub(crate) fn execute(root: &Path, staging: &Path, changes: &[Change]) -> Result<(), FsError> {
    let changed: BTreeSet<&PkgPath> = changes.iter().map(|c| &c.path).collect();
    let mut keep_times: BTreeMap<PkgPath, Mtime> = BTreeMap::new();
    for change in changes {
        let mut parent = change.path.parent();
        while let Some(dir) = parent {
            if !changed.contains(&dir) && !keep_times.contains_key(&dir) {
                let full = root.join(dir.as_str());
                if let Ok(meta) = fs::symlink_metadata(&full) {
                    if meta.is_dir() {
                        keep_times.insert(dir.clone(), mtime_of(&meta));
                    }
                }
            }
            parent = dir.parent();
        }
    }

    // 1. Remove what goes away or changes kind, children before parents.
    for change in changes.iter().rev() {
        let Some(from) = &change.from else { continue };
        let goes = match &change.to {
            None => true,
            Some(to) => !same_kind(from, to),
        };
        if goes {
            let full = root.join(change.path.as_str());
            match from {
                Image::Dir { .. } => fs::remove_dir(&full).fs("remove directory", &full)?,
                _ => fs::remove_file(&full).fs("remove", &full)?,
            }
        }
    }

    // 2. Create and replace, parents before children.
    for (i, change) in changes.iter().enumerate() {
        let Some(to) = &change.to else { continue };
        let full = root.join(change.path.as_str());
        let existed_same_kind = change.from.as_ref().is_some_and(|f| same_kind(f, to));
        match to {
            Image::Dir { .. } => {
                if !existed_same_kind {
                    fs::create_dir(&full).fs("create directory", &full)?;
                }
            }
            Image::File { mode, .. } => match &change.content {
                Some(staged) => place(staged, &full)?,
                None => fs::set_permissions(&full, fs::Permissions::from_mode(*mode))
                    .fs("set permissions of", &full)?,
            },
            Image::Symlink { target, mtime } => {
                let unchanged =
                    matches!(&change.from, Some(Image::Symlink { target: t, .. }) if t == target);
                if !unchanged {
                    let tmp = staging.join(format!("link-{i}"));
                    let _ = fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(target, &tmp).fs("create symlink", &tmp)?;
                    filetime::set_symlink_file_times(&tmp, file_time(*mtime), file_time(*mtime))
                        .fs("set the time of", &tmp)?;
                    place(&tmp, &full)?;
                }
            }
        }
    }

    // 3. Times and directory modes, children before parents.
    let mut dirs: BTreeMap<&PkgPath, (Option<u32>, Mtime)> =
        keep_times.iter().map(|(p, m)| (p, (None, *m))).collect();
    for change in changes.iter().rev() {
        let full = root.join(change.path.as_str());
        match &change.to {
            Some(Image::File { mtime, .. }) => {
                filetime::set_file_mtime(&full, file_time(*mtime)).fs("set the time of", &full)?
            }
            Some(Image::Symlink { mtime, .. }) => {
                filetime::set_symlink_file_times(&full, file_time(*mtime), file_time(*mtime))
                    .fs("set the time of", &full)?
            }
            Some(Image::Dir { mode, mtime }) => {
                dirs.insert(&change.path, (Some(*mode), *mtime));
            }
            None => {}
        }
    }
    for (path, (mode, mtime)) in dirs.iter().rev() {
        let full = root.join(path.as_str());
        if let Some(mode) = mode {
            fs::set_permissions(&full, fs::Permissions::from_mode(*mode))
                .fs("set permissions of", &full)?;
        }
        filetime::set_file_mtime(&full, file_time(*mtime)).fs("set the time of", &full)?;
    }
    Ok(())
}

/// Move a staged file or symlink into place atomically. When the staging area is on another
/// filesystem, copy it next to its destination first.
fn place(staged: &Path, dest: &Path) -> Result<(), FsError> {
    match fs::rename(staged, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: copy beside the destination, keeping mode and time, then rename.
            let dir = dest.parent().unwrap_or(Path::new("."));
            let name = dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = dir.join(format!(".bsi-stage-{name}"));
            let meta = fs::symlink_metadata(staged).fs("read", staged)?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(staged).fs("read the link", staged)?;
                std::os::unix::fs::symlink(target, &tmp).fs("create symlink", &tmp)?;
                let t = FileTime::from_last_modification_time(&meta);
                filetime::set_symlink_file_times(&tmp, t, t).fs("set the time of", &tmp)?;
            } else {
                fs::copy(staged, &tmp).fs("copy to", &tmp)?;
                fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .fs("sync", &tmp)?;
                filetime::set_file_mtime(&tmp, FileTime::from_last_modification_time(&meta))
                    .fs("set the time of", &tmp)?;
            }
            fs::rename(&tmp, dest).fs("move into place", dest)?;
            let _ = fs::remove_file(staged);
            Ok(())
        }
        Err(e) => Err(FsError::new("move into place", dest, e)),
    }
}
