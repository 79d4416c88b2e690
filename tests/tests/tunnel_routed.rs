//! The tunnel modes end to end across a router (`lb_tests::routed`): the load balancer and its
//! backends share no network, so only a tunnel reaches them. A real `lb daemon` on the load
//! balancer; `lb decap` on every backend; a plain TCP client.
//!
//! For `ipip` and `gue`, IPv4 and IPv6 VIPs (and an IPv6 VIP over IPv4 backends, 6in4): 300
//! connections spread over the three backends, each backend sees the client's own address, and
//! the backends' answers reach the client through the router without crossing the load
//! balancer (counted on the router), and a request of full-size segments arrives once the
//! client's path MTU discovery learned the tunnel's size from the load balancer. A long-lived
//! connection keeps its backend when a backend is added.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::routed::{CLIENT_V4, CLIENT_V6, RoutedLab, SERVICE_PORT, vip};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

const CONNECTIONS: usize = 300;
const TIMEOUT: Duration = Duration::from_secs(3);

struct TunnelVip {
    name: &'static str,
    mode: &'static str,
    addr: SocketAddr,
    /// The backends' family (the outer headers'), when it differs from the VIP's.
    v6_backends: bool,
}

fn vips() -> Vec<TunnelVip> {
    let at = |v6: bool, n: u16| SocketAddr::new(vip(v6, n), SERVICE_PORT);
    vec![
        TunnelVip { name: "ipip4", mode: "ipip", addr: at(false, 1), v6_backends: false },
        TunnelVip { name: "ipip6", mode: "ipip", addr: at(true, 1), v6_backends: true },
        TunnelVip { name: "gue4", mode: "gue", addr: at(false, 2), v6_backends: false },
        TunnelVip { name: "gue6", mode: "gue", addr: at(true, 2), v6_backends: true },
        TunnelVip { name: "gue6in4", mode: "gue", addr: at(true, 3), v6_backends: false },
    ]
}

fn config(lab: &RoutedLab, vips: &[TunnelVip], backends: usize) -> String {
    let mut config = "[daemon]\ninterface = \"eth0\"\ninstance = \"{instance}\"\nring_size = 1021\nmax_vips = 8\nmax_conns = 65536\n".to_string();
    for vip in vips {
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{}\"\naddress = \"{}\"\nprotocol = \"tcp\"\nmode = \"{}\"\n",
            vip.name, vip.addr, vip.mode
        ));
        for backend in lab.backends.iter().take(backends) {
            let addr = SocketAddr::new(backend.addr(vip.v6_backends), SERVICE_PORT);
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"{addr}\"\n"));
        }
    }
    config
}

/// One connection: `peer` asked, the answering backend's name and the address it saw back.
fn ask(stream: &mut TcpStream) -> std::io::Result<(String, IpAddr)> {
    stream.write_all(b"peer\n")?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let (name, peer) = line.trim().split_once(' ').ok_or_else(|| std::io::Error::other(format!("answer {line:?}")))?;
    let peer: SocketAddr = peer.parse().map_err(|e| std::io::Error::other(format!("peer {peer:?}: {e}")))?;
    // The server listens on both families: an IPv4 peer shows as IPv4-mapped IPv6.
    Ok((name.to_string(), peer.ip().to_canonical()))
}

fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

fn client_addr(v6: bool) -> IpAddr {
    if v6 { CLIENT_V6.into() } else { CLIENT_V4.into() }
}

