//! BPF_PROG_TEST_RUN on crafted packets: every mode, both families, TCP and UDP. Each output is
//! compared byte for byte with the reference model and checked on its own (backend chosen by
//! the Maglev table, rewritten addresses and ports, checksums recomputed from scratch).

use lb::dataplane::VipForwarding;
use lb_common::hash::flow_hash;
use lb_common::maps::*;
use lb_common::nat::seconds;
use lb_common::packet::build::{Frame, TCP_ACK, reassemble, verify_checksums};
use lb_common::packet::{ETH_HLEN, ETH_P_IPV6, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};
use lb_tests::harness::{Harness, addr16, backend, vip_key};
use lb_tests::privilege::require_root;
use std::net::{IpAddr, SocketAddr};

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

struct Setup {
    vip: SocketAddr,
    proto: u8,
    mode: u8,
    snat: IpAddr,
    backends: Vec<(u32, SocketAddr)>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn backend_mac(index: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, index as u8]
}

fn setups() -> Vec<Setup> {
    let v4_backends = vec![(1, sock("10.0.1.1:8080")), (2, sock("10.0.1.2:8080")), (3, sock("10.0.1.3:8080"))];
    let v6_backends = vec![(4, sock("[fd00:1::1]:8080")), (5, sock("[fd00:1::2]:8080")), (6, sock("[fd00:1::3]:8080"))];
    let mut setups = Vec::new();
    for (proto, port) in [(PROTO_TCP, 80), (PROTO_UDP, 53)] {
        for mode in [MODE_DSR, MODE_NAT] {
            let (v4, v6) = if mode == MODE_DSR { ("10.0.0.10", "fd00::10") } else { ("10.0.0.20", "fd00::20") };
            setups.push(Setup {
                vip: SocketAddr::new(ip(v4), port),
                proto,
                mode,
                snat: ip("10.0.0.2"),
                backends: v4_backends.clone(),
            });
            setups.push(Setup {
                vip: SocketAddr::new(ip(v6), port),
                proto,
                mode,
                snat: ip("fd00::2"),
                backends: v6_backends.clone(),
            });
        }
    }
    setups
}

fn harness_with(setups: &[Setup]) -> Harness {
    harness_sized(setups, lb_tests::harness::test_sizes())
}

fn harness_sized(setups: &[Setup], sizes: lb::dataplane::DataplaneSizes) -> Harness {
    let mut harness = Harness::with_sizes(sizes).unwrap();
    for (slot, setup) in setups.iter().enumerate() {
        for (index, addr) in &setup.backends {
            let mut b = backend(*addr, backend_mac(*index));
            if setup.mode == MODE_DSR {
                // DSR backends answer on the VIP's port: the port is not rewritten.
                b.port = 0;
            }
            harness.set_backend(*index, &b).unwrap();
        }
        let forwarding = VipForwarding {
            vip_index: slot as u32,
            mode: setup.mode,
            snat_addr: addr16(setup.snat),
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

fn client_frame(setup: &Setup, client: IpAddr, sport: u16) -> Frame {
    let mut frame = if setup.proto == PROTO_TCP {
        Frame::tcp(client, sport, setup.vip.ip(), setup.vip.port())
    } else {
        Frame::udp(client, sport, setup.vip.ip(), setup.vip.port())
    };
    frame.src_mac = CLIENT_MAC;
    frame.dst_mac = LB_MAC;
    frame.payload = b"hello from the client".to_vec();
    frame
}

/// The same flow's later packets (ACK set): they follow the connection table.
fn established(mut frame: Frame) -> Frame {
    frame.tcp_flags = TCP_ACK;
    frame
}

/// The IPv4 TCP VIPs of one mode, loaded, and the forwarding they were published with.
fn ipv4_tcp(mode: u8) -> (Vec<Setup>, Harness, VipForwarding) {
    let setups: Vec<Setup> =
        setups().into_iter().filter(|s| s.mode == mode && s.proto == PROTO_TCP && s.vip.is_ipv4()).collect();
    let harness = harness_with(&setups);
    let forwarding = VipForwarding {
        vip_index: 0,
        mode,
        snat_addr: addr16(setups[0].snat),
        snat_port_min: 20000,
        snat_port_max: 60000,
        client_affinity: None,
        observe: false,
    };
    (setups, harness, forwarding)
}

fn client_ip(setup: &Setup) -> IpAddr {
    if setup.vip.is_ipv4() { ip("192.0.2.7") } else { ip("2001:db8::7") }
}

/// Reads (src, sport, dst, dport) of an output frame.
fn flow_of(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
    let v6 = u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IPV6;
    let (src, dst, l4): (IpAddr, IpAddr, usize) = if v6 {
        let s: [u8; 16] = frame[ETH_HLEN + 8..ETH_HLEN + 24].try_into().unwrap();
        let d: [u8; 16] = frame[ETH_HLEN + 24..ETH_HLEN + 40].try_into().unwrap();
        (s.into(), d.into(), ETH_HLEN + 40)
    } else {
        let s: [u8; 4] = frame[ETH_HLEN + 12..ETH_HLEN + 16].try_into().unwrap();
        let d: [u8; 4] = frame[ETH_HLEN + 16..ETH_HLEN + 20].try_into().unwrap();
        (s.into(), d.into(), ETH_HLEN + ((frame[ETH_HLEN] & 0xf) as usize) * 4)
    };
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    (src, port(l4), dst, port(l4 + 2))
}

fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: addr16(src),
        dst: addr16(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: if src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
        _pad: [0; 2],
    }
}

#[test]
fn every_mode_family_and_protocol_forwards_as_predicted() {
    if !require_root("every_mode_family_and_protocol_forwards_as_predicted") {
        return;
    }
    let setups = setups();
    let mut harness = harness_with(&setups);
    for (slot, setup) in setups.iter().enumerate() {
        let table = {
            let members: Vec<_> = setup
                .backends
                .iter()
                .map(|(i, _)| lb_common::maglev::MaglevBackend {
                    index: *i,
                    key: lb_tests::harness::maglev_key(*i),
                    weight: 1,
                })
                .collect();
            lb_common::maglev::build_table(&members, lb_tests::harness::TEST_RING_SIZE).unwrap()
        };
        let client = client_ip(setup);
        let mut seen = std::collections::HashSet::new();
        for sport in 40000..40060u16 {
            let input = client_frame(setup, client, sport).bytes();
            let (kernel, model) = harness.run(&input).unwrap();
            assert_eq!(kernel, model, "setup {slot}: kernel and model disagree on port {sport}");
            assert_eq!(kernel.reason, Reason::TxForward);
            assert_eq!(kernel.action, XDP_TX);
            verify_checksums(&kernel.packet).unwrap_or_else(|e| panic!("setup {slot} port {sport}: {e}"));

            // The backend is the one the Maglev table names for this flow's hash.
            let key = flow_key(client, sport, setup.vip.ip(), setup.vip.port(), setup.proto);
            let expected_index = table[(flow_hash(&key) % table.len() as u32) as usize];
            let expected = setup.backends.iter().find(|(i, _)| *i == expected_index).unwrap().1;
            seen.insert(expected_index);
            assert_eq!(&kernel.packet[0..6], &backend_mac(expected_index), "destination MAC is the chosen backend's");
            assert_eq!(&kernel.packet[6..12], &LB_MAC, "source MAC is the load balancer's");
            let (src, out_sport, dst, dport) = flow_of(&kernel.packet);
            if setup.mode == MODE_DSR {
                assert_eq!(&kernel.packet[12..], &input[12..], "DSR changes nothing above L2");
            } else {
                assert_eq!(src, setup.snat, "NAT source is the SNAT address");
                assert!((20000..=60000).contains(&out_sport), "SNAT port {out_sport} out of range");
                assert_eq!((dst, dport), (expected.ip(), expected.port()), "NAT destination is the chosen backend");
                let payload_at = kernel.packet.len() - b"hello from the client".len();
                assert_eq!(&kernel.packet[payload_at..], b"hello from the client");
            }
        }
        assert_eq!(seen.len(), 3, "setup {slot}: 60 flows must reach all three backends");
        let traffic = harness.dataplane.vip_traffic(slot as u32).unwrap();
        assert_eq!((traffic.packets, traffic.new_flows), (60, 60), "setup {slot} VIP counters");
    }
}

#[test]
fn nat_replies_are_translated_back_to_the_client() {
    if !require_root("nat_replies_are_translated_back_to_the_client") {
        return;
    }
    let setups: Vec<Setup> = setups().into_iter().filter(|s| s.mode == MODE_NAT).collect();
    let mut harness = harness_with(&setups);
    for setup in &setups {
        let client = client_ip(setup);
        for sport in [41000u16, 41001, 41002, 41003] {
            let request = client_frame(setup, client, sport);
            let (forwarded, _) = harness.run(&request.bytes()).unwrap();
            let (snat, snat_port, backend_ip, backend_port) = flow_of(&forwarded.packet);
            // The backend answers the SNAT address from its own address and port.
            let mut reply = request.clone();
            reply.src = backend_ip;
            reply.sport = backend_port;
            reply.dst = snat;
            reply.dport = snat_port;
            reply.src_mac = forwarded.packet[0..6].try_into().unwrap();
            reply.dst_mac = LB_MAC;
            reply.tcp_flags = TCP_ACK;
            reply.payload = b"answer from the backend".to_vec();
            let (kernel, model) = harness.run(&reply.bytes()).unwrap();
            assert_eq!(kernel, model);
            assert_eq!(kernel.reason, Reason::TxNatReply);
            verify_checksums(&kernel.packet).unwrap();
            assert_eq!(
                flow_of(&kernel.packet),
                (setup.vip.ip(), setup.vip.port(), client, sport),
                "reply comes from the VIP"
            );
            assert_eq!(&kernel.packet[0..6], &CLIENT_MAC, "reply goes back to the client's MAC");

            // A packet to the SNAT address on a port nobody allocated is not ours: the kernel gets it.
            let mut stray = reply.clone();
            stray.dport = snat_port.wrapping_add(1);
            let (kernel, _) = harness.run(&stray.bytes()).unwrap();
            assert_eq!(kernel.reason, Reason::PassNotVip);
        }
    }
}

/// The address filter holds a slot's flags, not an address's: a packet to another address in
/// the slot of a VIP's or a SNAT address is looked up in `VIPS` or `NAT_REV`, is found in
/// neither, and goes to the kernel like any other host's.
#[test]
fn an_address_in_the_filter_slot_of_a_vip_or_snat_address_is_not_ours() {
    if !require_root("an_address_in_the_filter_slot_of_a_vip_or_snat_address_is_not_ours") {
        return;
    }
    let setups: Vec<Setup> =
        setups().into_iter().filter(|s| s.mode == MODE_NAT && s.proto == PROTO_TCP && s.vip.is_ipv4()).collect();
    let mut harness = harness_with(&setups);
    let setup = &setups[0];
    for ours in [setup.vip.ip(), setup.snat] {
        let slot = address_filter_slot(&addr16(ours));
        let neighbour = (1..=u32::from(u16::MAX) * 4)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a40_0000 + i)))
            .find(|other| address_filter_slot(&addr16(*other)) == slot)
            .expect("16,384 slots: some address among 262,140 shares one");
        let mut frame = client_frame(setup, client_ip(setup), 41000);
        frame.dst = neighbour;
        let (kernel, model) = harness.run(&frame.bytes()).unwrap();
        assert_eq!(kernel, model);
        assert_eq!(kernel.reason, Reason::PassNotVip, "{neighbour}, in the slot of {ours}");
    }
    // The addresses themselves still are.
    let (kernel, _) = harness.run(&client_frame(setup, client_ip(setup), 41000).bytes()).unwrap();
    assert_eq!(kernel.reason, Reason::TxForward);
}

