//! `lb decap` on crafted frames (BPF_PROG_TEST_RUN): every tunnel the load balancer sends is
//! stripped to exactly its inner packet; malformed and foreign packets each get their verdict,
//! counted, and a passed packet is never modified.
//!
//! The program asks the kernel's routing whether a destination is this host's, so the table runs
//! inside a namespace set up as a backend: its address on `v0`, the VIPs on `lo`, a default
//! route, and IPv4/IPv6 forwarding off, then on (BPF_PROG_TEST_RUN's ingress device is the
//! namespace's loopback unless `ctx_in` names another).

use lb::dataplane::decap::DecapProgram;
use lb_common::decap::DecapVerdict::{self, *};
use lb_common::maps::{XDP_DROP, XDP_PASS};
use lb_common::packet::build::{Encapsulation, Frame, encapsulate, verify_checksums};
use lb_common::packet::{ETH_HLEN, ipv4, ipv6};
use lb_common::tunnel::GUE_DEFAULT_PORT;
use lb_tests::netns::Netns;
use lb_tests::privilege::require_root;
use std::net::IpAddr;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const LB4: &str = "192.0.2.1";
const LB6: &str = "2001:db8::1";
/// The backend's own addresses, on `v0`: the outer destination.
const BACKEND4: &str = "192.0.2.20";
const BACKEND6: &str = "2001:db8::20";
/// The VIPs, on `lo`: the inner destination.
const VIP4: &str = "10.0.0.10";
const VIP6: &str = "fd00::10";
const CLIENT4: &str = "203.0.113.7";
const CLIENT6: &str = "2001:db8:c::7";
/// Reached through the default route: what a forwarding host would forward.
const ELSEWHERE4: &str = "198.51.100.50";
const ELSEWHERE6: &str = "2001:db8:99::50";
const GUE_SPORT: u16 = 0xc123;

/// The backend: its addresses, the VIPs on loopback, default routes (and a blackhole route).
fn backend_namespace() -> anyhow::Result<Netns> {
    let ns = Netns::new("decap")?;
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
    ns.ip(&["link", "set", "v1", "up"])?;
    ns.addr("v0", &format!("{BACKEND4}/24"))?;
    ns.addr("v0", &format!("{BACKEND6}/64"))?;
    ns.addr("lo", &format!("{VIP4}/32"))?;
    ns.addr("lo", &format!("{VIP6}/128"))?;
    ns.ip(&["route", "add", "default", "via", "192.0.2.254"])?;
    ns.ip(&["-6", "route", "add", "default", "via", "2001:db8::fe"])?;
    ns.ip(&["route", "add", "blackhole", "198.18.0.0/15"])?;
    Ok(ns)
}

fn set_forwarding(ns: &Netns, on: bool) -> anyhow::Result<()> {
    let v = on as u8;
    ns.exec(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.all.forwarding={v}"),
        &format!("net.ipv6.conf.all.forwarding={v}"),
    ])?;
    Ok(())
}

fn v4_inner() -> Frame {
    Frame::tcp(ip(CLIENT4), 40000, ip(VIP4), 80)
}
fn v6_inner() -> Frame {
    Frame::tcp(ip(CLIENT6), 40000, ip(VIP6), 80)
}
fn inner_to(dst: &str) -> Frame {
    let src = if dst.contains(':') { CLIENT6 } else { CLIENT4 };
    Frame::udp(ip(src), 40000, ip(dst), 53)
}

/// `inner` tunnelled from the load balancer to `outer_dst`, by IPIP or GUE.
fn tunnel_to(inner: &[u8], outer_dst: &str, gue: bool) -> Vec<u8> {
    let src = if outer_dst.contains(':') { LB6 } else { LB4 };
    let gue = gue.then_some((GUE_SPORT, GUE_DEFAULT_PORT));
    encapsulate(inner, &Encapsulation { src: ip(src), dst: ip(outer_dst), gue })
}
/// `inner` tunnelled to this backend over IPv4 (`v6_outer` false) or IPv6.
fn tunnel(inner: &Frame, v6_outer: bool, gue: bool) -> Vec<u8> {
    tunnel_to(&inner.bytes(), if v6_outer { BACKEND6 } else { BACKEND4 }, gue)
}

