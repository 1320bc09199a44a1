//! Copying and comparing directory trees exactly: kinds, bytes, permission bits, symlink targets
//! and mtimes (seconds and nanoseconds).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use filetime::FileTime;
use walkdir::WalkDir;

/// Copies `src` to `dst` (which must not exist): modes, symlinks (not followed) and mtimes are
/// preserved; directory metadata is set last, deepest first.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let mut dirs = Vec::new();
    for entry in WalkDir::new(src).sort_by_file_name() {
        let entry = entry.with_context(|| format!("walking {}", src.display()))?;
        let rel = entry
            .path()
            .strip_prefix(src)
            .expect("walkdir yields paths below its root");
        let to = dst.join(rel);
        let meta = entry
            .path()
            .symlink_metadata()
            .with_context(|| format!("reading metadata of {}", entry.path().display()))?;
        let mtime = FileTime::from_last_modification_time(&meta);
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).with_context(|| format!("creating {}", to.display()))?;
            dirs.push((to, meta.permissions(), mtime));
        } else if ft.is_symlink() {
            let target = fs::read_link(entry.path())
                .with_context(|| format!("reading link {}", entry.path().display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .and_then(|()| filetime::set_symlink_file_times(&to, mtime, mtime))
                .with_context(|| format!("creating symlink {}", to.display()))?;
        } else {
            // fs::copy also copies the permission bits
            fs::copy(entry.path(), &to)
                .and_then(|_| fs::set_permissions(&to, meta.permissions()))
                .and_then(|()| filetime::set_file_times(&to, mtime, mtime))
                .with_context(|| {
                    format!("copying {} to {}", entry.path().display(), to.display())
                })?;
        }
    }
    for (dir, perms, mtime) in dirs.into_iter().rev() {
        fs::set_permissions(&dir, perms)
            .and_then(|()| filetime::set_file_times(&dir, mtime, mtime))
            .with_context(|| format!("setting metadata of {}", dir.display()))?;
    }
    Ok(())
}

/// What one entry of a tree is, as far as a comparison cares.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    File,
    Symlink(PathBuf),
    Dir,
    Other,
}

#[derive(Debug)]
struct Info {
    kind: Kind,
    mode: u32,
    mtime: FileTime,
    len: u64,
}

fn scan(root: &Path, ignore_top_level: &[&str]) -> Result<BTreeMap<PathBuf, Info>> {
    let mut out = BTreeMap::new();
    let walker = WalkDir::new(root)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            !(e.depth() == 1 && ignore_top_level.iter().any(|i| e.file_name() == *i))
        });
    for entry in walker {
        let entry = entry.with_context(|| format!("walking {}", root.display()))?;
        let meta = entry
            .path()
            .symlink_metadata()
            .with_context(|| format!("reading metadata of {}", entry.path().display()))?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink(
                fs::read_link(entry.path())
                    .with_context(|| format!("reading link {}", entry.path().display()))?,
            )
        } else if ft.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        let rel = entry
            .path()
            .strip_prefix(root)
            .expect("walkdir yields paths below its root")
            .to_path_buf();
        out.insert(
            rel,
            Info {
                kind,
                mode: meta.permissions().mode() & 0o7777,
                mtime: FileTime::from_last_modification_time(&meta),
                len: meta.len(),
            },
        );
    }
    Ok(out)
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Symlink(_) => "symlink",
        Kind::Dir => "directory",
        Kind::Other => "special file",
    }
}

/// Lists every difference between the trees `a` and `b` (an empty list means identical), except
/// for the root directory's own metadata and top-level entries named in `ignore_top_level`.
pub fn compare_trees(a: &Path, b: &Path, ignore_top_level: &[&str]) -> Result<Vec<String>> {
    let (ta, tb) = (scan(a, ignore_top_level)?, scan(b, ignore_top_level)?);
    let mut diffs = Vec::new();
    for (path, ia) in &ta {
        let p = path.display();
        let Some(ib) = tb.get(path) else {
            diffs.push(format!("{p}: only in {}", a.display()));
            continue;
        };
        if ia.kind != ib.kind {
            match (&ia.kind, &ib.kind) {
                (Kind::Symlink(x), Kind::Symlink(y)) => diffs.push(format!(
                    "{p}: symlink target {} != {}",
                    x.display(),
                    y.display()
                )),
                (x, y) => {
                    diffs.push(format!("{p}: {} != {}", kind_name(x), kind_name(y)));
                    continue;
                }
            }
        }
        if ia.kind == Kind::File {
            if ia.len != ib.len {
                diffs.push(format!("{p}: size {} != {}", ia.len, ib.len));
            } else {
                let read = |root: &Path| {
                    fs::read(root.join(path))
                        .with_context(|| format!("reading {}", root.join(path).display()))
                };
                if read(a)? != read(b)? {
                    diffs.push(format!("{p}: contents differ"));
                }
            }
        }
        // symlink permission bits are meaningless on Linux and not preserved by anything
        if !matches!(ia.kind, Kind::Symlink(_)) && ia.mode != ib.mode {
            diffs.push(format!("{p}: mode {:04o} != {:04o}", ia.mode, ib.mode));
        }
        if ia.mtime != ib.mtime {
            diffs.push(format!(
                "{p}: mtime {}.{:09} != {}.{:09}",
                ia.mtime.unix_seconds(),
                ia.mtime.nanoseconds(),
                ib.mtime.unix_seconds(),
                ib.mtime.nanoseconds()
            ));
        }
    }
    for path in tb.keys().filter(|p| !ta.contains_key(*p)) {
        diffs.push(format!("{}: only in {}", path.display(), b.display()));
    }
    Ok(diffs)
}

