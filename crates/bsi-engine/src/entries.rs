//! A verified package's manifest entries: held while they are few, else kept aside in a private
//! file without a name and read back a block at a time. An entry held takes about 256 bytes
//! (37 MB for a tree of 150,750 changed entries); kept aside, 8 bytes of memory (where it
//! ends in the file), and the file lies in the page cache, not in the process.

use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bsi_format::{Entry, EntryStore, PkgPath};
use serde::Serialize;

mod compact;

use crate::package::unnamed_file;
use crate::FsError;

/// Entries held before the rest are kept aside: a package this small (most are) reads its
/// entries from memory.
pub(crate) const HELD: usize = 4096;

/// Bytes of entries written to the file at a time.
const WRITE_CHUNK: usize = 64 << 10;

/// What a walk of [`Entries`] does with each block of them, given the index of its first.
pub type EachBlock<'a, E> = dyn FnMut(usize, &[Entry]) -> Result<(), E> + 'a;

/// A package's entries, in path order (the manifest's validation checked).
pub struct Entries {
    held: Vec<Entry>,
    aside: Option<Aside>,
    /// How many are held before the rest are kept aside.
    hold: usize,
    /// Where the file is made: a directory, else the system's for temporary files.
    dir: Option<PathBuf>,
    /// The package, for messages.
    package: PathBuf,
}

/// Entries kept aside: each in a compact form of its own (see [`compact`]), one after the
/// other.
struct Aside {
    file: File,
    /// Where each entry ends in the file (it starts where the one before ends).
    ends: Vec<u64>,
    /// Bytes written to the file.
    written: u64,
    /// Bytes not yet written to the file.
    unwritten: Vec<u8>,
}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entries")
            .field("len", &self.len())
            .field("aside", &self.aside.is_some())
            .finish()
    }
}

impl Entries {
    /// No entries yet, of the package at `package`; past [`HELD`] of them, the rest are kept
    /// aside in a file made in `dir` (else in the system's directory for temporary files).
    pub(crate) fn new(package: &Path, dir: Option<&Path>) -> Entries {
        Entries::holding(HELD, package, dir)
    }

    /// [`new`](Self::new), holding `hold` entries before the rest are kept aside.
    pub(crate) fn holding(hold: usize, package: &Path, dir: Option<&Path>) -> Entries {
        Entries {
            held: Vec::new(),
            aside: None,
            hold,
            dir: dir.map(Path::to_owned),
            package: package.to_owned(),
        }
    }

    /// Entries held, of the package at `package`.
    #[cfg(test)]
    pub(crate) fn held(entries: Vec<Entry>, package: &Path) -> Entries {
        Entries {
            hold: entries.len(),
            held: entries,
            aside: None,
            dir: None,
            package: package.to_owned(),
        }
    }

    pub fn len(&self) -> usize {
        match &self.aside {
            Some(aside) => aside.ends.len(),
            None => self.held.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether they are kept aside in a file rather than held.
    pub fn kept_aside(&self) -> bool {
        self.aside.is_some()
    }

    fn unreadable(&self, e: std::io::Error) -> FsError {
        FsError::new("read the entries kept aside of", &self.package, e)
    }

    /// Entries `range` (within `0..len`).
    pub fn range(&self, range: Range<usize>) -> Result<Cow<'_, [Entry]>, FsError> {
        let Some(aside) = &self.aside else {
            return Ok(Cow::Borrowed(&self.held[range]));
        };
        if range.is_empty() {
            return Ok(Cow::Owned(Vec::new()));
        }
        let start = match range.start {
            0 => 0,
            i => aside.ends[i - 1],
        };
        let end = aside.ends[range.end - 1];
        let mut bytes = vec![0; (end - start) as usize];
        aside
            .file
            .read_exact_at(&mut bytes, start)
            .map_err(|e| self.unreadable(e))?;
        let mut reader = compact::Reader::new(&bytes);
        let entries = range
            .map(|_| reader.entry())
            .collect::<Result<Vec<Entry>, _>>()
            .map_err(|why| self.unreadable(std::io::Error::other(why)))?;
        match reader.is_empty() {
            true => Ok(Cow::Owned(entries)),
            false => Err(self.unreadable(std::io::Error::other(compact::DAMAGED))),
        }
    }

    /// Entry `i` (within `0..len`).
    pub fn get(&self, i: usize) -> Result<Cow<'_, Entry>, FsError> {
        Ok(match self.range(i..i + 1)? {
            Cow::Borrowed(one) => Cow::Borrowed(&one[0]),
            Cow::Owned(mut one) => Cow::Owned(one.remove(0)),
        })
    }

    /// The first index at or after `from` whose entry's path comes after `path`.
    pub fn after(&self, from: usize, path: &PkgPath) -> Result<usize, FsError> {
        if self.aside.is_none() {
            return Ok(from + self.held[from..].partition_point(|e| e.path <= *path));
        }
        let (mut low, mut high) = (from, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            match self.get(mid)?.path <= *path {
                true => low = mid + 1,
                false => high = mid,
            }
        }
        Ok(low)
    }

    /// The entry of `path` and its index, if there is one.
    pub fn find(&self, path: &PkgPath) -> Result<Option<(usize, Cow<'_, Entry>)>, FsError> {
        let i = self.after(0, path)?;
        if i == 0 {
            return Ok(None);
        }
        let entry = self.get(i - 1)?;
        Ok((entry.path == *path).then_some((i - 1, entry)))
    }

    /// `each` block of at most `block` entries of `range` in turn, given with the index of its
    /// first.
    pub fn walk<E: From<FsError>>(
        &self,
        range: Range<usize>,
        block: usize,
        each: &mut EachBlock<'_, E>,
    ) -> Result<(), E> {
        let mut first = range.start;
        while first < range.end {
            let end = range.end.min(first + block.max(1));
            each(first, &self.range(first..end)?)?;
            first = end;
        }
        Ok(())
    }

