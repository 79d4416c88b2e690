//! Data planes pinned the way earlier releases left them, each by its own XDP object kept in
//! `tests/fixtures/` (see the README there): pinned layout 1 (the first release, commit
//! f074581: maps directly in the instance directory) and pinned layout 2 (commit 81ddc37: maps
//! in the set directory `v2-1`, LRU connection tables). Each forwards a desired state exactly as
//! that release's daemon would have published it, its link pinned beside the maps.

use crate::netns::Netns;
use anyhow::{Context, Result, anyhow};
use aya::maps::{Array, HashMap, PerCpuArray};
use aya::programs::{Xdp, XdpMode, links::FdLink};
use lb::dataplane::{DataplaneSizes, PinDir};
use lb::model::DesiredState;
use lb::planner::{Slots, addr16, backend_entry, table_members, vip_key};
use lb_common::maglev::build_table;
use lb_common::maps::*;
use std::net::IpAddr;
use std::path::PathBuf;

/// A release whose pins this build migrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    Layout1,
    Layout2,
}

/// The maps both releases pinned.
const PINNED: [&str; 8] =
    [MAP_VIPS, MAP_RINGS, MAP_BACKENDS, MAP_CONNS, MAP_NAT_REV, MAP_STATS_REASON, MAP_STATS_VIP, MAP_STATS_BACKEND];

impl Release {
    pub fn version(self) -> u32 {
        match self {
            Release::Layout1 => 1,
            Release::Layout2 => 2,
        }
    }

    fn object(self) -> &'static [u8] {
        match self {
            Release::Layout1 => aya::include_bytes_aligned!("../fixtures/lb-ebpf-layout1.o"),
            Release::Layout2 => aya::include_bytes_aligned!("../fixtures/lb-ebpf-layout2.o"),
        }
    }

    /// Where the release pinned its maps.
    pub fn map_dir(self, pins: &PinDir) -> PathBuf {
        match self {
            Release::Layout1 => pins.path().to_path_buf(),
            Release::Layout2 => pins.path().join("v2-1"),
        }
    }
}