#[test]
fn tunnelled_connections_spread_and_backends_answer_the_client_directly() {
    if !require_root("tunnelled_connections_spread_and_backends_answer_the_client_directly") {
        return;
    }
    let vips = vips();
    let addresses: Vec<IpAddr> = vips.iter().map(|v| v.addr.ip()).collect();
    let lab = RoutedLab::new(&addresses).unwrap();
    let daemon = LbDaemon::start(&lab.lb, &unique_instance(), &config(&lab, &vips, 3)).unwrap();
    // With no tunnel_source configured, the outer sources are the interface's own addresses.
    let status: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "status"]).unwrap()).unwrap();
    let tunnel = &status["tunnel"];
    assert_eq!(
        (tunnel["source_v4"].as_str(), tunnel["source_v6"].as_str()),
        (Some("10.10.0.2/32"), Some("fd10::2/128"))
    );
    assert_eq!((tunnel["gue_port"].as_u64(), tunnel["mtu"].as_u64()), (Some(6080), Some(1500)), "{status}");
    for vip in &vips {
        let (via_lb_before, direct_before) = lab.answers().unwrap();
        let forwarded_before = daemon.reason_count("tx_forward").unwrap();
        let client = client_addr(vip.addr.is_ipv6());
        let outcome = lab
            .client
            .enter(|| {
                let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
                let mut failures = Vec::new();
                for i in 0..CONNECTIONS {
                    match connect(vip.addr).and_then(|mut s| ask(&mut s)) {
                        Ok((name, seen)) if seen == client => *per_backend.entry(name).or_default() += 1,
                        Ok((name, seen)) => failures.push(format!("#{i}: {name} saw {seen}, not {client}")),
                        Err(e) => failures.push(format!("#{i}: {e}")),
                    }
                }
                (per_backend, failures)
            })
            .unwrap();
        let (per_backend, failures) = outcome;
        let what = format!("{} ({} {})", vip.name, vip.mode, vip.addr);
        assert!(
            failures.is_empty(),
            "{what}: {} of {CONNECTIONS} connections failed, first: {:?}\n{}\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            lab.diagnose(),
            daemon.log()
        );
        assert_eq!(per_backend.len(), 3, "{what}: every backend answers: {per_backend:?}");
        for (name, count) in &per_backend {
            let share = *count as f64 / CONNECTIONS as f64;
            assert!((0.20..=0.47).contains(&share), "{what}: {name} got {count} of {CONNECTIONS}: {per_backend:?}");
        }
        let (via_lb, direct) = lab.answers().unwrap();
        let forwarded = daemon.reason_count("tx_forward").unwrap() - forwarded_before;
        eprintln!(
            "{what}: {per_backend:?}; answers through the router: {} straight from backends, {} via the load balancer; load balancer forwarded {forwarded}",
            direct - direct_before,
            via_lb - via_lb_before
        );
        assert_eq!(via_lb, via_lb_before, "{what}: no answer may cross the load balancer");
        // Full-size segments do not fit the tunnel on these 1500-byte links: the client learns
        // that from the load balancer's "too big" answers, and a large request still arrives.
        let too_big_before = daemon.reason_count("tx_icmp_too_big").unwrap();
        let answered = lab
            .client
            .enter(|| -> std::io::Result<String> {
                let mut stream = connect(vip.addr)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut line = vec![b'x'; 200_000];
                line.push(b'\n');
                stream.write_all(&line)?;
                let mut answer = String::new();
                BufReader::new(stream).read_line(&mut answer)?;
                Ok(answer)
            })
            .unwrap();
        let too_big = daemon.reason_count("tx_icmp_too_big").unwrap() - too_big_before;
        assert!(answered.is_ok_and(|a| a.starts_with("be")), "{what}: a 200 kB request through the tunnel");
        assert!(too_big > 0, "{what}: full-size segments must have been answered \"too big\"");
        eprintln!("{what}: a 200 kB request arrived after {too_big} \"too big\" answers");
        // At least a SYN-ACK and the answer line per connection.
        assert!(direct - direct_before >= 2 * CONNECTIONS as u64, "{what}: too few direct answers");
        assert!(forwarded >= 3 * CONNECTIONS as u64, "{what}: SYN, data and ACKs go through the tunnel");
    }
}

#[test]
fn a_long_lived_tunnelled_connection_survives_a_backend_joining() {
    if !require_root("a_long_lived_tunnelled_connection_survives_a_backend_joining") {
        return;
    }
    let vips: Vec<TunnelVip> = vips().into_iter().filter(|v| v.name == "ipip4" || v.name == "gue6").collect();
    let addresses: Vec<IpAddr> = vips.iter().map(|v| v.addr.ip()).collect();
    let lab = RoutedLab::new(&addresses).unwrap();
    // Two backends first; the third joins while the connections are open.
    let daemon = LbDaemon::start(&lab.lb, &unique_instance(), &config(&lab, &vips, 2)).unwrap();
    lab.client
        .enter(|| {
            // Enough connections that some would be placed on the new backend if re-placed.
            let mut streams: Vec<(usize, TcpStream, String)> = Vec::new();
            for (v, vip) in vips.iter().enumerate() {
                for _ in 0..40 {
                    let mut stream = connect(vip.addr).unwrap();
                    let (name, _) = ask(&mut stream).unwrap();
                    streams.push((v, stream, name));
                }
            }
            for vip in &vips {
                let third = SocketAddr::new(lab.backends[2].addr(vip.v6_backends), SERVICE_PORT);
                daemon.ok(&["backend", "add", "--vip", vip.name, "--address", &third.to_string()]).unwrap();
            }
            for (v, stream, name) in &mut streams {
                let (again, _) = ask(stream).unwrap_or_else(|e| panic!("{}: connection broken: {e}", vips[*v].name));
                assert_eq!(&again, name, "{}: a connection changed backend", vips[*v].name);
            }
            // New connections do reach the new backend.
            let mut reached_third = 0;
            for vip in &vips {
                for _ in 0..60 {
                    let (name, _) = ask(&mut connect(vip.addr).unwrap()).unwrap();
                    reached_third += (name == lab.backends[2].name) as usize;
                }
            }
            eprintln!(
                "{} connections kept their backend; {reached_third} of 120 new ones reached the new backend",
                streams.len()
            );
            assert!(reached_third > 0, "new connections never reached the added backend");
        })
        .unwrap();
}

