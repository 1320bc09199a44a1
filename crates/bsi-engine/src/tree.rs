//! Walking trees and observing single paths.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use bsi_format::{Digest, Image, Mtime, PkgPath};
use sha2::{Digest as _, Sha256};

use crate::seen::Seen;
use crate::{FsContext, FsError};

/// Name of the engine's state directory at the top of a root; never part of a tree.
pub const STATE_DIR_NAME: &str = ".bsi";

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} is a {kind}, which a package cannot carry")]
    Special { path: PathBuf, kind: &'static str },
    #[error("{0} has a name that is not UTF-8")]
    NotUtf8(PathBuf),
    #[error("{path} has a symlink target that is not UTF-8 or is empty")]
    BadLinkTarget { path: PathBuf },
    #[error("{path}: {reason}")]
    BadPath { path: PathBuf, reason: String },
}

/// Every entry under a root (or some subtrees of it), keyed by package path. Directories are
/// entries too, so empty ones are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// In path order, each path once. A vector, not a map: an entry takes 80 bytes, not about
    /// 150 in a map's nodes, and the memory of a tree of many entries goes back to the system
    /// in one piece once it is dropped, not into the allocator's free lists.
    pub entries: Vec<(PkgPath, Image)>,
}

impl Tree {
    /// The image at `path`, if the tree has one.
    pub fn get(&self, path: &PkgPath) -> Option<&Image> {
        let at = self.entries.binary_search_by(|(p, _)| p.cmp(path)).ok()?;
        Some(&self.entries[at].1)
    }

    pub fn contains(&self, path: &PkgPath) -> bool {
        self.get(path).is_some()
    }
}

/// Walk `root`, or only the listed subpaths of it (each included with its own entry), never
/// following symlinks. A top-level `.bsi` state directory is skipped.
pub fn scan(root: &Path, subpaths: &[&str]) -> Result<Tree, ScanError> {
    let meta = fs::metadata(root).fs("read", root)?;
    if !meta.is_dir() {
        return Err(ScanError::NotADirectory(root.to_owned()));
    }
    let mut tree = Tree::default();
    let starts: Vec<PathBuf> = if subpaths.is_empty() {
        vec![root.to_owned()]
    } else {
        subpaths.iter().map(|s| root.join(s)).collect()
    };
    for start in starts {
        if start != root && start.symlink_metadata().is_err() {
            continue; // a component absent from this tree: everything in it is added or deleted
        }
        let walker = walkdir::WalkDir::new(&start)
            .follow_links(false)
            .follow_root_links(start == root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                !(e.depth() == 1 && start == root && e.file_name() == STATE_DIR_NAME)
            });
        for item in walker {
            let item = item.map_err(|e| {
                let path = e.path().unwrap_or(&start).to_owned();
                let source = e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("filesystem loop"));
                FsError::new("read", &path, source)
            })?;
            let full = item.path();
            let rel = full
                .strip_prefix(root)
                .expect("walkdir yields paths below its start");
            if rel.as_os_str().is_empty() {
                continue; // the root itself is not an entry
            }
            let rel = pkg_path_of(full, rel)?;
            let image = image_of(
                full,
                &item.metadata().map_err(|e| {
                    let source = e
                        .into_io_error()
                        .unwrap_or_else(|| io::Error::other("walk error"));
                    FsError::new("read", full, source)
                })?,
                Content::Read(None),
            )?;
            tree.entries.push((rel, image));
        }
    }
    // Walked in each directory's name order, which is nearly path order: `a/b` follows `a` in
    // the walk but `a.b` in the tree. Components given twice or nested give a path twice.
    tree.entries.sort_by(|(a, _), (b, _)| a.cmp(b));
    tree.entries.dedup_by(|(a, _), (b, _)| a == b);
    Ok(tree)
}

fn pkg_path_of(full: &Path, rel: &Path) -> Result<PkgPath, ScanError> {
    let text = rel
        .to_str()
        .ok_or_else(|| ScanError::NotUtf8(full.to_owned()))?;
    PkgPath::new(text).map_err(|e| ScanError::BadPath {
        path: full.to_owned(),
        reason: e.to_string(),
    })
}

