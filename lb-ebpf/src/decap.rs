//! `lb decap`, on a backend of an `ipip` or `gue` VIP: strips the tunnel headers
//! (`lb_common::tunnel`) from packets for this host whose inner packet is for this host too, and
//! hands the inner packet to the stack: read the outer headers → is the outer destination ours?
//! → check the tunnel and inner headers → is the inner destination ours? → carry a congestion
//! mark inwards → strip.
//!
//! "Ours" is asked of the kernel's routing, not of a list of addresses that would go stale when
//! an operator adds a VIP to `lo` later: `bpf_fib_lookup` on the ingress interface answers
//! whether the kernel would forward a packet to that destination. Read from `net/core/filter.c`
//! (`bpf_ipv4_fib_lookup`, `bpf_ipv6_fib_lookup`):
//! - `FWD_DISABLED`: forwarding is off on the ingress interface (`net.ipv4.conf.IF.forwarding`,
//!   `net.ipv6.conf.IF.forwarding`), checked before any route is looked up. The kernel forwards
//!   nothing that arrives there, so it delivers the packet if the address is local and drops it
//!   otherwise: nothing can be relayed. (IPv6 caveat: the kernel's IPv6 forwarding follows
//!   `net.ipv6.conf.all.forwarding`; an interface set to 0 while `all` is 1 would forward while
//!   this lookup says disabled. `lb decap attach` refuses that combination.)
//! - `NOT_FWDED`: the route is not unicast (local, broadcast, multicast), there is no route at
//!   all, or the source or destination is link-local (IPv6): delivered here or dropped, never
//!   forwarded.
//! - `SUCCESS`, `NO_NEIGH`, `FRAG_NEEDED`, `UNSUPP_LWT`: a unicast route elsewhere: forwarded.
//! - `BLACKHOLE`, `UNREACHABLE`, `PROHIBIT`: routes that discard: not this host's either.
//! - A negative errno (no such ingress device): unknown, taken as "forwarded" so that a packet
//!   we cannot judge is never decapsulated towards another host.

use crate::maps::{DECAP_SETTINGS, DECAP_STATS};
use crate::parse::{read, write};
use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, bpf_fib_lookup as FibLookup};
use aya_ebpf::helpers::{bpf_fib_lookup, bpf_xdp_adjust_head};
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::csum::replace_u16;
use lb_common::decap::DecapVerdict::{self, *};
use lb_common::maps::{FAMILY_V4, FAMILY_V6, PROTO_UDP};
use lb_common::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN, UDP_HLEN, is_ipv6_extension, l4};
use lb_common::tunnel::{GUE_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, inner_family};

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let verdict = match decapsulate(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    if let Some(counter) = DECAP_STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *counter += 1 };
    }
    verdict.xdp_action()
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Result<DecapVerdict, DecapVerdict> {
    // An array's first entry always exists; without it, GUE is off.
    let gue_port = DECAP_SETTINGS.get(0).map_or(0, |settings| settings.gue_port);
    let outer = read_outer(ctx, gue_port)?;
    if forwards(ctx, outer.family, &outer.src, &outer.dst) {
        return Err(PassTransit);
    }
    let inner = read_inner(ctx, &outer, gue_port)?;
    if inner.multicast || forwards(ctx, inner.family, &inner.src, &inner.dst) {
        return Err(DropNotLocal);
    }
    carry_congestion_mark(ctx, &outer, &inner)?;
    strip(ctx, inner.off, inner.family)?;
    Ok(PassDecapsulated)
}

/// The outer layer of a tunnel packet.
struct Outer {
    family: u8,
    /// Addresses as 16 bytes, IPv4 in the first 4 (as `bpf_fib_lookup` takes them).
    src: [u8; 16],
    dst: [u8; 16],
    /// IPIP: the outer protocol, which names the inner family. GUE: `PROTO_UDP`.
    proto: u8,
    /// The ECN field of the outer header.
    ecn: u8,
    /// Where the tunnel's payload starts (the inner packet, or GUE's UDP header), and where the
    /// outer IP packet ends (Ethernet padding may follow).
    payload_off: usize,
    end: usize,
}

