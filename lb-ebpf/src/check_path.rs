//! Health checks sent via the VIP (`via_vip`): the daemon's check packets to a VIP carry a socket
//! mark naming the backend (`lb_common::tunnel::check_mark`). This TC egress program, on the
//! load balancer's interface and on `lo` (where a VIP the host holds itself would route them),
//! sends them the way the XDP program sends that backend's client traffic: inside the same
//! tunnel, or with the backend's MAC for `dsr`. A check that passes thus proves what client
//! traffic needs: the backend takes the tunnel, holds the VIP and serves it.

use crate::maps::{BACKENDS, SETTINGS};
use aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC;
use aya_ebpf::bindings::{
    BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_OK, TC_ACT_SHOT,
};
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use lb_common::hash::flow_hash;
use lb_common::maps::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};
use lb_common::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN, UDP_HLEN};
use lb_common::tunnel::{
    CheckPath, GUE_HLEN, flow_label, gue_source_port, inner_protocol, outer_source, overhead, parse_check_mark,
    write_ipv4_header, write_ipv6_header, write_udp_gue,
};

#[classifier]
pub fn lb_hc(ctx: TcContext) -> i32 {
    // SAFETY: reading the context's own field.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let Some((index, path)) = parse_check_mark(mark) else {
        return TC_ACT_OK as i32;
    };
    // Once: the redirect below brings the packet past an egress hook again.
    ctx.set_mark(0);
    match steer(&ctx, index, path) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn steer(ctx: &TcContext, index: u32, path: CheckPath) -> Result<i32, ()> {
    let settings = SETTINGS.get(0).ok_or(())?;
    let backend = BACKENDS.get(index).ok_or(())?;
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(drop)?);
    let family = match ethertype {
        ETH_P_IP => FAMILY_V4,
        ETH_P_IPV6 => FAMILY_V6,
        _ => return Err(()),
    };
    if path != CheckPath::Direct {
        encapsulate(ctx, family, backend, path == CheckPath::Gue, settings)?;
    }
    ctx.store(0, &backend.mac, 0).map_err(drop)?;
    ctx.store(6, &settings.own_mac, 0).map_err(drop)?;
    // SAFETY: a helper without pointer arguments.
    Ok(unsafe { bpf_redirect(settings.ifindex, 0) } as i32)
}

/// Puts the outer headers in front of the check packet, as `tunnel::send` does for clients'.
#[inline(always)]
fn encapsulate(
    ctx: &TcContext,
    family: u8,
    backend: &lb_common::maps::Backend,
    gue: bool,
    settings: &lb_common::maps::Settings,
) -> Result<(), ()> {
    let hash = flow_hash(&inner_flow(ctx, family)?);
    let first: [u8; 2] = ctx.load(ETH_HLEN).map_err(drop)?;
    let tos = if family == FAMILY_V6 { (first[0] << 4) | (first[1] >> 4) } else { first[1] };
    let ip_len = ctx.len() as usize - ETH_HLEN;
    let outer_v6 = backend.family == FAMILY_V6;
    let added = overhead(backend.family, gue);
    let (prefix, prefix_len) = if outer_v6 {
        (&settings.tunnel_source_v6, settings.tunnel_prefix_v6)
    } else {
        (&settings.tunnel_source_v4, settings.tunnel_prefix_v4)
    };
    if prefix_len == 0 {
        return Err(());
    }
    let src = outer_source(prefix, prefix_len, backend.family, hash);
    let mut flags = if outer_v6 { BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 } else { BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 } as u64;
    if gue {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64;
    }
    ctx.adjust_room(added as i32, BPF_ADJ_ROOM_MAC, flags).map_err(drop)?;
    let protocol = if gue { PROTO_UDP } else { inner_protocol(family) };
    let ip_hlen = if outer_v6 {
        let mut header = [0u8; IPV6_HLEN];
        let label = flow_label(hash);
        write_ipv6_header(&mut header, &src, &backend.addr, protocol, tos, label, ip_len + added - IPV6_HLEN);
        ctx.store(ETH_HLEN, &header, 0).map_err(drop)?;
        ctx.store(12, &ETH_P_IPV6.to_be(), 0).map_err(drop)?;
        IPV6_HLEN
    } else {
        let mut header = [0u8; IPV4_MIN_HLEN];
        write_ipv4_header(&mut header, &src, &backend.addr, protocol, tos, ip_len + added - IPV4_MIN_HLEN);
        ctx.store(ETH_HLEN, &header, 0).map_err(drop)?;
        ctx.store(12, &ETH_P_IP.to_be(), 0).map_err(drop)?;
        IPV4_MIN_HLEN
    };
    if gue {
        let mut header = [0u8; UDP_HLEN + GUE_HLEN];
        let dport = u16::from_be(settings.gue_port);
        write_udp_gue(&mut header, gue_source_port(hash), dport, family, ip_len);
        ctx.store(ETH_HLEN + ip_hlen, &header, 0).map_err(drop)?;
    }
    Ok(())
}

/// The check packet's flow (its entropy, as for a client's flow): addresses, and the ports of
/// TCP and UDP (a check sends no options or extension headers).
#[inline(always)]
fn inner_flow(ctx: &TcContext, family: u8) -> Result<FlowKey, ()> {
    let mut flow = FlowKey { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0, family, _pad: [0; 2] };
    let l4 = if family == FAMILY_V6 {
        flow.proto = ctx.load(ETH_HLEN + 6).map_err(drop)?;
        flow.src = ctx.load(ETH_HLEN + 8).map_err(drop)?;
        flow.dst = ctx.load(ETH_HLEN + 24).map_err(drop)?;
        ETH_HLEN + IPV6_HLEN
    } else {
        flow.proto = ctx.load(ETH_HLEN + 9).map_err(drop)?;
        let src: [u8; 4] = ctx.load(ETH_HLEN + 12).map_err(drop)?;
        let dst: [u8; 4] = ctx.load(ETH_HLEN + 16).map_err(drop)?;
        flow.src[..4].copy_from_slice(&src);
        flow.dst[..4].copy_from_slice(&dst);
        let ihl: u8 = ctx.load(ETH_HLEN).map_err(drop)?;
        ETH_HLEN + ((ihl & 0x0f) as usize) * 4
    };
    if flow.proto == PROTO_TCP || flow.proto == PROTO_UDP {
        flow.sport = ctx.load(l4).map_err(drop)?;
        flow.dport = ctx.load(l4 + 2).map_err(drop)?;
    }
    Ok(flow)
}
