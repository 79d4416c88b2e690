//! Which backend a flow goes to: the connection table first, then the VIP's Maglev ring.

use crate::maps::{BACKENDS, CONNS, FLOW_EVENTS, NAT_FLOWS_LOST, NAT_REV, NEW_NAT_FLOWS, RINGS, SETTINGS};
use crate::parse::Packet;
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::hash::{flow_hash, placement_hash};
use lb_common::maps::{
    BACKEND_USABLE, Backend, CONN_HALF_OPEN, CONN_OPENED_IN_FLOOD, ConnState, FlowEvent, FlowKey, MODE_NAT,
    NAT_PORT_TRIES, NO_BACKEND, NatFlowRecord, NatReverse, PROTO_TCP, Reason, VipMeta, snat_port_candidate,
};
use lb_common::nat::{AWAITING_ANSWER, Holder, client_flow, may_take_port, note_segment, ticks};
use lb_common::packet::{TCP_FLAG_FIN, TCP_FLAG_RST};

const BPF_ANY: u64 = 0;
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
    port_towards(backend, packet.flow.dport)
}

/// `backend`'s port for a client flow to `vip_port`.
#[inline(always)]
pub fn port_towards(backend: &Backend, vip_port: u16) -> u16 {
    if backend.port == 0 { vip_port } else { backend.port }
}

#[inline(always)]
fn usable_backend(index: u32) -> Option<&'static Backend> {
    let backend = BACKENDS.get(index)?;
    if backend.flags & BACKEND_USABLE != 0 { Some(backend) } else { None }
}

/// The program's clock ([`lb_common::nat::ticks`]): the coarse monotonic clock is enough for
/// waits of seconds, and cheaper than the precise one.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: a helper without arguments.
    ticks(unsafe { bpf_ktime_get_coarse_ns() })
}

#[inline(always)]
pub fn choose(packet: &Packet, vip: &VipMeta, client_mac: [u8; 6]) -> Result<Chosen, Reason> {
    let remembered = if packet.opens_connection != 0 { None } else { CONNS.get_ptr_mut(&packet.flow) };
    if let Some(conn) = remembered {
        // SAFETY: a map value pointer stays valid for the program's run.
        let (index, snat_port) = unsafe { ((*conn).backend, (*conn).snat_port) };
        // An established flow stays on its backend unless that backend is gone or down.
        if let Some(backend) = usable_backend(index) {
            // SAFETY: as above; plain stores, racing only with the same flow on another CPU.
            touch(unsafe { &mut (*conn).last_seen });
            if vip.mode == MODE_NAT {
                // Anything after the SYN (here: never a SYN) completes the client's side.
                // SAFETY: as above.
                if unsafe { (*conn).flags } & CONN_HALF_OPEN != 0 {
                    unsafe { (*conn).flags &= !(CONN_HALF_OPEN | CONN_OPENED_IN_FLOOD) };
                }
                if packet.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
                    note_client_end(packet, vip, backend, snat_port);
                }
            }
            return Ok(Chosen { index, backend, snat_port, new_flow: false });
        }
    }
    if vip.ring_size == 0 {
        return Err(Reason::DropInternal);
    }
    // The flow's own hash also draws its NAT source ports: with client affinity a client's
    // connections share a slot, and must not share their port candidates.
    let hash = flow_hash(&packet.flow);
    let slot = placement_hash(&packet.flow, hash, vip) % vip.ring_size;
    let index = *RINGS.get(vip.ring_offset + slot).ok_or(Reason::DropInternal)?;
    if index == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = usable_backend(index).ok_or(Reason::DropNoBackend)?;
    // A new flow in a TCP connection's first packet; later ones without an entry (a DSR flow's
    // handshake completing, or an entry lost) are placed again, not counted again.
    let new_flow = packet.opens_connection != 0 || packet.flow.proto != PROTO_TCP || vip.mode == MODE_NAT;
    let last_seen = now();
    if vip.mode != MODE_NAT {
        // A SYN goes where the table says and leaves no state: the handshake's next packet
        // records the flow, so spoofed SYNs fill no table.
        if packet.opens_connection != 0 {
            // A reused tuple: the old connection's entry must not steer the new one's next
            // packets. A store into the entry, when there is one; no insert.
            if let Some(stale) = CONNS.get_ptr_mut(&packet.flow) {
                // SAFETY: a map value pointer stays valid for the program's run.
                unsafe { (*stale).backend = index };
            }
            return Ok(Chosen { index, backend, snat_port: 0, new_flow });
        }
        // During a flood nothing new is recorded (Katran's answer too): the table places the
        // flow's every packet, and only a table change moves it.
        if flooded() {
            flow_event(FlowEvent::FloodNotRecorded);
            return Ok(Chosen { index, backend, snat_port: 0, new_flow });
        }
    } else {
        // The reply direction's entry: how to turn the backend's answers back to the client.
        let reverse = NatReverse {
            client_addr: packet.flow.src,
            vip_addr: packet.flow.dst,
            client_port: packet.flow.sport,
            vip_port: packet.flow.dport,
            client_mac,
            ended: 0,
            awaiting: AWAITING_ANSWER,
            last_seen,
        };
        let snat_port = allocate_snat_port(packet, vip, backend, hash, &reverse)?;
        // Half-open until the client's next packet; opened during a flood, it gives its port up
        // sooner (`lb_common::nat::half_open_wait`). Built only now: alive across the port's
        // allocation, it would take 16 of the call chain's 512 bytes of stack.
        let flags = match packet.opens_connection {
            0 => 0,
            _ => CONN_HALF_OPEN | if flooded() { CONN_OPENED_IN_FLOOD } else { 0 },
        };
        let conn = ConnState { backend: index, snat_port, flags, _pad: 0, last_seen };
        // A full table keeps the connections it has: the new one is dropped, its port freed.
        if CONNS.insert(&packet.flow, &conn, 0).is_err() {
            release_port(packet, vip, backend, conn.snat_port);
            return Err(Reason::DropTableFull);
        }
        report_nat_flow(packet, vip, backend, &conn, &reverse);
        return Ok(Chosen { index, backend, snat_port: conn.snat_port, new_flow });
    }
    // DSR and tunnel flows need only the backend and the time (for the daemon's sweep).
    let conn = ConnState { backend: index, snat_port: 0, flags: 0, _pad: 0, last_seen };
    // A full table keeps the connections it has; this flow goes where the Maglev table says.
    if CONNS.insert(&packet.flow, &conn, 0).is_err() {
        flow_event(FlowEvent::TableFull);
    }
    Ok(Chosen { index, backend, snat_port: 0, new_flow })
}

