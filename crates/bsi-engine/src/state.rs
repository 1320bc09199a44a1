//! What the engine keeps about a root: the installed patch and what is needed to revert it.

use std::fs;
use std::path::{Path, PathBuf};

use bsi_format::{BaseRelease, Digest, Entry, Image, Letter, PkgPath};
use serde::{Deserialize, Serialize};

use crate::FsError;

/// The state directory of a root when none is given: `ROOT/.bsi`.
pub fn default_state_dir(root: &Path) -> PathBuf {
    root.join(crate::STATE_DIR_NAME)
}

/// State format written: 2 has revert data kept as base files (`N.orig`), which an earlier bsi
/// would take for damaged copies; 1 is still read.
pub(crate) const STATE_FORMAT: u32 = 2;

/// The installed patch, as recorded after a successful apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Installed {
    pub format: u32,
    pub product: String,
    pub base: BaseRelease,
    pub letter: Letter,
    pub package_sha256: Digest,
    pub signer: String,
    pub entries: Vec<InstalledEntry>,
}

/// The release an installed record names; see [`StateDir::load_head`].
#[derive(Debug, Deserialize)]
pub(crate) struct InstalledHead {
    pub format: u32,
    pub product: String,
    pub base: BaseRelease,
    pub letter: Letter,
}

/// A form of the installed record that can be loaded.
trait Recorded: serde::de::DeserializeOwned {
    fn format(&self) -> u32;

    /// What makes it damaged beyond its format, if anything.
    fn flaw(&self) -> Option<String> {
        None
    }
}

impl Recorded for Installed {
    fn format(&self) -> u32 {
        self.format
    }

    /// Its entries are in path order, each path once, as an apply writes them: a revert rolls
    /// them in that order and an apply looks them up where they lie.
    fn flaw(&self) -> Option<String> {
        let pair = self.entries.windows(2).find(|w| w[0].path >= w[1].path)?;
        Some(format!(
            "entry {} is not after {}",
            pair[1].path, pair[0].path
        ))
    }
}

impl Recorded for InstalledHead {
    fn format(&self) -> u32 {
        self.format
    }
}

/// One path the patch changed: what was there before (as found, times included), what the
/// patch left, and the revert file holding the old bytes when they were overwritten.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstalledEntry {
    #[serde(deserialize_with = "shared_path")]
    pub path: PkgPath,
    pub before: Option<Image>,
    pub after: Option<Image>,
    pub revert: Option<String>,
}

impl Installed {
    /// This record as one to write, lent from it.
    pub fn record(&self) -> Record<'_> {
        Record {
            format: self.format,
            product: &self.product,
            base: &self.base,
            letter: self.letter,
            package_sha256: self.package_sha256,
            signer: &self.signer,
            entries: RecordEntries::Lent(&self.entries),
        }
    }
}

/// An installed record to write, written as [`Installed`] is read. Its entries are made as
/// they are written, from where their paths and images are held (see [`RecordEntries`]).
#[derive(Debug, Serialize)]
pub(crate) struct Record<'a> {
    pub format: u32,
    pub product: &'a str,
    pub base: &'a BaseRelease,
    pub letter: Letter,
    pub package_sha256: Digest,
    pub signer: &'a str,
    pub entries: RecordEntries<'a>,
}

/// Where the entries of a [`Record`] come from: nothing is held for them but what they borrow
/// (a vector of entries that borrowed took 40 bytes an entry, 6 MB for 150,750 entries).
#[derive(Debug, Clone, Copy)]
pub(crate) enum RecordEntries<'a> {
    /// Those of an installed record.
    Lent(&'a [InstalledEntry]),
    /// Those an apply makes, one for each entry of its package: the path and the post-image
    /// of the entry; before it, the image `found` at its path where that is not the entry's
    /// pre-image (in the entries' order); and the revert data's name where `names` has one
    /// (by entry, in order).
    Planned {
        entries: &'a [Entry],
        found: &'a [Option<Box<Image>>],
        names: &'a [(usize, String)],
    },
}

