//! The only owner of the XDP program and its maps, exposing domain verbs: load (pinned or not),
//! attach or take over, write backends, publish a VIP's table, forget connections, read counters.

mod bpffs;
pub mod decap;
mod migrate;
mod pinned;
mod pins;
mod probe;
mod ring;
mod start;
mod sweep;

pub use migrate::Carried;
pub use pinned::{Attach, Attachment, MapsOrigin};
pub use pins::{BPFFS_ROOT, MapSet, PinDir};
pub use probe::{ForwardFloor, PassThrough, Sink};
pub use sweep::{SWEEP_EVERY, Sweeper, Swept, next_sweep};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader, Pod};
use lb_common::hash::{flow_hash, placement_hash};
use lb_common::maps::*;
use ring::RingMemory;
use std::os::fd::AsFd;

/// The XDP object, built by `build.rs` from `lb-ebpf` and embedded so `lb` is self-contained.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// The data plane's clock now ([`lb_common::nat::ticks`] of CLOCK_MONOTONIC_COARSE, which is
/// what the program's `bpf_ktime_get_coarse_ns` reads).
pub fn clock_ticks() -> u32 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
    lb_common::nat::ticks(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}

/// How the program is attached to the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// In the driver (XDP native): the fast path.
    Native,
    /// In the generic network stack (XDP SKB): works on any interface.
    Generic,
}

impl AttachMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// The `VIP_ADDRS` entries a published VIP needs: its address, and a NAT VIP's source address.
/// (Every port of the source address: flows of an earlier port range, before a change of
/// `snat_ports` or an upgrade, still have their replies.)
fn implied_addresses(key: &VipKey, meta: &VipMeta) -> Vec<(VipAddrKey, VipAddr)> {
    let address = |addr| VipAddrKey { addr, family: key.family, _pad: [0; 3] };
    let mut out = vec![(address(key.addr), VipAddr::with_flags(VIP_ADDR_VIP))];
    if meta.mode == MODE_NAT {
        out.push((address(meta.snat_addr), VipAddr::with_flags(VIP_ADDR_SNAT)));
    }
    out
}

/// `VIP_ADDRS` as it must be: the daemon's `flags` and what the `vips` imply, one entry per
/// address whatever repeats it (a caller's list, VIPs sharing an address, a NAT VIP's source
/// address that is also a VIP's).
fn address_entries(flags: &[(VipAddrKey, VipAddr)], vips: &[(VipKey, VipMeta)]) -> Vec<(VipAddrKey, VipAddr)> {
    let mut wanted: Vec<(VipAddrKey, VipAddr)> = Vec::new();
    let implied = vips.iter().flat_map(|(key, meta)| implied_addresses(key, meta));
    for (address, entry) in flags.iter().copied().chain(implied) {
        match wanted.iter_mut().find(|(k, _)| *k == address) {
            Some((_, value)) => *value = value.merged(entry),
            None => wanted.push((address, entry)),
        }
    }
    wanted
}

/// Map sizes chosen at load time.
pub use lb_common::layout::Sizes as DataplaneSizes;

/// How a VIP forwards, as published to the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipForwarding {
    /// Slot of the VIP: index of its counters and of its pair of rings.
    pub vip_index: u32,
    pub mode: u8,
    pub snat_addr: [u8; 16],
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Client affinity: the prefix length of the client address that places new flows; `None`
    /// places each connection by its own 5-tuple.
    pub client_affinity: Option<u8>,
    /// `observe`: the daemon watches how backends answer new flows, and a backend's first
    /// refusal of a connection is held back once (`VIP_OBSERVE`).
    pub observe: bool,
}

