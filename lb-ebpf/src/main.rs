//! The XDP load balancer: for each packet, parse → find the VIP → choose a backend → rewrite
//! (MACs, NAT addresses, or a tunnel's outer header) → send.
//! ICMP echo requests to a VIP's address are answered on the spot; ICMP errors about a VIP's
//! flows go where the flow goes; later fragments of a datagram go where its first went.
#![no_std]
#![no_main]

mod balance;
mod check_path;
mod decap;
mod floor;
mod fragment;
mod icmp;
mod maps;
mod observe;
mod parse;
mod rewrite;
mod tunnel;

use aya_ebpf::macros::xdp;
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::XdpContext;
use lb_common::hash::flow_hash;
use lb_common::maps::{
    ADDR_FILTER_SLOT_MASK, FlowKey, MODE_DSR, MODE_GUE, MODE_IPIP, MODE_NAT, PROTO_TCP, Reason, Settings, Traffic,
    TunnelJob, VIP_ADDR_SNAT, VIP_ADDR_VIP, VIP_OBSERVE, VipAddrKey, VipKey, VipMeta, address_filter_slot,
};
use lb_common::nat::{AWAITING_ANSWER, REFUSAL_HELD, holds_refusal, note_segment, refuses};
use lb_common::packet::{Fragment, icmp_protocol};
use maps::{ADDR_FILTER, NAT_REV, SETTINGS, STATS_BACKEND, STATS_REASON, STATS_VIP, TUNNEL_JOB, VIP_ADDRS, VIPS};
use parse::{Packet, parse, read};
use rewrite::{Rewrite, set_flow, set_macs};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let Some(job) = TUNNEL_JOB.get_ptr_mut(0) else {
        return Reason::DropInternal.xdp_action();
    };
    // SAFETY: per-CPU scratch: only this packet's handling uses it, while it runs.
    let job = unsafe { &mut *job };
    let mut packet = Packet::empty();
    let mut reason = match read_packet(&ctx, &mut packet) {
        Err(reason) => reason,
        Ok(()) => match filter_flags(&packet) {
            // The host's own traffic on this NIC: one array lookup, and on to the kernel.
            0 if packet.fragment == Fragment::Later => Reason::PassFragment,
            0 => Reason::PassNotVip,
            // Apart, each with its own stack frame: together they would pass the 512 bytes a
            // program's call chain may use. These rarer packets ask for the address's own flags.
            _ if packet.fragment == Fragment::Later => match address_flags(&packet) {
                0 => Reason::PassFragment,
                flags => fragment::forward_later(&ctx, &packet, flags, job),
            },
            _ if packet.flow.proto == icmp_protocol(packet.family) => match address_flags(&packet) {
                0 => Reason::PassNotVip,
                flags => icmp::handle(&ctx, &packet, flags, job),
            },
            // TCP and UDP go by the filter's flags: no lookup of the address itself.
            flags => match find_vip(&packet.flow, flags) {
                Some(vip) => balance(&ctx, &packet, vip, job),
                None if flags & VIP_ADDR_SNAT != 0 => nat_reply(&ctx, &packet),
                None => Reason::PassNotVip,
            },
        },
    };
    // Leaving through a tunnel, or too big for it: done here, each in a frame of its own.
    if reason == Reason::PendingTunnel {
        reason = tunnel::send(&ctx, &packet, job);
    } else if reason == Reason::TxIcmpTooBig {
        reason = tunnel::too_big(&ctx, &packet, job);
    }
    if let Some(counter) = STATS_REASON.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *counter += 1 };
    }
    reason.xdp_action()
}

/// Frames for us, parsed into `packet` (owned by the caller, which hands it on).
#[inline(always)]
fn read_packet(ctx: &XdpContext, packet: &mut Packet) -> Result<(), Reason> {
    // An array's first entry always exists.
    let settings = SETTINGS.get(0).ok_or(Reason::DropInternal)?;
    if !addressed_to_us(ctx, settings)? {
        return Err(Reason::PassOtherHost);
    }
    parse(ctx, packet, settings.zero)
}

/// TCP and UDP to a VIP: to its backend. Returns a plain `Reason`: a `Result` would come back
/// through the caller's stack, which the verifier refuses.
#[inline(never)]
fn balance(ctx: &XdpContext, packet: &Packet, vip: &VipMeta, job: &mut TunnelJob) -> Reason {
    match balance_packet(ctx, packet, vip, job) {
        Ok(reason) | Err(reason) => reason,
    }
}