#[test]
fn established_flows_keep_their_backend_until_it_goes_away() {
    if !require_root("established_flows_keep_their_backend_until_it_goes_away") {
        return;
    }
    for mode in [MODE_DSR, MODE_NAT] {
        let (setups, mut harness, forwarding) = ipv4_tcp(mode);
        let setup = &setups[0];
        let key = vip_key(setup.vip, setup.proto);
        let client = client_ip(setup);
        let mut first_backend = std::collections::HashMap::new();
        for sport in 42000..42200u16 {
            let (out, _) = harness.run(&client_frame(setup, client, sport).bytes()).unwrap();
            // The handshake's second packet: from here on the flow is remembered in every mode
            // (a DSR or tunnel flow is not recorded by its SYN alone).
            let (ack, model) = harness.run(&established(client_frame(setup, client, sport)).bytes()).unwrap();
            assert_eq!(ack, model);
            assert_eq!(ack.packet[0..6], out.packet[0..6], "mode {mode}: the ACK follows its SYN");
            first_backend.insert(sport, out.packet[0..6].to_vec());
        }
        // A fourth backend joins: the new table moves some flows to it, but established ones stay.
        harness.set_backend(7, &backend(sock("10.0.1.4:8080"), backend_mac(7))).unwrap();
        harness.publish_vip(&key, &forwarding, &[1, 2, 3, 7]).unwrap();
        for sport in 42000..42200u16 {
            let (out, model) = harness.run(&established(client_frame(setup, client, sport)).bytes()).unwrap();
            assert_eq!(out, model);
            assert_eq!(out.packet[0..6].to_vec(), first_backend[&sport], "mode {mode}: flow {sport} moved");
        }
        // Backend 2 goes down: its flows move, the others stay where they were.
        let mut down = backend(sock("10.0.1.2:8080"), backend_mac(2));
        down.flags = 0;
        harness.set_backend(2, &down).unwrap();
        harness.publish_vip(&key, &forwarding, &[1, 3, 7]).unwrap();
        let mut moved = 0;
        for sport in 42000..42200u16 {
            let (out, model) = harness.run(&established(client_frame(setup, client, sport)).bytes()).unwrap();
            assert_eq!(out, model);
            let was = &first_backend[&sport];
            if was.as_slice() == backend_mac(2) {
                assert_ne!(&out.packet[0..6], &backend_mac(2), "a flow still reaches the down backend");
                moved += 1;
            } else {
                assert_eq!(&out.packet[0..6], was.as_slice(), "mode {mode}: a healthy backend's flow moved");
            }
        }
        assert!(moved > 0, "some flows were on backend 2");
    }
}

