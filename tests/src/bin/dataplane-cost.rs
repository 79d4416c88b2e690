//! Per-packet cost of the XDP program, measured with BPF_PROG_TEST_RUN (JIT), beside two floor
//! programs (XDP_DROP, and a MAC swap with XDP_TX).
//!
//! Every iteration must see the original packet. BPF_PROG_TEST_RUN's own `repeat` reruns the
//! program on the buffer as the previous run left it (and live-frames mode resets only the frame
//! pointers of a recycled page, not its bytes), so a NAT rewrite would send later iterations down
//! another path. Each iteration is therefore its own BPF_PROG_TEST_RUN with `repeat = 1` on a
//! fresh copy of the packet, and the figure is the kernel's own measure of the run, averaged.
//! The floors are measured the same way, so the timer's own overhead shows in them too.
//!
//! Usage: dataplane-cost [ITERATIONS] [RUNS]   (default 1,000,000 and 5);
//! LB_BENCH_ONLY=TEXT runs only the cases whose name contains TEXT.

use anyhow::{Result, ensure};

use lb::dataplane::{Dataplane, DataplaneSizes, VipForwarding};
use lb_common::maglev::{MaglevBackend, build_table};
use lb_common::maps::*;
use lb_common::packet::build::{Frame, TCP_ACK};
use lb_tests::harness::{addr16, backend, maglev_key, vip_addr_key, vip_key};
use std::net::{IpAddr, SocketAddr};

const BACKENDS: u32 = 64;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    NewFlow,
    /// The handshake's second packet of a flow never seen (its SYN left no state): where a DSR
    /// or tunnel flow is recorded.
    Recorded,
    Established,
    NatReply,
    NotVip,
    /// An echo request to the VIP's address, answered.
    Ping,
    /// "Fragmentation needed" to the VIP about an established flow's answer, to its backend.
    IcmpError,
    /// A later fragment of a datagram whose first fragment was forwarded: the fragment lookup.
    LaterFragment,
    FloorDrop,
    FloorTx,
}

struct Case {
    name: &'static str,
    mode: u8,
    v6: bool,
    proto: u8,
    kind: Kind,
}

fn vip_addr(v6: bool) -> SocketAddr {
    if v6 { "[fd00::10]:80".parse().unwrap() } else { "10.0.0.10:80".parse().unwrap() }
}

fn snat(v6: bool) -> IpAddr {
    if v6 { "fd00::2".parse().unwrap() } else { "10.0.0.2".parse().unwrap() }
}

/// A data plane with one VIP over 64 backends, sized so a million new flows fit without eviction.
fn dataplane_for(case: &Case, iterations: u32) -> Result<Dataplane> {
    let mut dataplane = Dataplane::load(DataplaneSizes {
        max_vips: 4,
        ring_size: DEFAULT_RING_SIZE,
        max_conns: (iterations + 16).next_power_of_two(),
    })?;
    // As the daemon does: the destination MAC is checked (the frames are addressed to it).
    dataplane.set_own_mac(Frame::tcp("10.0.0.1".parse()?, 1, "10.0.0.2".parse()?, 2).dst_mac)?;
    let mut members = Vec::new();
    for i in 0..BACKENDS {
        let addr: IpAddr = if case.v6 {
            format!("fd00:1::{:x}", i + 1).parse()?
        } else {
            format!("10.0.{}.{}", 1 + i / 200, 1 + i % 200).parse()?
        };
        dataplane.set_backend(i, &backend(SocketAddr::new(addr, 8080), [2, 0xbe, 0, 0, 0, i as u8]))?;
        members.push(MaglevBackend { index: i, key: maglev_key(i), weight: 1 });
    }
    let table = build_table(&members, DEFAULT_RING_SIZE)?;
    let forwarding = VipForwarding {
        vip_index: 0,
        mode: case.mode,
        snat_addr: addr16(snat(case.v6)),
        snat_port_min: 1024,
        snat_port_max: 65535,
        client_affinity: None,
        observe: false,
    };
    if is_tunnel(case.mode) {
        // Outer sources from a prefix: the entropy step runs, as it would with one configured.
        let sources =
            lb::tunnel::TunnelSources { v4: Some("172.16.0.0/16".parse()?), v6: Some("fd00:aa::/64".parse()?) };
        dataplane.set_tunnel(&sources, lb_common::tunnel::GUE_DEFAULT_PORT, 1500)?;
    }
    dataplane.publish_vip(&vip_key(vip_addr(case.v6), case.proto), &forwarding, &table)?;
    Ok(dataplane)
}

