//! Builds well-formed Ethernet/IP/TCP-or-UDP frames and verifies checksums (tests, benchmarks).

use super::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, TCP_MIN_HLEN, UDP_HLEN, icmp, ipv4, ipv6,
    ipv6_ext, l4,
};
use crate::csum::{add_words, fold, udp_nonzero};
use crate::maps::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use std::net::IpAddr;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// A frame to build. Source and destination must be of the same family.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// ICMP/ICMPv6: type and code. `sport` and `dport` fill the header's last 4 bytes: the echo
    /// identifier and sequence number, or for errors 0 and the MTU (fragmentation needed,
    /// packet too big).
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub ttl: u8,
    /// Extra IPv4 header bytes (options, multiple of 4, at most 40).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers before the upper layer (and before the fragment header of
    /// [`Frame::fragments`]): (kind, the bytes after its next-header and length bytes, padded
    /// with zeros to a multiple of 8 in all).
    pub ipv6_extensions: Vec<(u8, Vec<u8>)>,
    pub payload: Vec<u8>,
}

/// Where one fragment sits in its datagram.
#[derive(Clone, Copy, Debug)]
struct FragmentOf {
    id: u32,
    offset: usize,
    more: bool,
}

impl Frame {
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src,
            dst,
            proto: PROTO_TCP,
            sport,
            dport,
            tcp_flags: TCP_SYN,
            icmp_type: 0,
            icmp_code: 0,
            ttl: 64,
            ipv4_options: Vec::new(),
            ipv6_extensions: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self { proto: PROTO_UDP, tcp_flags: 0, payload: b"ping".to_vec(), ..Self::tcp(src, sport, dst, dport) }
    }

    /// An echo request: ICMP for IPv4 addresses, ICMPv6 for IPv6.
    pub fn echo_request(src: IpAddr, dst: IpAddr, id: u16, seq: u16) -> Self {
        let (proto, icmp_type) =
            if src.is_ipv4() { (PROTO_ICMP, icmp::ECHO_REQUEST_V4) } else { (PROTO_ICMPV6, icmp::ECHO_REQUEST_V6) };
        Self { proto, icmp_type, tcp_flags: 0, payload: b"0123456789abcdef".to_vec(), ..Self::tcp(src, id, dst, seq) }
    }

    /// An ICMP error (ICMPv6 for IPv6 addresses) quoting `quoted`, an IP packet (or its start).
    pub fn icmp_error(src: IpAddr, dst: IpAddr, icmp_type: u8, icmp_code: u8, mtu: u16, quoted: &[u8]) -> Self {
        Self { icmp_type, icmp_code, payload: quoted.to_vec(), ..Self::echo_request(src, dst, 0, mtu) }
    }

    /// The IP packet, without the Ethernet header: what an ICMP error quotes.
    pub fn ip_packet(&self) -> Vec<u8> {
        self.bytes()[ETH_HLEN..].to_vec()
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.frame_with(&self.l4_segment(), None)
    }

    /// The datagram as the fragments a sender would make with `size` bytes of upper-layer data
    /// each (a multiple of 8; the last takes the rest), identified by `id` (16 bits in IPv4).
    pub fn fragments(&self, id: u32, size: usize) -> Vec<Vec<u8>> {
        assert!(size > 0 && size.is_multiple_of(8), "fragment data must come in multiples of 8 bytes");
        let segment = self.l4_segment();
        let parts: Vec<&[u8]> = segment.chunks(size).collect();
        let last = parts.len() - 1;
        parts
            .iter()
            .enumerate()
            .map(|(i, part)| self.frame_with(part, Some(FragmentOf { id, offset: i * size, more: i < last })))
            .collect()
    }

    fn frame_with(&self, part: &[u8], fragment: Option<FragmentOf>) -> Vec<u8> {
        let mut out = Vec::with_capacity(ETH_HLEN + 60 + part.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                out.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let hlen = IPV4_MIN_HLEN + self.ipv4_options.len();
                let mut ip = vec![0u8; hlen];
                ip[ipv4::VERSION_IHL] = 0x40 | (hlen / 4) as u8;
                ip[ipv4::TOTAL_LEN..ipv4::TOTAL_LEN + 2].copy_from_slice(&((hlen + part.len()) as u16).to_be_bytes());
                match fragment {
                    Some(f) => {
                        ip[ipv4::ID..ipv4::ID + 2].copy_from_slice(&(f.id as u16).to_be_bytes());
                        let field = ((f.more as u16) << 13) | (f.offset / 8) as u16;
                        ip[ipv4::FRAG..ipv4::FRAG + 2].copy_from_slice(&field.to_be_bytes());
                    }
                    None => ip[ipv4::FRAG] = 0x40, // don't fragment
                }
                ip[ipv4::TTL] = self.ttl;
                ip[ipv4::PROTO] = self.proto;
                ip[ipv4::SRC..ipv4::SRC + 4].copy_from_slice(&src.octets());
                ip[ipv4::DST..ipv4::DST + 4].copy_from_slice(&dst.octets());
                ip[IPV4_MIN_HLEN..].copy_from_slice(&self.ipv4_options);
                let check = !fold(add_words(0, &ip));
                ip[ipv4::CHECK..ipv4::CHECK + 2].copy_from_slice(&check.to_ne_bytes());
                out.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                // Extension headers, each followed by the kind of the next.
                let mut kinds: Vec<u8> = self.ipv6_extensions.iter().map(|(kind, _)| *kind).collect();
                if fragment.is_some() {
                    kinds.push(ipv6_ext::FRAGMENT);
                }
                kinds.push(self.proto);
                let mut chain = Vec::new();
                for (i, (_, body)) in self.ipv6_extensions.iter().enumerate() {
                    let len = (2 + body.len()).div_ceil(8) * 8;
                    let mut header = vec![0u8; len];
                    header[ipv6_ext::NEXT_HEADER] = kinds[i + 1];
                    header[ipv6_ext::LEN] = (len / 8 - 1) as u8;
                    header[2..2 + body.len()].copy_from_slice(body);
                    chain.extend_from_slice(&header);
                }
                if let Some(f) = fragment {
                    let mut header = [0u8; ipv6_ext::MIN_LEN];
                    header[ipv6_ext::NEXT_HEADER] = self.proto;
                    let field = (f.offset as u16) | f.more as u16;
                    header[ipv6_ext::FRAG_OFFSET..ipv6_ext::FRAG_OFFSET + 2].copy_from_slice(&field.to_be_bytes());
                    header[ipv6_ext::FRAG_ID..ipv6_ext::FRAG_ID + 4].copy_from_slice(&f.id.to_be_bytes());
                    chain.extend_from_slice(&header);
                }
                let mut ip = [0u8; IPV6_HLEN];
                ip[0] = 0x60;
                ip[ipv6::PAYLOAD_LEN..ipv6::PAYLOAD_LEN + 2]
                    .copy_from_slice(&((chain.len() + part.len()) as u16).to_be_bytes());
                ip[ipv6::NEXT_HEADER] = kinds[0];
                ip[ipv6::HOP_LIMIT] = self.ttl;
                ip[ipv6::SRC..ipv6::SRC + 16].copy_from_slice(&src.octets());
                ip[ipv6::DST..ipv6::DST + 16].copy_from_slice(&dst.octets());
                out.extend_from_slice(&ip);
                out.extend_from_slice(&chain);
            }
            _ => panic!("Frame: source and destination address families differ"),
        }
        out.extend_from_slice(part);
        out
    }

    fn l4_segment(&self) -> Vec<u8> {
        if matches!(self.proto, PROTO_ICMP | PROTO_ICMPV6) {
            let mut seg = vec![0u8; ICMP_HLEN];
            seg[icmp::TYPE] = self.icmp_type;
            seg[icmp::CODE] = self.icmp_code;
            seg[4..6].copy_from_slice(&self.sport.to_be_bytes());
            seg[6..8].copy_from_slice(&self.dport.to_be_bytes());
            seg.extend_from_slice(&self.payload);
            let check = !fold(add_words(icmp_pseudo_header_sum(self.src, self.dst, self.proto, seg.len()), &seg));
            seg[icmp::CHECK..icmp::CHECK + 2].copy_from_slice(&check.to_ne_bytes());
            return seg;
        }
        let mut seg = match self.proto {
            PROTO_TCP => {
                let mut h = vec![0u8; TCP_MIN_HLEN];
                h[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes()); // sequence number
                h[12] = ((TCP_MIN_HLEN / 4) as u8) << 4;
                h[l4::TCP_FLAGS] = self.tcp_flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
                h
            }
            PROTO_UDP => {
                let mut h = vec![0u8; UDP_HLEN];
                h[l4::UDP_LEN..l4::UDP_LEN + 2]
                    .copy_from_slice(&((UDP_HLEN + self.payload.len()) as u16).to_be_bytes());
                h
            }
            _ => Vec::new(),
        };
        seg[l4::SPORT..l4::SPORT + 2].copy_from_slice(&self.sport.to_be_bytes());
        if seg.len() >= 4 {
            seg[l4::DPORT..l4::DPORT + 2].copy_from_slice(&self.dport.to_be_bytes());
        }
        seg.extend_from_slice(&self.payload);
        let check_at = match self.proto {
            PROTO_TCP => Some(l4::TCP_CHECK),
            PROTO_UDP => Some(l4::UDP_CHECK),
            _ => None,
        };
        if let Some(at) = check_at {
            let mut check = !fold(add_words(pseudo_header_sum(self.src, self.dst, self.proto, seg.len()), &seg));
            if self.proto == PROTO_UDP {
                check = udp_nonzero(check);
            }
            seg[at..at + 2].copy_from_slice(&check.to_ne_bytes());
        }
        seg
    }
}

