//! Turning two trees into a signed package.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bsi_format::{
    signed_bytes, BaseRelease, Component, Digest, Entry, Image, Letter, Manifest, ManifestError,
    Name, Operation, Packing, Payload, PkgPath, Source, Version, FORMAT_VERSION, SIGNATURE_LEN,
};
use bsi_sign::SecretKey;

use crate::tree::{scan, ScanError, Tree};
use crate::{entry_weight, large_batches, largest_first, FsContext, FsError, Progress, LARGE_FILE};

/// `--component NAME=SUBPATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSpec {
    pub name: String,
    pub path: String,
}

impl std::str::FromStr for ComponentSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<ComponentSpec, String> {
        let (name, path) = text
            .split_once('=')
            .ok_or_else(|| format!("component {text:?} is not of the form NAME=SUBPATH"))?;
        let path = path.trim_end_matches('/');
        PkgPath::new(path).map_err(|e| format!("component {name:?}: {e}"))?;
        Ok(ComponentSpec {
            name: name.to_owned(),
            path: path.to_owned(),
        })
    }
}

#[derive(Debug)]
pub struct BuildOptions<'a> {
    pub base: PathBuf,
    pub target: PathBuf,
    pub product: String,
    pub base_version: Version,
    pub base_build: Option<String>,
    pub letter: Letter,
    /// Empty: the whole tree is one component named after the product.
    pub components: Vec<ComponentSpec>,
    pub key: &'a SecretKey,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("base tree: {0}")]
    Base(ScanError),
    #[error("target tree: {0}")]
    Target(ScanError),
    #[error("component {name:?}: {path} is in neither tree")]
    MissingComponent { name: String, path: String },
    #[error("package would be invalid: {0}")]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
}

/// A package made and signed, its payloads waiting in a [`Spill`] file.
struct Made {
    manifest: Manifest,
    signed: Vec<u8>,
    signature: [u8; SIGNATURE_LEN],
    spill: Spill,
    /// The payloads in manifest order.
    order: Vec<Spilled>,
}

impl Made {
    /// Write the package to `out` (named `out_name` in messages).
    fn write_to(&self, out: &mut dyn Write, out_name: &Path) -> Result<(), FsError> {
        let write = |e| FsError::new("write", out_name, e);
        out.write_all(&self.signed).map_err(write)?;
        out.write_all(&self.signature).map_err(write)?;
        for spilled in &self.order {
            self.spill.copy_to(spilled, out, out_name)?;
        }
        out.flush().map_err(write)
    }
}

