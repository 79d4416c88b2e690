//! BPF map names, sizes and key/value layouts: the contract between the XDP program and the daemon.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields so that no byte is
//! uninitialised (the kernel compares keys byte by byte) and `aya::Pod` is sound.
//! Addresses are stored as 16 bytes: an IPv4 address occupies the first 4 bytes,
//! the rest are zero. Ports are kept in network byte order, as they sit in the packet.

/// Address family tags stored in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Default Maglev table size (prime), as in the Maglev paper.
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default number of VIP slots; the ring map holds two rings per VIP.
pub const DEFAULT_MAX_VIPS: u32 = 64;
pub const MAX_BACKENDS: u32 = 16384;
pub const DEFAULT_MAX_CONNS: u32 = 1 << 20;

/// Ring entry that means "no usable backend" (drop and count).
pub const NO_BACKEND: u32 = u32::MAX;

/// Map names, as declared in the eBPF object.
pub const MAP_VIPS: &str = "VIPS";
pub const MAP_RINGS: &str = "RINGS";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_CONNS: &str = "CONNS";
pub const MAP_NAT_REV: &str = "NAT_REV";
pub const MAP_STATS_REASON: &str = "STATS_REASON";
pub const MAP_STATS_VIP: &str = "STATS_VIP";
pub const MAP_STATS_BACKEND: &str = "STATS_BACKEND";
pub const MAP_SETTINGS: &str = "SETTINGS";
pub const MAP_NEW_NAT_FLOWS: &str = "NEW_NAT_FLOWS";
pub const MAP_VIP_ADDRS: &str = "VIP_ADDRS";
pub const MAP_ADDR_FILTER: &str = "ADDR_FILTER";
pub const MAP_FRAGS: &str = "FRAGS";
pub const MAP_TUNNEL_JOB: &str = "TUNNEL_JOB";
pub const MAP_FLOW_EVENTS: &str = "FLOW_EVENTS";
pub const MAP_NAT_FLOWS_LOST: &str = "NAT_FLOWS_LOST";
pub const MAP_OBSERVED: &str = "OBSERVED";
/// Datagrams whose first fragment was seen and whose later fragments may still come. Fragments
/// of one datagram arrive within milliseconds: this covers well over 100,000 fragmented
/// datagrams a second, and an evicted entry costs one datagram.
pub const FRAGS_ENTRIES: u32 = 16384;
/// Ring buffer of new NAT flows for the standby: ~30,000 records between two drains.
pub const NEW_NAT_FLOWS_BYTES: u32 = 4 << 20;
/// The XDP program's function name.
pub const PROGRAM_NAME: &str = "lb_xdp";
/// The TC egress program that sends health checks via a VIP (`lb-ebpf/src/check_path.rs`).
pub const CHECK_PATH_PROGRAM_NAME: &str = "lb_hc";
/// A program that passes every frame (see `lb-ebpf/src/floor.rs`).
pub const PASS_PROGRAM_NAME: &str = "lb_pass";
/// Cost floors for benchmarks: XDP_DROP, and a MAC swap with XDP_TX.
pub const FLOOR_DROP_PROGRAM_NAME: &str = "floor_drop";
pub const FLOOR_TX_PROGRAM_NAME: &str = "floor_tx";
/// Counts and drops every frame (benchmark receivers), into `SINK_COUNT`.
pub const SINK_PROGRAM_NAME: &str = "sink";
pub const MAP_SINK_COUNT: &str = "SINK_COUNT";

/// XDP verdicts (uapi `enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// How often the program tries to find a free NAT source port for a new flow. Candidates are
/// pseudo-random, so with a backend's port range a fraction `f` full a new flow fails with
/// probability `f^32`: negligible up to well past half full (8 tries failed ~1 in 10^5 flows at
/// a quarter full). Only collisions pay for further tries.
pub const NAT_PORT_TRIES: u32 = 32;