/// One's-complement sum of the TCP/UDP pseudo-header.
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> u32 {
    let mut sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => add_words(add_words(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => add_words(add_words(0, &s.octets()), &d.octets()),
        _ => panic!("pseudo header: address families differ"),
    };
    sum = add_words(sum, &[0, proto]);
    add_words(sum, &(l4_len as u32).to_be_bytes())
}

/// The pseudo-header sum of an ICMP message: none for ICMP (IPv4), the usual one for ICMPv6.
fn icmp_pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    if proto == PROTO_ICMP { 0 } else { pseudo_header_sum(src, dst, proto, len) }
}

/// The whole datagram of `fragments` (Ethernet frames, in any order) as one frame, with the
/// first fragment's headers: what the receiver's kernel reassembles, for [`verify_checksums`].
pub fn reassemble(fragments: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let mut pieces: Vec<(usize, bool, Vec<u8>, Vec<u8>)> = Vec::new(); // offset, more, headers, data
    for frame in fragments {
        match u16::from_be_bytes([frame[12], frame[13]]) {
            ETH_P_IP => {
                let ip = &frame[ETH_HLEN..];
                let hlen = ((ip[0] & 0x0f) as usize) * 4;
                let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
                let field = u16::from_be_bytes([ip[ipv4::FRAG], ip[ipv4::FRAG + 1]]);
                let headers = frame[..ETH_HLEN + hlen].to_vec();
                pieces.push((((field & 0x1fff) as usize) * 8, field & 0x2000 != 0, headers, ip[hlen..total].to_vec()));
            }
            ETH_P_IPV6 => {
                let walk = walk_extensions(frame)?;
                let at = walk.fragment_header.ok_or("an IPv6 frame without a fragment header")?;
                let field =
                    u16::from_be_bytes([frame[at + ipv6_ext::FRAG_OFFSET], frame[at + ipv6_ext::FRAG_OFFSET + 1]]);
                // The headers before the fragment header, whose last next-header becomes the
                // fragment header's.
                let mut headers = frame[..at].to_vec();
                headers[walk.fragment_next_at.expect("set with the header")] = frame[at + ipv6_ext::NEXT_HEADER];
                let data = frame[at + ipv6_ext::MIN_LEN..walk.end].to_vec();
                pieces.push(((field & 0xfff8) as usize, field & 1 != 0, headers, data));
            }
            other => return Err(format!("not IP (ethertype {other:#06x})")),
        }
    }
    pieces.sort_by_key(|piece| piece.0);
    let mut data = Vec::new();
    for (offset, _, _, piece) in &pieces {
        if *offset != data.len() {
            return Err(format!("fragment at offset {offset}, expected {}", data.len()));
        }
        data.extend_from_slice(piece);
    }
    if pieces.last().is_none_or(|piece| piece.1) {
        return Err("the last fragment is missing".into());
    }
    let mut frame = pieces[0].2.clone();
    if u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IP {
        let hlen = frame.len() - ETH_HLEN;
        frame[ETH_HLEN + ipv4::TOTAL_LEN..][..2].copy_from_slice(&((hlen + data.len()) as u16).to_be_bytes());
        frame[ETH_HLEN + ipv4::FRAG..][..2].copy_from_slice(&[0, 0]);
        frame[ETH_HLEN + ipv4::CHECK..][..2].copy_from_slice(&[0, 0]);
        let check = !fold(add_words(0, &frame[ETH_HLEN..]));
        frame[ETH_HLEN + ipv4::CHECK..][..2].copy_from_slice(&check.to_ne_bytes());
    } else {
        let payload = frame.len() - ETH_HLEN - IPV6_HLEN + data.len();
        frame[ETH_HLEN + ipv6::PAYLOAD_LEN..][..2].copy_from_slice(&(payload as u16).to_be_bytes());
    }
    frame.extend_from_slice(&data);
    Ok(frame)
}

