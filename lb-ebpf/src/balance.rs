//! Which backend a flow goes to: the connection table first, then the VIP's Maglev ring.

use crate::maps::{BACKENDS, CONNS, NAT_REV, RINGS};
use crate::parse::Packet;
use lb_common::hash::flow_hash;
use lb_common::maps::{
    BACKEND_USABLE, Backend, ConnState, FlowKey, MODE_NAT, NAT_PORT_TRIES, NO_BACKEND, NatReverse, Reason, VipMeta,
    snat_port_candidate,
};

const BPF_NOEXIST: u64 = 1;

pub struct Chosen {
    pub index: u32,
    pub backend: &'static Backend,
    pub snat_port: u16,
    pub new_flow: bool,
}

/// The destination port towards the backend: its own, or the client's for an any-port backend.
#[inline(always)]
pub fn backend_port(backend: &Backend, packet: &Packet) -> u16 {
    if backend.port == 0 { packet.flow.dport } else { backend.port }
}

#[inline(always)]
fn usable_backend(index: u32) -> Option<&'static Backend> {
    let backend = BACKENDS.get(index)?;
    if backend.flags & BACKEND_USABLE != 0 { Some(backend) } else { None }
}

#[inline(always)]
pub fn choose(packet: &Packet, vip: &VipMeta, client_mac: [u8; 6]) -> Result<Chosen, Reason> {
    let remembered = if packet.opens_connection { None } else { CONNS.get_ptr(&packet.flow) };
    if let Some(conn) = remembered {
        // SAFETY: a map value pointer stays valid for the program's run.
        let (index, snat_port) = unsafe { ((*conn).backend, (*conn).snat_port) };
        // An established flow stays on its backend unless that backend is gone or down.
        if let Some(backend) = usable_backend(index) {
            return Ok(Chosen { index, backend, snat_port, new_flow: false });
        }
    }
    if vip.ring_size == 0 {
        return Err(Reason::DropInternal);
    }
    let hash = flow_hash(&packet.flow);
    let index = *RINGS.get(vip.ring_offset + hash % vip.ring_size).ok_or(Reason::DropInternal)?;
    if index == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = usable_backend(index).ok_or(Reason::DropNoBackend)?;
    let snat_port = if vip.mode == MODE_NAT { allocate_snat_port(packet, vip, backend, hash, &client_mac)? } else { 0 };
    let conn = ConnState { backend: index, snat_port, _pad: [0; 2] };
    // A full table evicts its least recently used entry; an insert failure only costs stickiness.
    let _ = CONNS.insert(&packet.flow, &conn, 0);
    Ok(Chosen { index, backend, snat_port, new_flow: true })
}

/// Reserves a source port towards `backend` by creating the reply-direction entry; the first
/// candidate whose reply flow is not taken wins (BPF_NOEXIST makes that race-free across CPUs).
#[inline(never)]
fn allocate_snat_port(
    packet: &Packet,
    vip: &VipMeta,
    backend: &Backend,
    hash: u32,
    client_mac: &[u8; 6],
) -> Result<u16, Reason> {
    let reverse = NatReverse {
        client_addr: packet.flow.src,
        vip_addr: packet.flow.dst,
        client_port: packet.flow.sport,
        vip_port: packet.flow.dport,
        client_mac: *client_mac,
        _pad: [0; 2],
    };
    let mut reply = FlowKey {
        src: backend.addr,
        dst: vip.snat_addr,
        sport: backend_port(backend, packet),
        dport: 0,
        proto: packet.flow.proto,
        family: packet.flow.family,
        _pad: [0; 2],
    };
    for attempt in 0..NAT_PORT_TRIES {
        let port = snat_port_candidate(hash, attempt, vip.snat_port_min, vip.snat_port_max).to_be();
        reply.dport = port;
        if NAT_REV.insert(&reply, &reverse, BPF_NOEXIST).is_ok() {
            return Ok(port);
        }
    }
    Err(Reason::DropNatPorts)
}