    /// Keep `entry` aside, making the file at the first.
    fn put_aside(&mut self, entry: &Entry) -> std::io::Result<()> {
        let aside = match &mut self.aside {
            Some(aside) => aside,
            None => {
                // A file that never has a name, so that nothing is left in `dir` even by a
                // crash; where `dir`'s filesystem cannot make one, in the system's directory
                // for temporary files.
                let unnamed = match &self.dir {
                    Some(dir) => unnamed_file(dir)?,
                    None => None,
                };
                let file = match unnamed {
                    Some(file) => file,
                    None => tempfile::tempfile()?,
                };
                self.aside.insert(Aside {
                    file,
                    ends: Vec::new(),
                    written: 0,
                    unwritten: Vec::with_capacity(WRITE_CHUNK),
                })
            }
        };
        compact::put(&mut aside.unwritten, entry);
        aside
            .ends
            .push(aside.written + aside.unwritten.len() as u64);
        if aside.unwritten.len() >= WRITE_CHUNK {
            aside.write_out()?;
        }
        Ok(())
    }

    /// Why entries could not be kept aside.
    fn failure(&self, e: std::io::Error) -> String {
        match &self.dir {
            Some(dir) => format!("{}: {e}", dir.display()),
            None => format!("{}: {e}", std::env::temp_dir().display()),
        }
    }
}

impl Aside {
    fn write_out(&mut self) -> std::io::Result<()> {
        self.file.write_all(&self.unwritten)?;
        self.written += self.unwritten.len() as u64;
        self.unwritten.clear();
        Ok(())
    }
}

impl EntryStore for Entries {
    fn push(&mut self, entry: Entry) -> Result<(), String> {
        if self.aside.is_none() && self.held.len() < self.hold {
            self.held.push(entry);
            return Ok(());
        }
        let held = std::mem::take(&mut self.held);
        for e in held.iter().chain([&entry]) {
            self.put_aside(e).map_err(|e| self.failure(e))?;
        }
        Ok(())
    }

    fn done(&mut self) -> Result<(), String> {
        self.held.shrink_to_fit();
        if let Some(aside) = &mut self.aside {
            aside.ends.shrink_to_fit();
            let written = aside.write_out();
            aside.unwritten = Vec::new();
            written.map_err(|e| self.failure(e))?;
        }
        Ok(())
    }
}

/// Written as the manifest's array of entries, those kept aside read back a block at a time.
impl Serialize for Entries {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};

        if self.aside.is_none() {
            return serializer.collect_seq(&self.held);
        }
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        let mut first = 0;
        while first < self.len() {
            let end = self.len().min(first + HELD);
            for entry in self.range(first..end).map_err(S::Error::custom)?.iter() {
                seq.serialize_element(entry)?;
            }
            first = end;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bsi_format::{Image, Mtime, Operation};

    fn entry(path: &str) -> Entry {
        let dir = |secs| Image::Dir {
            mode: 0o755,
            mtime: Mtime { secs, nanos: 0 },
        };
        Entry {
            path: PkgPath::new(path).expect("a path"),
            component: "webkit".into(),
            pre: Some(dir(1)),
            post: Some(dir(2)),
            op: Operation::Metadata,
            payload: None,
        }
    }

    /// Entries read the same whether held or kept aside, whatever their number past those held.
    #[test]
    fn entries_kept_aside_read_as_held_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let all: Vec<Entry> = (0..40).map(|i| entry(&format!("d/{i:03}"))).collect();
        let held = Entries::held(all.clone(), Path::new("p.bsi"));
        for hold in [0, 1, 7, 39, 40] {
            let mut aside = Entries::holding(hold, Path::new("p.bsi"), Some(tmp.path()));
            for e in &all {
                aside.push(e.clone()).expect("kept");
            }
            aside.done().expect("kept");
            assert_eq!(aside.kept_aside(), hold < all.len(), "{hold}");
            assert_eq!(aside.len(), all.len());
            for (a, b) in [(0, 40), (0, 1), (5, 17), (39, 40), (12, 12)] {
                assert_eq!(
                    aside.range(a..b).expect("read"),
                    held.range(a..b).expect("read")
                );
            }
            for i in [0, 1, 20, 39] {
                assert_eq!(aside.get(i).expect("read"), held.get(i).expect("read"));
            }
            for path in ["d/000", "d/017", "d/039", "d/0175", "a", "e", "d"] {
                let path = PkgPath::new(path).expect("a path");
                let found = aside.find(&path).expect("read");
                assert_eq!(found, held.find(&path).expect("read"), "{path}");
                for from in [0, 10, 40] {
                    assert_eq!(aside.after(from, &path).ok(), held.after(from, &path).ok());
                }
            }
            let json = serde_json::to_string(&aside).expect("serialised");
            assert_eq!(json, serde_json::to_string(&all).expect("serialised"));
            let mut seen = Vec::new();
            aside
                .walk(3..40, 16, &mut |first, block| {
                    seen.push((first, block.len()));
                    Ok::<(), FsError>(())
                })
                .expect("walked");
            assert_eq!(seen, [(3, 16), (19, 16), (35, 5)]);
        }
    }

    /// Entries that cannot be kept aside say where.
    #[test]
    fn entries_that_cannot_be_kept_aside_name_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let gone = tmp.path().join("gone");
        let mut aside = Entries::holding(1, Path::new("p.bsi"), Some(&gone));
        aside.push(entry("a")).expect("held");
        let why = aside.push(entry("b")).expect_err("no directory");
        assert!(why.starts_with(&gone.display().to_string()), "{why}");
    }
}
