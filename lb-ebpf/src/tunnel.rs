//! Tunnel modes (`ipip`, `gue`): the client's packet goes to its backend unchanged inside an
//! outer header, so that a backend behind routers keeps the client's address and answers the
//! client directly. The headers themselves come from `lb_common::tunnel`.
//!
//! A packet that would not fit the interface's MTU once encapsulated is answered with ICMP
//! "fragmentation needed" / ICMPv6 "packet too big" quoting it, so that the client's path MTU
//! discovery sends smaller ones: never a silent drop.

use crate::maps::{BACKENDS, SETTINGS};
use crate::parse::{Packet, ptr_at, read, write};
use aya_ebpf::helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail};
use aya_ebpf::programs::XdpContext;
use lb_common::csum::{add_words, fold};
use lb_common::maps::{FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, Reason, TunnelJob};
use lb_common::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, UDP_HLEN, ipv4, ipv6};
use lb_common::tunnel::{
    GUE_HLEN, TOO_BIG_QUOTE, flow_label, gue_source_port, inner_protocol, outer_source, overhead, too_big_icmp_header,
    write_ipv4_header, write_ipv6_header, write_udp_gue,
};

/// Leaves the packet to `lb_xdp` to send through the tunnel to backend `backend` (its size
/// checked by [`check_fits`]): the encapsulation's stack frame then comes on top of `lb_xdp`'s
/// alone (on top of the placing code's, a call chain would pass the 512 bytes the verifier
/// allows). Returns the reason to return, `PendingTunnel`.
#[inline(always)]
pub fn hand_over(job: &mut TunnelJob, backend: u32, gue: bool, hash: u32, sent: Reason) -> Reason {
    job.backend = backend;
    job.hash = hash;
    job.sent = sent as u32;
    job.gue = gue as u8;
    Reason::PendingTunnel
}

/// Whether `packet` fits the interface's MTU inside a tunnel to a backend of `outer_family`.
/// When it does not: `TxIcmpTooBig`, with the size that would fit left in `job` for
/// [`too_big`] to answer; for an ICMP error (`icmp_error`), which is never answered with
/// another (RFC 1122, RFC 4443), `DropTooBig`.
#[inline(always)]
pub fn check_fits(
    packet: &Packet,
    outer_family: u8,
    gue: bool,
    icmp_error: bool,
    job: &mut TunnelJob,
) -> Result<(), Reason> {
    let settings = SETTINGS.get(0).ok_or(Reason::DropInternal)?;
    let added = overhead(outer_family, gue);
    let mtu = settings.mtu as usize;
    if mtu == 0 || packet.l4_end - ETH_HLEN + added <= mtu {
        return Ok(());
    }
    if icmp_error {
        return Err(Reason::DropTooBig);
    }
    job.too_big_fits = mtu.saturating_sub(added) as u16;
    Err(Reason::TxIcmpTooBig)
}

/// Sends the packet a `PendingTunnel` reason left through `job`'s tunnel. Returns the reason it
/// counts under, or why it could not go. A plain `Reason`, as for `balance` in main.rs.
#[inline(never)]
pub fn send(ctx: &XdpContext, packet: &Packet, job: &TunnelJob) -> Reason {
    match encapsulate(ctx, packet, job) {
        // SAFETY: `sent` was written from a `Reason` by `hand_over`.
        Ok(()) => unsafe { core::mem::transmute::<u32, Reason>(job.sent) },
        Err(reason) => reason,
    }
}

#[inline(always)]
fn encapsulate(ctx: &XdpContext, packet: &Packet, job: &TunnelJob) -> Result<(), Reason> {
    let settings = SETTINGS.get(0).ok_or(Reason::DropInternal)?;
    let backend = BACKENDS.get(job.backend).ok_or(Reason::DropInternal)?;
    let outer_family = backend.family;
    let gue = job.gue != 0;
    let added = overhead(outer_family, gue);
    let ip_len = packet.l4_end - ETH_HLEN;
    let (prefix, prefix_len) = if outer_family == FAMILY_V6 {
        (&settings.tunnel_source_v6, settings.tunnel_prefix_v6)
    } else {
        (&settings.tunnel_source_v4, settings.tunnel_prefix_v4)
    };
    if prefix_len == 0 {
        // The daemon refuses tunnel backends of a family without an outer source.
        return Err(Reason::DropInternal);
    }
    // SAFETY: the helper moves the packet's start; every pointer is derived anew after it.
    // Nothing read before it is kept across it: what is needed of the frame is still there,
    // `added` bytes further in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(added as i32)) } != 0 {
        return Err(Reason::DropInternal);
    }
    let first: [u8; 2] = read(ctx, added + ETH_HLEN)?;
    // IPv4's TOS byte, or IPv6's traffic class (which straddles the first two bytes).
    let tos = if packet.family == FAMILY_V6 { (first[0] << 4) | (first[1] >> 4) } else { first[1] };
    let ours: [u8; 6] = read(ctx, added)?;
    write(ctx, 6, ours)?;
    write(ctx, 0, backend.mac)?;
    let src = outer_source(prefix, prefix_len, outer_family, job.hash);
    let protocol = if gue { PROTO_UDP } else { inner_protocol(packet.family) };
    let ip_hlen = if outer_family == FAMILY_V6 {
        write(ctx, 12, ETH_P_IPV6.to_be())?;
        let header = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
        let label = flow_label(job.hash);
        // SAFETY: ptr_at checked the header's bytes; nothing else refers to them.
        unsafe {
            write_ipv6_header(&mut *header, &src, &backend.addr, protocol, tos, label, ip_len + added - IPV6_HLEN)
        };
        IPV6_HLEN
    } else {
        write(ctx, 12, ETH_P_IP.to_be())?;
        let header = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN)?;
        // SAFETY: as above.
        unsafe { write_ipv4_header(&mut *header, &src, &backend.addr, protocol, tos, ip_len + added - IPV4_MIN_HLEN) };
        IPV4_MIN_HLEN
    };
    if gue {
        let header = ptr_at::<[u8; UDP_HLEN + GUE_HLEN]>(ctx, ETH_HLEN + ip_hlen)?;
        let (sport, dport) = (gue_source_port(job.hash), u16::from_be(settings.gue_port));
        // SAFETY: as above.
        unsafe { write_udp_gue(&mut *header, sport, dport, packet.family, ip_len) };
    }
    Ok(())
}