fn with(mut bytes: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut bytes);
    bytes
}
fn set16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}
fn get16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Where headers sit in a tunnelled frame.
const OUTER: usize = ETH_HLEN;
const IN4: usize = ETH_HLEN + 20; // inner packet of IPIP over IPv4; GUE's UDP header over IPv4
const IN6: usize = ETH_HLEN + 40;
const GUE4: usize = IN4 + 8; // GUE header over IPv4
const GUE_IN4: usize = GUE4 + 4; // inner packet of GUE over IPv4

/// Cuts a frame tunnelled over IPv4 to `len` bytes, the outer total length following.
fn cut_v4(bytes: Vec<u8>, len: usize) -> Vec<u8> {
    with(bytes, |b| {
        b.truncate(len);
        set16(b, OUTER + ipv4::TOTAL_LEN, (len - ETH_HLEN) as u16);
    })
}

/// Four bytes of options in the outer IPv4 header (IHL 6).
fn with_outer_options(bytes: Vec<u8>) -> Vec<u8> {
    with(bytes, |b| {
        b.splice(IN4..IN4, [1, 1, 1, 1]);
        b[OUTER] = 0x46;
        let total = get16(b, OUTER + ipv4::TOTAL_LEN) + 4;
        set16(b, OUTER + ipv4::TOTAL_LEN, total);
    })
}

/// An 8-byte IPv6 extension header of `kind` between the outer IPv6 header and its payload.
fn with_outer_extension(bytes: Vec<u8>, kind: u8) -> Vec<u8> {
    with(bytes, |b| {
        let next = b[OUTER + ipv6::NEXT_HEADER];
        b.splice(IN6..IN6, [next, 0, 0, 0, 0, 0, 0, 0]);
        b[OUTER + ipv6::NEXT_HEADER] = kind;
        let payload = get16(b, OUTER + ipv6::PAYLOAD_LEN) + 8;
        set16(b, OUTER + ipv6::PAYLOAD_LEN, payload);
    })
}

/// Sets the ECN field of the IP header at `at` (IPv4: its checksum recomputed).
fn set_ecn(bytes: &mut [u8], at: usize, ecn: u8) {
    if bytes[at] >> 4 == 6 {
        bytes[at + 1] = (bytes[at + 1] & !0x30) | (ecn << 4);
        return;
    }
    bytes[at + 1] = (bytes[at + 1] & !3) | ecn;
    let hlen = ((bytes[at] & 0x0f) as usize) * 4;
    set16(bytes, at + ipv4::CHECK, 0);
    let mut sum: u32 = bytes[at..at + hlen].chunks(2).map(|w| u32::from(get16(w, 0))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    set16(bytes, at + ipv4::CHECK, !(sum as u16));
}

/// `inner` (a frame) with its ECN field set to `ecn`.
fn with_ecn(inner: &Frame, ecn: u8) -> Vec<u8> {
    with(inner.bytes(), |b| set_ecn(b, ETH_HLEN, ecn))
}

/// The ECN field's values (RFC 3168).
const NOT_ECT: u8 = 0;
const ECT0: u8 = 2;
const ECT1: u8 = 1;
const CE: u8 = 3;

/// What a row expects.
#[derive(Clone, Debug)]
enum Expect {
    /// Stripped: the output is exactly this frame (Ethernet with the same MACs and the inner
    /// packet); passed to the stack.
    Inner(Vec<u8>),
    /// Passed untouched, under this verdict.
    Untouched(DecapVerdict),
    Dropped(DecapVerdict),
}

impl Expect {
    fn verdict(&self) -> DecapVerdict {
        match self {
            Expect::Inner(_) => PassDecapsulated,
            Expect::Untouched(v) | Expect::Dropped(v) => *v,
        }
    }
}

/// Under which forwarding setting a row holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    Always,
    ForwardingOff,
    ForwardingOn,
}

fn decapsulated(inner: &Frame) -> Expect {
    Expect::Inner(inner.bytes())
}

