//! What the engine keeps about a root: the installed patch and what is needed to revert it.

use std::fs;
use std::path::{Path, PathBuf};

use bsi_format::{BaseRelease, Digest, Image, Letter, PkgPath};
use serde::{Deserialize, Serialize};

use crate::{FsContext, FsError};

/// The state directory of a root when none is given: `ROOT/.bsi`.
pub fn default_state_dir(root: &Path) -> PathBuf {
    root.join(crate::STATE_DIR_NAME)
}

pub(crate) const STATE_FORMAT: u32 = 1;

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

    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
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
        if installed.format != STATE_FORMAT {
            return Err(StateError::Damaged {
                path,
                reason: format!("state format {} is not {STATE_FORMAT}", installed.format),
            });
        }
        Ok(Some(installed))
    }

    pub fn save(&self, installed: &Installed) -> Result<(), FsError> {
        let bytes = serde_json::to_vec_pretty(installed).expect("state always serialises");
        crate::build::write_atomically(&self.installed_path(), &bytes)?;
        sync_dir(&self.dir)
    }

    /// Forget the installed patch: its record and its revert data.
    pub fn clear(&self) -> Result<(), FsError> {
        let path = self.installed_path();
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FsError::new("remove", &path, e)),
        }
        remove_dir_if_present(&self.revert_dir())?;
        remove_dir_if_present(&self.staging_dir())?;
        sync_dir(&self.dir)
    }

    /// A fresh, empty staging directory.
    pub fn fresh_staging(&self) -> Result<PathBuf, FsError> {
        let staging = self.staging_dir();
        remove_dir_if_present(&staging)?;
        fs::create_dir_all(&staging).fs("create", &staging)?;
        Ok(staging)
    }
}

pub(crate) fn remove_dir_if_present(dir: &Path) -> Result<(), FsError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::new("remove", dir, e)),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), FsError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .fs("sync", dir)
}
