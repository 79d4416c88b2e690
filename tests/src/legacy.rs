//! A data plane pinned the way the first release left it (pinned layout 1): its own XDP object,
//! kept in `tests/fixtures/lb-ebpf-layout1.o` (built from commit f074581), with its maps pinned
//! directly in the instance directory and its link pinned beside them, forwarding a desired
//! state exactly as that release's daemon would have published it.

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

/// The first release's XDP object.
static LAYOUT1_OBJECT: &[u8] = aya::include_bytes_aligned!("../fixtures/lb-ebpf-layout1.o");
/// The maps that release pinned.
const LAYOUT1_PINNED: [&str; 8] =
    [MAP_VIPS, MAP_RINGS, MAP_BACKENDS, MAP_CONNS, MAP_NAT_REV, MAP_STATS_REASON, MAP_STATS_VIP, MAP_STATS_BACKEND];

/// Loads the layout-1 program in `ns`, pins its maps and link for `instance` on `ns`'s eth0,
/// and publishes `state` (every backend healthy, MACs from `mac_of`), with the slots a daemon
/// assigns to a fresh state.
pub fn pin_layout1(
    ns: &Netns,
    instance: &str,
    sizes: DataplaneSizes,
    state: &DesiredState,
    mac_of: &(dyn Fn(IpAddr) -> [u8; 6] + Sync),
) -> Result<()> {
    let pins = PinDir::for_instance(instance);
    pins.create()?;
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
        let paths: Vec<(&str, std::path::PathBuf)> =
            LAYOUT1_PINNED.iter().map(|name| (*name, pins.path().join(name))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(LAYOUT1_OBJECT).context("loading the layout-1 object")?;

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
        }
        let program: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).context("program")?.try_into()?;
        program.load()?;
        let id = program.attach("eth0", XdpMode::Driver)?;
        FdLink::try_from(program.take_link(id)?)?.pin(pins.link())?;
        Ok(())
    })?
}

/// Packets the pinned layout-1 data plane counted for `reason`, over every CPU.
pub fn layout1_reason_count(instance: &str, reason: Reason) -> Result<u64> {
    let data = aya::maps::MapData::from_pin(PinDir::for_instance(instance).path().join(MAP_STATS_REASON))?;
    let map = aya::maps::Map::from_map_data(data)?;
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(&map)?;
    Ok(counters.get(&(reason as u32), 0)?.iter().sum())
}

fn map<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("no map {name} in the layout-1 object"))
}