/// TCP and UDP to anything else: a NAT flow's reply goes back to its client, the rest passes.
/// Apart from `balance`, so that neither frame adds to the other's stack.
#[inline(never)]
fn nat_reply(ctx: &XdpContext, packet: &Packet) -> Reason {
    match translate_nat_reply(ctx, packet) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn balance_packet(ctx: &XdpContext, packet: &Packet, vip: &VipMeta, job: &mut TunnelJob) -> Result<Reason, Reason> {
    let client_mac: [u8; 6] = read(ctx, 6)?;
    // Before `choose` gives the flow its port anew; SYNs of observed VIPs only look it up.
    job.refusal_held = 0;
    if packet.opens_connection != 0 && vip.flags & VIP_OBSERVE != 0 {
        job.refusal_held = observe::note_syn_again(&packet.flow, vip) as u8;
    }
    let chosen = balance::choose(packet, vip, client_mac)?;
    // Read back from the scratch, not kept in a register across `choose` (see `TunnelJob`).
    // SAFETY: a valid reference.
    if unsafe { core::ptr::read_volatile(&job.refusal_held) } != 0 {
        observe::carry_refusal_held(&packet.flow, vip, chosen.backend, chosen.snat_port);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let mut hash = 0;
    let mut sent = Reason::TxForward;
    match vip.mode {
        MODE_DSR => set_macs(ctx, chosen.backend.mac)?,
        MODE_NAT => {
            let to = Rewrite {
                src: &vip.snat_addr,
                sport: chosen.snat_port,
                dst: &chosen.backend.addr,
                dport: balance::backend_port(chosen.backend, packet),
            };
            set_flow(ctx, packet, &to)?;
            set_macs(ctx, chosen.backend.mac)?;
        }
        MODE_IPIP | MODE_GUE => {
            let gue = vip.mode == MODE_GUE;
            // Too big (answered instead) is not traffic of the VIP.
            tunnel::check_fits(packet, chosen.backend.family, gue, false, job)?;
            hash = flow_hash(&packet.flow);
            sent = tunnel::hand_over(job, chosen.index, gue, hash, Reason::TxForward);
        }
        _ => return Err(Reason::DropInternal),
    }
    add_traffic(&STATS_VIP, vip.vip_index, bytes, chosen.new_flow);
    add_traffic(&STATS_BACKEND, chosen.index, bytes, chosen.new_flow);
    if fragment::is_first(packet) {
        fragment::remember_forward(packet, vip, chosen.index, chosen.backend, hash);
    }
    Ok(sent)
}

/// Whether the frame's destination MAC is the interface's own (when the daemon set it). A frame
/// a switch flooded here for another host, e.g. the active node of a pair, is left alone:
/// forwarding it too would send the request to a backend twice.
#[inline(always)]
fn addressed_to_us(ctx: &XdpContext, settings: &Settings) -> Result<bool, Reason> {
    if settings.check_mac == 0 {
        return Ok(true);
    }
    let destination: [u8; 6] = read(ctx, 0)?;
    Ok(destination == settings.own_mac)
}

/// The `VIP_ADDR_*` flags the address filter holds for the packet's destination: 0 for an
/// address that is certainly neither a VIP's nor a NAT VIP's source address; otherwise its
/// flags, maybe with those of another address in its slot (see `ADDR_FILTER_WORDS`).
#[inline(always)]
fn filter_flags(packet: &Packet) -> u32 {
    let (word, shift) = address_filter_slot(&packet.flow.dst);
    ADDR_FILTER.get(word).map_or(0, |slots| (*slots >> shift) as u32 & ADDR_FILTER_SLOT_MASK)
}

/// What the program does for the packet's destination address (`VIP_ADDR_*` bits): 0 for an
/// address that is neither a VIP's nor a NAT VIP's source address. One number rather than the
/// entry: it stays in a register, where a pointer would take stack.
#[inline(always)]
fn address_flags(packet: &Packet) -> u32 {
    let key = VipAddrKey { addr: packet.flow.dst, family: packet.family, _pad: [0; 3] };
    let Some(address) = VIP_ADDRS.get_ptr(&key) else {
        return 0;
    };
    // SAFETY: a map value pointer stays valid for the program's run.
    unsafe { (*address).flags }
}

/// The VIP for a flow's destination, given its address's flags (the filter's, or its own
/// entry's): the exact port first, then the VIP's any-port entry.
#[inline(always)]
fn find_vip(flow: &FlowKey, address_flags: u32) -> Option<&'static VipMeta> {
    if address_flags & VIP_ADDR_VIP == 0 {
        return None;
    }
    let mut key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, family: flow.family };
    // SAFETY: a map value pointer stays valid for the program's run.
    if let Some(meta) = VIPS.get_ptr(&key) {
        return Some(unsafe { &*meta });
    }
    key.port = 0;
    VIPS.get_ptr(&key).map(|meta| unsafe { &*meta })
}

/// A backend's reply to a NAT flow goes back to the client as if it came from the VIP.
#[inline(always)]
fn translate_nat_reply(ctx: &XdpContext, packet: &Packet) -> Result<Reason, Reason> {
    let Some(reverse) = NAT_REV.get_ptr_mut(&packet.flow) else {
        return Err(Reason::PassNotVip);
    };
    // SAFETY: a map value pointer stays valid for the program's run.
    let reverse = unsafe { &mut *reverse };
    // What the allocator needs to judge when this port is free again.
    balance::touch(&mut reverse.last_seen);
    if packet.flow.proto == PROTO_TCP {
        reverse.ended = note_segment(reverse.ended, packet.tcp_flags, true);
    }
    if reverse.awaiting & AWAITING_ANSWER != 0 {
        // The backend's first answer: a refusal or not (`observe`).
        let first_hold = holds_refusal(reverse.awaiting);
        reverse.awaiting &= !AWAITING_ANSWER;
        if observe::note_answer(&packet.flow, reverse, refuses(packet.tcp_flags)) && first_hold {
            // Once per client flow: the refusal its retried SYN meets reaches it.
            reverse.awaiting |= REFUSAL_HELD;
            return Ok(Reason::DropRefusalHeld);
        }
    }
    let to = Rewrite {
        src: &reverse.vip_addr,
        sport: reverse.vip_port,
        dst: &reverse.client_addr,
        dport: reverse.client_port,
    };
    set_flow(ctx, packet, &to)?;
    set_macs(ctx, reverse.client_mac)?;
    if fragment::is_first(packet) {
        fragment::remember_reply(packet, reverse);
    }
    Ok(Reason::TxNatReply)
}

#[inline(always)]
pub(crate) fn add_traffic(map: &PerCpuArray<Traffic>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(traffic) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it.
        let traffic = unsafe { &mut *traffic };
        traffic.packets += 1;
        traffic.bytes += bytes;
        traffic.new_flows += new_flow as u64;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