#[test]
fn frames_for_another_host_pass_untouched_once_the_own_mac_is_set() {
    if !require_root("frames_for_another_host_pass_untouched_once_the_own_mac_is_set") {
        return;
    }
    for mode in [MODE_DSR, MODE_NAT] {
        let (setups, mut harness, _) = ipv4_tcp(mode);
        let setup = &setups[0];
        let mut frame = client_frame(setup, client_ip(setup), 44000);
        frame.dst_mac = [0x02, 0, 0, 0, 0, 0x99];
        // Without a daemon having set the interface MAC, any destination is accepted.
        let (kernel, model) = harness.run(&frame.bytes()).unwrap();
        assert_eq!(kernel, model);
        assert_eq!(kernel.reason, Reason::TxForward);

        harness.set_own_mac(LB_MAC).unwrap();
        // A frame flooded here for another host (the peer of a pair, say), unicast or broadcast.
        for other in [[0x02, 0, 0, 0, 0, 0x99], [0xff; 6]] {
            frame.dst_mac = other;
            let bytes = frame.bytes();
            let (kernel, model) = harness.run(&bytes).unwrap();
            assert_eq!(kernel, model);
            assert_eq!((kernel.reason, kernel.action), (Reason::PassOtherHost, XDP_PASS), "mode {mode}");
            assert_eq!(kernel.packet, bytes, "passed untouched");
        }
        frame.dst_mac = LB_MAC;
        let (kernel, model) = harness.run(&frame.bytes()).unwrap();
        assert_eq!(kernel, model);
        assert_eq!(kernel.reason, Reason::TxForward, "mode {mode}: a frame for us is still forwarded");
    }
}

#[test]
fn a_nat_port_goes_to_a_new_flow_once_its_connection_has_ended() {
    if !require_root("a_nat_port_goes_to_a_new_flow_once_its_connection_has_ended") {
        return;
    }
    let (setups, mut harness, forwarding) = ipv4_tcp(MODE_NAT);
    let setup = &setups[0];
    one_port_to_one_backend(&mut harness, setup, &forwarding);
    let client = client_ip(setup);
    let first = client_frame(setup, client, 45000);
    let opened = run(&mut harness, &first);
    assert_eq!(opened.reason, Reason::TxForward);
    let (snat, snat_port, backend_ip, backend_port) = flow_of(&opened.packet);
    assert_eq!(snat_port, 20000);
    // The client's next packet: the connection is open, no longer half-open.
    assert_eq!(run(&mut harness, &established(first.clone())).reason, Reason::TxForward);
    let second = client_frame(setup, client, 45001);
    assert_eq!(run(&mut harness, &second).reason, Reason::DropNatPorts, "the port belongs to an open connection");
    // Even after CLOSED_WAIT of silence: an open TCP connection keeps its port for TCP_IDLE.
    harness.age_nat_flows(lb_common::nat::CLOSED_WAIT).unwrap();
    assert_eq!(run(&mut harness, &second).reason, Reason::DropNatPorts);

    // The client closes, then the backend: the backend keeps nothing of the tuple.
    let mut fin = established(first.clone());
    fin.tcp_flags = TCP_ACK | TCP_FLAG_FIN;
    assert_eq!(run(&mut harness, &fin).reason, Reason::TxForward);
    let mut reply = first.clone();
    (reply.src, reply.sport, reply.dst, reply.dport) = (backend_ip, backend_port, snat, snat_port);
    (reply.src_mac, reply.dst_mac) = (opened.packet[0..6].try_into().unwrap(), LB_MAC);
    reply.tcp_flags = TCP_ACK | TCP_FLAG_FIN;
    assert_eq!(run(&mut harness, &reply).reason, Reason::TxNatReply);
    assert_eq!(run(&mut harness, &second).reason, Reason::DropNatPorts, "a lost last ACK may still need it");

    harness.age_nat_flows(lb_common::nat::CLOSED_WAIT).unwrap();
    let taken = run(&mut harness, &second);
    assert_eq!(taken.reason, Reason::TxForward, "the ended connection's port goes to the new flow");
    assert_eq!(flow_of(&taken.packet).1, 20000);
    // The backend's answers on that port now reach the new flow's client.
    reply.tcp_flags = TCP_ACK;
    let answer = run(&mut harness, &reply);
    assert_eq!(answer.reason, Reason::TxNatReply);
    assert_eq!(flow_of(&answer.packet), (setup.vip.ip(), setup.vip.port(), client, 45001));
    // The old flow's late segment no longer rides on that tuple: it needs a port of its own,
    // and there is none left.
    assert_eq!(run(&mut harness, &fin).reason, Reason::DropNatPorts);
}

#[test]
fn a_half_open_nat_flow_gives_its_port_up_when_its_client_stays_silent() {
    if !require_root("a_half_open_nat_flow_gives_its_port_up_when_its_client_stays_silent") {
        return;
    }
    let (setups, mut harness, forwarding) = ipv4_tcp(MODE_NAT);
    let setup = &setups[0];
    one_port_to_one_backend(&mut harness, setup, &forwarding);
    let client = client_ip(setup);
    let events = |harness: &Harness| {
        let all = harness.dataplane.flow_events().unwrap();
        all.iter().find(|(event, _)| *event == FlowEvent::HalfOpenPortTaken).unwrap().1
    };
    // A SYN and nothing else (as a spoofed one): its port is held for HALF_OPEN_WAIT only.
    let spoofed = client_frame(setup, ip("192.0.2.200"), 45000);
    assert_eq!(run(&mut harness, &spoofed).reason, Reason::TxForward);
    let real = client_frame(setup, client, 45001);
    assert_eq!(run(&mut harness, &real).reason, Reason::DropNatPorts, "a fresh half-open flow keeps its port");
    harness.age_nat_flows(lb_common::nat::HALF_OPEN_WAIT).unwrap();
    let before = events(&harness);
    assert_eq!(run(&mut harness, &real).reason, Reason::TxForward, "a silent half-open flow's port goes to a new flow");
    assert_eq!(events(&harness), before + 1, "counted as half_open_port_taken");
    // The real client completes its handshake: its port is now held like any open connection's.
    assert_eq!(run(&mut harness, &established(real.clone())).reason, Reason::TxForward);
    harness.age_nat_flows(lb_common::nat::CLOSED_WAIT).unwrap();
    let another = client_frame(setup, ip("192.0.2.201"), 45002);
    assert_eq!(run(&mut harness, &another).reason, Reason::DropNatPorts, "an open connection keeps its port");
}

