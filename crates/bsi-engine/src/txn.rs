//! Transactions on a root: apply, revert and the switch from one letter to the next turn one
//! tree into another through steps that leave the root recoverable, at every instant, to
//! exactly the old tree or exactly the new one.
//!
//! The recipe:
//! 1. Prepare, writing nothing in the root: every new file is staged in `STATE/txn/stage/`
//!    (its writeback started as it is written, all of them synced once all are written), the
//!    new revert data in `STATE/txn/revert/`.
//! 2. Write the journal (`STATE/txn/journal.json`, atomically, synced): every step with its
//!    image before and after, the directory times to keep, and the installed record before and
//!    after. From here on the transaction can be completed or rolled back from disk alone.
//! 3. Roll forward, each step idempotent: removals children first (an old file or symlink is
//!    moved to `STATE/txn/undo/`), placements parents first (an old file is hard-linked into
//!    `undo/` before the staged file is renamed over it, so that the path always holds a whole
//!    file), then permission bits and times; every directory that changed is synced; then
//!    every path is checked against its image.
//! 4. Commit: link the base files the new revert data keeps as they were from `undo/`, mark
//!    `committed`, write the installed record, swap in the new revert data, remove the journal,
//!    then the rest of `STATE/txn/`.
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
use crate::FsError;

/// Journal format written: 2 adds `kept`; 1, which an earlier bsi wrote, is still read.
pub(crate) const JOURNAL_FORMAT: u32 = 2;

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

/// What a transaction does, written as the journal before the root is touched. It borrows
/// what it records: the steps as above, and the installed records before and after from
/// wherever they are held. [`JournalRead`] is the same journal read back.
#[derive(Debug, Serialize)]
pub(crate) struct Journal<'a> {
    pub format: u32,
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
    format: u32,
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

impl JournalRead {
    /// The journal that was written, lent from this one.
    fn journal(&self) -> Journal<'_> {
        let steps = self.steps.iter().map(|s| Step {
            path: &s.path,
            from: s.from.as_ref(),
            to: s.to.as_ref(),
        });
        Journal {
            format: self.format,
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

    fn load(&self) -> Result<Option<JournalRead>, TxnError> {
        let path = self.journal();
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::new("read", &path, e).into()),
        };
        let damaged = |reason: String| TxnError::Journal {
            path: path.clone(),
            reason,
        };
        // Parsed as it is read, as the installed record is.
        let journal: JournalRead =
            serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
                match e.is_io() {
                    true => TxnError::from(FsError::new("read", &path, e.into())),
                    false => damaged(e.to_string()),
                }
            })?;
        if !(1..=JOURNAL_FORMAT).contains(&journal.format) {
            return Err(damaged(format!(
                "journal format {} is not 1 to {JOURNAL_FORMAT}",
                journal.format
            )));
        }
        Ok(Some(journal))
    }
}

/// The interrupted transaction of a state directory, if any; reads only.
pub(crate) fn pending(state: &StateDir) -> Result<Option<Interrupted>, TxnError> {
    Ok(TxnDir::of(state).load()?.map(|j| Interrupted {
        kind: j.kind,
        from: j.from_title,
        to: j.to_title,
    }))
}