/// Diff `base` against `target` and sign the package, its payloads waiting in an unnamed file
/// in `spill_dir`.
fn make(
    opts: &BuildOptions<'_>,
    spill_dir: &Path,
    progress: &dyn Progress,
) -> Result<Made, BuildError> {
    let components: Vec<Component> = if opts.components.is_empty() {
        vec![Component {
            name: opts.product.clone(),
            path: String::new(),
        }]
    } else {
        opts.components
            .iter()
            .map(|c| Component {
                name: c.name.clone(),
                path: c.path.clone(),
            })
            .collect()
    };
    let subpaths: Vec<&str> = components
        .iter()
        .filter(|c| !c.path.is_empty())
        .map(|c| c.path.as_str())
        .collect();
    let (base, target) = rayon::join(
        || scan(&opts.base, &subpaths).map_err(BuildError::Base),
        || scan(&opts.target, &subpaths).map_err(BuildError::Target),
    );
    let (base, target) = (base?, target?);
    for c in &components {
        if c.path.is_empty() {
            continue;
        }
        let path = PkgPath::new(&c.path).expect("component paths were validated");
        if !base.contains(&path) && !target.contains(&path) {
            return Err(BuildError::MissingComponent {
                name: c.name.clone(),
                path: c.path.clone(),
            });
        }
    }

    // Each component's name, shared by its entries.
    let names: Vec<Name> = components.iter().map(|c| c.name.as_str().into()).collect();
    let references = References::new(&base, &target);
    let mut planned = plan(base, target, &components, &names);

    // Only entries with new bytes are encoded, each result kept with its entry's index.
    let to_encode: Vec<usize> = (0..planned.len())
        .filter(|&i| needs_payload(&planned[i]))
        .collect();
    let total: u64 = to_encode
        .iter()
        .filter_map(|&i| match &planned[i].post {
            Some(Image::File { size, .. }) => Some(*size),
            _ => None,
        })
        .sum();
    progress.start("encoding", total);
    // Small files on every core, largest first, then large ones in batches (see LARGE_FILE).
    let (large, small): (Vec<usize>, Vec<usize>) = to_encode
        .into_iter()
        .partition(|&i| entry_weight(&planned[i]) >= LARGE_FILE);
    // Each payload waits in an unnamed file from the moment it is made, so that memory holds
    // the files being encoded, not every payload of the tree.
    let spill = Spill::new(spill_dir)?;
    let encode_and_spill = |i: usize| -> Result<(Operation, Spilled), BuildError> {
        let (op, payload) = encode_entry(opts, &planned[i], &references, progress)?;
        Ok((op, spill.put(&payload)?))
    };
    let mut encoded: Vec<(usize, (Operation, Spilled))> = Vec::new();
    let weight = |i: usize| entry_weight(&planned[i]);
    let mut encode_together = |indices: Vec<usize>| -> Result<(), BuildError> {
        encoded.extend(largest_first(indices, weight, encode_and_spill)?);
        Ok(())
    };
    encode_together(small)?;
    let weights: Vec<u64> = large.iter().map(|&i| entry_weight(&planned[i])).collect();
    for batch in large_batches(&weights) {
        encode_together(batch.into_iter().map(|b| large[b]).collect())?;
    }
    progress.finish();
    drop(references);

    // Payloads in manifest order.
    encoded.sort_unstable_by_key(|(i, _)| *i);
    let mut offset = 0u64;
    let mut order = Vec::with_capacity(encoded.len());
    for (i, (op, spilled)) in encoded {
        let entry = &mut planned[i];
        entry.op = op;
        entry.payload = Some(Box::new(Payload {
            offset,
            len: spilled.len,
            sha256: spilled.sha256,
        }));
        offset += spilled.len;
        order.push(spilled);
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        product: opts.product.clone(),
        base: BaseRelease {
            version: opts.base_version.clone(),
            build: opts.base_build.clone(),
        },
        letter: opts.letter,
        signer: opts.key.public().key_id().to_string(),
        components,
        entries: planned,
        payload_len: offset,
    };
    manifest.validate()?;
    let manifest_bytes = manifest.to_packed_bytes_within_limit(&mut |told| match told {
        Packing::Counted(len) => progress.start("packing", len),
        Packing::Packed(more) => progress.advance(more),
    });
    progress.finish();
    let manifest_bytes = manifest_bytes?;
    let signed = signed_bytes(&manifest_bytes);
    let signature = opts.key.sign(&signed);
    Ok(Made {
        manifest,
        signed,
        signature,
        spill,
        order,
    })
}

/// Diff `base` against `target` and return the signed package bytes. Output is a function of the
/// trees, options and key only: file order on disk, time and thread count do not change it.
pub fn build(opts: &BuildOptions<'_>, progress: &dyn Progress) -> Result<BuildSummary, BuildError> {
    let made = make(opts, &std::env::temp_dir(), progress)?;
    let mut bytes = Vec::new();
    made.write_to(&mut bytes, Path::new("package in memory"))?;
    Ok(BuildSummary {
        bytes,
        manifest: made.manifest,
    })
}

