//! Header parsing: Ethernet → IPv4 (any IHL, fragments) or IPv6 (extension headers, fragments)
//! → TCP, UDP or ICMP, into a [`Packet`].
//!
//! Every check that can refuse a packet returns the [`Reason`] it is counted under; the host
//! reference model (`lb_common::model`) applies the same rules in the same order.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::maps::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason};
use lb_common::packet::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Fragment, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, MAX_IPV6_EXT_HEADERS, TCP_MIN_HLEN,
    UDP_HLEN, icmp, icmp_protocol, ipv4, ipv6, ipv6_ext, is_ipv6_extension, l4, opens_connection,
};

/// `value`, unknown to the verifier (`zero` is `Settings::zero`, always 0; see there why).
#[inline(always)]
fn opaque(value: usize, zero: u16) -> usize {
    value ^ zero as usize
}

/// Beyond any frame XDP sees (one page, or 9 KB jumbo frames).
const MAX_L4_OFF: usize = 0x3fff;

/// A parsed packet: where its headers are and the flow it belongs to.
pub struct Packet {
    pub family: u8,
    /// The flow as it appears on the wire (source → destination).
    pub flow: FlowKey,
    /// IPv4 UDP with a zero checksum: there is no L4 checksum to update. This and the other
    /// yes/no fields below are non-zero for yes, and hidden from the verifier (see `opaque`).
    pub no_l4_checksum: u16,
    /// A TCP SYN without ACK: a new connection, whatever the connection table remembers.
    pub opens_connection: u16,
    /// 0 for UDP.
    pub tcp_flags: u8,
    /// ICMP of the packet's family (`flow.proto == icmp_protocol(family)`): the type. The
    /// flow's ports are then 0.
    pub icmp_type: u8,
    /// Where the TCP/UDP/ICMP header starts (its minimal length is inside the frame), and where
    /// the IP packet ends (a frame may carry padding after it): what an ICMP error quotes lies
    /// between the two. Code that writes the header checks it anew ([`l4_header`]): a packet
    /// pointer kept from here would carry each header layout's own bounds into every later
    /// verifier state, and the verifier would explore the balancing code once per layout.
    pub l4_off: usize,
    pub l4_end: usize,
    /// A fragment's place in its datagram. A later fragment has no L4 header: the flow's ports
    /// are 0, and nothing past the IP headers was parsed.
    pub fragment: Fragment,
    /// The datagram's identification, for fragments (network byte order, see `FragKey`).
    pub frag_id: [u8; 4],
    /// `fragment == First`.
    pub first_fragment: u16,
}

/// Pointer to a `T` at `offset` in the packet, after the one bounds check the verifier needs.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(Reason::PassTruncated);
    }
    Ok((start + offset) as *mut T)
}

/// The first `N` bytes of the packet's TCP/UDP/ICMP header, checked for the writer.
#[inline(always)]
pub fn l4_header<const N: usize>(ctx: &XdpContext, packet: &Packet) -> Result<*mut u8, Reason> {
    Ok(ptr_at::<[u8; N]>(ctx, packet.l4_off)? as *mut u8)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Reason> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes at offset are inside the packet.
    Ok(unsafe { ptr_at::<T>(ctx, offset)?.read_unaligned() })
}

/// Reads a field at a constant offset inside an already bounds-checked header.
///
/// # Safety
/// `offset + size_of::<T>()` must lie within the length checked for `header`.
#[inline(always)]
pub unsafe fn field<T: Copy>(header: *const u8, offset: usize) -> T {
    unsafe { (header.add(offset) as *const T).read_unaligned() }
}

/// # Safety
/// As for [`field`].
#[inline(always)]
pub unsafe fn set_field<T: Copy>(header: *mut u8, offset: usize, value: T) {
    unsafe { (header.add(offset) as *mut T).write_unaligned(value) }
}

#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), Reason> {
    // SAFETY: as in `read`; XDP packet data is writable.
    unsafe { ptr_at::<T>(ctx, offset)?.write_unaligned(value) };
    Ok(())
}

impl Packet {
    pub const fn empty() -> Self {
        Packet {
            family: 0,
            flow: FlowKey { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0, family: 0, _pad: [0; 2] },
            no_l4_checksum: 0,
            opens_connection: 0,
            tcp_flags: 0,
            icmp_type: 0,
            l4_off: 0,
            l4_end: 0,
            fragment: Fragment::None,
            frag_id: [0; 4],
            first_fragment: 0,
        }
    }
}

