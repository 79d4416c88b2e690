//! A program that passes every frame: attached to the peer of a veth that sends with XDP_TX,
//! it makes the peer receive those frames at once (veth needs an XDP program on the receiving
//! side; GRO alone also works, but was seen to hold frames back until other traffic arrived).

use aya_ebpf::bindings::xdp_action::XDP_PASS;
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}
