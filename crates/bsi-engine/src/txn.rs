//! Transactions on a root: apply, revert and the switch from one letter to the next turn one
//! tree into another through steps that leave the root recoverable, at every instant, to
//! exactly the old tree or exactly the new one.
//!
//! The recipe:
//! 1. Prepare, writing nothing in the root: every new file is staged in `STATE/txn/stage/`
//!    (its writeback started as it is written, all of them synced once all are written), the
//!    new revert data in `STATE/txn/revert/`.
//! 2. Stage the installed record after as `STATE/txn/installed.json` (synced), then write the
//!    journal (`STATE/txn/journal.json`, atomically, synced): every step with its image before
//!    and after, one per line, which recovery reads back a block at a time, then a head line
//!    (titles, the directory times to keep, the base files kept, whether a record is staged,
//!    how many steps). From here on the transaction can be completed or rolled back from disk
//!    alone.
//! 3. Roll forward, each step idempotent: removals children first (an old file or symlink is
//!    moved to `STATE/txn/undo/`), placements parents first (an old file is hard-linked into
//!    `undo/` before the staged file is renamed over it, so that the path always holds a whole
//!    file), then permission bits and times; every directory that changed is synced; then
//!    every path is checked against its image.
//! 4. Commit: link the base files the new revert data keeps as they were from `undo/`, mark
//!    `committed`, move the staged installed record into place, swap in the new revert data,
//!    remove the journal, then the rest of `STATE/txn/`.
//!
//! A failure before the commit writes the `rollback` mark and runs the same steps backwards with
//! `undo/` as the source. Recovery after a crash reads the journal: rolls back when marked so,
//! completes when committed, and otherwise completes when it can, else rolls back. Every step
//! looks at what the path holds before it acts, and refuses to touch a path that holds neither
//! its old nor its new image.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bsi_format::{Image, Mtime, PkgPath};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fsx::{self, OwnDir, RootDir};
use crate::seen::Seen;
use crate::state::{Installed, Record, StateDir};
use crate::tree::{describe_mismatch, matches_image, mtime_of, observe_with, Content, ScanError};
use crate::{FsContext, FsError};

/// Journal format written: 3 is a head line then a line per step, the record after staged in
/// a file of its own; 2 added `kept` to 1, one document holding the steps and the records.
/// Formats 1 and 2, which an earlier bsi wrote, are still read.
pub(crate) const JOURNAL_FORMAT: u32 = 3;

/// The steps of a journal of format 3 that its reader holds at once, and the steps between
/// the places it notes in the file (see [`JournalLines`]).
pub(crate) const BLOCK: usize = 4096;

/// What a transaction does, as a person would say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxnKind {
    Apply,
    Revert,
    /// One letter replaced by a newer one.
    Switch,
}

impl fmt::Display for TxnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TxnKind::Apply => "apply",
            TxnKind::Revert => "revert",
            TxnKind::Switch => "switch",
        })
    }
}

/// Turn `from` into `to` at `path` (`None`: nothing there). A step borrows its path and images
/// from the entries and records it comes from: 24 bytes, where a step of its own took 144 on
/// a tree of 100,500 entries; a journal read back lends them from its [`StepRead`]s.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Step<'a> {
    pub path: &'a PkgPath,
    pub from: Option<&'a Image>,
    pub to: Option<&'a Image>,
}

impl Step<'_> {
    /// Whether the bytes of a file must be supplied to reach `to` (a staged file).
    pub fn needs_content(&self) -> bool {
        matches!(self.to, Some(to @ Image::File { .. })
            if !self.from.is_some_and(|f| f.same_content(to)))
    }
}

/// A [`Step`] as the journal holds it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepRead {
    path: PkgPath,
    from: Option<Image>,
    to: Option<Image>,
}

/// What a transaction does, held whole, as the tests write it (format 3, see
/// [`Journal::write`]); a live run writes its journal as its steps are made
/// ([`write_journal`]). It borrows what it records: the steps as above, and the installed
/// record after from wherever it is held. [`JournalLines`] is such a journal read back,
/// [`JournalRead`] one of format 1 or 2, a single document, which its serialisation gives.
#[cfg(test)]
#[derive(Debug, Serialize)]
pub(crate) struct Journal<'a> {
    pub kind: TxnKind,
    /// The release before and after, for messages: `macOS 26.3`, `macOS 26.3 (a)`.
    pub from_title: String,
    pub to_title: String,
    /// Sorted by path.
    pub steps: Vec<Step<'a>>,
    /// Directories above the steps that keep their time whichever way the transaction goes.
    pub keep_times: Vec<(PkgPath, Mtime)>,
    /// The installed record after (`None`: no patch installed). The record before stays in
    /// its file until the commit replaces it; nothing reads it from the journal.
    pub after: Option<Record<'a>>,
    /// Base files the new revert data keeps as they were: the step whose old file `undo/`
    /// holds once the root holds the new tree, and its name in the revert data.
    pub kept: Vec<(usize, String)>,
}

/// A [`Journal`] as read back from its file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalRead {
    /// 1 or 2, as the journal's first bytes said.
    #[serde(rename = "format")]
    _format: u32,
    kind: TxnKind,
    from_title: String,
    to_title: String,
    steps: Vec<StepRead>,
    keep_times: Vec<(PkgPath, Mtime)>,
    /// The record before, which an earlier bsi wrote here (as large as the record): skipped
    /// as it is read.
    #[serde(default, rename = "before")]
    _before: Option<serde::de::IgnoredAny>,
    after: Option<Installed>,
    #[serde(default)]
    kept: Vec<(usize, String)>,
}

impl StepRead {
    fn step(&self) -> Step<'_> {
        Step {
            path: &self.path,
            from: self.from.as_ref(),
            to: self.to.as_ref(),
        }
    }
}

impl JournalRead {
    /// Its steps, lent from it.
    fn steps(&self) -> Vec<Step<'_>> {
        self.steps.iter().map(StepRead::step).collect()
    }

    /// The journal that was written, lent from this one.
    #[cfg(test)]
    fn journal(&self) -> Journal<'_> {
        let steps = self.steps.iter().map(StepRead::step);
        Journal {
            kind: self.kind,
            from_title: self.from_title.clone(),
            to_title: self.to_title.clone(),
            steps: steps.collect(),
            keep_times: self.keep_times.clone(),
            after: self.after.as_ref().map(Installed::record),
            kept: self.kept.clone(),
        }
    }
}

/// The last line of a journal of format 3, as written: everything but the steps, which come
/// before it one per line, and the record after, staged as `txn/installed.json`.
#[cfg(test)]
#[derive(Debug, Serialize)]
struct HeadOut<'a> {
    format: u32,
    kind: TxnKind,
    from_title: &'a str,
    to_title: &'a str,
    keep_times: &'a [(PkgPath, Mtime)],
    kept: &'a [(usize, String)],
    /// Whether an installed record is staged (a revert leaves none).
    record: bool,
    /// How many step lines follow.
    steps: usize,
}

/// [`HeadOut`] as read back, or as [`write_journal`] writes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    format: u32,
    kind: TxnKind,
    from_title: String,
    to_title: String,
    keep_times: Vec<(PkgPath, Mtime)>,
    kept: Vec<(usize, String)>,
    record: bool,
    steps: usize,
}