fn table() -> Vec<(&'static str, When, Vec<u8>, Expect)> {
    use Expect::{Dropped, Untouched};
    use When::*;
    let (v4, v6) = (v4_inner(), v6_inner());
    let v4_udp = Frame::udp(ip(CLIENT4), 40000, ip(VIP4), 53);
    let v6_udp = Frame::udp(ip(CLIENT6), 40000, ip(VIP6), 53);
    let v4_options = Frame { ipv4_options: vec![1; 8], ..v4_inner() };
    let ipip_in_ipip = tunnel_to(&tunnel(&v4, false, false), BACKEND4, false);
    let gue_in_ipip = tunnel_to(&tunnel(&v4, false, true), BACKEND4, false);
    let ipip_in_gue = tunnel_to(&tunnel(&v6, true, false), BACKEND4, true);
    let gue_in_gue_v6 = tunnel_to(&tunnel(&v6, true, true), BACKEND6, true);
    vec![
        // Every tunnel the load balancer sends.
        ("4in4 (IPIP)", Always, tunnel(&v4, false, false), decapsulated(&v4)),
        ("6in6 (IPIP)", Always, tunnel(&v6, true, false), decapsulated(&v6)),
        ("4in6 (IPIP)", Always, tunnel(&v4, true, false), decapsulated(&v4)),
        ("6in4 (IPIP)", Always, tunnel(&v6, false, false), decapsulated(&v6)),
        ("GUE over IPv4, inner IPv4", Always, tunnel(&v4, false, true), decapsulated(&v4)),
        ("GUE over IPv4, inner IPv6", Always, tunnel(&v6, false, true), decapsulated(&v6)),
        ("GUE over IPv6, inner IPv4", Always, tunnel(&v4, true, true), decapsulated(&v4)),
        ("GUE over IPv6, inner IPv6", Always, tunnel(&v6, true, true), decapsulated(&v6)),
        ("GUE over IPv4, inner UDP", Always, tunnel(&v4_udp, false, true), decapsulated(&v4_udp)),
        ("4in6, inner UDP", Always, tunnel(&v6_udp, true, false), decapsulated(&v6_udp)),
        ("4in4, outer IPv4 options (IHL 6)", Always, with_outer_options(tunnel(&v4, false, false)), decapsulated(&v4)),
        ("GUE, outer IPv4 options (IHL 6)", Always, with_outer_options(tunnel(&v6, false, true)), decapsulated(&v6)),
        ("4in4, inner IPv4 options", Always, tunnel(&v4_options, false, false), decapsulated(&v4_options)),
        (
            "4in4, Ethernet padding after the outer packet (kept; the kernel trims it)",
            Always,
            with(tunnel(&v4, false, false), |b| b.extend_from_slice(&[0; 6])),
            Expect::Inner(with(v4.bytes(), |b| b.extend_from_slice(&[0; 6]))),
        ),
        // Not a tunnel.
        ("plain IPv4 TCP to the VIP", Always, v4.bytes(), Untouched(PassNotTunnel)),
        ("plain IPv6 TCP to the VIP", Always, v6.bytes(), Untouched(PassNotTunnel)),
        ("IPv4 UDP to another port", Always, v4_udp.bytes(), Untouched(PassNotTunnel)),
        ("IPv6 UDP to another port", Always, v6_udp.bytes(), Untouched(PassNotTunnel)),
        ("ARP", Always, with(v4.bytes(), |b| set16(b, 12, 0x0806)), Untouched(PassNotTunnel)),
        ("GRE (protocol 47)", Always, with(tunnel(&v4, false, false), |b| b[OUTER + 9] = 47), Untouched(PassNotTunnel)),
        ("Ethernet header alone", Always, tunnel(&v4, false, false)[..ETH_HLEN].to_vec(), Untouched(PassBadOuter)),
        // Truncated or inconsistent outer headers: the kernel's to judge.
        (
            "outer IPv4 cut at 10 bytes",
            Always,
            tunnel(&v4, false, false)[..OUTER + 10].to_vec(),
            Untouched(PassBadOuter),
        ),
        (
            "outer IPv6 cut at 30 bytes",
            Always,
            tunnel(&v6, true, false)[..OUTER + 30].to_vec(),
            Untouched(PassBadOuter),
        ),
        ("outer IPv4 IHL 4", Always, with(tunnel(&v4, false, false), |b| b[OUTER] = 0x44), Untouched(PassBadOuter)),
        ("outer IPv4 version 6", Always, with(tunnel(&v4, false, false), |b| b[OUTER] = 0x65), Untouched(PassBadOuter)),
        (
            "outer IPv4 total length beyond the frame",
            Always,
            with(tunnel(&v4, false, false), |b| set16(b, OUTER + ipv4::TOTAL_LEN, 1000)),
            Untouched(PassBadOuter),
        ),
        (
            "outer IPv6 payload length beyond the frame",
            Always,
            with(tunnel(&v4, true, false), |b| set16(b, OUTER + ipv6::PAYLOAD_LEN, 1000)),
            Untouched(PassBadOuter),
        ),
        ("outer UDP header cut at 4 bytes", Always, cut_v4(tunnel(&v4, false, true), IN4 + 4), Untouched(PassBadOuter)),
        // Truncated inner headers, and lengths that disagree.
        (
            "4in4, inner header cut at 10 bytes",
            Always,
            cut_v4(tunnel(&v4, false, false), IN4 + 10),
            Dropped(DropMalformed),
        ),
        (
            "6in6, inner header cut at 30 bytes",
            Always,
            with(tunnel(&v6, true, false), |b| {
                b.truncate(IN6 + 30);
                set16(b, OUTER + ipv6::PAYLOAD_LEN, 30);
            }),
            Dropped(DropMalformed),
        ),
        (
            "GUE header cut at 2 bytes",
            Always,
            with(cut_v4(tunnel(&v4, false, true), GUE4 + 2), |b| set16(b, IN4 + 4, 10)),
            Dropped(DropMalformed),
        ),
        (
            "GUE without inner packet",
            Always,
            with(cut_v4(tunnel(&v4, false, true), GUE_IN4), |b| set16(b, IN4 + 4, 12)),
            Dropped(DropMalformed),
        ),
        (
            "4in4, inner total length 1 below what the tunnel carries",
            Always,
            with(tunnel(&v4, false, false), |b| {
                let total = get16(b, IN4 + ipv4::TOTAL_LEN);
                set16(b, IN4 + ipv4::TOTAL_LEN, total - 1)
            }),
            Dropped(DropMalformed),
        ),
        (
            "4in4, inner total length beyond the outer packet",
            Always,
            with(tunnel(&v4, false, false), |b| {
                let total = get16(b, IN4 + ipv4::TOTAL_LEN);
                set16(b, IN4 + ipv4::TOTAL_LEN, total + 1);
                b.push(0); // inside the frame, beyond the outer packet
            }),
            Dropped(DropMalformed),
        ),
        (
            "6in6, inner payload length 8 above what the tunnel carries",
            Always,
            with(tunnel(&v6, true, false), |b| {
                let payload = get16(b, IN6 + ipv6::PAYLOAD_LEN);
                set16(b, IN6 + ipv6::PAYLOAD_LEN, payload + 8)
            }),
            Dropped(DropMalformed),
        ),
        (
            "GUE, UDP length 1 short",
            Always,
            with(tunnel(&v4, false, true), |b| {
                let len = get16(b, IN4 + 4);
                set16(b, IN4 + 4, len - 1)
            }),
            Dropped(DropMalformed),
        ),
        // The family the tunnel announces must be the inner packet's.
        (
            "protocol 4 (IPv4) carrying IPv6",
            Always,
            with(tunnel(&v6, false, false), |b| b[OUTER + 9] = 4),
            Dropped(DropMalformed),
        ),
        (
            "protocol 41 (IPv6) carrying IPv4",
            Always,
            with(tunnel(&v4, true, false), |b| b[OUTER + 6] = 41),
            Dropped(DropMalformed),
        ),
        (
            "GUE names IPv6, carries IPv4",
            Always,
            with(tunnel(&v4, false, true), |b| b[GUE4 + 1] = 41),
            Dropped(DropMalformed),
        ),
        ("4in4, inner IPv4 IHL 4", Always, with(tunnel(&v4, false, false), |b| b[IN4] = 0x44), Dropped(DropMalformed)),
        // GUE headers this product does not send.
        ("GUE version 1", Always, with(tunnel(&v4, false, true), |b| b[GUE4] = 0x40), Dropped(DropMalformed)),
        (
            "GUE control message (C bit)",
            Always,
            with(tunnel(&v4, false, true), |b| b[GUE4] = 0x20),
            Dropped(DropMalformed),
        ),
        (
            "GUE with optional fields (hlen 1)",
            Always,
            with(tunnel(&v4, false, true), |b| b[GUE4] = 0x01),
            Dropped(DropMalformed),
        ),
        (
            "GUE inner protocol 47 (GRE)",
            Always,
            with(tunnel(&v4, false, true), |b| b[GUE4 + 1] = 47),
            Dropped(DropMalformed),
        ),
        // Tunnels in tunnels.
        ("IPIP in IPIP", Always, ipip_in_ipip, Dropped(DropNested)),
        ("GUE in IPIP", Always, gue_in_ipip, Dropped(DropNested)),
        ("IPIP (6in6) in GUE", Always, ipip_in_gue, Dropped(DropNested)),
        ("GUE in GUE over IPv6", Always, gue_in_gue_v6, Dropped(DropNested)),
        (
            "IPIP in a later fragment of the inner packet",
            Always,
            with(tunnel_to(&tunnel(&v4, false, false), BACKEND4, false), |b| set16(b, IN4 + ipv4::FRAG, 0x0010)),
            Dropped(DropNested),
        ),
        // Fragments: for the kernel to reassemble.
        (
            "4in4, outer first fragment (MF)",
            Always,
            with(tunnel(&v4, false, false), |b| set16(b, OUTER + ipv4::FRAG, 0x2000)),
            Untouched(PassOuterFragment),
        ),
        (
            "4in4, outer later fragment (offset)",
            Always,
            with(tunnel(&v4, false, false), |b| set16(b, OUTER + ipv4::FRAG, 0x0010)),
            Untouched(PassOuterFragment),
        ),
        (
            "GUE, outer first fragment (MF)",
            Always,
            with(tunnel(&v4, false, true), |b| set16(b, OUTER + ipv4::FRAG, 0x2000)),
            Untouched(PassOuterFragment),
        ),
        (
            "UDP later fragment (no port to read)",
            Always,
            with(tunnel(&v4, false, true), |b| set16(b, OUTER + ipv4::FRAG, 0x0010)),
            Untouched(PassNotTunnel),
        ),
        (
            "outer IPv6 with a destination options header",
            Always,
            with_outer_extension(tunnel(&v4, true, false), 60),
            Untouched(PassOuterExtHeader),
        ),
        (
            "outer IPv6 with a fragment header",
            Always,
            with_outer_extension(tunnel(&v6, true, true), 44),
            Untouched(PassOuterExtHeader),
        ),
        // Whose destinations.
        // ECN (RFC 6040): a congestion mark on the outer header reaches the inner packet.
        (
            "4in4, outer CE over inner ECT(0): the inner packet is marked CE",
            Always,
            with(tunnel_to(&with_ecn(&v4, ECT0), BACKEND4, false), |b| set_ecn(b, OUTER, CE)),
            Expect::Inner(with_ecn(&v4, CE)),
        ),
        (
            "GUE over IPv6, outer CE over inner IPv6 ECT(1): marked CE",
            Always,
            with(tunnel_to(&with_ecn(&v6, ECT1), BACKEND6, true), |b| set_ecn(b, OUTER, CE)),
            Expect::Inner(with_ecn(&v6, CE)),
        ),
        (
            "4in6, outer ECT(0) over inner ECT(0): unchanged",
            Always,
            with(tunnel_to(&with_ecn(&v4, ECT0), BACKEND6, false), |b| set_ecn(b, OUTER, ECT0)),
            Expect::Inner(with_ecn(&v4, ECT0)),
        ),
        (
            "6in4, outer CE over inner CE: unchanged",
            Always,
            with(tunnel_to(&with_ecn(&v6, CE), BACKEND4, false), |b| set_ecn(b, OUTER, CE)),
            Expect::Inner(with_ecn(&v6, CE)),
        ),
        (
            "4in4, outer CE over an inner packet that is not ECN-capable",
            Always,
            with(tunnel_to(&with_ecn(&v4, NOT_ECT), BACKEND4, false), |b| set_ecn(b, OUTER, CE)),
            Dropped(DropCongestionNotEct),
        ),
        ("inner destination multicast", Always, tunnel(&inner_to("239.1.2.3"), false, false), Dropped(DropNotLocal)),
        ("inner destination IPv6 multicast", Always, tunnel(&inner_to("ff05::1:3"), true, true), Dropped(DropNotLocal)),
        (
            "inner destination not local, forwarding on",
            ForwardingOn,
            tunnel(&inner_to(ELSEWHERE4), false, false),
            Dropped(DropNotLocal),
        ),
        (
            "inner IPv6 destination not local, forwarding on",
            ForwardingOn,
            tunnel(&inner_to(ELSEWHERE6), true, true),
            Dropped(DropNotLocal),
        ),
        (
            "inner destination on a blackhole route, forwarding on",
            ForwardingOn,
            tunnel(&inner_to("198.18.0.1"), false, true),
            Dropped(DropNotLocal),
        ),
        // Forwarding off: the kernel forwards nothing, so nothing can be relayed; it drops what is not its own.
        (
            "inner destination not local, forwarding off",
            ForwardingOff,
            tunnel(&inner_to(ELSEWHERE4), false, false),
            decapsulated(&inner_to(ELSEWHERE4)),
        ),
        (
            "inner IPv6 destination not local, forwarding off",
            ForwardingOff,
            tunnel(&inner_to(ELSEWHERE6), true, true),
            decapsulated(&inner_to(ELSEWHERE6)),
        ),
        (
            "outer destination not this host's, forwarding on",
            ForwardingOn,
            tunnel_to(&v4.bytes(), ELSEWHERE4, false),
            Untouched(PassTransit),
        ),
        (
            "outer IPv6 destination not this host's, forwarding on",
            ForwardingOn,
            tunnel_to(&v4.bytes(), ELSEWHERE6, true),
            Untouched(PassTransit),
        ),
        (
            "outer destination not this host's, forwarding off",
            ForwardingOff,
            tunnel_to(&v4.bytes(), ELSEWHERE4, false),
            decapsulated(&v4),
        ),
    ]
}

