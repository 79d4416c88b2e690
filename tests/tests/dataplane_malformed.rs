//! Malformed, unusual and foreign packets: each gets its expected verdict and reason counter,
//! in the kernel and in the reference model alike, and a passed packet is never modified.

use lb::dataplane::VipForwarding;
use lb_common::maps::*;
use lb_common::packet::build::Frame;
use lb_common::packet::ipv6_ext::{DEST_OPTS, HOP_BY_HOP, ROUTING};
use lb_common::packet::{ETH_HLEN, ipv4, ipv6};
use lb_tests::harness::{Harness, addr16, backend, vip_key};
use lb_tests::privilege::require_root;
use std::net::IpAddr;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4_tcp() -> Vec<u8> {
    Frame::tcp(ip("192.0.2.1"), 1234, ip("10.0.0.10"), 80).bytes()
}
fn v4_udp() -> Vec<u8> {
    Frame::udp(ip("192.0.2.1"), 1234, ip("10.0.0.10"), 53).bytes()
}
fn v6_tcp() -> Vec<u8> {
    Frame::tcp(ip("2001:db8::1"), 1234, ip("fd00::10"), 80).bytes()
}
fn v6_udp() -> Vec<u8> {
    Frame::udp(ip("2001:db8::1"), 1234, ip("fd00::10"), 53).bytes()
}
fn v4_ping() -> Vec<u8> {
    Frame::echo_request(ip("192.0.2.1"), ip("10.0.0.10"), 1, 1).bytes()
}
fn v6_ping() -> Vec<u8> {
    Frame::echo_request(ip("2001:db8::1"), ip("fd00::10"), 1, 1).bytes()
}
/// A DSR backend's answer from the VIP to a client: what ICMP errors below quote.
fn v4_answer() -> Vec<u8> {
    Frame::tcp(ip("10.0.0.10"), 80, ip("192.0.2.1"), 1234).ip_packet()
}
fn v6_answer() -> Vec<u8> {
    Frame::tcp(ip("fd00::10"), 80, ip("2001:db8::1"), 1234).ip_packet()
}
/// "Fragmentation needed" from a router to the VIP, quoting `quoted`.
fn v4_error(quoted: &[u8]) -> Vec<u8> {
    Frame::icmp_error(ip("198.51.100.1"), ip("10.0.0.10"), 3, 4, 1400, quoted).bytes()
}
/// "Packet too big" from a router to the VIP, quoting `quoted`.
fn v6_error(quoted: &[u8]) -> Vec<u8> {
    Frame::icmp_error(ip("2001:db8:ffff::1"), ip("fd00::10"), 2, 0, 1400, quoted).bytes()
}
/// A TCP segment to the VIP as an IPv4 fragment: datagram `id`, flags/offset word `frag`.
fn v4_fragment(id: u16, frag: u16) -> Vec<u8> {
    with(Frame { payload: vec![1; 64], ..Frame::tcp(ip("192.0.2.1"), 1234, ip("10.0.0.10"), 80) }.bytes(), |b| {
        set16(b, IP + ipv4::ID, id);
        set16(b, IP + ipv4::FRAG, frag);
        // The header checksum, which the program does not check, stays as it was.
    })
}
fn v4_udp_fragment(id: u32) -> Vec<u8> {
    Frame { payload: vec![2; 3000], ..Frame::udp(ip("192.0.2.1"), 1234, ip("10.0.0.10"), 53) }.fragments(id, 1480)[0]
        .clone()
}
fn v6_with(extensions: &[(u8, Vec<u8>)]) -> Vec<u8> {
    Frame { ipv6_extensions: extensions.to_vec(), ..Frame::tcp(ip("2001:db8::1"), 1234, ip("fd00::10"), 80) }.bytes()
}
fn v6_fragments(id: u32) -> Vec<Vec<u8>> {
    Frame { payload: vec![3; 1000], ..Frame::tcp(ip("2001:db8::1"), 1234, ip("fd00::10"), 80) }.fragments(id, 512)
}
fn v6_udp_fragments(id: u32) -> Vec<Vec<u8>> {
    Frame { payload: vec![3; 1000], ..Frame::udp(ip("2001:db8::1"), 1234, ip("fd00::10"), 53) }.fragments(id, 512)
}
/// A first fragment whose fragment header is followed by a destination options header.
fn v6_fragment_then_options(id: u32) -> Vec<u8> {
    with(v6_fragments(id)[0].clone(), |b| {
        b[L4_V6] = DEST_OPTS; // the fragment header's next header
        // 8 bytes of options where the TCP header started, naming TCP next.
        b[L4_V6 + 8] = 6;
        b[L4_V6 + 9] = 0;
    })
}
fn with(mut bytes: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut bytes);
    bytes
}
fn set16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}
const IP: usize = ETH_HLEN;
const L4_V4: usize = ETH_HLEN + 20;
const L4_V6: usize = ETH_HLEN + 40;

