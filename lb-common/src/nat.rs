//! How long a NAT source port stays with its connection. Each new NAT flow reserves a port
//! towards its backend with a `NAT_REV` entry; nothing else ever frees that entry while the
//! table has room, so the ports of finished connections must be taken back by the allocator:
//! a port whose connection has ended, or gone quiet, goes to the next flow that needs it.
//!
//! The waits follow what the backend still remembers of the four-tuple: nothing once it has
//! closed after the client (a few seconds for a lost last ACK), TIME_WAIT (60 s on Linux) when
//! it closed first, and idle timeouts in the spirit of IPVS and conntrack otherwise.

use crate::maps::{CONN_HALF_OPEN, CONN_OPENED_IN_FLOOD, ConnState, FlowKey, NatReverse, PROTO_TCP};
use crate::packet::{TCP_FLAG_FIN, TCP_FLAG_RST};

/// The program's clock: monotonic nanoseconds >> 20, about 1.05 ms per tick; a u32 of them
/// wraps after about 52 days, far beyond any wait below.
pub const TICK_SHIFT: u32 = 20;

pub const fn ticks(monotonic_ns: u64) -> u32 {
    (monotonic_ns >> TICK_SHIFT) as u32
}

pub const fn seconds(s: u64) -> u32 {
    ticks(s * 1_000_000_000)
}

/// `ended` bits of a [`NatReverse`].
pub const ENDED_FIN_CLIENT: u8 = 1;
pub const ENDED_FIN_BACKEND: u8 = 2;
/// The backend's FIN came before the client's: the backend keeps the tuple in TIME_WAIT.
pub const ENDED_BACKEND_FIRST: u8 = 4;
pub const ENDED_RESET: u8 = 8;

/// [`NatReverse::awaiting`]: the backend has not answered this new flow yet; its first answer
/// is counted in `OBSERVED` (refused or answered). For a VIP with `observe`, a refusal as the
/// first answer is held back (see `Reason::DropRefusalHeld`).
pub const AWAITING_ANSWER: u8 = 1;
/// [`NatReverse::awaiting`]: a refusal of this client flow was held back once already; the
/// next one reaches the client (a port closed on every backend is refused, a second late).
pub const REFUSAL_HELD: u8 = 2;

/// Whether a refusal that is a flow's first answer, for a VIP with `observe`, is held back:
/// once per client flow.
#[inline(always)]
pub const fn holds_refusal(awaiting: u8) -> bool {
    awaiting & REFUSAL_HELD == 0
}

/// Whether a TCP segment (flags; 0 for UDP), as a flow's first answer, refuses the connection.
#[inline(always)]
pub const fn refuses(tcp_flags: u8) -> bool {
    tcp_flags & TCP_FLAG_RST != 0
}

/// Whether an ICMP error quoting a flow's packet to its backend says the backend refused it:
/// destination unreachable, except "fragmentation needed" (path MTU discovery).
#[inline(always)]
pub const fn icmp_refuses(family: u8, icmp_type: u8, code: u8) -> bool {
    use crate::packet::icmp;
    if family == crate::maps::FAMILY_V4 {
        icmp_type == icmp::DEST_UNREACH_V4 && code != icmp::FRAG_NEEDED_CODE
    } else {
        icmp_type == icmp::DEST_UNREACH_V6
    }
}

/// Closed, the backend closing last: only a lost final ACK can still need the tuple.
pub const CLOSED_WAIT: u32 = seconds(5);
/// Closed, the backend closing first: Linux's TIME_WAIT length.
pub const BACKEND_TIME_WAIT: u32 = seconds(60);
/// The client flow no longer uses this port (its table entry moved or was evicted).
pub const ORPHAN_WAIT: u32 = seconds(60);
/// A half-open flow (a SYN, then nothing from its client: see `CONN_HALF_OPEN`) keeps its port
/// this long: beyond a handshake's round trip, and short enough that a flood of spoofed SYNs
/// holds at most a second's worth of ports. A client whose SYN-ACK was lost sends its SYN
/// again after a second (Linux), and gets its port back if nobody took it, or another.
pub const HALF_OPEN_WAIT: u32 = seconds(1);
/// The same while the daemon sees a flood of new flows (`Settings::flood`): a handshake's round
/// trip across continents still fits, and a flood holds at most a third of a second's worth of
/// ports, so that ports stay free for real clients at several times the rate.
pub const HALF_OPEN_WAIT_FLOODED: u32 = ticks(300_000_000);