/// An IPv6 frame's extension headers, walked (hop-by-hop, routing, destination options, one
/// fragment header).
struct Extensions {
    proto: u8,
    l4_start: usize,
    end: usize,
    fragment_header: Option<usize>,
    /// Where the next-header byte that names the fragment header sits.
    fragment_next_at: Option<usize>,
}

fn walk_extensions(frame: &[u8]) -> Result<Extensions, String> {
    let payload = u16::from_be_bytes([frame[ETH_HLEN + ipv6::PAYLOAD_LEN], frame[ETH_HLEN + ipv6::PAYLOAD_LEN + 1]]);
    let end = ETH_HLEN + IPV6_HLEN + payload as usize;
    let mut walk =
        Extensions { proto: 0, l4_start: ETH_HLEN + IPV6_HLEN, end, fragment_header: None, fragment_next_at: None };
    let mut next_at = ETH_HLEN + ipv6::NEXT_HEADER;
    loop {
        let kind = frame[next_at];
        let at = walk.l4_start;
        let len = match kind {
            ipv6_ext::HOP_BY_HOP | ipv6_ext::ROUTING | ipv6_ext::DEST_OPTS => {
                (frame[at + ipv6_ext::LEN] as usize + 1) * 8
            }
            ipv6_ext::FRAGMENT => {
                walk.fragment_header = Some(at);
                walk.fragment_next_at = Some(next_at);
                ipv6_ext::MIN_LEN
            }
            _ => {
                walk.proto = kind;
                return Ok(walk);
            }
        };
        if at + len > end {
            return Err("an extension header runs past the payload".into());
        }
        next_at = at + ipv6_ext::NEXT_HEADER;
        walk.l4_start = at + len;
    }
}

