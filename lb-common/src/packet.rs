//! Wire layouts of the headers the data plane parses: sizes, offsets and protocol numbers.
//! Host-only helpers to build and check packets sit in [`build`].

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// The ICMP/ICMPv6 header: type, code, checksum and 4 bytes that depend on the type.
pub const ICMP_HLEN: usize = 8;
/// TTL or hop limit of the packets the program originates (echo replies).
pub const DEFAULT_TTL: u8 = 64;

/// Offsets inside an IPv4 header.
pub mod ipv4 {
    pub const VERSION_IHL: usize = 0;
    pub const TOTAL_LEN: usize = 2;
    pub const ID: usize = 4;
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CHECK: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

/// Offsets inside an IPv6 header.
pub mod ipv6 {
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
}

/// Offsets inside TCP and UDP headers (the ports sit at the same place in both).
pub mod l4 {
    pub const SPORT: usize = 0;
    pub const DPORT: usize = 2;
    pub const UDP_LEN: usize = 4;
    pub const UDP_CHECK: usize = 6;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECK: usize = 16;
}

/// Offsets and types of ICMP (IPv4) and ICMPv6 headers.
pub mod icmp {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECK: usize = 2;
    pub const ECHO_REQUEST_V4: u8 = 8;
    pub const ECHO_REPLY_V4: u8 = 0;
    pub const ECHO_REQUEST_V6: u8 = 128;
    pub const ECHO_REPLY_V6: u8 = 129;
    pub const DEST_UNREACH_V4: u8 = 3;
    pub const TIME_EXCEEDED_V4: u8 = 11;
    /// Destination unreachable, code "fragmentation needed and DF set" (path MTU discovery).
    pub const FRAG_NEEDED_CODE: u8 = 4;
    pub const DEST_UNREACH_V6: u8 = 1;
    pub const PACKET_TOO_BIG_V6: u8 = 2;
    pub const TIME_EXCEEDED_V6: u8 = 3;
}

/// An ICMP error the program relays: it quotes a packet of a flow, and that flow's ends must
/// hear of it (destination unreachable, including "fragmentation needed" / "packet too big"
/// for path MTU discovery, and time exceeded).
pub const fn is_icmp_error(family: u8, icmp_type: u8) -> bool {
    if family == crate::maps::FAMILY_V4 {
        matches!(icmp_type, icmp::DEST_UNREACH_V4 | icmp::TIME_EXCEEDED_V4)
    } else {
        matches!(icmp_type, icmp::DEST_UNREACH_V6 | icmp::PACKET_TOO_BIG_V6 | icmp::TIME_EXCEEDED_V6)
    }
}

/// The ICMP protocol number of an address family: ICMP in IPv4, ICMPv6 in IPv6. ICMP of the
/// other family (ICMPv6 in an IPv4 header) is not ICMP to the program.
pub const fn icmp_protocol(family: u8) -> u8 {
    if family == crate::maps::FAMILY_V4 { crate::maps::PROTO_ICMP } else { crate::maps::PROTO_ICMPV6 }
}

#[cfg(feature = "user")]
pub mod build;

/// IPv6 extension headers (RFC 8200 and the IANA list). The program walks hop-by-hop, routing
/// (when no segments are left: this host is the final destination), destination options and
/// fragment headers, at most [`MAX_IPV6_EXT_HEADERS`] of them; packets with any other (AH, ESP,
/// mobility, HIP, shim6, experimental) go to the kernel.
pub const fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// How many IPv6 extension headers the program walks before it gives a packet to the kernel:
/// real traffic carries one or two; a bound keeps the verifier's and the packet's cost fixed.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// IPv6 extension headers the program walks, and offsets inside them.
pub mod ipv6_ext {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DEST_OPTS: u8 = 60;
    pub const NEXT_HEADER: usize = 0;
    /// Hop-by-hop, routing, destination options: the length in 8-byte units after the first 8.
    pub const LEN: usize = 1;
    /// Routing header: addresses still to visit; 0 when this host is the final destination.
    pub const SEGMENTS_LEFT: usize = 3;
    /// Fragment header: offset (13 bits, in 8-byte units) << 3 | more-fragments, big-endian.
    pub const FRAG_OFFSET: usize = 2;
    pub const FRAG_ID: usize = 4;
    /// Every extension header is at least this long; a fragment header is exactly this long.
    pub const MIN_LEN: usize = 8;
}

/// Where a packet stands in its datagram's fragmentation.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram (also an IPv6 atomic fragment: offset 0, no more fragments).
    None = 0,
    /// Offset 0, more to come: it carries the TCP/UDP header.
    First = 1,
    /// A middle or last fragment: no ports, only the datagram's identification.
    Later = 2,
}

impl Fragment {
    /// From IPv4's flags/offset word, in host order.
    pub const fn of_ipv4(frag_field: u16) -> Self {
        if frag_field & 0x1fff != 0 {
            Fragment::Later
        } else if frag_field & 0x2000 != 0 {
            Fragment::First
        } else {
            Fragment::None
        }
    }

    /// From an IPv6 fragment header's offset word, in host order.
    pub const fn of_ipv6(offset_field: u16) -> Self {
        if offset_field & 0xfff8 != 0 {
            Fragment::Later
        } else if offset_field & 1 != 0 {
            Fragment::First
        } else {
            Fragment::None
        }
    }
}

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// A TCP segment that opens a connection (SYN without ACK). It is placed by the current table,
/// never by a connection-table entry: a client reusing a port must not be sent to the backend of
/// an old connection (which may be drained, or a backup no longer in use).
pub const fn opens_connection(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}
