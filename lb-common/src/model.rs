//! A host-side reference model of the XDP program: the same rules, written over byte slices and
//! std collections instead of packet pointers and BPF maps. Tests run packets through both and
//! demand identical verdicts, counters and output bytes.
//!
//! It shares with the program only what is meant to be shared (layouts, flow hash and placement,
//! the checksum update formula, the NAT port candidates); parsing, the choice of backend and the
//! ICMP handling (`relay`) and the fragments' routes (`fragment`) are written anew.

use crate::csum::{replace_bytes, replace_u16, udp_nonzero};
use crate::hash::{flow_hash, placement_hash};
use crate::maps::*;
use crate::nat;
use crate::packet::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Fragment, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, MAX_IPV6_EXT_HEADERS, TCP_FLAG_FIN,
    TCP_FLAG_RST, TCP_MIN_HLEN, UDP_HLEN, icmp, icmp_protocol, ipv4, ipv6, ipv6_ext, is_ipv6_extension, l4,
    opens_connection,
};
use std::collections::HashMap;

mod fragment;
mod relay;
mod tunnel;

/// The maps as the model sees them.
#[derive(Clone, Debug, Default)]
pub struct ModelMaps {
    pub vips: HashMap<VipKey, VipMeta>,
    /// Ring entries that were written; an array map reads 0 elsewhere below `ring_len`.
    pub rings: HashMap<u32, u32>,
    pub ring_len: u32,
    pub backends: HashMap<u32, Backend>,
    pub conns: HashMap<FlowKey, ConnState>,
    pub nat_rev: HashMap<FlowKey, NatReverse>,
    pub vip_addrs: HashMap<VipAddrKey, VipAddr>,
    /// How many entries `CONNS` and `NAT_REV` hold at most (plain hash maps: a new key finds
    /// no room in a full one); None: no limit.
    pub table_capacity: Option<usize>,
    /// `FRAGS` (never full in the tests that compare it: no eviction).
    pub frags: HashMap<FragKey, FragRoute>,
    pub reasons: HashMap<u32, u64>,
    /// `OBSERVED`, by backend index.
    pub observed: HashMap<u32, Attempts>,
    /// The `SETTINGS` entry (all zero: no destination MAC check).
    pub settings: Settings,
    /// The program's clock ([`crate::nat::ticks`]) as the test sets it. Tests compare the
    /// kernel's tables with the model's without the timestamps, which follow the kernel's clock.
    pub now: u32,
}

/// What the program does with a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: Reason,
    pub action: u32,
    /// The packet as the program leaves it.
    pub packet: Vec<u8>,
}

struct Parsed {
    family: u8,
    l4_off: usize,
    flow: FlowKey,
    no_l4_checksum: bool,
    opens_connection: bool,
    /// 0 for UDP.
    tcp_flags: u8,
    /// ICMP (of the packet's family): the type; 0 otherwise.
    icmp_type: u8,
    /// Where the IP packet ends (before any padding of the frame).
    l4_end: usize,
    fragment: Fragment,
    frag_id: [u8; 4],
}

impl ModelMaps {
    pub fn process(&mut self, frame: &[u8]) -> Outcome {
        let mut packet = frame.to_vec();
        let reason = self.balance(&mut packet).unwrap_or_else(|reason| reason);
        *self.reasons.entry(reason as u32).or_default() += 1;
        if reason.xdp_action() != XDP_TX {
            // The program writes only once it has decided to forward.
            packet = frame.to_vec();
        }
        Outcome { reason, action: reason.xdp_action(), packet }
    }

