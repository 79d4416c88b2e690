//! The model of the program's ICMP handling (`lb-ebpf/src/icmp.rs`): echo replies, and errors
//! relayed to where the quoted packet's flow goes.

use super::{ModelMaps, Parsed, get16, put16, set_macs};
use crate::csum::{replace_bytes, replace_u16, udp_nonzero};
use crate::hash::{flow_hash, placement_hash};
use crate::maps::*;
use crate::packet::{
    DEFAULT_TTL, ETH_HLEN, Fragment, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, icmp, ipv4, ipv6, is_icmp_error, l4,
};

/// The packet an error quotes: where its headers sit and its flow as it was sent.
struct Quoted {
    ip_off: usize,
    l4_off: usize,
    flow: FlowKey,
}

/// The error's new addresses and the quoted packet's new flow.
struct Translation {
    outer_src: [u8; 16],
    outer_dst: [u8; 16],
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
}

impl ModelMaps {
    pub(super) fn icmp(&mut self, p: &mut Vec<u8>, parsed: &Parsed) -> Result<Reason, Reason> {
        if is_icmp_error(parsed.family, parsed.icmp_type) {
            self.relay_error(p, parsed)
        } else {
            self.answer_ping(p, parsed)
        }
    }

    /// An echo request to an address whose VIPs answer ping becomes the echo reply, in place.
    fn answer_ping(&self, p: &mut [u8], parsed: &Parsed) -> Result<Reason, Reason> {
        let v4 = parsed.family == FAMILY_V4;
        let (request, reply) = if v4 {
            (icmp::ECHO_REQUEST_V4, icmp::ECHO_REPLY_V4)
        } else {
            (icmp::ECHO_REQUEST_V6, icmp::ECHO_REPLY_V6)
        };
        if parsed.icmp_type != request {
            return Err(Reason::PassUnknownL4);
        }
        if !v4 && parsed.l4_off != ETH_HLEN + IPV6_HLEN {
            return Err(Reason::PassIpv6ExtHeader);
        }
        let key = VipAddrKey { addr: parsed.flow.dst, family: parsed.family, _pad: [0; 3] };
        if self.vip_addrs.get(&key).is_none_or(|a| a.flags & VIP_ADDR_ANSWER_PING == 0) {
            return Err(Reason::PassNotVip);
        }
        let at = parsed.l4_off;
        let code = p[at + icmp::CODE];
        let check = replace_u16(
            get16(p, at + icmp::CHECK),
            u16::from_ne_bytes([request, code]),
            u16::from_ne_bytes([reply, code]),
        );
        p[at + icmp::TYPE] = reply;
        put16(p, at + icmp::CHECK, check);
        let (src, dst) = (parsed.flow.src, parsed.flow.dst);
        if v4 {
            let ttl_word = get16(p, ETH_HLEN + ipv4::TTL);
            let new_word = u16::from_ne_bytes([DEFAULT_TTL, p[ETH_HLEN + ipv4::PROTO]]);
            put16(p, ETH_HLEN + ipv4::CHECK, replace_u16(get16(p, ETH_HLEN + ipv4::CHECK), ttl_word, new_word));
            p[ETH_HLEN + ipv4::TTL] = DEFAULT_TTL;
            p[ETH_HLEN + ipv4::SRC..][..4].copy_from_slice(&dst[..4]);
            p[ETH_HLEN + ipv4::DST..][..4].copy_from_slice(&src[..4]);
        } else {
            p[ETH_HLEN + ipv6::HOP_LIMIT] = DEFAULT_TTL;
            p[ETH_HLEN + ipv6::SRC..][..16].copy_from_slice(&dst);
            p[ETH_HLEN + ipv6::DST..][..16].copy_from_slice(&src);
        }
        let client_mac: [u8; 6] = p[6..12].try_into().unwrap();
        set_macs(p, client_mac);
        Ok(Reason::TxPingReply)
    }

