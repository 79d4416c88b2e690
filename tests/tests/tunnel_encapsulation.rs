//! BPF_PROG_TEST_RUN of the tunnel modes (`ipip`, `gue`) on crafted packets: every mix of VIP
//! and backend family (4in4, 6in6, 4in6, 6in4), TCP and UDP, new and established flows, later
//! fragments, ICMP errors about a flow, and packets too big for the interface once
//! encapsulated. Each output is compared byte for byte with the reference model, and its outer
//! headers are read back here field by field (not with the encoders the program uses): the
//! inner packet must arrive unchanged.

use ipnet::IpNet;
use lb::dataplane::VipForwarding;
use lb::tunnel::TunnelSources;
use lb_common::maps::*;
use lb_common::packet::build::{Frame, TCP_ACK, reassemble, verify_checksums};
use lb_common::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
use lb_tests::harness::{Harness, backend, vip_key};
use lb_tests::privilege::require_root;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUE_PORT: u16 = 6080;
const MTU: u16 = 1500;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn backend_mac(index: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, index as u8]
}

/// Outer sources: a /24 prefix for IPv4 (the host byte varies by flow), one address for IPv6.
fn sources() -> TunnelSources {
    TunnelSources { v4: Some("172.16.9.0/24".parse().unwrap()), v6: Some("fd00:9::2/128".parse().unwrap()) }
}

struct Setup {
    vip: SocketAddr,
    proto: u8,
    mode: u8,
    backends: Vec<(u32, IpAddr)>,
}

impl Setup {
    fn what(&self) -> String {
        let mode = if self.mode == MODE_GUE { "gue" } else { "ipip" };
        let outer = if self.backends[0].1.is_ipv4() { "v4" } else { "v6" };
        let proto = if self.proto == PROTO_TCP { "tcp" } else { "udp" };
        format!("{mode} {proto} {} over {outer}", self.vip)
    }
}

/// Every mode x VIP family x backend family x protocol, each VIP with three backends.
fn setups() -> Vec<Setup> {
    let mut setups = Vec::new();
    let mut next_index = 1;
    let mut octet = 10;
    for mode in [MODE_IPIP, MODE_GUE] {
        for vip_v6 in [false, true] {
            for backend_v6 in [false, true] {
                for (proto, port) in [(PROTO_TCP, 80), (PROTO_UDP, 53)] {
                    let vip = if vip_v6 { format!("[fd00::{octet}]:{port}") } else { format!("10.0.0.{octet}:{port}") };
                    octet += 1;
                    let backends = (0..3)
                        .map(|i| {
                            let index = next_index;
                            next_index += 1;
                            let addr = if backend_v6 { format!("fd00:2:{i}::5") } else { format!("10.2.{i}.5") };
                            (index, ip(&addr))
                        })
                        .collect();
                    setups.push(Setup { vip: vip.parse().unwrap(), proto, mode, backends });
                }
            }
        }
    }
    setups
}

fn harness_with(setups: &[Setup], mtu: u16) -> Harness {
    let mut harness = Harness::new().unwrap();
    harness.set_tunnel(&sources(), GUE_PORT, mtu).unwrap();
    for (slot, setup) in setups.iter().enumerate() {
        for (index, addr) in &setup.backends {
            // Tunnels keep the VIP's port, as DSR does.
            let b = backend(SocketAddr::new(*addr, 0), backend_mac(*index));
            harness.set_backend(*index, &b).unwrap();
        }
        let forwarding = VipForwarding {
            vip_index: slot as u32,
            mode: setup.mode,
            snat_addr: [0; 16],
            snat_port_min: 20000,
            snat_port_max: 60000,
            client_affinity: None,
            observe: false,
        };
        let indexes: Vec<u32> = setup.backends.iter().map(|(i, _)| *i).collect();
        harness.publish_vip(&vip_key(setup.vip, setup.proto), &forwarding, &indexes).unwrap();
    }
    harness
}

fn client_ip(setup: &Setup) -> IpAddr {
    if setup.vip.is_ipv4() { ip("192.0.2.7") } else { ip("2001:db8::7") }
}

fn client_frame(setup: &Setup, sport: u16, payload_len: usize) -> Frame {
    let client = client_ip(setup);
    let mut frame = if setup.proto == PROTO_TCP {
        Frame::tcp(client, sport, setup.vip.ip(), setup.vip.port())
    } else {
        Frame::udp(client, sport, setup.vip.ip(), setup.vip.port())
    };
    frame.src_mac = CLIENT_MAC;
    frame.dst_mac = LB_MAC;
    frame.payload = (0..payload_len).map(|i| (i * 7) as u8).collect();
    frame
}

