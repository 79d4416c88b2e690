//! Pins under `/sys/fs/bpf/<instance>/`: the maps and the XDP link outlive the daemon, so traffic
//! keeps flowing while no daemon runs, and the next daemon takes them over.
//!
//! ```text
//! /sys/fs/bpf/<instance>/xdp_link     the link that keeps the program on the interface
//! /sys/fs/bpf/<instance>/v2-1/VIPS …  a map set: layout version 2, generation 1
//! ```
//!
//! A map set is never changed in place: a new layout version or new sizes get a new set (the
//! next generation), filled from the old one while the old program still forwards. A set is
//! pinned under a temporary name and renamed when complete, so a set directory is always whole.
//! Layout version 1 (the first release) pinned its maps directly in the instance directory.

use anyhow::{Context, Result, bail};
use aya::maps::{MapInfo, MapType};
use lb_common::layout::{LAYOUT_VERSION, MapKind, Sizes, pinned_maps};
use lb_common::maps::*;
use std::path::{Path, PathBuf};

pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// The link that keeps the program attached to the interface.
const LINK_PIN: &str = "xdp_link";
/// Prefix of a map set still being written (bpffs allows no dots in names).
const INCOMPLETE: &str = "new-";
/// The maps layout 1 pinned, directly in the instance directory.
pub const LEGACY_MAPS: [&str; 8] =
    [MAP_VIPS, MAP_RINGS, MAP_BACKENDS, MAP_CONNS, MAP_NAT_REV, MAP_STATS_REASON, MAP_STATS_VIP, MAP_STATS_BACKEND];

#[derive(Clone, Debug)]
pub struct PinDir {
    path: PathBuf,
}

/// One set of pinned maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSet {
    pub version: u32,
    pub generation: u32,
    dir: PathBuf,
}

impl MapSet {
    #[cfg(test)]
    pub fn for_test(version: u32, generation: u32, dir: PathBuf) -> Self {
        Self { version, generation, dir }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn is_legacy(&self) -> bool {
        self.version == 1
    }

    /// The names of the maps this set pins.
    pub fn map_names(&self) -> Vec<&'static str> {
        if self.is_legacy() { LEGACY_MAPS.to_vec() } else { pinned_maps().map(|spec| spec.name).collect() }
    }
}

impl std::fmt::Display for MapSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layout {} (generation {}, {})", self.version, self.generation, self.dir.display())
    }
}

/// How a pinned map set fits this build and configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    /// This layout and these sizes: used as it is.
    Exact,
    /// This layout, other sizes (the reasons): carried into maps of the configured sizes.
    Resized(Vec<String>),
    /// An older layout: carried into maps of this layout.
    Older,
    /// A newer layout than this build knows: refused.
    Newer,
}

impl PinDir {
    pub fn for_instance(instance: &str) -> Self {
        Self { path: Path::new(BPFFS_ROOT).join(instance) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn link(&self) -> PathBuf {
        self.path.join(LINK_PIN)
    }

    /// Creates the instance directory; bpffs must be mounted at its parent (see
    /// [`super::bpffs::ensure_mounted`]).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.path).with_context(|| format!("creating {}", self.path.display()))
    }

    /// The map sets pinned here, oldest first. Sets still being written when a daemon stopped
    /// are not listed (see [`Self::remove_incomplete`]).
    pub fn map_sets(&self) -> Result<Vec<MapSet>> {
        let mut sets = Vec::new();
        if LEGACY_MAPS.iter().any(|name| self.path.join(name).exists()) {
            sets.push(MapSet { version: 1, generation: 0, dir: self.path.clone() });
        }
        let entries = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(sets),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((version, generation)) = parse_set_name(&name)
                && entry.file_type()?.is_dir()
            {
                sets.push(MapSet { version, generation, dir: entry.path() });
            }
        }
        sets.sort_by_key(|set| (set.version, set.generation));
        Ok(sets)
    }