/// Runs the rows that hold under `forwarding` and returns what went wrong, row by row.
fn run_table(program: &DecapProgram, forwarding: bool, ingress: Option<u32>) -> Vec<String> {
    let mut failures = Vec::new();
    let setting = if forwarding { When::ForwardingOn } else { When::ForwardingOff };
    for (name, when, frame, expect) in table() {
        if when != When::Always && when != setting {
            continue;
        }
        let before = program.counters().unwrap();
        let (action, out) = program.run(&frame, ingress).unwrap();
        let after = program.counters().unwrap();
        let moved: Vec<(DecapVerdict, u64)> =
            before.iter().zip(&after).filter(|(b, a)| a.1 != b.1).map(|(b, a)| (a.0, a.1 - b.1)).collect();
        let want = expect.verdict();
        let mut wrong = Vec::new();
        if moved != [(want, 1)] {
            wrong.push(format!("counters moved {moved:?}, expected {} by 1", want.name()));
        }
        let want_action = want.xdp_action();
        if action != want_action {
            wrong.push(format!("action {action}, expected {want_action}"));
        }
        match &expect {
            Expect::Inner(inner) => {
                if &out != inner {
                    wrong.push(format!("output\n      {out:02x?}\n    expected\n      {inner:02x?}"));
                } else if let Err(e) = verify_checksums(&out) {
                    wrong.push(format!("output checksums: {e}"));
                }
            }
            Expect::Untouched(_) if out != frame => wrong.push("a passed packet was modified".into()),
            Expect::Dropped(_) => assert_eq!(action, XDP_DROP),
            Expect::Untouched(_) => assert_eq!(action, XDP_PASS),
        }
        let place = if forwarding { "forwarding on" } else { "forwarding off" };
        let verdict = format!("{:<22}", want.name());
        if wrong.is_empty() {
            println!("ok    {place:<14} {verdict} {name}");
        } else {
            println!("FAIL  {place:<14} {verdict} {name}");
            failures.push(format!("{name} ({place}): {}", wrong.join("; ")));
        }
    }
    failures
}