/// How long a half-open flow keeps its port, by its `ConnState::flags`. Arithmetic rather than
/// a condition: the verifier then follows one path, not two per port tried.
#[inline(always)]
pub const fn half_open_wait(flags: u8) -> u32 {
    let flooded = (flags & CONN_OPENED_IN_FLOOD != 0) as u32;
    HALF_OPEN_WAIT - flooded * (HALF_OPEN_WAIT - HALF_OPEN_WAIT_FLOODED)
}
/// Open connections that went quiet (IPVS: 900 s for TCP; conntrack: 30 s for UDP).
pub const TCP_IDLE: u32 = seconds(900);
pub const UDP_IDLE: u32 = seconds(30);

/// The `ended` bits after a TCP segment with `tcp_flags` (from the backend or from the client).
pub const fn note_segment(ended: u8, tcp_flags: u8, from_backend: bool) -> u8 {
    let mut ended = ended;
    if tcp_flags & TCP_FLAG_RST != 0 {
        ended |= ENDED_RESET;
    }
    if tcp_flags & TCP_FLAG_FIN != 0 {
        if from_backend {
            if ended & ENDED_FIN_CLIENT == 0 {
                ended |= ENDED_BACKEND_FIRST;
            }
            ended |= ENDED_FIN_BACKEND;
        } else {
            ended |= ENDED_FIN_CLIENT;
        }
    }
    ended
}

/// The client flow (its `CONNS` key) that holds the port of the reply flow `reply`.
#[inline(always)]
pub const fn client_flow(reply: &FlowKey, reverse: &NatReverse) -> FlowKey {
    FlowKey {
        src: reverse.client_addr,
        dst: reverse.vip_addr,
        sport: reverse.client_port,
        dport: reverse.vip_port,
        proto: reply.proto,
        family: reply.family,
        _pad: [0; 2],
    }
}

/// Ticks from `since` to `now`; a `since` just after `now` (another CPU wrote it meanwhile) is 0.
const fn elapsed(since: u32, now: u32) -> u32 {
    let d = now.wrapping_sub(since);
    if d > u32::MAX / 2 { 0 } else { d }
}

/// The client flow that holds a port, as its `CONNS` entry tells (when that entry still uses
/// the port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// When its client last sent.
    pub last_seen: u32,
    /// Its `ConnState::flags` (`CONN_HALF_OPEN`: its client sent a SYN and nothing since).
    pub flags: u8,
}

impl Holder {
    #[inline(always)]
    pub const fn half_open(&self) -> bool {
        self.flags & CONN_HALF_OPEN != 0
    }
}

/// Whether the port `taken` holds may go to the flow that asks for it (`claimant`, the reverse
/// entry that flow would write): when it is the same client flow asking again (its table entry
/// was lost: evicted, cleared with a down backend, or never synchronised to this node); when
/// the holder is half-open and its client has been quiet for [`half_open_wait`] (shorter when
/// it opened during a flood); or when the holder's connection has ended or gone quiet ([`reclaimable`]).
#[inline(always)]
pub const fn may_take_port(
    taken: &NatReverse,
    claimant: &NatReverse,
    proto: u8,
    holder: Option<Holder>,
    now: u32,
) -> bool {
    same_client_flow(taken, claimant) || port_free(taken, proto, holder, now)
}

/// Whether the port `taken` holds is free at `now` for any flow: its holder is half-open and
/// its client has been quiet for [`half_open_wait`], or its connection has ended or gone quiet
/// ([`reclaimable`]). The program gives such a port to the next flow that asks for it; the
/// daemon's sweep removes its entry (with the holder's, `lb-userspace/src/dataplane/sweep.rs`).
#[inline(always)]
pub const fn port_free(taken: &NatReverse, proto: u8, holder: Option<Holder>, now: u32) -> bool {
    match holder {
        // Judged by the client alone: the backend answers a spoofed SYN, and repeats its answer.
        Some(holder) if holder.half_open() => elapsed(holder.last_seen, now) >= half_open_wait(holder.flags),
        Some(Holder { last_seen, .. }) => reclaimable(taken, proto, Some(last_seen), now),
        None => reclaimable(taken, proto, None, now),
    }
}