/// The daemon's sweep takes out what the program would give away, and nothing else: a silent
/// half-open NAT flow after HALF_OPEN_WAIT, a closed one after CLOSED_WAIT, open ones (NAT and
/// DSR) once idle for TCP_IDLE, each NAT flow with its port. A full table refuses new NAT flows
/// (dropped and counted, no established flow evicted) until a sweep has made room.
#[test]
fn the_sweep_removes_quiet_and_finished_flows_and_makes_room_in_a_full_table() {
    use lb_common::nat::{CLOSED_WAIT, HALF_OPEN_WAIT, TCP_IDLE};
    if !require_root("the_sweep_removes_quiet_and_finished_flows_and_makes_room_in_a_full_table") {
        return;
    }
    const TABLE: u32 = 8;
    let setups: Vec<Setup> = setups().into_iter().filter(|s| s.proto == PROTO_TCP && s.vip.is_ipv4()).collect();
    let sizes = lb::dataplane::DataplaneSizes { max_conns: TABLE, ..lb_tests::harness::test_sizes() };
    let mut harness = harness_sized(&setups, sizes);
    let (dsr, nat) = (&setups[0], &setups[1]);
    assert_eq!((dsr.mode, nat.mode), (MODE_DSR, MODE_NAT));
    let client = client_ip(nat);
    let sweeper = harness.dataplane.sweeper().unwrap();

    // An open NAT connection, a closed one, an open DSR one.
    let open = client_frame(nat, client, 45001);
    assert_eq!(run(&mut harness, &open).reason, Reason::TxForward);
    assert_eq!(run(&mut harness, &established(open.clone())).reason, Reason::TxForward);
    let closed = client_frame(nat, client, 45002);
    let opened = run(&mut harness, &closed);
    let mut fin = established(closed.clone());
    fin.tcp_flags = TCP_ACK | TCP_FLAG_FIN;
    assert_eq!(run(&mut harness, &fin).reason, Reason::TxForward);
    let backend_fin = backend_answer(&opened.packet, TCP_ACK | TCP_FLAG_FIN);
    assert_eq!(run(&mut harness, &backend_fin).reason, Reason::TxNatReply);
    let dsr_flow = client_frame(dsr, client, 45003);
    run(&mut harness, &dsr_flow);
    assert_eq!(run(&mut harness, &established(dsr_flow.clone())).reason, Reason::TxForward);
    // Half-open NAT flows (SYNs nothing followed) fill the table.
    for sport in 0..5 {
        assert_eq!(run(&mut harness, &client_frame(nat, ip("192.0.2.200"), 46000 + sport)).reason, Reason::TxForward);
    }
    assert_eq!(harness.dataplane.connections().unwrap().len(), TABLE as usize);
    let refused = client_frame(nat, ip("192.0.2.201"), 47000);
    assert_eq!(run(&mut harness, &refused).reason, Reason::DropTableFull, "a full table drops a new NAT flow");
    assert_eq!(harness.dataplane.nat_reverses().unwrap().len(), 7, "and takes back the port it had reserved");
    let dsr_unrecorded = client_frame(dsr, client, 45004);
    run(&mut harness, &dsr_unrecorded);
    assert_eq!(run(&mut harness, &established(dsr_unrecorded)).reason, Reason::TxForward, "a DSR flow goes on");
    assert_eq!(run(&mut harness, &established(open.clone())).reason, Reason::TxForward, "nothing was evicted");

    // Read after every flow above was written: no entry is younger than `now`.
    let now = lb_tests::harness::kernel_clock_ticks();
    // Sweeps at `now + after`; the model goes on from the tables the sweep left.
    let sweep = |harness: &mut Harness, after: u32| {
        let swept = sweeper.sweep(now + after).unwrap();
        harness.model.conns = harness.dataplane.connections().unwrap().into_iter().collect();
        harness.model.nat_rev = harness.dataplane.nat_reverses().unwrap().into_iter().collect();
        (swept.removed_connections, swept.removed_nat_entries)
    };
    assert_eq!(sweep(&mut harness, 0), (0, 0), "nothing has waited long enough yet");
    assert_eq!(sweep(&mut harness, HALF_OPEN_WAIT), (5, 5), "the silent half-open flows go, with their ports");
    assert_eq!(run(&mut harness, &refused).reason, Reason::TxForward, "room for a new flow");
    assert_eq!(sweep(&mut harness, CLOSED_WAIT), (2, 2), "then the closed connection, and the new flow's SYN");
    assert_eq!(sweep(&mut harness, TCP_IDLE - seconds(10)), (0, 0), "open connections stay while not idle");
    assert_eq!(run(&mut harness, &established(open.clone())).reason, Reason::TxForward);
    // (The NAT connection just sent again: it is idle a little later than the DSR one.)
    assert_eq!(
        sweep(&mut harness, TCP_IDLE + seconds(10)),
        (2, 1),
        "idle ones go: the NAT flow with its port, the DSR one"
    );
    assert!(
        harness.dataplane.connections().unwrap().is_empty() && harness.dataplane.nat_reverses().unwrap().is_empty()
    );
}

/// A port the sweep found free may change hands before the sweep removes it (the program gives
/// a free port to the next flow that asks, by the thousand a second during a flood): the sweep
/// then leaves the port, and the old holder's entry, as they now are.
#[test]
fn a_port_that_changed_hands_after_the_sweep_read_it_stays_with_its_new_flow() {
    if !require_root("a_port_that_changed_hands_after_the_sweep_read_it_stays_with_its_new_flow") {
        return;
    }
    let (setups, mut harness, forwarding) = ipv4_tcp(MODE_NAT);
    let setup = &setups[0];
    one_port_to_one_backend(&mut harness, setup, &forwarding);
    let sweeper = harness.dataplane.sweeper().unwrap();
    // A SYN nothing followed: once its half-open wait is over, its port is free.
    assert_eq!(run(&mut harness, &client_frame(setup, ip("192.0.2.200"), 45000)).reason, Reason::TxForward);
    harness.age_nat_flows(lb_common::nat::HALF_OPEN_WAIT).unwrap();
    let plan = sweeper.plan(lb_tests::harness::kernel_clock_ticks()).unwrap();
    // Between the sweep's reading and its removing, a real client's SYN takes the port.
    let client = client_ip(setup);
    let real = client_frame(setup, client, 45001);
    let opened = run(&mut harness, &real);
    assert_eq!(opened.reason, Reason::TxForward);
    let swept = sweeper.apply(plan).unwrap();
    assert_eq!((swept.removed_connections, swept.removed_nat_entries), (0, 0), "{swept:?}");
    // The backend's answer reaches the new flow's client.
    let answer = run(&mut harness, &backend_answer(&opened.packet, TCP_FLAG_SYN | TCP_FLAG_ACK));
    assert_eq!(answer.reason, Reason::TxNatReply);
    assert_eq!(flow_of(&answer.packet), (setup.vip.ip(), setup.vip.port(), client, 45001));
}

#[test]
fn during_a_flood_dsr_flows_are_not_recorded_and_nat_half_open_ports_go_sooner() {
    if !require_root("during_a_flood_dsr_flows_are_not_recorded_and_nat_half_open_ports_go_sooner") {
        return;
    }
    let event = |harness: &Harness, which: FlowEvent| {
        harness.dataplane.flow_events().unwrap().iter().find(|(event, _)| *event == which).unwrap().1
    };
    // DSR: the handshake's second packet is placed by the table, and nothing is recorded.
    let (setups, mut harness, _) = ipv4_tcp(MODE_DSR);
    let setup = &setups[0];
    let client = client_ip(setup);
    harness.set_flood(true).unwrap();
    for sport in 46000..46100u16 {
        let syn = run(&mut harness, &client_frame(setup, client, sport));
        let ack = run(&mut harness, &established(client_frame(setup, client, sport)));
        assert_eq!((syn.reason, ack.reason), (Reason::TxForward, Reason::TxForward));
        assert_eq!(ack.packet[0..6], syn.packet[0..6], "the table places the ACK where it placed the SYN");
    }
    assert_eq!(harness.dataplane.connections().unwrap().len(), 0, "nothing recorded during the flood");
    assert_eq!(event(&harness, FlowEvent::FloodNotRecorded), 100);
    // Once it is over, flows are recorded again.
    harness.set_flood(false).unwrap();
    run(&mut harness, &established(client_frame(setup, client, 46000)));
    assert_eq!(harness.dataplane.connections().unwrap().len(), 1);

    // NAT: a SYN of the flood holds its port for HALF_OPEN_WAIT_FLOODED only, even after the flood.
    let (setups, mut harness, forwarding) = ipv4_tcp(MODE_NAT);
    let setup = &setups[0];
    one_port_to_one_backend(&mut harness, setup, &forwarding);
    harness.set_flood(true).unwrap();
    assert_eq!(run(&mut harness, &client_frame(setup, ip("192.0.2.200"), 45000)).reason, Reason::TxForward);
    harness.set_flood(false).unwrap();
    let real = client_frame(setup, client_ip(setup), 45001);
    assert_eq!(run(&mut harness, &real).reason, Reason::DropNatPorts, "a fresh half-open flow keeps its port");
    harness.age_nat_flows(lb_common::nat::HALF_OPEN_WAIT_FLOODED).unwrap();
    assert_eq!(run(&mut harness, &real).reason, Reason::TxForward, "the flood's SYN gave its port up sooner");
    assert_eq!(event(&harness, FlowEvent::HalfOpenPortTaken), 1);
}