/// The client packet of flow `i`: distinct source address and port per flow.
fn client_frame(case: &Case, i: u32) -> Vec<u8> {
    client_datagram(case, i).bytes()
}

fn client_datagram(case: &Case, i: u32) -> Frame {
    let src: IpAddr = if case.v6 {
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, (i >> 16) as u16, i as u16])
    } else {
        IpAddr::from([198, 18, (i >> 8) as u8, i as u8])
    };
    let sport = 1024 + (i % 50_000) as u16;
    let vip = vip_addr(case.v6);
    let mut frame = if case.proto == PROTO_TCP {
        Frame::tcp(src, sport, vip.ip(), vip.port())
    } else {
        Frame::udp(src, sport, vip.ip(), vip.port())
    };
    if case.kind != Kind::NewFlow {
        frame.tcp_flags = TCP_ACK;
    }
    frame
}

/// Flow `i`'s first packet: a SYN for TCP.
fn opening_frame(case: &Case, i: u32) -> Vec<u8> {
    let mut frame = client_datagram(case, i);
    if case.proto == PROTO_TCP {
        frame.tcp_flags = lb_common::packet::TCP_FLAG_SYN;
    }
    frame.bytes()
}

/// Average kernel-measured nanoseconds per packet over `iterations` single runs.
fn measure(case: &Case, iterations: u32) -> Result<f64> {
    let mut dataplane = dataplane_for(case, iterations)?;
    let (program, expected_action) = match case.kind {
        Kind::FloorDrop => (FLOOR_DROP_PROGRAM_NAME, XDP_DROP),
        Kind::FloorTx => (FLOOR_TX_PROGRAM_NAME, XDP_TX),
        Kind::NotVip => (PROGRAM_NAME, XDP_PASS),
        _ => (PROGRAM_NAME, XDP_TX),
    };
    let fixed = match case.kind {
        Kind::NewFlow | Kind::Recorded => None,
        Kind::NotVip => {
            let (s, d): (IpAddr, IpAddr) = if case.v6 {
                ("2001:db8::1".parse()?, "fd00::99".parse()?)
            } else {
                ("198.18.0.1".parse()?, "10.0.0.99".parse()?)
            };
            Some(Frame::tcp(s, 1234, d, 80).bytes())
        }
        Kind::Ping => {
            let vip = vip_addr(case.v6).ip();
            dataplane.set_vip_addresses(&[(vip_addr_key(vip), VipAddr::with_flags(VIP_ADDR_ANSWER_PING))])?;
            let client: IpAddr = if case.v6 { "2001:db8::1".parse()? } else { "198.18.0.1".parse()? };
            Some(Frame::echo_request(client, vip, 1, 1).bytes())
        }
        Kind::IcmpError => {
            let frame = client_frame(case, 0);
            dataplane.run_once(&frame)?;
            Some(icmp_error_about_answer(case))
        }
        Kind::LaterFragment => {
            // A 3000-byte datagram in 1500-byte frames: its first fragment is placed once, the
            // second is replayed.
            let mut datagram = client_datagram(case, 0);
            datagram.payload = vec![0x5a; 3000];
            let fragments = datagram.fragments(7, 1448);
            dataplane.run_once(&fragments[0])?;
            Some(fragments[1].clone())
        }
        Kind::NatReply => {
            // Open the flow, then replay the backend's answer to the SNAT address.
            let (_, forwarded) = dataplane.run_once(&client_frame(case, 0))?;
            Some(reply_to(&forwarded, case.v6))
        }
        _ => {
            // The handshake's first two packets: the flow is established from here on.
            dataplane.run_once(&opening_frame(case, 0))?;
            let frame = client_frame(case, 0);
            dataplane.run_once(&frame)?;
            Some(frame)
        }
    };
    let mut total_ns: u128 = 0;
    let mut frame = fixed.clone().unwrap_or_default();
    for i in 0..iterations {
        if fixed.is_none() {
            frame = client_frame(case, i);
        }
        let (action, duration) = dataplane.run_timed(program, &frame)?;
        if action != expected_action {
            let reasons: Vec<_> = dataplane.reason_counters()?.into_iter().filter(|(_, n)| *n > 0).collect();
            anyhow::bail!(
                "{}: iteration {i} returned {action}, expected {expected_action}; reasons so far {reasons:?}; \
                 {} connections, {} NAT entries",
                case.name,
                dataplane.connections()?.len(),
                dataplane.nat_reverses()?.len()
            );
        }
        total_ns += duration.as_nanos();
    }
    // The counters prove which path every iteration took.
    if program == PROGRAM_NAME {
        let traffic = dataplane.vip_traffic(0)?;
        match case.kind {
            Kind::NewFlow => {
                ensure!(traffic.new_flows == iterations as u64, "{}: {} new flows", case.name, traffic.new_flows)
            }
            Kind::Established => ensure!(
                traffic.new_flows == 1 && traffic.packets == iterations as u64 + 2,
                "{}: {traffic:?}",
                case.name
            ),
            Kind::Recorded => {
                let recorded = dataplane.connections()?.len();
                ensure!(recorded == iterations as usize, "{}: {recorded} flows recorded", case.name)
            }
            Kind::NatReply => {
                ensure!(dataplane.reason_count(Reason::TxNatReply)? == iterations as u64, "{}: replies", case.name)
            }
            Kind::NotVip => {
                ensure!(dataplane.reason_count(Reason::PassNotVip)? == iterations as u64, "{}: passes", case.name)
            }
            Kind::Ping => {
                ensure!(dataplane.reason_count(Reason::TxPingReply)? == iterations as u64, "{}: replies", case.name)
            }
            Kind::IcmpError => {
                ensure!(dataplane.reason_count(Reason::TxIcmpToBackend)? == iterations as u64, "{}: relayed", case.name)
            }
            Kind::LaterFragment => {
                ensure!(dataplane.reason_count(Reason::TxFragment)? == iterations as u64, "{}: fragments", case.name)
            }
            _ => {}
        }
    }
    Ok(total_ns as f64 / iterations as f64)
}