/// Checks the IPv4 header checksum (if IPv4) and the TCP/UDP/ICMP checksum of an Ethernet frame
/// that carries a whole datagram (IPv6 extension headers are walked).
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let (src, dst, proto, l4_start, l4_end): (IpAddr, IpAddr, u8, usize, usize) = match ethertype {
        ETH_P_IP => {
            let ip = &frame[ETH_HLEN..];
            let hlen = ((ip[0] & 0x0f) as usize) * 4;
            if fold(add_words(0, &ip[..hlen])) != 0xffff {
                return Err("IPv4 header checksum is wrong".into());
            }
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let src: [u8; 4] = ip[ipv4::SRC..ipv4::SRC + 4].try_into().unwrap();
            let dst: [u8; 4] = ip[ipv4::DST..ipv4::DST + 4].try_into().unwrap();
            (src.into(), dst.into(), ip[ipv4::PROTO], ETH_HLEN + hlen, ETH_HLEN + total)
        }
        ETH_P_IPV6 => {
            let ip = &frame[ETH_HLEN..];
            let src: [u8; 16] = ip[ipv6::SRC..ipv6::SRC + 16].try_into().unwrap();
            let dst: [u8; 16] = ip[ipv6::DST..ipv6::DST + 16].try_into().unwrap();
            let walk = walk_extensions(frame)?;
            if walk.fragment_header.is_some() {
                return Err("a fragment: reassemble it first".into());
            }
            (src.into(), dst.into(), walk.proto, walk.l4_start, walk.end)
        }
        other => return Err(format!("not IP (ethertype {other:#06x})")),
    };
    let seg = &frame[l4_start..l4_end];
    if proto == PROTO_UDP && src.is_ipv4() && u16::from_ne_bytes([seg[6], seg[7]]) == 0 {
        return Ok(()); // IPv4 UDP without checksum
    }
    let pseudo = if matches!(proto, PROTO_ICMP | PROTO_ICMPV6) {
        icmp_pseudo_header_sum(src, dst, proto, seg.len())
    } else {
        pseudo_header_sum(src, dst, proto, seg.len())
    };
    if fold(add_words(pseudo, seg)) != 0xffff {
        return Err(format!("L4 checksum (protocol {proto}) is wrong"));
    }
    Ok(())
}

