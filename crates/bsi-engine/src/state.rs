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
    pub package_sha256: Digest,
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
/// (a vector of entries that borrowed took 40 bytes an entry, 6 MB for 150,750 entries), and
/// a package's entries kept aside are read back a block at a time.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RecordEntries<'a> {
    /// Those of an installed record.
    Lent(&'a [InstalledEntry]),
    /// Those an apply makes, one for each entry of its package: the path and the post-image
    /// of the entry; before it, the image `found` at its path where that is not the entry's
    /// pre-image (in the entries' order); and the revert data's name where `names` has one
    /// (by entry, in order).
    Planned {
        entries: &'a crate::Entries,
        found: &'a [Option<Box<Image>>],
        names: &'a [(usize, String)],
    },
}

/// What `entry`'s path held before an apply: the image `found` there where it is not the
/// entry's pre-image exactly (its time differs), else that pre-image.
pub(crate) fn before<'a>(entry: &'a Entry, found: &'a Option<Box<Image>>) -> Option<&'a Image> {
    found.as_deref().or(entry.pre.as_ref())
}

impl Serialize for RecordEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let (entries, found, names) = match *self {
            RecordEntries::Lent(entries) => {
                return serializer.collect_seq(entries.iter().map(|e| RecordEntry {
                    path: &e.path,
                    before: e.before.as_ref(),
                    after: e.after.as_ref(),
                    revert: e.revert.as_deref(),
                }))
            }
            RecordEntries::Planned {
                entries,
                found,
                names,
            } => (entries, found, names),
        };
        /// Why the walk stopped: the entries could not be read, or one written.
        enum Stop<E> {
            Read(FsError),
            Write(E),
        }
        impl<E> From<FsError> for Stop<E> {
            fn from(e: FsError) -> Stop<E> {
                Stop::Read(e)
            }
        }
        let mut seq = serializer.serialize_seq(Some(entries.len()))?;
        let mut names = names.iter().peekable();
        let walked = entries.walk(0..entries.len(), crate::txn::BLOCK, &mut |first, block| {
            for (k, entry) in block.iter().enumerate() {
                let i = first + k;
                seq.serialize_element(&RecordEntry {
                    path: &entry.path,
                    before: before(entry, &found[i]),
                    after: entry.post.as_ref(),
                    revert: names.next_if(|(at, _)| *at == i).map(|(_, n)| n.as_str()),
                })
                .map_err(Stop::Write)?;
            }
            Ok(())
        });
        match walked {
            Ok(()) => seq.end(),
            Err(Stop::Write(e)) => Err(e),
            Err(Stop::Read(e)) => Err(S::Error::custom(e)),
        }
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

/// What a walk of the installed record does with each block of entries, given the index of its
/// first.
pub(crate) type EachEntries<'e, E> = dyn FnMut(usize, &[InstalledEntry]) -> Result<(), E> + 'e;

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    sha256: sha2::Sha256,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        self.sha256.update(&buf[..n]);
        Ok(n)
    }
}

/// A walk of an installed record's entries (see [`StateDir::walk_entries`]): parsed as
/// [`Installed`] is, the entries handed over a block at a time instead of kept.
struct Walk<'w, E> {
    block: usize,
    each: &'w mut EachEntries<'w, E>,
    /// What `each` failed with, which stopped the parse.
    failed: Option<E>,
}

const RECORD_FIELDS: &[&str] = &[
    "format",
    "product",
    "base",
    "letter",
    "package_sha256",
    "signer",
    "entries",
];

impl<'de, E> serde::de::DeserializeSeed<'de> for &mut Walk<'_, E> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_struct("Installed", RECORD_FIELDS, self)
    }
}

