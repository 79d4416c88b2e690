//! Minimal programs beside the load balancer: a pass-through for veth peers, and the cost floors
//! that benchmarks compare the load balancer against.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX};
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;

use crate::parse::{read, write};

/// Attached to the peer of a veth that sends with XDP_TX, it makes the peer receive those frames
/// at once (veth needs an XDP program on the receiving side; GRO alone also works, but was seen
/// to hold frames back until other traffic arrived).
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The cheapest possible verdict: the floor of any XDP program's cost.
#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// Counts and drops every frame: the receiving end of throughput benchmarks.
#[xdp]
pub fn sink(_ctx: XdpContext) -> u32 {
    if let Some(count) = crate::maps::SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *count += 1 };
    }
    XDP_DROP
}

/// Swaps the MAC addresses and sends the frame back: the floor of any forwarding XDP program.
#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    match (read::<[u8; 6]>(&ctx, 0), read::<[u8; 6]>(&ctx, 6)) {
        (Ok(dst), Ok(src)) => {
            let _ = write(&ctx, 0, src);
            let _ = write(&ctx, 6, dst);
            XDP_TX
        }
        _ => XDP_PASS,
    }
}