#[test]
fn every_tunnel_is_stripped_and_every_foreign_or_malformed_packet_gets_its_verdict() {
    if !require_root("every_tunnel_is_stripped_and_every_foreign_or_malformed_packet_gets_its_verdict") {
        return;
    }
    let ns = backend_namespace().unwrap();
    let mut failures = Vec::new();
    for forwarding in [false, true] {
        set_forwarding(&ns, forwarding).unwrap();
        let found = ns
            .enter(|| {
                let program = DecapProgram::load(GUE_DEFAULT_PORT).unwrap();
                run_table(&program, forwarding, None)
            })
            .unwrap();
        failures.extend(found);
    }
    assert!(failures.is_empty(), "{} rows failed:\n  {}", failures.len(), failures.join("\n  "));
}

/// With GUE off (port 0) UDP is never a tunnel, and IPIP is still stripped; a GUE port of the
/// operator's own choosing is the one that counts.
#[test]
fn the_gue_port_decides_which_udp_is_a_tunnel() {
    if !require_root("the_gue_port_decides_which_udp_is_a_tunnel") {
        return;
    }
    let ns = backend_namespace().unwrap();
    ns.enter(|| {
        let mut program = DecapProgram::load(0).unwrap();
        let gue = tunnel(&v4_inner(), false, true);
        let (action, out) = program.run(&gue, None).unwrap();
        assert_eq!((action, &out), (XDP_PASS, &gue), "GUE off: UDP to 6080 passes untouched");
        let ipip = tunnel(&v6_inner(), true, false);
        assert_eq!(program.run(&ipip, None).unwrap(), (XDP_PASS, v6_inner().bytes()));
        program.set_gue_port(7777).unwrap();
        let gue_7777 = with(gue.clone(), |b| set16(b, IN4 + 2, 7777));
        assert_eq!(program.run(&gue_7777, None).unwrap(), (XDP_PASS, v4_inner().bytes()));
        assert_eq!(program.run(&gue, None).unwrap(), (XDP_PASS, gue.clone()), "6080 is no longer GUE");
        let counts: Vec<(&str, u64)> =
            program.counters().unwrap().into_iter().filter(|(_, n)| *n > 0).map(|(v, n)| (v.name(), n)).collect();
        assert_eq!(counts, [("pass_not_tunnel", 2), ("pass_decapsulated", 2)]);
    })
    .unwrap();
}