/// Fills `packet`, owned by the caller: its own frame (the header walk's variables) is then
/// not part of the call chains that balance or relay the packet, which must fit 512 bytes.
///
/// `zero` is `Settings::zero`: see there why the L4 header's offset and the yes/no fields are
/// mixed with it.
#[inline(never)]
pub fn parse(ctx: &XdpContext, packet: &mut Packet, zero: u16) -> Result<(), Reason> {
    // Keeps the compiler from passing the context's packet bounds as 32-bit values, which the
    // verifier cannot turn back into packet pointers.
    let ctx = core::hint::black_box(ctx);
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let packet_end = ctx.data_end() - ctx.data();
    let (family, l4_off, l4_len) = match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = read(ctx, ETH_HLEN + ipv4::VERSION_IHL)?;
            // Read the whole minimal header first so that "truncated" wins over "bad".
            ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, ETH_HLEN)?;
            let ihl = ((version_ihl & 0x0f) as usize) * 4;
            if version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
                return Err(Reason::PassBadHeader);
            }
            if ETH_HLEN + ihl > packet_end {
                return Err(Reason::PassTruncated);
            }
            let total_len = u16::from_be(read::<u16>(ctx, ETH_HLEN + ipv4::TOTAL_LEN)?) as usize;
            if total_len < ihl {
                return Err(Reason::PassBadHeader);
            }
            if ETH_HLEN + total_len > packet_end {
                return Err(Reason::PassTruncated);
            }
            packet.fragment = Fragment::of_ipv4(u16::from_be(read::<u16>(ctx, ETH_HLEN + ipv4::FRAG)?));
            if packet.fragment != Fragment::None {
                let id: [u8; 2] = read(ctx, ETH_HLEN + ipv4::ID)?;
                packet.frag_id = [id[0], id[1], 0, 0];
            }
            let flow = &mut packet.flow;
            flow.proto = read(ctx, ETH_HLEN + ipv4::PROTO)?;
            let src: [u8; 4] = read(ctx, ETH_HLEN + ipv4::SRC)?;
            let dst: [u8; 4] = read(ctx, ETH_HLEN + ipv4::DST)?;
            flow.src[..4].copy_from_slice(&src);
            flow.dst[..4].copy_from_slice(&dst);
            (FAMILY_V4, ETH_HLEN + ihl, total_len - ihl)
        }
        ETH_P_IPV6 => {
            let first: u8 = read(ctx, ETH_HLEN)?;
            ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
            if first >> 4 != 6 {
                return Err(Reason::PassBadHeader);
            }
            let payload_len = u16::from_be(read::<u16>(ctx, ETH_HLEN + ipv6::PAYLOAD_LEN)?) as usize;
            if ETH_HLEN + IPV6_HLEN + payload_len > packet_end {
                return Err(Reason::PassTruncated);
            }
            let payload_end = ETH_HLEN + IPV6_HLEN + payload_len;
            // IPv4's header lengths reach the verifier as one range; IPv6's extension headers
            // as one constant offset each, unless hidden.
            let l4_off = opaque(walk_ipv6_extensions(ctx, packet, payload_end)?, zero);
            let flow = &mut packet.flow;
            flow.src = read(ctx, ETH_HLEN + ipv6::SRC)?;
            flow.dst = read(ctx, ETH_HLEN + ipv6::DST)?;
            (FAMILY_V6, l4_off, payload_end - l4_off)
        }
        _ => return Err(Reason::PassNotIp),
    };
    // For the verifier, which gives a checked packet range only to pointers that stay within
    // 64 KiB: no frame is that long.
    if l4_off > MAX_L4_OFF {
        return Err(Reason::PassTruncated);
    }
    let flow = &mut packet.flow;
    flow.family = family;
    packet.family = family;
    packet.l4_off = l4_off;
    packet.l4_end = l4_off + l4_len;
    if packet.fragment != Fragment::None {
        // Only TCP and UDP datagrams are balanced whole; fragmented ICMP is the kernel's.
        if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
            return Err(Reason::PassFragment);
        }
        if packet.fragment == Fragment::Later {
            return Ok(());
        }
    }
    packet.first_fragment = opaque((packet.fragment == Fragment::First) as usize, zero) as u16;
    if flow.proto == icmp_protocol(family) {
        let l4 = ptr_at::<[u8; ICMP_HLEN]>(ctx, l4_off)? as *mut u8;
        if l4_len < ICMP_HLEN {
            return Err(Reason::PassTruncated);
        }
        // SAFETY: the type is inside the 8 checked bytes.
        packet.icmp_type = unsafe { field::<u8>(l4, icmp::TYPE) };
        return Ok(());
    }
    let mut no_l4_checksum = false;
    let l4: *mut u8 = match flow.proto {
        PROTO_TCP => {
            let l4 = ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, l4_off)? as *mut u8;
            if l4_len < TCP_MIN_HLEN {
                return Err(Reason::PassTruncated);
            }
            // SAFETY: offset 12 is inside the 20 checked bytes.
            let doff = ((unsafe { field::<u8>(l4, 12) } >> 4) as usize) * 4;
            if doff < TCP_MIN_HLEN || doff > l4_len {
                return Err(Reason::PassBadHeader);
            }
            // SAFETY: the flags (offset 13) are inside the 20 checked bytes.
            packet.tcp_flags = unsafe { field::<u8>(l4, l4::TCP_FLAGS) };
            packet.opens_connection = opaque(opens_connection(packet.tcp_flags) as usize, zero) as u16;
            l4
        }
        PROTO_UDP => {
            let l4 = ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off)? as *mut u8;
            if l4_len < UDP_HLEN {
                return Err(Reason::PassTruncated);
            }
            // SAFETY: both fields are inside the 8 checked bytes.
            let udp_len = u16::from_be(unsafe { field::<u16>(l4, l4::UDP_LEN) }) as usize;
            // A first fragment carries only the start of the datagram the length counts.
            if udp_len < UDP_HLEN || (udp_len > l4_len && packet.fragment == Fragment::None) {
                return Err(Reason::PassBadHeader);
            }
            if unsafe { field::<u16>(l4, l4::UDP_CHECK) } == 0 {
                // IPv6 forbids a zero UDP checksum (RFC 8200): leave such packets to the kernel.
                if family == FAMILY_V6 {
                    return Err(Reason::PassBadHeader);
                }
                no_l4_checksum = true;
            }
            l4
        }
        _ => return Err(Reason::PassUnknownL4),
    };
    // SAFETY: the ports are the first 4 bytes of both headers.
    flow.sport = unsafe { field(l4, l4::SPORT) };
    flow.dport = unsafe { field(l4, l4::DPORT) };
    packet.no_l4_checksum = opaque(no_l4_checksum as usize, zero) as u16;
    Ok(())
}