/// The `attempt`-th candidate source port for a new NAT flow with hash `hash`, in [min, max].
///
/// The hash is re-mixed first: the Maglev slot is `hash % ring_size`, and ports taken from the
/// same bits would give each backend's flows only a small subset of the port range to try.
/// Every attempt is mixed on its own: with a fixed stride between attempts all flows would walk
/// the same sequence of ports, taken ports would cluster as in linear probing, and long runs
/// of them turned new flows away at 40 % occupancy (measured: ~1.5 flows in 10^4).
#[inline(always)]
pub const fn snat_port_candidate(hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let range = (max as u32).saturating_sub(min as u32) + 1;
    // murmur3's fmix32 (a bijection with full avalanche) over a seeded hash and the attempt.
    let h = crate::hash::fmix32(hash ^ 0x9e37_79b9 ^ attempt.wrapping_mul(0x27d4_eb2f));
    min + (h % range) as u16
}

/// The program's own settings, the single entry of `SETTINGS`, written before it is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The attached interface's MAC: with `check_mac`, frames for any other destination are
    /// passed untouched. Also the source MAC of health checks sent via a VIP.
    pub own_mac: [u8; 6],
    /// 0 (unset, e.g. BPF_PROG_TEST_RUN without a daemon): every destination MAC is accepted.
    pub check_mac: u8,
    /// 1 in an active/standby pair: each new NAT flow is also written to `NEW_NAT_FLOWS`, for
    /// the daemon to hand to the standby.
    pub report_nat_flows: u8,
    /// Always 0. The parser mixes it into what it hands on (the TCP/UDP header's offset, and
    /// yes/no facts such as "opens a connection" or "first fragment"), so that the verifier
    /// cannot know them. Every header layout (IPv4 options, IPv6 extension headers, fragments)
    /// and every such fact then reaches the balancing code in one verifier state instead of one
    /// each: with IPv6 extension headers, one state each took the verifier past its limit of
    /// 1,000,000 instructions; hidden, the whole program takes ~712,000 (printed by the test
    /// `the_verifier_accepts_the_program_with_room_to_spare`).
    pub zero: u16,
    /// Tunnel modes: GUE's UDP destination port (network byte order).
    pub gue_port: u16,
    /// The attached interface's MTU: a tunnelled packet that would not fit is answered with
    /// ICMP "fragmentation needed" / "packet too big" instead. 0 (unset): no limit.
    pub mtu: u16,
    /// Tunnel modes: the outer source addresses, a prefix per family whose host bits take the
    /// flow's entropy ([`crate::tunnel::outer_source`]). A prefix length of 0 means none: the
    /// daemon refuses tunnel backends of that family.
    pub tunnel_prefix_v4: u8,
    pub tunnel_prefix_v6: u8,
    pub tunnel_source_v4: [u8; 16],
    pub tunnel_source_v6: [u8; 16],
    /// The attached interface's index: health checks sent via a VIP leave through it (`lb_hc`).
    pub ifindex: u32,
    /// 1 while the daemon sees more new flows per second on some CPU than `[daemon]
    /// flood_new_flows`: DSR and tunnel VIPs record no new flows (the Maglev table still places
    /// them) and NAT flows opened meanwhile give their ports up sooner while half-open
    /// (`CONN_OPENED_IN_FLOOD`, `nat::HALF_OPEN_WAIT_FLOODED`).
    pub flood: u8,
    pub _pad: [u8; 3],
}

/// What happened to flows' table entries, counted per CPU in `FLOW_EVENTS` (not packets: a
/// packet is counted once under its [`Reason`], and may also cause an event).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    /// A NAT source port taken back from a half-open flow (a SYN that nothing followed).
    HalfOpenPortTaken = 0,
    /// A DSR or tunnel flow left unrecorded because the connection table is full (placed by
    /// the Maglev table alone; a `nat` flow is dropped instead, `Reason::DropTableFull`).
    TableFull = 1,
    /// A DSR or tunnel flow left unrecorded during a flood (placed by the Maglev table alone).
    FloodNotRecorded = 2,
}

pub const FLOW_EVENT_SLOTS: u32 = 4;