/// Ethernet → outer IPv4 (any IHL) or IPv6 (no extension headers) → IPIP, or UDP to the GUE
/// port. Anything else is no tunnel of ours.
#[inline(always)]
fn read_outer(ctx: &XdpContext, gue_port: u16) -> Result<Outer, DecapVerdict> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12).map_err(|_| PassNotTunnel)?);
    let frame_len = ctx.data_end() - ctx.data();
    let mut outer = Outer { family: 0, src: [0; 16], dst: [0; 16], proto: 0, ecn: 0, payload_off: 0, end: 0 };
    let mut more_fragments = false;
    match ethertype {
        ETH_P_IP => {
            let h: [u8; IPV4_MIN_HLEN] = read(ctx, ETH_HLEN).map_err(|_| PassBadOuter)?;
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            if h[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN || total < ihl || ETH_HLEN + total > frame_len {
                return Err(PassBadOuter);
            }
            let frag = u16::from_be_bytes([h[6], h[7]]);
            outer.proto = h[9];
            if frag & 0x1fff != 0 {
                // A later fragment carries no UDP header: only IPIP is known to be a tunnel.
                return Err(if inner_family(outer.proto).is_some() { PassOuterFragment } else { PassNotTunnel });
            }
            more_fragments = frag & 0x2000 != 0;
            outer.family = FAMILY_V4;
            outer.ecn = h[1] & 3;
            outer.src[..4].copy_from_slice(&h[12..16]);
            outer.dst[..4].copy_from_slice(&h[16..20]);
            outer.payload_off = ETH_HLEN + ihl;
            outer.end = ETH_HLEN + total;
        }
        ETH_P_IPV6 => {
            let h: [u8; IPV6_HLEN] = read(ctx, ETH_HLEN).map_err(|_| PassBadOuter)?;
            let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
            if h[0] >> 4 != 6 || ETH_HLEN + IPV6_HLEN + payload > frame_len {
                return Err(PassBadOuter);
            }
            outer.proto = h[6];
            if is_ipv6_extension(outer.proto) {
                return Err(PassOuterExtHeader);
            }
            outer.family = FAMILY_V6;
            outer.ecn = (h[1] >> 4) & 3;
            outer.src.copy_from_slice(&h[8..24]);
            outer.dst.copy_from_slice(&h[24..40]);
            outer.payload_off = ETH_HLEN + IPV6_HLEN;
            outer.end = ETH_HLEN + IPV6_HLEN + payload;
        }
        _ => return Err(PassNotTunnel),
    }
    match outer.proto {
        IPPROTO_IPIP | IPPROTO_IPV6 => {}
        PROTO_UDP if gue_port != 0 => {
            let dport: u16 = read(ctx, outer.payload_off + l4::DPORT).map_err(|_| PassBadOuter)?;
            if outer.payload_off + UDP_HLEN > outer.end {
                return Err(PassBadOuter);
            }
            if dport != gue_port {
                return Err(PassNotTunnel);
            }
        }
        _ => return Err(PassNotTunnel),
    }
    if more_fragments {
        return Err(PassOuterFragment);
    }
    Ok(outer)
}

/// The inner packet of a tunnel packet for this host.
struct Inner {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    /// Multicast (or IPv4 limited broadcast): never a VIP, and what multicast routing would relay.
    multicast: bool,
    /// The ECN field of the inner header.
    ecn: u8,
    /// Where the inner IP header starts.
    off: usize,
}

