//! Backend-side decapsulation (`lb decap`): the `lb_decap` program's verdicts, maps and settings.
//!
//! A backend of an `ipip` or `gue` VIP receives the client's packet inside the tunnel headers of
//! [`crate::tunnel`]. `lb_decap` strips them when the outer destination is this host's and the
//! inner destination an address the host holds (the VIP on loopback), and hands the inner packet
//! to the stack; everything else passes untouched, except tunnelled packets it must not deliver,
//! which it drops and counts.

use crate::maps::{XDP_DROP, XDP_PASS};

/// The XDP program's function name.
pub const DECAP_PROGRAM_NAME: &str = "lb_decap";
/// One [`DecapSettings`].
pub const MAP_DECAP_SETTINGS: &str = "DECAP_SETTINGS";
/// Per-CPU packet counters indexed by [`DecapVerdict`].
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";
/// Counter slots in `DECAP_STATS`: room for verdicts yet to come, so that pinned counters keep
/// their layout. Verdicts are appended, never renumbered.
pub const DECAP_VERDICT_SLOTS: u32 = 16;

/// The program's settings, the single entry of `DECAP_SETTINGS`, written before it is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapSettings {
    /// The UDP port GUE arrives on, in network byte order; 0: GUE is not decapsulated (UDP is
    /// then never a tunnel).
    pub gue_port: u16,
    pub _pad: [u8; 2],
}

/// What the program did with a packet, and why. Indexes `DECAP_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecapVerdict {
    /// Not IP, or IP that carries no tunnel (no IPIP / IPv6-in-IP, UDP to another port).
    PassNotTunnel = 0,
    /// An outer header that is cut short or contradicts itself: the kernel's to judge.
    PassBadOuter = 1,
    /// A fragment of a tunnel datagram (IPv4 MF or offset): the kernel reassembles it. The load
    /// balancer sends DF, so these come from elsewhere.
    PassOuterFragment = 2,
    /// An outer IPv6 header followed by extension headers: left to the kernel.
    PassOuterExtHeader = 3,
    /// A tunnel packet whose outer destination the kernel forwards (not this host's): on its way
    /// elsewhere, untouched.
    PassTransit = 4,
    /// Tunnel headers stripped, the inner packet handed to the stack.
    PassDecapsulated = 5,
    /// A tunnel packet for this host that is not well formed: GUE version, control bit or
    /// header length not 0, an unknown inner protocol, an inner header cut short or of the
    /// other family, or lengths that disagree.
    DropMalformed = 6,
    /// The inner packet is a tunnel packet itself.
    DropNested = 7,
    /// The inner destination is not this host's (the kernel would forward it, or it is
    /// multicast): decapsulating it would make this host an open relay.
    DropNotLocal = 8,
    /// The outer header was marked "congestion experienced" on the way, but the inner packet is
    /// not ECN-capable: dropped, as RFC 6040 has it (the mark would otherwise be lost, and the
    /// drop is the congestion signal its sender understands).
    DropCongestionNotEct = 9,
}

pub const DECAP_VERDICT_COUNT: u32 = 10;
const _: () = assert!(DECAP_VERDICT_COUNT <= DECAP_VERDICT_SLOTS);

impl DecapVerdict {
    pub const ALL: [DecapVerdict; DECAP_VERDICT_COUNT as usize] = [
        DecapVerdict::PassNotTunnel,
        DecapVerdict::PassBadOuter,
        DecapVerdict::PassOuterFragment,
        DecapVerdict::PassOuterExtHeader,
        DecapVerdict::PassTransit,
        DecapVerdict::PassDecapsulated,
        DecapVerdict::DropMalformed,
        DecapVerdict::DropNested,
        DecapVerdict::DropNotLocal,
        DecapVerdict::DropCongestionNotEct,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapVerdict::PassNotTunnel => "pass_not_tunnel",
            DecapVerdict::PassBadOuter => "pass_bad_outer",
            DecapVerdict::PassOuterFragment => "pass_outer_fragment",
            DecapVerdict::PassOuterExtHeader => "pass_outer_ext_header",
            DecapVerdict::PassTransit => "pass_transit",
            DecapVerdict::PassDecapsulated => "pass_decapsulated",
            DecapVerdict::DropMalformed => "drop_malformed",
            DecapVerdict::DropNested => "drop_nested",
            DecapVerdict::DropNotLocal => "drop_not_local",
            DecapVerdict::DropCongestionNotEct => "drop_congestion_not_ect",
        }
    }

    /// The XDP verdict that goes with it.
    pub const fn xdp_action(self) -> u32 {
        match self {
            DecapVerdict::DropMalformed
            | DecapVerdict::DropNested
            | DecapVerdict::DropNotLocal
            | DecapVerdict::DropCongestionNotEct => XDP_DROP,
            _ => XDP_PASS,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], integers and a byte array with explicit padding: every bit pattern is valid.
unsafe impl aya::Pod for DecapSettings {}

const _: () = assert!(core::mem::size_of::<DecapSettings>() == 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_numbered_in_order_and_named_once() {
        for (i, verdict) in DecapVerdict::ALL.iter().enumerate() {
            assert_eq!(*verdict as u32, i as u32);
            assert!(DecapVerdict::ALL[i + 1..].iter().all(|other| other.name() != verdict.name()));
            let drops = verdict.name().starts_with("drop_");
            assert_eq!(verdict.xdp_action() == XDP_DROP, drops, "{}", verdict.name());
        }
    }
}