/// The tunnel a frame's IP packet travels in to a backend of an `ipip` or `gue` VIP.
#[derive(Clone, Copy, Debug)]
pub struct Encapsulation {
    /// The outer source and destination (either family, whatever the inner packet's).
    pub src: IpAddr,
    pub dst: IpAddr,
    /// GUE: the UDP source and destination ports. None: IPIP.
    pub gue: Option<(u16, u16)>,
}

/// `frame` (Ethernet and an IP packet) inside tunnel headers, keeping its MACs: an outer IPv4
/// header (IHL 5, DF, ID 0, TTL 64, TOS 0) or IPv6 header (traffic class and flow label 0, hop
/// limit 64), then for GUE a UDP header (checksum 0) and a GUE header (version 0, no options),
/// then the inner packet. Written field by field from RFC 2003, RFC 2473 and
/// draft-ietf-intarea-gue, apart from `crate::tunnel`'s encoders, which a test checks against it.
pub fn encapsulate(frame: &[u8], tunnel: &Encapsulation) -> Vec<u8> {
    let inner = &frame[ETH_HLEN..];
    let inner_proto = match inner[0] >> 4 {
        4 => 4,  // IPPROTO_IPIP
        6 => 41, // IPPROTO_IPV6
        other => panic!("encapsulate: the frame carries IP version {other}"),
    };
    let mut payload = Vec::new();
    let proto = match tunnel.gue {
        Some((sport, dport)) => {
            let len = (UDP_HLEN + 4 + inner.len()) as u16;
            payload.extend_from_slice(&sport.to_be_bytes());
            payload.extend_from_slice(&dport.to_be_bytes());
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&[0, 0]); // no UDP checksum
            payload.extend_from_slice(&[0, inner_proto, 0, 0]); // GUE: version 0, C 0, hlen 0, protocol, flags
            PROTO_UDP
        }
        None => inner_proto,
    };
    payload.extend_from_slice(inner);
    let mut out = frame[..12].to_vec();
    match (tunnel.src, tunnel.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut ip = [0u8; IPV4_MIN_HLEN];
            ip[ipv4::VERSION_IHL] = 0x45;
            ip[ipv4::TOTAL_LEN..ipv4::TOTAL_LEN + 2].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            ip[ipv4::FRAG] = 0x40; // DF
            ip[ipv4::TTL] = 64;
            ip[ipv4::PROTO] = proto;
            ip[ipv4::SRC..ipv4::SRC + 4].copy_from_slice(&src.octets());
            ip[ipv4::DST..ipv4::DST + 4].copy_from_slice(&dst.octets());
            let check = !fold(add_words(0, &ip));
            ip[ipv4::CHECK..ipv4::CHECK + 2].copy_from_slice(&check.to_ne_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut ip = [0u8; IPV6_HLEN];
            ip[0] = 0x60;
            ip[ipv6::PAYLOAD_LEN..ipv6::PAYLOAD_LEN + 2].copy_from_slice(&(payload.len() as u16).to_be_bytes());
            ip[ipv6::NEXT_HEADER] = proto;
            ip[ipv6::HOP_LIMIT] = 64;
            ip[ipv6::SRC..ipv6::SRC + 16].copy_from_slice(&src.octets());
            ip[ipv6::DST..ipv6::DST + 16].copy_from_slice(&dst.octets());
            out.extend_from_slice(&ip);
        }
        _ => panic!("encapsulate: outer source and destination families differ"),
    }
    out.extend_from_slice(&payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_carry_valid_checksums() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        for frame in [
            Frame::tcp(v4("192.0.2.1"), 40000, v4("10.0.0.10"), 80),
            Frame::udp(v4("192.0.2.1"), 40000, v4("10.0.0.10"), 53),
            Frame::tcp(v4("2001:db8::1"), 40000, v4("fd00::10"), 80),
            Frame::udp(v4("2001:db8::1"), 40000, v4("fd00::10"), 53),
            Frame { ipv4_options: vec![1, 1, 1, 0], ..Frame::tcp(v4("192.0.2.1"), 1, v4("10.0.0.10"), 2) },
            Frame::echo_request(v4("192.0.2.1"), v4("10.0.0.10"), 7, 1),
            Frame::echo_request(v4("2001:db8::1"), v4("fd00::10"), 7, 1),
            Frame {
                ipv6_extensions: vec![(ipv6_ext::HOP_BY_HOP, vec![]), (ipv6_ext::DEST_OPTS, vec![0; 12])],
                ..Frame::udp(v4("2001:db8::1"), 40000, v4("fd00::10"), 53)
            },
        ] {
            let bytes = frame.bytes();
            verify_checksums(&bytes).unwrap();
            // Flip bits of the source port: only the L4 checksum can notice.
            let l4_start = bytes.len() - frame.l4_segment().len();
            let mut corrupted = bytes.clone();
            corrupted[l4_start] ^= 0x55;
            assert!(verify_checksums(&corrupted).is_err(), "corruption must be detected: {frame:?}");
        }
    }

    /// The load balancer's encoders (`crate::tunnel`) write what this independent writer writes.
    #[test]
    fn the_tunnel_encoders_agree_with_the_independent_writer() {
        use crate::maps::{FAMILY_V4, FAMILY_V6};
        use crate::tunnel;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a16 = |a: IpAddr| match a {
            IpAddr::V4(v4) => {
                let mut out = [0u8; 16];
                out[..4].copy_from_slice(&v4.octets());
                out
            }
            IpAddr::V6(v6) => v6.octets(),
        };
        let inners = [
            Frame::tcp(ip("192.0.2.1"), 40000, ip("10.0.0.10"), 80),
            Frame::udp(ip("2001:db8::1"), 40000, ip("fd00::10"), 53),
        ];
        let outers = [(ip("10.1.0.1"), ip("10.2.0.5")), (ip("fd00:1::1"), ip("fd00:2::5"))];
        for inner in &inners {
            let frame = inner.bytes();
            let inner_len = frame.len() - ETH_HLEN;
            let inner_family = if inner.src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
            for (src, dst) in outers {
                for gue in [None, Some((0xc123, tunnel::GUE_DEFAULT_PORT))] {
                    let ours = encapsulate(&frame, &Encapsulation { src, dst, gue });
                    let mut theirs = frame[..12].to_vec();
                    let gue_len = if gue.is_some() { UDP_HLEN + tunnel::GUE_HLEN } else { 0 };
                    let proto = if gue.is_some() { PROTO_UDP } else { tunnel::inner_protocol(inner_family) };
                    if src.is_ipv4() {
                        theirs.extend_from_slice(&ETH_P_IP.to_be_bytes());
                        let mut header = [0; IPV4_MIN_HLEN];
                        tunnel::write_ipv4_header(&mut header, &a16(src), &a16(dst), proto, 0, gue_len + inner_len);
                        theirs.extend_from_slice(&header);
                    } else {
                        theirs.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                        let mut header = [0; IPV6_HLEN];
                        tunnel::write_ipv6_header(&mut header, &a16(src), &a16(dst), proto, 0, 0, gue_len + inner_len);
                        theirs.extend_from_slice(&header);
                    }
                    if let Some((sport, dport)) = gue {
                        let mut header = [0; UDP_HLEN + tunnel::GUE_HLEN];
                        tunnel::write_udp_gue(&mut header, sport, dport, inner_family, inner_len);
                        theirs.extend_from_slice(&header);
                    }
                    theirs.extend_from_slice(&frame[ETH_HLEN..]);
                    assert_eq!(ours, theirs, "{inner:?} in {src} -> {dst}, gue {gue:?}");
                    assert_eq!(
                        ours.len() - frame.len(),
                        tunnel::overhead(if src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }, gue.is_some())
                    );
                }
            }
        }
    }

    #[test]
    fn fragments_reassemble_into_the_datagram() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for frame in [
            Frame { payload: vec![7; 3000], ..Frame::udp(ip("192.0.2.1"), 40000, ip("10.0.0.10"), 53) },
            Frame { payload: vec![7; 3000], ..Frame::udp(ip("2001:db8::1"), 40000, ip("fd00::10"), 53) },
            Frame {
                payload: vec![7; 3000],
                ipv6_extensions: vec![(ipv6_ext::HOP_BY_HOP, vec![])],
                ..Frame::tcp(ip("2001:db8::1"), 40000, ip("fd00::10"), 80)
            },
        ] {
            let whole = frame.bytes();
            let mut fragments = frame.fragments(0x1234_5678, 1232);
            assert_eq!(fragments.len(), 3);
            assert!(verify_checksums(&fragments[0]).is_err(), "a first fragment alone does not add up");
            fragments.reverse();
            let mut rebuilt = reassemble(&fragments).unwrap();
            verify_checksums(&rebuilt).unwrap();
            if frame.src.is_ipv4() {
                // Only the identification and flags differ from the unfragmented frame.
                rebuilt[ETH_HLEN + ipv4::ID..ETH_HLEN + ipv4::CHECK + 2].fill(0);
                let mut expected = whole.clone();
                expected[ETH_HLEN + ipv4::ID..ETH_HLEN + ipv4::CHECK + 2].fill(0);
                assert_eq!(rebuilt, expected);
            } else {
                assert_eq!(rebuilt, whole);
            }
            assert!(reassemble(&fragments[1..]).is_err(), "a missing fragment is noticed");
        }
    }
}
