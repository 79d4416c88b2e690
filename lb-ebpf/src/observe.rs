//! Passive failure detection: how each backend answers new NAT flows (refused or answered), or
//! leaves them unanswered, counted in `OBSERVED` for the daemon, which takes out a backend that
//! refuses them or does not answer.

use crate::balance::{now, reply_key};
use crate::maps::{BACKENDS, CONNS, NAT_REV, OBSERVED};
use lb_common::maps::{Backend, FlowKey, NatReverse, VIP_ADDR_VIP, VIP_OBSERVE, VipMeta};
use lb_common::nat::{REFUSAL_HELD, client_flow, refusal_held_before, retried_unanswered};

/// The backend's first answer to a NAT flow (`reply`, its entry `reverse`): counted for the
/// backend the client flow went to, as long as that flow still holds this reply's source port
/// (a flow placed anew since, on another backend, is not this backend's to answer for).
/// Returns whether the answer is held back: a refusal, for a VIP with `observe` (the VIP is
/// looked up here, on a flow's first answer only, so that new flows carry nothing more).
/// Apart, in a frame of its own: the NAT reply path and the ICMP relay both call it.
#[inline(never)]
pub fn note_answer(reply: &FlowKey, reverse: &NatReverse, refused: bool) -> bool {
    let client = client_flow(reply, reverse);
    if let Some(conn) = CONNS.get_ptr(&client) {
        // SAFETY: a map value pointer stays valid for the program's run.
        let conn = unsafe { &*conn };
        if conn.snat_port == reply.dport {
            count(conn.backend, refused);
        }
    }
    refused && crate::find_vip(&client, VIP_ADDR_VIP).is_some_and(|vip| vip.flags & VIP_OBSERVE != 0)
}

/// A client's SYN for a NAT flow of a VIP with `observe`: when the flow already holds a port
/// towards a backend that has not answered it, this is its SYN again, and an attempt that
/// backend left unanswered (`lb_common::nat::retried_unanswered`). Looked up here, before the
/// port allocator gives the flow its port back and forgets: a branch there would be followed
/// by the verifier for every port it tries.
/// Returns whether a refusal of the flow was held back already (its mark goes on to the entry
/// `choose` writes, [`carry_refusal_held`]).
#[inline(never)]
pub fn note_syn_again(flow: &FlowKey, vip: &VipMeta) -> bool {
    let Some(conn) = CONNS.get_ptr(flow) else {
        return false;
    };
    // SAFETY: a map value pointer stays valid for the program's run.
    let (index, snat_port) = unsafe { ((*conn).backend, (*conn).snat_port) };
    let Some(backend) = BACKENDS.get(index) else {
        return false;
    };
    let Some(reverse) = NAT_REV.get_ptr(&reply_key(flow, vip, backend, snat_port)) else {
        return false;
    };
    // SAFETY: as above.
    let reverse = unsafe { &*reverse };
    if retried_unanswered(reverse, flow, now())
        && let Some(attempts) = OBSERVED.get_ptr_mut(index)
    {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { (*attempts).unanswered += 1 };
    }
    refusal_held_before(reverse, flow)
}

/// The flow's SYN came again after one of its refusals was held back: the entry of the port it
/// now holds says so, and the next refusal reaches the client.
#[inline(never)]
pub fn carry_refusal_held(flow: &FlowKey, vip: &VipMeta, backend: &Backend, snat_port: u16) {
    if let Some(reverse) = NAT_REV.get_ptr_mut(&reply_key(flow, vip, backend, snat_port)) {
        // SAFETY: a map value pointer stays valid for the program's run.
        unsafe { (*reverse).awaiting |= REFUSAL_HELD };
    }
}

#[inline(always)]
fn count(backend: u32, refused: bool) {
    if let Some(attempts) = OBSERVED.get_ptr_mut(backend) {
        // SAFETY: per-CPU value, only this CPU writes it.
        let attempts = unsafe { &mut *attempts };
        if refused {
            attempts.refused += 1;
        } else {
            attempts.answered += 1;
        }
    }
}
