//! Differential test: 100,000 random packets, valid and corrupted, through the kernel program
//! and through the host reference model; every verdict and every output byte must agree, and
//! so must the connection, NAT and fragment tables and the reason counters at the end. The mix
//! holds ICMP, IPv6 extension headers and fragmented datagrams (in order, reordered, or missing
//! their first fragment, interleaved with other traffic), both ways through NAT, and tunnel VIPs
//! (ipip and gue, backends of both families) with an MTU some fragments do not fit. For a fifth
//! of the packets the data plane is told of a flood (`Settings::flood`). A second run fills a
//! connection table far too small for its DSR and tunnel flows.

use lb::dataplane::VipForwarding;
use lb_common::maps::*;
use lb_common::packet::ETH_HLEN;
use lb_common::packet::build::Frame;
use lb_common::packet::ipv6_ext::{DEST_OPTS, HOP_BY_HOP, ROUTING};
use lb_tests::harness::{Harness, addr16, backend, kernel_clock_ticks, vip_key};
use lb_tests::privilege::require_root;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

const PACKETS: usize = 100_000;

struct Vip {
    addr: SocketAddr,
    proto: u8,
    key: VipKey,
    forwarding: VipForwarding,
    backends: Vec<u32>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn setup(harness: &mut Harness) -> Vec<Vip> {
    for i in 1..=4u32 {
        harness
            .set_backend(i, &backend(format!("10.0.1.{i}:8080").parse().unwrap(), [2, 0xbe, 0, 0, 0, i as u8]))
            .unwrap();
        harness
            .set_backend(10 + i, &backend(format!("[fd00:1::{i}]:8080").parse().unwrap(), [2, 0xbe, 0, 0, 1, i as u8]))
            .unwrap();
    }
    // Tunnel backends: routed, the VIP's port kept (port 0), of either family for either VIP.
    for i in 1..=4u32 {
        harness
            .set_backend(20 + i, &backend(format!("10.2.{i}.5:0").parse().unwrap(), [2, 0xbe, 0, 0, 2, i as u8]))
            .unwrap();
        harness
            .set_backend(30 + i, &backend(format!("[fd00:2:{i}::5]:0").parse().unwrap(), [2, 0xbe, 0, 0, 3, i as u8]))
            .unwrap();
    }
    // An MTU that the larger fragments do not fit once tunnelled: they are answered "too big".
    let sources = lb::tunnel::TunnelSources {
        v4: Some("172.16.9.0/24".parse().unwrap()),
        v6: Some("fd00:9::/112".parse().unwrap()),
    };
    harness.set_tunnel(&sources, 6080, 1000).unwrap();
    let mut vips = Vec::new();
    // Client affinity on three; tunnels of every family mix on the last four.
    for (slot, (addr, proto, mode, client_affinity)) in [
        ("10.0.0.10:80", PROTO_TCP, MODE_DSR, None),
        ("10.0.0.10:53", PROTO_UDP, MODE_DSR, None),
        ("10.0.0.20:80", PROTO_TCP, MODE_NAT, None),
        ("10.0.0.20:53", PROTO_UDP, MODE_NAT, None),
        ("[fd00::10]:80", PROTO_TCP, MODE_DSR, None),
        ("[fd00::10]:53", PROTO_UDP, MODE_DSR, None),
        ("[fd00::20]:80", PROTO_TCP, MODE_NAT, None),
        ("[fd00::20]:53", PROTO_UDP, MODE_NAT, None),
        ("10.0.0.30:0", PROTO_TCP, MODE_DSR, None),
        ("10.0.0.40:80", PROTO_TCP, MODE_NAT, Some(30)),
        ("[fd00::40]:53", PROTO_UDP, MODE_DSR, Some(126)),
        ("10.0.0.50:0", PROTO_UDP, MODE_NAT, Some(32)),
        ("10.0.0.60:80", PROTO_TCP, MODE_IPIP, None),
        ("[fd00::60]:53", PROTO_UDP, MODE_GUE, None),
        ("10.0.0.70:0", PROTO_UDP, MODE_GUE, Some(24)),
        ("[fd00::70]:80", PROTO_TCP, MODE_IPIP, None),
    ]
    .into_iter()
    .enumerate()
    {
        let slot = slot as u32;
        let addr: SocketAddr = addr.parse().unwrap();
        let v4 = addr.is_ipv4();
        let snat = if v4 { ip("10.0.0.2") } else { ip("fd00::2") };
        // A narrow port range so that NAT port collisions and exhaustion happen too.
        let forwarding = VipForwarding {
            vip_index: slot,
            mode,
            snat_addr: addr16(snat),
            snat_port_min: 30000,
            snat_port_max: 30400,
            client_affinity,
            observe: slot.is_multiple_of(3),
        };
        let backends: Vec<u32> = match (mode, slot % 2) {
            (MODE_IPIP | MODE_GUE, 0) => vec![21, 22, 33], // IPv4 and IPv6 backends mixed
            (MODE_IPIP | MODE_GUE, _) => vec![31, 32, 23],
            _ if v4 => vec![1, 2, 3],
            _ => vec![11, 12, 13],
        };
        let key = vip_key(addr, proto);
        harness.publish_vip(&key, &forwarding, &backends).unwrap();
        vips.push(Vip { addr, proto, key, forwarding, backends });
    }
    vips
}

fn random_valid(rng: &mut StdRng, vips: &[Vip]) -> Frame {
    let vip = vips.choose(rng).unwrap();
    let client = if vip.addr.is_ipv4() {
        IpAddr::from([192, 0, 2, rng.random_range(1..40)])
    } else {
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, rng.random_range(1..40)])
    };
    if rng.random_bool(0.05) {
        // ICMP to a VIP's address: echo requests (answered where ping is on), replies, errors.
        let mut frame = Frame::echo_request(client, vip.addr.ip(), rng.random(), rng.random());
        frame.icmp_type = *[frame.icmp_type, frame.icmp_type, 0, 3, 129, rng.random()].choose(rng).unwrap();
        frame.payload = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
        return frame;
    }
    let sport = rng.random_range(1024..1100);
    let dport = if vip.addr.port() == 0 { rng.random_range(1..100) } else { vip.addr.port() };
    let mut frame = if vip.proto == PROTO_TCP {
        Frame::tcp(client, sport, vip.addr.ip(), dport)
    } else {
        Frame::udp(client, sport, vip.addr.ip(), dport)
    };
    // SYNs open connections (placed by the table), the rest follow the connection table.
    frame.tcp_flags = *[0x02u8, 0x10, 0x12, 0x18, 0x11].choose(rng).unwrap();
    frame.payload = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
    if rng.random_bool(0.1) {
        frame.ipv4_options = vec![1; 4 * rng.random_range(1..=10)];
    }
    if vip.addr.is_ipv6() && rng.random_bool(0.1) {
        // Up to one more than the program walks; now and then a routing header still on its way.
        let count = rng.random_range(1..=5);
        frame.ipv6_extensions = (0..count)
            .map(|i| match rng.random_range(0..4) {
                0 if i == 0 => (HOP_BY_HOP, vec![0; rng.random_range(0..14)]),
                1 => (ROUTING, vec![0, rng.random_bool(0.2) as u8]),
                _ => (DEST_OPTS, vec![0; rng.random_range(0..22)]),
            })
            .collect();
    }
    frame
}