    fn balance(&mut self, packet: &mut Vec<u8>) -> Result<Reason, Reason> {
        if self.settings.check_mac != 0 {
            let destination = packet.get(..6).ok_or(Reason::PassTruncated)?;
            if destination != self.settings.own_mac {
                return Err(Reason::PassOtherHost);
            }
        }
        let parsed = parse(packet)?;
        let address = VipAddrKey { addr: parsed.flow.dst, family: parsed.family, _pad: [0; 3] };
        let Some(address) = self.vip_addrs.get(&address).copied() else {
            return Err(if parsed.fragment == Fragment::Later { Reason::PassFragment } else { Reason::PassNotVip });
        };
        let flags = address.flags;
        if parsed.fragment == Fragment::Later {
            return self.later_fragment(packet, &parsed, flags);
        }
        if parsed.flow.proto == icmp_protocol(parsed.family) {
            return self.icmp(packet, &parsed);
        }
        let vip = if flags & VIP_ADDR_VIP != 0 { self.find_vip(&parsed.flow) } else { None };
        let Some(vip) = vip else {
            if flags & VIP_ADDR_SNAT == 0 {
                return Err(Reason::PassNotVip);
            }
            let entry = self.nat_rev.get_mut(&parsed.flow).ok_or(Reason::PassNotVip)?;
            entry.last_seen = self.now;
            if parsed.flow.proto == PROTO_TCP {
                entry.ended = nat::note_segment(entry.ended, parsed.tcp_flags, true);
            }
            let awaiting = entry.awaiting;
            entry.awaiting &= !nat::AWAITING_ANSWER;
            let reverse = *entry;
            if awaiting & nat::AWAITING_ANSWER != 0
                && self.note_answer(&parsed.flow, &reverse, nat::refuses(parsed.tcp_flags))
                && nat::holds_refusal(awaiting)
            {
                self.nat_rev.get_mut(&parsed.flow).expect("just read").awaiting |= nat::REFUSAL_HELD;
                return Err(Reason::DropRefusalHeld);
            }
            rewrite_flow(
                packet,
                &parsed,
                &reverse.vip_addr,
                reverse.vip_port,
                &reverse.client_addr,
                reverse.client_port,
            );
            set_macs(packet, reverse.client_mac);
            if parsed.fragment == Fragment::First {
                self.remember_reply(&parsed, &reverse);
            }
            return Ok(Reason::TxNatReply);
        };
        let client_mac: [u8; 6] = packet[6..12].try_into().unwrap();
        let held_before =
            parsed.opens_connection && vip.flags & VIP_OBSERVE != 0 && self.note_syn_again(&parsed.flow, &vip);
        let (backend, index, snat_port) = self.choose(&parsed, &vip, client_mac)?;
        if held_before && let Some(entry) = self.nat_rev.get_mut(&reply_key(&parsed.flow, &backend, &vip, snat_port)) {
            entry.awaiting |= nat::REFUSAL_HELD;
        }
        let mut hash = 0;
        if vip.mode == MODE_NAT {
            let dport = if backend.port == 0 { parsed.flow.dport } else { backend.port };
            rewrite_flow(packet, &parsed, &vip.snat_addr, snat_port, &backend.addr, dport);
            set_macs(packet, backend.mac);
        } else if is_tunnel(vip.mode) {
            hash = flow_hash(&parsed.flow);
            let tunnel = tunnel::Tunnel { backend, gue: vip.mode == MODE_GUE, hash };
            let sent = self.encapsulate(packet, parsed.family, parsed.l4_end - ETH_HLEN, &tunnel, Reason::TxForward)?;
            if sent != Reason::TxForward {
                return Ok(sent); // answered "too big" instead
            }
        } else if vip.mode == MODE_DSR {
            set_macs(packet, backend.mac);
        } else {
            return Err(Reason::DropInternal);
        }
        if parsed.fragment == Fragment::First {
            self.remember_forward(&parsed, &vip, index, &backend, hash);
        }
        Ok(Reason::TxForward)
    }

    /// A backend's first answer to a NAT flow, counted for the backend its client flow went to
    /// (as long as that flow still holds this reply's source port). Returns whether the answer
    /// is held back: a refusal, for a VIP with `observe`.
    fn note_answer(&mut self, reply: &FlowKey, reverse: &NatReverse, refused: bool) -> bool {
        let client = nat::client_flow(reply, reverse);
        if let Some(conn) = self.conns.get(&client)
            && conn.snat_port == reply.dport
        {
            let attempts = self.observed.entry(conn.backend).or_default();
            if refused {
                attempts.refused += 1;
            } else {
                attempts.answered += 1;
            }
        }
        refused && self.find_vip(&client).is_some_and(|vip| vip.flags & VIP_OBSERVE != 0)
    }

