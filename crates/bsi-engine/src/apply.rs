//! Apply, revert and status on a root.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use bsi_format::{Entry, Image, Letter, PkgPath};
use rayon::prelude::*;
use serde::Serialize;

use crate::exec::{execute, stage_with, Change};
use crate::package::{reference, source_matches, DecodeFailure, HashingWriter, VerifiedPackage};
use crate::state::{
    remove_dir_if_present, Installed, InstalledEntry, StateDir, StateError, STATE_FORMAT,
};
use crate::tree::{describe_mismatch, image_mismatch, matches_image, observe, ScanError};
use crate::{entry_weight, FsContext, FsError, Progress, LARGE_FILE};

/// What preparing one entry leaves: its staged new file and the name of its revert copy.
type Prepared = (Option<PathBuf>, Option<String>);

/// zstd level of revert copies: made on the device while it applies, so the fastest level
/// (level 3 took a sixth of the apply time on the testdata, for copies about 10% smaller).
const REVERT_LEVEL: i32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    Installed,
    /// The same package was already installed; nothing changed.
    AlreadyInstalled,
    /// An older letter was installed; it was removed and this one installed.
    Replaced {
        previous: Letter,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("root {0} does not exist or is not a directory")]
    Root(PathBuf),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{root} has {installed} installed; {package} is for another product or release")]
    OtherRelease {
        root: PathBuf,
        installed: String,
        package: String,
    },
    #[error("{root} already has {installed} installed; {package} is not newer")]
    NotNewer {
        root: PathBuf,
        installed: String,
        package: String,
    },
    #[error("{root}: {path} is not the package's pre-image: {reason}")]
    PreImage {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
    #[error("{root}: installed patch cannot be replaced: {path} changed since it was applied ({reason})")]
    InstalledChanged {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
    #[error("{root}: package path {path} lies inside the state directory")]
    InsideState { root: PathBuf, path: PkgPath },
    #[error("{root}: package path {path} would escape the root: {ancestor} is {what}")]
    Escape {
        root: PathBuf,
        path: PkgPath,
        ancestor: PkgPath,
        what: &'static str,
    },
    #[error("{root}: directory {path} would be removed but {child} would remain in it")]
    DirectoryNotEmpty {
        root: PathBuf,
        path: PkgPath,
        child: String,
    },
    #[error("{0}")]
    Decode(#[from] DecodeFailure),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{root}: after writing, {path} is not the expected image: {reason}")]
    Check {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RevertError {
    #[error("root {0} does not exist or is not a directory")]
    Root(PathBuf),
    #[error("{0} has no patch installed")]
    NothingInstalled(PathBuf),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{root}: {path} changed since the patch was applied ({reason}); nothing was reverted")]
    Changed {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
    #[error("revert data {file} for {path} is damaged")]
    RevertData { file: PathBuf, path: PkgPath },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{root}: after reverting, {path} is not the base image: {reason}")]
    Check {
        root: PathBuf,
        path: PkgPath,
        reason: String,
    },
}

impl From<RevertError> for ApplyError {
    fn from(e: RevertError) -> ApplyError {
        match e {
            RevertError::Changed { root, path, reason } => {
                ApplyError::InstalledChanged { root, path, reason }
            }
            RevertError::Fs(e) => ApplyError::Fs(e),
            RevertError::Scan(e) => ApplyError::Scan(e),
            RevertError::State(e) => ApplyError::State(e),
            RevertError::Root(r) | RevertError::NothingInstalled(r) => ApplyError::Root(r),
            RevertError::RevertData { file, path } => ApplyError::InstalledChanged {
                root: file,
                path,
                reason: "its revert data is damaged".to_owned(),
            },
            RevertError::Check { root, path, reason } => ApplyError::Check { root, path, reason },
        }
    }
}

fn release_title(product: &str, version: &impl fmt::Display, letter: Letter) -> String {
    format!("{product} {version} ({letter})")
}

/// The base release as seen through an installed patch: paths it touched read from what it
/// recorded and its revert data, every other path from disk.
struct BaseView<'a> {
    root: &'a Path,
    revert_dir: PathBuf,
    touched: BTreeMap<&'a PkgPath, &'a InstalledEntry>,
}

impl<'a> BaseView<'a> {
    fn new(root: &'a Path, state: &StateDir, installed: Option<&'a Installed>) -> BaseView<'a> {
        BaseView {
            root,
            revert_dir: state.revert_dir(),
            touched: installed
                .map(|i| i.entries.iter().map(|e| (&e.path, e)).collect())
                .unwrap_or_default(),
        }
    }

    fn image(&self, path: &PkgPath) -> Result<Option<Image>, ScanError> {
        match self.touched.get(path) {
            Some(entry) => Ok(entry.before.clone()),
            None => observe(self.root, path),
        }
    }

    /// The base bytes of a file whose base image is `image`.
    fn bytes(&self, path: &PkgPath, image: &Image) -> Result<Vec<u8>, RevertError> {
        let revert = self.touched.get(path).and_then(|e| e.revert.as_ref());
        match revert {
            Some(name) => read_revert(&self.revert_dir.join(name), path, image),
            None => {
                let full = self.root.join(path.as_str());
                Ok(fs::read(&full).fs("read", &full)?)
            }
        }
    }

    /// Names of the entries of directory `dir` in the base release.
    fn children(&self, dir: &PkgPath) -> Result<BTreeSet<String>, FsError> {
        let full = self.root.join(dir.as_str());
        let mut names = BTreeSet::new();
        let on_disk = matches!(observe(self.root, dir), Ok(Some(Image::Dir { .. })));
        if let (true, Ok(read)) = (on_disk, fs::read_dir(&full)) {
            for item in read {
                let item = item.fs("read directory", &full)?;
                names.insert(item.file_name().to_string_lossy().into_owned());
            }
        }
        for (path, entry) in &self.touched {
            if path.parent().as_ref() == Some(dir) {
                let name = path
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if entry.before.is_some() {
                    names.insert(name);
                } else {
                    names.remove(&name);
                }
            }
        }
        Ok(names)
    }
}

fn read_revert(file: &Path, path: &PkgPath, image: &Image) -> Result<Vec<u8>, RevertError> {
    let mut bytes = Vec::new();
    read_revert_into(file, path, image, &mut bytes)?;
    Ok(bytes)
}

/// Stream the revert copy `file` of `path`, whose base image is `image`, into `out`, checking
/// its length and digest; `out` must be discarded on error.
fn read_revert_into(
    file: &Path,
    path: &PkgPath,
    image: &Image,
    out: &mut dyn std::io::Write,
) -> Result<(), RevertError> {
    let damaged = || RevertError::RevertData {
        file: file.to_owned(),
        path: path.clone(),
    };
    let Image::File { sha256, size, .. } = image else {
        return Err(damaged());
    };
    let input = std::io::BufReader::new(fs::File::open(file).fs("read", file)?);
    let mut hashing = HashingWriter::new(out);
    bsi_delta::decompress_stream_into(input, *size, &mut hashing).map_err(|e| match e {
        bsi_delta::DecodeError::Output(source) => {
            RevertError::Fs(FsError::new("write", file, source))
        }
        _ => damaged(),
    })?;
    if hashing.digest() != *sha256 {
        return Err(damaged());
    }
    Ok(())
}

/// Where the state directory lies inside the root, if it does.
fn state_inside_root(root: &Path, state_dir: &Path) -> Option<String> {
    let root = fs::canonicalize(root).ok()?;
    let state = match fs::canonicalize(state_dir) {
        Ok(s) => s,
        Err(_) => {
            let parent = fs::canonicalize(state_dir.parent()?).ok()?;
            parent.join(state_dir.file_name()?)
        }
    };
    let rel = state.strip_prefix(&root).ok()?;
    rel.to_str().map(str::to_owned)
}

/// Check the installed patch's post-images are all on disk.
fn check_installed(root: &Path, installed: &Installed) -> Result<(), RevertError> {
    for entry in &installed.entries {
        let actual = observe(root, &entry.path)?;
        if let Some(reason) = image_mismatch(entry.after.as_ref(), actual.as_ref()) {
            return Err(RevertError::Changed {
                root: root.to_owned(),
                path: entry.path.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// Install `pkg` on `root`. Every pre-image is checked and every payload decoded and checked
/// before the first write into the root; a newer letter for the same release replaces an
/// installed one.
pub fn apply(
    pkg: &VerifiedPackage,
    root: &Path,
    state_dir: &Path,
    progress: &dyn Progress,
) -> Result<ApplyOutcome, ApplyError> {
    if !root.is_dir() {
        return Err(ApplyError::Root(root.to_owned()));
    }
    let m = &pkg.manifest;
    let state = StateDir::new(state_dir);
    let installed = state.load()?;
    let package_title = pkg.title();
    if let Some(inst) = &installed {
        let installed_title = release_title(&inst.product, &inst.base.version, inst.letter);
        if inst.product != m.product || inst.base != m.base {
            return Err(ApplyError::OtherRelease {
                root: root.to_owned(),
                installed: installed_title,
                package: package_title,
            });
        }
        if inst.letter == m.letter && inst.package_sha256 == pkg.digest {
            check_installed(root, inst)?;
            return Ok(ApplyOutcome::AlreadyInstalled);
        }
        if inst.letter >= m.letter {
            return Err(ApplyError::NotNewer {
                root: root.to_owned(),
                installed: installed_title,
                package: package_title,
            });
        }
        check_installed(root, inst)?;
    }
    let view = BaseView::new(root, &state, installed.as_ref());
    let state_rel = state_inside_root(root, state_dir);

    // 1. Every pre-image, every ancestor, before any write.
    let by_path: BTreeMap<&PkgPath, &Entry> = m.entries.iter().map(|e| (&e.path, e)).collect();
    let mut before: BTreeMap<&PkgPath, Option<Image>> = BTreeMap::new();
    for entry in &m.entries {
        if state_rel
            .as_deref()
            .is_some_and(|s| entry.path.is_within(s))
        {
            return Err(ApplyError::InsideState {
                root: root.to_owned(),
                path: entry.path.clone(),
            });
        }
        // Ancestors first: a path below a symlink reads as missing, which would hide the reason.
        check_ancestors(root, &view, &by_path, entry)?;
        let actual = view.image(&entry.path)?;
        if let Some(reason) = image_mismatch(entry.pre.as_ref(), actual.as_ref()) {
            return Err(ApplyError::PreImage {
                root: root.to_owned(),
                path: entry.path.clone(),
                reason,
            });
        }
        if matches!(entry.pre, Some(Image::Dir { .. }))
            && !matches!(entry.post, Some(Image::Dir { .. }))
        {
            for child in view.children(&entry.path)? {
                let child_path = PkgPath::new(&format!("{}/{child}", entry.path)).map_err(|e| {
                    FsError::new(
                        "read",
                        &root.join(entry.path.as_str()),
                        std::io::Error::other(e),
                    )
                })?;
                let removed = by_path.get(&child_path).is_some_and(|c| c.post.is_none());
                if !removed {
                    return Err(ApplyError::DirectoryNotEmpty {
                        root: root.to_owned(),
                        path: entry.path.clone(),
                        child: child_path.to_string(),
                    });
                }
            }
        }
        if let Some((_, Some(src))) = reference(entry) {
            let image = view.image(&src.path)?;
            let inside_state = state_rel.as_deref().is_some_and(|s| src.path.is_within(s));
            if inside_state || !source_matches(src, image.as_ref()) {
                return Err(ApplyError::PreImage {
                    root: root.to_owned(),
                    path: src.path.clone(),
                    reason: format!("it is not the source of {} the package names", entry.path),
                });
            }
        }
        before.insert(&entry.path, actual);
    }

    // 2. Decode every payload into staging and keep a copy of every file that goes away.
    let state_existed = state.dir.exists();
    let cleanup = || {
        let _ = remove_dir_if_present(&state.staging_dir());
        let _ = remove_dir_if_present(&state.dir.join("revert.new"));
        if !state_existed {
            let _ = fs::remove_dir(&state.dir);
        }
    };
    let staging = state.fresh_staging()?;
    let revert_new = state.dir.join("revert.new");
    remove_dir_if_present(&revert_new)?;
    fs::create_dir_all(&revert_new).fs("create", &revert_new)?;
    let total: u64 = m
        .entries
        .iter()
        .filter_map(|e| match &e.post {
            Some(Image::File { size, .. }) if e.payload.is_some() => Some(*size),
            _ => None,
        })
        .sum();
    progress.start("decoding", total);
    let prepare = |i: usize| -> Result<Prepared, ApplyError> {
        let entry = &m.entries[i];
        let base = before.get(&entry.path).cloned().flatten();
        let keeps_bytes = matches!((&base, &entry.post), (Some(a), Some(b)) if a.same_content(b));
        let own_is_reference = matches!(reference(entry), Some((_, None)));
        let old = match &base {
            Some(img @ Image::File { .. }) if own_is_reference || !keeps_bytes => {
                Some(view.bytes(&entry.path, img)?)
            }
            _ => None,
        };
        let source_bytes = match reference(entry) {
            Some((_, Some(src))) => Some(view.bytes(&src.path, &source_image(src))?),
            _ => None,
        };
        let revert = match (&old, keeps_bytes) {
            (Some(old), false) => {
                let name = format!("{i}.zst");
                let file = revert_new.join(&name);
                let out = fs::File::create(&file).fs("create", &file)?;
                bsi_delta::compress_into(old, REVERT_LEVEL, std::io::BufWriter::new(out))
                    .fs("write", &file)?;
                Some(name)
            }
            _ => None,
        };
        let staged = match (&entry.post, entry.payload.is_some()) {
            (
                Some(Image::File {
                    mode, mtime, size, ..
                }),
                true,
            ) => {
                let file = staging.join(format!("{i}"));
                let reference = source_bytes.as_deref().or(old.as_deref());
                stage_with(&file, *mode, *mtime, |out| -> Result<(), ApplyError> {
                    Ok(pkg.decode_into(entry, reference, out)?)
                })?;
                progress.advance(*size);
                Some(file)
            }
            _ => None,
        };
        Ok((staged, revert))
    };
    // Large files one at a time, so that memory stays near the largest file; the rest in parallel.
    let (large, small): (Vec<usize>, Vec<usize>) =
        (0..m.entries.len()).partition(|&i| entry_weight(&m.entries[i]) >= LARGE_FILE);
    let mut prepared: Vec<Prepared> = vec![(None, None); m.entries.len()];
    let done: Vec<(usize, Prepared)> = small
        .into_par_iter()
        .map(|i| prepare(i).map(|r| (i, r)))
        .chain(
            large
                .into_iter()
                .map(|i| prepare(i).map(|r| (i, r)))
                .collect::<Vec<_>>(),
        )
        .collect::<Result<_, _>>()
        .inspect_err(|_| cleanup())?;
    for (i, result) in done {
        prepared[i] = result;
    }
    progress.finish();

    // 3. Write: undo the installed letter if there is one, then this package.
    let previous = match &installed {
        Some(inst) => {
            revert_installed(root, &state, inst, &staging)?;
            Some(inst.letter)
        }
        None => None,
    };
    let mut changes = Vec::with_capacity(m.entries.len());
    let mut record = Vec::with_capacity(m.entries.len());
    for (entry, (staged, revert)) in m.entries.iter().zip(prepared) {
        let from = before.get(&entry.path).cloned().flatten();
        changes.push(Change {
            path: entry.path.clone(),
            from: from.clone(),
            to: entry.post.clone(),
            content: staged,
        });
        record.push(InstalledEntry {
            path: entry.path.clone(),
            before: from,
            after: entry.post.clone(),
            revert,
        });
    }
    execute(root, &staging, &changes)?;
    check_written(root, &changes).map_err(|(path, reason)| ApplyError::Check {
        root: root.to_owned(),
        path,
        reason,
    })?;

    // 4. Record what was installed and keep its revert data.
    let revert_dir = state.revert_dir();
    remove_dir_if_present(&revert_dir)?;
    fs::rename(&revert_new, &revert_dir).fs("move into place", &revert_dir)?;
    state.save(&Installed {
        format: STATE_FORMAT,
        product: m.product.clone(),
        base: m.base.clone(),
        letter: m.letter,
        package_sha256: pkg.digest,
        signer: m.signer.clone(),
        entries: record,
    })?;
    remove_dir_if_present(&staging)?;
    Ok(match previous {
        Some(previous) => ApplyOutcome::Replaced { previous },
        None => ApplyOutcome::Installed,
    })
}

/// Every ancestor of an entry is a real directory before (when the entry has a pre-image) and
/// after (when it has a post-image): no write may go through a symlink or a file.
fn check_ancestors(
    root: &Path,
    view: &BaseView<'_>,
    by_path: &BTreeMap<&PkgPath, &Entry>,
    entry: &Entry,
) -> Result<(), ApplyError> {
    let mut ancestor = entry.path.parent();
    while let Some(dir) = ancestor {
        let on_base = view.image(&dir)?;
        let (pre, post) = match by_path.get(&dir) {
            Some(e) => (e.pre.clone(), e.post.clone()),
            None => (on_base.clone(), on_base.clone()),
        };
        for (needed, image) in [(entry.pre.is_some(), &pre), (entry.post.is_some(), &post)] {
            let what = match image {
                _ if !needed => continue,
                Some(Image::Dir { .. }) => continue,
                Some(Image::Symlink { .. }) => "a symlink",
                Some(Image::File { .. }) => "a file",
                None => "missing",
            };
            return Err(ApplyError::Escape {
                root: root.to_owned(),
                path: entry.path.clone(),
                ancestor: dir,
                what,
            });
        }
        ancestor = dir.parent();
    }
    Ok(())
}

/// After writing, every path holds exactly its image, times included.
fn check_written(root: &Path, changes: &[Change]) -> Result<(), (PkgPath, String)> {
    for change in changes {
        let actual =
            observe(root, &change.path).map_err(|e| (change.path.clone(), e.to_string()))?;
        let ok = match (&change.to, &actual) {
            (None, None) => true,
            (Some(e), Some(a)) => matches_image(e, a) && e.mtime() == a.mtime(),
            _ => false,
        };
        if !ok {
            let reason = match (&change.to, &actual) {
                (Some(e), Some(a)) if matches_image(e, a) => {
                    format!("time is {:?}, expected {:?}", a.mtime(), e.mtime())
                }
                _ => describe_mismatch(change.to.as_ref(), actual.as_ref()),
            };
            return Err((change.path.clone(), reason));
        }
    }
    Ok(())
}

/// Put back the base release under an installed patch (its post-images already checked).
fn revert_installed(
    root: &Path,
    state: &StateDir,
    inst: &Installed,
    staging: &Path,
) -> Result<(), RevertError> {
    let revert_dir = state.revert_dir();
    let mut changes = Vec::with_capacity(inst.entries.len());
    for (i, entry) in inst.entries.iter().enumerate() {
        let content = match (&entry.before, &entry.revert) {
            (Some(img @ Image::File { mode, mtime, .. }), Some(name)) => {
                let file = staging.join(format!("revert-{i}"));
                stage_with(&file, *mode, *mtime, |out| {
                    read_revert_into(&revert_dir.join(name), &entry.path, img, out)
                })?;
                Some(file)
            }
            _ => None,
        };
        changes.push(Change {
            path: entry.path.clone(),
            from: entry.after.clone(),
            to: entry.before.clone(),
            content,
        });
    }
    execute(root, staging, &changes)?;
    check_written(root, &changes).map_err(|(path, reason)| RevertError::Check {
        root: root.to_owned(),
        path,
        reason,
    })
}

/// Remove the installed patch: the root returns to its base release exactly, and nothing of the
/// patch stays in the state directory. Refused, writing nothing, when any patched path changed.
pub fn revert(root: &Path, state_dir: &Path) -> Result<Letter, RevertError> {
    if !root.is_dir() {
        return Err(RevertError::Root(root.to_owned()));
    }
    let state = StateDir::new(state_dir);
    let inst = state
        .load()?
        .ok_or_else(|| RevertError::NothingInstalled(root.to_owned()))?;
    check_installed(root, &inst)?;
    // Check the revert data before the first write, too.
    for entry in &inst.entries {
        if let (Some(img), Some(name)) = (&entry.before, &entry.revert) {
            read_revert_into(
                &state.revert_dir().join(name),
                &entry.path,
                img,
                &mut std::io::sink(),
            )?;
        }
    }
    let staging = state.fresh_staging()?;
    revert_installed(root, &state, &inst, &staging)?;
    state.clear()?;
    Ok(inst.letter)
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("root {0} does not exist or is not a directory")]
    Root(PathBuf),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What a person sees in Settings: the release and the installed letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub product: Option<String>,
    pub version: Option<String>,
    pub build: Option<String>,
    pub letter: Option<Letter>,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.product, &self.version) {
            (Some(p), Some(v)) => write!(f, "{p} {v}")?,
            _ => f.write_str("unknown release")?,
        }
        if let Some(letter) = self.letter {
            write!(f, " ({letter})")?;
        }
        Ok(())
    }
}

/// Path of the release description a root carries.
pub const SYSTEM_VERSION_PLIST: &str = "System/Library/CoreServices/SystemVersion.plist";

/// The installed patch if there is one, else the release the root's SystemVersion.plist names.
pub fn status(root: &Path, state_dir: &Path) -> Result<Status, StatusError> {
    if !root.is_dir() {
        return Err(StatusError::Root(root.to_owned()));
    }
    if let Some(inst) = StateDir::new(state_dir).load()? {
        return Ok(Status {
            product: Some(inst.product),
            version: Some(inst.base.version.to_string()),
            build: inst.base.build,
            letter: Some(inst.letter),
        });
    }
    let plist = fs::read_to_string(root.join(SYSTEM_VERSION_PLIST)).unwrap_or_default();
    Ok(Status {
        product: plist_string(&plist, "ProductName"),
        version: plist_string(&plist, "ProductVersion"),
        build: plist_string(&plist, "ProductBuildVersion"),
        letter: None,
    })
}

/// The `<string>` following `<key>KEY</key>` in an XML plist.
fn plist_string(plist: &str, key: &str) -> Option<String> {
    let after = plist.split_once(&format!("<key>{key}</key>"))?.1;
    let value = after.trim_start().strip_prefix("<string>")?;
    Some(value.split_once("</string>")?.0.trim().to_owned())
}

/// A file image with a source record's digest and size (all that reading its bytes needs).
fn source_image(src: &bsi_format::Source) -> Image {
    Image::File {
        sha256: src.sha256,
        size: src.size,
        mode: 0,
        mtime: bsi_format::Mtime { secs: 0, nanos: 0 },
    }
}
