//! NAT source ports and the host's own connections: when the SNAT address is the load balancer's
//! own (its health checks leave from it), NAT flows never take a port of the kernel's local port
//! range, so no health check's answer is ever translated into a NAT flow.

use aya::maps::{HashMap, Map, MapData};
use lb_common::maps::{FlowKey, MAP_NAT_REV, NatReverse};
use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{exchange_on, tcp_vip};
use lb_tests::topology::{LB_V4, SERVICE_PORT, Topology, VIP_V4};
use std::net::TcpStream;
use std::time::Duration;

const LOCAL_PORTS: (u16, u16) = (40000, 40099);
const REQUESTS: usize = 1500;

fn config(topology: &Topology, snat_ports: Option<&str>) -> String {
    let ports = snat_ports.map(|p| format!("snat_ports = \"{p}\"\n")).unwrap_or_default();
    format!(
        "[daemon]\ninterface = \"eth0\"\ninstance = \"{{instance}}\"\nring_size = 1021\nmax_vips = 4\nmax_conns = 65536\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP_V4}:80\"\nprotocol = \"tcp\"\nmode = \"nat\"\nsnat = \"{LB_V4}\"\n{ports}\
         check = {{ kind = \"tcp\", interval = \"250ms\", timeout = \"250ms\", rise = 1, fall = 3 }}\n\n\
         [[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\n",
        topology.backends[0].v4
    )
}

#[test]
fn nat_flows_never_take_the_ports_health_checks_leave_from() {
    if !require_root("nat_flows_never_take_the_ports_health_checks_leave_from") {
        return;
    }
    let topology = Topology::new(1, false).unwrap();
    // A small local range, so that it is easy to see which ports NAT flows avoid.
    let range = format!("net.ipv4.ip_local_port_range={} {}", LOCAL_PORTS.0, LOCAL_PORTS.1);
    topology.lb.exec(&["sysctl", "-qw", &range]).unwrap();
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config(&topology, None)).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let vips: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "vip", "list"]).unwrap()).unwrap();
    assert_eq!(vips[0]["snat_ports"], "1024-39999", "the larger part outside the local range: {vips}");

    // The connections stay open until the end: the daemon's sweep takes out a closed
    // connection's entries seconds after it ended, and every one is to be looked at below.
    let open: Vec<std::io::Result<TcpStream>> =
        topology.client.enter(|| (0..REQUESTS).map(|_| request(Duration::from_secs(2))).collect()).unwrap();
    let failed: Vec<_> = open.iter().filter_map(|c| c.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} requests through the VIP failed, first: {:?}", failed.len(), failed.first());

    // Every NAT flow's source port, from the pinned table.
    let pins = lb::dataplane::PinDir::for_instance(&daemon.instance);
    let set = pins.map_sets().unwrap().pop().expect("a pinned map set");
    let map = Map::from_map_data(MapData::from_pin(set.map(MAP_NAT_REV)).unwrap()).unwrap();
    let nat: HashMap<_, FlowKey, NatReverse> = HashMap::try_from(&map).unwrap();
    let ports: Vec<u16> = nat.keys().map(|k| u16::from_be(k.unwrap().dport)).collect();
    assert!(ports.len() >= REQUESTS, "{} NAT entries for {REQUESTS} connections", ports.len());
    let inside: Vec<u16> = ports.iter().copied().filter(|p| (LOCAL_PORTS.0..=LOCAL_PORTS.1).contains(p)).collect();
    assert!(inside.is_empty(), "NAT flows took the host's local ports {inside:?}");
    assert!(ports.iter().all(|p| (1024..=39999).contains(p)));

    // The health checks, four a second from those local ports while the NAT entries stand,
    // keep the backend up: after a dozen of them it has had one transition (up) only.
    let health = || -> serde_json::Value {
        let stats: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "stats"]).unwrap()).unwrap();
        stats["health"][0].clone()
    };
    let started = std::time::Instant::now();
    while health()["checks"].as_u64().unwrap() < 12 {
        assert!(started.elapsed() < Duration::from_secs(15), "the checks stopped: {}", health());
        std::thread::sleep(Duration::from_millis(100));
    }
    let health = health();
    assert_eq!(health["transitions"], 1, "a health check failed: {health}\n{}", daemon.log());

    // An explicit range inside the local range is refused, and nothing changes.
    let file = daemon.config.parent().unwrap().join("overlap.toml");
    std::fs::write(&file, config(&topology, Some("30000-50000")).replace("{instance}", &daemon.instance)).unwrap();
    let output = daemon.cli(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an overlapping range must be refused");
    assert!(
        stderr.contains("snat_ports 30000-50000 overlaps the kernel's local port range 40000-40099")
            && stderr.contains("e.g. \"30000-39999\""),
        "{stderr}"
    );
    let after: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "vip", "list"]).unwrap()).unwrap();
    assert_eq!(after, vips, "a refused change leaves the VIP as it was");
    drop(open);
}

/// One request over a new connection to the VIP, answered; the connection stays open.
fn request(timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&tcp_vip(), timeout)?;
    exchange_on(&stream, timeout)?;
    Ok(stream)
}
