//! Tunnels to backends (`ipip`, `gue`): the outer headers the XDP program prepends and the
//! backend-side decapsulation (`lb decap`) strips, byte for byte.
//!
//! - IPIP: an outer IPv4 or IPv6 header whose next protocol is the inner packet's family
//!   (4 = IPv4, 41 = IPv6), so all four mixes work: 4in4, 6in6, 4in6 and 6in4.
//! - GUE (Generic UDP Encapsulation, draft-ietf-intarea-gue, variant 0 as Linux's `fou` speaks
//!   it): outer IP, UDP to the GUE port, a 4-byte GUE header naming the inner protocol, then the
//!   inner packet.
//!
//! The outer source carries the flow's entropy so that routers' ECMP and the backend NIC's RSS
//! spread flows: the low bits of the flow hash inside the configured source prefix, the IPv6
//! flow label, and GUE's UDP source port.

use crate::maps::{FAMILY_V4, FAMILY_V6};
use crate::packet::{ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, UDP_HLEN, icmp};

/// IP protocol numbers of a tunnelled packet.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// The UDP port GUE is sent to unless configured otherwise (`[daemon] gue_port`).
pub const GUE_DEFAULT_PORT: u16 = 6080;
/// GUE variant 0 without optional fields: version (2 bits) 0, control (1 bit) 0, header
/// length in words (5 bits) 0, the inner protocol, 16 bits of flags 0.
pub const GUE_HLEN: usize = 4;
/// `GUE header byte 0 >> 6`: the version this product sends and accepts.
pub const GUE_VERSION: u8 = 0;

/// The outer TTL / hop limit: a fresh header towards the backend (the inner one is untouched).
pub const OUTER_TTL: u8 = 64;

/// The IP protocol number that carries a packet of `family` inside IP.
#[inline(always)]
pub const fn inner_protocol(family: u8) -> u8 {
    if family == FAMILY_V6 { IPPROTO_IPV6 } else { IPPROTO_IPIP }
}

/// The family a tunnel's inner protocol number announces, if it announces one.
#[inline(always)]
pub const fn inner_family(protocol: u8) -> Option<u8> {
    match protocol {
        IPPROTO_IPIP => Some(FAMILY_V4),
        IPPROTO_IPV6 => Some(FAMILY_V6),
        _ => None,
    }
}

/// The bytes a tunnel adds in front of the inner IP packet.
#[inline(always)]
pub const fn overhead(outer_family: u8, gue: bool) -> usize {
    let ip = if outer_family == FAMILY_V6 { IPV6_HLEN } else { IPV4_MIN_HLEN };
    if gue { ip + UDP_HLEN + GUE_HLEN } else { ip }
}

/// The GUE header for an inner packet of `family`.
#[inline(always)]
pub const fn gue_header(family: u8) -> [u8; GUE_HLEN] {
    [GUE_VERSION << 6, inner_protocol(family), 0, 0]
}

/// Mixes the flow hash once more (murmur3's fmix32): the Maglev slot is `hash % ring_size`,
/// and entropy drawn from the same low bits would follow the backend choice.
#[inline(always)]
pub const fn entropy(hash: u32) -> u32 {
    crate::hash::fmix32(hash ^ 0x7f4a_7c15)
}

/// The outer source address for a flow: `prefix`'s first `prefix_len` bits, the rest from the
/// flow's entropy (a prefix of the full length is one fixed address). At most the last 32 bits
/// vary: a wider host part keeps the prefix's own bits above them. IPv4 uses the first 4 bytes
/// and leaves the rest zero.
#[inline(always)]
pub fn outer_source(prefix: &[u8; 16], prefix_len: u8, family: u8, hash: u32) -> [u8; 16] {
    let mut out = *prefix;
    // The last 32-bit word of the address, and how many of its leading bits are prefix.
    let (at, fixed_bits) =
        if family == FAMILY_V6 { (12, (prefix_len as u32).saturating_sub(96)) } else { (0, prefix_len as u32) };
    let fixed: u32 = if fixed_bits >= 32 { u32::MAX } else { !(u32::MAX >> fixed_bits) };
    let word = u32::from_be_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
    let word = (word & fixed) | (entropy(hash) & !fixed);
    out[at..at + 4].copy_from_slice(&word.to_be_bytes());
    out
}

/// GUE's UDP source port: in the dynamic range (49152–65535), from the flow's entropy.
#[inline(always)]
pub const fn gue_source_port(hash: u32) -> u16 {
    0xc000 | (entropy(hash) >> 18) as u16
}

/// The outer IPv6 header's flow label (RFC 6438), from the flow's entropy: 20 bits, not 0.
#[inline(always)]
pub const fn flow_label(hash: u32) -> u32 {
    let label = entropy(hash) & 0x000f_ffff;
    if label == 0 { 1 } else { label }
}