impl FlowEvent {
    pub const ALL: [FlowEvent; 3] = [FlowEvent::HalfOpenPortTaken, FlowEvent::TableFull, FlowEvent::FloodNotRecorded];

    pub const fn name(self) -> &'static str {
        match self {
            FlowEvent::HalfOpenPortTaken => "half_open_port_taken",
            FlowEvent::TableFull => "table_full",
            FlowEvent::FloodNotRecorded => "flood_not_recorded",
        }
    }
}

/// A new NAT flow, both table entries, as the program reports it in `NEW_NAT_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatFlowRecord {
    /// The client's flow and its `CONNS` entry.
    pub flow: FlowKey,
    pub conn: ConnState,
    /// The backend's reply flow and its `NAT_REV` entry.
    pub reply: FlowKey,
    pub reverse: NatReverse,
}

/// Why a packet got the verdict it got. Indexes `STATS_REASON`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6, or not for a VIP: handed to the kernel untouched.
    PassNotIp = 0,
    PassNotVip = 1,
    PassTruncated = 2,
    PassBadHeader = 3,
    PassFragment = 4,
    PassIpv6ExtHeader = 5,
    PassUnknownL4 = 6,
    /// Forwarded to a backend.
    TxForward = 7,
    /// NAT reply translated back to the client.
    TxNatReply = 8,
    /// VIP has no usable backend.
    DropNoBackend = 9,
    /// NAT: no free source port for this backend.
    DropNatPorts = 10,
    /// Internal inconsistency (map lookup failed for an index published by the daemon).
    DropInternal = 11,
    /// Addressed to another host's MAC (a switch flooded it here): not ours to forward.
    PassOtherHost = 12,
    /// An ICMP echo request to a VIP address, answered by the program.
    TxPingReply = 13,
    /// An ICMP error about a VIP flow, sent to the flow's backend (translated in NAT mode).
    TxIcmpToBackend = 14,
    /// An ICMP error about a NAT flow's packet to its backend, translated for the client.
    TxIcmpToClient = 15,
    /// An ICMP error that quotes no flow of a VIP (or quotes ICMP, or a later fragment).
    PassIcmpNoFlow = 16,
    /// A later fragment (no ports) sent where its datagram's first fragment went.
    TxFragment = 17,
    /// A later fragment to a VIP address whose first fragment was not seen (it comes later, was
    /// lost, or went to another load balancer): the kernel gets it, as it would without us.
    PassFragmentNoFirst = 18,
    /// A packet for a tunnel VIP that would exceed the interface's MTU once encapsulated:
    /// answered with ICMP "fragmentation needed" / ICMPv6 "packet too big".
    TxIcmpTooBig = 19,
    /// As `TxIcmpTooBig`, but too short to quote in the answer (the MTU is below what IPv4
    /// and IPv6 require of a link): dropped.
    DropTooBig = 20,
    /// The backend refused a new connection of a VIP with `observe` (an RST as its first
    /// answer): held back once, so that the client's SYN retransmission gets another chance,
    /// on another backend if the daemon took this one out meanwhile.
    DropRefusalHeld = 21,
    /// A new flow of a `nat` VIP found the connection table (or the NAT table) full: dropped
    /// rather than evicting an established connection. DSR and tunnel flows are forwarded
    /// unrecorded instead (`FlowEvent::TableFull`).
    DropTableFull = 22,
    /// Internal, never counted: the packet is to leave through the tunnel in `TUNNEL_JOB`, and
    /// `lb_xdp` replaces this reason with the job's own once it is sent.
    PendingTunnel = 63,
}

