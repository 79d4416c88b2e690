//! `lb decap` on a backend, end to end: a sender that plays the load balancer tunnels clients'
//! packets (IPIP and GUE, all four family mixes) to a backend that holds the VIP on loopback and
//! runs `lb decap`; the backend's UDP and TCP servers answer the client directly, in plain IP.
//! Without the VIP the backend, forwarding on, drops the tunnelled packets instead of relaying
//! them. The commands run as an operator runs them: `lb decap attach/status/detach`.
//!
//! ```text
//!  A (sender, client addresses on lo) a0 ── veth ── b0 B (backend, VIPs on lo, lb decap on b0)
//! ```

use lb_common::packet::build::{Encapsulation, Frame, encapsulate};
use lb_common::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
use lb_common::tunnel::GUE_DEFAULT_PORT;
use lb_tests::daemon::lb_binary;
use lb_tests::netns::{Netns, veth};
use lb_tests::packet_socket::PacketSocket;
use lb_tests::privilege::require_root;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const A4: &str = "192.0.2.1";
const A6: &str = "2001:db8::1";
const B4: &str = "192.0.2.20";
const B6: &str = "2001:db8::20";
const VIP4: &str = "10.0.0.10";
const VIP6: &str = "fd00::10";
const CLIENT4: &str = "203.0.113.7";
const CLIENT6: &str = "2001:db8:c::7";
const UDP_PORT: u16 = 5353;
const TCP_PORT: u16 = 8080;
const REPLY_WAIT: Duration = Duration::from_secs(2);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Removes what `lb decap attach` pinned for `b0` of the backend's namespace, also when the
/// test fails before `lb decap detach` (bpffs outlives namespaces).
struct DecapPinsGuard {
    dir: PathBuf,
}

impl DecapPinsGuard {
    fn new(ns: &Netns, interface: &str) -> Self {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(format!("/run/netns/{}", ns.name())).expect("namespace file").ino();
        Self { dir: PathBuf::from(format!("/sys/fs/bpf/lb-decap/netns{inode}-{interface}")) }
    }
}

impl Drop for DecapPinsGuard {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent); // only when empty
        }
    }
}