#[cfg(test)]
impl Journal<'_> {
    /// Write this journal as format 3 in `txn` (its record is staged apart),
    /// atomically: its steps one per line, then its head on the last line (what the steps are
    /// is known only once they are written when they are made as they are written).
    fn write(&self, txn: &TxnDir) -> Result<(), FsError> {
        let head = HeadOut {
            format: JOURNAL_FORMAT,
            kind: self.kind,
            from_title: &self.from_title,
            to_title: &self.to_title,
            keep_times: &self.keep_times,
            kept: &self.kept,
            record: self.after.is_some(),
            steps: self.steps.len(),
        };
        fsx::write_atomically_with(&txn.journal(), |out| {
            write_steps(&self.steps, out)?;
            serde_json::to_writer(&mut *out, &head)?;
            out.write_all(b"\n")
        })
    }
}

/// Write `steps` one per line, as a journal of format 3 holds them.
#[cfg(test)]
fn write_steps<'s>(
    steps: impl IntoIterator<Item = &'s Step<'s>>,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    for step in steps {
        serde_json::to_writer(&mut *out, step)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// What is done with each block of steps, given the index of its first.
pub(crate) type EachBlock<'e> = dyn FnMut(usize, &[Step<'_>]) -> Result<(), TxnError> + 'e;

/// The steps of a transaction as the roll walks them: a block of [`BLOCK`] at a time, each
/// with the index of its first step, from the first block or from the last.
pub(crate) trait Steps {
    fn blocks(&self, back: bool, each: &mut EachBlock<'_>) -> Result<(), TxnError>;
}

impl Steps for Vec<Step<'_>> {
    fn blocks(&self, back: bool, each: &mut EachBlock<'_>) -> Result<(), TxnError> {
        let starts = (0..self.len()).step_by(BLOCK);
        let mut block = |start: usize| each(start, &self[start..(start + BLOCK).min(self.len())]);
        match back {
            false => starts.into_iter().try_for_each(&mut block),
            true => starts.rev().try_for_each(&mut block),
        }
    }
}

/// A journal of format 3 on disk: its head, and where every `block`th step's line starts, so
/// that the steps are read a block at a time, in either order, and never held all at once
/// (recovering a switch of 150,750 entries held 74.5 MiB with the journal read whole).
struct JournalLines {
    path: PathBuf,
    head: Head,
    block: usize,
    marks: Vec<u64>,
}

impl JournalLines {
    /// Read the journal at `path` through: each step's line parsed, so that a damaged journal
    /// is refused before anything is done from it, and the head, its last line.
    fn read(path: &Path, block: usize) -> Result<JournalLines, TxnError> {
        use std::io::BufRead as _;
        let read_error = |e: std::io::Error| TxnError::from(FsError::new("read", path, e));
        let damaged = |reason: String| TxnError::Journal {
            path: path.to_owned(),
            reason,
        };
        let file = fs::File::open(path).map_err(read_error)?;
        let mut reader = std::io::BufReader::new(file);
        // The line before the one just read: a step, unless it is the last.
        let (mut last, mut line) = (String::new(), String::new());
        let mut marks = Vec::new();
        let (mut offset, mut count) = (0u64, 0usize);
        let mut last_len = reader.read_line(&mut last).map_err(read_error)?;
        loop {
            line.clear();
            let len = reader.read_line(&mut line).map_err(read_error)?;
            if len == 0 {
                break;
            }
            if count.is_multiple_of(block) {
                marks.push(offset);
            }
            serde_json::from_str::<StepRead>(&last)
                .map_err(|e| damaged(format!("step {count}: {e}")))?;
            offset += last_len as u64;
            count += 1;
            std::mem::swap(&mut last, &mut line);
            last_len = len;
        }
        let head: Head = serde_json::from_str(&last)
            .map_err(|e| damaged(format!("its last line is not its head: {e}")))?;
        if head.format != JOURNAL_FORMAT {
            return Err(damaged(format!("its head names format {}", head.format)));
        }
        if count != head.steps {
            return Err(damaged(format!(
                "it has {count} steps where its head names {}",
                head.steps
            )));
        }
        Ok(JournalLines {
            path: path.to_owned(),
            head,
            block,
            marks,
        })
    }
}

impl JournalLines {
    /// This journal as it is carried out, its steps read back a block at a time.
    fn plan(&self) -> Plan<'_> {
        Plan {
            steps: self,
            keep_times: &self.head.keep_times,
            kept: &self.head.kept,
            after: match self.head.record {
                true => After::Staged,
                false => After::Nothing,
            },
        }
    }
}

impl Steps for JournalLines {
    fn blocks(&self, back: bool, each: &mut EachBlock<'_>) -> Result<(), TxnError> {
        use std::io::{BufRead as _, Seek as _};
        let path = &self.path;
        let read_error = |e: std::io::Error| TxnError::from(FsError::new("read", path, e));
        let mut reader = std::io::BufReader::new(fs::File::open(path).map_err(read_error)?);
        let mut line = String::new();
        let mut block = |k: usize| -> Result<(), TxnError> {
            reader
                .seek(std::io::SeekFrom::Start(self.marks[k]))
                .map_err(read_error)?;
            let first = k * self.block;
            let count = self.block.min(self.head.steps - first);
            let mut read = Vec::with_capacity(count);
            for i in first..first + count {
                line.clear();
                reader.read_line(&mut line).map_err(read_error)?;
                // Each line parsed when the journal was read: one that no longer does was
                // changed since.
                let step: StepRead =
                    serde_json::from_str(&line).map_err(|e| TxnError::Journal {
                        path: path.clone(),
                        reason: format!("step {i}: {e}"),
                    })?;
                read.push(step);
            }
            let steps: Vec<Step> = read.iter().map(StepRead::step).collect();
            each(first, &steps)
        };
        let blocks = 0..self.marks.len();
        match back {
            false => blocks.into_iter().try_for_each(&mut block),
            true => blocks.rev().try_for_each(&mut block),
        }
    }
}

/// The installed record a transaction leaves.
enum After<'a> {
    /// None: the root goes back to its base release.
    Nothing,
    /// Staged as `txn/installed.json` before the journal was written.
    Staged,
    /// Held, as a journal of format 1 or 2 carries it.
    Held(Record<'a>),
}

/// What carrying out a journal takes, wherever it is held.
struct Plan<'j> {
    steps: &'j dyn Steps,
    keep_times: &'j [(PkgPath, Mtime)],
    kept: &'j [(usize, String)],
    after: After<'j>,
}

/// A journal as read back from disk.
enum OnDisk {
    Lines(JournalLines),
    /// Format 1 or 2, read whole.
    Whole(Box<JournalRead>),
}

impl OnDisk {
    fn kind(&self) -> TxnKind {
        match self {
            OnDisk::Lines(lines) => lines.head.kind,
            OnDisk::Whole(read) => read.kind,
        }
    }

    fn titles(&self) -> (&str, &str) {
        match self {
            OnDisk::Lines(lines) => (&lines.head.from_title, &lines.head.to_title),
            OnDisk::Whole(read) => (&read.from_title, &read.to_title),
        }
    }
}

/// An interrupted transaction, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interrupted {
    pub kind: TxnKind,
    pub from: String,
    pub to: String,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "an interrupted {} from {} to {}",
            self.kind, self.from, self.to
        )
    }
}

/// What recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// The interrupted transaction was completed: the root holds `to`.
    Completed { kind: TxnKind, to: String },
    /// It was rolled back: the root holds `from` again.
    RolledBack { kind: TxnKind, from: String },
}