    /// A SYN for a NAT flow that still waits for its backend's first answer: counted as an
    /// attempt that backend left unanswered. Returns whether a refusal of the flow was held
    /// back already.
    fn note_syn_again(&mut self, flow: &FlowKey, vip: &VipMeta) -> bool {
        let Some(conn) = self.conns.get(flow).copied() else { return false };
        let Some(backend) = self.backends.get(&conn.backend) else { return false };
        let Some(reverse) = self.nat_rev.get(&reply_key(flow, backend, vip, conn.snat_port)).copied() else {
            return false;
        };
        if nat::retried_unanswered(&reverse, flow, self.now) {
            self.observed.entry(conn.backend).or_default().unanswered += 1;
        }
        nat::refusal_held_before(&reverse, flow)
    }

    fn find_vip(&self, flow: &FlowKey) -> Option<VipMeta> {
        let key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, family: flow.family };
        self.vips.get(&key).or_else(|| self.vips.get(&VipKey { port: 0, ..key })).copied()
    }

    /// Whether `table` has no room for `key` (a new key in a full table).
    fn full<V>(&self, table: &HashMap<FlowKey, V>, key: &FlowKey) -> bool {
        self.table_capacity.is_some_and(|capacity| table.len() >= capacity && !table.contains_key(key))
    }

    fn usable(&self, index: u32) -> Option<Backend> {
        self.backends.get(&index).filter(|b| b.flags & BACKEND_USABLE != 0).copied()
    }

    /// The backend, its index and the NAT source port (0 in DSR).
    fn choose(&mut self, parsed: &Parsed, vip: &VipMeta, client_mac: [u8; 6]) -> Result<(Backend, u32, u16), Reason> {
        if !parsed.opens_connection
            && let Some(conn) = self.conns.get(&parsed.flow).copied()
            && let Some(backend) = self.usable(conn.backend)
        {
            let entry = self.conns.get_mut(&parsed.flow).expect("just read");
            entry.last_seen = self.now;
            if vip.mode == MODE_NAT {
                entry.flags &= !(CONN_HALF_OPEN | CONN_OPENED_IN_FLOOD);
                if parsed.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
                    let reply = reply_key(&parsed.flow, &backend, vip, conn.snat_port);
                    if let Some(reverse) = self.nat_rev.get_mut(&reply) {
                        reverse.ended = nat::note_segment(reverse.ended, parsed.tcp_flags, false);
                    }
                }
            }
            return Ok((backend, conn.backend, conn.snat_port));
        }
        if vip.ring_size == 0 {
            return Err(Reason::DropInternal);
        }
        let hash = flow_hash(&parsed.flow);
        let slot = vip.ring_offset + placement_hash(&parsed.flow, hash, vip) % vip.ring_size;
        if slot >= self.ring_len {
            return Err(Reason::DropInternal);
        }
        let index = self.rings.get(&slot).copied().unwrap_or(0);
        if index == NO_BACKEND {
            return Err(Reason::DropNoBackend);
        }
        let backend = self.usable(index).ok_or(Reason::DropNoBackend)?;
        let mut snat_port = 0;
        // DSR and tunnels record a TCP flow from the handshake's second packet on.
        if vip.mode != MODE_NAT && parsed.opens_connection {
            if let Some(stale) = self.conns.get_mut(&parsed.flow) {
                stale.backend = index;
            }
            return Ok((backend, index, 0));
        }
        // During a flood DSR and tunnel flows are not recorded at all: the table places them.
        if vip.mode != MODE_NAT && self.settings.flood != 0 {
            return Ok((backend, index, 0));
        }
        if vip.mode == MODE_NAT {
            let reverse = NatReverse {
                client_addr: parsed.flow.src,
                vip_addr: parsed.flow.dst,
                client_port: parsed.flow.sport,
                vip_port: parsed.flow.dport,
                client_mac,
                ended: 0,
                awaiting: nat::AWAITING_ANSWER,
                last_seen: self.now,
            };
            let free = (0..NAT_PORT_TRIES).find_map(|attempt| {
                let port = snat_port_candidate(hash, attempt, vip.snat_port_min, vip.snat_port_max).to_be();
                let reply = reply_key(&parsed.flow, &backend, vip, port);
                let Some(taken) = self.nat_rev.get(&reply) else {
                    return Some(if self.full(&self.nat_rev, &reply) {
                        Err(Reason::DropTableFull)
                    } else {
                        Ok((reply, port, None))
                    });
                };
                // A port still held by a finished or quiet connection goes to this flow.
                let holder = nat::client_flow(&reply, taken);
                let state = self
                    .conns
                    .get(&holder)
                    .filter(|c| c.snat_port == port)
                    .map(|c| nat::Holder { last_seen: c.last_seen, flags: c.flags });
                let pinned = state.is_some().then_some(holder);
                nat::may_take_port(taken, &reverse, parsed.flow.proto, state, self.now)
                    .then_some(Ok((reply, port, pinned)))
            });
            let (reply, port, pinned) = free.ok_or(Reason::DropNatPorts)??;
            if let Some(holder) = pinned {
                // Its late packets must not reach the backend on the new flow's tuple.
                self.conns.remove(&holder);
            }
            self.nat_rev.insert(reply, reverse);
            snat_port = port;
            if self.full(&self.conns, &parsed.flow) {
                self.nat_rev.remove(&reply);
                return Err(Reason::DropTableFull);
            }
        } else if self.full(&self.conns, &parsed.flow) {
            return Ok((backend, index, 0));
        }
        let last_seen = self.now;
        let flags = match (vip.mode == MODE_NAT && parsed.opens_connection, self.settings.flood != 0) {
            (true, true) => CONN_HALF_OPEN | CONN_OPENED_IN_FLOOD,
            (true, false) => CONN_HALF_OPEN,
            (false, _) => 0,
        };
        self.conns.insert(parsed.flow, ConnState { backend: index, snat_port, flags, _pad: 0, last_seen });
        Ok((backend, index, snat_port))
    }
}