    /// Where an error about a VIP flow's packet goes: the flow's backend, or a NAT flow's client.
    fn relay_error(&mut self, p: &mut Vec<u8>, parsed: &Parsed) -> Result<Reason, Reason> {
        let quoted = parse_quoted(p, parsed)?;
        let sent = quoted.flow;
        if parsed.flow.dst != sent.src {
            return Err(Reason::PassIcmpNoFlow);
        }
        let towards_us = FlowKey { src: sent.dst, dst: sent.src, sport: sent.dport, dport: sent.sport, ..sent };
        if let Some(vip) = self.find_vip(&towards_us) {
            let (backend, snat_port) = self.backend_of_flow(&towards_us, &vip).ok_or(Reason::PassIcmpNoFlow)?;
            if vip.mode == MODE_NAT {
                let to = Translation {
                    outer_src: vip.snat_addr,
                    outer_dst: backend.addr,
                    src: backend.addr,
                    sport: if backend.port == 0 { towards_us.dport } else { backend.port },
                    dst: vip.snat_addr,
                    dport: snat_port,
                };
                translate(p, parsed, &quoted, &to);
            } else if is_tunnel(vip.mode) {
                let tunnel = super::tunnel::Tunnel { backend, gue: vip.mode == MODE_GUE, hash: flow_hash(&towards_us) };
                let sent = Reason::TxIcmpToBackend;
                return self.encapsulate(p, parsed.family, parsed.l4_end - ETH_HLEN, &tunnel, sent);
            } else if vip.mode != MODE_DSR {
                return Err(Reason::DropInternal);
            }
            set_macs(p, backend.mac);
            return Ok(Reason::TxIcmpToBackend);
        }
        let reverse = *self.nat_rev.get(&towards_us).ok_or(Reason::PassIcmpNoFlow)?;
        let code = p[parsed.l4_off + icmp::CODE];
        let to = Translation {
            outer_src: reverse.vip_addr,
            outer_dst: reverse.client_addr,
            src: reverse.client_addr,
            sport: reverse.client_port,
            dst: reverse.vip_addr,
            dport: reverse.vip_port,
        };
        translate(p, parsed, &quoted, &to);
        set_macs(p, reverse.client_mac);
        if reverse.awaiting & crate::nat::AWAITING_ANSWER != 0
            && crate::nat::icmp_refuses(parsed.family, parsed.icmp_type, code)
        {
            if let Some(entry) = self.nat_rev.get_mut(&towards_us) {
                entry.awaiting &= !crate::nat::AWAITING_ANSWER;
            }
            // Relayed all the same: the client hears of it at once.
            self.note_answer(&towards_us, &reverse, true);
        }
        Ok(Reason::TxIcmpToClient)
    }

    /// The backend a client flow goes to without placing it: its entry, or for DSR its slot.
    fn backend_of_flow(&self, flow: &FlowKey, vip: &VipMeta) -> Option<(Backend, u16)> {
        if let Some(conn) = self.conns.get(flow)
            && let Some(backend) = self.usable(conn.backend)
        {
            return Some((backend, conn.snat_port));
        }
        if vip.mode == MODE_NAT || vip.ring_size == 0 {
            return None;
        }
        let slot = vip.ring_offset + placement_hash(flow, flow_hash(flow), vip) % vip.ring_size;
        if slot >= self.ring_len {
            return None;
        }
        let index = self.rings.get(&slot).copied().unwrap_or(0);
        Some((self.usable(index)?, 0))
    }
}

/// The quoted IP header and 8 bytes of its TCP/UDP header, within the ICMP message.
fn parse_quoted(p: &[u8], parsed: &Parsed) -> Result<Quoted, Reason> {
    let need = |n: usize| if n <= parsed.l4_end { Ok(()) } else { Err(Reason::PassTruncated) };
    let ip_off = parsed.l4_off + ICMP_HLEN;
    let mut flow = FlowKey { family: parsed.family, ..Default::default() };
    let l4_off = if parsed.family == FAMILY_V4 {
        need(ip_off + IPV4_MIN_HLEN)?;
        let ihl = ((p[ip_off] & 0x0f) as usize) * 4;
        if p[ip_off] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
            return Err(Reason::PassBadHeader);
        }
        if Fragment::of_ipv4(u16::from_be(get16(p, ip_off + ipv4::FRAG))) == Fragment::Later {
            return Err(Reason::PassIcmpNoFlow);
        }
        flow.proto = p[ip_off + ipv4::PROTO];
        flow.src[..4].copy_from_slice(&p[ip_off + ipv4::SRC..][..4]);
        flow.dst[..4].copy_from_slice(&p[ip_off + ipv4::DST..][..4]);
        ip_off + ihl
    } else {
        need(ip_off + 1)?;
        need(ip_off + IPV6_HLEN)?;
        if p[ip_off] >> 4 != 6 {
            return Err(Reason::PassBadHeader);
        }
        flow.proto = p[ip_off + ipv6::NEXT_HEADER];
        flow.src.copy_from_slice(&p[ip_off + ipv6::SRC..][..16]);
        flow.dst.copy_from_slice(&p[ip_off + ipv6::DST..][..16]);
        ip_off + IPV6_HLEN
    };
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return Err(Reason::PassIcmpNoFlow);
    }
    need(l4_off + 8)?;
    flow.sport = get16(p, l4_off + l4::SPORT);
    flow.dport = get16(p, l4_off + l4::DPORT);
    Ok(Quoted { ip_off, l4_off, flow })
}