impl VipForwarding {
    /// The VIP's entry in `VIPS` with its active ring at `ring_offset`.
    pub fn meta(&self, ring_offset: u32, ring_size: u32) -> VipMeta {
        VipMeta {
            vip_index: self.vip_index,
            ring_offset,
            ring_size,
            mode: self.mode,
            flags: if self.client_affinity.is_some() { VIP_AFFINITY_CLIENT } else { 0 }
                | if self.observe { VIP_OBSERVE } else { 0 },
            affinity_prefix: self.client_affinity.unwrap_or(0),
            _pad: 0,
            snat_addr: self.snat_addr,
            snat_port_min: self.snat_port_min,
            snat_port_max: self.snat_port_max,
        }
    }
}

/// Why a flow goes where it goes (`lb explain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowRoute {
    NotAVip,
    ConnectionTable { backend: u32 },
    Maglev { hash: u32, slot: u32, ring_size: u32, backend: Option<u32> },
}

/// The reading end of the program's `NEW_NAT_FLOWS` ring.
pub struct NatFlowReader(RingBuf<MapData>);

impl NatFlowReader {
    /// The NAT flows the program reported since the last call, at most `limit` of them (the
    /// rest wait in the ring). Reads shared memory only: no system call.
    pub fn drain(&mut self, limit: usize) -> Vec<NatFlowRecord> {
        let mut flows = Vec::new();
        while flows.len() < limit {
            let Some(item) = self.0.next() else { break };
            if item.len() >= std::mem::size_of::<NatFlowRecord>() {
                // SAFETY: the program writes whole NatFlowRecords (plain data, any bytes valid).
                flows.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<NatFlowRecord>()) });
            }
        }
        flows
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    sizes: DataplaneSizes,
    rings: RingMemory,
    /// The reading end of `NEW_NAT_FLOWS`, taken out of `ebpf` once and handed to the
    /// replication task by [`Self::report_nat_flows`].
    new_nat_flows: Option<NatFlowReader>,
    /// Where the maps came from; a migration is finished once the program is attached.
    origin: pinned::Origin,
    /// The `VIP_ADDRS` entries the daemon asked for (answering ping); the data plane adds
    /// the VIP and SNAT bits that the VIPs themselves imply.
    address_flags: Vec<(VipAddrKey, VipAddr)>,
}

impl Dataplane {
    /// Loads the embedded program with fresh, unpinned maps (tests, benchmarks).
    pub fn load(sizes: DataplaneSizes) -> Result<Self> {
        Self::load_with(sizes, None)
    }