/// `observe`: a SYN again, a retransmission's time after the first, before the backend
/// answered, is an unanswered attempt of that backend; sooner (a duplicate), after an answer,
/// or after a refusal held back, it is not. A connection's refusal is held back once: the
/// refusal its SYN again meets reaches the client.
#[test]
fn a_syn_again_before_any_answer_is_counted_unanswered_for_an_observed_vip() {
    if !require_root("a_syn_again_before_any_answer_is_counted_unanswered_for_an_observed_vip") {
        return;
    }
    let (setups, mut harness, forwarding) = ipv4_tcp(MODE_NAT);
    let setup = &setups[0];
    let index = setup.backends[0].0;
    let observed = VipForwarding { observe: true, ..forwarding };
    harness.publish_vip(&vip_key(setup.vip, setup.proto), &observed, &[index]).unwrap();
    let client = client_ip(setup);
    let attempts = |harness: &Harness| {
        let kernel = harness.dataplane.backend_attempts(index).unwrap();
        assert_eq!(kernel, harness.model.observed.get(&index).copied().unwrap_or_default(), "kernel and model");
        (kernel.refused, kernel.answered, kernel.unanswered)
    };

    let silent = client_frame(setup, client, 45000);
    run(&mut harness, &silent);
    assert_eq!(attempts(&harness), (0, 0, 0), "a first SYN is no attempt yet");
    run(&mut harness, &silent);
    assert_eq!(attempts(&harness), (0, 0, 0), "a duplicate SYN, sooner than a retransmission");
    harness.age_nat_flows(lb_common::nat::SYN_AGAIN_AFTER).unwrap();
    let again = run(&mut harness, &silent);
    assert_eq!(again.reason, Reason::TxForward);
    assert_eq!(attempts(&harness), (0, 0, 1), "its SYN again, unanswered");
    // Answered at last: its next SYN (a lost SYN-ACK) is no longer an unanswered attempt.
    let syn_ack = backend_answer(&again.packet, TCP_FLAG_SYN | TCP_FLAG_ACK);
    assert_eq!(run(&mut harness, &syn_ack).reason, Reason::TxNatReply);
    harness.age_nat_flows(lb_common::nat::SYN_AGAIN_AFTER).unwrap();
    run(&mut harness, &silent);
    assert_eq!(attempts(&harness), (0, 1, 1));
    // Refused: the RST is held back, and the client's SYN again is not counted a second time.
    let refused = client_frame(setup, client, 45001);
    let forwarded = run(&mut harness, &refused);
    let rst = backend_answer(&forwarded.packet, TCP_FLAG_RST | TCP_FLAG_ACK);
    assert_eq!(run(&mut harness, &rst).reason, Reason::DropRefusalHeld);
    harness.age_nat_flows(lb_common::nat::SYN_AGAIN_AFTER).unwrap();
    let retried = run(&mut harness, &refused);
    assert_eq!(retried.reason, Reason::TxForward);
    assert_eq!(attempts(&harness), (1, 1, 1));
    // Refused again: once per connection is enough, this refusal reaches the client.
    let again = run(&mut harness, &backend_answer(&retried.packet, TCP_FLAG_RST | TCP_FLAG_ACK));
    assert_eq!(again.reason, Reason::TxNatReply, "the second refusal reaches the client");
    assert_eq!(flow_of(&again.packet), (setup.vip.ip(), setup.vip.port(), client, 45001));
    assert_eq!(attempts(&harness), (2, 1, 1));
}

#[test]
fn nat_replies_on_a_port_of_an_earlier_range_still_reach_their_client() {
    if !require_root("nat_replies_on_a_port_of_an_earlier_range_still_reach_their_client") {
        return;
    }
    let (setups, mut harness, forwarding) = ipv4_tcp(MODE_NAT);
    let setup = &setups[0];
    let key = vip_key(setup.vip, setup.proto);
    let client = client_ip(setup);
    let first = VipForwarding { snat_port_min: 20000, snat_port_max: 20010, ..forwarding };
    harness.publish_vip(&key, &first, &[setup.backends[0].0]).unwrap();
    let request = client_frame(setup, client, 47000);
    let opened = run(&mut harness, &request);
    let (snat, snat_port, backend_ip, backend_port) = flow_of(&opened.packet);
    // `snat_ports` changes (or an upgrade brings another default): the open flow keeps its port.
    let later = VipForwarding { snat_port_min: 40000, snat_port_max: 40010, ..forwarding };
    harness.publish_vip(&key, &later, &[setup.backends[0].0]).unwrap();
    let mut reply = request.clone();
    (reply.src, reply.sport, reply.dst, reply.dport) = (backend_ip, backend_port, snat, snat_port);
    (reply.src_mac, reply.dst_mac) = (opened.packet[0..6].try_into().unwrap(), LB_MAC);
    reply.tcp_flags = TCP_ACK;
    let answer = run(&mut harness, &reply);
    assert_eq!(answer.reason, Reason::TxNatReply, "a reply to port {snat_port}, outside today's range");
    assert_eq!(flow_of(&answer.packet), (setup.vip.ip(), setup.vip.port(), client, 47000));
}

#[test]
fn vip_without_backends_drops_and_counts() {
    if !require_root("vip_without_backends_drops_and_counts") {
        return;
    }
    let setups: Vec<Setup> = setups().into_iter().take(1).collect();
    let mut harness = harness_with(&setups);
    let setup = &setups[0];
    let forwarding = VipForwarding {
        vip_index: 0,
        mode: setup.mode,
        snat_addr: [0; 16],
        snat_port_min: 1,
        snat_port_max: 2,
        client_affinity: None,
        observe: false,
    };
    harness.publish_vip(&vip_key(setup.vip, setup.proto), &forwarding, &[]).unwrap();
    for sport in 43000..43010u16 {
        let (kernel, model) = harness.run(&client_frame(setup, client_ip(setup), sport).bytes()).unwrap();
        assert_eq!(kernel, model);
        assert_eq!((kernel.reason, kernel.action), (Reason::DropNoBackend, XDP_DROP));
    }
}

#[test]
fn any_port_vip_takes_every_port_and_exact_port_wins() {
    if !require_root("any_port_vip_takes_every_port_and_exact_port_wins") {
        return;
    }
    let mut harness = Harness::new().unwrap();
    harness.set_backend(1, &backend(sock("10.0.1.1:0"), backend_mac(1))).unwrap();
    harness.set_backend(2, &backend(sock("10.0.1.2:0"), backend_mac(2))).unwrap();
    let dsr = |slot| VipForwarding {
        vip_index: slot,
        mode: MODE_DSR,
        snat_addr: [0; 16],
        snat_port_min: 0,
        snat_port_max: 0,
        client_affinity: None,
        observe: false,
    };
    harness.publish_vip(&vip_key(sock("10.0.0.30:0"), PROTO_TCP), &dsr(0), &[1]).unwrap();
    harness.publish_vip(&vip_key(sock("10.0.0.30:443"), PROTO_TCP), &dsr(1), &[2]).unwrap();
    for (dport, mac) in [(22u16, backend_mac(1)), (8443, backend_mac(1)), (443, backend_mac(2))] {
        let frame = Frame::tcp(ip("192.0.2.9"), 5555, ip("10.0.0.30"), dport).bytes();
        let (kernel, model) = harness.run(&frame).unwrap();
        assert_eq!(kernel, model);
        assert_eq!(kernel.reason, Reason::TxForward);
        assert_eq!(&kernel.packet[0..6], &mac, "port {dport}");
    }
    // UDP to the same address is another VIP (none): passed.
    let frame = Frame::udp(ip("192.0.2.9"), 5555, ip("10.0.0.30"), 22).bytes();
    assert_eq!(harness.run(&frame).unwrap().0.reason, Reason::PassNotVip);
}