/// What a router sends when the answer to flow 0 (1400 bytes from the VIP) is too big for its
/// next link: "fragmentation needed" / "packet too big" to the VIP, quoting 548 bytes of it, as
/// Linux does (576 bytes in all).
fn icmp_error_about_answer(case: &Case) -> Vec<u8> {
    let opened = client_frame(case, 0);
    let (src_at, l4) = if case.v6 { (22, 54) } else { (26, 34) };
    let ip = |at: usize| -> IpAddr {
        if case.v6 {
            <[u8; 16]>::try_from(&opened[at..at + 16]).unwrap().into()
        } else {
            <[u8; 4]>::try_from(&opened[at..at + 4]).unwrap().into()
        }
    };
    let port = |at: usize| u16::from_be_bytes([opened[at], opened[at + 1]]);
    let vip = vip_addr(case.v6);
    let mut answer = Frame::tcp(vip.ip(), vip.port(), ip(src_at), port(l4));
    answer.tcp_flags = TCP_ACK;
    answer.payload = vec![0x5a; 1400 - if case.v6 { 60 } else { 40 }];
    let quoted = answer.ip_packet();
    let (icmp_type, code) = if case.v6 { (2, 0) } else { (3, 4) };
    let router: IpAddr = if case.v6 { "2001:db8:ffff::1".parse().unwrap() } else { "198.51.100.1".parse().unwrap() };
    Frame::icmp_error(router, vip.ip(), icmp_type, code, 1280, &quoted[..548]).bytes()
}

