//! The bsi engine: walks trees, builds packages, verifies them against trees, and applies,
//! reverts and reports patches on a root.
//!
//! Library code never prints; progress goes through [`Progress`] and every failure is a typed
//! error naming the file and the reason.
#![forbid(unsafe_code)]

mod apply;
mod build;
#[doc(hidden)]
pub mod fault;
mod fsx;
mod package;
mod state;
mod tree;
mod txn;
mod update;

use std::path::{Path, PathBuf};

pub use apply::{
    apply, recover, revert, status, ApplyError, ApplyOutcome, RevertError, Session, SessionError,
    Space, Status, StatusError,
};
pub use build::{
    build, build_to_file, write_atomically, BuildError, BuildOptions, BuildSummary, ComponentSpec,
};
pub use package::{signer_key, verify_against_tree, OpenError, TreeVerifyError, VerifiedPackage};
pub use state::default_state_dir;
pub use tree::{scan, ScanError, Tree, STATE_DIR_NAME};
pub use txn::{Failed, Interrupted, Recovered, TxnError, TxnKind};
pub use update::{
    update, ChannelSource, DeviceRecord, Policy, UpdateError, UpdateOutcome, UpdateTrust,
};

/// Files at least this large (old or new) are encoded and decoded one at a time, so that
/// memory follows the largest file rather than the sum of the largest few.
pub(crate) const LARGE_FILE: u64 = 32 << 20;

/// The larger of an entry's old and new file sizes.
pub(crate) fn entry_weight(entry: &bsi_format::Entry) -> u64 {
    let size = |image: &Option<bsi_format::Image>| match image {
        Some(bsi_format::Image::File { size, .. }) => *size,
        _ => 0,
    };
    size(&entry.pre).max(size(&entry.post))
}

/// Receives progress of long operations (a CLI turns it into a progress bar).
pub trait Progress: Sync {
    /// A phase with `total` units of work begins.
    fn start(&self, phase: &str, total: u64);
    /// `units` more units are done.
    fn advance(&self, units: u64);
    fn finish(&self);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: u64) {}
    fn advance(&self, _units: u64) {}
    fn finish(&self) {}
}

/// A filesystem call that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    pub(crate) fn new(action: &'static str, path: &Path, source: std::io::Error) -> FsError {
        FsError {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Shorthand to attach an action and a path to an I/O result.
pub(crate) trait FsContext<T> {
    fn fs(self, action: &'static str, path: &Path) -> Result<T, FsError>;
}

impl<T> FsContext<T> for std::io::Result<T> {
    fn fs(self, action: &'static str, path: &Path) -> Result<T, FsError> {
        self.map_err(|e| FsError::new(action, path, e))
    }
}
