//! A model of a tree that proptest can generate and that can be written to disk exactly.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use filetime::FileTime;
use proptest::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        bytes: Vec<u8>,
        mode: u32,
        mtime: (i64, u32),
    },
    Symlink {
        target: String,
        mtime: (i64, u32),
    },
    Dir {
        mode: u32,
        mtime: (i64, u32),
    },
}

/// Paths (`a/b/c`) to nodes; every ancestor of a path is a `Dir` in the map.
pub type Model = BTreeMap<String, Node>;

const NAMES: [&str; 4] = ["a", "b", "lib", "x.dylib"];

fn path_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(0..NAMES.len(), 1..=3).prop_map(|parts| {
        parts
            .iter()
            .map(|&i| NAMES[i])
            .collect::<Vec<_>>()
            .join("/")
    })
}

fn mtime_strategy() -> impl Strategy<Value = (i64, u32)> {
    (1_600_000_000i64..1_700_000_000, 0u32..1_000_000_000)
}

/// Content drawn so that related files share long runs (deltas matter).
fn bytes_strategy() -> impl Strategy<Value = Vec<u8>> {
    (0u64..4, 0usize..6000).prop_map(|(seed, len)| pattern(seed, len))
}

/// Incompressible bytes (xorshift), for files a compressed copy cannot shrink.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            if i % 64 < 40 {
                (i / 64) as u8 // compressible runs
            } else {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            }
        })
        .collect()
}

fn node_strategy() -> impl Strategy<Value = Node> {
    prop_oneof![
        4 => (bytes_strategy(), prop_oneof![Just(0o644), Just(0o755), Just(0o600), Just(0o444)], mtime_strategy())
            .prop_map(|(bytes, mode, mtime)| Node::File { bytes, mode, mtime }),
        1 => (prop_oneof![Just("a"), Just("../lib"), Just("x.dylib"), Just("/usr/lib/libz.dylib")], mtime_strategy())
            .prop_map(|(t, mtime)| Node::Symlink { target: t.to_owned(), mtime }),
        2 => (prop_oneof![Just(0o755), Just(0o750), Just(0o700)], mtime_strategy())
            .prop_map(|(mode, mtime)| Node::Dir { mode, mtime }),
    ]
}

/// What to do to a tree: put a node at a path (replacing whatever subtree was there), delete
/// a path, or edit a few bytes of a file in place.
#[derive(Debug, Clone)]
pub enum Edit {
    Put(String, Node),
    Delete(String),
    Poke {
        path: String,
        at: usize,
        byte: u8,
        insert: bool,
    },
    Touch {
        path: String,
        mtime: (i64, u32),
        mode: u32,
    },
}

pub fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => (path_strategy(), node_strategy()).prop_map(|(p, n)| Edit::Put(p, n)),
        1 => path_strategy().prop_map(Edit::Delete),
        3 => (path_strategy(), any::<usize>(), any::<u8>(), any::<bool>())
            .prop_map(|(path, at, byte, insert)| Edit::Poke { path, at, byte, insert }),
        1 => (path_strategy(), mtime_strategy(), prop_oneof![Just(0o644), Just(0o755)])
            .prop_map(|(path, mtime, mode)| Edit::Touch { path, mtime, mode }),
    ]
}

pub fn model_strategy() -> impl Strategy<Value = Model> {
    proptest::collection::vec((path_strategy(), node_strategy()), 1..24).prop_map(|nodes| {
        let mut model = Model::new();
        for (path, node) in nodes {
            put(&mut model, &path, node);
        }
        model
    })
}

fn ancestors(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('/').collect();
    (1..parts.len()).map(|n| parts[..n].join("/")).collect()
}

fn remove_subtree(model: &mut Model, path: &str) {
    let prefix = format!("{path}/");
    model.retain(|p, _| p != path && !p.starts_with(&prefix));
}

