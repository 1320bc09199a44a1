//! What the engine keeps about a root: the installed patch and what is needed to revert it.

use std::fs;
use std::path::{Path, PathBuf};

use bsi_format::{BaseRelease, Digest, Image, Letter, PkgPath};
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
        let path = self.installed_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::new("read", &path, e).into()),
        };
        let installed: Installed =
            serde_json::from_slice(&bytes).map_err(|e| StateError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if !(1..=STATE_FORMAT).contains(&installed.format) {
            return Err(StateError::Damaged {
                path,
                reason: format!(
                    "state format {} is not 1 to {STATE_FORMAT}",
                    installed.format
                ),
            });
        }
        Ok(Some(installed))
    }

    /// Write the installed record atomically (synced, directory synced).
    pub fn save(&self, installed: &Installed) -> Result<(), FsError> {
        crate::fsx::write_atomically_with(&self.installed_path(), |out| {
            serde_json::to_writer_pretty(out, installed).map_err(std::io::Error::from)
        })
    }
}
