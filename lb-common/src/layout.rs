//! Every BPF map of the XDP object in one table: name, type, key and value size, how many entries
//! it gets, and whether it is pinned. The program declares its maps with the constants used here,
//! the loader sizes them from this table, and the pin check compares pinned maps with it: three
//! users, one source.
//!
//! The pinned maps carry the data plane's state across daemon restarts and upgrades, so their
//! layout is versioned. Any change to a pinned map's row (or a new pinned map) is a new
//! [`LAYOUT_VERSION`], and the daemon must know how to carry state from the version before
//! (`lb-userspace/src/dataplane/migrate.rs`). A host test pins this table's fingerprint to the
//! version, so a change cannot slip through unnoticed.

use crate::decap::{DECAP_VERDICT_SLOTS, DecapSettings, MAP_DECAP_SETTINGS, MAP_DECAP_STATS};
use crate::maps::*;
use core::mem::size_of;

/// The version of the pinned maps' layout this build creates and reads.
///
/// 1: the first release (pins directly in the instance directory, 13 reason counters).
/// 2: pins in a versioned directory; 64 reason slots, so that new reasons need no new layout.
/// 3: `CONNS` and `NAT_REV` are plain hash maps, emptied by the daemon's sweep instead of
///    evicting: a full table never drops an established connection.
pub const LAYOUT_VERSION: u32 = 3;

/// Counter slots in `STATS_REASON`: room for reasons yet to come. [`Reason`] values are
/// appended, never renumbered, so a counter keeps its meaning across versions.
pub const REASON_SLOTS: u32 = 64;
const _: () = assert!(REASON_COUNT <= REASON_SLOTS);

/// The BPF map types the object uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    RingBuf,
}

impl MapKind {
    /// The kernel's `enum bpf_map_type` value.
    pub const fn bpf_map_type(self) -> u32 {
        match self {
            MapKind::Hash => 1,
            MapKind::Array => 2,
            MapKind::PerCpuArray => 6,
            MapKind::LruHash => 9,
            MapKind::RingBuf => 27,
        }
    }
}

/// The sizes a deployment chooses (configuration `max_vips`, `ring_size`, `max_conns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Sizes {
    pub max_vips: u32,
    pub ring_size: u32,
    pub max_conns: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self { max_vips: DEFAULT_MAX_VIPS, ring_size: DEFAULT_RING_SIZE, max_conns: DEFAULT_MAX_CONNS }
    }
}

/// How many entries a map gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entries {
    /// The same in every deployment (for a ring buffer: its size in bytes).
    Fixed(u32),
    /// One per VIP slot.
    PerVip,
    /// Two Maglev rings per VIP slot (the active one and the one being rewritten).
    Rings,
    /// One per tracked connection.
    PerConnection,
}

impl Entries {
    /// The entries for `sizes`; None when they do not fit a map.
    pub const fn resolve(self, sizes: &Sizes) -> Option<u32> {
        match self {
            Entries::Fixed(n) => Some(n),
            Entries::PerVip => Some(sizes.max_vips),
            Entries::Rings => match sizes.max_vips.checked_mul(2) {
                Some(n) => n.checked_mul(sizes.ring_size),
                None => None,
            },
            Entries::PerConnection => Some(sizes.max_conns),
        }
    }
}

/// One map of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub entries: Entries,
    /// Pinned maps outlive the daemon (and are versioned); the others are made afresh with
    /// every load.
    pub pinned: bool,
}

const fn spec(name: &'static str, kind: MapKind, key: usize, value: usize, entries: Entries, pinned: bool) -> MapSpec {
    MapSpec { name, kind, key_size: key as u32, value_size: value as u32, entries, pinned }
}