pub const REASON_COUNT: u32 = 23;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassTruncated,
        Reason::PassBadHeader,
        Reason::PassFragment,
        Reason::PassIpv6ExtHeader,
        Reason::PassUnknownL4,
        Reason::TxForward,
        Reason::TxNatReply,
        Reason::DropNoBackend,
        Reason::DropNatPorts,
        Reason::DropInternal,
        Reason::PassOtherHost,
        Reason::TxPingReply,
        Reason::TxIcmpToBackend,
        Reason::TxIcmpToClient,
        Reason::PassIcmpNoFlow,
        Reason::TxFragment,
        Reason::PassFragmentNoFirst,
        Reason::TxIcmpTooBig,
        Reason::DropTooBig,
        Reason::DropRefusalHeld,
        Reason::DropTableFull,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassBadHeader => "pass_bad_header",
            Reason::PassFragment => "pass_fragment",
            Reason::PassIpv6ExtHeader => "pass_ipv6_ext_header",
            Reason::PassUnknownL4 => "pass_unknown_l4",
            Reason::TxForward => "tx_forward",
            Reason::TxNatReply => "tx_nat_reply",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropNatPorts => "drop_nat_ports",
            Reason::DropInternal => "drop_internal",
            Reason::PassOtherHost => "pass_other_host",
            Reason::TxPingReply => "tx_ping_reply",
            Reason::TxIcmpToBackend => "tx_icmp_to_backend",
            Reason::TxIcmpToClient => "tx_icmp_to_client",
            Reason::PassIcmpNoFlow => "pass_icmp_no_flow",
            Reason::TxFragment => "tx_fragment",
            Reason::PassFragmentNoFirst => "pass_fragment_no_first",
            Reason::TxIcmpTooBig => "tx_icmp_too_big",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropRefusalHeld => "drop_refusal_held",
            Reason::DropTableFull => "drop_table_full",
            Reason::PendingTunnel => "pending_tunnel",
        }
    }

    /// The XDP verdict that goes with the reason.
    pub const fn xdp_action(self) -> u32 {
        match self {
            Reason::TxForward
            | Reason::TxNatReply
            | Reason::TxPingReply
            | Reason::TxIcmpToBackend
            | Reason::TxIcmpToClient
            | Reason::TxFragment
            | Reason::TxIcmpTooBig => XDP_TX,
            Reason::DropNoBackend
            | Reason::DropNatPorts
            | Reason::DropInternal
            | Reason::DropTooBig
            | Reason::DropRefusalHeld
            | Reason::DropTableFull
            | Reason::PendingTunnel => XDP_DROP,
            _ => XDP_PASS,
        }
    }
}

/// Forwarding mode of a VIP.
pub const MODE_DSR: u8 = 1;
pub const MODE_NAT: u8 = 2;
/// Tunnel modes: the client's packet, unchanged, inside an outer IP header (`ipip`) or outer
/// IP + UDP + GUE headers (`gue`) towards the backend, which answers the client directly.
pub const MODE_IPIP: u8 = 3;
pub const MODE_GUE: u8 = 4;

/// Whether `mode` sends packets through a tunnel.
#[inline(always)]
pub const fn is_tunnel(mode: u8) -> bool {
    mode == MODE_IPIP || mode == MODE_GUE
}

/// `VIPS` key: (address, port, protocol). Port 0 = any port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `VIPS` value. The daemon publishes a new ring by rewriting the whole value,
/// so a packet sees either the old `ring_offset` or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `STATS_VIP`.
    pub vip_index: u32,
    /// First entry of this VIP's active ring in `RINGS`.
    pub ring_offset: u32,
    pub ring_size: u32,
    pub mode: u8,
    /// `VIP_*` bits.
    pub flags: u8,
    /// With [`VIP_AFFINITY_CLIENT`]: how many leading bits of the client's address place a new
    /// flow (32 or 128 for the address itself). Zero in entries written before this field had
    /// a meaning, together with a zero flag: the layout did not change.
    pub affinity_prefix: u8,
    pub _pad: u8,
    /// NAT mode: the load balancer's source address towards backends.
    pub snat_addr: [u8; 16],
    /// NAT mode: source ports are allocated in [port_min, port_max] (host order).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

