//! Passive failure detection: how each backend answers new NAT flows (refused or answered),
//! counted in `OBSERVED` for the daemon, which takes out a backend that refuses them.

use crate::maps::{CONNS, OBSERVED};
use lb_common::maps::{FlowKey, NatReverse, VIP_ADDR_VIP, VIP_OBSERVE};
use lb_common::nat::client_flow;

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