/// The backend's answer to a NAT-forwarded frame: addresses, ports and MACs swapped.
fn reply_to(forwarded: &[u8], v6: bool) -> Vec<u8> {
    let (src_at, len, l4) = if v6 { (22, 16, 54) } else { (26, 4, 34) };
    let ip = |at: usize| -> IpAddr {
        if v6 {
            <[u8; 16]>::try_from(&forwarded[at..at + 16]).unwrap().into()
        } else {
            <[u8; 4]>::try_from(&forwarded[at..at + 4]).unwrap().into()
        }
    };
    let port = |at: usize| u16::from_be_bytes([forwarded[at], forwarded[at + 1]]);
    let mut reply = Frame::tcp(ip(src_at + len), port(l4 + 2), ip(src_at), port(l4));
    reply.tcp_flags = TCP_ACK;
    reply.src_mac = forwarded[0..6].try_into().unwrap();
    reply.dst_mac = forwarded[6..12].try_into().unwrap();
    reply.bytes()
}

/// Shows why `repeat > 1` cannot time a NAT path: the second run sees the first run's rewrite.
fn show_repeat_semantics() -> Result<()> {
    let case = Case { name: "probe", mode: MODE_NAT, v6: false, proto: PROTO_TCP, kind: Kind::NewFlow };
    let dataplane = dataplane_for(&case, 16)?;
    dataplane.run_repeated(&client_frame(&case, 0), 2)?;
    let forwarded = dataplane.reason_count(Reason::TxForward)?;
    // The rewritten frame is addressed to the backend (another MAC) and no longer to the VIP.
    let passed = dataplane.reason_count(Reason::PassOtherHost)? + dataplane.reason_count(Reason::PassNotVip)?;
    println!(
        "BPF_PROG_TEST_RUN repeat=2 on one NAT SYN: {forwarded} run(s) forwarded, {passed} run(s) saw the rewritten packet (passed: not for us any more)"
    );
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let iterations: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1_000_000);
    let runs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let cases = [
        Case { name: "floor: XDP_DROP", mode: MODE_DSR, v6: false, proto: PROTO_TCP, kind: Kind::FloorDrop },
        Case { name: "floor: MAC swap + XDP_TX", mode: MODE_DSR, v6: false, proto: PROTO_TCP, kind: Kind::FloorTx },
        Case { name: "non-VIP packet, passed", mode: MODE_DSR, v6: false, proto: PROTO_TCP, kind: Kind::NotVip },
        Case { name: "dsr  IPv4 TCP SYN, new flow", mode: MODE_DSR, v6: false, proto: PROTO_TCP, kind: Kind::NewFlow },
        Case {
            name: "dsr  IPv4 TCP, 2nd packet, recorded",
            mode: MODE_DSR,
            v6: false,
            proto: PROTO_TCP,
            kind: Kind::Recorded,
        },
        Case {
            name: "dsr  IPv4 TCP, established",
            mode: MODE_DSR,
            v6: false,
            proto: PROTO_TCP,
            kind: Kind::Established,
        },
        Case { name: "nat  IPv4 TCP SYN, new flow", mode: MODE_NAT, v6: false, proto: PROTO_TCP, kind: Kind::NewFlow },
        Case {
            name: "nat  IPv4 TCP, established",
            mode: MODE_NAT,
            v6: false,
            proto: PROTO_TCP,
            kind: Kind::Established,
        },
        Case {
            name: "nat  IPv4 TCP, reply to client",
            mode: MODE_NAT,
            v6: false,
            proto: PROTO_TCP,
            kind: Kind::NatReply,
        },
        Case { name: "nat  IPv6 TCP SYN, new flow", mode: MODE_NAT, v6: true, proto: PROTO_TCP, kind: Kind::NewFlow },
        Case { name: "IPv4 ping of a VIP, answered", mode: MODE_DSR, v6: false, proto: PROTO_TCP, kind: Kind::Ping },
        Case {
            name: "dsr  IPv4 ICMP error, to backend",
            mode: MODE_DSR,
            v6: false,
            proto: PROTO_TCP,
            kind: Kind::IcmpError,
        },
        Case {
            name: "nat  IPv4 ICMP error, translated",
            mode: MODE_NAT,
            v6: false,
            proto: PROTO_TCP,
            kind: Kind::IcmpError,
        },
        Case {
            name: "nat  IPv6 ICMP error, translated",
            mode: MODE_NAT,
            v6: true,
            proto: PROTO_TCP,
            kind: Kind::IcmpError,
        },
        Case {
            name: "dsr  IPv4 UDP, later fragment",
            mode: MODE_DSR,
            v6: false,
            proto: PROTO_UDP,
            kind: Kind::LaterFragment,
        },
        Case {
            name: "nat  IPv4 UDP, later fragment",
            mode: MODE_NAT,
            v6: false,
            proto: PROTO_UDP,
            kind: Kind::LaterFragment,
        },
        Case {
            name: "nat  IPv6 UDP, later fragment",
            mode: MODE_NAT,
            v6: true,
            proto: PROTO_UDP,
            kind: Kind::LaterFragment,
        },
        Case {
            name: "dsr  IPv4 UDP, established",
            mode: MODE_DSR,
            v6: false,
            proto: PROTO_UDP,
            kind: Kind::Established,
        },
        Case { name: "ipip IPv4 TCP SYN, new flow", mode: MODE_IPIP, v6: false, proto: PROTO_TCP, kind: Kind::NewFlow },
        Case {
            name: "ipip IPv4 TCP, established",
            mode: MODE_IPIP,
            v6: false,
            proto: PROTO_TCP,
            kind: Kind::Established,
        },
        Case { name: "gue  IPv6 TCP SYN, new flow", mode: MODE_GUE, v6: true, proto: PROTO_TCP, kind: Kind::NewFlow },
        Case {
            name: "gue  IPv6 TCP, established",
            mode: MODE_GUE,
            v6: true,
            proto: PROTO_TCP,
            kind: Kind::Established,
        },
    ];
    println!("# XDP per-packet cost (BPF_PROG_TEST_RUN, JIT, repeat=1 per run)");
    println!("{iterations} iterations per run, median of {runs} runs; load average before: {}", load_average());
    show_repeat_semantics()?;
    println!();
    println!("| case | median ns/packet | min | max | x XDP_TX floor |");
    println!("|---|---:|---:|---:|---:|");
    let only = std::env::var("LB_BENCH_ONLY").unwrap_or_default();
    let mut floor_tx = None;
    for case in cases.iter().filter(|c| c.name.contains(only.as_str())) {
        let mut samples = (0..runs).map(|_| measure(case, iterations)).collect::<Result<Vec<f64>>>()?;
        samples.sort_by(f64::total_cmp);
        let median = samples[runs / 2];
        if case.kind == Kind::FloorTx {
            floor_tx = Some(median);
        }
        let ratio = floor_tx.map_or("-".to_string(), |floor| format!("{:.1}", median / floor));
        println!("| {} | {median:.1} | {:.1} | {:.1} | {ratio} |", case.name, samples[0], samples[runs - 1]);
    }
    println!("\nload average after: {}", load_average());
    Ok(())
}
