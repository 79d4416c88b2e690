//! The XDP load balancer: for each packet, parse → find the VIP → choose a backend → rewrite → send.
//! ICMP echo requests to a VIP's address are answered on the spot; ICMP errors about a VIP's
//! flows go where the flow goes.
#![no_std]
#![no_main]

mod balance;
mod floor;
mod icmp;
mod maps;
mod parse;
mod rewrite;

use aya_ebpf::macros::xdp;
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::XdpContext;
use lb_common::maps::{FlowKey, MODE_DSR, MODE_NAT, PROTO_TCP, Reason, Traffic, VipKey, VipMeta};
use lb_common::nat::note_segment;
use lb_common::packet::icmp_protocol;
use maps::{NAT_REV, SETTINGS, STATS_BACKEND, STATS_REASON, STATS_VIP, VIPS};
use parse::{Packet, parse, read};
use rewrite::{Rewrite, set_flow, set_macs};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let mut packet = Packet::empty();
    let reason = match read_packet(&ctx, &mut packet) {
        Err(reason) => reason,
        // Apart, each with its own stack frame: together they would pass the 512 bytes a
        // program's call chain may use.
        Ok(()) if packet.flow.proto == icmp_protocol(packet.family) => icmp::handle(&ctx, &packet),
        Ok(()) => balance(&ctx, &packet),
    };
    if let Some(counter) = STATS_REASON.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *counter += 1 };
    }
    reason.xdp_action()
}

/// Frames for us, parsed into `packet` (owned by the caller, which hands it on).
#[inline(always)]
fn read_packet(ctx: &XdpContext, packet: &mut Packet) -> Result<(), Reason> {
    if !addressed_to_us(ctx)? {
        return Err(Reason::PassOtherHost);
    }
    parse(ctx, packet)
}

/// TCP and UDP: to a VIP's backend, or a NAT flow's reply back to its client. Returns a plain
/// `Reason`: a `Result` would come back through the caller's stack, which the verifier refuses.
#[inline(never)]
fn balance(ctx: &XdpContext, packet: &Packet) -> Reason {
    match balance_packet(ctx, packet) {
        Ok(reason) | Err(reason) => reason,
    }
}

#[inline(always)]
fn balance_packet(ctx: &XdpContext, packet: &Packet) -> Result<Reason, Reason> {
    let Some(vip) = find_vip(&packet.flow) else {
        return translate_nat_reply(ctx, packet);
    };
    let client_mac: [u8; 6] = read(ctx, 6)?;
    let chosen = balance::choose(packet, vip, client_mac)?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    add_traffic(&STATS_VIP, vip.vip_index, bytes, chosen.new_flow);
    add_traffic(&STATS_BACKEND, chosen.index, bytes, chosen.new_flow);
    match vip.mode {
        MODE_DSR => {}
        MODE_NAT => {
            let to = Rewrite {
                src: &vip.snat_addr,
                sport: chosen.snat_port,
                dst: &chosen.backend.addr,
                dport: balance::backend_port(chosen.backend, packet),
            };
            set_flow(ctx, packet, &to)?;
        }
        _ => return Err(Reason::DropInternal),
    }
    set_macs(ctx, chosen.backend.mac)?;
    Ok(Reason::TxForward)
}

/// Whether the frame's destination MAC is the interface's own (when the daemon set it). A frame
/// a switch flooded here for another host, e.g. the active node of a pair, is left alone:
/// forwarding it too would send the request to a backend twice.
#[inline(always)]
fn addressed_to_us(ctx: &XdpContext) -> Result<bool, Reason> {
    let Some(settings) = SETTINGS.get(0) else {
        return Ok(true);
    };
    if settings.check_mac == 0 {
        return Ok(true);
    }
    let destination: [u8; 6] = read(ctx, 0)?;
    Ok(destination == settings.own_mac)
}

/// The VIP for a flow's destination: the exact port first, then the VIP's any-port entry.
#[inline(always)]
fn find_vip(flow: &FlowKey) -> Option<&'static VipMeta> {
    let mut key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, family: flow.family };
    // SAFETY: a map value pointer stays valid for the program's run.
    if let Some(meta) = VIPS.get_ptr(&key) {
        return Some(unsafe { &*meta });
    }
    key.port = 0;
    VIPS.get_ptr(&key).map(|meta| unsafe { &*meta })
}

/// A backend's reply to a NAT flow goes back to the client as if it came from the VIP.
#[inline(never)]
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
    let to = Rewrite {
        src: &reverse.vip_addr,
        sport: reverse.vip_port,
        dst: &reverse.client_addr,
        dport: reverse.client_port,
    };
    set_flow(ctx, packet, &to)?;
    set_macs(ctx, reverse.client_mac)?;
    Ok(Reason::TxNatReply)
}

#[inline(always)]
fn add_traffic(map: &PerCpuArray<Traffic>, index: u32, bytes: u64, new_flow: bool) {
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