/// Number of entries `compare_trees` looks at in `root`.
pub fn count_entries(root: &Path, ignore_top_level: &[&str]) -> Result<usize> {
    Ok(scan(root, ignore_top_level)?.len())
}

/// Total size of the regular files of `target` that are new or whose bytes differ from `base`.
pub fn changed_bytes(base: &Path, target: &Path) -> Result<u64> {
    let (tb, tt) = (scan(base, &[])?, scan(target, &[])?);
    let mut total = 0;
    for (path, it) in tt.iter().filter(|(_, i)| i.kind == Kind::File) {
        let same = match tb.get(path) {
            Some(ib) if ib.kind == Kind::File && ib.len == it.len => {
                fs::read(base.join(path))? == fs::read(target.join(path))?
            }
            _ => false,
        };
        if !same {
            total += it.len;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(root: &Path) -> Result<()> {
        fs::create_dir_all(root.join("d/e/empty"))?;
        fs::write(root.join("d/f.txt"), b"hello")?;
        fs::write(root.join("d/e/x.bin"), [0u8, 1, 2, 3])?;
        fs::set_permissions(root.join("d/e/x.bin"), fs::Permissions::from_mode(0o755))?;
        std::os::unix::fs::symlink("f.txt", root.join("d/link"))?;
        fs::create_dir(root.join(".bsi"))?;
        fs::write(root.join(".bsi/state"), b"ignored")?;
        let t = FileTime::from_unix_time(1_700_000_000, 123_456_789);
        filetime::set_symlink_file_times(root.join("d/link"), t, t)?;
        for p in ["d/f.txt", "d/e/x.bin", "d/e/empty", "d/e", "d"] {
            filetime::set_file_times(root.join(p), t, t)?;
        }
        Ok(())
    }

    /// A base tree and an exact copy of it, in a temporary directory.
    fn pair() -> Result<(tempfile::TempDir, PathBuf, PathBuf)> {
        let tmp = tempfile::tempdir()?;
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir(&a)?;
        sample(&a)?;
        copy_tree(&a, &b)?;
        Ok((tmp, a, b))
    }

    #[test]
    fn copy_is_identical() -> Result<()> {
        let (_tmp, a, b) = pair()?;
        assert_eq!(compare_trees(&a, &b, &[])?, Vec::<String>::new());
        assert_eq!(count_entries(&a, &[".bsi"])?, 6);
        Ok(())
    }

    #[test]
    fn each_kind_of_difference_is_reported() -> Result<()> {
        let (_tmp, a, b) = pair()?;
        let t = FileTime::from_unix_time(1_700_000_000, 123_456_790);
        filetime::set_symlink_file_times(b.join("d/link"), t, t)?;
        fs::set_permissions(b.join("d/e/x.bin"), fs::Permissions::from_mode(0o555))?;
        fs::write(b.join("d/f.txt"), b"hellO")?;
        let old = FileTime::from_unix_time(1_700_000_000, 123_456_789);
        filetime::set_file_times(b.join("d/f.txt"), old, old)?;
        fs::write(b.join(".bsi/state"), b"ignorex")?;
        fs::remove_dir(b.join("d/e/empty"))?;
        filetime::set_file_times(b.join("d/e"), old, old)?;
        let diffs = compare_trees(&a, &b, &[".bsi"])?;
        assert_eq!(
            diffs,
            vec![
                "d/e/empty: only in ".to_string() + &a.display().to_string(),
                "d/e/x.bin: mode 0755 != 0555".to_string(),
                "d/f.txt: contents differ".to_string(),
                "d/link: mtime 1700000000.123456789 != 1700000000.123456790".to_string(),
            ]
        );
        // without the ignore list the state directory differs too
        assert!(compare_trees(&a, &b, &[])?.contains(&".bsi/state: contents differ".to_string()));
        Ok(())
    }

    #[test]
    fn kind_and_link_target_changes_are_reported() -> Result<()> {
        let (_tmp, a, b) = pair()?;
        fs::remove_file(b.join("d/link"))?;
        std::os::unix::fs::symlink("e/x.bin", b.join("d/link"))?;
        fs::remove_file(b.join("d/f.txt"))?;
        std::os::unix::fs::symlink("link", b.join("d/f.txt"))?;
        let diffs = compare_trees(&a, &b, &[".bsi"])?;
        assert!(
            diffs.contains(&"d/f.txt: file != symlink".to_string()),
            "{diffs:?}"
        );
        assert!(
            diffs.contains(&"d/link: symlink target f.txt != e/x.bin".to_string()),
            "{diffs:?}"
        );
        assert_eq!(changed_bytes(&a, &b)?, 0);
        Ok(())
    }
}
