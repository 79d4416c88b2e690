//! Pins under `/sys/fs/bpf/<instance>/`: the maps and the XDP link outlive the daemon, so traffic
//! keeps flowing while no daemon runs, and the next daemon takes them over.
//!
//! The loader reuses a pinned map without comparing its layout, so before reuse every pinned map
//! is checked against the layout this build expects; a mismatch is refused, never half-used.

use super::DataplaneSizes;
use anyhow::{Context, Result, bail};
use aya::maps::{MapInfo, MapType};
use lb_common::maps::*;
use std::path::{Path, PathBuf};

pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// The link that keeps the program attached to the interface.
const LINK_PIN: &str = "xdp_link";

#[derive(Clone, Debug)]
pub struct PinDir {
    path: PathBuf,
}

/// What a map must look like to be reused.
struct MapLayout {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn expected_layouts(sizes: &DataplaneSizes) -> Vec<MapLayout> {
    use std::mem::size_of;
    let layout = |name, map_type, key_size: usize, value_size: usize, max_entries| MapLayout {
        name,
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    };
    vec![
        layout(MAP_VIPS, MapType::Hash, size_of::<VipKey>(), size_of::<VipMeta>(), sizes.max_vips),
        layout(MAP_RINGS, MapType::Array, 4, 4, 2 * sizes.max_vips * sizes.ring_size),
        layout(MAP_BACKENDS, MapType::Array, 4, size_of::<Backend>(), MAX_BACKENDS),
        layout(MAP_CONNS, MapType::LruHash, size_of::<FlowKey>(), size_of::<ConnState>(), sizes.max_conns),
        layout(MAP_NAT_REV, MapType::LruHash, size_of::<FlowKey>(), size_of::<NatReverse>(), sizes.max_conns),
        layout(MAP_STATS_REASON, MapType::PerCpuArray, 4, 8, REASON_COUNT),
        layout(MAP_STATS_VIP, MapType::PerCpuArray, 4, size_of::<Traffic>(), sizes.max_vips),
        layout(MAP_STATS_BACKEND, MapType::PerCpuArray, 4, size_of::<Traffic>(), MAX_BACKENDS),
    ]
}

/// Names of the maps that are pinned.
pub const PINNED_MAPS: [&str; 8] =
    [MAP_VIPS, MAP_RINGS, MAP_BACKENDS, MAP_CONNS, MAP_NAT_REV, MAP_STATS_REASON, MAP_STATS_VIP, MAP_STATS_BACKEND];

impl PinDir {
    pub fn for_instance(instance: &str) -> Self {
        Self { path: Path::new(BPFFS_ROOT).join(instance) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn link(&self) -> PathBuf {
        self.path.join(LINK_PIN)
    }

    /// Creates the directory; bpffs must be mounted at its parent.
    pub fn create(&self) -> Result<()> {
        let root = self.path.parent().unwrap_or(Path::new(BPFFS_ROOT));
        if !is_bpffs(root) {
            bail!(
                "{} is not a mounted bpffs: mount it with `mount -t bpf bpf {}` (cargo xtask setup does)",
                root.display(),
                root.display()
            );
        }
        std::fs::create_dir_all(&self.path).with_context(|| format!("creating {}", self.path.display()))
    }

    /// True when a previous daemon left pinned maps here (they will be reused).
    /// Fails, naming the difference, when they do not have this build's layout and sizes.
    pub fn check_reusable(&self, sizes: &DataplaneSizes) -> Result<bool> {
        let present: Vec<&str> = PINNED_MAPS.iter().copied().filter(|name| self.map(name).exists()).collect();
        if present.is_empty() {
            return Ok(false);
        }
        if present.len() != PINNED_MAPS.len() {
            let missing: Vec<&str> = PINNED_MAPS.iter().copied().filter(|n| !present.contains(n)).collect();
            bail!(
                "{}: pinned maps are incomplete (missing {missing:?}); remove them with `lb detach`",
                self.path.display()
            );
        }
        for expected in expected_layouts(sizes) {
            let info = MapInfo::from_pin(self.map(expected.name))
                .with_context(|| format!("reading pinned map {}", expected.name))?;
            let found = (info.map_type().ok(), info.key_size(), info.value_size(), info.max_entries());
            let wanted = (Some(expected.map_type), expected.key_size, expected.value_size, expected.max_entries);
            if found != wanted {
                bail!(
                    "pinned map {} in {} has (type, key, value, entries) = {found:?}, this daemon needs {wanted:?}: \
                     it was created by another version or with other sizes (ring_size, max_vips, max_conns). \
                     Keep the old settings, or remove the data plane with `lb detach` (this drops connection state)",
                    expected.name,
                    self.path.display()
                );
            }
        }
        Ok(true)
    }

    /// Unpins the link (the program leaves the interface once no daemon holds it) and the maps.
    /// Returns false when there was nothing to remove.
    pub fn remove(&self) -> Result<bool> {
        if !self.path.exists() {
            return Ok(false);
        }
        let link = self.link();
        if link.exists() {
            std::fs::remove_file(&link).with_context(|| format!("unpinning {}", link.display()))?;
        }
        for name in PINNED_MAPS {
            let path = self.map(name);
            if path.exists() {
                std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            }
        }
        std::fs::remove_dir(&self.path).with_context(|| format!("removing {}", self.path.display()))?;
        Ok(true)
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next().map(Path::new) == Some(path) && fields.next() == Some("bpf")
    })
}
