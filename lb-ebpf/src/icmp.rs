//! ICMP: echo requests to a VIP's address are answered here, so that operators can ping a VIP;
//! errors that quote a packet of a VIP's flow (unreachable, fragmentation needed / packet too
//! big, time exceeded) go where that flow goes, translated in NAT mode, through the tunnel in
//! the tunnel modes; the rest passes to the kernel.

use crate::balance::{backend_of_flow, port_towards};
use crate::maps::NAT_REV;
use crate::parse::{Packet, field, l4_header, ptr_at, read, set_field, write};
use crate::rewrite::set_macs;
use crate::tunnel;
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::csum::{replace_bytes, replace_u16, udp_nonzero};
use lb_common::hash::flow_hash;
use lb_common::maps::{
    FAMILY_V4, FlowKey, MODE_DSR, MODE_GUE, MODE_IPIP, MODE_NAT, PROTO_TCP, PROTO_UDP, Reason, TunnelJob,
    VIP_ADDR_ANSWER_PING, VIP_ADDR_VIP,
};
use lb_common::nat::{AWAITING_ANSWER, icmp_refuses};
use lb_common::packet::{
    DEFAULT_TTL, ETH_HLEN, Fragment, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, icmp, ipv4, ipv6, is_icmp_error, l4,
};

/// ICMP of the packet's family, parsed up to its 8-byte header, to an address with
/// `address_flags` (its `VIP_ADDRS` entry's). Returns a plain `Reason` (see `balance` in
/// main.rs).
#[inline(never)]
pub fn handle(ctx: &XdpContext, packet: &Packet, address_flags: u32, job: &mut TunnelJob) -> Reason {
    let verdict = if is_icmp_error(packet.family, packet.icmp_type) {
        relay_error(ctx, packet, job)
    } else {
        answer_ping(ctx, packet, address_flags)
    };
    match verdict {
        Ok(reason) | Err(reason) => reason,
    }
}

/// Turns an echo request to a VIP address that answers ping into its echo reply, in place:
/// type, addresses and MACs swapped, a fresh TTL. Swapping the addresses changes no checksum
/// (ICMPv6's pseudo-header sums them in either order).
#[inline(always)]
fn answer_ping(ctx: &XdpContext, packet: &Packet, address_flags: u32) -> Result<Reason, Reason> {
    let v4 = packet.family == FAMILY_V4;
    let (request, reply) =
        if v4 { (icmp::ECHO_REQUEST_V4, icmp::ECHO_REPLY_V4) } else { (icmp::ECHO_REQUEST_V6, icmp::ECHO_REPLY_V6) };
    if packet.icmp_type != request {
        return Err(Reason::PassUnknownL4);
    }
    // The reply would carry the request's extension headers back: the kernel answers those.
    if !v4 && packet.l4_off != ETH_HLEN + IPV6_HLEN {
        return Err(Reason::PassIpv6ExtHeader);
    }
    if address_flags & VIP_ADDR_ANSWER_PING == 0 {
        return Err(Reason::PassNotVip);
    }
    let header = l4_header::<ICMP_HLEN>(ctx, packet)?;
    // SAFETY: type, code and checksum are inside the 8 checked bytes.
    unsafe {
        let code: u8 = field(header, icmp::CODE);
        let check: u16 = field(header, icmp::CHECK);
        let check = replace_u16(check, u16::from_ne_bytes([request, code]), u16::from_ne_bytes([reply, code]));
        set_field(header, icmp::TYPE, reply);
        set_field(header, icmp::CHECK, check);
    }
    if v4 {
        let ttl_proto: [u8; 2] = read(ctx, ETH_HLEN + ipv4::TTL)?;
        let ip_check: u16 = read(ctx, ETH_HLEN + ipv4::CHECK)?;
        let fresh = [DEFAULT_TTL, ttl_proto[1]];
        let ip_check = replace_u16(ip_check, u16::from_ne_bytes(ttl_proto), u16::from_ne_bytes(fresh));
        write(ctx, ETH_HLEN + ipv4::TTL, fresh)?;
        write(ctx, ETH_HLEN + ipv4::CHECK, ip_check)?;
        // Swapped within the frame: copies of `packet.flow`'s bytes would be kept in registers
        // across the writes above, and spill into a frame on the longest call chain.
        let (from, to): ([u8; 4], [u8; 4]) = (read(ctx, ETH_HLEN + ipv4::SRC)?, read(ctx, ETH_HLEN + ipv4::DST)?);
        write(ctx, ETH_HLEN + ipv4::SRC, to)?;
        write(ctx, ETH_HLEN + ipv4::DST, from)?;
    } else {
        write(ctx, ETH_HLEN + ipv6::HOP_LIMIT, DEFAULT_TTL)?;
        write(ctx, ETH_HLEN + ipv6::SRC, packet.flow.dst)?;
        write(ctx, ETH_HLEN + ipv6::DST, packet.flow.src)?;
    }
    let client_mac: [u8; 6] = read(ctx, 6)?;
    set_macs(ctx, client_mac)?;
    Ok(Reason::TxPingReply)
}

