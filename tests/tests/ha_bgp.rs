//! Active/active: two `lb` nodes announce the VIP over BGP, a router spreads flows over them
//! with ECMP; when one node goes away its route is withdrawn and the connections that crossed it
//! continue through the other node to the same backend (both compute the same Maglev table), in
//! `dsr` mode and through GUE tunnels.

use lb_tests::daemon::LbDaemon;
use lb_tests::ecmp::{EcmpTopology, METRICS_PORT, NODES, PORT, ROUTER, ROUTER_AS, VIP};
use lb_tests::privilege::require_root;
use lb_tests::service::scrape_metrics;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const CONNECTIONS: usize = 40;

/// One exchange on a long-lived connection: the backend's name.
fn exchange(stream: &TcpStream) -> std::io::Result<String> {
    (&*stream).write_all(b"again\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(line.trim().to_string())
}

/// Packets the node's data plane counted for the VIP so far.
fn vip_packets(node: &LbDaemon) -> u64 {
    let stats: serde_json::Value = serde_json::from_str(&node.ok(&["--json", "stats"]).unwrap()).unwrap();
    stats["vips"][0]["traffic"]["packets"].as_u64().expect("VIP packet counter")
}

#[test]
fn connections_survive_the_loss_of_a_node() {
    if require_root("connections_survive_the_loss_of_a_node") {
        survive_the_loss_of_a_node("dsr");
    }
}

/// The same with the backends behind a tunnel: both nodes encapsulate a flow alike (same
/// backend, same outer headers), so its packets reach the backend whichever node they cross.
#[test]
fn tunnelled_connections_survive_the_loss_of_a_node() {
    if require_root("tunnelled_connections_survive_the_loss_of_a_node") {
        survive_the_loss_of_a_node("gue");
    }
}

fn survive_the_loss_of_a_node(mode: &'static str) {
    let topology = EcmpTopology::with_mode(3, mode).unwrap();
    let mut a = topology.start_node(0).unwrap();
    let b = topology.start_node(1).unwrap();
    let took = topology.wait_next_hops(&NODES, Duration::from_secs(15)).unwrap();
    println!("the router has an ECMP route over both nodes {took:?} after they started");
    let status: serde_json::Value = serde_json::from_str(&a.ok(&["--json", "status"]).unwrap()).unwrap();
    assert_eq!(status["bgp"]["session"], "Established", "{status}");
    assert_eq!(status["bgp"]["announced"], serde_json::json!([VIP.to_string()]));
    let metrics = scrape_metrics(&topology.nodes[0], METRICS_PORT).unwrap();
    let labels = format!("{{instance=\"{}\",neighbor=\"{ROUTER} (AS {ROUTER_AS})\"}}", a.instance);
    for line in [format!("lb_bgp_session_up{labels} 1"), format!("lb_bgp_announced_routes{labels} 1")] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in:\n{metrics}");
    }

    let vip = SocketAddr::new(VIP.into(), PORT);
    let streams: Vec<TcpStream> = topology
        .client
        .enter(|| {
            (0..CONNECTIONS)
                .map(|_| {
                    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).expect("connect through ECMP");
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    s
                })
                .collect()
        })
        .unwrap();
    // Which node each connection crosses: node a's VIP counter moves when it carries the exchange.
    let mut before = Vec::new();
    let mut crossed_a = Vec::new();
    for stream in &streams {
        let counted = vip_packets(&a);
        before.push(exchange(stream).expect("first exchange"));
        crossed_a.push(vip_packets(&a) > counted);
    }
    let via_a = crossed_a.iter().filter(|c| **c).count();
    assert!(via_a > 0 && via_a < CONNECTIONS, "ECMP spreads the connections over both nodes ({via_a} via a)");

    // Node a goes away: its daemon stops (BIRD closes the session, the route is withdrawn at
    // once) and its link goes down with its data plane behind it.
    a.terminate().unwrap();
    topology.nodes[0].ip(&["link", "set", "eth0", "down"]).unwrap();
    let took = topology.wait_next_hops(&NODES[1..], Duration::from_secs(5)).unwrap();
    println!("node a's route withdrawn {took:?} after its daemon stopped");

    let mut survived = 0;
    let mut survived_via_a = 0;
    for (i, stream) in streams.iter().enumerate() {
        match exchange(stream) {
            Ok(name) if name == before[i] => {
                survived += 1;
                survived_via_a += usize::from(crossed_a[i]);
            }
            Ok(name) => panic!("connection {i} moved from {} to {name}", before[i]),
            Err(e) => println!("connection {i} (via {}) lost: {e}", if crossed_a[i] { "a" } else { "b" }),
        }
    }
    println!(
        "{mode}: connections surviving the loss of node a: {survived}/{CONNECTIONS} ({survived_via_a} of the {via_a} that had crossed it)"
    );
    assert_eq!(survived, CONNECTIONS, "every connection continues on node b with the same backend");

    // A node withdraws the VIP when it has no usable backend left.
    for backend in 0..topology.backends.len() {
        let address = format!("{}:{PORT}", topology.backends[backend].1);
        b.ok(&["backend", "del", "--vip", "web", "--address", &address]).unwrap();
    }
    topology.wait_next_hops(&[], Duration::from_secs(5)).unwrap();
    println!("node b withdrew the VIP when it had no backend left");
}