/// Whether the daemon's sweep removes a connection-table entry that holds no NAT port (a DSR
/// or tunnel flow, or a NAT flow whose port entry is gone): once its client has been quiet
/// for the protocol's idle time, or for [`half_open_wait`] after a SYN and nothing else. The
/// flow's next packet, if one comes, is placed by the Maglev table again: on the same backend
/// unless the table changed meanwhile. NAT flows that hold a port go with it ([`port_free`]).
pub const fn conn_expired(conn: &ConnState, proto: u8, now: u32) -> bool {
    let wait = if conn.flags & CONN_HALF_OPEN != 0 {
        half_open_wait(conn.flags)
    } else if proto == PROTO_TCP {
        TCP_IDLE
    } else {
        UDP_IDLE
    };
    elapsed(conn.last_seen, now) >= wait
}

/// A client's SYN for a flow sooner than this after the SYN that placed it is a duplicate, not
/// a retransmission (Linux retransmits after 1 s): a backend that is up answers well within
/// it, and SYNs sent in pairs (spoofed ones too) cannot make it look silent.
pub const SYN_AGAIN_AFTER: u32 = ticks(500_000_000);

/// Whether a client's SYN for `flow` at `now` finds the flow's reverse entry (`reverse`, at
/// the port its table entry holds) still waiting for the backend's first answer, placed at
/// least [`SYN_AGAIN_AFTER`] ago: the SYN retransmitted, an attempt that backend left
/// unanswered (`observe`). The first answer clears `awaiting`, so a refusal that was held
/// back, then retried by the client, is not counted a second time. The entry may belong to
/// another flow by now (the port was taken back): then it is not this one's.
#[inline(always)]
pub const fn retried_unanswered(reverse: &NatReverse, flow: &FlowKey, now: u32) -> bool {
    reverse.awaiting & AWAITING_ANSWER != 0
        && elapsed(reverse.last_seen, now) >= SYN_AGAIN_AFTER
        && names_flow(reverse, flow)
}

/// Whether a client's SYN for `flow` finds that a refusal of the flow was held back already
/// ([`REFUSAL_HELD`] on the reverse entry of the port its table entry holds): the entry its
/// SYN now gets carries the mark on, so that the next refusal reaches the client.
#[inline(always)]
pub const fn refusal_held_before(reverse: &NatReverse, flow: &FlowKey) -> bool {
    reverse.awaiting & REFUSAL_HELD != 0 && names_flow(reverse, flow)
}

/// Whether `reverse` was made for the client flow `flow` (its `CONNS` key).
#[inline(always)]
pub const fn names_flow(reverse: &NatReverse, flow: &FlowKey) -> bool {
    reverse.client_port == flow.sport
        && reverse.vip_port == flow.dport
        && same_address(&reverse.client_addr, &flow.src)
        && same_address(&reverse.vip_addr, &flow.dst)
}

/// Whether two reverse entries were made for the same client flow.
#[inline(always)]
pub const fn same_client_flow(a: &NatReverse, b: &NatReverse) -> bool {
    a.client_port == b.client_port
        && a.vip_port == b.vip_port
        && same_address(&a.client_addr, &b.client_addr)
        && same_address(&a.vip_addr, &b.vip_addr)
}

/// Two 16-byte addresses compared as two words (no byte loop, no memcmp in the program).
#[inline(always)]
const fn same_address(a: &[u8; 16], b: &[u8; 16]) -> bool {
    word(a, 0) == word(b, 0) && word(a, 8) == word(b, 8)
}

#[inline(always)]
const fn word(x: &[u8; 16], at: usize) -> u64 {
    u64::from_ne_bytes([x[at], x[at + 1], x[at + 2], x[at + 3], x[at + 4], x[at + 5], x[at + 6], x[at + 7]])
}

