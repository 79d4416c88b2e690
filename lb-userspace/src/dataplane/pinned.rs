//! The pinned data plane: taking over what a previous daemon left (its maps as they are, or
//! migrated to this build's layout and sizes), and keeping the program on the interface through
//! a pinned link, replaced when it no longer holds the interface.

use super::migrate::{self, Carried, OldMaps};
use super::pins::{BPFFS_ROOT, MapSet, PinDir};
use super::start::{self, Start};
use super::{AttachMode, Dataplane, DataplaneSizes, program_mut};
use anyhow::{Context, Result, bail};
use aya::maps::MapInfo;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use lb_common::maps::MAP_VIPS;
use std::path::Path;

/// Where the maps came from (kept until the program is attached, when a migration finishes).
pub(super) enum Origin {
    /// Not pinned (tests, benchmarks).
    Unpinned,
    New(MapSet),
    Reused(MapSet),
    /// Filled from `from` once; the rest is copied after the new program took over.
    Migrating {
        from: OldMaps,
        to: MapSet,
        why: String,
        carried: Carried,
    },
    Migrated {
        to: MapSet,
        summary: String,
    },
}

/// How the program came to be on the interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attach {
    /// Attached now, link pinned.
    Fresh,
    /// A pinned link held the interface: its program was replaced atomically, no packet saw none.
    TookOver,
    /// The pinned link no longer held the interface (why): removed, and the program attached anew.
    Replaced { stale: String },
}

/// Where the maps' state came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapsOrigin {
    New,
    Reused,
    /// Carried from an older layout or other sizes (what, and why).
    Migrated {
        summary: String,
    },
}

/// What `lb status` says about the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub link: Attach,
    pub maps: MapsOrigin,
}

impl Attachment {
    pub fn describe(&self) -> String {
        let link = match &self.link {
            Attach::Fresh => "attached".to_string(),
            Attach::TookOver => "took over the running data plane".to_string(),
            Attach::Replaced { stale } => format!("attached anew (the pinned link was stale: {stale})"),
        };
        match &self.maps {
            MapsOrigin::Migrated { summary } => format!("{link}; {summary}"),
            MapsOrigin::New | MapsOrigin::Reused => link,
        }
    }
}

/// What opening the pins found.
pub struct Opened {
    /// The maps hold a previous daemon's state (reused or migrated): its slots are meaningful.
    pub carried_state: bool,
    /// What the operator must know (e.g. pins that will not outlive this daemon).
    pub warnings: Vec<String>,
}

impl Dataplane {
    /// Opens the data plane pinned for `pins`' instance: reuses the maps a previous daemon left
    /// when they have this build's layout and `sizes`, migrates them into new maps when not (the
    /// rest of the migration happens in [`Self::attach_pinned`]), and creates them otherwise.
    /// bpffs is mounted when missing.
    pub fn open_pinned(sizes: DataplaneSizes, pins: &PinDir) -> Result<(Self, Opened)> {
        let warnings: Vec<String> = super::bpffs::ensure_mounted(Path::new(BPFFS_ROOT))?.into_iter().collect();
        pins.create()?;
        for name in pins.remove_incomplete()? {
            tracing::warn!(%name, "removed a map set a stopped daemon had not finished writing");
        }
        let sets = pins.map_sets()?;
        let fits = sets.iter().map(|set| Ok((set.clone(), pins.fit(set, &sizes)?))).collect::<Result<Vec<_>>>()?;
        let live = live_set(pins, &sets);
        let decision = start::decide(&fits, live.as_ref())?;
        for leftover in &decision.leftovers {
            tracing::warn!(set = %leftover, "removing a map set an interrupted migration left");
            pins.remove_set(leftover)?;
        }
        let (dataplane, carried_state) = match decision.start {
            Start::Reuse(set) => {
                let mut dataplane = Self::load_with(sizes, Some(&set))?;
                dataplane.origin = Origin::Reused(set);
                (dataplane, true)
            }
            Start::Fresh => {
                let (pending, done) = pins.new_set(&[])?;
                let mut dataplane = Self::load_with(sizes, Some(&pending))?;
                pins.complete(&pending, &done)?;
                dataplane.origin = Origin::New(done);
                (dataplane, false)
            }
            Start::Migrate { from, why } => {
                tracing::info!(from = %from, %why, "migrating the pinned state into new maps");
                let old = OldMaps::open(&from)?;
                let (pending, done) = pins.new_set(&sets)?;
                let mut dataplane = Self::load_with(sizes, Some(&pending))?;
                let carried = migrate::copy_state(&old, &mut dataplane.ebpf)
                    .with_context(|| format!("copying the state of {from}"))?;
                // The VIPs came along: their addresses too, before the program is attached.
                dataplane.sync_addresses()?;
                pins.complete(&pending, &done)?;
                dataplane.origin = Origin::Migrating { from: old, to: done, why, carried };
                (dataplane, true)
            }
        };
        Ok((dataplane, Opened { carried_state, warnings }))
    }

    /// The pinned map set in use.
    pub fn map_set(&self) -> Option<&MapSet> {
        match &self.origin {
            Origin::Unpinned => None,
            Origin::New(set) | Origin::Reused(set) | Origin::Migrated { to: set, .. } => Some(set),
            Origin::Migrating { to, .. } => Some(to),
        }
    }

