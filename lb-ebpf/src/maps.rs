//! Every BPF map the program uses, declared in one place. Names, layouts and sizes follow the
//! table in `lb_common::layout` (a host test compares this object with it); the daemon resizes
//! the per-deployment ones at load time.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf};
use lb_common::decap::{DECAP_VERDICT_SLOTS, DecapSettings};
use lb_common::layout::REASON_SLOTS;
use lb_common::maps::{
    ADDR_FILTER_WORDS, Attempts, Backend, ConnState, DEFAULT_MAX_CONNS, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE,
    FLOW_EVENT_SLOTS, FRAGS_ENTRIES, FlowKey, FragKey, FragRoute, MAX_BACKENDS, NEW_NAT_FLOWS_BYTES, NatReverse,
    Settings, Traffic, TunnelJob, VipAddr, VipAddrKey, VipKey, VipMeta,
};

const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// The VIPs' addresses, for what concerns an address rather than a port (answering ping).
#[map(name = "VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<VipAddrKey, VipAddr> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// `VIP_ADDRS`' flags, 4 bits per slot of hashed addresses: most packets for other addresses
/// stop here, and TCP and UDP learn from it which lookup they need.
#[map(name = "ADDR_FILTER")]
pub static ADDR_FILTER: Array<u64> = Array::with_max_entries(ADDR_FILTER_WORDS, 0);

/// Two rings per VIP (active and the one being rewritten), each `ring_size` backend indexes.
/// Memory-mappable, so the daemon writes a whole table with one copy instead of a syscall a slot.
#[map(name = "RINGS")]
pub static RINGS: Array<u32> = Array::with_max_entries(2 * DEFAULT_MAX_VIPS * DEFAULT_RING_SIZE, BPF_F_MMAPABLE);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Client flows and their backends. A plain hash map, not an LRU one: a full table refuses new
/// entries instead of evicting an established connection's; the daemon sweeps out quiet and
/// finished flows (`lb_common::nat::conn_expired`, `port_free`).
#[map(name = "CONNS")]
pub static CONNS: HashMap<FlowKey, ConnState> = HashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// New NAT flows for the standby of a pair (only when `Settings::report_nat_flows` is set).
#[map(name = "NEW_NAT_FLOWS")]
pub static NEW_NAT_FLOWS: RingBuf = RingBuf::with_byte_size(NEW_NAT_FLOWS_BYTES, 0);

/// New NAT flows that found `NEW_NAT_FLOWS` full: the standby will not know them.
#[map(name = "NAT_FLOWS_LOST")]
pub static NAT_FLOWS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// NAT source ports in use, keyed by the backend's reply flow; swept like `CONNS`.
#[map(name = "NAT_REV")]
pub static NAT_REV: HashMap<FlowKey, NatReverse> = HashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

/// Fragmented datagrams whose first fragment was forwarded: where the later ones go.
#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragRoute> = LruHashMap::with_max_entries(FRAGS_ENTRIES, 0);

/// The tunnel the packet in hand is to leave through (scratch, one per CPU).
#[map(name = "TUNNEL_JOB")]
pub static TUNNEL_JOB: PerCpuArray<TunnelJob> = PerCpuArray::with_max_entries(1, 0);

/// `lb_common::maps::FlowEvent` counters.
#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLOW_EVENT_SLOTS, 0);

#[map(name = "STATS_REASON")]
pub static STATS_REASON: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_SLOTS, 0);

#[map(name = "STATS_VIP")]
pub static STATS_VIP: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Frames counted by the `sink` benchmark program.
#[map(name = "SINK_COUNT")]
pub static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "STATS_BACKEND")]
pub static STATS_BACKEND: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// How each backend answered new NAT flows (`observe`), by backend index.
#[map(name = "OBSERVED")]
pub static OBSERVED: PerCpuArray<Attempts> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// `lb decap`'s settings (the GUE port), written before the program is attached.
#[map(name = "DECAP_SETTINGS")]
pub static DECAP_SETTINGS: Array<DecapSettings> = Array::with_max_entries(1, 0);

/// `lb decap`'s packets per verdict (`lb_common::decap::DecapVerdict`).
#[map(name = "DECAP_STATS")]
pub static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_VERDICT_SLOTS, 0);