/// GUE's UDP and GUE headers, then the inner IP header: complete, of the family the tunnel
/// announced, exactly as long as what the outer packet has left, and no tunnel packet itself.
#[inline(always)]
fn read_inner(ctx: &XdpContext, outer: &Outer, gue_port: u16) -> Result<Inner, DecapVerdict> {
    let mut off = outer.payload_off;
    let family = if outer.proto == PROTO_UDP {
        let udp: [u8; UDP_HLEN] = read(ctx, off).map_err(|_| DropMalformed)?;
        let gue: [u8; GUE_HLEN] = read(ctx, off + UDP_HLEN).map_err(|_| DropMalformed)?;
        let udp_len = u16::from_be_bytes([udp[l4::UDP_LEN], udp[l4::UDP_LEN + 1]]) as usize;
        if udp_len != outer.end - off || udp_len < UDP_HLEN + GUE_HLEN {
            return Err(DropMalformed);
        }
        // Version 0, no control message, no optional fields: all this product sends.
        if gue[0] != 0 {
            return Err(DropMalformed);
        }
        off += UDP_HLEN + GUE_HLEN;
        inner_family(gue[1]).ok_or(DropMalformed)?
    } else {
        inner_family(outer.proto).ok_or(DropMalformed)?
    };
    let left = outer.end - off;
    let mut inner = Inner { family, src: [0; 16], dst: [0; 16], multicast: false, ecn: 0, off };
    // The upper-layer protocol, where its header starts and how long it may be (0: no header
    // here), for the nesting check.
    let (proto, l4_off, l4_len) = if family == FAMILY_V4 {
        let h: [u8; IPV4_MIN_HLEN] = read(ctx, off).map_err(|_| DropMalformed)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([h[2], h[3]]) as usize;
        if h[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN || total < ihl || total != left {
            return Err(DropMalformed);
        }
        inner.ecn = h[1] & 3;
        inner.src[..4].copy_from_slice(&h[12..16]);
        inner.dst[..4].copy_from_slice(&h[16..20]);
        inner.multicast = h[16] & 0xf0 == 0xe0 || h[16..20] == [0xff; 4];
        // A later fragment's payload starts with data, not with a header.
        let later_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0;
        (h[9], off + ihl, if later_fragment { 0 } else { total - ihl })
    } else {
        let h: [u8; IPV6_HLEN] = read(ctx, off).map_err(|_| DropMalformed)?;
        let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
        if h[0] >> 4 != 6 || IPV6_HLEN + payload != left {
            return Err(DropMalformed);
        }
        inner.ecn = (h[1] >> 4) & 3;
        inner.src.copy_from_slice(&h[8..24]);
        inner.dst.copy_from_slice(&h[24..40]);
        inner.multicast = h[24] == 0xff;
        (h[6], off + IPV6_HLEN, payload)
    };
    if inner_family(proto).is_some() {
        return Err(DropNested);
    }
    if proto == PROTO_UDP && gue_port != 0 && l4_len >= UDP_HLEN {
        let dport: u16 = read(ctx, l4_off + l4::DPORT).map_err(|_| DropMalformed)?;
        if dport == gue_port {
            return Err(DropNested);
        }
    }
    Ok(inner)
}

/// `struct bpf_fib_lookup` (64 bytes) as this program fills it: addresses at 16 and 32 (an IPv4
/// address in the first 4 bytes of each), the rest 0 (no TOS, flow label, ports or MTU check).
#[repr(C)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    ifindex: u32,
    flowinfo: u32,
    src: [u8; 16],
    dst: [u8; 16],
    vlan_or_table: u32,
    macs: [u8; 12],
}
const _: () = assert!(size_of::<FibParams>() == size_of::<FibLookup>());
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Whether the kernel would forward a packet from `src` to `dst` that arrived on this
/// interface (see the module's notes on `bpf_fib_lookup`).
#[inline(always)]
fn forwards(ctx: &XdpContext, family: u8, src: &[u8; 16], dst: &[u8; 16]) -> bool {
    let mut params = FibParams {
        family: if family == FAMILY_V6 { AF_INET6 } else { AF_INET },
        l4_protocol: 0,
        sport: 0,
        dport: 0,
        tot_len: 0,
        ifindex: ctx.ingress_ifindex() as u32,
        flowinfo: 0,
        src: *src,
        dst: *dst,
        vlan_or_table: 0,
        macs: [0; 12],
    };
    let params = &mut params as *mut FibParams as *mut FibLookup;
    // SAFETY: `params` is a whole, initialised bpf_fib_lookup on this stack.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), params, size_of::<FibLookup>() as i32, 0) };
    !(rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 || rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64)
}

/// ECN through the tunnel (RFC 6040, normal mode): the load balancer copies the inner ECN field
/// to the outer header, routers on the way may mark the outer one "congestion experienced"
/// (CE), and that mark must reach the inner packet, or the sender never learns of the
/// congestion. A CE mark over an inner packet that is not ECN-capable is a drop instead.
#[inline(always)]
fn carry_congestion_mark(ctx: &XdpContext, outer: &Outer, inner: &Inner) -> Result<(), DecapVerdict> {
    if outer.ecn != ECN_CE || inner.ecn == ECN_CE {
        return Ok(());
    }
    if inner.ecn == ECN_NOT_ECT {
        return Err(DropCongestionNotEct);
    }
    let first: [u8; 2] = read(ctx, inner.off).map_err(|_| DropMalformed)?;
    let marked = if inner.family == FAMILY_V6 {
        [first[0], first[1] | (ECN_CE << 4)] // the traffic class straddles the two bytes
    } else {
        [first[0], first[1] | ECN_CE]
    };
    write(ctx, inner.off, marked).map_err(|_| DropMalformed)?;
    if inner.family == FAMILY_V4 {
        let check: u16 = read(ctx, inner.off + 10).map_err(|_| DropMalformed)?;
        let check = replace_u16(check, u16::from_ne_bytes(first), u16::from_ne_bytes(marked));
        write(ctx, inner.off + 10, check).map_err(|_| DropMalformed)?;
    }
    Ok(())
}

/// The ECN field's values (RFC 3168).
const ECN_NOT_ECT: u8 = 0;
const ECN_CE: u8 = 3;

/// Moves the frame's start to just before the inner packet and writes an Ethernet header there
/// (the same MACs, the inner family's ethertype): the stack receives the inner packet as if it
/// had arrived bare.
#[inline(always)]
fn strip(ctx: &XdpContext, inner_off: usize, family: u8) -> Result<(), DecapVerdict> {
    let macs: [u8; 12] = read(ctx, 0).map_err(|_| DropMalformed)?;
    let ethertype = if family == FAMILY_V6 { ETH_P_IPV6 } else { ETH_P_IP };
    // SAFETY: the helper checks the new start against the frame; on failure nothing moved.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (inner_off - ETH_HLEN) as i32) } != 0 {
        // Only a frame shorter than what was checked above could fail: never passed half-done.
        return Err(DropMalformed);
    }
    write(ctx, 0, macs).map_err(|_| DropMalformed)?;
    write(ctx, 12, ethertype.to_be_bytes()).map_err(|_| DropMalformed)?;
    Ok(())
}