/// A datagram's fragments, as a network delivers them: mostly in order, sometimes reordered,
/// sometimes without the first. The datagram IDs come from a small range, so IDs get reused.
fn fragmented(rng: &mut StdRng, mut frame: Frame) -> Vec<Vec<u8>> {
    frame.payload = (0..rng.random_range(16..2500)).map(|_| rng.random()).collect();
    let mut fragments = frame.fragments(rng.random_range(1..200), 8 * rng.random_range(1..160));
    match rng.random_range(0..10) {
        0 => fragments.shuffle(rng),
        1 => {
            fragments.remove(0);
        }
        _ => {}
    }
    fragments
}

/// An ICMP error: about a VIP's answer to a client (to the VIP, from a router), or about a
/// NAT-forwarded packet (to the SNAT address, from the backend); quoting all of the packet, its
/// headers only, or a random part of it.
fn icmp_error(rng: &mut StdRng, vips: &[Vip], forwarded: &[Vec<u8>]) -> Vec<u8> {
    let (from, to, quoted) = if forwarded.is_empty() || rng.random_bool(0.5) {
        let mut answer = random_valid(rng, vips);
        (answer.src, answer.dst) = (answer.dst, answer.src);
        (answer.sport, answer.dport) = (answer.dport, answer.sport);
        let router = if answer.src.is_ipv4() { ip("198.51.100.1") } else { ip("2001:db8:ffff::1") };
        (router, answer.src, answer.ip_packet())
    } else {
        let packet = forwarded.choose(rng).unwrap();
        let frame_ip = &packet[ETH_HLEN..];
        let v4 = frame_ip[0] >> 4 == 4;
        let (src, dst): (IpAddr, IpAddr) = if v4 {
            (
                <[u8; 4]>::try_from(&frame_ip[12..16]).unwrap().into(),
                <[u8; 4]>::try_from(&frame_ip[16..20]).unwrap().into(),
            )
        } else {
            (
                <[u8; 16]>::try_from(&frame_ip[8..24]).unwrap().into(),
                <[u8; 16]>::try_from(&frame_ip[24..40]).unwrap().into(),
            )
        };
        (dst, src, frame_ip.to_vec())
    };
    let headers = if to.is_ipv4() { 28 } else { 48 };
    let cut = match rng.random_range(0..3) {
        0 => quoted.len(),
        1 => headers.min(quoted.len()),
        _ => rng.random_range(0..=quoted.len()),
    };
    let (icmp_type, code) = if to.is_ipv4() {
        *[(3u8, 4u8), (3, 3), (11, 0), (3, 1)].choose(rng).unwrap()
    } else {
        *[(2u8, 0u8), (1, 4), (3, 0), (1, 3)].choose(rng).unwrap()
    };
    let mut error = Frame::icmp_error(from, to, icmp_type, code, rng.random_range(1200..1500), &quoted[..cut]);
    error.dst_mac = [0x02, 0, 0, 0, 0, 0x02];
    error.bytes()
}