impl fmt::Display for Recovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recovered::Completed { kind, to } => {
                write!(f, "completed the interrupted {kind}: the root is {to}")
            }
            Recovered::RolledBack { kind, from } => {
                write!(f, "rolled back the interrupted {kind}: the root is {from}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{path} holds neither its old nor its new state: {reason}")]
    Conflict { path: PkgPath, reason: String },
    #[error("the data to restore {path} is missing ({file})")]
    Missing { path: PkgPath, file: PathBuf },
    #[error("{path} is not as written: {reason}")]
    Check { path: PkgPath, reason: String },
    #[error("journal {path} is damaged: {reason}")]
    Journal { path: PathBuf, reason: String },
}

/// The files of the transaction under way in a state directory.
pub(crate) struct TxnDir {
    pub dir: PathBuf,
}

impl TxnDir {
    pub fn of(state: &StateDir) -> TxnDir {
        TxnDir {
            dir: state.dir.join("txn"),
        }
    }
    fn journal(&self) -> PathBuf {
        self.dir.join("journal.json")
    }
    /// The installed record the transaction leaves, staged.
    fn record(&self) -> PathBuf {
        self.dir.join("installed.json")
    }
    fn rollback_mark(&self) -> PathBuf {
        self.dir.join("rollback")
    }
    fn committed_mark(&self) -> PathBuf {
        self.dir.join("committed")
    }
    fn stage_dir(&self) -> PathBuf {
        self.dir.join("stage")
    }
    fn undo_dir(&self) -> PathBuf {
        self.dir.join("undo")
    }
    /// Where step `i`'s new file is staged.
    pub fn stage(&self, i: usize) -> PathBuf {
        self.stage_dir().join(i.to_string())
    }
    fn link_tmp(&self, i: usize) -> PathBuf {
        self.stage_dir().join(format!("link-{i}"))
    }
    fn undo(&self, i: usize) -> PathBuf {
        self.undo_dir().join(i.to_string())
    }
    /// The revert data of the record the transaction installs.
    /// Stage the installed record after, whole, before the journal that names it (the commit
    /// moves it into place), written as `StateDir::save` writes it.
    pub fn stage_record(&self, record: &Record) -> Result<(), FsError> {
        fsx::write_atomically_with(&self.record(), |out| {
            crate::state::write_record(out, record)
        })
    }

    pub fn revert_dir(&self) -> PathBuf {
        self.dir.join("revert")
    }

    /// Start preparing a transaction: an empty `txn/` with its subdirectories. There must be no
    /// journal (recovery runs first).
    pub fn begin(state: &StateDir) -> Result<TxnDir, FsError> {
        let txn = TxnDir::of(state);
        fsx::create_dir_all(&state.dir)?;
        fsx::remove_all(&txn.dir)?;
        fsx::create_dir(&txn.dir)?;
        fsx::create_dir(&txn.stage_dir())?;
        // What left the root and the revert data are base files as they were, setuid bits and
        // all: only the owner may reach them.
        for d in [txn.undo_dir(), txn.revert_dir()] {
            fsx::create_private_dir(&d)?;
        }
        Ok(txn)
    }

    /// Give up a prepared transaction whose journal was never written.
    pub fn abandon(&self) {
        let _ = fsx::remove_all(&self.dir);
        remove_if_empty(self.dir.parent());
    }

    fn load(&self) -> Result<Option<OnDisk>, TxnError> {
        self.load_with(BLOCK)
    }

    /// The journal, if there is one, read back in blocks of `block` steps (format 3) or whole
    /// (formats 1 and 2).
    fn load_with(&self, block: usize) -> Result<Option<OnDisk>, TxnError> {
        use std::io::Read as _;
        let path = self.journal();
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::new("read", &path, e).into()),
        };
        let damaged = |reason: String| TxnError::Journal {
            path: path.clone(),
            reason,
        };
        // Formats 1 and 2 begin with it: `{"format":N,`; a journal of format 3 with its first
        // step (or its head, when it has none).
        let mut start = Vec::with_capacity(16);
        (&mut file)
            .take(16)
            .read_to_end(&mut start)
            .map_err(|e| FsError::new("read", &path, e))?;
        drop(file);
        let format = start
            .strip_prefix(br#"{"format":"#)
            .and_then(|rest| rest.split(|&b| b == b',').next())
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse::<u32>().ok());
        match format {
            Some(1 | 2) => {
                let file = fs::File::open(&path).fs("read", &path)?;
                // Parsed as it is read, as the installed record is.
                let read =
                    serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| match e
                        .is_io()
                    {
                        true => TxnError::from(FsError::new("read", &path, e.into())),
                        false => damaged(e.to_string()),
                    })?;
                Ok(Some(OnDisk::Whole(Box::new(read))))
            }
            _ => Ok(Some(OnDisk::Lines(JournalLines::read(&path, block)?))),
        }
    }
}

/// The interrupted transaction of a state directory, if any; reads only.
pub(crate) fn pending(state: &StateDir) -> Result<Option<Interrupted>, TxnError> {
    Ok(TxnDir::of(state).load()?.map(|j| {
        let (from, to) = j.titles();
        Interrupted {
            kind: j.kind(),
            from: from.to_owned(),
            to: to.to_owned(),
        }
    }))
}

/// Directories above `steps` (sorted by path) that are not steps themselves, with their current
/// times.
#[cfg(test)]
pub(crate) fn times_to_keep(root: &Path, steps: &[Step]) -> Vec<(PkgPath, Mtime)> {
    let mut keep = KeepTimes::default();
    for step in steps {
        keep.add(root, step);
    }
    keep.into_vec()
}

/// The directories above steps given in path order that are not steps themselves, with their
/// current times, gathered a step at a time. A step's ancestors come before it, so whether one
/// is a step is known by then: of the steps already given, only those that paths still to come
/// may lie below are held (`open`), not every path (2 MB for 150,750 steps).
#[derive(Default)]
struct KeepTimes {
    open: Vec<PkgPath>,
    keep: BTreeMap<PkgPath, Mtime>,
}

impl KeepTimes {
    fn add(&mut self, root: &Path, step: &Step) {
        let path = step.path.as_str();
        // A path after `path` in order lies below `d` only if `path` still does, or `path` is
        // `d` followed by a byte that sorts before '/' ('-', '.'): `d-x` comes before `d/x`.
        self.open.retain(|d| {
            path.strip_prefix(d.as_str())
                .and_then(|rest| rest.bytes().next())
                .is_some_and(|next| next <= b'/')
        });
        let mut parent = step.path.parent();
        while let Some(dir) = parent {
            if !self.keep.contains_key(&dir) && !self.open.contains(&dir) {
                if let Ok(meta) = fs::symlink_metadata(root.join(dir.as_str())) {
                    if meta.is_dir() {
                        self.keep.insert(dir.clone(), mtime_of(&meta));
                    }
                }
            }
            parent = dir.parent();
        }
        self.open.push(step.path.clone());
    }

    fn into_vec(self) -> Vec<(PkgPath, Mtime)> {
        self.keep.into_iter().collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Forward,
    Back,
}

/// The image a step leads to going `way`, and the one it comes from.
fn ends<'a>(step: &Step<'a>, way: Way) -> (Option<&'a Image>, Option<&'a Image>) {
    match way {
        Way::Forward => (step.from, step.to),
        Way::Back => (step.to, step.from),
    }
}