/// How [`image_of`] learns a regular file's digest.
#[derive(Clone, Copy)]
pub(crate) enum Content<'s> {
    /// Read and hash the file, unless the [`Seen`] knows it unchanged.
    Read(Option<&'s Seen>),
    /// Take this digest on trust: the caller hashes the file later, before anything counts on it.
    Assume(Digest),
}

/// The image of what `full` holds, from its (lstat) metadata; a file's digest as `content` says.
pub(crate) fn image_of(
    full: &Path,
    meta: &fs::Metadata,
    content: Content<'_>,
) -> Result<Image, ScanError> {
    let ft = meta.file_type();
    let mtime = mtime_of(meta);
    let mode = meta.mode() & 0o7777;
    if ft.is_symlink() {
        let target = fs::read_link(full).fs("read the link", full)?;
        let target = target
            .to_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ScanError::BadLinkTarget {
                path: full.to_owned(),
            })?
            .to_owned();
        Ok(Image::Symlink { target, mtime })
    } else if ft.is_dir() {
        Ok(Image::Dir { mode, mtime })
    } else if ft.is_file() {
        let (sha256, size) = match content {
            Content::Read(Some(seen)) => seen.digest(full, meta)?,
            Content::Read(None) => hash_file(full)?,
            Content::Assume(digest) => (digest, meta.len()),
        };
        Ok(Image::File {
            sha256,
            size,
            mode,
            mtime,
        })
    } else {
        let kind = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "special file"
        };
        Err(ScanError::Special {
            path: full.to_owned(),
            kind,
        })
    }
}

pub(crate) fn mtime_of(meta: &fs::Metadata) -> Mtime {
    Mtime {
        secs: meta.mtime(),
        nanos: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
    }
}

/// Stream a file through sha256.
pub(crate) fn hash_file(path: &Path) -> Result<(Digest, u64), FsError> {
    let mut file = fs::File::open(path).fs("open", path)?;
    hash_open(&mut file, path)
}

/// Stream the rest of `file` (opened from `path`) through sha256.
pub(crate) fn hash_open(file: &mut fs::File, path: &Path) -> Result<(Digest, u64), FsError> {
    HASH_BUFFER.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.is_empty() {
            buf.resize(256 * 1024, 0);
        }
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).fs("read", path)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
        Ok((Digest(hasher.finalize().into()), size))
    })
}

thread_local! {
    /// What [`hash_open`] reads through, one per thread: a buffer of 256 KiB made (zeroed) for
    /// each file took 9% of a revert of 150,750 small files.
    static HASH_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What `root/path` holds now (`None` when nothing is there), never following a symlink: not
/// the last component, and not an ancestor (a path below a symlink or a file holds nothing).
pub(crate) fn observe(root: &Path, path: &PkgPath) -> Result<Option<Image>, ScanError> {
    observe_with(root, path, Content::Read(None))
}

/// [`observe`], learning a file's digest as `content` says.
pub(crate) fn observe_with(
    root: &Path,
    path: &PkgPath,
    content: Content<'_>,
) -> Result<Option<Image>, ScanError> {
    let mut ancestor = root.to_path_buf();
    let components: Vec<&str> = path.components().collect();
    for part in &components[..components.len() - 1] {
        ancestor.push(part);
        match fs::symlink_metadata(&ancestor) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::new("read", &ancestor, e).into()),
        }
    }
    let full = root.join(path.as_str());
    match fs::symlink_metadata(&full) {
        Ok(meta) => image_of(&full, &meta, content).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(20) => Ok(None), // ENOTDIR: an ancestor is a file
        Err(e) => Err(FsError::new("read", &full, e).into()),
    }
}

/// True when `actual` is what a package's pre-image (or post-image) promises: same kind, same
/// bytes or link target, same permission bits. Times are not compared: copies of a release
/// differ in them, and revert restores the times that were really there.
pub(crate) fn matches_image(expected: &Image, actual: &Image) -> bool {
    match (expected, actual) {
        (
            Image::File {
                sha256: a,
                size: sa,
                mode: ma,
                ..
            },
            Image::File {
                sha256: b,
                size: sb,
                mode: mb,
                ..
            },
        ) => a == b && sa == sb && ma == mb,
        (Image::Symlink { target: a, .. }, Image::Symlink { target: b, .. }) => a == b,
        (Image::Dir { mode: a, .. }, Image::Dir { mode: b, .. }) => a == b,
        _ => false,
    }
}