/// The `lb backend list` row of `backend` in VIP `vip`.
fn backend_row(daemon: &LbDaemon, vip: &str, backend: &str) -> serde_json::Value {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&daemon.ok(&["--json", "backend", "list"]).unwrap()).unwrap();
    rows.into_iter()
        .find(|r| r["vip"] == vip && r["address"] == backend)
        .unwrap_or_else(|| panic!("no {vip} {backend}"))
}

/// Waits until every `(vip, backend)` is in `state`; returns how long it took.
fn wait_states(daemon: &LbDaemon, rows: &[(&str, String)], state: &str, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    loop {
        let pending: Vec<serde_json::Value> = rows
            .iter()
            .map(|(vip, backend)| backend_row(daemon, vip, backend))
            .filter(|row| row["state"] != state)
            .collect();
        if pending.is_empty() {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not {state} after {limit:?}: {pending:?}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_check_via_the_vip_takes_out_a_backend_that_lost_the_vip_while_a_plain_check_passes() {
    if !require_root("a_check_via_the_vip_takes_out_a_backend_that_lost_the_vip_while_a_plain_check_passes") {
        return;
    }
    // One VIP per check kind, all three via the VIP; a fourth VIP checks the same backends'
    // own addresses.
    let timing = "interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2";
    let checks = [
        ("tcp4", "ipip", vip(false, 1), format!("{{ kind = \"tcp\", via_vip = true, {timing} }}")),
        ("icmp4", "gue", vip(false, 2), format!("{{ kind = \"icmp\", via_vip = true, {timing} }}")),
        ("http6", "gue", vip(true, 1), format!("{{ kind = \"http\", via_vip = true, {timing} }}")),
        ("plain4", "ipip", vip(false, 3), format!("{{ kind = \"tcp\", {timing} }}")),
    ];
    let addresses: Vec<IpAddr> = checks.iter().map(|c| c.2).collect();
    let lab = RoutedLab::new(&addresses).unwrap();
    // The load balancer holds the VIPs itself, as a VRRP master does: the backends' answers to
    // its checks then come from one of its own addresses (accepted with accept_local).
    for addr in &addresses {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        lab.lb.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "lo"]).unwrap();
    }
    let mut config = "[daemon]\ninterface = \"eth0\"\ninstance = \"{instance}\"\nring_size = 1021\nmax_vips = 8\nmax_conns = 65536\n".to_string();
    for (name, mode, addr, check) in &checks {
        let addr = SocketAddr::new(*addr, SERVICE_PORT);
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{addr}\"\nprotocol = \"tcp\"\nmode = \"{mode}\"\ncheck = {check}\n"
        ));
        for backend in &lab.backends {
            let backend = SocketAddr::new(backend.addr(addr.is_ipv6()), SERVICE_PORT);
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"{backend}\"\n"));
        }
    }
    let daemon = LbDaemon::start(&lab.lb, &unique_instance(), &config).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let be1 = |v6: bool| SocketAddr::new(lab.backends[0].addr(v6), SERVICE_PORT).to_string();
    let via_rows: Vec<(&str, String)> = checks[..3].iter().map(|c| (c.0, be1(c.2.is_ipv6()))).collect();
    for (name, backend) in &via_rows {
        let row = backend_row(&daemon, name, backend);
        assert_eq!(row["health"], "up", "{name}: {row}");
    }

    // be1 loses the VIPs checked via the VIP; its service and its own address stay.
    for (_, _, addr, _) in &checks[..3] {
        lab.backends[0].hold_vip(*addr, false).unwrap();
    }
    let took = wait_states(&daemon, &via_rows, "down", Duration::from_secs(5));
    for (name, backend) in &via_rows {
        let row = backend_row(&daemon, name, backend);
        let reason = row["last_check"].as_str().unwrap_or_default();
        assert!(reason.contains("via VIP"), "{name}: the reason must say the VIP does not answer: {row}");
        eprintln!("{name}: be1 down after {took:?}: {reason}");
    }
    let plain = backend_row(&daemon, "plain4", &be1(false));
    assert_eq!(plain["state"], "serving", "the plain check to the backend's own address still passes: {plain}");
    // Clients of the checked VIPs no longer reach be1.
    let tcp4 = SocketAddr::new(checks[0].2, SERVICE_PORT);
    let names: Vec<String> =
        lab.client.enter(|| (0..30).map(|_| ask(&mut connect(tcp4).unwrap()).unwrap().0).collect()).unwrap();
    assert!(!names.contains(&lab.backends[0].name), "tcp4 still sends clients to be1: {names:?}");

    // The VIPs come back: so does be1.
    for (_, _, addr, _) in &checks[..3] {
        lab.backends[0].hold_vip(*addr, true).unwrap();
    }
    wait_states(&daemon, &via_rows, "serving", Duration::from_secs(5));
}
