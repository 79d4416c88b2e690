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
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CHECK: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// More-fragments flag and fragment offset, in host order after `u16::from_be`.
    pub const MF_OFFSET_MASK: u16 = 0x3fff;
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

/// IPv6 extension headers (RFC 8200 and the IANA list): the program does not walk them, it
/// hands such packets to the kernel.
pub const fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
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

/// True for any fragment of a fragmented IPv4 datagram (first, middle or last).
/// `frag_field` is the flags/offset word in host order.
pub const fn is_ipv4_fragment(frag_field: u16) -> bool {
    frag_field & ipv4::MF_OFFSET_MASK != 0
}