/// The key of the backend's replies to a NAT flow: backend → SNAT address and port.
fn reply_key(flow: &FlowKey, backend: &Backend, vip: &VipMeta, snat_port: u16) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: vip.snat_addr,
        sport: if backend.port == 0 { flow.dport } else { backend.port },
        dport: snat_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

fn be16(p: &[u8], at: usize) -> usize {
    u16::from_be_bytes([p[at], p[at + 1]]) as usize
}

/// The flow of a frame as the model parses it, if it has one: for a client's packet the key of
/// its `CONNS` entry, for a backend's reply (or, reversed, for a packet forwarded to a backend)
/// the key of its `NAT_REV` entry.
pub fn flow_of(frame: &[u8]) -> Option<FlowKey> {
    parse(frame).ok().map(|parsed| parsed.flow)
}

fn parse(p: &[u8]) -> Result<Parsed, Reason> {
    let need = |n: usize| if p.len() >= n { Ok(()) } else { Err(Reason::PassTruncated) };
    need(ETH_HLEN)?;
    let mut flow = FlowKey::default();
    let fragment;
    let mut frag_id = [0; 4];
    let (family, l4_off, l4_len) = match be16(p, 12) as u16 {
        ETH_P_IP => {
            need(ETH_HLEN + IPV4_MIN_HLEN)?;
            let ihl = ((p[ETH_HLEN] & 0x0f) as usize) * 4;
            if p[ETH_HLEN] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
                return Err(Reason::PassBadHeader);
            }
            need(ETH_HLEN + ihl)?;
            let total = be16(p, ETH_HLEN + ipv4::TOTAL_LEN);
            if total < ihl {
                return Err(Reason::PassBadHeader);
            }
            need(ETH_HLEN + total)?;
            fragment = Fragment::of_ipv4(be16(p, ETH_HLEN + ipv4::FRAG) as u16);
            if fragment != Fragment::None {
                frag_id[..2].copy_from_slice(&p[ETH_HLEN + ipv4::ID..][..2]);
            }
            flow.proto = p[ETH_HLEN + ipv4::PROTO];
            flow.src[..4].copy_from_slice(&p[ETH_HLEN + ipv4::SRC..][..4]);
            flow.dst[..4].copy_from_slice(&p[ETH_HLEN + ipv4::DST..][..4]);
            (FAMILY_V4, ETH_HLEN + ihl, total - ihl)
        }
        ETH_P_IPV6 => {
            need(ETH_HLEN + IPV6_HLEN)?;
            if p[ETH_HLEN] >> 4 != 6 {
                return Err(Reason::PassBadHeader);
            }
            let payload = be16(p, ETH_HLEN + ipv6::PAYLOAD_LEN);
            need(ETH_HLEN + IPV6_HLEN + payload)?;
            let end = ETH_HLEN + IPV6_HLEN + payload;
            let walked = walk_ipv6_extensions(p, end)?;
            (flow.proto, fragment, frag_id) = (walked.proto, walked.fragment, walked.frag_id);
            flow.src.copy_from_slice(&p[ETH_HLEN + ipv6::SRC..][..16]);
            flow.dst.copy_from_slice(&p[ETH_HLEN + ipv6::DST..][..16]);
            (FAMILY_V6, walked.l4_off, end - walked.l4_off)
        }
        _ => return Err(Reason::PassNotIp),
    };
    flow.family = family;
    let l4_end = l4_off + l4_len;
    let mut parsed = Parsed {
        family,
        l4_off,
        flow,
        no_l4_checksum: false,
        opens_connection: false,
        tcp_flags: 0,
        icmp_type: 0,
        l4_end,
        fragment,
        frag_id,
    };
    if fragment != Fragment::None {
        if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
            return Err(Reason::PassFragment);
        }
        if fragment == Fragment::Later {
            return Ok(parsed);
        }
    }
    if flow.proto == icmp_protocol(family) {
        need(l4_off + ICMP_HLEN)?;
        if l4_len < ICMP_HLEN {
            return Err(Reason::PassTruncated);
        }
        // No ports: an echo request is answered by address alone.
        parsed.icmp_type = p[l4_off + icmp::TYPE];
        return Ok(parsed);
    }
    match flow.proto {
        PROTO_TCP => {
            need(l4_off + TCP_MIN_HLEN)?;
            if l4_len < TCP_MIN_HLEN {
                return Err(Reason::PassTruncated);
            }
            let doff = ((p[l4_off + 12] >> 4) as usize) * 4;
            if doff < TCP_MIN_HLEN || doff > l4_len {
                return Err(Reason::PassBadHeader);
            }
            parsed.tcp_flags = p[l4_off + l4::TCP_FLAGS];
            parsed.opens_connection = opens_connection(parsed.tcp_flags);
        }
        PROTO_UDP => {
            need(l4_off + UDP_HLEN)?;
            if l4_len < UDP_HLEN {
                return Err(Reason::PassTruncated);
            }
            // A first fragment holds only the start of the datagram.
            let udp_len = be16(p, l4_off + l4::UDP_LEN);
            if udp_len < UDP_HLEN || (udp_len > l4_len && fragment == Fragment::None) {
                return Err(Reason::PassBadHeader);
            }
            if p[l4_off + l4::UDP_CHECK] == 0 && p[l4_off + l4::UDP_CHECK + 1] == 0 {
                if family == FAMILY_V6 {
                    return Err(Reason::PassBadHeader);
                }
                parsed.no_l4_checksum = true;
            }
        }
        _ => return Err(Reason::PassUnknownL4),
    }
    parsed.flow.sport = u16::from_ne_bytes([p[l4_off], p[l4_off + 1]]);
    parsed.flow.dport = u16::from_ne_bytes([p[l4_off + 2], p[l4_off + 3]]);
    Ok(parsed)
}

