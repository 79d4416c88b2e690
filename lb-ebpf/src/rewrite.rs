//! Packet rewrites: MAC addresses for every forwarded packet, addresses and ports with
//! incremental checksum updates for NAT.

use crate::parse::{Packet, field, l4_header, read, set_field, write};
use lb_common::csum::{replace_bytes, replace_u16, udp_nonzero};
use lb_common::maps::{FAMILY_V4, PROTO_TCP, Reason};
use lb_common::packet::{ETH_HLEN, TCP_MIN_HLEN, UDP_HLEN, ipv4, ipv6, l4};

/// Sends the frame to `next_hop` from the MAC it was addressed to (ours).
#[inline(always)]
pub fn set_macs(ctx: &aya_ebpf::programs::XdpContext, next_hop: [u8; 6]) -> Result<(), Reason> {
    let ours: [u8; 6] = read(ctx, 0)?;
    write(ctx, 6, ours)?;
    write(ctx, 0, next_hop)
}

/// The flow the rewritten packet belongs to. Addresses use the 16-byte form of `FlowKey`.
pub struct Rewrite<'a> {
    pub src: &'a [u8; 16],
    pub sport: u16,
    pub dst: &'a [u8; 16],
    pub dport: u16,
}

#[inline(always)]
pub fn set_flow(ctx: &aya_ebpf::programs::XdpContext, packet: &Packet, to: &Rewrite) -> Result<(), Reason> {
    let from = &packet.flow;
    let (l4, check_at) = if from.proto == PROTO_TCP {
        (l4_header::<TCP_MIN_HLEN>(ctx, packet)?, l4::TCP_CHECK)
    } else {
        (l4_header::<UDP_HLEN>(ctx, packet)?, l4::UDP_CHECK)
    };
    // SAFETY: the checksum lies inside the header's checked bytes.
    let mut l4_check: u16 = unsafe { field(l4, check_at) };
    set_addresses(ctx, packet, to.src, to.dst)?;
    // The pseudo-header's addresses, as an IPv4 or IPv6 packet sums them.
    l4_check = if packet.family == FAMILY_V4 {
        replace_bytes(replace_bytes(l4_check, &v4(&from.src), &v4(to.src)), &v4(&from.dst), &v4(to.dst))
    } else {
        replace_bytes(replace_bytes(l4_check, &from.src, to.src), &from.dst, to.dst)
    };
    l4_check = replace_u16(replace_u16(l4_check, from.sport, to.sport), from.dport, to.dport);
    // SAFETY: as above, ports and checksum are inside the checked header.
    unsafe {
        set_field(l4, l4::SPORT, to.sport);
        set_field(l4, l4::DPORT, to.dport);
        if packet.no_l4_checksum == 0 {
            if from.proto != PROTO_TCP {
                l4_check = udp_nonzero(l4_check);
            }
            set_field(l4, check_at, l4_check);
        }
    }
    Ok(())
}

/// The IP header's addresses (and IPv4's header checksum): all that changes in a NAT flow's
/// later fragments, which have no L4 header.
#[inline(always)]
pub fn set_addresses(
    ctx: &aya_ebpf::programs::XdpContext,
    packet: &Packet,
    src: &[u8; 16],
    dst: &[u8; 16],
) -> Result<(), Reason> {
    let from = &packet.flow;
    if packet.family == FAMILY_V4 {
        let (new_src, new_dst) = (v4(src), v4(dst));
        let mut ip_check: u16 = read(ctx, ETH_HLEN + ipv4::CHECK)?;
        ip_check = replace_bytes(replace_bytes(ip_check, &v4(&from.src), &new_src), &v4(&from.dst), &new_dst);
        write(ctx, ETH_HLEN + ipv4::CHECK, ip_check)?;
        write(ctx, ETH_HLEN + ipv4::SRC, new_src)?;
        write(ctx, ETH_HLEN + ipv4::DST, new_dst)
    } else {
        write(ctx, ETH_HLEN + ipv6::SRC, *src)?;
        write(ctx, ETH_HLEN + ipv6::DST, *dst)
    }
}

#[inline(always)]
fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}