    /// Puts this program on `interface` for good. A pinned link that holds the interface gets
    /// the new program atomically; a stale one (its interface gone or recreated, renamed, or the
    /// link detached) is removed and the program attached anew. Either way the program stays
    /// attached when this process exits. A pending migration is finished.
    pub fn attach_pinned(&mut self, pins: &PinDir, interface: &str, mode: AttachMode) -> Result<Attachment> {
        let iface = crate::netdev::interface(interface)?;
        let link_path = pins.link();
        let mut link = Attach::Fresh;
        if link_path.exists() {
            match pinned_link_on(&link_path, &iface)? {
                Ok(pinned) => {
                    let program = program_mut(&mut self.ebpf)?;
                    let id = program.attach_to_link(pinned).context("replacing the program in the pinned XDP link")?;
                    // The pin stays the link's only owner, as after a fresh attach: removing it
                    // detaches the program, whether this process still runs or not.
                    drop(program.take_link(id)?);
                    link = Attach::TookOver;
                }
                Err(stale) => {
                    tracing::warn!(%stale, link = %link_path.display(), "the pinned XDP link is stale: removing it and attaching anew");
                    std::fs::remove_file(&link_path)
                        .with_context(|| format!("removing the stale link {}", link_path.display()))?;
                    link = Attach::Replaced { stale };
                }
            }
        }
        if link != Attach::TookOver {
            if let Some(other) = iface.xdp_program() {
                bail!(
                    "{interface} already runs an XDP program this daemon did not attach (id {}, {}): remove it \
                     (`ip link set dev {interface} xdp off`) or configure another interface",
                    other.id,
                    other.name.as_deref().unwrap_or("unnamed")
                );
            }
            let program = program_mut(&mut self.ebpf)?;
            let id = program
                .attach(interface, mode.xdp_mode())
                .with_context(|| format!("attaching XDP ({mode:?}) to {interface}"))?;
            let fd_link = FdLink::try_from(program.take_link(id)?)
                .context("XDP attach did not give a BPF link (kernel older than 5.9?)")?;
            fd_link.pin(&link_path).with_context(|| format!("pinning the XDP link at {}", link_path.display()))?;
        }
        let maps = self.finish_migration(pins)?;
        Ok(Attachment { link, maps })
    }

    /// After the new program took over: copies what the old program added meanwhile and the
    /// final counters, then unpins the old maps.
    fn finish_migration(&mut self, pins: &PinDir) -> Result<MapsOrigin> {
        let origin = std::mem::replace(&mut self.origin, Origin::Unpinned);
        let (from, to, why, mut carried) = match origin {
            Origin::Migrating { from, to, why, carried } => (from, to, why, carried),
            other => {
                let maps = match &other {
                    Origin::Migrated { summary, .. } => MapsOrigin::Migrated { summary: summary.clone() },
                    Origin::Reused(_) => MapsOrigin::Reused,
                    _ => MapsOrigin::New,
                };
                self.origin = other;
                return Ok(maps);
            }
        };
        match migrate::copy_rest(&from, &mut self.ebpf) {
            Ok(rest) => carried += rest,
            // The new program forwards already: losing the last moments of the old maps costs
            // those flows, not the data plane.
            Err(error) => tracing::error!(from = %from.set, "copying the old maps' last changes failed: {error:#}"),
        }
        pins.remove_set(&from.set)?;
        let summary = format!(
            "state migrated from layout {} generation {} ({why}): {} connections, {} NAT entries, {} backends, {} counters",
            from.set.version,
            from.set.generation,
            carried.connections,
            carried.nat_entries,
            carried.backends,
            carried.counters
        );
        tracing::info!(to = %to, "{summary}");
        self.origin = Origin::Migrated { to, summary: summary.clone() };
        Ok(MapsOrigin::Migrated { summary })
    }
}

/// The pinned link, when its program is the one `iface` runs; otherwise why it is stale.
pub(super) fn pinned_link_on(path: &Path, iface: &crate::netdev::Interface) -> Result<Result<XdpLink, String>> {
    let pinned = PinnedLink::from_pin(path).with_context(|| format!("opening the pinned link {}", path.display()))?;
    let fd_link = FdLink::from(pinned);
    let program = fd_link.info().context("reading the pinned link")?.program_id();
    let name = &iface.ifname;
    Ok(match iface.xdp_program() {
        Some(running) if running.id == program => {
            Ok(XdpLink::try_from(fd_link).context("the pinned link is not an XDP link")?)
        }
        Some(running) => Err(format!("{name} runs XDP program {}, not the link's program {program}", running.id)),
        None => Err(format!(
            "the link's program {program} is not on {name}: the interface was removed or recreated, or the link was detached"
        )),
    })
}

/// The map set the pinned link's program uses: the state traffic is using now.
fn live_set(pins: &PinDir, sets: &[MapSet]) -> Option<MapSet> {
    let pinned = PinnedLink::from_pin(pins.link()).ok()?;
    let program_id = FdLink::from(pinned).info().ok()?.program_id();
    let program = aya::programs::loaded_programs().filter_map(Result::ok).find(|p| p.id() == program_id)?;
    let map_ids = program.map_ids().ok()??;
    sets.iter().find(|set| MapInfo::from_pin(set.map(MAP_VIPS)).is_ok_and(|info| map_ids.contains(&info.id()))).cloned()
}