/// The packet an ICMP error quotes, as it was sent: where its headers sit and its flow.
struct Quoted {
    ip_off: usize,
    l4_off: usize,
    flow: FlowKey,
}

/// `T` at `offset` of the ICMP message: inside the IP packet (not a frame's padding after it)
/// as well as inside the frame.
#[inline(always)]
fn quoted_ptr<T>(ctx: &XdpContext, packet: &Packet, offset: usize) -> Result<*mut T, Reason> {
    if offset + size_of::<T>() > packet.l4_end {
        return Err(Reason::PassTruncated);
    }
    ptr_at(ctx, offset)
}

#[inline(always)]
fn read_quoted<T: Copy>(ctx: &XdpContext, packet: &Packet, offset: usize) -> Result<T, Reason> {
    // SAFETY: quoted_ptr checked the bytes.
    Ok(unsafe { quoted_ptr::<T>(ctx, packet, offset)?.read_unaligned() })
}

/// Parses the quoted IP header and the first 8 bytes of its TCP or UDP header (all that RFC 792
/// promises) into `quoted` (owned by the caller: a separate frame keeps the stack small). The
/// same checks as `lb_common::model`, in the same order.
#[inline(never)]
fn parse_quoted(ctx: &XdpContext, packet: &Packet, out: &mut Quoted) -> Result<(), Reason> {
    let ip_off = packet.l4_off + ICMP_HLEN;
    let flow = &mut out.flow;
    flow.family = packet.family;
    let l4_off = if packet.family == FAMILY_V4 {
        quoted_ptr::<[u8; IPV4_MIN_HLEN]>(ctx, packet, ip_off)?;
        let version_ihl: u8 = read(ctx, ip_off + ipv4::VERSION_IHL)?;
        let ihl = ((version_ihl & 0x0f) as usize) * 4;
        if version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
            return Err(Reason::PassBadHeader);
        }
        // A later fragment carries no ports: nothing tells its flow.
        if Fragment::of_ipv4(u16::from_be(read::<u16>(ctx, ip_off + ipv4::FRAG)?)) == Fragment::Later {
            return Err(Reason::PassIcmpNoFlow);
        }
        flow.proto = read(ctx, ip_off + ipv4::PROTO)?;
        let src: [u8; 4] = read(ctx, ip_off + ipv4::SRC)?;
        let dst: [u8; 4] = read(ctx, ip_off + ipv4::DST)?;
        flow.src[..4].copy_from_slice(&src);
        flow.dst[..4].copy_from_slice(&dst);
        ip_off + ihl
    } else {
        let first: u8 = read_quoted(ctx, packet, ip_off)?;
        quoted_ptr::<[u8; IPV6_HLEN]>(ctx, packet, ip_off)?;
        if first >> 4 != 6 {
            return Err(Reason::PassBadHeader);
        }
        flow.proto = read(ctx, ip_off + ipv6::NEXT_HEADER)?;
        flow.src = read(ctx, ip_off + ipv6::SRC)?;
        flow.dst = read(ctx, ip_off + ipv6::DST)?;
        ip_off + IPV6_HLEN
    };
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return Err(Reason::PassIcmpNoFlow);
    }
    let ports: [u16; 4] = read_quoted(ctx, packet, l4_off)?;
    flow.sport = ports[0];
    flow.dport = ports[1];
    out.ip_off = ip_off;
    out.l4_off = l4_off;
    Ok(())
}