/// [`build`], writing the package to `out` (mode 0644) through a temporary file in the same
/// directory, so that `out` is either untouched or complete; payloads wait in an unnamed file
/// there too. Returns the manifest and the package's length.
pub fn build_to_file(
    opts: &BuildOptions<'_>,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(Manifest, u64), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    // Refused now rather than once the package is made.
    not_a_directory(out)?;
    let dir = parent_dir(out);
    let made = make(opts, &dir, progress)?;
    // Named only once the package is made, so that a refused build leaves nothing behind.
    let tmp = tempfile::NamedTempFile::new_in(&dir).fs("create a file in", &dir)?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
    made.write_to(&mut writer, out)?;
    drop(writer);
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .fs("set permissions of", tmp.path())?;
    tmp.as_file().sync_all().fs("write", tmp.path())?;
    let len = tmp.as_file().metadata().fs("write", tmp.path())?.len();
    tmp.persist(out)
        .map_err(|e| FsError::new("write", out, e.error))?;
    Ok((made.manifest, len))
}

/// Refuse a file to be written at `path` where a directory is, or a symlink to one: the rename
/// that puts the file in place would fail on the one, and replace the other with the file.
fn not_a_directory(path: &Path) -> Result<(), FsError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            Err(FsError::new("write", path, rustix::io::Errno::ISDIR.into()))
        }
        _ => Ok(()),
    }
}

/// The directory a file at `path` goes in.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Where a payload waits in the [`Spill`] file, and its digest.
#[derive(Debug, Clone)]
struct Spilled {
    at: u64,
    len: u64,
    sha256: Digest,
}

/// An unnamed file that payloads are appended to as they are made, in any order.
struct Spill {
    file: std::sync::Mutex<(File, u64)>,
    dir: PathBuf,
}

impl Spill {
    fn new(dir: &Path) -> Result<Spill, FsError> {
        let file = tempfile::tempfile_in(dir).fs("create a file in", dir)?;
        Ok(Spill {
            file: std::sync::Mutex::new((file, 0)),
            dir: dir.to_owned(),
        })
    }