/// `VipMeta::flags`: a new flow is placed by its client's address alone (masked to
/// `affinity_prefix`), so that every connection of a client reaches the same backend.
pub const VIP_AFFINITY_CLIENT: u8 = 1;
/// `VipMeta::flags`: the daemon watches how backends answer new flows (`observe`, NAT only);
/// a backend's first refusal of a connection is held back once (see `Reason::DropRefusalHeld`).
pub const VIP_OBSERVE: u8 = 2;

/// `VIP_ADDRS` key: an address the program handles (a VIP's, or a NAT VIP's source address),
/// whatever the ports and protocols. A packet to any other address is passed after one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipAddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `VIP_ADDRS` value: what the program does for the address itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipAddr {
    /// `VIP_ADDR_*` bits.
    pub flags: u32,
}

impl VipAddr {
    pub const fn with_flags(flags: u32) -> Self {
        VipAddr { flags }
    }

    /// Both entries' bits.
    pub const fn merged(self, other: VipAddr) -> VipAddr {
        VipAddr { flags: self.flags | other.flags }
    }
}

/// `ADDR_FILTER`: 4 bits for every slot an address can fall in ([`address_filter_slot`]): the
/// `VIP_ADDRS` flags of every address in that slot, or-ed. Without a hash lookup (an array
/// lookup is a few instructions) they tell the program that a packet's destination is none of
/// those addresses (all clear), and which lookup a TCP or UDP packet needs: `VIPS` for a VIP's
/// address, `NAT_REV` for a NAT VIP's source address. A flag may be another address's in the
/// same slot: the lookup it leads to then finds nothing.
pub const ADDR_FILTER_WORDS: u32 = 1 << (ADDR_FILTER_SLOTS_LOG2 - 4); // 16 slots of 4 bits a word
const ADDR_FILTER_SLOTS_LOG2: u32 = 14;
/// The bits of one slot.
pub const ADDR_FILTER_SLOT_MASK: u32 = 0xf;
const _: () = assert!((VIP_ADDR_ANSWER_PING | VIP_ADDR_VIP | VIP_ADDR_SNAT) & !ADDR_FILTER_SLOT_MASK == 0);

/// Where an address's slot sits in `ADDR_FILTER`: its 32-bit words folded, then a
/// multiplicative hash (Knuth's) whose top bits number the slot. Returns (word, shift).
#[inline(always)]
pub fn address_filter_slot(addr: &[u8; 16]) -> (u32, u32) {
    let word = |at: usize| u32::from_ne_bytes([addr[at], addr[at + 1], addr[at + 2], addr[at + 3]]);
    let folded = word(0) ^ word(4) ^ word(8) ^ word(12);
    let slot = folded.wrapping_mul(0x9e37_79b1) >> (32 - ADDR_FILTER_SLOTS_LOG2);
    (slot >> 4, (slot & 15) * 4)
}

/// `VipAddr::flags`: ICMP echo requests to the address are answered by the program.
pub const VIP_ADDR_ANSWER_PING: u32 = 1;
/// `VipAddr::flags`: some VIP has this address.
pub const VIP_ADDR_VIP: u32 = 2;
/// `VipAddr::flags`: a NAT VIP's source address: backends' replies arrive here.
pub const VIP_ADDR_SNAT: u32 = 4;

/// Backend flags.
pub const BACKEND_USABLE: u8 = 1;

/// `BACKENDS` value, indexed by backend index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Next-hop MAC towards the backend.
    pub mac: [u8; 6],
    /// Network byte order; NAT mode rewrites the destination port to it.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// A flow as seen on the wire, in the direction of the packet. `CONNS` and `NAT_REV` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `CONNS` value: the backend a client flow is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    pub backend: u32,
    /// NAT mode: the allocated source port (network byte order), 0 in DSR mode.
    pub snat_port: u16,
    /// `CONN_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// When the client last sent a packet of this flow ([`crate::nat::ticks`]): NAT source
    /// ports and the daemon's sweep of the table (`crate::nat::conn_expired`) go by it.
    pub last_seen: u32,
}