/// An ICMP error about a packet that a VIP's flow sent: to the VIP's backend when the packet
/// went to the client (sent from the VIP, by a DSR backend or translated by us), to the client
/// when it was a NAT flow's packet to its backend (sent from the SNAT address). The error must
/// be addressed to the quoted packet's source, as routers address them.
#[inline(always)]
fn relay_error(ctx: &XdpContext, packet: &Packet, job: &mut TunnelJob) -> Result<Reason, Reason> {
    let mut quoted = Quoted {
        ip_off: 0,
        l4_off: 0,
        flow: FlowKey { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0, family: 0, _pad: [0; 2] },
    };
    parse_quoted(ctx, packet, &mut quoted)?;
    let quoted = quoted;
    let sent = &quoted.flow;
    if packet.flow.dst != sent.src {
        return Err(Reason::PassIcmpNoFlow);
    }
    // The flow in the direction towards us: a client's flow to a VIP, or a backend's replies.
    let towards_us = FlowKey {
        src: sent.dst,
        dst: sent.src,
        sport: sent.dport,
        dport: sent.sport,
        proto: sent.proto,
        family: sent.family,
        _pad: [0; 2],
    };
    if let Some(vip) = crate::find_vip(&towards_us, VIP_ADDR_VIP) {
        let (index, backend, snat_port) = backend_of_flow(&towards_us, vip).ok_or(Reason::PassIcmpNoFlow)?;
        match vip.mode {
            MODE_DSR => {}
            MODE_IPIP | MODE_GUE => {
                // Inside the tunnel, as the flow's own packets go (the same outer source too).
                let gue = vip.mode == MODE_GUE;
                tunnel::check_fits(packet, backend.family, gue, true, job)?;
                return Ok(tunnel::hand_over(job, index, gue, flow_hash(&towards_us), Reason::TxIcmpToBackend));
            }
            MODE_NAT => {
                let to = Translation {
                    src: &backend.addr,
                    sport: port_towards(backend, towards_us.dport),
                    dst: &vip.snat_addr,
                    dport: snat_port,
                };
                translate(ctx, packet, &quoted, &to)?;
            }
            _ => return Err(Reason::DropInternal),
        }
        set_macs(ctx, backend.mac)?;
        return Ok(Reason::TxIcmpToBackend);
    }
    let Some(reverse) = NAT_REV.get_ptr_mut(&towards_us) else {
        return Err(Reason::PassIcmpNoFlow);
    };
    // SAFETY: a map value pointer stays valid for the program's run.
    let reverse = unsafe { &mut *reverse };
    let code: u8 = read(ctx, packet.l4_off + icmp::CODE)?;
    let to = Translation {
        src: &reverse.client_addr,
        sport: reverse.client_port,
        dst: &reverse.vip_addr,
        dport: reverse.vip_port,
    };
    translate(ctx, packet, &quoted, &to)?;
    set_macs(ctx, reverse.client_mac)?;
    if reverse.awaiting & AWAITING_ANSWER != 0 && icmp_refuses(packet.family, packet.icmp_type, code) {
        // The backend (or a router before it) refused the connection (`observe`).
        reverse.awaiting &= !AWAITING_ANSWER;
        crate::observe::note_answer(&towards_us, reverse, true);
    }
    Ok(Reason::TxIcmpToClient)
}

/// The quoted packet's flow once translated. The error itself then comes from that packet's
/// destination and goes to its source, as a router addresses an error about it.
struct Translation<'a> {
    src: &'a [u8; 16],
    sport: u16,
    dst: &'a [u8; 16],
    dport: u16,
}