/// `None` when `actual` is what `expected` promises (both absent, or [`matches_image`]), else one
/// line saying how it differs.
pub(crate) fn image_mismatch(expected: Option<&Image>, actual: Option<&Image>) -> Option<String> {
    let ok = match (expected, actual) {
        (None, None) => true,
        (Some(e), Some(a)) => matches_image(e, a),
        _ => false,
    };
    (!ok).then(|| describe_mismatch(expected, actual))
}

/// One line describing how `actual` differs from `expected`.
pub(crate) fn describe_mismatch(expected: Option<&Image>, actual: Option<&Image>) -> String {
    match (expected, actual) {
        (None, Some(a)) => format!("a {} is present where nothing should be", a.kind_name()),
        (Some(e), None) => format!("the {} is missing", e.kind_name()),
        (Some(e), Some(a)) if e.kind_name() != a.kind_name() => {
            format!("expected a {}, found a {}", e.kind_name(), a.kind_name())
        }
        (
            Some(Image::File {
                sha256: e,
                size: se,
                mode: me,
                ..
            }),
            Some(Image::File {
                sha256: a,
                size: sa,
                mode: ma,
                ..
            }),
        ) => {
            if e != a {
                format!("content differs (sha256 {a}, expected {e})")
            } else if se != sa {
                // A file whose digest is taken when it is decoded from is checked for its
                // size first, its digest assumed.
                format!("content differs ({sa} bytes, expected {se})")
            } else {
                format!("permission bits are {ma:o}, expected {me:o}")
            }
        }
        (Some(Image::Symlink { target: e, .. }), Some(Image::Symlink { target: a, .. })) => {
            format!("link points to {a:?}, expected {e:?}")
        }
        (Some(Image::Dir { mode: me, .. }), Some(Image::Dir { mode: ma, .. })) => {
            format!("permission bits are {ma:o}, expected {me:o}")
        }
        _ => "it differs".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scan's entries are in path order, not the walk's (`a.b` before `a/x`), each path once
    /// where components nest, and each is found by [`Tree::get`].
    #[test]
    fn a_scan_is_in_path_order_each_path_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["a/x", "a/x/y", "a-b", "b"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for f in ["a.b", "a/x.c", "a/x/y/z", "a0", "b/c"] {
            fs::write(root.join(f), f).expect("write");
        }
        let paths = |tree: &Tree| -> Vec<String> {
            tree.entries.iter().map(|(p, _)| p.to_string()).collect()
        };
        let all = scan(root, &[]).expect("scan");
        let expected = [
            "a", "a-b", "a.b", "a/x", "a/x.c", "a/x/y", "a/x/y/z", "a0", "b", "b/c",
        ];
        assert_eq!(paths(&all), expected);
        for (path, image) in &all.entries {
            assert_eq!(all.get(path), Some(image), "{path}");
        }
        assert_eq!(all.get(&PkgPath::new("a/y").expect("path")), None);

        let nested = scan(root, &["a", "a/x", "b"]).expect("scan");
        assert_eq!(
            paths(&nested),
            ["a", "a/x", "a/x.c", "a/x/y", "a/x/y/z", "b", "b/c"]
        );
    }

    /// Each way a file can differ is named, including a size that differs under a digest not
    /// taken yet (assumed to be the promised one).
    #[test]
    fn mismatches_name_what_differs() {
        let file = |sha: u8, size: u64, mode: u32| Image::File {
            sha256: Digest([sha; 32]),
            size,
            mode,
            mtime: Mtime { secs: 0, nanos: 0 },
        };
        let expected = file(1, 10, 0o644);
        for (actual, reason) in [
            (file(2, 10, 0o644), "content differs (sha256"),
            (
                file(1, 11, 0o644),
                "content differs (11 bytes, expected 10)",
            ),
            (file(1, 10, 0o600), "permission bits are 600, expected 644"),
        ] {
            let said = image_mismatch(Some(&expected), Some(&actual)).expect("differs");
            assert!(said.starts_with(reason), "{said}");
        }
        assert_eq!(
            image_mismatch(Some(&expected), Some(&file(1, 10, 0o644))),
            None
        );
    }
}