    /// Removes map sets a daemon was still writing when it stopped. Returns their names.
    pub fn remove_incomplete(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.path) else { return Ok(removed) };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(INCOMPLETE) && entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Where a new set of this build's layout goes, and the temporary name it is written under
    /// ([`Self::complete`] renames it). Its generation follows every set pinned now.
    pub fn new_set(&self, existing: &[MapSet]) -> Result<(MapSet, MapSet)> {
        let generation = existing.iter().map(|s| s.generation).max().unwrap_or(0) + 1;
        let name = set_name(LAYOUT_VERSION, generation);
        let done = MapSet { version: LAYOUT_VERSION, generation, dir: self.path.join(&name) };
        let pending = MapSet { dir: self.path.join(format!("{INCOMPLETE}{name}")), ..done.clone() };
        std::fs::create_dir(&pending.dir).with_context(|| format!("creating {}", pending.dir.display()))?;
        Ok((pending, done))
    }

    /// Gives a fully written set its final name: from now on it is a set the next daemon uses.
    pub fn complete(&self, pending: &MapSet, done: &MapSet) -> Result<()> {
        std::fs::rename(&pending.dir, &done.dir)
            .with_context(|| format!("renaming {} to {}", pending.dir.display(), done.dir.display()))
    }

    /// Unpins a map set (its maps live on while a program or daemon still holds them).
    pub fn remove_set(&self, set: &MapSet) -> Result<()> {
        if set.is_legacy() {
            for name in LEGACY_MAPS {
                let path = set.map(name);
                if path.exists() {
                    std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
                }
            }
            return Ok(());
        }
        std::fs::remove_dir_all(&set.dir).with_context(|| format!("removing {}", set.dir.display()))
    }

    /// How `set` fits this build and `sizes`. A map of this layout whose type, key or value
    /// differs from what this build expects is an error: another build claims the same version.
    pub fn fit(&self, set: &MapSet, sizes: &Sizes) -> Result<Fit> {
        if set.version > LAYOUT_VERSION {
            return Ok(Fit::Newer);
        }
        let mut resized = Vec::new();
        for name in set.map_names() {
            let spec = lb_common::layout::map_spec(name).expect("every pinned map has a row in the layout table");
            let info = MapInfo::from_pin(set.map(name)).with_context(|| {
                format!(
                    "{set}: pinned map {name} is missing or unreadable; remove the data plane with `lb detach` \
                     (this drops connection state)"
                )
            })?;
            let found = (info.map_type().ok(), info.key_size(), info.value_size());
            let kind = lb_common::layout::pinned_kind(spec, set.version);
            let wanted = (Some(map_type(kind)), spec.key_size, spec.value_size);
            if found != wanted {
                bail!(
                    "{set}: pinned map {name} has (type, key size, value size) = {found:?}, layout {} needs {wanted:?}: \
                     these pins were not made by a build of this project; remove them with `lb detach` (this drops connection state)",
                    set.version
                );
            }
            let entries = spec.entries.resolve(sizes).unwrap_or(0);
            if set.version == LAYOUT_VERSION && info.max_entries() != entries {
                resized.push(format!("{name} has {} entries, the configuration gives {entries}", info.max_entries()));
            }
        }
        Ok(match (set.version == LAYOUT_VERSION, resized.is_empty()) {
            (false, _) => Fit::Older,
            (true, true) => Fit::Exact,
            (true, false) => Fit::Resized(resized),
        })
    }

    /// Unpins everything (the link, so the program leaves the interface once no daemon holds
    /// it, and every map set). Returns false when there was nothing to remove.
    pub fn remove(&self) -> Result<bool> {
        if !self.path.exists() {
            return Ok(false);
        }
        std::fs::remove_dir_all(&self.path).with_context(|| format!("removing {}", self.path.display()))?;
        Ok(true)
    }
}

/// The kernel map type of a layout row.
pub fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::RingBuf => MapType::RingBuf,
    }
}

fn set_name(version: u32, generation: u32) -> String {
    format!("v{version}-{generation}")
}

/// `v<version>-<generation>` → (version, generation).
fn parse_set_name(name: &str) -> Option<(u32, u32)> {
    let (version, generation) = name.strip_prefix('v')?.split_once('-')?;
    Some((version.parse().ok()?, generation.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names_round_trip_and_others_are_ignored() {
        assert_eq!(parse_set_name(&set_name(2, 7)), Some((2, 7)));
        for other in ["xdp_link", "VIPS", "new-v2-1", "v-1", "v2", "vx-1"] {
            assert_eq!(parse_set_name(other), None, "{other}");
        }
    }
}