/// Put `node` at `path`, making ancestors directories (replacing files or links in the way).
pub fn put(model: &mut Model, path: &str, node: Node) {
    for dir in ancestors(path) {
        if !matches!(model.get(&dir), Some(Node::Dir { .. })) {
            remove_subtree(model, &dir);
            model.insert(
                dir,
                Node::Dir {
                    mode: 0o755,
                    mtime: (1_650_000_000, 0),
                },
            );
        }
    }
    if !(matches!(node, Node::Dir { .. }) && matches!(model.get(path), Some(Node::Dir { .. }))) {
        remove_subtree(model, path);
    }
    model.insert(path.to_owned(), node);
}

pub fn apply_edits(base: &Model, edits: &[Edit]) -> Model {
    let mut model = base.clone();
    for edit in edits {
        match edit {
            Edit::Put(path, node) => put(&mut model, path, node.clone()),
            Edit::Delete(path) => remove_subtree(&mut model, path),
            Edit::Poke {
                path,
                at,
                byte,
                insert,
            } => {
                if let Some(Node::File { bytes, .. }) = model.get_mut(path) {
                    let at = if bytes.is_empty() {
                        0
                    } else {
                        at % bytes.len()
                    };
                    if *insert || bytes.is_empty() {
                        bytes.insert(at, *byte);
                    } else {
                        bytes[at] = bytes[at].wrapping_add(1);
                    }
                }
            }
            Edit::Touch {
                path,
                mtime: t,
                mode: m,
            } => match model.get_mut(path) {
                Some(Node::File { mtime, mode, .. }) => {
                    *mtime = *t;
                    *mode = *m;
                }
                Some(Node::Dir { mtime, .. }) | Some(Node::Symlink { mtime, .. }) => *mtime = *t,
                None => {}
            },
        }
    }
    model
}

fn ft((secs, nanos): (i64, u32)) -> FileTime {
    FileTime::from_unix_time(secs, nanos)
}

/// Write `model` under `root` (which must exist), times and modes exact.
pub fn materialize(model: &Model, root: &Path) {
    for (path, node) in model {
        let full = root.join(path);
        match node {
            Node::Dir { .. } => fs::create_dir(&full).expect("create dir"),
            Node::File { bytes, mode, mtime } => {
                fs::write(&full, bytes).expect("write file");
                fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).expect("chmod");
                filetime::set_file_mtime(&full, ft(*mtime)).expect("mtime");
            }
            Node::Symlink { target, mtime } => {
                std::os::unix::fs::symlink(target, &full).expect("symlink");
                filetime::set_symlink_file_times(&full, ft(*mtime), ft(*mtime)).expect("link time");
            }
        }
    }
    for (path, node) in model.iter().rev() {
        if let Node::Dir { mode, mtime } = node {
            let full = root.join(path);
            fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).expect("chmod dir");
            filetime::set_file_mtime(&full, ft(*mtime)).expect("dir mtime");
        }
    }
}

/// Options of a build of `base` -> `target` as macOS 26.3 (a), with `components` as
/// `--component` gives them.
pub fn opts<'a>(
    base: &Path,
    target: &Path,
    key: &'a bsi_sign::SecretKey,
    components: &[&str],
) -> bsi_engine::BuildOptions<'a> {
    bsi_engine::BuildOptions {
        base: base.to_owned(),
        target: target.to_owned(),
        product: "macOS".to_owned(),
        base_version: "26.3".parse().expect("version"),
        base_build: None,
        letter: "a".parse().expect("letter"),
        components: components
            .iter()
            .map(|c| c.parse().expect("component spec"))
            .collect(),
        key,
    }
}

/// Write `bytes` at `rel` under `root` (its directories made), with a fixed modification time.
pub fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let full = root.join(rel);
    fs::create_dir_all(full.parent().expect("has parent")).expect("mkdir");
    fs::write(&full, bytes).expect("write");
    filetime::set_file_mtime(&full, FileTime::from_unix_time(1_700_000_000, 0)).expect("mtime");
}