#[test]
fn a_syn_reusing_a_remembered_tuple_is_placed_by_the_current_table() {
    if !require_root("a_syn_reusing_a_remembered_tuple_is_placed_by_the_current_table") {
        return;
    }
    for mode in [MODE_DSR, MODE_NAT] {
        let (setups, mut harness, forwarding) = ipv4_tcp(mode);
        let setup = &setups[0];
        let client = client_ip(setup);
        // A flow on backend 1 (its first packet is a SYN, then its handshake's second packet).
        let sport = (43000..44000u16)
            .find(|&p| harness.run(&client_frame(setup, client, p).bytes()).unwrap().0.packet[0..6] == backend_mac(1))
            .expect("some port lands on backend 1");
        let (ack, model) = harness.run(&established(client_frame(setup, client, sport)).bytes()).unwrap();
        assert_eq!(ack, model);
        assert_eq!(&ack.packet[0..6], &backend_mac(1), "mode {mode}: the handshake's second packet follows its SYN");
        // Backend 1 leaves the table but stays usable (as when drained): the connection goes on...
        harness.publish_vip(&vip_key(setup.vip, setup.proto), &forwarding, &[2, 3]).unwrap();
        let (ack, model) = harness.run(&established(client_frame(setup, client, sport)).bytes()).unwrap();
        assert_eq!(ack, model);
        assert_eq!(&ack.packet[0..6], &backend_mac(1), "mode {mode}: the established connection stays");
        // ...but a new connection from the same port (a reused tuple) is placed by the table.
        let (syn, model) = harness.run(&client_frame(setup, client, sport).bytes()).unwrap();
        assert_eq!(syn, model);
        assert_ne!(&syn.packet[0..6], &backend_mac(1), "mode {mode}: a new SYN followed a stale entry");
        let (next, model) = harness.run(&established(client_frame(setup, client, sport)).bytes()).unwrap();
        assert_eq!(next, model);
        assert_eq!(&next.packet[0..6], &syn.packet[0..6], "mode {mode}: the new connection's packets follow its SYN");
    }
}

#[test]
fn forgetting_a_backend_spares_other_vips_flows_and_keeps_its_nat_ports_for_its_flows() {
    if !require_root("forgetting_a_backend_spares_other_vips_flows_and_keeps_its_nat_ports_for_its_flows") {
        return;
    }
    // Two NAT VIPs share the backend 10.0.1.1:8080 (each under its own slot, as the planner gives
    // them), and a third, any-port VIP reaches the same host with an any-port backend.
    let mut harness = Harness::new().unwrap();
    let vips = [
        (sock("10.0.0.20:80"), 1, sock("10.0.1.1:8080")),
        (sock("10.0.0.21:80"), 2, sock("10.0.1.1:8080")),
        (sock("10.0.0.22:0"), 3, sock("10.0.1.1:0")),
    ];
    for (slot, (vip, index, address)) in vips.iter().enumerate() {
        harness.set_backend(*index, &backend(*address, backend_mac(*index))).unwrap();
        let forwarding = VipForwarding {
            vip_index: slot as u32,
            mode: MODE_NAT,
            snat_addr: addr16(ip("10.0.0.2")),
            snat_port_min: 20000,
            snat_port_max: 60000,
            client_affinity: None,
            observe: false,
        };
        harness.publish_vip(&vip_key(*vip, PROTO_TCP), &forwarding, &[*index]).unwrap();
    }
    const FLOWS: u16 = 20;
    let syns = |vip: &SocketAddr| -> Vec<Frame> {
        let dport = if vip.port() == 0 { 5432 } else { vip.port() };
        (40000..40000 + FLOWS).map(|sport| Frame::tcp(ip("192.0.2.7"), sport, vip.ip(), dport)).collect()
    };
    let mut ports_before = std::collections::HashSet::new();
    for (vip, _, _) in &vips {
        for frame in syns(vip) {
            let (kernel, model) = harness.run(&frame.bytes()).unwrap();
            assert_eq!(kernel, model);
            let (_, nat_port, _, backend_port) = flow_of(&kernel.packet);
            ports_before.insert((backend_port, nat_port));
        }
    }
    let connections_per_vip = |harness: &Harness| -> Vec<usize> {
        let conns = harness.dataplane.connections().unwrap();
        vips.iter().map(|(vip, _, _)| conns.iter().filter(|(flow, _)| flow.dst == addr16(vip.ip())).count()).collect()
    };
    let all = FLOWS as usize;
    assert_eq!(connections_per_vip(&harness), vec![all; 3]);
    let nat_entries = harness.dataplane.nat_reverses().unwrap().len();
    assert_eq!(nat_entries, 3 * all);

    assert_eq!(harness.forget_backend_connections(1).unwrap(), all);
    assert_eq!(connections_per_vip(&harness), vec![0, all, all], "only the first VIP's flows are gone");
    assert_eq!(harness.forget_backend_connections(3).unwrap(), all, "an any-port backend's flows go too");
    assert_eq!(connections_per_vip(&harness), vec![0, all, 0]);
    // Their NAT entries stay. The same flows' next packets get their own ports back, so the
    // backend sees the same four-tuples and the connections go on...
    assert_eq!(harness.dataplane.nat_reverses().unwrap().len(), nat_entries);
    for vip in [&vips[0].0, &vips[2].0] {
        for frame in syns(vip) {
            let (kernel, model) = harness.run(&established(frame).bytes()).unwrap();
            assert_eq!(kernel, model);
            assert_eq!(kernel.reason, Reason::TxForward);
            let (_, nat_port, _, backend_port) = flow_of(&kernel.packet);
            assert!(ports_before.contains(&(backend_port, nat_port)), "{vip}: a flow lost its NAT port");
        }
    }
    // ...while another client's new flow whose first choice is such a port takes another one:
    // the backend may still hold that four-tuple in TIME_WAIT.
    let vip = vips[0].0;
    harness.forget_backend_connections(1).unwrap();
    let stranger = (1024..u16::MAX)
        .find(|&sport| {
            let flow = flow_key(ip("192.0.2.99"), sport, vip.ip(), vip.port(), PROTO_TCP);
            let first = snat_port_candidate(flow_hash(&flow), 0, 20000, 60000);
            ports_before.contains(&(8080, first))
        })
        .expect("some client port's first candidate is a reserved port");
    let (kernel, model) = harness.run(&Frame::tcp(ip("192.0.2.99"), stranger, vip.ip(), vip.port()).bytes()).unwrap();
    assert_eq!(kernel, model);
    let (_, nat_port, _, backend_port) = flow_of(&kernel.packet);
    assert!(!ports_before.contains(&(backend_port, nat_port)), "a new flow took the reserved NAT port {nat_port}");
}