    fn load_with(sizes: DataplaneSizes, pins: Option<&MapSet>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for spec in &lb_common::layout::MAPS {
            let entries = spec.entries.resolve(&sizes).ok_or_else(|| {
                anyhow!("{}: {:?} entries for {sizes:?} do not fit a BPF map", spec.name, spec.entries)
            })?;
            loader.map_max_entries(spec.name, entries);
        }
        let paths: Vec<(&str, std::path::PathBuf)> = match pins {
            Some(set) => lb_common::layout::pinned_maps().map(|spec| (spec.name, set.map(spec.name))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context("loading the XDP object")?;
        program_mut(&mut ebpf)?.load().context("verifying and loading the XDP program")?;
        let ring_entries = lb_common::layout::Entries::Rings.resolve(&sizes).unwrap_or(0);
        let rings = {
            let map = map(&ebpf, MAP_RINGS)?;
            let data: &MapData = match map {
                Map::Array(data) => data,
                _ => bail!("map {MAP_RINGS} is not an array"),
            };
            RingMemory::map(data.fd().as_fd(), ring_entries)?
        };
        let new_nat_flows = ebpf.take_map(MAP_NEW_NAT_FLOWS).ok_or_else(|| anyhow!("no map {MAP_NEW_NAT_FLOWS}"))?;
        let new_nat_flows = RingBuf::try_from(new_nat_flows).context("opening the new-NAT-flow ring buffer")?;
        let new_nat_flows = Some(NatFlowReader(new_nat_flows));
        let mut dataplane =
            Self { ebpf, sizes, rings, new_nat_flows, origin: pinned::Origin::Unpinned, address_flags: Vec::new() };
        // Pinned VIPs came along: their addresses must pass the program's first lookup before it
        // is attached.
        dataplane.sync_addresses()?;
        Ok(dataplane)
    }

    pub fn sizes(&self) -> DataplaneSizes {
        self.sizes
    }

    /// Attaches to `interface` in the current network namespace; detached when dropped (tests).
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<()> {
        let program = program_mut(&mut self.ebpf)?;
        program
            .attach(interface, mode.xdp_mode())
            .with_context(|| format!("attaching XDP ({mode:?}) to {interface}"))?;
        Ok(())
    }

    /// From now on the program forwards only frames addressed to `mac` (the attached interface's):
    /// frames a switch floods here for another host pass to the kernel untouched.
    pub fn set_own_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        self.update_settings(|s| {
            s.own_mac = mac;
            s.check_mac = 1;
        })
    }

    /// The interface health checks sent via a VIP leave through, and its MAC (their source).
    pub fn set_interface(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        self.update_settings(|s| {
            s.ifindex = ifindex;
            s.own_mac = mac;
        })
    }

    /// Attaches the program that sends health checks via the VIP (`via_vip`) the way client
    /// traffic goes (`lb-ebpf/src/check_path.rs`): on the egress of `interface`, and of `lo`,
    /// where the route to a VIP this host holds itself leads. Attached for as long as this data
    /// plane lives: checks run only while the daemon does.
    pub fn attach_check_path(&mut self, interface: &str) -> Result<()> {
        use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(CHECK_PATH_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {CHECK_PATH_PROGRAM_NAME} missing from the object"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load().context("verifying and loading the health-check path program")?;
        }
        for device in [interface, "lo"] {
            program
                .attach_with_options(device, TcAttachType::Egress, TcAttachOptions::TcxOrder(Default::default()))
                .with_context(|| format!("attaching the health-check path program (tcx egress) to {device}"))?;
        }
        Ok(())
    }

    /// The flow events (`FlowEvent`) counted since the program was loaded, summed over CPUs.
    pub fn flow_events(&self) -> Result<Vec<(FlowEvent, u64)>> {
        let events: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(&self.ebpf, MAP_FLOW_EVENTS)?)?;
        FlowEvent::ALL.iter().map(|&event| Ok((event, events.get(&(event as u32), 0)?.iter().sum()))).collect()
    }

    /// From now on every new NAT flow is also reported: returns the ring's reading end, which
    /// the caller drains (on its own, without holding the rest of the data plane).
    pub fn report_nat_flows(&mut self) -> Result<NatFlowReader> {
        let reader = self.new_nat_flows.take().context("the new-NAT-flow ring is already being read")?;
        self.update_settings(|s| s.report_nat_flows = 1)?;
        Ok(reader)
    }