/// Whether the daemon sees a flood of new flows (`Settings::flood`).
#[inline(always)]
fn flooded() -> bool {
    SETTINGS.get(0).is_some_and(|s| s.flood != 0)
}

#[inline(always)]
pub fn flow_event(event: FlowEvent) {
    if let Some(counter) = FLOW_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *counter += 1 };
    }
}

/// The backend an existing client flow goes to, without placing it: its index and entry, from
/// the connection table, or for DSR and tunnels (whose entries carry nothing else) the slot its
/// next packet would take; with the NAT source port. `None` for a NAT flow without an entry:
/// nothing tells its source port.
#[inline(always)]
pub fn backend_of_flow(flow: &FlowKey, vip: &VipMeta) -> Option<(u32, &'static Backend, u16)> {
    if let Some(conn) = CONNS.get_ptr(flow) {
        // SAFETY: a map value pointer stays valid for the program's run.
        let (index, snat_port) = unsafe { ((*conn).backend, (*conn).snat_port) };
        if let Some(backend) = usable_backend(index) {
            return Some((index, backend, snat_port));
        }
    }
    if vip.mode == MODE_NAT || vip.ring_size == 0 {
        return None;
    }
    let slot = placement_hash(flow, flow_hash(flow), vip) % vip.ring_size;
    let index = *RINGS.get(vip.ring_offset + slot)?;
    Some((index, usable_backend(index)?, 0))
}

/// In a pair, tells the daemon about a new NAT flow so that the standby can take it over. A
/// full ring only costs that flow its survival of a takeover, and is counted.
#[inline(never)]
fn report_nat_flow(packet: &Packet, vip: &VipMeta, backend: &Backend, conn: &ConnState, reverse: &NatReverse) {
    if SETTINGS.get(0).is_none_or(|s| s.report_nat_flows == 0) {
        return;
    }
    if let Some(mut entry) = NEW_NAT_FLOWS.reserve::<NatFlowRecord>(0) {
        // Field by field into the ring: a whole record built first would take 140 bytes of a
        // call chain's 512.
        let record = entry.as_mut_ptr();
        // SAFETY: the reservation holds a whole record; every field is written before submit.
        unsafe {
            (*record).flow = packet.flow;
            (*record).conn = *conn;
            (*record).reply = reply_key(&packet.flow, vip, backend, conn.snat_port);
            (*record).reverse = *reverse;
        }
        entry.submit(0);
    } else if let Some(lost) = NAT_FLOWS_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot of a per-CPU map.
        unsafe { *lost += 1 };
    }
}