/// Rewrites the error and the packet it quotes, with every checksum kept right by incremental
/// updates: the quoted TCP/UDP checksum (when quoted), the quoted IPv4 header's, the ICMP
/// checksum over all of those changes (and ICMPv6's pseudo-header), the outer IPv4 header's.
#[inline(never)]
fn translate(ctx: &XdpContext, packet: &Packet, quoted: &Quoted, to: &Translation) -> Result<(), Reason> {
    let v4 = packet.family == FAMILY_V4;
    let sent = &quoted.flow;
    let header = l4_header::<ICMP_HLEN>(ctx, packet)?;
    // SAFETY: the checksum is inside the 8 checked bytes.
    let mut icmp_check: u16 = unsafe { field(header, icmp::CHECK) };
    let check_at = quoted.l4_off + if sent.proto == PROTO_TCP { l4::TCP_CHECK } else { l4::UDP_CHECK };
    if let Ok(at) = quoted_ptr::<u16>(ctx, packet, check_at) {
        // SAFETY: quoted_ptr checked the two bytes.
        let old = unsafe { at.read_unaligned() };
        // An IPv4 UDP checksum of 0 means none.
        if sent.proto == PROTO_TCP || old != 0 || !v4 {
            let mut new = if v4 {
                replace_bytes(replace_bytes(old, &v4_of(&sent.src), &v4_of(to.src)), &v4_of(&sent.dst), &v4_of(to.dst))
            } else {
                replace_bytes(replace_bytes(old, &sent.src, to.src), &sent.dst, to.dst)
            };
            new = replace_u16(replace_u16(new, sent.sport, to.sport), sent.dport, to.dport);
            if sent.proto == PROTO_UDP {
                new = udp_nonzero(new);
            }
            // SAFETY: as above.
            unsafe { at.write_unaligned(new) };
            icmp_check = replace_u16(icmp_check, old, new);
        }
    }
    if v4 {
        let old: u16 = read(ctx, quoted.ip_off + ipv4::CHECK)?;
        let new =
            replace_bytes(replace_bytes(old, &v4_of(&sent.src), &v4_of(to.src)), &v4_of(&sent.dst), &v4_of(to.dst));
        write(ctx, quoted.ip_off + ipv4::CHECK, new)?;
        icmp_check = replace_u16(icmp_check, old, new);
        write(ctx, quoted.ip_off + ipv4::SRC, v4_of(to.src))?;
        write(ctx, quoted.ip_off + ipv4::DST, v4_of(to.dst))?;
        icmp_check = replace_bytes(
            replace_bytes(icmp_check, &v4_of(&sent.src), &v4_of(to.src)),
            &v4_of(&sent.dst),
            &v4_of(to.dst),
        );
    } else {
        write(ctx, quoted.ip_off + ipv6::SRC, *to.src)?;
        write(ctx, quoted.ip_off + ipv6::DST, *to.dst)?;
        icmp_check = replace_bytes(replace_bytes(icmp_check, &sent.src, to.src), &sent.dst, to.dst);
    }
    write(ctx, quoted.l4_off + l4::SPORT, to.sport)?;
    write(ctx, quoted.l4_off + l4::DPORT, to.dport)?;
    icmp_check = replace_u16(replace_u16(icmp_check, sent.sport, to.sport), sent.dport, to.dport);
    let outer = &packet.flow;
    if v4 {
        let old: u16 = read(ctx, ETH_HLEN + ipv4::CHECK)?;
        let new =
            replace_bytes(replace_bytes(old, &v4_of(&outer.src), &v4_of(to.dst)), &v4_of(&outer.dst), &v4_of(to.src));
        write(ctx, ETH_HLEN + ipv4::CHECK, new)?;
        write(ctx, ETH_HLEN + ipv4::SRC, v4_of(to.dst))?;
        write(ctx, ETH_HLEN + ipv4::DST, v4_of(to.src))?;
    } else {
        write(ctx, ETH_HLEN + ipv6::SRC, *to.dst)?;
        write(ctx, ETH_HLEN + ipv6::DST, *to.src)?;
        icmp_check = replace_bytes(replace_bytes(icmp_check, &outer.src, to.dst), &outer.dst, to.src);
    }
    // SAFETY: as above.
    unsafe { set_field(header, icmp::CHECK, icmp_check) };
    Ok(())
}

#[inline(always)]
fn v4_of(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}