/// What the outer headers of a tunnelled frame said.
#[derive(Debug)]
struct Outer {
    next_hop: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    /// GUE's UDP source port; the IPv6 flow label for IPIP over IPv6; 0 otherwise.
    entropy: u32,
    /// The inner IP packet.
    inner: Vec<u8>,
}

/// Reads the outer headers back and checks every field a receiver relies on.
fn open_tunnel(frame: &[u8], gue: bool) -> Result<Outer, String> {
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]) as usize;
    if frame[6..12] != LB_MAC {
        return Err("the source MAC is not the load balancer's".into());
    }
    let next_hop: [u8; 6] = frame[0..6].try_into().unwrap();
    let ip = ETH_HLEN;
    let (src, dst, proto, hlen, mut entropy): (IpAddr, IpAddr, u8, usize, u32) = match be16(12) as u16 {
        ETH_P_IP => {
            if frame[ip] != 0x45 {
                return Err(format!("outer IPv4 version/IHL {:#x}", frame[ip]));
            }
            if be16(ip + 2) != frame.len() - ETH_HLEN {
                return Err(format!("outer total length {} for {} bytes", be16(ip + 2), frame.len() - ETH_HLEN));
            }
            if be16(ip + 6) != 0x4000 || frame[ip + 8] != 64 {
                return Err("outer IPv4 must have DF, offset 0, TTL 64".into());
            }
            let mut sum = frame[ip..ip + 20].chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum::<u32>();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            if sum != 0xffff {
                return Err("outer IPv4 header checksum".into());
            }
            let s: [u8; 4] = frame[ip + 12..ip + 16].try_into().unwrap();
            let d: [u8; 4] = frame[ip + 16..ip + 20].try_into().unwrap();
            (s.into(), d.into(), frame[ip + 9], 20, 0)
        }
        ETH_P_IPV6 => {
            if frame[ip] >> 4 != 6 || be16(ip + 4) != frame.len() - ETH_HLEN - 40 || frame[ip + 7] != 64 {
                return Err("outer IPv6 version, payload length or hop limit".into());
            }
            let label = u32::from_be_bytes(frame[ip..ip + 4].try_into().unwrap()) & 0xfffff;
            let s: [u8; 16] = frame[ip + 8..ip + 24].try_into().unwrap();
            let d: [u8; 16] = frame[ip + 24..ip + 40].try_into().unwrap();
            (s.into(), d.into(), frame[ip + 6], 40, label)
        }
        other => return Err(format!("outer ethertype {other:#06x}")),
    };
    let mut inner_at = ip + hlen;
    let inner_proto = if gue {
        if proto != PROTO_UDP {
            return Err(format!("GUE's outer protocol is {proto}"));
        }
        let udp = inner_at;
        if be16(udp + 2) != GUE_PORT as usize || be16(udp + 4) != frame.len() - udp || be16(udp + 6) != 0 {
            return Err("GUE's UDP port, length or checksum".into());
        }
        entropy = be16(udp) as u32;
        if entropy < 49152 {
            return Err(format!("GUE source port {entropy} outside the dynamic range"));
        }
        let gue = &frame[udp + 8..udp + 12];
        if gue[0] != 0 || gue[2..] != [0, 0] {
            return Err(format!("GUE header {gue:?}"));
        }
        inner_at = udp + 12;
        gue[1]
    } else {
        proto
    };
    let inner_type = match (inner_proto, frame[inner_at] >> 4) {
        (4, 4) => ETH_P_IP,
        (41, 6) => ETH_P_IPV6,
        other => return Err(format!("inner protocol/version {other:?}")),
    };
    let _ = inner_type;
    Ok(Outer { next_hop, src, dst, entropy, inner: frame[inner_at..].to_vec() })
}

/// Runs `frame` through both sides, which must agree, and checks its reason.
fn expect(harness: &mut Harness, frame: &[u8], reason: Reason, what: &str) -> Vec<u8> {
    let (kernel, model) = harness.run(frame).unwrap();
    assert_eq!((kernel.reason, kernel.action), (model.reason, model.action), "{what}: the kernel and the model differ");
    same(&kernel.packet, &model.packet, &format!("{what}: the kernel's output against the model's"));
    assert_eq!(kernel.reason, reason, "{what}");
    kernel.packet
}

/// `a == b`, reported by the first byte that differs (the packets are too long to print).
fn same(a: &[u8], b: &[u8], what: &str) {
    if a != b {
        let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        panic!("{what}: lengths {} and {}, first difference at byte {at}", a.len(), b.len());
    }
}

/// An IP packet as an Ethernet frame, for the frame-reading checks.
fn as_frame(ip: &[u8]) -> Vec<u8> {
    let ethertype = if ip[0] >> 4 == 6 { ETH_P_IPV6 } else { ETH_P_IP };
    let mut frame = [CLIENT_MAC, LB_MAC].concat();
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(ip);
    frame
}