impl<'de, E> serde::de::Visitor<'de> for &mut Walk<'_, E> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an installed record")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        let mut seen = [false; 7];
        while let Some(key) = map.next_key::<String>()? {
            let Some(at) = RECORD_FIELDS.iter().position(|f| *f == key) else {
                return Err(A::Error::unknown_field(&key, RECORD_FIELDS));
            };
            if std::mem::replace(&mut seen[at], true) {
                return Err(A::Error::duplicate_field(RECORD_FIELDS[at]));
            }
            match RECORD_FIELDS[at] {
                "format" => {
                    let format: u32 = map.next_value()?;
                    if !(1..=STATE_FORMAT).contains(&format) {
                        return Err(A::Error::custom(format!(
                            "state format {format} is not 1 to {STATE_FORMAT}"
                        )));
                    }
                }
                "product" | "signer" => drop(map.next_value::<String>()?),
                "base" => drop(map.next_value::<BaseRelease>()?),
                "letter" => drop(map.next_value::<Letter>()?),
                "package_sha256" => drop(map.next_value::<Digest>()?),
                _ => map.next_value_seed(Entries(&mut *self))?,
            }
        }
        match seen.iter().position(|s| !s) {
            Some(at) => Err(A::Error::missing_field(RECORD_FIELDS[at])),
            None => Ok(()),
        }
    }
}

/// The entries of a [`Walk`].
struct Entries<'a, 'w, E>(&'a mut Walk<'w, E>);

impl<'de, E> serde::de::DeserializeSeed<'de> for Entries<'_, '_, E> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, E> serde::de::Visitor<'de> for Entries<'_, '_, E> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("the entries of an installed record")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        let walk = self.0;
        let mut block: Vec<InstalledEntry> = Vec::with_capacity(walk.block);
        let mut first = 0;
        let mut last: Option<PkgPath> = None;
        let mut hand = |block: &mut Vec<InstalledEntry>, first: &mut usize| {
            if block.is_empty() {
                return Ok(());
            }
            if let Err(e) = (walk.each)(*first, block) {
                walk.failed = Some(e);
                return Err(A::Error::custom("stopped"));
            }
            *first += block.len();
            block.clear();
            Ok(())
        };
        while let Some(entry) = seq.next_element::<InstalledEntry>()? {
            if let Some(last) = last.as_ref().filter(|l| **l >= entry.path) {
                return Err(A::Error::custom(format!(
                    "entry {} is not after {last}",
                    entry.path
                )));
            }
            last = Some(entry.path.clone());
            block.push(entry);
            if block.len() == walk.block {
                hand(&mut block, &mut first)?;
            }
        }
        hand(&mut block, &mut first)
    }
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

    #[cfg(test)]
    pub fn load(&self) -> Result<Option<Installed>, StateError> {
        self.load_as()
    }

    /// What the installed record says of the release, its entries skipped unread: what a
    /// status shows.
    pub fn load_head(&self) -> Result<Option<InstalledHead>, StateError> {
        self.load_as()
    }

    /// Walk the installed record's entries `block` at a time, in order, each block given with
    /// the index of its first, never holding more than a block (a revert of 150,750 entries
    /// held the whole record, 47 MiB). The record is checked as [`load`](Self::load) checks it
    /// (its format, its fields, its entries in path order), a block at a time: a damaged one
    /// may be refused after blocks were given. `Ok(None)` when there is no record, else the
    /// digest of the bytes read, by which a second walk knows it read the same record.
    pub fn walk_entries<E: From<StateError>>(
        &self,
        block: usize,
        each: &mut EachEntries<'_, E>,
    ) -> Result<Option<Digest>, E> {
        let path = self.installed_path();
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::from(FsError::new("read", &path, e)).into()),
        };
        // Hashed a buffer at a time (the parser reads a byte at a time).
        let mut reader = std::io::BufReader::new(Hashing {
            inner: file,
            sha256: sha2::Sha256::default(),
        });
        let mut walk = Walk {
            block,
            each,
            failed: None,
        };
        let mut de = serde_json::Deserializer::from_reader(&mut reader);
        let walked =
            serde::de::DeserializeSeed::deserialize(&mut walk, &mut de).and_then(|()| de.end());
        if let Some(failed) = walk.failed {
            return Err(failed);
        }
        walked.map_err(|e| match e.is_io() {
            true => StateError::from(FsError::new("read", &path, e.into())),
            false => StateError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            },
        })?;
        use sha2::Digest as _;
        Ok(Some(Digest(reader.into_inner().sha256.finalize().into())))
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
            write_record(out, installed)
        })
    }
}