/// Writes an IPv4 header without options (20 bytes, checksum included), TTL 64, into `h`. As a
/// tunnel's outer header: DF set (the load balancer answers "fragmentation needed" itself when
/// a tunnelled packet would not fit), ID 0 as for any atomic datagram (RFC 6864), the inner
/// packet's TOS copied (DSCP, and ECN as RFC 6040's normal mode does). Written in place: the
/// XDP program hands the packet's own bytes, and keeps its stack small.
#[inline(always)]
pub fn write_ipv4_header(
    h: &mut [u8; IPV4_MIN_HLEN],
    src: &[u8; 16],
    dst: &[u8; 16],
    protocol: u8,
    tos: u8,
    payload_len: usize,
) {
    let total = (IPV4_MIN_HLEN + payload_len) as u16;
    h[0] = 0x45;
    h[1] = tos;
    h[2] = (total >> 8) as u8;
    h[3] = total as u8;
    h[4] = 0;
    h[5] = 0;
    h[6] = 0x40; // DF
    h[7] = 0;
    h[8] = OUTER_TTL;
    h[9] = protocol;
    h[10] = 0;
    h[11] = 0;
    h[12] = src[0];
    h[13] = src[1];
    h[14] = src[2];
    h[15] = src[3];
    h[16] = dst[0];
    h[17] = dst[1];
    h[18] = dst[2];
    h[19] = dst[3];
    let check = (!crate::csum::fold(crate::csum::add_words(0, h))).to_ne_bytes();
    h[10] = check[0];
    h[11] = check[1];
}

/// Writes an IPv6 header (40 bytes), hop limit 64, into `h`. As a tunnel's outer header: the
/// inner packet's traffic class, a flow label from the flow's entropy.
#[inline(always)]
pub fn write_ipv6_header(
    h: &mut [u8; IPV6_HLEN],
    src: &[u8; 16],
    dst: &[u8; 16],
    next_header: u8,
    traffic_class: u8,
    label: u32,
    payload_len: usize,
) {
    let first = ((6u32 << 28) | ((traffic_class as u32) << 20) | (label & 0x000f_ffff)).to_be_bytes();
    h[0] = first[0];
    h[1] = first[1];
    h[2] = first[2];
    h[3] = first[3];
    h[4] = (payload_len >> 8) as u8;
    h[5] = payload_len as u8;
    h[6] = next_header;
    h[7] = OUTER_TTL;
    let mut i = 0;
    while i < 16 {
        h[8 + i] = src[i];
        h[24 + i] = dst[i];
        i += 1;
    }
}

/// Writes the outer UDP header and GUE header of a GUE packet into `h`. The UDP checksum is 0:
/// allowed for IPv4, and for tunnels over IPv6 by RFC 6935/6936 (Linux's `fou` accepts it; the
/// inner packet keeps its own checksum).
#[inline(always)]
pub fn write_udp_gue(h: &mut [u8; UDP_HLEN + GUE_HLEN], sport: u16, dport: u16, inner_family: u8, inner_len: usize) {
    let len = (UDP_HLEN + GUE_HLEN + inner_len) as u16;
    let gue = gue_header(inner_family);
    h[0] = (sport >> 8) as u8;
    h[1] = sport as u8;
    h[2] = (dport >> 8) as u8;
    h[3] = dport as u8;
    h[4] = (len >> 8) as u8;
    h[5] = len as u8;
    h[6] = 0;
    h[7] = 0;
    h[8] = gue[0];
    h[9] = gue[1];
    h[10] = gue[2];
    h[11] = gue[3];
}

/// Health checks sent "via the VIP" (`via_vip`) carry a socket mark that names the backend and
/// how its client traffic travels; the load balancer's TC egress program (`lb_hc`) then sends
/// them exactly that way. The mark's upper 16 bits are this tag, so that other marks on the
/// host are left alone.
pub const CHECK_MARK_TAG: u32 = 0x4c42_0000;
const CHECK_MARK_INDEX_BITS: u32 = 14;

/// How a marked check packet travels: as the backend's client traffic does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckPath {
    /// Same L2 segment: only the MACs change (`dsr`).
    Direct,
    Ipip,
    Gue,
}

/// The socket mark of a check to backend slot `index` (below 2^14, as every `BACKENDS` index).
pub const fn check_mark(index: u32, path: CheckPath) -> u32 {
    let path = match path {
        CheckPath::Direct => 0,
        CheckPath::Ipip => 1,
        CheckPath::Gue => 2,
    };
    CHECK_MARK_TAG | (path << CHECK_MARK_INDEX_BITS) | (index & ((1 << CHECK_MARK_INDEX_BITS) - 1))
}

/// The backend slot and path a mark names; None for any other mark.
#[inline(always)]
pub const fn parse_check_mark(mark: u32) -> Option<(u32, CheckPath)> {
    if mark & 0xffff_0000 != CHECK_MARK_TAG {
        return None;
    }
    let path = match (mark >> CHECK_MARK_INDEX_BITS) & 3 {
        0 => CheckPath::Direct,
        1 => CheckPath::Ipip,
        2 => CheckPath::Gue,
        _ => return None,
    };
    Some((mark & ((1 << CHECK_MARK_INDEX_BITS) - 1), path))
}

