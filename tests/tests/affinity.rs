//! Client affinity through a real daemon: every connection of one client reaches one backend,
//! different clients still spread, and `affinity_prefix` keeps a client network together.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{tcp_request, tcp_request_from};
use lb_tests::topology::{CLIENT_V4, CLIENT_V6, SERVICE_PORT, SNAT_V4, Topology, VIP_V4, VIP_V6};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

const CONNECTIONS: usize = 100;
const CLIENTS: usize = 300;
/// Client addresses come in blocks of this many, one block per /24 (IPv4) or /120 (IPv6).
const BLOCK: usize = 250;
const TIMEOUT: Duration = Duration::from_secs(2);

struct Case {
    dsr: bool,
    v6: bool,
}

impl Case {
    fn vip(&self) -> SocketAddr {
        // DSR cannot change ports: the VIP's port is the service's.
        let port = if self.dsr { SERVICE_PORT } else { 80 };
        let ip: IpAddr = if self.v6 { VIP_V6.into() } else { VIP_V4.into() };
        SocketAddr::new(ip, port)
    }

    fn client(&self, i: usize) -> IpAddr {
        let (block, host) = ((i / BLOCK) as u16, (i % BLOCK) as u16);
        if self.v6 {
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1 + block, 1 + host).into()
        } else {
            Ipv4Addr::new(10, 0, 1 + block as u8, 1 + host as u8).into()
        }
    }

    fn group_prefix(&self) -> u8 {
        if self.v6 { 120 } else { 24 }
    }

    fn config(&self, topology: &Topology, prefix: Option<u8>) -> String {
        let vip = self.vip();
        let mode =
            if self.dsr { "mode = \"dsr\"".to_string() } else { format!("mode = \"nat\"\nsnat = \"{SNAT_V4}\"") };
        let prefix = prefix.map(|p| format!("affinity_prefix = {p}\n")).unwrap_or_default();
        let mut config = format!(
            "[daemon]\ninterface = \"eth0\"\ninstance = \"{{instance}}\"\nring_size = 1021\nmax_vips = 4\nmax_conns = 65536\n\n\
             [[vip]]\nname = \"sticky\"\naddress = \"{vip}\"\nprotocol = \"tcp\"\n{mode}\naffinity = \"client\"\n{prefix}"
        );
        for host in &topology.backends {
            config.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{}\"\n",
                SocketAddr::new(host.addr(self.v6), SERVICE_PORT)
            ));
        }
        config
    }
}

/// Which backend answered each of `clients`, by backend name.
fn answers(topology: &Topology, case: &Case, clients: &[IpAddr]) -> Vec<String> {
    let vip = case.vip();
    topology
        .client
        .enter(|| {
            clients
                .iter()
                .map(|&from| {
                    tcp_request_from(from, vip, TIMEOUT).unwrap_or_else(|e| {
                        eprintln!("request from {from} failed: {e}");
                        "failed".into()
                    })
                })
                .collect()
        })
        .unwrap()
}

fn count(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts
}

fn client_affinity(test: &str, case: Case) {
    if !require_root(test) {
        return;
    }
    let topology = Topology::new(3, case.dsr).unwrap();
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &case.config(&topology, None)).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let vips: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "vip", "list"]).unwrap()).unwrap();
    assert_eq!(vips[0]["affinity"], "client", "{vips}");

    // One client, many connections (each from a new source port): one backend.
    let vip = case.vip();
    let one_client: Vec<String> = topology
        .client
        .enter(|| {
            (0..CONNECTIONS).map(|_| tcp_request(vip, TIMEOUT).unwrap_or_else(|e| format!("failed: {e}"))).collect()
        })
        .unwrap();
    let counts = count(&one_client);
    assert_eq!(counts.len(), 1, "{CONNECTIONS} connections of one client went to {counts:?}");
    assert!(counts.keys().all(|name| name.starts_with("be")), "{counts:?}");

    // `lb explain` says so, and gives two ports of that client the same backend.
    let client: IpAddr = if case.v6 { CLIENT_V6.into() } else { CLIENT_V4.into() };
    let explain = |port: u16| -> serde_json::Value {
        let src = SocketAddr::new(client, port).to_string();
        let text = daemon.ok(&["--json", "explain", "--src", &src, "--dst", &vip.to_string()]).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    // Ports below the kernel's ephemeral range (32768-60999): a port the 100 connections used
    // would be explained by its connection-table entry instead.
    let (a, b) = (explain(20000), explain(30001));
    assert_eq!(a["backend"], b["backend"], "{a} {b}");
    assert!(a["detail"].as_str().unwrap().contains(&format!("of client {client} (client affinity")), "{a}");

    // Many clients: they spread, each backend 20-47 % of them.
    let batch: String = (0..CLIENTS)
        .map(|i| {
            let full = if case.v6 { 128 } else { 32 };
            let extra = if case.v6 { " nodad" } else { "" };
            format!("addr add {}/{full} dev eth0{extra}\n", case.client(i))
        })
        .collect();
    // Named after the namespace: the tests of this file run in parallel.
    let batch_file = std::env::temp_dir().join(format!("{}-addresses", topology.client.name()));
    std::fs::write(&batch_file, batch).unwrap();
    let added = topology.client.ip(&["-batch", batch_file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&batch_file);
    added.unwrap();
    let clients: Vec<IpAddr> = (0..CLIENTS).map(|i| case.client(i)).collect();
    let first = answers(&topology, &case, &clients);
    let counts = count(&first);
    eprintln!("{CLIENTS} clients of a client-affinity VIP: {counts:?}");
    assert_eq!(counts.len(), 3, "{CLIENTS} clients went to {counts:?}");
    for (name, n) in &counts {
        assert!((60..=141).contains(n), "backend {name} got {n} of {CLIENTS} clients: {counts:?}");
    }
    // And every client comes back to its backend on its next connection.
    assert_eq!(answers(&topology, &case, &clients), first, "a client changed backends between connections");

    // With a prefix, applied live, a client network goes together (new connections only).
    let file = daemon.config.parent().unwrap().join("prefix.toml");
    let config = case.config(&topology, Some(case.group_prefix())).replace("{instance}", &daemon.instance);
    std::fs::write(&file, config).unwrap();
    let applied = daemon.ok(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    assert!(applied.contains("affinity client -> client/"), "{applied}");
    let grouped = answers(&topology, &case, &clients);
    for (block, names) in grouped.chunks(BLOCK).enumerate() {
        let counts = count(names);
        assert_eq!(counts.len(), 1, "client block {block} went to {counts:?}");
    }
    let vips: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "vip", "list"]).unwrap()).unwrap();
    assert_eq!(vips[0]["affinity"], format!("client/{}", case.group_prefix()), "{vips}");
}

#[test]
fn nat_v4_client_affinity_keeps_a_client_on_one_backend() {
    client_affinity("nat_v4_client_affinity_keeps_a_client_on_one_backend", Case { dsr: false, v6: false });
}

#[test]
fn dsr_v6_client_affinity_keeps_a_client_on_one_backend() {
    client_affinity("dsr_v6_client_affinity_keeps_a_client_on_one_backend", Case { dsr: true, v6: true });
}