/// Turns a packet [`check_fits`] found too big into an ICMP "fragmentation needed" (IPv4) or "packet
/// too big" (IPv6) to its sender, from the address it was sent to, quoting its first
/// `TOO_BIG_QUOTE` bytes and naming the largest packet the tunnel carries.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, packet: &Packet, job: &TunnelJob) -> Reason {
    match answer_too_big(ctx, packet, job) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn answer_too_big(ctx: &XdpContext, packet: &Packet, job: &TunnelJob) -> Result<Reason, Reason> {
    if packet.l4_end - ETH_HLEN < TOO_BIG_QUOTE {
        return Err(Reason::DropTooBig);
    }
    let v6 = packet.family == FAMILY_V6;
    let ip_hlen = if v6 { IPV6_HLEN } else { IPV4_MIN_HLEN };
    let frame_len = ctx.data_end() - ctx.data();
    // SAFETY: the helpers move the packet's end and start; pointers are derived anew after.
    unsafe {
        if bpf_xdp_adjust_tail(ctx.ctx, -((frame_len - ETH_HLEN - TOO_BIG_QUOTE) as i32)) != 0
            || bpf_xdp_adjust_head(ctx.ctx, -((ip_hlen + ICMP_HLEN) as i32)) != 0
        {
            return Err(Reason::DropInternal);
        }
    }
    // The frame as it came now starts after the answer's IP and ICMP headers: its Ethernet
    // header first (read before the ICMP header takes its place), then the quoted packet.
    let came = ip_hlen + ICMP_HLEN;
    let quoted = came + ETH_HLEN;
    let quote = ptr_at::<[u8; TOO_BIG_QUOTE]>(ctx, quoted)?;
    // SAFETY: `quote` points at TOO_BIG_QUOTE checked bytes of the packet.
    let quote_sum =
        unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, quote as *mut u32, TOO_BIG_QUOTE as u32, 0) } as u32;
    let client_mac: [u8; 6] = read(ctx, came + 6)?;
    write(ctx, 0, client_mac)?;
    let ours: [u8; 6] = read(ctx, came)?;
    write(ctx, 6, ours)?;
    let (mut client, mut vip) = ([0u8; 16], [0u8; 16]);
    if v6 {
        client = read(ctx, quoted + ipv6::SRC)?;
        vip = read(ctx, quoted + ipv6::DST)?;
    } else {
        let src: [u8; 4] = read(ctx, quoted + ipv4::SRC)?;
        let dst: [u8; 4] = read(ctx, quoted + ipv4::DST)?;
        client[..4].copy_from_slice(&src);
        vip[..4].copy_from_slice(&dst);
    }
    let icmp_len = ICMP_HLEN + TOO_BIG_QUOTE;
    let mut icmp = too_big_icmp_header(packet.family, job.too_big_fits as usize);
    let mut sum = fold(quote_sum) as u32 + fold(add_words(0, &icmp)) as u32;
    if v6 {
        write(ctx, 12, ETH_P_IPV6.to_be())?;
        let header = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
        // SAFETY: ptr_at checked the header's bytes; nothing else refers to them.
        unsafe { write_ipv6_header(&mut *header, &vip, &client, PROTO_ICMPV6, 0, 0, icmp_len) };
        // ICMPv6 sums a pseudo-header too (RFC 4443).
        sum = add_words(add_words(sum, &vip), &client);
        sum = add_words(sum, &[0, 0, (icmp_len >> 8) as u8, icmp_len as u8, 0, 0, 0, PROTO_ICMPV6]);
    } else {
        write(ctx, 12, ETH_P_IP.to_be())?;
        let header = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN)?;
        // SAFETY: as above.
        unsafe { write_ipv4_header(&mut *header, &vip, &client, PROTO_ICMP, 0, icmp_len) };
    }
    let check = (!fold(sum)).to_ne_bytes();
    icmp[2] = check[0];
    icmp[3] = check[1];
    write(ctx, ETH_HLEN + ip_hlen, icmp)?;
    Ok(Reason::TxIcmpTooBig)
}