fn in_source_prefix(src: IpAddr) -> bool {
    let sources = sources();
    let net: IpNet = if src.is_ipv4() { sources.v4.unwrap() } else { sources.v6.unwrap() };
    net.contains(&src)
}

#[test]
fn every_tunnel_mix_carries_the_clients_packet_unchanged() {
    if !require_root("every_tunnel_mix_carries_the_clients_packet_unchanged") {
        return;
    }
    let setups = setups();
    let mut harness = harness_with(&setups, MTU);
    let mut checked = 0;
    for setup in &setups {
        let what = setup.what();
        let gue = setup.mode == MODE_GUE;
        let mut seen_backends = HashSet::new();
        let mut v4_sources = HashSet::new();
        for flow in 0..24u16 {
            let syn = client_frame(setup, 40000 + flow, 100);
            let out = expect(&mut harness, &syn.bytes(), Reason::TxForward, &what);
            let outer = open_tunnel(&out, gue).unwrap_or_else(|e| panic!("{what}: {e}"));
            let (index, backend) = *setup
                .backends
                .iter()
                .find(|(i, _)| backend_mac(*i) == outer.next_hop)
                .unwrap_or_else(|| panic!("{what}: next hop {:?} is no backend's", outer.next_hop));
            assert_eq!(outer.dst, backend, "{what}: outer destination is the chosen backend");
            assert!(in_source_prefix(outer.src), "{what}: outer source {} outside the configured source", outer.src);
            same(&outer.inner, &syn.bytes()[ETH_HLEN..], &format!("{what}: the inner packet must arrive unchanged"));
            verify_checksums(&as_frame(&outer.inner)).unwrap();
            seen_backends.insert(index);
            v4_sources.insert(outer.src);
            // The flow's next packets: the same backend, the same outer source and entropy.
            let mut ack = syn.clone();
            ack.tcp_flags = TCP_ACK;
            let again = expect(&mut harness, &ack.bytes(), Reason::TxForward, &what);
            let again = open_tunnel(&again, gue).unwrap();
            assert_eq!((again.dst, again.src, again.entropy), (outer.dst, outer.src, outer.entropy), "{what}");
            same(&again.inner, &ack.bytes()[ETH_HLEN..], &what);
        }
        assert!(seen_backends.len() > 1, "{what}: 24 flows all went to one backend");
        if setup.backends[0].1.is_ipv4() {
            assert!(v4_sources.len() > 12, "{what}: 24 flows took only {} outer sources", v4_sources.len());
        } else {
            assert_eq!(v4_sources.len(), 1, "{what}: one configured IPv6 source");
        }
        checked += 1;
    }
    assert_eq!(checked, 16, "2 modes x 2 VIP families x 2 backend families x 2 protocols");
}

#[test]
fn a_packet_that_would_not_fit_the_tunnel_is_answered_with_its_mtu() {
    if !require_root("a_packet_that_would_not_fit_the_tunnel_is_answered_with_its_mtu") {
        return;
    }
    let setups = setups();
    let mut harness = harness_with(&setups, MTU);
    for setup in setups.iter().filter(|s| s.proto == PROTO_UDP) {
        let what = setup.what();
        let gue = setup.mode == MODE_GUE;
        let outer_v6 = setup.backends[0].1.is_ipv6();
        let overhead = if outer_v6 { 40 } else { 20 } + if gue { 12 } else { 0 };
        let fits = MTU as usize - overhead;
        let headers = if setup.vip.is_ipv4() { 20 + 8 } else { 40 + 8 };
        // Exactly as large as the tunnel carries: sent.
        let largest = client_frame(setup, 41000, fits - headers);
        let out = expect(&mut harness, &largest.bytes(), Reason::TxForward, &what);
        assert_eq!(out.len(), ETH_HLEN + MTU as usize, "{what}");
        // One byte more: the client is told the size that fits.
        let too_big = client_frame(setup, 41001, fits - headers + 1);
        let answer = expect(&mut harness, &too_big.bytes(), Reason::TxIcmpTooBig, &what);
        verify_checksums(&answer).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!((&answer[0..6], &answer[6..12]), (&CLIENT_MAC[..], &LB_MAC[..]), "{what}: back where it came from");
        let sent = too_big.bytes();
        let (icmp_at, src, dst) = if setup.vip.is_ipv4() {
            assert_eq!(u16::from_be_bytes([answer[12], answer[13]]), ETH_P_IP);
            assert_eq!(answer[ETH_HLEN + 9], PROTO_ICMP, "{what}");
            (ETH_HLEN + 20, &answer[ETH_HLEN + 12..ETH_HLEN + 16], &answer[ETH_HLEN + 16..ETH_HLEN + 20])
        } else {
            assert_eq!(u16::from_be_bytes([answer[12], answer[13]]), ETH_P_IPV6);
            assert_eq!(answer[ETH_HLEN + 6], PROTO_ICMPV6, "{what}");
            (ETH_HLEN + 40, &answer[ETH_HLEN + 8..ETH_HLEN + 24], &answer[ETH_HLEN + 24..ETH_HLEN + 40])
        };
        // From the VIP, to the client: the address the client's packet went to.
        assert_eq!(src, &sent[ETH_HLEN + if setup.vip.is_ipv4() { 16 } else { 24 }..][..src.len()], "{what}");
        assert_eq!(dst, &sent[ETH_HLEN + if setup.vip.is_ipv4() { 12 } else { 8 }..][..dst.len()], "{what}");
        let icmp = &answer[icmp_at..];
        if setup.vip.is_ipv4() {
            assert_eq!((icmp[0], icmp[1]), (3, 4), "{what}: fragmentation needed");
            assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]) as usize, fits, "{what}: next-hop MTU");
        } else {
            assert_eq!((icmp[0], icmp[1]), (2, 0), "{what}: packet too big");
            assert_eq!(u32::from_be_bytes(icmp[4..8].try_into().unwrap()) as usize, fits, "{what}: MTU");
        }
        // It quotes the start of the packet, headers first.
        same(&icmp[8..], &sent[ETH_HLEN..ETH_HLEN + icmp.len() - 8], &format!("{what}: the quote"));
    }
    // Too-big answers are not traffic of the VIP: nothing was forwarded for them.
    let counted = harness.dataplane.reason_count(Reason::TxIcmpTooBig).unwrap();
    assert_eq!(counted, 8, "one per UDP VIP");
}

