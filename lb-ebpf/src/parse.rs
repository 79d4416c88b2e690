//! Header parsing: Ethernet → IPv4 (any IHL) or IPv6 → TCP or UDP, into a [`Packet`].
//!
//! Every check that can refuse a packet returns the [`Reason`] it is counted under; the host
//! reference model (`lb_common::model`) applies the same rules in the same order.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::maps::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason};
use lb_common::packet::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, TCP_MIN_HLEN, UDP_HLEN, icmp, icmp_protocol,
    ipv4, ipv6, is_ipv4_fragment, is_ipv6_extension, l4, opens_connection,
};

/// A parsed packet: where its headers are and the flow it belongs to.
pub struct Packet {
    pub family: u8,
    /// The TCP/UDP header, bounds-checked for its minimal length (20 or 8 bytes). Every L4
    /// access goes through this one pointer: the verifier only trusts the range it has seen
    /// checked on the very pointer used.
    pub l4: *mut u8,
    /// The TCP or UDP checksum field, chosen where the header's length was checked.
    pub l4_check: *mut u8,
    /// The flow as it appears on the wire (source → destination).
    pub flow: FlowKey,
    /// IPv4 UDP with a zero checksum: there is no L4 checksum to update.
    pub no_l4_checksum: bool,
    /// A TCP SYN without ACK: a new connection, whatever the connection table remembers.
    pub opens_connection: bool,
    /// 0 for UDP.
    pub tcp_flags: u8,
    /// ICMP of the packet's family (`flow.proto == icmp_protocol(family)`): the type. `l4` then
    /// points at the 8 checked bytes of the ICMP header, `l4_check` at its checksum, and the
    /// flow's ports are 0.
    pub icmp_type: u8,
    /// Where the TCP/UDP/ICMP header starts, and where the IP packet ends (a frame may carry
    /// padding after it): what an ICMP error quotes lies between the two.
    pub l4_off: usize,
    pub l4_end: usize,
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
            l4: core::ptr::null_mut(),
            l4_check: core::ptr::null_mut(),
            flow: FlowKey { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0, family: 0, _pad: [0; 2] },
            no_l4_checksum: false,
            opens_connection: false,
            tcp_flags: 0,
            icmp_type: 0,
            l4_off: 0,
            l4_end: 0,
        }
    }
}

/// Fills `packet` (owned by the caller, so the checked L4 pointer is stored whole, never as
/// bytes of a returned aggregate, which the verifier would refuse).
#[inline(always)]
pub fn parse(ctx: &XdpContext, packet: &mut Packet) -> Result<(), Reason> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let packet_end = ctx.data_end() - ctx.data();
    let flow = &mut packet.flow;
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
            if is_ipv4_fragment(u16::from_be(read::<u16>(ctx, ETH_HLEN + ipv4::FRAG)?)) {
                return Err(Reason::PassFragment);
            }
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
            flow.proto = read(ctx, ETH_HLEN + ipv6::NEXT_HEADER)?;
            if is_ipv6_extension(flow.proto) {
                return Err(Reason::PassIpv6ExtHeader);
            }
            flow.src = read(ctx, ETH_HLEN + ipv6::SRC)?;
            flow.dst = read(ctx, ETH_HLEN + ipv6::DST)?;
            (FAMILY_V6, ETH_HLEN + IPV6_HLEN, payload_len)
        }
        _ => return Err(Reason::PassNotIp),
    };
    flow.family = family;
    packet.family = family;
    packet.l4_off = l4_off;
    packet.l4_end = l4_off + l4_len;
    if flow.proto == icmp_protocol(family) {
        let l4 = ptr_at::<[u8; ICMP_HLEN]>(ctx, l4_off)? as *mut u8;
        if l4_len < ICMP_HLEN {
            return Err(Reason::PassTruncated);
        }
        // SAFETY: type and checksum are inside the 8 checked bytes.
        packet.icmp_type = unsafe { field::<u8>(l4, icmp::TYPE) };
        packet.l4 = l4;
        packet.l4_check = unsafe { l4.add(icmp::CHECK) };
        return Ok(());
    }
    let mut no_l4_checksum = false;
    let (l4, l4_check): (*mut u8, *mut u8) = match flow.proto {
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
            // SAFETY: the flags (offset 13) and the checksum (offset 16) are inside the 20 checked bytes.
            packet.tcp_flags = unsafe { field::<u8>(l4, l4::TCP_FLAGS) };
            packet.opens_connection = opens_connection(packet.tcp_flags);
            (l4, unsafe { l4.add(l4::TCP_CHECK) })
        }
        PROTO_UDP => {
            let l4 = ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off)? as *mut u8;
            if l4_len < UDP_HLEN {
                return Err(Reason::PassTruncated);
            }
            // SAFETY: both fields are inside the 8 checked bytes.
            let udp_len = u16::from_be(unsafe { field::<u16>(l4, l4::UDP_LEN) }) as usize;
            if udp_len < UDP_HLEN || udp_len > l4_len {
                return Err(Reason::PassBadHeader);
            }
            if unsafe { field::<u16>(l4, l4::UDP_CHECK) } == 0 {
                // IPv6 forbids a zero UDP checksum (RFC 8200): leave such packets to the kernel.
                if family == FAMILY_V6 {
                    return Err(Reason::PassBadHeader);
                }
                no_l4_checksum = true;
            }
            // SAFETY: the checksum (offset 6) is inside the 8 checked bytes.
            (l4, unsafe { l4.add(l4::UDP_CHECK) })
        }
        _ => return Err(Reason::PassUnknownL4),
    };
    // SAFETY: the ports are the first 4 bytes of both headers.
    flow.sport = unsafe { field(l4, l4::SPORT) };
    flow.dport = unsafe { field(l4, l4::DPORT) };
    packet.l4 = l4;
    packet.l4_check = l4_check;
    packet.no_l4_checksum = no_l4_checksum;
    Ok(())
}