    /// New NAT flows the program could not report because the ring was full (since this load).
    pub fn nat_flows_lost(&self) -> Result<u64> {
        let lost: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(&self.ebpf, MAP_NAT_FLOWS_LOST)?)?;
        Ok(lost.get(&0, 0)?.iter().sum())
    }

    /// The tunnel modes' outer sources, GUE port and the interface's MTU.
    pub fn set_tunnel(&mut self, sources: &crate::tunnel::TunnelSources, gue_port: u16, mtu: u16) -> Result<()> {
        self.update_settings(|s| {
            sources.apply(s);
            s.gue_port = gue_port.to_be();
            s.mtu = mtu;
        })
    }

    fn update_settings(&mut self, change: impl FnOnce(&mut Settings)) -> Result<()> {
        let mut settings: Array<&mut MapData, Settings> = Array::try_from(map_mut(&mut self.ebpf, MAP_SETTINGS)?)?;
        let mut current = settings.get(&0, 0).context("reading the program's settings")?;
        change(&mut current);
        settings.set(0, current, 0).context("writing the program's settings")?;
        Ok(())
    }

    /// Installs a NAT flow another node created (its backend given as our own slot `backend`),
    /// with both entries stamped `now` ([`lb_common::nat::ticks`]), as an established one.
    /// With `keep_existing`, a flow that already has a connection-table entry is left alone.
    /// Returns whether the flow was installed.
    pub fn adopt_nat_flow(
        &mut self,
        record: &NatFlowRecord,
        backend: u32,
        now: u32,
        keep_existing: bool,
    ) -> Result<bool> {
        if keep_existing {
            let conns: HashMap<&MapData, FlowKey, ConnState> = HashMap::try_from(map(&self.ebpf, MAP_CONNS)?)?;
            if conns.get(&record.flow, 0).is_ok() {
                return Ok(false);
            }
        }
        // Reported at its SYN, the flow is marked half-open; this node never sees the client's
        // next packet go by on the other node, so it counts the flow as established: a port
        // taken from under a live connection would reset it after a takeover.
        let flags = record.conn.flags & !(CONN_HALF_OPEN | CONN_OPENED_IN_FLOOD);
        let conn = ConnState { backend, last_seen: now, flags, ..record.conn };
        let reverse = NatReverse { last_seen: now, ..record.reverse };
        self.insert_nat_reverse(&record.reply, &reverse)?;
        self.insert_connection(&record.flow, &conn)?;
        Ok(true)
    }

    /// Writes a backend's slot. Rings must only name slots written here.
    pub fn set_backend(&mut self, index: u32, backend: &Backend) -> Result<()> {
        let mut backends: Array<&mut MapData, Backend> = Array::try_from(map_mut(&mut self.ebpf, MAP_BACKENDS)?)?;
        backends.set(index, backend, 0).with_context(|| format!("writing backend {index}"))?;
        Ok(())
    }

    pub fn backend(&self, index: u32) -> Result<Backend> {
        let backends: Array<&MapData, Backend> = Array::try_from(map(&self.ebpf, MAP_BACKENDS)?)?;
        Ok(backends.get(&index, 0)?)
    }

    /// Publishes a VIP with a new Maglev table: the table goes into the VIP's inactive ring, then
    /// one update of the VIP's entry switches packets to it, so no packet sees a half-written table.
    pub fn publish_vip(&mut self, key: &VipKey, forwarding: &VipForwarding, table: &[u32]) -> Result<()> {
        let ring_size = self.sizes.ring_size;
        if table.len() != ring_size as usize {
            bail!("Maglev table has {} entries, the data plane expects {ring_size}", table.len());
        }
        if forwarding.vip_index >= self.sizes.max_vips {
            bail!("VIP slot {} is beyond the {} VIP slots", forwarding.vip_index, self.sizes.max_vips);
        }
        let base = forwarding.vip_index * 2 * ring_size;
        let active = self.vip(key)?.map(|meta| meta.ring_offset);
        let inactive = if active == Some(base) { base + ring_size } else { base };
        self.rings.write(inactive, table)?;
        let meta = forwarding.meta(inactive, ring_size);
        // The addresses first: the program looks at a VIP only once its address is known.
        for (address, entry) in implied_addresses(key, &meta) {
            self.add_address(&address, entry)?;
        }
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> = HashMap::try_from(map_mut(&mut self.ebpf, MAP_VIPS)?)?;
        vips.insert(key, meta, 0).context("publishing the VIP")?;
        Ok(())
    }

    /// The table a VIP currently uses.
    pub fn active_table(&self, key: &VipKey) -> Result<Option<Vec<u32>>> {
        let Some(meta) = self.vip(key)? else { return Ok(None) };
        Ok(Some((0..meta.ring_size).map(|i| self.rings.read(meta.ring_offset + i).unwrap_or(NO_BACKEND)).collect()))
    }

    pub fn vip(&self, key: &VipKey) -> Result<Option<VipMeta>> {
        let vips: HashMap<&MapData, VipKey, VipMeta> = HashMap::try_from(map(&self.ebpf, MAP_VIPS)?)?;
        not_found_is_none(vips.get(key, 0))
    }

    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        let vips: HashMap<&MapData, VipKey, VipMeta> = HashMap::try_from(map(&self.ebpf, MAP_VIPS)?)?;
        Ok(vips.iter().collect::<Result<_, _>>()?)
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> = HashMap::try_from(map_mut(&mut self.ebpf, MAP_VIPS)?)?;
        match vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(anyhow::Error::from(e).context("removing the VIP")),
        }
        self.sync_addresses()
    }

    /// Sets the `VIP_ADDRS` flags the daemon decides (answering ping) to exactly `wanted`; the
    /// map then holds those plus the VIP and SNAT bits of the published VIPs.
    pub fn set_vip_addresses(&mut self, wanted: &[(VipAddrKey, VipAddr)]) -> Result<()> {
        self.address_flags = wanted.to_vec();
        self.sync_addresses()
    }

    /// `VIP_ADDRS` as the program sees it.
    pub fn vip_addresses(&self) -> Result<Vec<(VipAddrKey, VipAddr)>> {
        let addrs: HashMap<&MapData, VipAddrKey, VipAddr> = HashMap::try_from(map(&self.ebpf, MAP_VIP_ADDRS)?)?;
        Ok(addrs.iter().collect::<Result<_, _>>()?)
    }

    /// Adds `entry`'s bits (and SNAT ports) to `key`'s entry.
    fn add_address(&mut self, key: &VipAddrKey, entry: VipAddr) -> Result<()> {
        let addrs: HashMap<&mut MapData, VipAddrKey, VipAddr> =
            HashMap::try_from(map_mut(&mut self.ebpf, MAP_VIP_ADDRS)?)?;
        let before = not_found_is_none(addrs.get(key, 0))?;
        let after = before.unwrap_or_default().merged(entry);
        if before != Some(after) {
            self.write_address_filter(&[(*key, after)], false)?;
            let mut addrs: HashMap<&mut MapData, VipAddrKey, VipAddr> =
                HashMap::try_from(map_mut(&mut self.ebpf, MAP_VIP_ADDRS)?)?;
            addrs.insert(key, after, 0).context("writing a VIP address")?;
        }
        Ok(())
    }

    /// Sets the `ADDR_FILTER` flags of `addresses`; with `exact`, clears every other flag.
    /// Flags are set before their entries are written and cleared after they are removed: a
    /// clear flag must never hide an entry, nor keep a VIP's packets from its `VIPS` entry.
    fn write_address_filter(&mut self, addresses: &[(VipAddrKey, VipAddr)], exact: bool) -> Result<()> {
        let mut filter: Array<&mut MapData, u64> = Array::try_from(map_mut(&mut self.ebpf, MAP_ADDR_FILTER)?)?;
        let mut words = vec![0u64; ADDR_FILTER_WORDS as usize];
        for (address, entry) in addresses {
            let (word, shift) = address_filter_slot(&address.addr);
            words[word as usize] |= u64::from(entry.flags & ADDR_FILTER_SLOT_MASK) << shift;
        }
        for (index, wanted) in words.into_iter().enumerate() {
            let index = index as u32;
            let now = filter.get(&index, 0)?;
            let next = if exact { wanted } else { now | wanted };
            if next != now {
                filter.set(index, next, 0).context("writing the address filter")?;
            }
        }
        Ok(())
    }

    /// Makes `VIP_ADDRS` what the published VIPs and the daemon's flags imply: entries are
    /// added or changed first, then the ones no longer wanted removed.
    fn sync_addresses(&mut self) -> Result<()> {
        let wanted = address_entries(&self.address_flags, &self.vips()?);
        self.write_address_filter(&wanted, false)?;
        let mut addrs: HashMap<&mut MapData, VipAddrKey, VipAddr> =
            HashMap::try_from(map_mut(&mut self.ebpf, MAP_VIP_ADDRS)?)?;
        for (key, value) in &wanted {
            if not_found_is_none(addrs.get(key, 0))? != Some(*value) {
                addrs.insert(key, value, 0).context("writing a VIP address")?;
            }
        }
        let stale: Vec<VipAddrKey> =
            addrs.keys().filter_map(|k| k.ok()).filter(|k| !wanted.iter().any(|(w, _)| w == k)).collect();
        for key in stale {
            match addrs.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(anyhow::Error::from(e).context("removing a VIP address")),
            }
        }
        self.write_address_filter(&wanted, true)
    }

    /// Drops the connection-table entries of backend slot `index`: those flows are placed anew
    /// by their next packet. A slot belongs to one VIP, so another VIP's flows to the same
    /// backend address are never touched. Returns how many entries were dropped.
    ///
    /// The NAT reverse entries of those flows stay: they reserve their source ports until the
    /// allocator's rules free them (`lb_common::nat::reclaimable`: a minute for a flow whose
    /// table entry is gone), as long as the backend may still hold the four-tuple in TIME_WAIT.
    /// A port handed to a new flow at once could meet that TIME_WAIT when the backend returns.
    pub fn forget_backend_connections(&mut self, index: u32) -> Result<usize> {
        let mut conns: HashMap<&mut MapData, FlowKey, ConnState> =
            HashMap::try_from(map_mut(&mut self.ebpf, MAP_CONNS)?)?;
        let doomed: Vec<FlowKey> =
            conns.iter().filter_map(Result::ok).filter(|(_, c)| c.backend == index).map(|(k, _)| k).collect();
        Ok(doomed.iter().filter(|key| conns.remove(key).is_ok()).count())
    }

    /// The backend a client flow is pinned to, if any.
    pub fn connection(&self, flow: &FlowKey) -> Result<Option<ConnState>> {
        let conns: HashMap<&MapData, FlowKey, ConnState> = HashMap::try_from(map(&self.ebpf, MAP_CONNS)?)?;
        not_found_is_none(conns.get(flow, 0))
    }

    /// The NAT reverse entry of a backend's replies, if any.
    pub fn nat_reverse(&self, reply: &FlowKey) -> Result<Option<NatReverse>> {
        let nat: HashMap<&MapData, FlowKey, NatReverse> = HashMap::try_from(map(&self.ebpf, MAP_NAT_REV)?)?;
        not_found_is_none(nat.get(reply, 0))
    }

    /// Pins a client flow to a backend, as the data plane would (benchmarks fill the table).
    pub fn insert_connection(&mut self, flow: &FlowKey, state: &ConnState) -> Result<()> {
        let mut conns: HashMap<&mut MapData, FlowKey, ConnState> =
            HashMap::try_from(map_mut(&mut self.ebpf, MAP_CONNS)?)?;
        Ok(conns.insert(flow, state, 0)?)
    }

    /// Writes a NAT reverse entry, as the data plane would (tests age them).
    pub fn insert_nat_reverse(&mut self, reply: &FlowKey, reverse: &NatReverse) -> Result<()> {
        let mut nat: HashMap<&mut MapData, FlowKey, NatReverse> =
            HashMap::try_from(map_mut(&mut self.ebpf, MAP_NAT_REV)?)?;
        Ok(nat.insert(reply, reverse, 0)?)
    }

    /// A sweeper of the connection tables ([`Sweeper`]), to run beside the daemon's loop.
    pub fn sweeper(&self) -> Result<Sweeper> {
        let fd = |name| -> Result<&aya::maps::MapFd> {
            match map(&self.ebpf, name)? {
                Map::HashMap(data) => Ok(data.fd()),
                _ => bail!("map {name} is not a hash map"),
            }
        };
        Sweeper::new(fd(MAP_CONNS)?.as_fd(), fd(MAP_NAT_REV)?.as_fd())
    }

    pub fn connections(&self) -> Result<Vec<(FlowKey, ConnState)>> {
        let conns: HashMap<&MapData, FlowKey, ConnState> = HashMap::try_from(map(&self.ebpf, MAP_CONNS)?)?;
        Ok(conns.iter().collect::<Result<_, _>>()?)
    }

    pub fn nat_reverses(&self) -> Result<Vec<(FlowKey, NatReverse)>> {
        let nat: HashMap<&MapData, FlowKey, NatReverse> = HashMap::try_from(map(&self.ebpf, MAP_NAT_REV)?)?;
        Ok(nat.iter().collect::<Result<_, _>>()?)
    }

    /// The fragmented datagrams whose later fragments the program knows where to send.
    pub fn fragment_routes(&self) -> Result<Vec<(FragKey, FragRoute)>> {
        let frags: HashMap<&MapData, FragKey, FragRoute> = HashMap::try_from(map(&self.ebpf, MAP_FRAGS)?)?;
        Ok(frags.iter().collect::<Result<_, _>>()?)
    }

    /// Where the program sends `flow` (a client flow towards a VIP), and why, following the
    /// program's own rules: connection table first, then the VIP's ring.
    pub fn route(&self, flow: &FlowKey) -> Result<FlowRoute> {
        let mut key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, family: flow.family };
        let meta = match self.vip(&key)? {
            Some(meta) => meta,
            None => {
                key.port = 0;
                match self.vip(&key)? {
                    Some(meta) => meta,
                    None => return Ok(FlowRoute::NotAVip),
                }
            }
        };
        if let Some(conn) = self.connection(flow)?
            && self.backend(conn.backend)?.flags & BACKEND_USABLE != 0
        {
            return Ok(FlowRoute::ConnectionTable { backend: conn.backend });
        }
        let hash = placement_hash(flow, flow_hash(flow), &meta);
        let slot = hash % meta.ring_size.max(1);
        let backend = self.rings.read(meta.ring_offset + slot).filter(|&b| b != NO_BACKEND);
        Ok(FlowRoute::Maglev { hash, slot, ring_size: meta.ring_size, backend })
    }

    /// New flows of VIP slot `vip_index` since the program was loaded, per CPU.
    pub fn vip_new_flows_per_cpu(&self, vip_index: u32) -> Result<Vec<u64>> {
        let stats: PerCpuArray<&MapData, Traffic> = PerCpuArray::try_from(map(&self.ebpf, MAP_STATS_VIP)?)?;
        Ok(stats.get(&vip_index, 0)?.iter().map(|cpu| cpu.new_flows).collect())
    }

    /// Tells the program whether a flood of new flows is on (`Settings::flood`).
    pub fn set_flood(&mut self, flooded: bool) -> Result<()> {
        self.update_settings(|s| s.flood = flooded as u8)
    }

    pub fn vip_traffic(&self, vip_index: u32) -> Result<Traffic> {
        sum_traffic(&self.ebpf, MAP_STATS_VIP, vip_index)
    }

    /// How backend `index` answered new NAT flows, or did not, since the program was loaded
    /// (`observe`).
    pub fn backend_attempts(&self, index: u32) -> Result<Attempts> {
        let observed: PerCpuArray<&MapData, Attempts> = PerCpuArray::try_from(map(&self.ebpf, MAP_OBSERVED)?)?;
        let per_cpu = observed.get(&index, 0)?;
        Ok(per_cpu.iter().fold(Attempts::default(), |sum, a| Attempts {
            refused: sum.refused + a.refused,
            answered: sum.answered + a.answered,
            unanswered: sum.unanswered + a.unanswered,
        }))
    }

    pub fn backend_traffic(&self, index: u32) -> Result<Traffic> {
        sum_traffic(&self.ebpf, MAP_STATS_BACKEND, index)
    }

    /// Packets seen per verdict reason, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>> {
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(&self.ebpf, MAP_STATS_REASON)?)?;
        Reason::ALL.iter().map(|&reason| Ok((reason, stats.get(&(reason as u32), 0)?.iter().sum()))).collect()
    }

    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        Ok(self.reason_counters()?.into_iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| n))
    }

    /// How many instructions the verifier processed to accept the program (the kernel refuses
    /// a program at 1,000,000): the headroom left for new paths.
    pub fn verified_instructions(&self) -> Result<Option<u32>> {
        Ok(self.program()?.info().context("reading the program's info")?.verified_instruction_count())
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> Result<&Xdp> {
        self.ebpf
            .program(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object"))?
            .try_into()
            .context("program type")
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object"))?
        .try_into()
        .context("program type")
}

fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Map> {
    ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn not_found_is_none<V: Pod>(result: Result<V, MapError>) -> Result<Option<V>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn sum_traffic(ebpf: &Ebpf, name: &str, index: u32) -> Result<Traffic> {
    let stats: PerCpuArray<&MapData, Traffic> = PerCpuArray::try_from(map(ebpf, name)?)?;
    Ok(stats.get(&index, 0)?.iter().fold(Traffic::default(), |sum, cpu| Traffic {
        packets: sum.packets + cpu.packets,
        bytes: sum.bytes + cpu.bytes,
        new_flows: sum.new_flows + cpu.new_flows,
    }))
}

#[cfg(test)]
mod tests {
    use super::{EBPF_OBJECT, address_entries};
    use lb_common::layout::{MAPS, MapKind, Sizes};
    use lb_common::maps::*;

    fn address(last: u8) -> VipAddrKey {
        VipAddrKey { addr: [10, 0, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], family: 4, _pad: [0; 3] }
    }

    fn vip(last: u8, port: u16, meta: VipMeta) -> (VipKey, VipMeta) {
        let key = address(last);
        (VipKey { addr: key.addr, port: port.to_be(), proto: 6, family: 4 }, meta)
    }

    /// Every address gets one entry holding every bit asked for it: an address listed twice
    /// (a VIP's TCP and UDP ports answering ping) must not lose the VIP bit to its second copy.
    #[test]
    fn address_entries_merge_every_repetition_of_an_address() {
        let ping = VipAddr::with_flags(VIP_ADDR_ANSWER_PING);
        let flags = [(address(10), ping), (address(10), ping), (address(20), ping)];
        let nat = VipMeta {
            mode: MODE_NAT,
            snat_addr: address(2).addr,
            snat_port_min: 20000,
            snat_port_max: 30000,
            ..Default::default()
        };
        let nat_on_vip = VipMeta {
            mode: MODE_NAT,
            snat_addr: address(10).addr,
            snat_port_min: 40000,
            snat_port_max: 50000,
            ..Default::default()
        };
        let vips = [vip(10, 80, VipMeta::default()), vip(10, 443, nat), vip(30, 80, nat), vip(31, 80, nat_on_vip)];
        let mut got = address_entries(&flags, &vips);
        got.sort_by_key(|(key, _)| key.addr);
        let want = vec![
            (address(2), VipAddr::with_flags(VIP_ADDR_SNAT)),
            (address(10), VipAddr::with_flags(VIP_ADDR_ANSWER_PING | VIP_ADDR_VIP | VIP_ADDR_SNAT)),
            (address(20), ping),
            (address(30), VipAddr::with_flags(VIP_ADDR_VIP)),
            (address(31), VipAddr::with_flags(VIP_ADDR_VIP)),
        ];
        assert_eq!(got, want);
    }

    /// The program declares its maps as the layout table says: name, type, key and value size,
    /// and, for deployment-sized maps, the default sizes.
    #[test]
    fn the_object_declares_every_map_of_the_layout_table() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let mut names: Vec<&str> = object.maps.keys().map(String::as_str).collect();
        names.sort();
        let mut table: Vec<&str> = MAPS.iter().map(|spec| spec.name).collect();
        table.sort();
        assert_eq!(names, table, "maps of the object vs. the layout table");
        for spec in &MAPS {
            let map = &object.maps[spec.name];
            assert_eq!(map.map_type(), spec.kind.bpf_map_type(), "{}: type", spec.name);
            if spec.kind != MapKind::RingBuf {
                assert_eq!((map.key_size(), map.value_size()), (spec.key_size, spec.value_size), "{}", spec.name);
            }
            assert_eq!(Some(map.max_entries()), spec.entries.resolve(&Sizes::default()), "{}: entries", spec.name);
        }
    }
}