/// Whether the port `reverse` holds may go to a new flow at `now`. `client_last_seen` is the
/// client flow's `CONNS` timestamp when that entry still uses this port, None otherwise.
pub const fn reclaimable(reverse: &NatReverse, proto: u8, client_last_seen: Option<u32>, now: u32) -> bool {
    let backend_quiet = elapsed(reverse.last_seen, now);
    let quiet = match client_last_seen {
        Some(seen) => {
            let client_quiet = elapsed(seen, now);
            if client_quiet < backend_quiet { client_quiet } else { backend_quiet }
        }
        None => backend_quiet,
    };
    let ended = reverse.ended;
    let wait = if ended & ENDED_RESET != 0 {
        CLOSED_WAIT
    } else if ended & (ENDED_FIN_CLIENT | ENDED_FIN_BACKEND) == ENDED_FIN_CLIENT | ENDED_FIN_BACKEND {
        if ended & ENDED_BACKEND_FIRST != 0 { BACKEND_TIME_WAIT } else { CLOSED_WAIT }
    } else if client_last_seen.is_none() {
        ORPHAN_WAIT
    } else if proto == PROTO_TCP {
        TCP_IDLE
    } else {
        UDP_IDLE
    };
    quiet >= wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::PROTO_UDP;

    const NOW: u32 = 1_000_000;

    fn reverse(ended: u8, last_seen: u32) -> NatReverse {
        NatReverse { ended, last_seen, ..Default::default() }
    }

    fn closed(backend_first: bool) -> u8 {
        let client = [(TCP_FLAG_FIN, false), (TCP_FLAG_FIN, true)];
        let order = if backend_first { [client[1], client[0]] } else { client };
        order.iter().fold(0, |ended, &(flags, from_backend)| note_segment(ended, flags, from_backend))
    }

    #[test]
    fn who_closed_first_is_remembered() {
        assert_eq!(closed(false), ENDED_FIN_CLIENT | ENDED_FIN_BACKEND);
        assert_eq!(closed(true), ENDED_FIN_CLIENT | ENDED_FIN_BACKEND | ENDED_BACKEND_FIRST);
        assert_eq!(note_segment(0, TCP_FLAG_RST, false), ENDED_RESET);
        assert_eq!(note_segment(0, 0x10, true), 0, "a plain ACK changes nothing");
    }

    #[test]
    fn a_closed_connection_frees_its_port_after_the_backend_can_no_longer_need_it() {
        let client_closed_first = reverse(closed(false), NOW - CLOSED_WAIT);
        assert!(reclaimable(&client_closed_first, PROTO_TCP, Some(NOW - CLOSED_WAIT), NOW));
        assert!(!reclaimable(&client_closed_first, PROTO_TCP, Some(NOW - 1), NOW), "the client is still sending");
        // The backend closed first: it holds the tuple in TIME_WAIT for 60 s.
        let backend_closed_first = reverse(closed(true), NOW - CLOSED_WAIT);
        assert!(!reclaimable(&backend_closed_first, PROTO_TCP, Some(NOW - CLOSED_WAIT), NOW));
        let later = reverse(closed(true), NOW - BACKEND_TIME_WAIT);
        assert!(reclaimable(&later, PROTO_TCP, Some(NOW - BACKEND_TIME_WAIT), NOW));
        assert!(reclaimable(&reverse(ENDED_RESET, NOW - CLOSED_WAIT), PROTO_TCP, None, NOW));
    }

    #[test]
    fn an_open_connection_keeps_its_port_until_it_goes_quiet() {
        let open = reverse(0, NOW - TCP_IDLE + 1);
        assert!(!reclaimable(&open, PROTO_TCP, Some(NOW - TCP_IDLE), NOW));
        assert!(reclaimable(&reverse(0, NOW - TCP_IDLE), PROTO_TCP, Some(NOW - TCP_IDLE), NOW));
        // Half-closed is still open: the other side may send for as long as it likes.
        let half = reverse(ENDED_FIN_CLIENT, NOW - seconds(600));
        assert!(!reclaimable(&half, PROTO_TCP, Some(NOW - seconds(600)), NOW));
        assert!(!reclaimable(&reverse(0, NOW - UDP_IDLE + 1), PROTO_UDP, Some(NOW), NOW));
        assert!(reclaimable(&reverse(0, NOW - UDP_IDLE), PROTO_UDP, Some(NOW - UDP_IDLE), NOW));
    }

    #[test]
    fn a_port_the_client_flow_left_waits_out_time_wait() {
        let orphan = reverse(0, NOW - ORPHAN_WAIT + 1);
        assert!(!reclaimable(&orphan, PROTO_TCP, None, NOW));
        assert!(reclaimable(&reverse(0, NOW - ORPHAN_WAIT), PROTO_TCP, None, NOW));
    }

    #[test]
    fn a_timestamp_from_just_after_now_counts_as_now() {
        let racing = reverse(ENDED_RESET, NOW + 3);
        assert!(!reclaimable(&racing, PROTO_TCP, None, NOW));
    }

    #[test]
    fn a_flow_that_lost_its_entry_gets_its_own_port_back_at_once() {
        let holder = NatReverse {
            client_addr: [10; 16],
            vip_addr: [20; 16],
            client_port: 4000,
            vip_port: 80,
            last_seen: NOW,
            ..Default::default()
        };
        assert!(!reclaimable(&holder, PROTO_TCP, None, NOW), "a fresh orphan waits out TIME_WAIT");
        assert!(may_take_port(&holder, &holder, PROTO_TCP, None, NOW), "its own flow takes it back");
        for other in [
            NatReverse { client_port: 4001, ..holder },
            NatReverse { vip_port: 443, ..holder },
            NatReverse { client_addr: [11; 16], ..holder },
            NatReverse { vip_addr: [21; 16], ..holder },
        ] {
            assert!(!may_take_port(&holder, &other, PROTO_TCP, None, NOW), "another flow waits: {other:?}");
        }
    }

    #[test]
    fn a_syn_again_before_any_answer_is_an_unanswered_attempt() {
        let flow =
            FlowKey { src: [10; 16], dst: [20; 16], sport: 4000, dport: 80, proto: PROTO_TCP, ..Default::default() };
        let reverse = NatReverse {
            client_addr: flow.src,
            vip_addr: flow.dst,
            client_port: flow.sport,
            vip_port: flow.dport,
            awaiting: AWAITING_ANSWER,
            last_seen: NOW,
            ..Default::default()
        };
        let retransmitted = NOW + seconds(1);
        assert!(retried_unanswered(&reverse, &flow, retransmitted));
        assert!(retried_unanswered(&reverse, &flow, NOW + SYN_AGAIN_AFTER));
        assert!(!retried_unanswered(&reverse, &flow, NOW + SYN_AGAIN_AFTER - 1), "a duplicate SYN");
        let answered = NatReverse { awaiting: 0, ..reverse };
        assert!(!retried_unanswered(&answered, &flow, retransmitted), "answered (or refused, held back) before");
        for other in [
            FlowKey { sport: 4001, ..flow },
            FlowKey { dport: 443, ..flow },
            FlowKey { src: [11; 16], ..flow },
            FlowKey { dst: [21; 16], ..flow },
        ] {
            assert!(!retried_unanswered(&reverse, &other, retransmitted), "the port went to another flow: {other:?}");
        }
    }

    #[test]
    fn a_flows_refusal_is_held_back_once_and_the_mark_follows_its_next_syn() {
        let flow = FlowKey { src: [10; 16], dst: [20; 16], sport: 4000, dport: 80, ..Default::default() };
        let fresh = NatReverse {
            client_addr: flow.src,
            vip_addr: flow.dst,
            client_port: flow.sport,
            vip_port: flow.dport,
            awaiting: AWAITING_ANSWER,
            ..Default::default()
        };
        assert!(holds_refusal(fresh.awaiting), "the first refusal is held back");
        let held = NatReverse { awaiting: REFUSAL_HELD, ..fresh };
        assert!(refusal_held_before(&held, &flow) && !refusal_held_before(&fresh, &flow));
        assert!(!refusal_held_before(&held, &FlowKey { sport: 4001, ..flow }), "another flow's mark");
        let carried = NatReverse { awaiting: AWAITING_ANSWER | REFUSAL_HELD, ..fresh };
        assert!(!holds_refusal(carried.awaiting), "the next refusal reaches the client");
        assert!(!retried_unanswered(&held, &flow, NOW + seconds(2)), "a held refusal was an answer");
    }

    #[test]
    fn a_half_open_flow_keeps_its_port_for_a_round_trip_and_less_during_a_flood() {
        let held = NatReverse { client_addr: [10; 16], client_port: 4000, last_seen: NOW, ..Default::default() };
        let claimant = NatReverse { client_port: 4001, ..held };
        let open = Some(Holder { last_seen: NOW, flags: 0 });
        for (flags, wait) in
            [(CONN_HALF_OPEN, HALF_OPEN_WAIT), (CONN_HALF_OPEN | CONN_OPENED_IN_FLOOD, HALF_OPEN_WAIT_FLOODED)]
        {
            assert_eq!(half_open_wait(flags), wait);
            let half_open = Some(Holder { last_seen: NOW, flags });
            let take = |holder, after: u32| may_take_port(&held, &claimant, PROTO_TCP, holder, NOW + after);
            assert!(!take(half_open, wait - 1), "flags {flags}: still within its wait");
            assert!(take(half_open, wait), "flags {flags}: a silent half-open flow gives its port up");
            assert!(!take(open, wait), "an open connection keeps its port");
            assert!(!take(open, TCP_IDLE - 1), "until it has been idle for TCP_IDLE");
        }
        assert!(HALF_OPEN_WAIT_FLOODED < HALF_OPEN_WAIT && HALF_OPEN_WAIT_FLOODED >= seconds(1) / 4);
    }

    #[test]
    fn the_sweep_removes_quiet_flows_by_protocol_and_half_open_ones_sooner() {
        let conn = |flags, quiet: u32| ConnState { flags, last_seen: NOW - quiet, ..Default::default() };
        assert!(!conn_expired(&conn(0, TCP_IDLE - 1), PROTO_TCP, NOW));
        assert!(conn_expired(&conn(0, TCP_IDLE), PROTO_TCP, NOW));
        assert!(!conn_expired(&conn(0, UDP_IDLE - 1), PROTO_UDP, NOW));
        assert!(conn_expired(&conn(0, UDP_IDLE), PROTO_UDP, NOW));
        assert!(!conn_expired(&conn(CONN_HALF_OPEN, HALF_OPEN_WAIT - 1), PROTO_TCP, NOW));
        assert!(conn_expired(&conn(CONN_HALF_OPEN, HALF_OPEN_WAIT), PROTO_TCP, NOW));
        let flooded = CONN_HALF_OPEN | CONN_OPENED_IN_FLOOD;
        assert!(conn_expired(&conn(flooded, HALF_OPEN_WAIT_FLOODED), PROTO_TCP, NOW));
        assert!(!conn_expired(&conn(0, 0), PROTO_TCP, NOW.wrapping_sub(5)), "written just after now");
    }

    #[test]
    fn a_free_port_is_free_for_every_flow_and_a_held_one_only_for_its_own() {
        let held = NatReverse { client_port: 4000, last_seen: NOW, ..Default::default() };
        let quiet = Some(Holder { last_seen: NOW - TCP_IDLE, flags: 0 });
        assert!(port_free(
            &held,
            PROTO_TCP,
            Some(Holder { last_seen: NOW, flags: CONN_HALF_OPEN }),
            NOW + HALF_OPEN_WAIT
        ));
        assert!(!port_free(&held, PROTO_TCP, quiet, NOW), "the backend spoke just now");
        assert!(port_free(&NatReverse { last_seen: NOW - TCP_IDLE, ..held }, PROTO_TCP, quiet, NOW));
        assert!(!port_free(&held, PROTO_TCP, None, NOW) && may_take_port(&held, &held, PROTO_TCP, None, NOW));
    }

    #[test]
    fn the_clock_wraps_without_harm() {
        let before_wrap = u32::MAX - CLOSED_WAIT / 2;
        let after_wrap = before_wrap.wrapping_add(CLOSED_WAIT);
        assert!(reclaimable(&reverse(ENDED_RESET, before_wrap), PROTO_TCP, None, after_wrap));
    }
}
