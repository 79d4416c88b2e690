//! IP fragments of a VIP's datagrams. The first fragment carries the ports: it is balanced like
//! any packet, and what was done with it is remembered in `FRAGS` under the datagram's
//! reassembly key. Later fragments carry no ports: they find their first's route there, and get
//! the same next hop and (NAT) the same addresses, or (tunnels) the same tunnel and outer
//! source. The L4 checksum covers the whole datagram and sits in the first fragment, whose
//! rewrite updates it for every changed byte.
//!
//! A later fragment that comes before its first (reordered, or its first was lost or went to
//! another load balancer) cannot be placed: it goes to the kernel, counted, as it did before the
//! program knew fragments. Its datagram is lost either way; the kernel keeps its own traffic's.

use crate::maps::{BACKENDS, FRAGS, STATS_BACKEND, STATS_VIP};
use crate::parse::Packet;
use crate::rewrite::{set_addresses, set_macs};
use crate::tunnel;
use aya_ebpf::programs::XdpContext;
use lb_common::maps::{
    Backend, FRAG_GUE, FRAG_NO_STATS, FRAG_REWRITE, FRAG_TUNNEL, FragKey, FragRoute, MODE_GUE, MODE_IPIP, MODE_NAT,
    NatReverse, Reason, TunnelJob, VIP_ADDR_VIP, VipMeta,
};

/// A later fragment: where its first went. Returns a plain `Reason` (see `balance` in main.rs).
#[inline(never)]
pub fn forward_later(ctx: &XdpContext, packet: &Packet, address_flags: u32, job: &mut TunnelJob) -> Reason {
    match forward(ctx, packet, address_flags, job) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn forward(ctx: &XdpContext, packet: &Packet, address_flags: u32, job: &mut TunnelJob) -> Result<Reason, Reason> {
    let Some(route) = FRAGS.get_ptr(&key(packet)) else {
        return Err(if address_flags & VIP_ADDR_VIP != 0 { Reason::PassFragmentNoFirst } else { Reason::PassFragment });
    };
    // SAFETY: a map value pointer stays valid for the program's run.
    let route = unsafe { &*route };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let mut sent = Reason::TxFragment;
    if route.flags & FRAG_TUNNEL != 0 {
        let backend = BACKENDS.get(route.backend).ok_or(Reason::DropInternal)?;
        let gue = route.flags & FRAG_GUE != 0;
        tunnel::check_fits(packet, backend.family, gue, false, job)?;
        sent = tunnel::hand_over(job, route.backend, gue, route.hash, Reason::TxFragment);
    } else {
        if route.flags & FRAG_REWRITE != 0 {
            set_addresses(ctx, packet, &route.src, &route.dst)?;
        }
        set_macs(ctx, route.mac)?;
    }
    if route.vip_index != FRAG_NO_STATS {
        crate::add_traffic(&STATS_VIP, route.vip_index, bytes, false);
        crate::add_traffic(&STATS_BACKEND, route.backend, bytes, false);
    }
    Ok(sent)
}

/// The first fragment of a client's datagram to `vip` went to `backend` (index `index`; `hash`
/// is the flow's, for a tunnel's entropy).
#[inline(never)]
pub fn remember_forward(packet: &Packet, vip: &VipMeta, index: u32, backend: &Backend, hash: u32) {
    let (src, dst, flags) = match vip.mode {
        MODE_NAT => (vip.snat_addr, backend.addr, FRAG_REWRITE),
        MODE_IPIP => ([0; 16], [0; 16], FRAG_TUNNEL),
        MODE_GUE => ([0; 16], [0; 16], FRAG_TUNNEL | FRAG_GUE),
        _ => ([0; 16], [0; 16], 0),
    };
    let route =
        FragRoute { src, dst, mac: backend.mac, flags, _pad: 0, vip_index: vip.vip_index, backend: index, hash };
    // A full map evicts its least recently used datagram: that one loses its later fragments.
    let _ = FRAGS.insert(&key(packet), &route, 0);
}

/// The first fragment of a backend's reply to a NAT flow went back to the client.
#[inline(never)]
pub fn remember_reply(packet: &Packet, reverse: &NatReverse) {
    let route = FragRoute {
        src: reverse.vip_addr,
        dst: reverse.client_addr,
        mac: reverse.client_mac,
        flags: FRAG_REWRITE,
        _pad: 0,
        vip_index: FRAG_NO_STATS,
        backend: 0,
        hash: 0,
    };
    let _ = FRAGS.insert(&key(packet), &route, 0);
}

/// Whether `packet` starts a fragmented datagram whose route must be remembered.
#[inline(always)]
pub fn is_first(packet: &Packet) -> bool {
    packet.first_fragment != 0
}

#[inline(always)]
fn key(packet: &Packet) -> FragKey {
    let flow = &packet.flow;
    FragKey { src: flow.src, dst: flow.dst, id: packet.frag_id, proto: flow.proto, family: flow.family, _pad: [0; 2] }
}