/// How much of a packet that does not fit the tunnel an ICMP "fragmentation needed" / "packet
/// too big" answer quotes: its IP header and more than enough of the rest for the client to
/// find the flow, within IPv4's 576-byte limit for ICMP errors (RFC 1812). A fixed length keeps
/// the checksum one helper call.
pub const TOO_BIG_QUOTE: usize = 512;

/// The ICMP header of a "fragmentation needed" (IPv4: type 3 code 4, the next-hop MTU in the
/// last 16 bits, RFC 1191) or "packet too big" (IPv6: type 2 code 0, the MTU in the last 32
/// bits, RFC 4443) naming `fits`; checksum zero, to be filled in.
#[inline(always)]
pub fn too_big_icmp_header(family: u8, fits: usize) -> [u8; ICMP_HLEN] {
    let mtu = (fits as u32).to_be_bytes();
    if family == FAMILY_V6 {
        [icmp::PACKET_TOO_BIG_V6, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]]
    } else {
        [icmp::DEST_UNREACH_V4, icmp::FRAG_NEEDED_CODE, 0, 0, 0, 0, mtu[2], mtu[3]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&a);
        out
    }

    #[test]
    fn a_full_length_prefix_is_one_fixed_address() {
        let src = v4([10, 0, 0, 2]);
        for hash in [0, 1, 0xdead_beef, u32::MAX] {
            assert_eq!(outer_source(&src, 32, FAMILY_V4, hash), src);
        }
        let v6: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        assert_eq!(outer_source(&v6, 128, FAMILY_V6, 7), v6);
    }

    #[test]
    fn a_prefix_keeps_its_bits_and_spreads_the_rest() {
        let prefix = v4([172, 16, 0, 0]);
        let mut seen = std::collections::HashSet::new();
        for hash in 0..4096u32 {
            let src = outer_source(&prefix, 16, FAMILY_V4, hash.wrapping_mul(2_654_435_761));
            assert_eq!(&src[..2], &[172, 16]);
            assert_eq!(&src[4..], &[0; 12]);
            seen.insert([src[2], src[3]]);
        }
        // 4,096 draws over 65,536 host values: nearly all distinct when spread evenly.
        assert!(seen.len() > 3_900, "only {} distinct sources", seen.len());
        // A prefix that ends inside a byte keeps that byte's high bits.
        for hash in 0..256 {
            let src = outer_source(&v4([192, 168, 1, 0b1010_0000]), 27, FAMILY_V4, hash);
            assert_eq!(src[3] & 0b1110_0000, 0b1010_0000);
        }
    }

    #[test]
    fn ipv6_sources_vary_only_in_the_host_part() {
        let prefix: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0x42, 0, 0, 0, 0, 0, 0, 0, 0];
        for hash in 0..1000 {
            let src = outer_source(&prefix, 64, FAMILY_V6, hash);
            assert_eq!(&src[..8], &prefix[..8]);
            // Only the last 32 bits take entropy.
            assert_eq!(&src[8..12], &[0; 4]);
        }
    }

    #[test]
    fn entropy_fields_stay_in_their_ranges() {
        for hash in [0, 1, 0x8000_0000, u32::MAX, 12_345] {
            assert!(gue_source_port(hash) >= 0xc000);
            let label = flow_label(hash);
            assert!(label != 0 && label <= 0x000f_ffff);
        }
    }

    #[test]
    fn the_ipv4_outer_header_checks_out() {
        let mut h = [0xaa; 20];
        write_ipv4_header(&mut h, &v4([10, 0, 0, 2]), &v4([10, 2, 0, 5]), IPPROTO_IPIP, 0x2e, 60);
        assert_eq!(crate::csum::fold(crate::csum::add_words(0, &h)), 0xffff);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 80);
        assert_eq!(h[6] & 0x40, 0x40);
        assert_eq!((h[8], h[9]), (OUTER_TTL, IPPROTO_IPIP));
    }

    #[test]
    fn check_marks_name_backend_and_path_and_nothing_else() {
        for path in [CheckPath::Direct, CheckPath::Ipip, CheckPath::Gue] {
            for index in [0, 1, 16383] {
                assert_eq!(parse_check_mark(check_mark(index, path)), Some((index, path)));
            }
        }
        assert_eq!(parse_check_mark(0), None);
        assert_eq!(parse_check_mark(0x4c43_0001), None);
        assert_eq!(parse_check_mark(CHECK_MARK_TAG | 3 << 14), None);
    }

    #[test]
    fn gue_names_the_inner_family() {
        assert_eq!(gue_header(FAMILY_V4), [0, IPPROTO_IPIP, 0, 0]);
        assert_eq!(gue_header(FAMILY_V6), [0, IPPROTO_IPV6, 0, 0]);
        let mut u = [0xaa; 12];
        write_udp_gue(&mut u, 50000, GUE_DEFAULT_PORT, FAMILY_V6, 100);
        assert_eq!(u16::from_be_bytes([u[4], u[5]]), 112);
        assert_eq!(&u[8..], &gue_header(FAMILY_V6));
        assert_eq!(overhead(FAMILY_V4, false), 20);
        assert_eq!(overhead(FAMILY_V6, true), 52);
    }
}