/// What the walk over an IPv6 packet's extension headers found.
struct Ipv6Walk {
    proto: u8,
    l4_off: usize,
    fragment: Fragment,
    frag_id: [u8; 4],
}

/// Hop-by-hop (first only), routing with no segments left, destination options and one fragment
/// header, at most `MAX_IPV6_EXT_HEADERS`; a later fragment stops at its fragment header, a
/// first fragment must have its upper-layer header right after it.
fn walk_ipv6_extensions(p: &[u8], end: usize) -> Result<Ipv6Walk, Reason> {
    let mut walk = Ipv6Walk {
        proto: p[ETH_HLEN + ipv6::NEXT_HEADER],
        l4_off: ETH_HLEN + IPV6_HLEN,
        fragment: Fragment::None,
        frag_id: [0; 4],
    };
    let mut fragment_header = false;
    for walked in 0..MAX_IPV6_EXT_HEADERS {
        if !is_ipv6_extension(walk.proto) || walk.fragment == Fragment::Later {
            break;
        }
        if walk.fragment == Fragment::First {
            return Err(Reason::PassFragment);
        }
        let off = walk.l4_off;
        if p.len() < off + ipv6_ext::MIN_LEN {
            return Err(Reason::PassTruncated);
        }
        if off + ipv6_ext::MIN_LEN > end {
            return Err(Reason::PassBadHeader);
        }
        let extension_len = (p[off + ipv6_ext::LEN] as usize + 1) * 8;
        let len = match walk.proto {
            ipv6_ext::HOP_BY_HOP if walked == 0 => extension_len,
            ipv6_ext::ROUTING if p[off + ipv6_ext::SEGMENTS_LEFT] != 0 => return Err(Reason::PassIpv6ExtHeader),
            ipv6_ext::ROUTING | ipv6_ext::DEST_OPTS => extension_len,
            ipv6_ext::FRAGMENT if !fragment_header => {
                fragment_header = true;
                walk.fragment = Fragment::of_ipv6(be16(p, off + ipv6_ext::FRAG_OFFSET) as u16);
                walk.frag_id.copy_from_slice(&p[off + ipv6_ext::FRAG_ID..][..4]);
                ipv6_ext::MIN_LEN
            }
            ipv6_ext::HOP_BY_HOP | ipv6_ext::FRAGMENT => return Err(Reason::PassBadHeader),
            _ => return Err(Reason::PassIpv6ExtHeader),
        };
        if off + len > end {
            return Err(Reason::PassBadHeader);
        }
        walk.proto = p[off + ipv6_ext::NEXT_HEADER];
        walk.l4_off = off + len;
    }
    if is_ipv6_extension(walk.proto) && walk.fragment != Fragment::Later {
        return Err(Reason::PassIpv6ExtHeader);
    }
    Ok(walk)
}