/// Loads `release`'s program in `ns`, pins its maps and link for `instance` on `ns`'s eth0,
/// and publishes `state` (every backend healthy, MACs from `mac_of`), with the slots a daemon
/// assigns to a fresh state.
pub fn pin_release(
    release: Release,
    ns: &Netns,
    instance: &str,
    sizes: DataplaneSizes,
    state: &DesiredState,
    mac_of: &(dyn Fn(IpAddr) -> [u8; 6] + Sync),
) -> Result<()> {
    let pins = PinDir::for_instance(instance);
    pins.create()?;
    let map_dir = release.map_dir(&pins);
    std::fs::create_dir_all(&map_dir)?;
    let mut slots = Slots::default();
    slots.assign(state, sizes.max_vips)?;
    ns.enter(|| -> Result<()> {
        let mut loader = aya::EbpfLoader::new();
        let ring_entries = 2 * sizes.max_vips * sizes.ring_size;
        loader
            .map_max_entries(MAP_VIPS, sizes.max_vips)
            .map_max_entries(MAP_STATS_VIP, sizes.max_vips)
            .map_max_entries(MAP_RINGS, ring_entries)
            .map_max_entries(MAP_CONNS, sizes.max_conns)
            .map_max_entries(MAP_NAT_REV, sizes.max_conns);
        let paths: Vec<(&str, PathBuf)> = PINNED.iter().map(|name| (*name, map_dir.join(name))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(release.object()).with_context(|| format!("loading the {release:?} object"))?;
        let mut backends: Array<_, Backend> = Array::try_from(map(&mut ebpf, MAP_BACKENDS)?)?;
        for vip in &state.vips {
            for backend in &vip.backends {
                let index = slots.backend(vip, backend.address).context("backend slot")?;
                backends.set(index, backend_entry(backend, mac_of(backend.address.ip()), true), 0)?;
            }
        }
        for vip in &state.vips {
            let slot = slots.vip(vip).context("VIP slot")?;
            let table = build_table(&table_members(vip, &slots, &|_| true), sizes.ring_size)?;
            let offset = slot * 2 * sizes.ring_size;
            let mut rings: Array<_, u32> = Array::try_from(map(&mut ebpf, MAP_RINGS)?)?;
            for (i, backend) in table.iter().enumerate() {
                rings.set(offset + i as u32, *backend, 0)?;
            }
            let meta = VipMeta {
                vip_index: slot,
                ring_offset: offset,
                ring_size: sizes.ring_size,
                mode: vip.mode.number(),
                flags: 0,
                affinity_prefix: 0,
                _pad: 0,
                snat_addr: vip.snat.map(addr16).unwrap_or([0; 16]),
                snat_port_min: vip.snat_ports.0,
                snat_port_max: vip.snat_ports.1,
            };
            let mut vips: HashMap<_, VipKey, VipMeta> = HashMap::try_from(map(&mut ebpf, MAP_VIPS)?)?;
            vips.insert(vip_key(vip), meta, 0)?;
            if release == Release::Layout2 {
                // Layout 2's program lets through only addresses its daemon wrote here.
                let key = vip_key(vip);
                publish_address(&mut ebpf, key.family, key.addr, VIP_ADDR_VIP)?;
                if vip.mode.number() == MODE_NAT {
                    publish_address(&mut ebpf, key.family, meta.snat_addr, VIP_ADDR_SNAT)?;
                }
            }
        }
        let program: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).context("program")?.try_into()?;
        program.load()?;
        let id = program.attach("eth0", XdpMode::Driver)?;
        FdLink::try_from(program.take_link(id)?)?.pin(pins.link())?;
        Ok(())
    })?
}

/// Layout 2's `VIP_ADDRS` entry and `ADDR_FILTER` bit for an address.
fn publish_address(ebpf: &mut aya::Ebpf, family: u8, addr: [u8; 16], flags: u32) -> Result<()> {
    let key = VipAddrKey { addr, family, _pad: [0; 3] };
    let mut addrs: HashMap<_, VipAddrKey, VipAddr> = HashMap::try_from(map(ebpf, MAP_VIP_ADDRS)?)?;
    let entry = addrs.get(&key, 0).unwrap_or_default().merged(VipAddr::with_flags(flags));
    addrs.insert(key, entry, 0)?;
    let mut filter: Array<_, u64> = Array::try_from(map(ebpf, MAP_ADDR_FILTER)?)?;
    let (word, bit) = layout2_filter_bit(&addr);
    let before = filter.get(&word, 0)?;
    filter.set(word, before | bit, 0)?;
    Ok(())
}

/// Layout 2's `ADDR_FILTER` (256 words): one bit per address slot, set for any address.
fn layout2_filter_bit(addr: &[u8; 16]) -> (u32, u64) {
    let word = |at: usize| u32::from_ne_bytes([addr[at], addr[at + 1], addr[at + 2], addr[at + 3]]);
    let folded = word(0) ^ word(4) ^ word(8) ^ word(12);
    let bit = folded.wrapping_mul(0x9e37_79b1) >> (32 - 14);
    (bit >> 6, 1u64 << (bit & 63))
}

/// Packets the pinned data plane of `release` counted for `reason`, over every CPU.
pub fn release_reason_count(release: Release, instance: &str, reason: Reason) -> Result<u64> {
    let data = aya::maps::MapData::from_pin(release.map_dir(&PinDir::for_instance(instance)).join(MAP_STATS_REASON))?;
    let map = aya::maps::Map::from_map_data(data)?;
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(&map)?;
    Ok(counters.get(&(reason as u32), 0)?.iter().sum())
}

fn map<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("no map {name} in the old object"))
}