/// Directories above `steps` (sorted by path) that are not steps themselves, with their current
/// times.
pub(crate) fn times_to_keep(root: &Path, steps: &[Step]) -> Vec<(PkgPath, Mtime)> {
    // Looked up where they lie, not in a set of every path (2 MB for 150,750 steps).
    let stepped = |dir: &PkgPath| steps.binary_search_by(|s| s.path.cmp(dir)).is_ok();
    let mut keep: BTreeMap<PkgPath, Mtime> = BTreeMap::new();
    for step in steps {
        let mut parent = step.path.parent();
        while let Some(dir) = parent {
            if !keep.contains_key(&dir) && !stepped(&dir) {
                if let Ok(meta) = fs::symlink_metadata(root.join(dir.as_str())) {
                    if meta.is_dir() {
                        keep.insert(dir.clone(), mtime_of(&meta));
                    }
                }
            }
            parent = dir.parent();
        }
    }
    keep.into_iter().collect()
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
/// are not read again.
fn roll(
    root: &Path,
    txn: &TxnDir,
    journal: &Journal,
    way: Way,
    seen: &Seen,
) -> Result<(), TxnError> {
    let steps = &journal.steps;
    let confined = RootDir::open(root)?;
    let (stage, undo) = (
        OwnDir::open(&txn.stage_dir())?,
        OwnDir::open(&txn.undo_dir())?,
    );
    // 1. Removals, children first: what goes away or changes kind.
    for (i, step) in steps.iter().enumerate().rev() {
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

    // 2. Placements, parents first.
    for (i, step) in steps.iter().enumerate() {
        let (origin, target) = ends(step, way);
        let Some(target) = target else { continue };
        let actual = observe_with(root, step.path, Content::Read(Some(seen)))?;
        if same_thing(actual.as_ref(), Some(target)) {
            continue;
        }
        // What changes kind was moved away by the removals.
        let moved_away = origin.is_some_and(|o| o.kind_name() != target.kind_name());
        if !(actual.is_none() && moved_away) {
            expect_either(step, actual.as_ref(), origin, Some(target))?;
        }
        if matches!(target, Image::Dir { .. }) {
            confined.create_dir(step.path)?;
            continue;
        }
        if actual.is_some() && way == Way::Forward && !exists(&txn.undo(i)) {
            // The old file or symlink stays reachable until the commit.
            confined.link_out(step.path, &undo, &i.to_string())?;
        }
        match target {
            Image::Symlink { target: link, .. } => {
                let tmp = txn.link_tmp(i);
                fsx::remove_all(&tmp)?;
                fsx::symlink(link, &tmp)?;
                confined.move_in(&stage, &format!("link-{i}"), step.path)?;
            }
            _ => {
                let (dir, source) = match way {
                    Way::Forward => (&stage, txn.stage(i)),
                    Way::Back => (&undo, txn.undo(i)),
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
    }

    // 3. Permission bits and times: files and symlinks, then directories children first.
    let mut dirs: BTreeMap<&PkgPath, (Option<u32>, Mtime)> = journal
        .keep_times
        .iter()
        .map(|(p, m)| (p, (None, *m)))
        .collect();
    for step in steps {
        let path = &step.path;
        match ends(step, way).1 {
            // A mode or time set here moves the file's time of change: its record no longer
            // matches, and step 5 reads it.
            Some(Image::File { mode, mtime, .. }) => {
                set_meta(&confined, path, Some(*mode), *mtime, false)?
            }
            Some(Image::Symlink { mtime, .. }) => set_meta(&confined, path, None, *mtime, true)?,
            Some(Image::Dir { mode, mtime }) => {
                dirs.insert(step.path, (Some(*mode), *mtime));
            }
            None => {}
        }
    }
    for (path, (mode, mtime)) in dirs.iter().rev() {
        set_meta(&confined, path, *mode, *mtime, false)?;
    }

    // 4. Make the renames durable before anything is recorded as done: every directory that
    //    gained or lost an entry (here or in a run a crash interrupted: the parent of every step
    //    that changes more than modes and times), and the undo directory that holds what left
    //    the root.
    let mut touched: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
    for step in steps.iter().filter(|s| !same_thing(s.from, s.to)) {
        let parent = step.path.parent();
        touched.insert(parent.map_or(root.to_owned(), |p| root.join(p.as_str())));
    }
    for dir in &touched {
        if fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            fsx::sync_dir(dir)?;
        }
    }
    fsx::sync_dir(&txn.undo_dir())?;

    // 5. Every path holds its end, times included: looked at on every core (what step 3 gave
    //    a time or mode is read and hashed again), the first path in order that does not
    //    reported.
    let failed = steps
        .par_iter()
        .filter_map(|step| check_end(root, step, way, seen).err())
        .find_first(|_| true);
    failed.map_or(Ok(()), Err)
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

/// Set permission bits (when given) and the time of `full`, skipping what is already right.
fn set_meta(
    root: &RootDir,
    path: &PkgPath,
    mode: Option<u32>,
    mtime: Mtime,
    symlink: bool,
) -> Result<(), FsError> {
    let full = root.full(path);
    let meta = fs::symlink_metadata(&full).map_err(|e| FsError::new("read", &full, e))?;
    if let Some(mode) = mode {
        if meta.mode() & 0o7777 != mode {
            root.set_mode(path, mode)?;
        }
    }
    if mtime_of(&meta) != mtime {
        root.set_mtime(path, mtime, symlink)?;
    }
    Ok(())
}

/// After the root holds the new tree: record it, swap in its revert data, end the transaction.
fn commit(state: &StateDir, txn: &TxnDir, journal: &Journal) -> Result<(), FsError> {
    keep_bases(txn, journal)?;
    if !exists(&txn.committed_mark()) {
        fsx::write_atomically(&txn.committed_mark(), b"")?;
    }
    match &journal.after {
        Some(record) => {
            state.save(record)?;
            if exists(&txn.revert_dir()) {
                fsx::remove_all(&state.revert_dir())?;
                fsx::rename(&txn.revert_dir(), &state.revert_dir())?;
            }
        }
        None => {
            fsx::remove_all(&state.installed_path())?;
            fsx::remove_all(&state.revert_dir())?;
        }
    }
    fsx::sync_dir(&state.dir)?;
    finish(state, txn)
}

/// Link every base file the new revert data keeps (`journal.kept`) from `undo/`, where the roll
/// forward left the root's old file, into the revert data; those a crash left linked already
/// stay. Nothing to do once the revert data was swapped in.
fn keep_bases(txn: &TxnDir, journal: &Journal) -> Result<(), FsError> {
    let dir = txn.revert_dir();
    if journal.kept.is_empty() || !exists(&dir) {
        return Ok(());
    }
    for (step, name) in &journal.kept {
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
fn roll_back(
    root: &Path,
    state: &StateDir,
    txn: &TxnDir,
    journal: &Journal,
) -> Result<(), TxnError> {
    if !exists(&txn.rollback_mark()) {
        fsx::write_atomically(&txn.rollback_mark(), b"")?;
    }
    roll(root, txn, journal, Way::Back, &Seen::default())?;
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

/// Write `journal` (whose staged files and revert data are ready in `txn`) and carry it out;
/// `seen` holds what this process read and wrote since it checked the root.
pub(crate) fn run(
    root: &Path,
    state: &StateDir,
    txn: &TxnDir,
    journal: &Journal,
    seen: &Seen,
) -> Result<(), Failed> {
    let kind = journal.kind;
    let prepare = || -> Result<(), FsError> {
        for d in [txn.stage_dir(), txn.revert_dir(), txn.undo_dir()] {
            fsx::sync_dir(&d)?;
        }
        fsx::write_atomically_with(&txn.journal(), |out| {
            serde_json::to_writer(out, journal).map_err(std::io::Error::from)
        })
    };
    if let Err(cause) = prepare() {
        // No journal on disk, or a whole one: nothing in the root was touched yet.
        if exists(&txn.journal()) {
            return match roll_back(root, state, txn, journal) {
                Ok(()) => Err(Failed::RolledBack {
                    kind,
                    cause: cause.into(),
                }),
                Err(rollback) => Err(Failed::Stuck {
                    cause: cause.into(),
                    rollback,
                }),
            };
        }
        txn.abandon();
        return Err(Failed::RolledBack {
            kind,
            cause: cause.into(),
        });
    }
    let forward = roll(root, txn, journal, Way::Forward, seen).and_then(|()| {
        commit(state, txn, journal)?;
        Ok(())
    });
    match forward {
        Ok(()) => Ok(()),
        Err(cause) if exists(&txn.committed_mark()) => {
            // The new tree is in place and recorded as committed: complete, do not undo.
            match commit(state, txn, journal) {
                Ok(()) => Ok(()),
                Err(again) => Err(Failed::Stuck {
                    cause,
                    rollback: again.into(),
                }),
            }
        }
        Err(cause) => match roll_back(root, state, txn, journal) {
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
    let journal = read.journal();
    let completed = Recovered::Completed {
        kind: journal.kind,
        to: journal.to_title.clone(),
    };
    let rolled_back = Recovered::RolledBack {
        kind: journal.kind,
        from: journal.from_title.clone(),
    };
    if exists(&txn.rollback_mark()) {
        roll_back(root, state, &txn, &journal)?;
        return Ok(Some(rolled_back));
    }
    if exists(&txn.committed_mark()) {
        roll(root, &txn, &journal, Way::Forward, seen)?;
        commit(state, &txn, &journal)?;
        return Ok(Some(completed));
    }
    match roll(root, &txn, &journal, Way::Forward, seen) {
        Ok(()) => {
            commit(state, &txn, &journal)?;
            Ok(Some(completed))
        }
        Err(_) => {
            roll_back(root, state, &txn, &journal)?;
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
                op: bsi_format::Operation::Replace,
                payload: None,
            })
            .collect();
        // The first path held the pre-image at another time; the last has revert data.
        let found = file(1, 11);
        entries[0].pre = Some(file(1, 10));
        let mut expected = inst.clone();
        expected.entries[0].before = Some(found.clone());
        expected.entries[2].revert = Some("2.rev".to_owned());
        let made = crate::state::Record {
            entries: crate::state::RecordEntries::Planned {
                entries: &entries,
                found: &[Some(Box::new(found)), None, None],
                names: &[(2, "2.rev".to_owned())],
            },
            ..inst.record()
        };
        assert_eq!(
            serde_json::to_string_pretty(&made).expect("serialised"),
            serde_json::to_string_pretty(&expected).expect("serialised")
        );
    }

    #[test]
    fn a_journal_read_back_lends_the_journal_that_was_written() {
        let (before, after) = (installed("a", None), installed("b", Some("0.rev")));
        let steps: Vec<Step> = after
            .entries
            .iter()
            .map(|e| Step {
                path: &e.path,
                from: e.before.as_ref(),
                to: e.after.as_ref(),
            })
            .collect();
        let journal = Journal {
            format: JOURNAL_FORMAT,
            kind: TxnKind::Switch,
            from_title: "macOS 26.3 (a)".to_owned(),
            to_title: "macOS 26.3 (b)".to_owned(),
            keep_times: vec![(
                PkgPath::new("Lib").expect("a path"),
                Mtime { secs: 5, nanos: 0 },
            )],
            steps,
            after: Some(after.record()),
            kept: vec![(0, "0.orig".to_owned())],
        };
        let written = serde_json::to_string(&journal).expect("serialised");
        let read: JournalRead = serde_json::from_str(&written).expect("parsed");
        assert_eq!(
            serde_json::to_string(&read.journal()).expect("serialised"),
            written
        );
        // An earlier bsi wrote the record before too: its journal reads as the same one.
        let record = serde_json::to_string(&before).expect("serialised");
        let older = written.replacen(
            r#","after":"#,
            &format!(r#","before":{record},"after":"#),
            1,
        );
        assert!(older.len() > written.len() + record.len());
        let read: JournalRead = serde_json::from_str(&older).expect("an earlier journal parses");
        assert_eq!(
            serde_json::to_string(&read.journal()).expect("serialised"),
            written
        );
        assert_eq!(read.steps.len(), 3);
        assert!(read.journal().steps[0].needs_content());
        assert!(!read.journal().steps[1].needs_content());
    }
}