fn set_macs(p: &mut [u8], next_hop: [u8; 6]) {
    let ours: [u8; 6] = p[0..6].try_into().unwrap();
    p[6..12].copy_from_slice(&ours);
    p[0..6].copy_from_slice(&next_hop);
}

fn get16(p: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([p[at], p[at + 1]])
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

fn rewrite_flow(p: &mut [u8], parsed: &Parsed, src: &[u8; 16], sport: u16, dst: &[u8; 16], dport: u16) {
    let from = parsed.flow;
    let check_at = parsed.l4_off + if from.proto == PROTO_TCP { l4::TCP_CHECK } else { l4::UDP_CHECK };
    let mut check = get16(p, check_at);
    fragment::set_addresses(p, parsed, src, dst);
    check = if parsed.family == FAMILY_V4 {
        let v4 = |a: &[u8; 16]| -> [u8; 4] { a[..4].try_into().unwrap() };
        replace_bytes(replace_bytes(check, &v4(&from.src), &v4(src)), &v4(&from.dst), &v4(dst))
    } else {
        replace_bytes(replace_bytes(check, &from.src, src), &from.dst, dst)
    };
    check = replace_u16(replace_u16(check, from.sport, sport), from.dport, dport);
    put16(p, parsed.l4_off + l4::SPORT, sport);
    put16(p, parsed.l4_off + l4::DPORT, dport);
    if !parsed.no_l4_checksum {
        put16(p, check_at, if from.proto == PROTO_TCP { check } else { udp_nonzero(check) });
    }
}