#[test]
fn later_fragments_and_icmp_errors_follow_their_flow_into_the_tunnel() {
    if !require_root("later_fragments_and_icmp_errors_follow_their_flow_into_the_tunnel") {
        return;
    }
    let setups = setups();
    let mut harness = harness_with(&setups, 9000);
    let mut id = 0x7000;
    for setup in setups.iter().filter(|s| s.proto == PROTO_UDP) {
        let what = setup.what();
        let gue = setup.mode == MODE_GUE;
        let request = client_frame(setup, 42000, 3000);
        id += 1;
        let fragments = request.fragments(id, 1232);
        assert_eq!(fragments.len(), 3);
        let mut outers =
            vec![open_tunnel(&expect(&mut harness, &fragments[0], Reason::TxForward, &what), gue).unwrap()];
        for later in &fragments[1..] {
            let out = expect(&mut harness, later, Reason::TxFragment, &what);
            outers.push(open_tunnel(&out, gue).unwrap_or_else(|e| panic!("{what}: {e}")));
        }
        for outer in &outers[1..] {
            assert_eq!(
                (outer.next_hop, outer.dst, outer.src, outer.entropy),
                (outers[0].next_hop, outers[0].dst, outers[0].src, outers[0].entropy),
                "{what}: every fragment takes the first one's tunnel"
            );
        }
        for (outer, fragment) in outers.iter().zip(&fragments) {
            same(&outer.inner, &fragment[ETH_HLEN..], &format!("{what}: fragments arrive unchanged"));
        }
        let inner: Vec<Vec<u8>> = outers.iter().map(|o| as_frame(&o.inner)).collect();
        let datagram = reassemble(&inner).unwrap();
        verify_checksums(&datagram).unwrap_or_else(|e| panic!("{what}: {e}"));

        // A router's error about the backend's answer to this client (sent from the VIP): to the
        // same backend, through the same tunnel.
        let mut answer = client_frame(setup, 42000, 40);
        (answer.src, answer.sport, answer.dst, answer.dport) =
            (setup.vip.ip(), setup.vip.port(), client_ip(setup), 42000);
        let router = if setup.vip.is_ipv4() { ip("198.51.100.1") } else { ip("2001:db8:ff::1") };
        let quoted = answer.ip_packet();
        let (kind, code) = if setup.vip.is_ipv4() { (3, 4) } else { (2, 0) };
        let mut error = Frame::icmp_error(router, setup.vip.ip(), kind, code, 1400, &quoted);
        (error.src_mac, error.dst_mac) = (CLIENT_MAC, LB_MAC);
        let out = expect(&mut harness, &error.bytes(), Reason::TxIcmpToBackend, &what);
        let outer = open_tunnel(&out, gue).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(outer.dst, outers[0].dst, "{what}: the error goes to the flow's backend");
        same(&outer.inner, &error.bytes()[ETH_HLEN..], &format!("{what}: the error arrives unchanged"));
    }
}