/// `ConnState::flags`: a NAT flow opened by a SYN whose client has sent nothing else yet (a
/// spoofed SYN never will). Set, rather than an "established" bit, so that entries written
/// before the bit existed count as established.
pub const CONN_HALF_OPEN: u8 = 1;
/// `ConnState::flags`, with `CONN_HALF_OPEN`: the SYN came during a flood (`Settings::flood`),
/// and the flow gives its port up sooner if its client stays silent.
pub const CONN_OPENED_IN_FLOOD: u8 = 2;

/// `NAT_REV` value: how to turn a backend's reply back into the client's flow.
/// Keyed by the reply's FlowKey (backend → snat address:port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverse {
    pub client_addr: [u8; 16],
    pub vip_addr: [u8; 16],
    pub client_port: u16,
    pub vip_port: u16,
    /// Where the client's packet came from on L2: the reply goes back there.
    pub client_mac: [u8; 6],
    /// How the connection has ended so far (`crate::nat::ENDED_*` bits).
    pub ended: u8,
    /// `crate::nat::AWAITING_*` bits: the backend has not answered yet. The byte was padding
    /// before (the layout did not change): entries written by older versions hold 0, "answered",
    /// so their connections are never counted as attempts.
    pub awaiting: u8,
    /// When the backend last sent a packet of this flow ([`crate::nat::ticks`]).
    pub last_seen: u32,
}

/// `OBSERVED` value: how a backend answered new NAT flows, or did not (per CPU, counted from each load of
/// the program). The daemon reads them for VIPs with `observe`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attempts {
    /// The first answer was an RST, or an ICMP destination unreachable (not "fragmentation
    /// needed") quoting the flow.
    pub refused: u64,
    /// The first answer was anything else (a SYN-ACK; for UDP, a datagram).
    pub answered: u64,
    /// No answer: the client sent its SYN again, to the same backend, before the backend
    /// answered the previous one (a host that is down, or drops what it cannot take).
    pub unanswered: u64,
}

/// `FRAGS` key: one fragmented datagram (RFC 791 / RFC 8200 reassembly key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The datagram's identification: 16 bits in IPv4, 32 in IPv6 (as on the wire, network
    /// byte order, IPv4's in the first two bytes).
    pub id: [u8; 4],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `FRAGS` value: what was done with a datagram's first fragment, for its later ones (which
/// carry no ports) to get the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragRoute {
    /// [`FRAG_REWRITE`]: the addresses to write (NAT); otherwise they stay.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub mac: [u8; 6],
    /// `FRAG_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// The counters the first fragment went to: `STATS_VIP` and `STATS_BACKEND` indexes
    /// ([`FRAG_NO_STATS`] for a NAT reply, which counts under neither).
    pub vip_index: u32,
    pub backend: u32,
    /// Tunnel modes: the first fragment's flow hash, so that every fragment of the datagram
    /// gets the same outer source (the same path and the same receive queue).
    pub hash: u32,
}

/// `FragRoute::flags`: the fragments' addresses are rewritten (NAT, both directions).
pub const FRAG_REWRITE: u8 = 1;
/// `FragRoute::flags`: the fragments go through the tunnel to backend `backend` (IPIP, or GUE
/// with [`FRAG_GUE`] too).
pub const FRAG_TUNNEL: u8 = 2;
pub const FRAG_GUE: u8 = 4;
/// `FragRoute::vip_index` of a NAT reply.
pub const FRAG_NO_STATS: u32 = u32::MAX;

/// `TUNNEL_JOB` value (per CPU, one entry): the tunnel a packet is to leave through, as the code
/// that placed it decided, for `lb_xdp` to encapsulate it (or to answer "too big") in a stack
/// frame of its own. Valid only while that packet is handled, when the code that placed it
/// returned [`Reason::PendingTunnel`] (or `TxIcmpTooBig`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelJob {
    /// `BACKENDS` index.
    pub backend: u32,
    /// The flow's hash: the outer source's entropy.
    pub hash: u32,
    /// The [`Reason`] the packet counts under once sent.
    pub sent: u32,
    /// Too big: the largest packet the tunnel carries.
    pub too_big_fits: u16,
    /// 1: GUE, 0: IPIP.
    pub gue: u8,
    /// Not the tunnel's: a SYN of an `observe` VIP whose flow had a refusal held back already
    /// (1), for the entry its port gets. Kept here rather than in a register across the choice
    /// of backend, which the verifier would then follow twice.
    pub refusal_held: u8,
}