    fn put(&self, payload: &[u8]) -> Result<Spilled, FsError> {
        let sha256 = bsi_format::sha256(payload);
        // A panic elsewhere cannot leave the file half-written under the lock: take it back.
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, end) = &mut *guard;
        file.write_all(payload)
            .fs("write a temporary file in", &self.dir)?;
        let at = *end;
        *end += payload.len() as u64;
        Ok(Spilled {
            at,
            len: payload.len() as u64,
            sha256,
        })
    }

    /// Copy a spilled payload to `out` (named `out_name` in messages).
    fn copy_to(
        &self,
        spilled: &Spilled,
        out: &mut dyn Write,
        out_name: &Path,
    ) -> Result<(), FsError> {
        let guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut chunk = vec![0; (1 << 20).min(spilled.len as usize)];
        let mut done = 0u64;
        while done < spilled.len {
            let n = chunk.len().min((spilled.len - done) as usize);
            guard
                .0
                .read_exact_at(&mut chunk[..n], spilled.at + done)
                .fs("read a temporary file in", &self.dir)?;
            out.write_all(&chunk[..n]).fs("write", out_name)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// One entry per path whose image differs between the trees, in path order, with the operation
/// its images call for (an encoder may turn a `Replace` into a `Delta`). The trees' paths and
/// images are moved into the entries, not copied.
fn plan(base: Tree, target: Tree, components: &[Component], names: &[Name]) -> Vec<Entry> {
    // Counted first: grown by doubling, 150,750 entries took 63 MB for 36.
    let changed = Paired::new(
        base.entries.iter().map(pair),
        target.entries.iter().map(pair),
    )
    .filter(|(_, pre, post)| pre != post)
    .count();
    let mut planned = Vec::with_capacity(changed);
    for (path, pre, post) in Paired::new(base.entries.into_iter(), target.entries.into_iter()) {
        if pre == post {
            continue;
        }
        let at = components
            .iter()
            .position(|c| path.is_within(&c.path))
            .expect("scanned paths lie inside a component");
        let op = match (&pre, &post) {
            (None, _) => Operation::ADD,
            (_, None) => Operation::Delete,
            (Some(a), Some(b)) if a.same_content(b) => Operation::Metadata,
            _ => Operation::REPLACE, // a file over a file may become a delta
        };
        planned.push(Entry {
            path,
            component: names[at].clone(),
            pre,
            post,
            op,
            payload: None,
        });
    }
    planned
}

/// A tree's entry as a pair of references.
fn pair<K, V>((k, v): &(K, V)) -> (&K, &V) {
    (k, v)
}

/// Two lists sorted by key walked together: each key once, with its value on either side.
struct Paired<K, V, A: Iterator<Item = (K, V)>, B: Iterator<Item = (K, V)>> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<K: Ord, V, A: Iterator<Item = (K, V)>, B: Iterator<Item = (K, V)>> Paired<K, V, A, B> {
    fn new(a: A, b: B) -> Self {
        Paired {
            a: a.peekable(),
            b: b.peekable(),
        }
    }
}

impl<K: Ord, V, A: Iterator<Item = (K, V)>, B: Iterator<Item = (K, V)>> Iterator
    for Paired<K, V, A, B>
{
    type Item = (K, Option<V>, Option<V>);

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        let order = match (self.a.peek(), self.b.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            Ordering::Less => self.a.next().map(|(k, v)| (k, Some(v), None)),
            Ordering::Greater => self.b.next().map(|(k, v)| (k, None, Some(v))),
            Ordering::Equal => {
                let (k, a) = self.a.next()?;
                let (_, b) = self.b.next()?;
                Some((k, Some(a), Some(b)))
            }
        }
    }
}

fn needs_payload(entry: &Entry) -> bool {
    matches!(entry.post, Some(Image::File { .. })) && entry.op != Operation::Metadata
}

/// Old files a new file can be encoded against, besides its own pre-image: by content (a rename
/// or copy) and by name with version numbers removed (a library renamed for its new version).
/// Only the old files that some new file may ask for are kept, not every file of the old tree.
struct References {
    by_digest: HashMap<Digest, (PkgPath, u64)>,
    by_stem: HashMap<StemKey, Vec<OldFile>>,
}

/// Parent directory and name stem (see [`name_stem`]).
type StemKey = (Option<PkgPath>, String);
/// An old file: path, size, digest.
type OldFile = (PkgPath, u64, Digest);

impl References {
    fn new(base: &Tree, target: &Tree) -> References {
        // What the new files with new bytes may look for: their digest, and their stem where
        // they have no old file at their path.
        let mut digests = HashSet::new();
        let mut stems = HashSet::new();
        for (path, image) in &target.entries {
            let Image::File { sha256, .. } = image else {
                continue;
            };
            let pre = base.get(path);
            if pre.is_some_and(|pre| pre.same_content(image)) {
                continue;
            }
            digests.insert(*sha256);
            if !matches!(pre, Some(Image::File { .. })) {
                stems.insert((path.parent(), name_stem(path)));
            }
        }
        let mut by_digest = HashMap::new();
        let mut by_stem: HashMap<_, Vec<_>> = HashMap::new();
        // Trees iterate in path order, so the first path of a digest wins: deterministic.
        for (path, image) in &base.entries {
            let Image::File { sha256, size, .. } = image else {
                continue;
            };
            if digests.contains(sha256) {
                by_digest.entry(*sha256).or_insert((path.clone(), *size));
            }
            if stems.is_empty() {
                continue;
            }
            let key = (path.parent(), name_stem(path));
            if stems.contains(&key) {
                by_stem
                    .entry(key)
                    .or_default()
                    .push((path.clone(), *size, *sha256));
            }
        }
        References { by_digest, by_stem }
    }

    /// The old file to encode `entry`'s new content against, when it is not its own pre-image.
    fn source_for(&self, entry: &Entry) -> Option<Source> {
        let Some(Image::File { sha256, size, .. }) = &entry.post else {
            return None;
        };
        if let Some((path, old_size)) = self.by_digest.get(sha256) {
            if path != &entry.path {
                return Some(Source {
                    path: path.clone(),
                    sha256: *sha256,
                    size: *old_size,
                });
            }
        }
        if matches!(entry.pre, Some(Image::File { .. })) {
            return None;
        }
        let candidates = self
            .by_stem
            .get(&(entry.path.parent(), name_stem(&entry.path)))?;
        candidates
            .iter()
            .filter(|(path, old_size, _)| {
                path != &entry.path
                    && *old_size <= size.saturating_mul(2)
                    && *size <= old_size.saturating_mul(2)
            })
            .min_by(|(a, a_size, _), (b, b_size, _)| {
                (a_size.abs_diff(*size), a).cmp(&(b_size.abs_diff(*size), b))
            })
            .map(|(path, old_size, digest)| Source {
                path: path.clone(),
                sha256: *digest,
                size: *old_size,
            })
    }
}

/// A file name without digits and separators: `libcrypto.3.dylib` and `libcrypto.3.1.dylib`
/// both become `libcryptodylib`.
fn name_stem(path: &PkgPath) -> String {
    let name = path.as_str().rsplit('/').next().unwrap_or_default();
    name.chars()
        .filter(|c| !c.is_ascii_digit() && !matches!(c, '.' | '-' | '_'))
        .collect()
}

/// The operation and payload for one entry that carries new bytes.
fn encode_entry(
    opts: &BuildOptions<'_>,
    entry: &Entry,
    references: &References,
    progress: &dyn Progress,
) -> Result<(Operation, Vec<u8>), BuildError> {
    let new_path = opts.target.join(entry.path.as_str());
    let new = std::fs::read(&new_path).fs("read", &new_path)?;
    let source = references.source_for(entry);
    let reference_path = match (&source, &entry.pre) {
        (Some(src), _) => Some(&src.path),
        (None, Some(Image::File { .. })) => Some(&entry.path),
        (None, _) => None,
    };
    let old = match reference_path {
        Some(path) => {
            let old_path = opts.base.join(path.as_str());
            Some(std::fs::read(&old_path).fs("read", &old_path)?)
        }
        None => None,
    };
    let best = bsi_delta::encode_best(old.as_deref(), &new).fs("encode", &new_path)?;
    progress.advance(new.len() as u64);
    let op = match (best.encoder, &old, &entry.op) {
        (None, ..) => entry.op.clone(),
        (Some(name), Some(_), _) => Operation::Delta {
            encoder: name.into(),
            source: source.map(Box::new),
        },
        // Against the empty file: a new file, or one over a symlink or a directory.
        (Some(name), None, Operation::Add { .. }) => Operation::Add {
            encoder: Some(name.into()),
        },
        (Some(name), None, _) => Operation::Replace {
            encoder: Some(name.into()),
        },
    };
    Ok((op, best.payload))
}

/// Write `bytes` to `path` (mode 0644) through a temporary file in the same directory, so that
/// `path` is either untouched or complete.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    not_a_directory(path)?;
    let dir = parent_dir(path);
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).fs("create a file in", &dir)?;
    tmp.write_all(bytes).fs("write", tmp.path())?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .fs("set permissions of", tmp.path())?;
    tmp.as_file().sync_all().fs("write", tmp.path())?;
    tmp.persist(path)
        .map_err(|e| FsError::new("write", path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of either list comes once, in order, with the value each side has.
    #[test]
    fn paired_gives_each_key_once_with_both_sides() {
        let a = [(1, 'a'), (3, 'c'), (4, 'd'), (9, 'i')];
        let b = [(0, 'Z'), (3, 'C'), (5, 'E'), (9, 'I'), (12, 'L')];
        let paired: Vec<_> = Paired::new(a.into_iter(), b.into_iter()).collect();
        assert_eq!(
            paired,
            [
                (0, None, Some('Z')),
                (1, Some('a'), None),
                (3, Some('c'), Some('C')),
                (4, Some('d'), None),
                (5, None, Some('E')),
                (9, Some('i'), Some('I')),
                (12, None, Some('L')),
            ]
        );
        let none: [(u8, char); 0] = [];
        assert_eq!(Paired::new(none.into_iter(), none.into_iter()).count(), 0);
        assert_eq!(Paired::new(a.into_iter(), none.into_iter()).count(), 4);
    }
}