/// Same kind and same content (bytes or link target); any directory is like any other.
fn same_thing(a: Option<&Image>, b: Option<&Image>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same_content(b),
        _ => false,
    }
}

/// `actual` must hold one of the step's two ends.
fn expect_either(
    step: &Step,
    actual: Option<&Image>,
    origin: Option<&Image>,
    target: Option<&Image>,
) -> Result<(), TxnError> {
    if same_thing(actual, origin) || same_thing(actual, target) {
        return Ok(());
    }
    Err(TxnError::Conflict {
        path: step.path.clone(),
        reason: describe_mismatch(target, actual),
    })
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Bring every step to its end going `way`, then check every path; files `seen` knows unchanged
/// are not read again. The steps are walked a block at a time (see [`Steps`]).
fn roll(root: &Path, txn: &TxnDir, plan: &Plan, way: Way, seen: &Seen) -> Result<(), TxnError> {
    let confined = RootDir::open(root)?;
    let (stage, undo) = (
        OwnDir::open(&txn.stage_dir())?,
        OwnDir::open(&txn.undo_dir())?,
    );
    // 1. Removals, children first: what goes away or changes kind.
    plan.steps.blocks(true, &mut |first, block| {
        for (i, step) in block.iter().enumerate().rev() {
            let i = first + i;
            let (origin, target) = ends(step, way);
            let goes = match (origin, target) {
                (Some(_), None) => true,
                (Some(o), Some(t)) => o.kind_name() != t.kind_name(),
                (None, _) => false,
            };
            if !goes {
                continue;
            }
            let actual = observe_with(root, step.path, Content::Read(Some(seen)))?;
            if actual.is_none() || same_thing(actual.as_ref(), target) {
                continue;
            }
            expect_either(step, actual.as_ref(), origin, target)?;
            match (actual, way) {
                (Some(Image::Dir { .. }), _) => confined.remove_dir(step.path)?,
                // Keep what the forward way removes, so that it can be rolled back.
                (_, Way::Forward) => confined.move_out(step.path, &undo, &i.to_string())?,
                (_, Way::Back) => confined.remove_file(step.path)?,
            }
        }
        Ok(())
    })?;

    // 2. Placements, parents first; then each file's or symlink's permission bits and time
    //    (a mode or time set here moves the file's time of change: its record no longer
    //    matches, and step 5 reads it). One walk, the steps being read back from the journal
    //    on recovery and a revert: three walks took 15% of a revert of 150,750 entries.
    //    Directories are gathered for step 3, and the parents step 4 syncs.
    let mut dirs: BTreeMap<PkgPath, (Option<u32>, Mtime)> = plan
        .keep_times
        .iter()
        .map(|(p, m)| (p.clone(), (None, *m)))
        .collect();
    let mut touched: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
    plan.steps.blocks(false, &mut |first, block| {
        for (i, step) in (first..).zip(block) {
            let left = place(root, txn, &confined, (&stage, &undo), i, step, way, seen)?;
            let path = step.path;
            let left = left.as_ref();
            match ends(step, way).1 {
                Some(Image::File { mode, mtime, .. }) => {
                    set_meta(&confined, path, Some(*mode), *mtime, false, left)?
                }
                Some(Image::Symlink { mtime, .. }) => {
                    set_meta(&confined, path, None, *mtime, true, left)?
                }
                Some(Image::Dir { mode, mtime }) => {
                    dirs.insert(path.clone(), (Some(*mode), *mtime));
                }
                None => {}
            }
            if !same_thing(step.from, step.to) {
                let parent = step.path.parent();
                touched.insert(parent.map_or(root.to_owned(), |p| root.join(p.as_str())));
            }
        }
        Ok(())
    })?;

    // 3. Directories' permission bits and times, children first.
    for (path, (mode, mtime)) in dirs.iter().rev() {
        set_meta(&confined, path, *mode, *mtime, false, None)?;
    }

    // 4. Make the renames durable before anything is recorded as done: every directory that
    //    gained or lost an entry (here or in a run a crash interrupted: the parent of every step
    //    that changes more than modes and times), and the undo directory that holds what left
    //    the root.
    for dir in &touched {
        if fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            fsx::sync_dir(dir)?;
        }
    }
    fsx::sync_dir(&txn.undo_dir())?;

    // 5. Every path holds its end, times included: looked at on every core a block at a time
    //    (what step 2 gave a time or mode is read and hashed again), the first path in order
    //    that does not reported.
    plan.steps.blocks(false, &mut |_, block| {
        let failed = block
            .par_iter()
            .filter_map(|step| check_end(root, step, way, seen).err())
            .find_first(|_| true);
        failed.map_or(Ok(()), Err)
    })
}

/// Step 2 of [`roll`] for step `i`: put its end going `way` in place, parents first. Returns
/// what the path held when its content was the end's already and it was left as it was (a
/// change of mode or time only, or a step done before a crash): its mode and time as just seen.
#[allow(clippy::too_many_arguments)]
fn place(
    root: &Path,
    txn: &TxnDir,
    confined: &RootDir,
    (stage, undo): (&OwnDir, &OwnDir),
    i: usize,
    step: &Step,
    way: Way,
    seen: &Seen,
) -> Result<Option<Image>, TxnError> {
    let (origin, target) = ends(step, way);
    let Some(target) = target else {
        return Ok(None);
    };
    let actual = observe_with(root, step.path, Content::Read(Some(seen)))?;
    if same_thing(actual.as_ref(), Some(target)) {
        return Ok(actual);
    }
    // What changes kind was moved away by the removals.
    let moved_away = origin.is_some_and(|o| o.kind_name() != target.kind_name());
    if !(actual.is_none() && moved_away) {
        expect_either(step, actual.as_ref(), origin, Some(target))?;
    }
    if matches!(target, Image::Dir { .. }) {
        confined.create_dir(step.path)?;
        return Ok(None);
    }
    if actual.is_some() && way == Way::Forward && !exists(&txn.undo(i)) {
        // The old file or symlink stays reachable until the commit.
        confined.link_out(step.path, undo, &i.to_string())?;
    }
    match target {
        Image::Symlink { target: link, .. } => {
            let tmp = txn.link_tmp(i);
            fsx::remove_all(&tmp)?;
            fsx::symlink(link, &tmp)?;
            confined.move_in(stage, &format!("link-{i}"), step.path)?;
        }
        _ => {
            let (dir, source) = match way {
                Way::Forward => (stage, txn.stage(i)),
                Way::Back => (undo, txn.undo(i)),
            };
            if !exists(&source) {
                return Err(TxnError::Missing {
                    path: step.path.clone(),
                    file: source,
                });
            }
            let carried = seen.take(&source);
            confined.move_in(dir, &i.to_string(), step.path)?;
            if let Some(carried) = carried {
                seen.carry(carried, &confined.full(step.path));
            }
        }
    }
    Ok(None)
}