/// Damages a frame. Frames stay at least an Ethernet header long: BPF_PROG_TEST_RUN refuses
/// shorter ones, and no NIC delivers them.
fn corrupt(rng: &mut StdRng, mut bytes: Vec<u8>) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => bytes.truncate(rng.random_range(ETH_HLEN..bytes.len())),
        1 => {
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len().min(80));
                bytes[at] = rng.random();
            }
        }
        2 => {
            // Damage length and header-length fields specifically.
            let at = *[14usize, 16, 17, 18, 19, 20, 38, 46, 52, 54, 58].choose(rng).unwrap();
            if at < bytes.len() {
                bytes[at] = rng.random();
            }
        }
        _ => {
            bytes = (0..rng.random_range(ETH_HLEN..120)).map(|_| rng.random()).collect();
            // Mostly IP ethertypes, so the garbage reaches the IP parsers.
            let ethertype: u16 = *[0x0800u16, 0x86dd, 0x0806, rng.random()].choose(rng).unwrap();
            bytes[12..14].copy_from_slice(&ethertype.to_be_bytes());
        }
    }
    bytes
}

#[test]
fn random_packets_agree_with_the_reference_model() {
    if !require_root("random_packets_agree_with_the_reference_model") {
        return;
    }
    let started = kernel_clock_ticks();
    let mut harness = Harness::new().unwrap();
    let mut vips = setup(&mut harness);
    // Ping is answered on some VIP addresses only.
    harness.answer_ping_on(&[ip("10.0.0.10"), ip("fd00::20"), ip("10.0.0.50")]).unwrap();
    let mut rng = StdRng::seed_from_u64(0x1b_2026);
    let mut replies: Vec<Frame> = Vec::new();
    // Fragments still to deliver, interleaved with other traffic.
    let mut in_flight: VecDeque<Vec<u8>> = VecDeque::new();
    let mut forwarded: Vec<Vec<u8>> = Vec::new();
    let mut mismatches = Vec::new();
    let mut by_reason: HashMap<u32, u64> = HashMap::new();

    for n in 0..PACKETS {
        // Backends change while traffic runs: a backend joins, another goes down.
        if n == PACKETS / 3 {
            for vip in &mut vips {
                vip.backends.push(match vip.forwarding.mode {
                    MODE_IPIP | MODE_GUE => 24 + 10 * (vip.key.family == FAMILY_V6) as u32,
                    _ if vip.addr.is_ipv4() => 4,
                    _ => 14,
                });
                harness.publish_vip(&vip.key, &vip.forwarding, &vip.backends).unwrap();
            }
        }
        if n == 2 * PACKETS / 3 {
            let mut down = backend("10.0.1.2:8080".parse().unwrap(), [2, 0xbe, 0, 0, 0, 2]);
            down.flags = 0;
            harness.set_backend(2, &down).unwrap();
            for vip in vips.iter_mut().filter(|v| v.addr.is_ipv4()) {
                vip.backends.retain(|&b| b != 2);
                harness.publish_vip(&vip.key, &vip.forwarding, &vip.backends).unwrap();
            }
        }
        // A flood from the middle on, for a while: DSR and tunnel flows are no longer recorded,
        // NAT flows opened meanwhile are marked for a shorter half-open wait.
        if n == 2 * PACKETS / 5 || n == 3 * PACKETS / 5 {
            harness.set_flood(n == 2 * PACKETS / 5).unwrap();
        }
        let roll = rng.random_range(0..100);
        let frame = if !in_flight.is_empty() && rng.random_bool(0.6) {
            in_flight.pop_front().unwrap()
        } else if roll < 50 {
            random_valid(&mut rng, &vips).bytes()
        } else if roll < 55 {
            let valid = random_valid(&mut rng, &vips);
            in_flight.extend(fragmented(&mut rng, valid));
            in_flight.pop_front().unwrap_or_default()
        } else if roll < 70 && !replies.is_empty() {
            let reply = replies.choose(&mut rng).unwrap().clone();
            if rng.random_bool(0.1) {
                in_flight.extend(fragmented(&mut rng, reply));
                in_flight.pop_front().unwrap_or_default()
            } else {
                reply.bytes()
            }
        } else if roll < 75 {
            Frame::udp(ip("192.0.2.1"), rng.random(), ip("198.51.100.1"), rng.random()).bytes()
        } else if roll < 82 {
            icmp_error(&mut rng, &vips, &forwarded)
        } else {
            let valid = random_valid(&mut rng, &vips).bytes();
            corrupt(&mut rng, valid)
        };
        if frame.len() < ETH_HLEN {
            continue; // a datagram whose every fragment went missing
        }
        let ((action, packet), model) = harness.run_fast(&frame).unwrap();
        *by_reason.entry(model.reason as u32).or_default() += 1;
        if action != model.action || packet != model.packet {
            if mismatches.len() < 10 {
                mismatches.push(format!("packet {n} {frame:02x?}: kernel action {action}, model {:?}", model.reason));
            } else {
                mismatches.push(String::new());
            }
        }
        // Turn NAT-forwarded packets into backend replies for later rounds.
        if model.reason == Reason::TxForward
            && replies.len() < 5000
            && let Some(reply) = as_backend_reply(&packet)
        {
            replies.push(reply);
            forwarded.push(packet.clone());
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {PACKETS} packets differ, first ones:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );

    let kernel_reasons = harness.dataplane.reason_counters().unwrap();
    for (reason, count) in &kernel_reasons {
        assert_eq!(*count, harness.model.reasons.get(&(*reason as u32)).copied().unwrap_or(0), "{reason:?} counter");
    }
    // Timestamps follow the kernel's clock: each must fall inside this test's run, and the
    // tables are then compared without them.
    let (ended, window) = (kernel_clock_ticks(), |t: u32| t >= started && t <= kernel_clock_ticks() + 1);
    let mut kernel_conns = harness.dataplane.connections().unwrap();
    for (flow, conn) in &mut kernel_conns {
        assert!(window(conn.last_seen), "{flow:?}: {conn:?}, now {ended}");
        conn.last_seen = 0;
    }
    kernel_conns.sort_by_key(|(k, _)| format!("{k:?}"));
    let mut model_conns: Vec<_> =
        harness.model.conns.iter().map(|(k, v)| (*k, ConnState { last_seen: 0, ..*v })).collect();
    model_conns.sort_by_key(|(k, _)| format!("{k:?}"));
    assert_eq!(kernel_conns, model_conns, "connection tables differ");
    let mut kernel_nat = harness.dataplane.nat_reverses().unwrap();
    for (reply, reverse) in &mut kernel_nat {
        assert!(window(reverse.last_seen), "{reply:?}: {reverse:?}, now {ended}");
        reverse.last_seen = 0;
    }
    kernel_nat.sort_by_key(|(k, _)| format!("{k:?}"));
    let mut model_nat: Vec<_> =
        harness.model.nat_rev.iter().map(|(k, v)| (*k, NatReverse { last_seen: 0, ..*v })).collect();
    model_nat.sort_by_key(|(k, _)| format!("{k:?}"));
    assert_eq!(kernel_nat, model_nat, "NAT tables differ");
    let mut kernel_frags = harness.dataplane.fragment_routes().unwrap();
    kernel_frags.sort_by_key(|(k, _)| format!("{k:?}"));
    let mut model_frags: Vec<_> = harness.model.frags.iter().map(|(k, v)| (*k, *v)).collect();
    model_frags.sort_by_key(|(k, _)| format!("{k:?}"));
    assert!(model_frags.len() < FRAGS_ENTRIES as usize, "the model does not evict: the kernel's table must not fill");
    assert_eq!(kernel_frags, model_frags, "fragment tables differ");

    // The flood really changed what was recorded.
    let events = harness.dataplane.flow_events().unwrap();
    let not_recorded = events.iter().find(|(event, _)| *event == FlowEvent::FloodNotRecorded).map_or(0, |e| e.1);
    assert!(not_recorded > 50, "too few flows left unrecorded during the flood: {events:?}");
    let marked = kernel_conns.iter().filter(|(_, c)| c.flags & CONN_OPENED_IN_FLOOD != 0).count();
    assert!(marked > 0, "no NAT flow opened during the flood is still half-open");

    // The mix must really exercise the paths it claims to.
    for reason in [
        Reason::TxForward,
        Reason::TxNatReply,
        Reason::PassTruncated,
        Reason::PassBadHeader,
        Reason::PassNotVip,
        Reason::DropNatPorts,
        Reason::TxPingReply,
        Reason::PassUnknownL4,
        Reason::TxIcmpToBackend,
        Reason::TxIcmpToClient,
        Reason::PassIcmpNoFlow,
        Reason::TxFragment,
        Reason::PassFragmentNoFirst,
        Reason::PassFragment,
        Reason::PassIpv6ExtHeader,
        Reason::TxIcmpTooBig,
    ] {
        assert!(
            by_reason.get(&(reason as u32)).copied().unwrap_or(0) > 50,
            "too few {reason:?} packets: {by_reason:?}"
        );
    }
    eprintln!("differential: {PACKETS} packets, reasons {by_reason:?}, {} connections", kernel_conns.len());
}

/// A connection table far too small for the flows, for every mode: a full table keeps the
/// connections it has. A DSR or tunnel flow that finds no room is placed by the Maglev table
/// alone (where an entry would have sent it), a new NAT flow is dropped and counted; not one
/// packet may differ from the model, which holds as many entries as the kernel's table and
/// must end with the same ones. For the second half the data plane is told of a flood.
#[test]
fn a_full_connection_table_keeps_its_connections() {
    if !require_root("a_full_connection_table_keeps_its_connections") {
        return;
    }
    const TABLE: u32 = 256;
    const PACKETS: usize = 30_000;
    let sizes = lb::dataplane::DataplaneSizes { max_conns: TABLE, ..lb_tests::harness::test_sizes() };
    let mut harness = Harness::with_sizes(sizes).unwrap();
    let vips = setup(&mut harness);
    let mut rng = StdRng::seed_from_u64(0xf011_2026);
    let mut mismatches = Vec::new();
    let mut by_reason: HashMap<u32, u64> = HashMap::new();
    for n in 0..PACKETS {
        if n == PACKETS / 2 {
            harness.set_flood(true).unwrap();
        }
        let frame = random_valid(&mut rng, &vips).bytes();
        let ((action, packet), model) = harness.run_fast(&frame).unwrap();
        *by_reason.entry(model.reason as u32).or_default() += 1;
        if (action != model.action || packet != model.packet) && mismatches.len() < 10 {
            mismatches.push(format!("packet {n} {frame:02x?}: kernel action {action}, model {:?}", model.reason));
        }
    }
    assert!(mismatches.is_empty(), "packets differ, first ones:\n{}", mismatches.join("\n"));
    let without_time = |table: Vec<(FlowKey, ConnState)>| {
        let mut table: Vec<_> = table.into_iter().map(|(k, v)| (k, ConnState { last_seen: 0, ..v })).collect();
        table.sort_by_key(|(k, _)| format!("{k:?}"));
        table
    };
    let kernel = without_time(harness.dataplane.connections().unwrap());
    let model = without_time(harness.model.conns.iter().map(|(k, v)| (*k, *v)).collect());
    assert_eq!(kernel.len(), TABLE as usize, "the table fills up");
    assert_eq!(kernel, model, "the kernel's full table must keep the entries the model keeps");
    let full = by_reason.get(&(Reason::DropTableFull as u32)).copied().unwrap_or(0);
    assert!(full > 1000, "new NAT flows must find the table full: {by_reason:?}");
    let events = harness.dataplane.flow_events().unwrap();
    let unrecorded = events.iter().find(|(event, _)| *event == FlowEvent::TableFull).map_or(0, |e| e.1);
    assert!(unrecorded > 1000, "DSR and tunnel flows must find the table full: {events:?}");
    eprintln!(
        "full table of {TABLE}: {PACKETS} packets, {full} new NAT flows dropped, {unrecorded} DSR/tunnel flows unrecorded"
    );
}

/// For a NAT-forwarded frame (client → SNAT → backend), the backend's answer: swap MACs,
/// addresses and ports. DSR frames (destination is still the VIP) give none.
fn as_backend_reply(forwarded: &[u8]) -> Option<Frame> {
    let v6 = forwarded[12] == 0x86;
    let (src_at, len) = if v6 { (14 + 8, 16) } else { (14 + 12, 4) };
    let src: Vec<u8> = forwarded[src_at..src_at + len].to_vec();
    let snat: &[u8] = if v6 { &addr16(ip("fd00::2")) } else { &[10, 0, 0, 2] };
    if src != snat {
        return None;
    }
    let l4 = if v6 { 14 + 40 } else { 14 + ((forwarded[14] & 0xf) as usize) * 4 };
    let proto = if v6 { forwarded[14 + 6] } else { forwarded[14 + 9] };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None; // extension headers or a fragment header: not worth finding the ports
    }
    let port = |at: usize| u16::from_be_bytes([forwarded[at], forwarded[at + 1]]);
    let to_ip = |bytes: &[u8]| -> IpAddr {
        if v6 { <[u8; 16]>::try_from(bytes).unwrap().into() } else { <[u8; 4]>::try_from(bytes).unwrap().into() }
    };
    let dst_at = src_at + len;
    let backend = to_ip(&forwarded[dst_at..dst_at + len]);
    let mut reply = if proto == PROTO_TCP {
        Frame::tcp(backend, port(l4 + 2), to_ip(&src), port(l4))
    } else {
        Frame::udp(backend, port(l4 + 2), to_ip(&src), port(l4))
    };
    reply.src_mac = forwarded[0..6].try_into().unwrap();
    reply.dst_mac = forwarded[6..12].try_into().unwrap();
    Some(reply)
}
