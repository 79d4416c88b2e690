//! ICMP for VIP addresses: echo requests are answered here, so that operators can ping a VIP;
//! every other ICMP message passes to the kernel.

use crate::maps::VIP_ADDRS;
use crate::parse::{Packet, field, read, set_field, write};
use aya_ebpf::programs::XdpContext;
use lb_common::csum::replace_u16;
use lb_common::maps::{FAMILY_V4, Reason, VIP_ADDR_ANSWER_PING, VipAddrKey};
use lb_common::packet::{DEFAULT_TTL, ETH_HLEN, icmp, ipv4, ipv6};

/// Turns an echo request to a VIP address that answers ping into its echo reply, in place:
/// type, addresses and MACs swapped, a fresh TTL. Swapping the addresses changes no checksum
/// (ICMPv6's pseudo-header sums them in either order).
#[inline(never)]
pub fn answer_ping(ctx: &XdpContext, packet: &Packet) -> Result<Reason, Reason> {
    let v4 = packet.family == FAMILY_V4;
    let (request, reply) =
        if v4 { (icmp::ECHO_REQUEST_V4, icmp::ECHO_REPLY_V4) } else { (icmp::ECHO_REQUEST_V6, icmp::ECHO_REPLY_V6) };
    if packet.icmp_type != request {
        return Err(Reason::PassUnknownL4);
    }
    let key = VipAddrKey { addr: packet.flow.dst, family: packet.family, _pad: [0; 3] };
    // SAFETY: a map value pointer stays valid for the program's run.
    match VIP_ADDRS.get_ptr(&key) {
        Some(addr) if unsafe { (*addr).flags } & VIP_ADDR_ANSWER_PING != 0 => {}
        _ => return Err(Reason::PassNotVip),
    }
    // SAFETY: parse checked the 8 bytes of the ICMP header that l4 and l4_check point into.
    unsafe {
        let code: u8 = field(packet.l4, icmp::CODE);
        let check: u16 = field(packet.l4_check, 0);
        let check = replace_u16(check, u16::from_ne_bytes([request, code]), u16::from_ne_bytes([reply, code]));
        set_field(packet.l4, icmp::TYPE, reply);
        set_field(packet.l4_check, 0, check);
    }
    let (src, dst) = (&packet.flow.src, &packet.flow.dst);
    if v4 {
        let ttl_proto: [u8; 2] = read(ctx, ETH_HLEN + ipv4::TTL)?;
        let ip_check: u16 = read(ctx, ETH_HLEN + ipv4::CHECK)?;
        let fresh = [DEFAULT_TTL, ttl_proto[1]];
        let ip_check = replace_u16(ip_check, u16::from_ne_bytes(ttl_proto), u16::from_ne_bytes(fresh));
        write(ctx, ETH_HLEN + ipv4::TTL, fresh)?;
        write(ctx, ETH_HLEN + ipv4::CHECK, ip_check)?;
        write(ctx, ETH_HLEN + ipv4::SRC, [dst[0], dst[1], dst[2], dst[3]])?;
        write(ctx, ETH_HLEN + ipv4::DST, [src[0], src[1], src[2], src[3]])?;
    } else {
        write(ctx, ETH_HLEN + ipv6::HOP_LIMIT, DEFAULT_TTL)?;
        write(ctx, ETH_HLEN + ipv6::SRC, *dst)?;
        write(ctx, ETH_HLEN + ipv6::DST, *src)?;
    }
    let client_mac: [u8; 6] = read(ctx, 6)?;
    crate::rewrite::set_macs(ctx, client_mac)?;
    Ok(Reason::TxPingReply)
}