impl<'a> RecordEntries<'a> {
    /// The entries, in order.
    pub fn iter(self) -> impl Iterator<Item = RecordEntry<'a>> {
        let (lent, planned) = match self {
            RecordEntries::Lent(entries) => (Some(entries), None),
            RecordEntries::Planned {
                entries,
                found,
                names,
            } => (None, Some((entries, found, names))),
        };
        let lent = lent.into_iter().flatten().map(|e| RecordEntry {
            path: &e.path,
            before: e.before.as_ref(),
            after: e.after.as_ref(),
            revert: e.revert.as_deref(),
        });
        let planned = planned.into_iter().flat_map(|(entries, found, names)| {
            let mut names = names.iter().peekable();
            entries
                .iter()
                .zip(found)
                .enumerate()
                .map(move |(i, (entry, found))| RecordEntry {
                    path: &entry.path,
                    before: before(entry, found),
                    after: entry.post.as_ref(),
                    revert: names.next_if(|(at, _)| *at == i).map(|(_, n)| n.as_str()),
                })
        });
        lent.chain(planned)
    }
}

/// What `entry`'s path held before an apply: the image `found` there where it is not the
/// entry's pre-image exactly (its time differs), else that pre-image.
pub(crate) fn before<'a>(entry: &'a Entry, found: &'a Option<Box<Image>>) -> Option<&'a Image> {
    found.as_deref().or(entry.pre.as_ref())
}

impl Serialize for RecordEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// An [`InstalledEntry`] to write.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct RecordEntry<'a> {
    pub path: &'a PkgPath,
    pub before: Option<&'a Image>,
    pub after: Option<&'a Image>,
    pub revert: Option<&'a str>,
}