/// Per-VIP and per-backend counters (values of per-CPU arrays).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers and byte arrays,
    // with explicit padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::VipAddrKey {}
    unsafe impl aya::Pod for super::VipAddr {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::NatReverse {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::Attempts {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::NatFlowRecord {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragRoute {}
    unsafe impl aya::Pod for super::TunnelJob {}
}

// Layouts are part of the contract with the kernel object: any change must be deliberate.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<VipKey>() == 20);
    assert!(offset_of!(VipKey, port) == 16);
    assert!(size_of::<VipMeta>() == 36);
    assert!(offset_of!(VipMeta, snat_addr) == 16);
    assert!(offset_of!(VipMeta, snat_port_max) == 34);
    assert!(size_of::<Backend>() == 28);
    assert!(offset_of!(Backend, port) == 22);
    assert!(size_of::<FlowKey>() == 40);
    assert!(offset_of!(FlowKey, sport) == 32);
    assert!(size_of::<ConnState>() == 12);
    assert!(size_of::<NatReverse>() == 48);
    assert!(offset_of!(NatReverse, last_seen) == 44);
    assert!(size_of::<Traffic>() == 24);
    assert!(size_of::<Settings>() == 56);
    assert!(size_of::<VipAddr>() == 4);
    assert!(offset_of!(Settings, tunnel_source_v4) == 16);
    assert!(size_of::<NatFlowRecord>() == 140);
    assert!(size_of::<FragKey>() == 40);
    assert!(size_of::<FragRoute>() == 52);
    assert!(size_of::<TunnelJob>() == 16);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Every slot lies inside the filter, on a 4-bit boundary, and addresses spread over them.
    #[test]
    fn address_filter_slots_stay_inside_the_filter() {
        let mut used = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
            let (word, shift) = address_filter_slot(&addr);
            assert!(word < ADDR_FILTER_WORDS && shift <= 60 && shift % 4 == 0, "{word} {shift}");
            used.insert((word, shift));
        }
        // 100,000 addresses over 16,384 slots leave hardly any empty.
        assert!(used.len() > 16_000, "{} slots used", used.len());
    }

    /// The flows of one backend (one Maglev residue class) must be able to use the whole port
    /// range, or NAT runs out of ports long before the range is used.
    #[test]
    fn snat_ports_of_one_backends_flows_cover_the_range() {
        let ring = DEFAULT_RING_SIZE;
        let mut seen = std::vec![false; 65536];
        let mut flows = 0;
        let mut hash: u32 = 1;
        while flows < 200_000 {
            hash = hash.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
            // Only the flows whose slot falls in one backend's 1/64 of the ring.
            if hash % ring < ring / 64 {
                seen[snat_port_candidate(hash, 0, 1024, 65535) as usize] = true;
                flows += 1;
            }
        }
        let covered = seen.iter().filter(|&&s| s).count();
        // 200,000 draws over 64,512 ports cover ~95% of them when uniform.
        assert!(covered > 60_000, "one backend's flows reach only {covered} of 64512 ports");
    }

    #[test]
    fn snat_port_candidates_stay_in_range() {
        for hash in [0u32, 1, 0xffff_ffff, 0x1234_5678] {
            for attempt in 0..NAT_PORT_TRIES {
                let port = snat_port_candidate(hash, attempt, 30000, 30400);
                assert!((30000..=30400).contains(&port));
            }
            assert_eq!(snat_port_candidate(hash, 0, 7, 7), 7);
            let full = snat_port_candidate(hash, 3, 0, 65535);
            let _ = full; // any u16 is in range; must not overflow
        }
    }
}