/// UDP echo servers, stopped (and joined) on drop.
struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoServers {
    /// One echo server per socket: at most 1,000 datagrams, 60 s.
    fn start(sockets: Vec<UdpSocket>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = sockets
            .into_iter()
            .map(|socket| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                    let started = Instant::now();
                    let mut buf = [0u8; 2048];
                    let mut served = 0;
                    while !stop.load(Ordering::Relaxed) && served < 1000 && started.elapsed() < Duration::from_secs(60)
                    {
                        if let Ok((n, from)) = socket.recv_from(&mut buf) {
                            let _ = socket.send_to(&buf[..n], from);
                            served += 1;
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct Backend {
    a: Netns,
    b: Netns,
    /// (a0's MAC, b0's MAC)
    macs: ([u8; 6], [u8; 6]),
}

fn topology() -> anyhow::Result<Backend> {
    let a = Netns::new("dsend")?;
    let b = Netns::new("dback")?;
    veth(&a, "a0", &b, "b0")?;
    a.addr("a0", &format!("{A4}/24"))?;
    a.addr("a0", &format!("{A6}/64"))?;
    a.addr("lo", &format!("{CLIENT4}/32"))?;
    a.addr("lo", &format!("{CLIENT6}/128"))?;
    a.ip(&["route", "add", &format!("{VIP4}/32"), "via", B4])?;
    a.ip(&["-6", "route", "add", &format!("{VIP6}/128"), "via", B6])?;
    b.addr("b0", &format!("{B4}/24"))?;
    b.addr("b0", &format!("{B6}/64"))?;
    // The README's backend recipe: the VIP on lo, never answered for on the wire, and replies
    // to clients by the routing table.
    b.addr("lo", &format!("{VIP4}/32"))?;
    b.addr("lo", &format!("{VIP6}/128"))?;
    b.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.arp_ignore=1",
        "net.ipv4.conf.all.arp_announce=2",
        "net.ipv4.conf.all.rp_filter=2",
        "net.ipv4.conf.b0.rp_filter=2",
    ])?;
    b.ip(&["route", "add", "default", "via", A4])?;
    b.ip(&["-6", "route", "add", "default", "via", A6])?;
    // Neighbours resolved both ways before the first reply needs them.
    for (from, to) in [(&a, B4), (&a, B6), (&b, A4), (&b, A6)] {
        from.exec(&["ping", "-c", "1", "-W", "2", to])?;
    }
    let macs = (a.mac("a0")?, b.mac("b0")?);
    Ok(Backend { a, b, macs })
}

fn lb(ns: &Netns, args: &[&str]) -> String {
    let binary = lb_binary();
    let mut command = vec![binary.to_str().unwrap()];
    command.extend_from_slice(args);
    String::from_utf8(ns.nsenter(&command).unwrap().stdout).unwrap()
}

/// `lb decap status --json`'s counters for b0.
fn counters(b: &Netns) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(&lb(b, &["decap", "status", "--json"])).unwrap();
    let b0 = status.as_array().unwrap().iter().find(|i| i["interface"] == "b0").expect("b0 in lb decap status");
    assert_eq!(b0["state"], "attached", "{b0}");
    b0["counters"].clone()
}

fn count(counters: &serde_json::Value, verdict: &str) -> u64 {
    counters[verdict].as_u64().unwrap_or_else(|| panic!("no counter {verdict} in {counters}"))
}

/// A client's packet (`inner`, Ethernet addressed a0 → b0) tunnelled by the sender to the backend.
fn tunnelled(backend: &Backend, inner: Frame, v6_outer: bool, gue: bool) -> Vec<u8> {
    let inner = Frame { src_mac: backend.macs.0, dst_mac: backend.macs.1, ..inner }.bytes();
    let (src, dst) = if v6_outer { (A6, B6) } else { (A4, B4) };
    encapsulate(&inner, &Encapsulation { src: ip(src), dst: ip(dst), gue: gue.then_some((0xc0de, GUE_DEFAULT_PORT)) })
}

/// Whether `frame` is a TCP SYN-ACK from `from`:TCP_PORT to `to`:`port`.
fn is_syn_ack(frame: &[u8], from: IpAddr, to: IpAddr, port: u16) -> bool {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &frame[ETH_HLEN..];
    let (proto, src, dst, tcp): (u8, IpAddr, IpAddr, &[u8]) = match ethertype {
        ETH_P_IP if ip.len() >= 40 => {
            let src: [u8; 4] = ip[12..16].try_into().unwrap();
            let dst: [u8; 4] = ip[16..20].try_into().unwrap();
            (ip[9], src.into(), dst.into(), &ip[((ip[0] & 0x0f) as usize) * 4..])
        }
        ETH_P_IPV6 if ip.len() >= 60 => {
            let src: [u8; 16] = ip[8..24].try_into().unwrap();
            let dst: [u8; 16] = ip[24..40].try_into().unwrap();
            (ip[6], src.into(), dst.into(), &ip[40..])
        }
        _ => return false,
    };
    proto == 6
        && (src, dst) == (from, to)
        && tcp.len() >= 20
        && u16::from_be_bytes([tcp[0], tcp[1]]) == TCP_PORT
        && u16::from_be_bytes([tcp[2], tcp[3]]) == port
        && tcp[13] & 0x12 == 0x12
}

/// Whether `frame` is a plain IP packet to `vip`: the backend forwarding a client's packet on.
fn is_to(frame: &[u8], vip: IpAddr) -> bool {
    let ip = &frame[ETH_HLEN.min(frame.len())..];
    match (u16::from_be_bytes([frame[12], frame[13]]), vip) {
        (ETH_P_IP, IpAddr::V4(v)) => ip.len() >= 20 && ip[16..20] == v.octets(),
        (ETH_P_IPV6, IpAddr::V6(v)) => ip.len() >= 40 && ip[24..40] == v.octets(),
        _ => false,
    }
}

#[test]
fn a_backend_answers_tunnelled_clients_directly_and_relays_nothing() {
    if !require_root("a_backend_answers_tunnelled_clients_directly_and_relays_nothing") {
        return;
    }
    let backend = topology().unwrap();
    let (a, b) = (&backend.a, &backend.b);
    let pins = DecapPinsGuard::new(b, "b0");

    let attached = lb(b, &["decap", "attach", "--interface", "b0"]);
    assert!(attached.contains("decapsulation attached, GUE on UDP port 6080"), "{attached}");
    let again = lb(b, &["decap", "attach", "--interface", "b0"]);
    assert!(again.contains("attached already"), "attach is idempotent: {again}");
    let moved = lb(b, &["decap", "attach", "--interface", "b0", "--gue-port", "7000"]);
    assert!(moved.contains("GUE on UDP port 7000 (was: GUE on UDP port 6080)"), "{moved}");
    let status: serde_json::Value = serde_json::from_str(&lb(b, &["decap", "status", "--json"])).unwrap();
    assert_eq!(status[0]["gue_port"], 7000);
    lb(b, &["decap", "attach", "--interface", "b0", "--gue-port", "6080"]);

    // Servers bound to the VIPs on the backend; the client's sockets and a watch on a0 at the sender.
    let servers = b
        .enter(|| {
            let udp = [VIP4, VIP6].map(|vip| UdpSocket::bind(SocketAddr::new(ip(vip), UDP_PORT)).unwrap());
            let tcp = [VIP4, VIP6].map(|vip| TcpListener::bind(SocketAddr::new(ip(vip), TCP_PORT)).unwrap());
            (udp, tcp)
        })
        .unwrap();
    let (udp_servers, _tcp_listeners) = servers;
    let _echo = EchoServers::start(udp_servers.into_iter().collect());
    let (wire, clients) = a
        .enter(|| {
            let clients = [CLIENT4, CLIENT6].map(|c| UdpSocket::bind(SocketAddr::new(ip(c), 40000)).unwrap());
            for client in &clients {
                client.set_read_timeout(Some(REPLY_WAIT)).unwrap();
            }
            (PacketSocket::open("a0").unwrap(), clients)
        })
        .unwrap();

    // A UDP request from the client to the VIP, tunnelled: the echo must come back from the VIP.
    // Up to `tries` times, for the neighbour resolutions a first reply waits for.
    let sent = std::cell::Cell::new(0u64);
    let ask_udp = |inner_v6: bool, v6_outer: bool, gue: bool, payload: &[u8], tries: u32| -> Option<Vec<u8>> {
        let (client, vip) = if inner_v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
        let request = Frame { payload: payload.to_vec(), ..Frame::udp(ip(client), 40000, ip(vip), UDP_PORT) };
        let socket = &clients[inner_v6 as usize];
        for _ in 0..tries {
            wire.send(&tunnelled(&backend, request.clone(), v6_outer, gue)).unwrap();
            sent.set(sent.get() + 1);
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                assert_eq!(from, SocketAddr::new(ip(vip), UDP_PORT), "the reply comes from the VIP itself");
                return Some(buf[..n].to_vec());
            }
        }
        None
    };
    let mut answered = Vec::new();
    for (inner_v6, v6_outer, gue) in [
        (false, false, false),
        (true, true, false),
        (false, true, false),
        (true, false, false),
        (false, false, true),
        (true, false, true),
        (false, true, true),
        (true, true, true),
    ] {
        let what = format!(
            "{} in {} ({})",
            if inner_v6 { "IPv6" } else { "IPv4" },
            if v6_outer { "IPv6" } else { "IPv4" },
            if gue { "GUE" } else { "IPIP" }
        );
        let payload = what.as_bytes();
        assert_eq!(ask_udp(inner_v6, v6_outer, gue, payload, 3).as_deref(), Some(payload), "UDP {what}: no echo");
        answered.push(what);
    }
    println!("UDP echoed through decapsulation: {}", answered.join(", "));

    // A TCP SYN from the client, tunnelled: the backend's own SYN-ACK comes back plain.
    for (inner_v6, v6_outer, gue, port) in
        [(false, false, false, 41000), (true, true, true, 41001), (false, true, true, 41002)]
    {
        let (client, vip) = if inner_v6 { (CLIENT6, VIP6) } else { (CLIENT4, VIP4) };
        let syn = Frame::tcp(ip(client), port, ip(vip), TCP_PORT);
        let answered = (0..3).any(|_| {
            wire.send(&tunnelled(&backend, syn.clone(), v6_outer, gue)).unwrap();
            sent.set(sent.get() + 1);
            wire.receive(REPLY_WAIT, |f| is_syn_ack(f, ip(vip), ip(client), port)).is_some()
        });
        assert!(answered, "TCP {client}:{port} -> {vip}: no SYN-ACK from the VIP");
    }
    let seen = counters(b);
    println!("after {} tunnelled packets, forwarding off: {seen}", sent.get());
    assert_eq!(count(&seen, "pass_decapsulated"), sent.get());
    for drop in ["drop_malformed", "drop_nested", "drop_not_local"] {
        assert_eq!(count(&seen, drop), 0, "{drop}");
    }

    // Forwarding on: the VIPs are still this host's (the kernel does not forward to them).
    b.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"]).unwrap();
    for (inner_v6, v6_outer, gue) in [(false, false, false), (true, true, true)] {
        assert!(ask_udp(inner_v6, v6_outer, gue, b"forwarding on", 3).is_some(), "no echo with forwarding on");
    }
    assert_eq!(count(&counters(b), "pass_decapsulated"), sent.get());

    // Without the VIPs, a forwarding backend would pass the clients' packets on to its default
    // gateway, the sender: decapsulation drops them instead.
    b.ip(&["addr", "del", &format!("{VIP4}/32"), "dev", "lo"]).unwrap();
    b.ip(&["-6", "addr", "del", &format!("{VIP6}/128"), "dev", "lo"]).unwrap();
    let before = counters(b);
    for client in &clients {
        client.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    }
    for (inner_v6, v6_outer, gue) in [(false, false, false), (true, true, true), (false, true, true)] {
        assert_eq!(ask_udp(inner_v6, v6_outer, gue, b"no VIP", 1), None, "an answer without the VIP");
    }
    let relayed = wire.receive(Duration::from_millis(500), |f| is_to(f, ip(VIP4)) || is_to(f, ip(VIP6)));
    assert!(relayed.is_none(), "the backend relayed a client's packet: {relayed:02x?}");
    let after = counters(b);
    println!("after removing the VIPs: {after}");
    assert_eq!(count(&after, "drop_not_local") - count(&before, "drop_not_local"), 3);
    assert_eq!(count(&after, "pass_decapsulated"), count(&before, "pass_decapsulated"));

    let detached = lb(b, &["decap", "detach", "--interface", "b0"]);
    assert!(detached.contains("decapsulation detached"), "{detached}");
    assert!(!pins.dir.exists(), "detach leaves {}", pins.dir.display());
    let link = String::from_utf8(b.ip(&["-d", "link", "show", "b0"]).unwrap().stdout).unwrap();
    assert!(!link.contains("prog/xdp"), "an XDP program is left on b0: {link}");
    assert_eq!(lb(b, &["decap", "status", "--json"]).trim(), "[]");
}