/// Whether `step`'s path holds its end on the `way` rolled, time included.
fn check_end(root: &Path, step: &Step, way: Way, seen: &Seen) -> Result<(), TxnError> {
    let target = ends(step, way).1;
    let actual = observe_with(root, step.path, Content::Read(Some(seen)))?;
    let ok = match (target, &actual) {
        (None, None) => true,
        (Some(t), Some(a)) => matches_image(t, a) && t.mtime() == a.mtime(),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let reason = match (target, &actual) {
        (Some(t), Some(a)) if matches_image(t, a) => {
            format!("time is {:?}, expected {:?}", a.mtime(), t.mtime())
        }
        _ => describe_mismatch(target, actual.as_ref()),
    };
    Err(TxnError::Check {
        path: step.path.clone(),
        reason,
    })
}

/// Set permission bits (when given) and the time of `path`, skipping what is already right:
/// what it holds is looked at, unless `left` says (what [`place`] saw and left there).
fn set_meta(
    root: &RootDir,
    path: &PkgPath,
    mode: Option<u32>,
    mtime: Mtime,
    symlink: bool,
    left: Option<&Image>,
) -> Result<(), FsError> {
    let (now_mode, now_mtime) = match left {
        Some(image) => (image_mode(image), image.mtime()),
        None => {
            let full = root.full(path);
            let meta = fs::symlink_metadata(&full).map_err(|e| FsError::new("read", &full, e))?;
            (Some(meta.mode() & 0o7777), mtime_of(&meta))
        }
    };
    if let Some(mode) = mode {
        if now_mode != Some(mode) {
            root.set_mode(path, mode)?;
        }
    }
    if now_mtime != mtime {
        root.set_mtime(path, mtime, symlink)?;
    }
    Ok(())
}

/// The permission bits of a file or directory image (a symlink's are not kept).
fn image_mode(image: &Image) -> Option<u32> {
    match image {
        Image::File { mode, .. } | Image::Dir { mode, .. } => Some(*mode),
        Image::Symlink { .. } => None,
    }
}

/// After the root holds the new tree: record it, swap in its revert data, end the transaction.
fn commit(state: &StateDir, txn: &TxnDir, plan: &Plan) -> Result<(), FsError> {
    keep_bases(txn, plan.kept)?;
    if !exists(&txn.committed_mark()) {
        // The record staged is whole from the journal on, and leaves only by the rename below.
        if let (After::Staged, false) = (&plan.after, exists(&txn.record())) {
            let reason = std::io::Error::other("the installed record to write is missing");
            return Err(FsError::new("read", &txn.record(), reason));
        }
        fsx::write_atomically(&txn.committed_mark(), b"")?;
    }
    let installs = match &plan.after {
        After::Nothing => false,
        After::Staged => {
            // Moved into place already when it is no longer staged.
            if exists(&txn.record()) {
                fsx::rename(&txn.record(), &state.installed_path())?;
            }
            true
        }
        After::Held(record) => {
            state.save(record)?;
            true
        }
    };
    if installs {
        if exists(&txn.revert_dir()) {
            fsx::remove_all(&state.revert_dir())?;
            fsx::rename(&txn.revert_dir(), &state.revert_dir())?;
        }
    } else {
        fsx::remove_all(&state.installed_path())?;
        fsx::remove_all(&state.revert_dir())?;
    }
    fsx::sync_dir(&state.dir)?;
    finish(state, txn)
}

/// Link every base file the new revert data keeps (`kept`) from `undo/`, where the roll forward
/// left the root's old file, into the revert data; those a crash left linked already stay.
/// Nothing to do once the revert data was swapped in.
fn keep_bases(txn: &TxnDir, kept: &[(usize, String)]) -> Result<(), FsError> {
    let dir = txn.revert_dir();
    if kept.is_empty() || !exists(&dir) {
        return Ok(());
    }
    for (step, name) in kept {
        let to = dir.join(name);
        if Path::new(name).file_name() != Some(name.as_ref()) {
            let reason = std::io::Error::other("not a file name");
            return Err(FsError::new("link", &to, reason));
        }
        if !exists(&to) {
            fsx::hard_link(&txn.undo(*step), &to)?;
        }
    }
    fsx::sync_dir(&dir)
}

/// Remove the journal (the transaction is over), then the rest of `txn/`.
fn finish(state: &StateDir, txn: &TxnDir) -> Result<(), FsError> {
    fsx::remove_all(&txn.journal())?;
    fsx::sync_dir(&txn.dir)?;
    fsx::remove_all(&txn.dir)?;
    fsx::sync_dir(&state.dir)
}

/// A state directory left empty by a transaction that did not happen goes too.
fn remove_if_empty(state_dir: Option<&Path>) {
    if let Some(dir) = state_dir {
        if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Roll back: mark it, so that recovery rolls back too, then run the steps backwards, reading
/// every file: what was placed moments ago has a stamp too recent to vouch for its bytes, and
/// a foreign write into it must stop the roll back, not be undone by it.
fn roll_back(root: &Path, state: &StateDir, txn: &TxnDir, plan: &Plan) -> Result<(), TxnError> {
    if !exists(&txn.rollback_mark()) {
        fsx::write_atomically(&txn.rollback_mark(), b"")?;
    }
    roll(root, txn, plan, Way::Back, &Seen::default())?;
    finish(state, txn)?;
    remove_if_empty(Some(&state.dir));
    Ok(())
}

/// How a transaction that did not complete ended.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    /// It failed and was rolled back: the root holds the old tree.
    #[error("{cause}; the {kind} was rolled back and the root is unchanged")]
    RolledBack { kind: TxnKind, cause: TxnError },
    /// It failed and rolling back failed too: the journal stays for `bsi recover`.
    #[error("{cause}; rolling back failed too ({rollback}): run `bsi recover`")]
    Stuck { cause: TxnError, rollback: TxnError },
}

/// What a journal names after its steps, once they are made (see [`write_journal`]).
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Base files the new revert data keeps as they were (see [`Journal::kept`]).
    pub kept: Vec<(usize, String)>,
    /// Whether the installed record after was staged ([`TxnDir::stage_record`]); none is
    /// left otherwise.
    pub record: bool,
}

/// Write the journal of a transaction whose steps are made as they are written: `make` hands
/// each over, in path order, to the function it is given, stages what they need (and the
/// installed record after, if any), makes what it staged durable and says what the journal
/// names after the steps; the journal then names them with the directory times to keep
/// above them. Written atomically: recovery finds a whole journal or none.
pub(crate) fn write_journal<E: From<FsError>>(
    txn: &TxnDir,
    kind: TxnKind,
    (from_title, to_title): (&str, &str),
    root: &Path,
    make: impl FnOnce(&mut dyn FnMut(&Step) -> Result<(), E>) -> Result<Tail, E>,
) -> Result<Written, E> {
    let mut failed = None;
    let path = txn.journal();
    let mut lines = None;
    let written = fsx::write_atomically_with(&path, |out| {
        // Where every `BLOCK`th step's line starts, noted as they are written.
        let (mut offset, mut count, mut marks) = (0u64, 0usize, Vec::new());
        let (mut keep, mut line) = (KeepTimes::default(), Vec::new());
        let mut write = |step: &Step| -> Result<(), E> {
            keep.add(root, step);
            line.clear();
            serde_json::to_writer(&mut line, step)
                .map_err(std::io::Error::from)
                .and_then(|()| {
                    line.push(b'\n');
                    out.write_all(&line)
                })
                .map_err(|e| E::from(FsError::new("write", &path, e)))?;
            if count.is_multiple_of(BLOCK) {
                marks.push(offset);
            }
            offset += line.len() as u64;
            count += 1;
            Ok(())
        };
        let stop = |e: E, failed: &mut Option<E>| {
            *failed = Some(e);
            std::io::Error::other("stopped")
        };
        let tail = make(&mut write).map_err(|e| stop(e, &mut failed))?;
        for d in [txn.stage_dir(), txn.revert_dir(), txn.undo_dir()] {
            fsx::sync_dir(&d).map_err(|e| stop(e.into(), &mut failed))?;
        }
        let head = Head {
            format: JOURNAL_FORMAT,
            kind,
            from_title: from_title.to_owned(),
            to_title: to_title.to_owned(),
            keep_times: keep.into_vec(),
            kept: tail.kept,
            record: tail.record,
            steps: count,
        };
        serde_json::to_writer(&mut *out, &head)?;
        out.write_all(b"\n")?;
        lines = Some((head, marks));
        Ok(())
    });
    match (written, failed, lines) {
        (_, Some(failed), _) => Err(failed),
        (Ok(()), None, Some((head, marks))) => Ok(Written(JournalLines {
            path,
            head,
            block: BLOCK,
            marks,
        })),
        (written, None, _) => Err(E::from(written.err().unwrap_or_else(|| {
            FsError::new("write", &path, std::io::Error::other("nothing written"))
        }))),
    }
}

/// A journal [`write_journal`] wrote, as it is on disk.
pub(crate) struct Written(JournalLines);

/// Carry out the journal [`write_journal`] wrote: roll forward and commit, else roll back.
pub(crate) fn run_written(
    root: &Path,
    state: &StateDir,
    txn: &TxnDir,
    Written(lines): Written,
    seen: &Seen,
) -> Result<(), Failed> {
    carry_out(root, state, txn, lines.head.kind, &lines.plan(), seen)
}

/// Roll forward and commit a journal on disk, else roll it back.
fn carry_out(
    root: &Path,
    state: &StateDir,
    txn: &TxnDir,
    kind: TxnKind,
    plan: &Plan,
    seen: &Seen,
) -> Result<(), Failed> {
    let forward = roll(root, txn, plan, Way::Forward, seen).and_then(|()| {
        commit(state, txn, plan)?;
        Ok(())
    });
    match forward {
        Ok(()) => Ok(()),
        Err(cause) if exists(&txn.committed_mark()) => {
            // The new tree is in place and recorded as committed: complete, do not undo.
            match commit(state, txn, plan) {
                Ok(()) => Ok(()),
                Err(again) => Err(Failed::Stuck {
                    cause,
                    rollback: again.into(),
                }),
            }
        }
        Err(cause) => match roll_back(root, state, txn, plan) {
            Ok(()) => Err(Failed::RolledBack { kind, cause }),
            Err(rollback) => Err(Failed::Stuck { cause, rollback }),
        },
    }
}

/// Complete or roll back the transaction a crash interrupted; `None` when there was none.
pub(crate) fn recover(root: &Path, state: &StateDir) -> Result<Option<Recovered>, TxnError> {
    let txn = TxnDir::of(state);
    if !exists(&txn.dir) {
        return Ok(None);
    }
    // A new process: nothing is known about the root, every file is read.
    let seen = &Seen::default();
    let Some(read) = txn.load()? else {
        // Interrupted while preparing: nothing in the root was touched.
        fsx::remove_all(&txn.dir)?;
        return Ok(None);
    };
    let (from, to) = read.titles();
    let completed = Recovered::Completed {
        kind: read.kind(),
        to: to.to_owned(),
    };
    let rolled_back = Recovered::RolledBack {
        kind: read.kind(),
        from: from.to_owned(),
    };
    let whole;
    let plan = match &read {
        OnDisk::Lines(lines) => lines.plan(),
        OnDisk::Whole(old) => {
            whole = old.steps();
            Plan {
                steps: &whole,
                keep_times: &old.keep_times,
                kept: &old.kept,
                after: old
                    .after
                    .as_ref()
                    .map_or(After::Nothing, |a| After::Held(a.record())),
            }
        }
    };
    if exists(&txn.rollback_mark()) {
        roll_back(root, state, &txn, &plan)?;
        return Ok(Some(rolled_back));
    }
    if exists(&txn.committed_mark()) {
        roll(root, &txn, &plan, Way::Forward, seen)?;
        commit(state, &txn, &plan)?;
        return Ok(Some(completed));
    }
    let forward =
        roll(root, &txn, &plan, Way::Forward, seen).and_then(|()| Ok(commit(state, &txn, &plan)?));
    match forward {
        Ok(()) => Ok(Some(completed)),
        // Recorded as committed: complete it or fail, never undo it.
        Err(cause) if exists(&txn.committed_mark()) => Err(cause),
        Err(_) => {
            roll_back(root, state, &txn, &plan)?;
            Ok(Some(rolled_back))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::InstalledEntry;
    use bsi_format::{BaseRelease, Digest};

    fn file(byte: u8, secs: i64) -> Image {
        Image::File {
            sha256: Digest([byte; 32]),
            size: u64::from(byte) * 100,
            mode: 0o644,
            mtime: Mtime { secs, nanos: 7 },
        }
    }

    fn installed(letter: &str, revert: Option<&str>) -> Installed {
        let path = |p: &str| PkgPath::new(p).expect("a path");
        Installed {
            format: crate::state::STATE_FORMAT,
            product: "macOS".to_owned(),
            base: BaseRelease {
                version: "26.3".parse().expect("a version"),
                build: Some("25D125".to_owned()),
            },
            letter: letter.parse().expect("a letter"),
            package_sha256: Digest([9; 32]),
            signer: "example".to_owned(),
            entries: vec![
                InstalledEntry {
                    path: path("Lib/a.dylib"),
                    before: Some(file(1, 10)),
                    after: Some(file(2, 20)),
                    revert: revert.map(str::to_owned),
                },
                InstalledEntry {
                    path: path("Lib/b"),
                    before: Some(Image::Symlink {
                        target: "a.dylib".to_owned(),
                        mtime: Mtime { secs: 3, nanos: 0 },
                    }),
                    after: None,
                    revert: None,
                },
                InstalledEntry {
                    path: path("Lib/new"),
                    before: None,
                    after: Some(Image::Dir {
                        mode: 0o755,
                        mtime: Mtime { secs: 4, nanos: 1 },
                    }),
                    revert: None,
                },
            ],
        }
    }

    #[test]
    fn a_record_lent_from_an_installed_one_writes_the_same_text() {
        let inst = installed("a", Some("0.orig"));
        let owned = serde_json::to_string_pretty(&inst).expect("serialised");
        let lent = serde_json::to_string_pretty(&inst.record()).expect("serialised");
        assert_eq!(lent, owned);
        let back: Installed = serde_json::from_str(&lent).expect("parsed");
        assert_eq!(
            serde_json::to_string_pretty(&back).expect("serialised"),
            owned
        );
    }

    /// An apply's record is made from its package's entries as it is written: each entry's
    /// image found where there is one, else its pre-image, and each revert name at its entry.
    #[test]
    fn a_record_made_from_entries_writes_what_an_installed_one_would() {
        let inst = installed("a", None);
        let mut entries: Vec<bsi_format::Entry> = inst
            .entries
            .iter()
            .map(|e| bsi_format::Entry {
                path: e.path.clone(),
                component: "webkit".into(),
                pre: e.before.clone(),
                post: e.after.clone(),
                op: bsi_format::Operation::REPLACE,
                payload: None,
            })
            .collect();
        // The first path held the pre-image at another time; the last has revert data.
        let found = file(1, 11);
        entries[0].pre = Some(file(1, 10));
        let mut expected = inst.clone();
        expected.entries[0].before = Some(found.clone());
        expected.entries[2].revert = Some("2.rev".to_owned());
        // Held, and kept aside past the first.
        let package = Path::new("a.bsi");
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut aside = crate::Entries::holding(1, package, Some(tmp.path()));
        for entry in &entries {
            bsi_format::EntryStore::push(&mut aside, entry.clone()).expect("kept aside");
        }
        bsi_format::EntryStore::done(&mut aside).expect("kept aside");
        for entries in [crate::Entries::held(entries, package), aside] {
            let made = crate::state::Record {
                entries: crate::state::RecordEntries::Planned {
                    entries: &entries,
                    found: &[Some(Box::new(found.clone())), None, None],
                    names: &[(2, "2.rev".to_owned())],
                },
                ..inst.record()
            };
            assert_eq!(
                serde_json::to_string_pretty(&made).expect("serialised"),
                serde_json::to_string_pretty(&expected).expect("serialised"),
                "{entries:?}"
            );
        }
    }

    fn steps_of(inst: &Installed) -> Vec<Step<'_>> {
        inst.entries
            .iter()
            .map(|e| Step {
                path: &e.path,
                from: e.before.as_ref(),
                to: e.after.as_ref(),
            })
            .collect()
    }

    fn journal_of<'a>(steps: Vec<Step<'a>>, after: Option<Record<'a>>) -> Journal<'a> {
        Journal {
            kind: TxnKind::Switch,
            from_title: "macOS 26.3 (a)".to_owned(),
            to_title: "macOS 26.3 (b)".to_owned(),
            keep_times: vec![(
                PkgPath::new("Lib").expect("a path"),
                Mtime { secs: 5, nanos: 0 },
            )],
            steps,
            after,
            kept: vec![(0, "0.orig".to_owned())],
        }
    }

    /// `journal` as a bsi that wrote format 2 wrote it: one document.
    fn as_format_2(journal: &Journal) -> String {
        let text = serde_json::to_string(journal).expect("serialised");
        text.replacen('{', r#"{"format":2,"#, 1)
    }

    /// Which steps, by index and path, [`Steps::blocks`] gives, block by block.
    fn walked(steps: &dyn Steps, back: bool) -> Vec<Vec<(usize, String)>> {
        let mut blocks = Vec::new();
        steps
            .blocks(back, &mut |first, block| {
                let named = block.iter().enumerate();
                blocks.push(
                    named
                        .map(|(i, s)| (first + i, s.path.to_string()))
                        .collect(),
                );
                Ok(())
            })
            .expect("walked");
        blocks
    }

    /// A journal is written as its steps, a line each, then its head, and read back a block at
    /// a time, from the first block or from the last, each step at its index; its head gives
    /// back what it was written with.
    #[test]
    fn a_journal_of_lines_reads_back_in_blocks_either_way() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let txn = TxnDir::begin(&StateDir::new(dir.path())).expect("begun");
        let mut inst = installed("b", Some("0.orig"));
        let more = inst.entries[2].clone();
        for name in ["Lib/new/x", "Lib/new/y"] {
            inst.entries.push(InstalledEntry {
                path: PkgPath::new(name).expect("a path"),
                ..more.clone()
            });
        }
        let journal = journal_of(steps_of(&inst), Some(inst.record()));
        journal.write(&txn).expect("written");
        let text = fs::read_to_string(txn.journal()).expect("read");
        assert_eq!(text.lines().count(), 5 + 1);

        let Some(OnDisk::Lines(lines)) = txn.load_with(2).expect("read") else {
            panic!("not read as lines");
        };
        let head = &lines.head;
        assert_eq!(
            (head.kind, head.record, head.steps),
            (TxnKind::Switch, true, 5)
        );
        assert_eq!(
            (head.from_title.as_str(), head.to_title.as_str()),
            ("macOS 26.3 (a)", "macOS 26.3 (b)")
        );
        assert_eq!(
            (&head.keep_times, &head.kept),
            (&journal.keep_times, &journal.kept)
        );
        let paths: Vec<String> = inst.entries.iter().map(|e| e.path.to_string()).collect();
        let at = |i: usize| (i, paths[i].clone());
        let forward = vec![vec![at(0), at(1)], vec![at(2), at(3)], vec![at(4)]];
        assert_eq!(walked(&lines, false), forward);
        let back: Vec<_> = forward.iter().rev().cloned().collect();
        assert_eq!(walked(&lines, true), back);
        // Steps held in memory are walked the same way, in blocks of [`BLOCK`].
        assert_eq!(walked(&journal.steps, false), vec![forward.concat()]);
        // A step read back is the step written.
        let mut read = Vec::new();
        lines
            .blocks(false, &mut |_, block| {
                read.extend(block.iter().map(|s| serde_json::to_string(s).expect("ok")));
                Ok(())
            })
            .expect("walked");
        let written: Vec<String> = journal
            .steps
            .iter()
            .map(|s| serde_json::to_string(s).expect("serialised"))
            .collect();
        assert_eq!(read, written);
    }

    /// A journal that lost a step line or its head, holds a step that does not parse, or names
    /// a format this bsi does not read is refused as damaged, with the reason; one of format 2
    /// is read whole.
    #[test]
    fn a_damaged_journal_is_refused_and_an_earlier_one_read_whole() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let txn = TxnDir::begin(&StateDir::new(dir.path())).expect("begun");
        let inst = installed("b", None);
        journal_of(steps_of(&inst), None)
            .write(&txn)
            .expect("written");
        let text = fs::read_to_string(txn.journal()).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let joined = |lines: &[&str]| lines.join("\n") + "\n";
        let cases = [
            (
                joined(&[lines[0], lines[1], lines[3]]),
                "it has 2 steps where its head names 3",
            ),
            (
                joined(&[lines[0], r#"{"path":1}"#, lines[2], lines[3]]),
                "step 1: ",
            ),
            (joined(&lines[..3]), "its last line is not its head"),
            ("[]".to_owned(), "its last line is not its head"),
            (
                text.replacen(r#""format":3,"#, r#""format":9,"#, 1),
                "its head names format 9",
            ),
        ];
        for (damaged, reason) in cases {
            fs::write(txn.journal(), &damaged).expect("written");
            match txn.load() {
                Err(TxnError::Journal { reason: got, .. }) => {
                    assert!(got.contains(reason), "{got:?}, expected {reason:?}")
                }
                Err(other) => panic!("{reason}: {other}"),
                Ok(_) => panic!("{reason}: read"),
            }
        }
        let older = as_format_2(&journal_of(steps_of(&inst), Some(inst.record())));
        fs::write(txn.journal(), older).expect("written");
        let Some(OnDisk::Whole(read)) = txn.load().expect("read") else {
            panic!("not read whole");
        };
        assert_eq!((read.kind, read.steps.len()), (TxnKind::Switch, 3));
        assert!(read.after.is_some());
    }

    /// A journal of format 1 or 2 (one document, which the journal's serialisation gives) reads
    /// back as the journal that was written.
    #[test]
    fn a_journal_read_back_lends_the_journal_that_was_written() {
        let (before, after) = (installed("a", None), installed("b", Some("0.rev")));
        let journal = journal_of(steps_of(&after), Some(after.record()));
        let written = as_format_2(&journal);
        let read: JournalRead = serde_json::from_str(&written).expect("parsed");
        assert_eq!(as_format_2(&read.journal()), written);
        // An earlier bsi wrote the record before too: its journal reads as the same one.
        let record = serde_json::to_string(&before).expect("serialised");
        let older = written.replacen(
            r#","after":"#,
            &format!(r#","before":{record},"after":"#),
            1,
        );
        assert!(older.len() > written.len() + record.len());
        let read: JournalRead = serde_json::from_str(&older).expect("an earlier journal parses");
        assert_eq!(as_format_2(&read.journal()), written);
        assert_eq!(read.steps.len(), 3);
        assert!(read.journal().steps[0].needs_content());
        assert!(!read.journal().steps[1].needs_content());
    }

    /// Recovery completes a journal whose record is staged, also when a crash came after the
    /// record was moved into place, and one of format 2 that holds its record; a journal whose
    /// staged record is gone before the commit is rolled back.
    #[test]
    fn recovery_installs_the_record_staged_or_held_and_rolls_back_without_it() {
        let dir = |secs| Image::Dir {
            mode: 0o755,
            mtime: Mtime { secs, nanos: 0 },
        };
        let (old, new) = (dir(1_000), dir(2_000));
        let mut inst = installed("b", None);
        inst.entries = vec![InstalledEntry {
            path: PkgPath::new("Lib").expect("a path"),
            before: Some(old.clone()),
            after: Some(new.clone()),
            revert: None,
        }];
        let record = serde_json::to_string(&inst).expect("serialised");
        #[derive(Debug, Clone, Copy)]
        enum Case {
            Staged,
            MovedAlready,
            Held,
            StagedLost,
        }
        for case in [
            Case::Staged,
            Case::MovedAlready,
            Case::Held,
            Case::StagedLost,
        ] {
            let tmp = tempfile::tempdir().expect("a temporary directory");
            let root = tmp.path().join("root");
            fs::create_dir_all(root.join("Lib")).expect("created");
            fsx::set_mtime(&root.join("Lib"), old.mtime()).expect("set");
            let state = StateDir::new(&tmp.path().join("state"));
            let txn = TxnDir::begin(&state).expect("begun");
            let mut journal = journal_of(steps_of(&inst), Some(inst.record()));
            journal.keep_times.clear();
            journal.kept.clear();
            match case {
                Case::Held => fs::write(txn.journal(), as_format_2(&journal)).expect("written"),
                _ => journal.write(&txn).expect("written"),
            }
            match case {
                Case::Staged => fs::write(txn.record(), &record).expect("written"),
                Case::MovedAlready => {
                    fs::write(state.installed_path(), &record).expect("written");
                    fs::write(txn.committed_mark(), b"").expect("written");
                }
                Case::Held | Case::StagedLost => {}
            }
            let recovered = recover(&root, &state).expect("recovered");
            let meta = fs::symlink_metadata(root.join("Lib")).expect("there");
            let installed = fs::read_to_string(state.installed_path()).ok();
            match case {
                Case::StagedLost => {
                    assert!(matches!(recovered, Some(Recovered::RolledBack { .. })));
                    assert_eq!(mtime_of(&meta), old.mtime());
                    assert_eq!(installed, None);
                }
                _ => {
                    let what = format!("{case:?}: {recovered:?}");
                    assert!(
                        matches!(recovered, Some(Recovered::Completed { .. })),
                        "{what}"
                    );
                    assert_eq!(mtime_of(&meta), new.mtime(), "{what}");
                    assert_eq!(installed.as_deref(), Some(record.as_str()), "{what}");
                }
            }
            assert!(!txn.dir.exists(), "{case:?}: transaction files left");
        }
    }

    /// The directory times to keep, gathered a step at a time, are those of the directories
    /// on disk above the steps that are no step themselves, whatever the steps are (a path
    /// gone before and after, `a-x` sorting between `a` and `a/b`).
    #[test]
    fn the_times_kept_are_those_of_the_directories_above_that_are_no_step() {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let root = tmp.path();
        for dir in ["a/b/c", "a-x/y", "d/e", "f"] {
            fs::create_dir_all(root.join(dir)).expect("created");
        }
        let dir = Image::Dir {
            mode: 0o755,
            mtime: Mtime { secs: 3, nanos: 0 },
        };
        let paths = [
            "a", "a-x/y", "a-x/y/z", "a/b/c", "a/b/c/d", "d/e/g", "f", "f/h/i",
        ];
        for steps in [
            &paths[..],
            &paths[1..],
            &paths[2..],
            &[paths[4], paths[7]][..],
        ] {
            let owned: Vec<PkgPath> = steps
                .iter()
                .map(|p| PkgPath::new(p).expect("a path"))
                .collect();
            let steps: Vec<Step> = owned
                .iter()
                .map(|path| Step {
                    path,
                    from: None,
                    to: path.as_str().ends_with('y').then_some(&dir),
                })
                .collect();
            let stepped: std::collections::HashSet<&str> =
                steps.iter().map(|s| s.path.as_str()).collect();
            let mut expected = BTreeMap::new();
            for step in &steps {
                let mut parent = step.path.parent();
                while let Some(dir) = parent {
                    let meta = fs::symlink_metadata(root.join(dir.as_str()));
                    if !stepped.contains(dir.as_str()) && meta.as_ref().is_ok_and(|m| m.is_dir()) {
                        let mtime = mtime_of(meta.as_ref().expect("there"));
                        expected.insert(dir.clone(), mtime);
                    }
                    parent = dir.parent();
                }
            }
            let expected: Vec<_> = expected.into_iter().collect();
            assert_eq!(times_to_keep(root, &steps), expected, "{stepped:?}");
        }
    }

    /// A journal written as its steps are made is read back as the journal the writing
    /// describes: the same head, and the same places noted for its blocks.
    #[test]
    fn a_journal_written_as_its_steps_are_made_is_the_one_read_back() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("d")).expect("created");
        let txn = TxnDir::begin(&StateDir::new(&dir.path().join("state"))).expect("begun");
        let image = file(3, 30);
        let paths: Vec<PkgPath> = (0..2 * BLOCK + 5)
            .map(|i| PkgPath::new(&format!("d/f{i:05}")).expect("a path"))
            .collect();
        let titles = ("macOS 26.3 (a)", "macOS 26.3");
        let written = write_journal::<FsError>(&txn, TxnKind::Revert, titles, &root, |write| {
            paths.iter().try_for_each(|path| {
                write(&Step {
                    path,
                    from: Some(&image),
                    to: None,
                })
            })?;
            // What follows the steps is named in the head.
            Ok(Tail {
                kept: vec![(3, "3.orig".to_owned())],
                record: true,
            })
        });
        let Written(written) = written.expect("written");
        assert_eq!(written.head.kept, [(3, "3.orig".to_owned())]);
        assert!(written.head.record);
        let read = JournalLines::read(&txn.journal(), BLOCK).expect("read");
        assert_eq!(written.marks, read.marks);
        assert_eq!(written.marks.len(), 3);
        assert_eq!(
            serde_json::to_string(&written.head).expect("serialised"),
            serde_json::to_string(&read.head).expect("serialised")
        );
        assert_eq!(
            (read.head.steps, read.head.kind),
            (2 * BLOCK + 5, TxnKind::Revert)
        );
        assert_eq!(read.head.keep_times.len(), 1);
        let mut walked = 0;
        read.blocks(true, &mut |first, block| {
            assert_eq!(block[0].path, &paths[first]);
            walked += block.len();
            Ok(())
        })
        .expect("walked");
        assert_eq!(walked, paths.len());
    }
}