/// The addresses of `a` as the packet holds them: 4 bytes for IPv4, 16 for IPv6.
fn bytes(a: &[u8; 16], v4: bool) -> &[u8] {
    if v4 { &a[..4] } else { &a[..] }
}

/// Replaces `old` with `new` (4 or 16 bytes) in a checksum.
fn replace(check: u16, old: &[u8], new: &[u8]) -> u16 {
    match (old.len(), new.len()) {
        (4, 4) => replace_bytes::<4>(check, old.try_into().unwrap(), new.try_into().unwrap()),
        _ => replace_bytes::<16>(check, old.try_into().unwrap(), new.try_into().unwrap()),
    }
}

/// The error and its quoted packet rewritten, every checksum updated in the program's order.
fn translate(p: &mut [u8], parsed: &Parsed, quoted: &Quoted, to: &Translation) {
    let v4 = parsed.family == FAMILY_V4;
    let sent = quoted.flow;
    let (old_src, new_src) = (bytes(&sent.src, v4), bytes(&to.src, v4));
    let (old_dst, new_dst) = (bytes(&sent.dst, v4), bytes(&to.dst, v4));
    let check_of_icmp = parsed.l4_off + icmp::CHECK;
    let mut icmp_check = get16(p, check_of_icmp);
    let check_at = quoted.l4_off + if sent.proto == PROTO_TCP { l4::TCP_CHECK } else { l4::UDP_CHECK };
    if check_at + 2 <= parsed.l4_end {
        let old = get16(p, check_at);
        if sent.proto == PROTO_TCP || old != 0 || !v4 {
            let mut new = replace(replace(old, old_src, new_src), old_dst, new_dst);
            new = replace_u16(replace_u16(new, sent.sport, to.sport), sent.dport, to.dport);
            if sent.proto == PROTO_UDP {
                new = udp_nonzero(new);
            }
            put16(p, check_at, new);
            icmp_check = replace_u16(icmp_check, old, new);
        }
    }
    if v4 {
        let old = get16(p, quoted.ip_off + ipv4::CHECK);
        let new = replace(replace(old, old_src, new_src), old_dst, new_dst);
        put16(p, quoted.ip_off + ipv4::CHECK, new);
        icmp_check = replace_u16(icmp_check, old, new);
        p[quoted.ip_off + ipv4::SRC..][..4].copy_from_slice(new_src);
        p[quoted.ip_off + ipv4::DST..][..4].copy_from_slice(new_dst);
    } else {
        p[quoted.ip_off + ipv6::SRC..][..16].copy_from_slice(new_src);
        p[quoted.ip_off + ipv6::DST..][..16].copy_from_slice(new_dst);
    }
    icmp_check = replace(replace(icmp_check, old_src, new_src), old_dst, new_dst);
    put16(p, quoted.l4_off + l4::SPORT, to.sport);
    put16(p, quoted.l4_off + l4::DPORT, to.dport);
    icmp_check = replace_u16(replace_u16(icmp_check, sent.sport, to.sport), sent.dport, to.dport);
    let outer = parsed.flow;
    let (outer_src, outer_dst) = (bytes(&to.outer_src, v4), bytes(&to.outer_dst, v4));
    if v4 {
        let old = get16(p, ETH_HLEN + ipv4::CHECK);
        let new = replace(replace(old, bytes(&outer.src, v4), outer_src), bytes(&outer.dst, v4), outer_dst);
        put16(p, ETH_HLEN + ipv4::CHECK, new);
        p[ETH_HLEN + ipv4::SRC..][..4].copy_from_slice(outer_src);
        p[ETH_HLEN + ipv4::DST..][..4].copy_from_slice(outer_dst);
    } else {
        p[ETH_HLEN + ipv6::SRC..][..16].copy_from_slice(outer_src);
        p[ETH_HLEN + ipv6::DST..][..16].copy_from_slice(outer_dst);
        icmp_check = replace(replace(icmp_check, &outer.src, outer_src), &outer.dst, outer_dst);
    }
    put16(p, check_of_icmp, icmp_check);
}