#[test]
fn client_affinity_sends_every_flow_of_a_client_to_one_backend_with_ports_of_their_own() {
    if !require_root("client_affinity_sends_every_flow_of_a_client_to_one_backend_with_ports_of_their_own") {
        return;
    }
    let (setups, mut harness, forwarding) = ipv4_tcp(MODE_NAT);
    let setup = &setups[0];
    let members: Vec<u32> = setup.backends.iter().map(|b| b.0).collect();
    let key = vip_key(setup.vip, setup.proto);
    let backend_of = |packet: &[u8]| flow_of(packet).2;
    // Narrow ports: clients' flows share a slot, never their port candidates.
    let sticky = VipForwarding { client_affinity: Some(32), snat_port_min: 20000, snat_port_max: 20199, ..forwarding };
    harness.publish_vip(&key, &sticky, &members).unwrap();
    let run = |harness: &mut Harness, frame: &Frame| {
        let (kernel, model) = harness.run(&frame.bytes()).unwrap();
        assert_eq!(kernel, model);
        assert_eq!(kernel.reason, Reason::TxForward);
        kernel.packet
    };
    let client = client_ip(setup);
    let flows: Vec<Vec<u8>> = (0..100).map(|i| run(&mut harness, &client_frame(setup, client, 30000 + i))).collect();
    let backends: std::collections::HashSet<IpAddr> = flows.iter().map(|p| backend_of(p)).collect();
    assert_eq!(backends.len(), 1, "one client's 100 flows went to {backends:?}");
    let ports: std::collections::HashSet<u16> = flows.iter().map(|p| flow_of(p).1).collect();
    assert_eq!(ports.len(), 100, "every flow has its own NAT port");

    // Other clients spread over all three backends; each sticks whatever its ports.
    let mut seen = std::collections::HashSet::new();
    for host in 1..=60u8 {
        let other = IpAddr::from([192, 0, 2, host]);
        let first = backend_of(&run(&mut harness, &client_frame(setup, other, 40000)));
        assert_eq!(backend_of(&run(&mut harness, &client_frame(setup, other, 40001))), first);
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "60 clients reached only {seen:?}");

    // A /24 prefix: the whole client network on one backend.
    let grouped = VipForwarding { client_affinity: Some(24), ..sticky };
    harness.publish_vip(&key, &grouped, &members).unwrap();
    let network: std::collections::HashSet<IpAddr> = (100..160u8)
        .map(|host| backend_of(&run(&mut harness, &client_frame(setup, IpAddr::from([192, 0, 2, host]), 41000))))
        .collect();
    assert_eq!(network.len(), 1, "192.0.2.0/24 went to {network:?}");
}

#[test]
fn echo_requests_to_a_vip_address_are_answered_in_place() {
    if !require_root("echo_requests_to_a_vip_address_are_answered_in_place") {
        return;
    }
    let setups = setups();
    let mut harness = harness_with(&setups);
    let (v4_vip, v6_vip) = (ip("10.0.0.20"), ip("fd00::20"));
    harness.answer_ping_on(&[v4_vip, v6_vip]).unwrap();
    for (client, vip) in [(ip("192.0.2.7"), v4_vip), (ip("2001:db8::7"), v6_vip)] {
        let mut request = Frame::echo_request(client, vip, 0x1234, 7);
        (request.src_mac, request.dst_mac, request.ttl) = (CLIENT_MAC, LB_MAC, 57);
        let answered = run(&mut harness, &request);
        assert_eq!((answered.reason, answered.action), (Reason::TxPingReply, XDP_TX), "{vip}");
        let mut reply = request.clone();
        (reply.src, reply.dst, reply.src_mac, reply.dst_mac, reply.ttl) = (vip, client, LB_MAC, CLIENT_MAC, 64);
        reply.icmp_type = if vip.is_ipv4() { 0 } else { 129 };
        assert_eq!(answered.packet, reply.bytes(), "{vip}: the echo reply, identifier, sequence and data kept");
        verify_checksums(&answered.packet).unwrap();

        // Other ICMP to the VIP address (not errors), and echo requests to other addresses, go
        // to the kernel.
        let other = Frame { icmp_type: if vip.is_ipv4() { 13 } else { 135 }, ..request.clone() }; // timestamp, neighbour solicitation
        assert_eq!(run(&mut harness, &other).reason, Reason::PassUnknownL4);
        let elsewhere = Frame { dst: if vip.is_ipv4() { ip("10.0.0.99") } else { ip("fd00::99") }, ..request.clone() };
        assert_eq!(run(&mut harness, &elsewhere).reason, Reason::PassNotVip);
    }
    // Switched off: the kernel gets them.
    harness.answer_ping_on(&[v6_vip]).unwrap();
    let request = Frame::echo_request(ip("192.0.2.7"), v4_vip, 1, 1);
    assert_eq!(run(&mut harness, &request).reason, Reason::PassNotVip);
    let request = Frame::echo_request(ip("2001:db8::7"), v6_vip, 1, 1);
    assert_eq!(run(&mut harness, &request).reason, Reason::TxPingReply);
}

/// The ICMP error a router at `router` sends to `to` about `sent` (an IP packet), quoting all
/// of it or only its first 28 (IPv4) / 48 (IPv6) bytes: IP header and 8 bytes of TCP/UDP.
fn icmp_error_about(router: IpAddr, to: IpAddr, sent: &Frame, whole: bool) -> Frame {
    let packet = sent.ip_packet();
    let quoted = if whole { &packet[..] } else { &packet[..if to.is_ipv4() { 28 } else { 48 }] };
    let (icmp_type, code) = if to.is_ipv4() { (3, 4) } else { (2, 0) }; // fragmentation needed / packet too big
    let mut error = Frame::icmp_error(router, to, icmp_type, code, 1400, quoted);
    (error.src_mac, error.dst_mac) = (CLIENT_MAC, LB_MAC);
    error
}

#[test]
fn icmp_errors_about_vip_flows_reach_the_flows_backend_translated_in_nat_mode() {
    if !require_root("icmp_errors_about_vip_flows_reach_the_flows_backend_translated_in_nat_mode") {
        return;
    }
    let setups = setups();
    let mut harness = harness_with(&setups);
    let mut checked = 0;
    for setup in &setups {
        for whole in [true, false] {
            let client = client_ip(setup);
            let sport = if whole { 45100 } else { 45101 };
            let opened = client_frame(setup, client, sport);
            let (kernel, model) = harness.run(&opened.bytes()).unwrap();
            assert_eq!(kernel, model);
            assert_eq!(kernel.reason, Reason::TxForward);
            let backend_mac: [u8; 6] = kernel.packet[0..6].try_into().unwrap();
            let (snat, snat_port, backend_ip, backend_port) = flow_of(&kernel.packet);
            // The answer the client got from the VIP (from a DSR backend, or translated by us),
            // too big for a router on the way back.
            let mut answer = established(opened.clone());
            (answer.src, answer.sport, answer.dst, answer.dport) = (setup.vip.ip(), setup.vip.port(), client, sport);
            answer.payload = vec![0x5a; 600];
            let router = if client.is_ipv4() { ip("198.51.100.1") } else { ip("2001:db8:ffff::1") };
            let error = icmp_error_about(router, setup.vip.ip(), &answer, whole);

            let (kernel, model) = harness.run(&error.bytes()).unwrap();
            assert_eq!(kernel, model, "{} whole {whole}", setup.vip);
            assert_eq!((kernel.reason, kernel.action), (Reason::TxIcmpToBackend, XDP_TX), "{}", setup.vip);
            let mut expected = if setup.mode == MODE_DSR {
                // Unchanged but for the MACs: the backend holds the VIP and finds its socket.
                error.clone()
            } else {
                // As if the router had answered the backend's own packet to our SNAT address.
                let mut sent = answer.clone();
                (sent.src, sent.sport, sent.dst, sent.dport) = (backend_ip, backend_port, snat, snat_port);
                icmp_error_about(snat, backend_ip, &sent, whole)
            };
            (expected.src_mac, expected.dst_mac) = (LB_MAC, backend_mac);
            assert_eq!(kernel.packet, expected.bytes(), "{} {:?} whole {whole}", setup.vip, setup.mode);
            verify_checksums(&kernel.packet).unwrap();
            checked += 1;

            if setup.mode != MODE_NAT {
                continue;
            }
            // The other way: the backend (or a router before it) refuses our packet to it.
            let mut forwarded = opened.clone();
            (forwarded.src, forwarded.sport, forwarded.dst, forwarded.dport) =
                (snat, snat_port, backend_ip, backend_port);
            let (unreachable, code) = if client.is_ipv4() { (3, 3) } else { (1, 4) }; // port unreachable
            let packet = forwarded.ip_packet();
            let quoted = if whole { &packet[..] } else { &packet[..if client.is_ipv4() { 28 } else { 48 }] };
            let mut refusal = Frame::icmp_error(backend_ip, snat, unreachable, code, 0, quoted);
            (refusal.src_mac, refusal.dst_mac) = (backend_mac, LB_MAC);
            let (kernel, model) = harness.run(&refusal.bytes()).unwrap();
            assert_eq!(kernel, model);
            assert_eq!((kernel.reason, kernel.action), (Reason::TxIcmpToClient, XDP_TX), "{}", setup.vip);
            // The client hears it from the VIP, about its own packet.
            let packet = opened.ip_packet();
            let quoted = if whole { &packet[..] } else { &packet[..if client.is_ipv4() { 28 } else { 48 }] };
            let mut expected = Frame::icmp_error(setup.vip.ip(), client, unreachable, code, 0, quoted);
            (expected.src_mac, expected.dst_mac) = (LB_MAC, CLIENT_MAC);
            assert_eq!(kernel.packet, expected.bytes(), "{} whole {whole}: to the client", setup.vip);
            verify_checksums(&kernel.packet).unwrap();
            checked += 1;
        }
    }
    assert_eq!(checked, 24, "both families, both protocols, both modes, whole and short quotes");
}