fn cases() -> Vec<(&'static str, Vec<u8>, Reason)> {
    use Reason::*;
    let v4_options = |words: usize| {
        Frame { ipv4_options: vec![1; words * 4], ..Frame::tcp(ip("192.0.2.1"), 1234, ip("10.0.0.10"), 80) }.bytes()
    };
    vec![
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (no NIC delivers one).
        ("Ethernet header alone, IPv4 ethertype", v4_tcp()[..ETH_HLEN].to_vec(), PassTruncated),
        ("IPv4 header cut after its first byte", v4_tcp()[..ETH_HLEN + 1].to_vec(), PassTruncated),
        ("Ethernet header alone, IPv6 ethertype", v6_tcp()[..ETH_HLEN].to_vec(), PassTruncated),
        ("ARP", with(v4_tcp(), |b| set16(b, 12, 0x0806)), PassNotIp),
        ("802.1Q VLAN tag", with(v4_tcp(), |b| set16(b, 12, 0x8100)), PassNotIp),
        ("IPv4 header cut at 10 bytes", v4_tcp()[..IP + 10].to_vec(), PassTruncated),
        ("IPv4 header cut at 19 bytes", v4_tcp()[..IP + 19].to_vec(), PassTruncated),
        ("IPv4 ethertype, version 5", with(v4_tcp(), |b| b[IP] = 0x55), PassBadHeader),
        ("IPv4 IHL 4", with(v4_tcp(), |b| b[IP] = 0x44), PassBadHeader),
        ("IPv4 IHL 0", with(v4_tcp(), |b| b[IP] = 0x40), PassBadHeader),
        (
            "IPv4 IHL 15 in a short frame",
            with(v4_tcp(), |b| {
                b[IP] = 0x4f;
                b.truncate(IP + 50)
            }),
            PassTruncated,
        ),
        ("IPv4 with 4 bytes of options", v4_options(1), TxForward),
        ("IPv4 with 40 bytes of options (IHL 15)", v4_options(10), TxForward),
        ("IPv4 total length below IHL", with(v4_tcp(), |b| set16(b, IP + ipv4::TOTAL_LEN, 12)), PassBadHeader),
        ("IPv4 total length beyond the frame", with(v4_tcp(), |b| set16(b, IP + ipv4::TOTAL_LEN, 1000)), PassTruncated),
        // Fragments: the first is balanced; a later one whose first was not seen goes to the
        // kernel (one datagram ID each; the forwarding tests follow whole datagrams).
        ("IPv4 first fragment (MF)", v4_fragment(1, 0x2000), TxForward),
        ("IPv4 middle fragment before its first", v4_fragment(2, 0x2010), PassFragmentNoFirst),
        ("IPv4 last fragment before its first", v4_fragment(3, 0x0010), PassFragmentNoFirst),
        (
            "IPv4 later fragment to another address",
            with(v4_fragment(4, 0x0010), |b| b[IP + ipv4::DST + 3] = 99),
            PassFragment,
        ),
        ("IPv4 later fragment of ICMP", with(v4_fragment(5, 0x0010), |b| b[IP + ipv4::PROTO] = 1), PassFragment),
        ("IPv4 first fragment too short for a TCP header", v4_fragment(6, 0x2000)[..L4_V4 + 8].to_vec(), PassTruncated),
        (
            "IPv4 first fragment of UDP, length beyond it",
            with(v4_udp_fragment(7), |b| set16(b, L4_V4 + 4, 3000)),
            TxForward,
        ),
        ("IPv4 don't-fragment only", with(v4_tcp(), |b| set16(b, IP + ipv4::FRAG, 0x4000)), TxForward),
        ("IPv4 ICMP", with(v4_tcp(), |b| b[IP + ipv4::PROTO] = 1), PassUnknownL4),
        ("IPv4 GRE", with(v4_tcp(), |b| b[IP + ipv4::PROTO] = 47), PassUnknownL4),
        (
            "TCP header cut at 10 bytes",
            with(v4_tcp(), |b| {
                b.truncate(L4_V4 + 10);
                set16(b, IP + 2, 30)
            }),
            PassTruncated,
        ),
        (
            "TCP shorter than 20 bytes by IP length, padded frame",
            with(v4_tcp(), |b| set16(b, IP + ipv4::TOTAL_LEN, 20 + 12)),
            PassTruncated,
        ),
        ("TCP data offset 4", with(v4_tcp(), |b| b[L4_V4 + 12] = 0x40), PassBadHeader),
        ("TCP data offset 15 beyond the segment", with(v4_tcp(), |b| b[L4_V4 + 12] = 0xf0), PassBadHeader),
        (
            "TCP with 12 bytes of options",
            with(v4_tcp(), |b| {
                b.extend_from_slice(&[1; 12]);
                b[L4_V4 + 12] = 0x80;
                set16(b, IP + ipv4::TOTAL_LEN, 20 + 32);
            }),
            TxForward,
        ),
        (
            "UDP header cut at 4 bytes",
            with(v4_udp(), |b| {
                b.truncate(L4_V4 + 4);
                set16(b, IP + 2, 24)
            }),
            PassTruncated,
        ),
        ("UDP length 0", with(v4_udp(), |b| set16(b, L4_V4 + 4, 0)), PassBadHeader),
        ("UDP length 7", with(v4_udp(), |b| set16(b, L4_V4 + 4, 7)), PassBadHeader),
        ("UDP length beyond the IP payload", with(v4_udp(), |b| set16(b, L4_V4 + 4, 100)), PassBadHeader),
        ("UDP length 8, no payload", with(v4_udp(), |b| set16(b, L4_V4 + 4, 8)), TxForward),
        ("IPv4 UDP without checksum (0)", with(v4_udp(), |b| set16(b, L4_V4 + 6, 0)), TxForward),
        ("Ethernet padding after the IP packet", with(v4_tcp(), |b| b.extend_from_slice(&[0; 6])), TxForward),
        ("IPv6 header cut at 30 bytes", v6_tcp()[..IP + 30].to_vec(), PassTruncated),
        ("IPv6 ethertype, version 4", with(v6_tcp(), |b| b[IP] = 0x40), PassBadHeader),
        (
            "IPv6 payload length beyond the frame",
            with(v6_tcp(), |b| set16(b, IP + ipv6::PAYLOAD_LEN, 500)),
            PassTruncated,
        ),
        // Extension headers: walked when well-formed, else the kernel's.
        ("IPv6 hop-by-hop header", v6_with(&[(HOP_BY_HOP, vec![])]), TxForward),
        (
            "IPv6 hop-by-hop, routing (no segments left), destination options",
            v6_with(&[(HOP_BY_HOP, vec![]), (ROUTING, vec![0, 0]), (DEST_OPTS, vec![0; 20])]),
            TxForward,
        ),
        ("IPv6 routing header with segments left", v6_with(&[(ROUTING, vec![0, 1])]), PassIpv6ExtHeader),
        (
            "IPv6 four destination options headers",
            v6_with(&[(DEST_OPTS, vec![]), (DEST_OPTS, vec![]), (DEST_OPTS, vec![]), (DEST_OPTS, vec![])]),
            TxForward,
        ),
        (
            "IPv6 five extension headers",
            v6_with(&[
                (HOP_BY_HOP, vec![]),
                (DEST_OPTS, vec![]),
                (DEST_OPTS, vec![]),
                (DEST_OPTS, vec![]),
                (DEST_OPTS, vec![]),
            ]),
            PassIpv6ExtHeader,
        ),
        (
            "IPv6 hop-by-hop after destination options",
            v6_with(&[(DEST_OPTS, vec![]), (HOP_BY_HOP, vec![])]),
            PassBadHeader,
        ),
        ("IPv6 authentication header", v6_with(&[(51, vec![0; 14])]), PassIpv6ExtHeader),
        (
            "IPv6 extension header longer than the payload",
            with(v6_with(&[(DEST_OPTS, vec![])]), |b| b[L4_V6 + 1] = 200),
            PassBadHeader,
        ),
        (
            "IPv6 extension header past the frame",
            with(v6_with(&[(DEST_OPTS, vec![])]), |b| set16(b, IP + ipv6::PAYLOAD_LEN, 4)),
            PassBadHeader,
        ),
        (
            "IPv6 next header hop-by-hop, TCP bytes behind it",
            with(v6_tcp(), |b| b[IP + ipv6::NEXT_HEADER] = 0),
            PassBadHeader,
        ),
        ("IPv6 first fragment", v6_fragments(11)[0].clone(), TxForward),
        ("IPv6 later fragment before its first", v6_fragments(12)[1].clone(), PassFragmentNoFirst),
        (
            "IPv6 two fragment headers",
            with(v6_fragments(13)[0].clone(), |b| {
                // An atomic fragment header (no more fragments) naming a second one.
                b[L4_V6] = 44;
                b[L4_V6 + 3] = 0;
            }),
            PassBadHeader,
        ),
        (
            "IPv6 first fragment, destination options after the fragment header",
            v6_fragment_then_options(14),
            PassFragment,
        ),
        (
            "IPv6 atomic fragment (offset 0, no more)",
            with(v6_fragments(15)[0].clone(), |b| b[L4_V6 + 3] = 0),
            TxForward,
        ),
        (
            "IPv6 first fragment of UDP with zero checksum",
            with(v6_udp_fragments(16)[0].clone(), |b| set16(b, L4_V6 + 8 + 6, 0)),
            PassBadHeader,
        ),
        (
            "IPv6 echo request behind a destination options header",
            Frame {
                ipv6_extensions: vec![(DEST_OPTS, vec![])],
                ..Frame::echo_request(ip("2001:db8::1"), ip("fd00::10"), 1, 1)
            }
            .bytes(),
            PassIpv6ExtHeader,
        ),
        ("IPv6 no next header (59)", with(v6_tcp(), |b| b[IP + ipv6::NEXT_HEADER] = 59), PassUnknownL4),
        ("IPv6 ICMPv6", with(v6_tcp(), |b| b[IP + ipv6::NEXT_HEADER] = 58), PassUnknownL4),
        ("IPv6 UDP with zero checksum", with(v6_udp(), |b| set16(b, L4_V6 + 6, 0)), PassBadHeader),
        (
            "IPv6 TCP cut inside the header",
            with(v6_tcp(), |b| {
                b.truncate(L4_V6 + 12);
                set16(b, IP + 4, 12)
            }),
            PassTruncated,
        ),
        ("IPv6 TCP to the VIP", v6_tcp(), TxForward),
        ("IPv6 UDP to the VIP", v6_udp(), TxForward),
        ("IPv4 echo request to the VIP address", v4_ping(), TxPingReply),
        ("IPv6 echo request to the VIP address", v6_ping(), TxPingReply),
        (
            "IPv4 echo request cut inside the ICMP header",
            with(v4_ping(), |b| {
                b.truncate(L4_V4 + 6);
                set16(b, IP + ipv4::TOTAL_LEN, 26)
            }),
            PassTruncated,
        ),
        (
            "IPv4 echo request, total length ends in the ICMP header",
            with(v4_ping(), |b| set16(b, IP + ipv4::TOTAL_LEN, 24)),
            PassTruncated,
        ),
        (
            "IPv6 echo request cut inside the ICMPv6 header",
            with(v6_ping(), |b| {
                b.truncate(L4_V6 + 4);
                set16(b, IP + ipv6::PAYLOAD_LEN, 4)
            }),
            PassTruncated,
        ),
        ("ICMPv6 in an IPv4 header", with(v4_ping(), |b| b[IP + ipv4::PROTO] = 58), PassUnknownL4),
        ("ICMP (IPv4's) in an IPv6 header", with(v6_ping(), |b| b[IP + ipv6::NEXT_HEADER] = 1), PassUnknownL4),
        ("IPv4 echo reply to the VIP address", with(v4_ping(), |b| b[L4_V4] = 0), PassUnknownL4),
        ("IPv6 echo reply to the VIP address", with(v6_ping(), |b| b[L4_V6] = 129), PassUnknownL4),
        ("IPv4 echo request, first fragment", with(v4_ping(), |b| set16(b, IP + ipv4::FRAG, 0x2000)), PassFragment),
        ("IPv4 echo request, later fragment", with(v4_ping(), |b| set16(b, IP + ipv4::FRAG, 0x0010)), PassFragment),
        (
            "IPv4 echo request to another address",
            Frame::echo_request(ip("192.0.2.1"), ip("10.0.0.99"), 1, 1).bytes(),
            PassNotVip,
        ),
        ("ICMP error quoting a DSR flow's answer", v4_error(&v4_answer()), TxIcmpToBackend),
        ("ICMPv6 packet too big quoting a DSR flow's answer", v6_error(&v6_answer()), TxIcmpToBackend),
        ("ICMP error quoting IP header and 8 bytes only", v4_error(&v4_answer()[..28]), TxIcmpToBackend),
        ("ICMP error quote cut inside the IP header", v4_error(&v4_answer()[..16]), PassTruncated),
        ("ICMP error quote cut inside the first 8 TCP bytes", v4_error(&v4_answer()[..26]), PassTruncated),
        ("ICMPv6 error quote cut inside the IPv6 header", v6_error(&v6_answer()[..30]), PassTruncated),
        ("ICMP error quoting IP version 6", v4_error(&with(v4_answer(), |b| b[0] = 0x65)), PassBadHeader),
        ("ICMP error quoting IHL 4", v4_error(&with(v4_answer(), |b| b[0] = 0x44)), PassBadHeader),
        ("ICMPv6 error quoting IPv4", v6_error(&v4_answer()), PassBadHeader),
        (
            "ICMP error quoting a later fragment",
            v4_error(&with(v4_answer(), |b| set16(b, ipv4::FRAG, 0x0010))),
            PassIcmpNoFlow,
        ),
        (
            "ICMP error about ICMP",
            v4_error(&Frame::echo_request(ip("10.0.0.10"), ip("192.0.2.1"), 1, 1).ip_packet()),
            PassIcmpNoFlow,
        ),
        (
            "ICMP error quoting a packet of no VIP (other port)",
            v4_error(&Frame::tcp(ip("10.0.0.10"), 81, ip("192.0.2.1"), 1234).ip_packet()),
            PassIcmpNoFlow,
        ),
        (
            "ICMP error to the VIP quoting another source",
            v4_error(&Frame::tcp(ip("10.0.0.11"), 80, ip("192.0.2.1"), 1234).ip_packet()),
            PassIcmpNoFlow,
        ),
        (
            // The VIPs here are DSR ones: 10.0.0.2 is nobody's SNAT address, so the error is
            // about the host's own packet.
            "ICMP error to an address that is no VIP's and no NAT VIP's source",
            Frame::icmp_error(
                ip("10.0.1.1"),
                ip("10.0.0.2"),
                3,
                3,
                0,
                &Frame::udp(ip("10.0.0.2"), 3000, ip("10.0.1.1"), 53).ip_packet(),
            )
            .bytes(),
            PassNotVip,
        ),
        ("ICMP redirect to the VIP address", with(v4_error(&v4_answer()), |b| b[L4_V4] = 5), PassUnknownL4),
        (
            "ICMP error, IP total length ends inside the quote",
            with(v4_error(&v4_answer()), |b| set16(b, IP + ipv4::TOTAL_LEN, 20 + 8 + 24)),
            PassTruncated,
        ),
        ("IPv4 to another address", Frame::tcp(ip("192.0.2.1"), 1, ip("10.0.0.99"), 80).bytes(), PassNotVip),
        ("IPv4 to the VIP on another port", Frame::tcp(ip("192.0.2.1"), 1, ip("10.0.0.10"), 81).bytes(), PassNotVip),
        ("IPv4 UDP to a TCP-only VIP port", Frame::udp(ip("192.0.2.1"), 1, ip("10.0.0.10"), 80).bytes(), PassNotVip),
        ("IPv6 to another address", Frame::tcp(ip("2001:db8::1"), 1, ip("fd00::99"), 80).bytes(), PassNotVip),
    ]
}