/// Records activity at the current tick. Stores only when the tick changed: a burst of one
/// flow's packets then dirties the entry's cache line once, not once per packet.
#[inline(always)]
pub fn touch(last_seen: &mut u32) {
    let now = now();
    if *last_seen != now {
        *last_seen = now;
    }
}

/// The key of the backend's replies to the NAT flow `flow`: backend → SNAT address and port.
#[inline(always)]
pub fn reply_key(flow: &FlowKey, vip: &VipMeta, backend: &Backend, snat_port: u16) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: vip.snat_addr,
        sport: port_towards(backend, flow.dport),
        dport: snat_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

/// The client sent FIN or RST: recorded on the reverse entry, where the port's end is judged.
#[inline(never)]
fn note_client_end(packet: &Packet, vip: &VipMeta, backend: &Backend, snat_port: u16) {
    if let Some(reverse) = NAT_REV.get_ptr_mut(&reply_key(&packet.flow, vip, backend, snat_port)) {
        // SAFETY: a map value pointer stays valid for the program's run.
        unsafe { (*reverse).ended = note_segment((*reverse).ended, packet.tcp_flags, false) };
    }
}

/// Gives back the port a new NAT flow had reserved (the flow found no room in `CONNS`). Apart,
/// in a frame of its own: the reply key must not grow the balancing call chain's stack.
#[inline(never)]
fn release_port(packet: &Packet, vip: &VipMeta, backend: &Backend, snat_port: u16) {
    let _ = NAT_REV.remove(&reply_key(&packet.flow, vip, backend, snat_port));
}

/// Reserves a source port towards `backend` by creating the reply-direction entry: the first
/// candidate that is free, or whose connection has ended or gone quiet
/// (`lb_common::nat::may_take_port`).
#[inline(never)]
fn allocate_snat_port(
    packet: &Packet,
    vip: &VipMeta,
    backend: &Backend,
    hash: u32,
    reverse: &NatReverse,
) -> Result<u16, Reason> {
    for attempt in 0..NAT_PORT_TRIES {
        let port = snat_port_candidate(hash, attempt, vip.snat_port_min, vip.snat_port_max).to_be();
        let reply = reply_key(&packet.flow, vip, backend, port);
        match claim_port(&reply, reverse) {
            Claim::Claimed => return Ok(port),
            // Another candidate would find the table as full.
            Claim::NoRoom => return Err(Reason::DropTableFull),
            Claim::Busy => {}
        }
    }
    Err(Reason::DropNatPorts)
}

/// What asking for a port came to.
enum Claim {
    Claimed,
    /// Another connection holds it.
    Busy,
    /// The port is free but `NAT_REV` is full.
    NoRoom,
}

const E2BIG: i32 = 7;

/// Gives the port in `reply` to `reverse`'s flow when it is free (BPF_NOEXIST makes that
/// race-free across CPUs), when that flow held it already, or when the connection holding it
/// has ended or gone quiet (`lb_common::nat::may_take_port`).
///
/// A lookup first: an insert attempt on a taken port would cost more.
#[inline(never)]
fn claim_port(reply: &FlowKey, reverse: &NatReverse) -> Claim {
    let Some(taken) = NAT_REV.get_ptr(reply) else {
        return match NAT_REV.insert(reply, reverse, BPF_NOEXIST) {
            Ok(()) => Claim::Claimed,
            Err(error) if error == -E2BIG => Claim::NoRoom,
            // Another CPU claimed it first.
            Err(_) => Claim::Busy,
        };
    };
    // SAFETY: a map value pointer stays valid for the program's run.
    let taken = unsafe { &*taken };
    let holder = client_flow(reply, taken);
    // The holder's own table entry tells when its client last sent, if it still uses the port.
    let holder_state = match CONNS.get_ptr(&holder) {
        // SAFETY: as above.
        Some(conn) if unsafe { (*conn).snat_port } == reply.dport => {
            Some(unsafe { Holder { last_seen: (*conn).last_seen, flags: (*conn).flags } })
        }
        _ => None,
    };
    if !may_take_port(taken, reverse, reply.proto, holder_state, reverse.last_seen) {
        return Claim::Busy;
    }
    // One number across the calls below (see above).
    let held = match holder_state {
        Some(holder) if holder.half_open() => 2u8,
        Some(_) => 1,
        None => 0,
    };
    // Replacing an entry needs no free one: this succeeds in a full table too.
    if NAT_REV.insert(reply, reverse, BPF_ANY).is_err() {
        return Claim::Busy;
    }
    if held != 0 {
        // The old flow's late packets must not reach the backend on the new flow's tuple.
        let _ = CONNS.remove(&holder);
    }
    if held == 2 {
        flow_event(FlowEvent::HalfOpenPortTaken);
    }
    Claim::Claimed
}