/// Runs `frame` through both sides, which must agree; the kernel's outcome.
/// The backend's answer, with `tcp_flags`, to the NAT-forwarded frame `forwarded`.
fn backend_answer(forwarded: &[u8], tcp_flags: u8) -> Frame {
    let (snat, snat_port, backend_ip, backend_port) = flow_of(forwarded);
    let mut reply = Frame::tcp(backend_ip, backend_port, snat, snat_port);
    (reply.src_mac, reply.dst_mac) = (forwarded[0..6].try_into().unwrap(), LB_MAC);
    reply.tcp_flags = tcp_flags;
    reply
}

fn run(harness: &mut Harness, frame: &Frame) -> lb_common::model::Outcome {
    let (kernel, model) = harness.run(&frame.bytes()).unwrap();
    assert_eq!(kernel, model);
    kernel
}

/// The NAT VIP of `setup` with one backend and one source port: every flow competes for the
/// same reply tuple.
fn one_port_to_one_backend(harness: &mut Harness, setup: &Setup, forwarding: &VipForwarding) {
    let one_port = VipForwarding { snat_port_min: 20000, snat_port_max: 20000, ..*forwarding };
    harness.publish_vip(&vip_key(setup.vip, setup.proto), &one_port, &[setup.backends[0].0]).unwrap();
}

/// Runs `frame` through both sides, which must agree, and checks its reason.
fn expect(harness: &mut Harness, frame: &[u8], reason: Reason, what: &str) -> Vec<u8> {
    let (kernel, model) = harness.run(frame).unwrap();
    assert_eq!(kernel, model, "{what}: the kernel and the model differ");
    assert_eq!(kernel.reason, reason, "{what}");
    kernel.packet
}

#[test]
fn fragments_go_where_their_first_went_in_both_directions() {
    if !require_root("fragments_go_where_their_first_went_in_both_directions") {
        return;
    }
    let setups = setups();
    let mut harness = harness_with(&setups);
    let vip_addresses: Vec<IpAddr> = setups.iter().map(|s| s.vip.ip()).collect();
    harness.answer_ping_on(&vip_addresses).unwrap();
    let mut id = 0x4000u32;
    for setup in &setups {
        let what = format!("{:?} {} mode {}", setup.vip, setup.proto, setup.mode);
        let client = client_ip(setup);
        let mut request = client_frame(setup, client, 42000);
        request.payload = (0..3000u32).map(|i| i as u8).collect();
        id += 1;
        let fragments = request.fragments(id, 1232);
        assert_eq!(fragments.len(), 3);
        // A later fragment before its first: to the kernel, untouched.
        let passed = expect(&mut harness, &fragments[1], Reason::PassFragmentNoFirst, &what);
        assert_eq!(passed, fragments[1]);
        // First, middle, last: all to the backend the first was placed on.
        let mut out = vec![expect(&mut harness, &fragments[0], Reason::TxForward, &what)];
        for later in &fragments[1..] {
            out.push(expect(&mut harness, later, Reason::TxFragment, &what));
        }
        let mac: [u8; 6] = out[0][0..6].try_into().unwrap();
        assert!(out.iter().all(|frame| frame[0..6] == mac && frame[6..12] == LB_MAC), "{what}: one next hop");
        let backend = setup.backends.iter().find(|(i, _)| backend_mac(*i) == mac).expect("a backend's MAC").1;
        let datagram = reassemble(&out).unwrap();
        verify_checksums(&datagram).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (src, sport, dst, dport) = flow_of(&datagram);
        if setup.mode == MODE_DSR {
            assert_eq!((src, sport, dst, dport), (client, 42000, setup.vip.ip(), setup.vip.port()), "{what}");
            continue;
        }
        assert_eq!((src, dst, dport), (setup.snat, backend.ip(), backend.port()), "{what}");
        // The backend's fragmented answer goes back to the client, every fragment translated.
        let mut reply = request.clone();
        (reply.src, reply.sport, reply.dst, reply.dport) = (backend.ip(), backend.port(), setup.snat, sport);
        (reply.src_mac, reply.dst_mac) = (mac, LB_MAC);
        reply.tcp_flags = TCP_ACK;
        id += 1;
        let fragments = reply.fragments(id, 1232);
        let mut out = vec![expect(&mut harness, &fragments[0], Reason::TxNatReply, &what)];
        for later in &fragments[1..] {
            out.push(expect(&mut harness, later, Reason::TxFragment, &what));
        }
        assert!(out.iter().all(|frame| frame[0..6] == CLIENT_MAC), "{what}: back to the client's MAC");
        let datagram = reassemble(&out).unwrap();
        verify_checksums(&datagram).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(flow_of(&datagram), (setup.vip.ip(), setup.vip.port(), client, 42000), "{what}");
    }
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_flow_and_kept() {
    if !require_root("ipv6_extension_headers_are_walked_to_the_flow_and_kept") {
        return;
    }
    use lb_common::packet::ipv6_ext::{DEST_OPTS, HOP_BY_HOP, ROUTING};
    let setups: Vec<Setup> = setups().into_iter().filter(|s| s.vip.is_ipv6()).collect();
    let mut harness = harness_with(&setups);
    for setup in &setups {
        let what = format!("{:?} {} mode {}", setup.vip, setup.proto, setup.mode);
        let mut request = client_frame(setup, client_ip(setup), 43000);
        request.ipv6_extensions = vec![(HOP_BY_HOP, vec![]), (ROUTING, vec![0, 0, 0, 0]), (DEST_OPTS, vec![0; 12])];
        let out = expect(&mut harness, &request.bytes(), Reason::TxForward, &what);
        verify_checksums(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
        // The headers travel on unchanged; only addresses, ports and checksums may change.
        let headers = ETH_HLEN + 40..ETH_HLEN + 40 + 8 + 8 + 16;
        assert_eq!(out[headers.clone()], request.bytes()[headers], "{what}");
    }
}