#[test]
fn malformed_and_foreign_packets_get_their_expected_verdict() {
    if !require_root("malformed_and_foreign_packets_get_their_expected_verdict") {
        return;
    }
    let mut harness = Harness::new().unwrap();
    harness.set_backend(1, &backend("10.0.1.1:0".parse().unwrap(), [2, 0xbe, 0, 0, 0, 1])).unwrap();
    harness.set_backend(2, &backend("[fd00:1::1]:0".parse().unwrap(), [2, 0xbe, 0, 0, 0, 2])).unwrap();
    let dsr = |slot| VipForwarding {
        vip_index: slot,
        mode: MODE_DSR,
        snat_addr: addr16(ip("10.0.0.2")),
        snat_port_min: 1,
        snat_port_max: 2,
        client_affinity: None,
        observe: false,
    };
    harness.publish_vip(&vip_key("10.0.0.10:80".parse().unwrap(), PROTO_TCP), &dsr(0), &[1]).unwrap();
    harness.publish_vip(&vip_key("10.0.0.10:53".parse().unwrap(), PROTO_UDP), &dsr(1), &[1]).unwrap();
    harness.publish_vip(&vip_key("[fd00::10]:80".parse().unwrap(), PROTO_TCP), &dsr(2), &[2]).unwrap();
    harness.publish_vip(&vip_key("[fd00::10]:53".parse().unwrap(), PROTO_UDP), &dsr(3), &[2]).unwrap();

    harness.answer_ping_on(&[ip("10.0.0.10"), ip("fd00::10")]).unwrap();

    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (name, frame, expected) in &cases {
        let (kernel, model) = harness.run(frame).unwrap();
        if kernel.reason != *expected || model.reason != *expected || kernel != model {
            failures
                .push(format!("{name}: expected {expected:?}, kernel {:?}, model {:?}", kernel.reason, model.reason));
        }
        if kernel.action == XDP_PASS {
            assert_eq!(&kernel.packet, frame, "{name}: a passed packet must leave unchanged");
        }
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