/// The same judgement when the frame arrives on the backend's NIC rather than on loopback (the
/// route lookups then ask about that interface's forwarding setting).
#[test]
fn the_ingress_interface_is_the_one_asked() {
    if !require_root("the_ingress_interface_is_the_one_asked") {
        return;
    }
    let ns = backend_namespace().unwrap();
    let ifindex: u32 = String::from_utf8(ns.exec(&["cat", "/sys/class/net/v0/ifindex"]).unwrap().stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut failures = Vec::new();
    for forwarding in [false, true] {
        set_forwarding(&ns, forwarding).unwrap();
        failures.extend(
            ns.enter(|| run_table(&DecapProgram::load(GUE_DEFAULT_PORT).unwrap(), forwarding, Some(ifindex))).unwrap(),
        );
    }
    // Forwarding on everywhere but off on v0 alone (IPv4 forwards per ingress interface).
    set_forwarding(&ns, true).unwrap();
    ns.exec(&["sysctl", "-qw", "net.ipv4.conf.v0.forwarding=0"]).unwrap();
    ns.enter(|| {
        let program = DecapProgram::load(GUE_DEFAULT_PORT).unwrap();
        let elsewhere = tunnel(&inner_to(ELSEWHERE4), false, false);
        assert_eq!(program.run(&elsewhere, Some(ifindex)).unwrap(), (XDP_PASS, inner_to(ELSEWHERE4).bytes()));
        assert_eq!(program.run(&elsewhere, None).unwrap().0, XDP_DROP, "loopback still forwards");
    })
    .unwrap();
    assert!(failures.is_empty(), "{} rows failed:\n  {}", failures.len(), failures.join("\n  "));
}

#[test]
fn the_verifier_accepts_the_decapsulation_program_cheaply() {
    if !require_root("the_verifier_accepts_the_decapsulation_program_cheaply") {
        return;
    }
    let program = DecapProgram::load(GUE_DEFAULT_PORT).unwrap();
    let processed = program.verified_instructions().unwrap().expect("the kernel reports verified instructions");
    println!("the verifier processed {processed} instructions for lb_decap");
    assert!(processed < 50_000, "{processed} instructions: the decapsulation program grew a state explosion");
}