/// Walks the IPv6 extension headers up to the upper-layer header, whose protocol it stores in
/// `packet.flow.proto`, and returns where that header starts. A fragment header sets
/// `packet.fragment` and `frag_id`; a later fragment stops there. The same rules, in the same
/// order, as `lb_common::model`.
#[inline(always)]
fn walk_ipv6_extensions(ctx: &XdpContext, packet: &mut Packet, payload_end: usize) -> Result<usize, Reason> {
    let mut next: u8 = read(ctx, ETH_HLEN + ipv6::NEXT_HEADER)?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut fragment_header = false;
    for walked in 0..MAX_IPV6_EXT_HEADERS {
        if !is_ipv6_extension(next) || packet.fragment == Fragment::Later {
            break;
        }
        // Headers after a fragment header belong to the fragmented part: a first fragment
        // must bring its TCP/UDP header right after it to be balanced.
        if packet.fragment == Fragment::First {
            return Err(Reason::PassFragment);
        }
        // The frame's bound first: checked after the payload's, the compiler drops it as implied,
        // and the verifier does not know that the payload lies inside the frame.
        let head: [u8; ipv6_ext::MIN_LEN] = read(ctx, off)?;
        if off + ipv6_ext::MIN_LEN > payload_end {
            return Err(Reason::PassBadHeader);
        }
        let len = match next {
            ipv6_ext::HOP_BY_HOP if walked == 0 => (head[ipv6_ext::LEN] as usize + 1) * 8,
            // Still on its way to other addresses: not a packet for a VIP here.
            ipv6_ext::ROUTING if head[ipv6_ext::SEGMENTS_LEFT] != 0 => return Err(Reason::PassIpv6ExtHeader),
            ipv6_ext::ROUTING | ipv6_ext::DEST_OPTS => (head[ipv6_ext::LEN] as usize + 1) * 8,
            ipv6_ext::FRAGMENT if !fragment_header => {
                fragment_header = true;
                let offset = u16::from_be_bytes([head[ipv6_ext::FRAG_OFFSET], head[ipv6_ext::FRAG_OFFSET + 1]]);
                packet.fragment = Fragment::of_ipv6(offset);
                let id = ipv6_ext::FRAG_ID;
                packet.frag_id = [head[id], head[id + 1], head[id + 2], head[id + 3]];
                ipv6_ext::MIN_LEN
            }
            // Hop-by-hop only first, one fragment header (RFC 8200 §4.1).
            ipv6_ext::HOP_BY_HOP | ipv6_ext::FRAGMENT => return Err(Reason::PassBadHeader),
            _ => return Err(Reason::PassIpv6ExtHeader),
        };
        if off + len > payload_end {
            return Err(Reason::PassBadHeader);
        }
        next = head[ipv6_ext::NEXT_HEADER];
        off += len;
    }
    if is_ipv6_extension(next) && packet.fragment != Fragment::Later {
        return Err(Reason::PassIpv6ExtHeader);
    }
    packet.flow.proto = next;
    Ok(off)
}
