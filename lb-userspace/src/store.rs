//! The daemon's memory across restarts: the desired state with its runtime edits and the slot
//! allocation, written atomically (temporary file, fsync, rename) so a crash never leaves half.

use crate::model::DesiredState;
use crate::planner::Slots;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const STATE_ROOT: &str = "/var/lib/lb";
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    /// Digest of the desired state the configuration file gave when this state was derived
    /// from it: tells whether the file changed since.
    pub config_digest: String,
    pub state: DesiredState,
    pub slots: Slots,
}

impl SavedState {
    pub fn new(config_digest: String, state: DesiredState, slots: Slots) -> Self {
        Self { version: FORMAT_VERSION, config_digest, state, slots }
    }
}

/// A stable digest of a desired state (FNV-1a over its JSON form).
pub fn digest(state: &DesiredState) -> String {
    let json = serde_json::to_vec(state).expect("the desired state always serialises");
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{hash:016x}")
}

pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn for_instance(instance: &str) -> Self {
        Self { path: Path::new(STATE_ROOT).join(instance).join("state.json") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<Option<SavedState>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let saved: SavedState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid state file", self.path.display()))?;
        if saved.version != FORMAT_VERSION {
            bail!("{} has state format {}, this daemon reads {FORMAT_VERSION}", self.path.display(), saved.version);
        }
        Ok(Some(saved))
    }

    pub fn save(&self, saved: &SavedState) -> Result<()> {
        let dir = self.path.parent().expect("state path has a directory");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&serde_json::to_vec_pretty(saved)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("replacing {}", self.path.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    pub fn remove(&self) -> Result<bool> {
        let Some(dir) = self.path.parent() else { return Ok(false) };
        if !dir.exists() {
            return Ok(false);
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        Ok(true)
    }
}