/// Every map of the XDP object.
pub const MAPS: [MapSpec; 20] = [
    spec(MAP_VIPS, MapKind::Hash, size_of::<VipKey>(), size_of::<VipMeta>(), Entries::PerVip, true),
    spec(MAP_RINGS, MapKind::Array, 4, 4, Entries::Rings, true),
    spec(MAP_BACKENDS, MapKind::Array, 4, size_of::<Backend>(), Entries::Fixed(MAX_BACKENDS), true),
    spec(MAP_CONNS, MapKind::Hash, size_of::<FlowKey>(), size_of::<ConnState>(), Entries::PerConnection, true),
    spec(MAP_NAT_REV, MapKind::Hash, size_of::<FlowKey>(), size_of::<NatReverse>(), Entries::PerConnection, true),
    spec(MAP_STATS_REASON, MapKind::PerCpuArray, 4, 8, Entries::Fixed(REASON_SLOTS), true),
    spec(MAP_STATS_VIP, MapKind::PerCpuArray, 4, size_of::<Traffic>(), Entries::PerVip, true),
    spec(MAP_STATS_BACKEND, MapKind::PerCpuArray, 4, size_of::<Traffic>(), Entries::Fixed(MAX_BACKENDS), true),
    // Written by every daemon before it attaches: nothing to carry over.
    spec(MAP_SETTINGS, MapKind::Array, 4, size_of::<Settings>(), Entries::Fixed(1), false),
    // Drained by the daemon that loaded it; a restart loses at most what was not yet sent.
    spec(MAP_NEW_NAT_FLOWS, MapKind::RingBuf, 0, 0, Entries::Fixed(NEW_NAT_FLOWS_BYTES), false),
    // New NAT flows the ring had no room for, counted from each load (the ring's own lifetime).
    spec(MAP_NAT_FLOWS_LOST, MapKind::PerCpuArray, 4, 8, Entries::Fixed(1), false),
    // Derived from the desired state and written by every daemon before it attaches.
    spec(MAP_VIP_ADDRS, MapKind::Hash, size_of::<VipAddrKey>(), size_of::<VipAddr>(), Entries::PerVip, false),
    // Derived from `VIP_ADDRS`, with it.
    spec(MAP_ADDR_FILTER, MapKind::Array, 4, 8, Entries::Fixed(ADDR_FILTER_WORDS), false),
    // Lives for the milliseconds between a datagram's fragments: a restart loses a few.
    spec(
        MAP_FRAGS,
        MapKind::LruHash,
        size_of::<FragKey>(),
        size_of::<FragRoute>(),
        Entries::Fixed(FRAGS_ENTRIES),
        false,
    ),
    // Scratch: the tunnel a packet is about to leave through (see `TunnelJob`).
    spec(MAP_TUNNEL_JOB, MapKind::PerCpuArray, 4, size_of::<TunnelJob>(), Entries::Fixed(1), false),
    // Counted from each daemon's start (pinning it would need a new layout version).
    spec(MAP_FLOW_EVENTS, MapKind::PerCpuArray, 4, 8, Entries::Fixed(FLOW_EVENT_SLOTS), false),
    // How backends answer new NAT flows (`observe`), counted from each load: the daemon
    // watches changes, not totals.
    spec(MAP_OBSERVED, MapKind::PerCpuArray, 4, size_of::<Attempts>(), Entries::Fixed(MAX_BACKENDS), false),
    // The benchmark sink's counter.
    spec(MAP_SINK_COUNT, MapKind::PerCpuArray, 4, 8, Entries::Fixed(1), false),
    // `lb decap`'s, on backends: pinned by `lb decap attach` in a directory of its own, never
    // by the daemon (the load balancer's copies stay unused).
    spec(MAP_DECAP_SETTINGS, MapKind::Array, 4, size_of::<DecapSettings>(), Entries::Fixed(1), false),
    spec(MAP_DECAP_STATS, MapKind::PerCpuArray, 4, 8, Entries::Fixed(DECAP_VERDICT_SLOTS), false),
];

/// The row of the map called `name`.
pub fn map_spec(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|spec| spec.name == name)
}

/// The type a pinned map has in the older layout `version` (this build's rows hold otherwise
/// for the layouts it migrates from): the connection tables were LRU maps before layout 3.
pub fn pinned_kind(spec: &MapSpec, version: u32) -> MapKind {
    let connection_table = spec.name == MAP_CONNS || spec.name == MAP_NAT_REV;
    if version < 3 && connection_table { MapKind::LruHash } else { spec.kind }
}

/// The pinned maps' rows, in table order.
pub fn pinned_maps() -> impl Iterator<Item = &'static MapSpec> {
    MAPS.iter().filter(|spec| spec.pinned)
}

/// A fingerprint of the pinned maps' layout (FNV-1a over every pinned row), recorded for each
/// [`LAYOUT_VERSION`] by a test.
pub fn pinned_fingerprint() -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash = (hash ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for spec in pinned_maps() {
        feed(spec.name.as_bytes());
        feed(&spec.kind.bpf_map_type().to_le_bytes());
        feed(&spec.key_size.to_le_bytes());
        feed(&spec.value_size.to_le_bytes());
        let (rule, n) = match spec.entries {
            Entries::Fixed(n) => (0u32, n),
            Entries::PerVip => (1, 0),
            Entries::Rings => (2, 0),
            Entries::PerConnection => (3, 0),
        };
        feed(&rule.to_le_bytes());
        feed(&n.to_le_bytes());
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A changed pinned layout needs a new LAYOUT_VERSION and a migration from the previous one.
    /// When this fails: bump LAYOUT_VERSION, teach the daemon's migration the step, record the
    /// new fingerprint here.
    #[test]
    fn the_pinned_layout_matches_its_version() {
        let recorded: &[(u32, u64)] = &[(2, 0x7c95_3afe_26e4_fb8b), (3, 0xdc0d_662d_7124_836b)];
        let fingerprint = pinned_fingerprint();
        let current = recorded.iter().find(|(version, _)| *version == LAYOUT_VERSION);
        assert_eq!(
            current.map(|(_, f)| *f),
            Some(fingerprint),
            "the pinned maps' layout is {fingerprint:#018x}; LAYOUT_VERSION {LAYOUT_VERSION} was recorded as {current:?}"
        );
    }

    #[test]
    fn names_are_unique_and_sizes_resolve() {
        for (i, a) in MAPS.iter().enumerate() {
            assert!(MAPS[i + 1..].iter().all(|b| b.name != a.name), "{} twice", a.name);
            assert!(a.entries.resolve(&Sizes::default()).is_some_and(|n| n > 0), "{}", a.name);
        }
        let huge = Sizes { max_vips: u32::MAX, ..Sizes::default() };
        assert_eq!(Entries::Rings.resolve(&huge), None);
    }

    #[test]
    fn the_connection_tables_were_lru_maps_before_layout_3() {
        for name in [MAP_CONNS, MAP_NAT_REV] {
            let spec = map_spec(name).unwrap();
            assert_eq!((pinned_kind(spec, 2), pinned_kind(spec, 3)), (MapKind::LruHash, MapKind::Hash), "{name}");
        }
        let vips = map_spec(MAP_VIPS).unwrap();
        assert_eq!(pinned_kind(vips, 1), MapKind::Hash);
    }

    #[test]
    fn every_reason_has_a_counter_slot() {
        for reason in Reason::ALL {
            assert!((reason as u32) < REASON_SLOTS);
        }
    }
}