thread_local! {
    /// The paths, sorted, whose text a record parsed on this thread shares (see
    /// [`StateDir::load_sharing`]).
    static KNOWN: std::cell::RefCell<Vec<PkgPath>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The known paths of this thread while it lives.
struct Known;

impl Known {
    fn set(paths: Vec<PkgPath>) -> Known {
        KNOWN.with(|known| *known.borrow_mut() = paths);
        Known
    }
}

impl Drop for Known {
    fn drop(&mut self) {
        KNOWN.with(|known| *known.borrow_mut() = Vec::new());
    }
}

/// A path as parsed, or the known one with the same text: the parsed one is freed at once, and
/// its room is what the next path parsed takes.
fn shared_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PkgPath, D::Error> {
    let path = PkgPath::deserialize(d)?;
    Ok(KNOWN.with(|known| {
        let known = known.borrow();
        match known.binary_search(&path) {
            Ok(i) => known[i].clone(),
            Err(_) => path,
        }
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("state file {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

#[derive(Debug)]
pub(crate) struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }

    pub fn installed_path(&self) -> PathBuf {
        self.dir.join("installed.json")
    }

    pub fn revert_dir(&self) -> PathBuf {
        self.dir.join("revert")
    }

    pub fn load(&self) -> Result<Option<Installed>, StateError> {
        self.load_as()
    }

    /// [`load`](Self::load), each path the record shares with `entries` (a package's, sorted
    /// by path) held once, in both: a switch of 100,500 entries held 4.8 MB more for them.
    pub fn load_sharing(&self, entries: &[Entry]) -> Result<Option<Installed>, StateError> {
        let _known = Known::set(entries.iter().map(|e| e.path.clone()).collect());
        self.load_as()
    }

    /// What the installed record says of the release, its entries skipped unread: what a
    /// status shows.
    pub fn load_head(&self) -> Result<Option<InstalledHead>, StateError> {
        self.load_as()
    }

    fn load_as<T: Recorded>(&self) -> Result<Option<T>, StateError> {
        let path = self.installed_path();
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::new("read", &path, e).into()),
        };
        // Parsed as it is read: a record of 50,250 entries is 30 MB of text.
        let installed: T = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
            match e.is_io() {
                true => FsError::new("read", &path, e.into()).into(),
                false => StateError::Damaged {
                    path: path.clone(),
                    reason: e.to_string(),
                },
            }
        })?;
        let format = installed.format();
        if !(1..=STATE_FORMAT).contains(&format) {
            return Err(StateError::Damaged {
                path,
                reason: format!("state format {format} is not 1 to {STATE_FORMAT}"),
            });
        }
        if let Some(reason) = installed.flaw() {
            return Err(StateError::Damaged { path, reason });
        }
        Ok(Some(installed))
    }

    /// Write the installed record atomically (synced, directory synced).
    pub fn save(&self, installed: &Record<'_>) -> Result<(), FsError> {
        crate::fsx::write_atomically_with(&self.installed_path(), |out| {
            serde_json::to_writer_pretty(out, installed).map_err(std::io::Error::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> InstalledEntry {
        InstalledEntry {
            path: PkgPath::new(path).expect("a path"),
            before: None,
            after: Some(Image::Dir {
                mode: 0o755,
                mtime: bsi_format::Mtime { secs: 1, nanos: 0 },
            }),
            revert: None,
        }
    }

    fn record(paths: &[&str]) -> Installed {
        Installed {
            format: STATE_FORMAT,
            product: "macOS".to_owned(),
            base: BaseRelease {
                version: "26.3".parse().expect("a version"),
                build: None,
            },
            letter: "a".parse().expect("a letter"),
            package_sha256: Digest([7; 32]),
            signer: "example".to_owned(),
            entries: paths.iter().map(|p| entry(p)).collect(),
        }
    }

    /// An installed record whose entries are out of path order, or name a path twice, is
    /// damaged: an apply and a revert rely on that order.
    #[test]
    fn a_record_out_of_path_order_is_damaged() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = StateDir::new(dir.path());
        for (paths, ok) in [
            (&["Lib", "Lib/a", "Lib/b"][..], true),
            (&["Lib", "Lib/b", "Lib/a"][..], false),
            (&["Lib", "Lib/a", "Lib/a"][..], false),
        ] {
            state.save(&record(paths).record()).expect("saved");
            match (state.load(), ok) {
                (Ok(Some(loaded)), true) => assert_eq!(loaded.entries.len(), 3),
                (Err(StateError::Damaged { reason, .. }), false) => {
                    assert!(reason.contains("is not after Lib/"), "{reason}")
                }
                (got, _) => panic!("{paths:?}: {got:?}"),
            }
        }
    }

    /// A record loaded beside a package's entries holds each path they share once, in both;
    /// the paths it does not share, and every path of a record loaded after, are its own.
    #[test]
    fn a_record_loaded_beside_entries_shares_their_paths() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = StateDir::new(dir.path());
        state
            .save(&record(&["Lib", "Lib/a", "Lib/b"]).record())
            .expect("saved");
        let entries: Vec<Entry> = ["Lib/a", "Lib/c"]
            .iter()
            .map(|p| Entry {
                path: PkgPath::new(p).expect("a path"),
                component: "webkit".into(),
                pre: None,
                post: None,
                op: bsi_format::Operation::Delete,
                payload: None,
            })
            .collect();
        let same = |a: &PkgPath, b: &PkgPath| a.as_str().as_ptr() == b.as_str().as_ptr();
        let loaded = state
            .load_sharing(&entries)
            .expect("loaded")
            .expect("a record");
        let paths: Vec<&str> = loaded.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["Lib", "Lib/a", "Lib/b"]);
        assert!(same(&loaded.entries[1].path, &entries[0].path));
        assert!(!same(&loaded.entries[0].path, &entries[0].path));
        let again = state.load().expect("loaded").expect("a record");
        assert!(!same(&again.entries[1].path, &entries[0].path));
        // Nor after a load that failed.
        fs::write(state.installed_path(), b"{").expect("written");
        assert!(state.load_sharing(&entries).is_err());
        state
            .save(&record(&["Lib", "Lib/a", "Lib/b"]).record())
            .expect("saved");
        let after_error = state.load().expect("loaded").expect("a record");
        assert!(!same(&after_error.entries[1].path, &entries[0].path));
    }
}