/// Write an installed record as its file holds it: compact JSON, read back a byte at a time (as
/// pretty JSON, 38% of a record of 150,750 entries was indentation: 88 MB against 54.6).
pub(crate) fn write_record(
    out: &mut dyn std::io::Write,
    record: &Record<'_>,
) -> std::io::Result<()> {
    serde_json::to_writer(out, record).map_err(std::io::Error::from)
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

    /// The entries of a record are walked a block at a time, each block with the index of its
    /// first, and the walk gives the digest of the bytes read; a record out of order, with a
    /// field it should not have, or of another format is refused as damaged, and an error of
    /// the walker stops the walk and is the walk's.
    #[test]
    fn a_record_is_walked_a_block_at_a_time_and_checked_as_it_is_loaded() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = StateDir::new(dir.path());
        let mut each = |_: usize, _: &[InstalledEntry]| -> Result<(), StateError> { Ok(()) };
        assert!(matches!(state.walk_entries(2, &mut each), Ok(None)));
        let paths = ["Lib", "Lib-x", "Lib/a", "Lib/b", "Lib/c"];
        state.save(&record(&paths).record()).expect("saved");
        let mut blocks = Vec::new();
        let digest = state
            .walk_entries(2, &mut |first, block| -> Result<(), StateError> {
                let named = block.iter().map(|e| e.path.to_string());
                blocks.push((first, named.collect::<Vec<_>>()));
                Ok(())
            })
            .expect("walked");
        let expected: Vec<(usize, Vec<String>)> = paths
            .chunks(2)
            .enumerate()
            .map(|(k, c)| (2 * k, c.iter().map(|p| p.to_string()).collect()))
            .collect();
        assert_eq!(blocks, expected);
        use sha2::Digest as _;
        let bytes = fs::read(state.installed_path()).expect("read");
        assert_eq!(digest, Some(Digest(sha2::Sha256::digest(&bytes).into())));

        let text = String::from_utf8(bytes).expect("text");
        for (damaged, reason) in [
            (
                text.replacen("Lib/b", "Lib/d", 1),
                "entry Lib/c is not after Lib/d",
            ),
            (
                text.replacen(r#""signer""#, r#""signed""#, 1),
                "unknown field `signed`",
            ),
            (
                text.replacen(r#""format":2"#, r#""format":7"#, 1),
                "state format 7",
            ),
            (
                text.replacen(r#""letter":"a","#, "", 1),
                "missing field `letter`",
            ),
        ] {
            assert_ne!(damaged, text, "{reason}");
            fs::write(state.installed_path(), damaged).expect("written");
            match state.walk_entries(2, &mut each) {
                Err(StateError::Damaged { reason: got, .. }) => {
                    assert!(got.contains(reason), "{got:?}, expected {reason:?}")
                }
                other => panic!("{reason}: {other:?}"),
            }
        }
        fs::write(state.installed_path(), &text).expect("written");
        let mut given = 0;
        let stopped = state.walk_entries(2, &mut |first, _| -> Result<(), StateError> {
            given += 1;
            match first {
                2 => Err(StateError::Damaged {
                    path: PathBuf::from("walker"),
                    reason: "stop".to_owned(),
                }),
                _ => Ok(()),
            }
        });
        assert!(
            matches!(stopped, Err(StateError::Damaged { path, .. }) if path == Path::new("walker"))
        );
        assert_eq!(given, 2);
    }
}
