//! Path MTU discovery through a VIP: a client behind a router whose far link has a smaller MTU
//! downloads a large file through the VIP, in both modes and both families. The router's
//! "fragmentation needed" / "packet too big" is addressed to the VIP; unless the load balancer
//! hands it to the backend that sent the too-big packets, the download stalls.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::netns::{Netns, veth};
use lb_tests::privilege::require_root;
use lb_tests::topology::{CLIENT_V4, CLIENT_V6, SERVICE_PORT, SNAT_V4, SNAT_V6, Topology, VIP_V4, VIP_V6};
use std::time::{Duration, Instant};

/// The far link's MTU (the IPv6 minimum), below the 1500 bytes of every other link.
const FAR_MTU: &str = "1280";
const DOWNLOAD: usize = 300_000;

fn config(topology: &Topology) -> String {
    let backend = &topology.backends[0];
    let mut config = "[daemon]\ninterface = \"eth0\"\ninstance = \"{instance}\"\nring_size = 1021\nmax_vips = 4\nmax_conns = 65536\n".to_string();
    let vips = [
        (
            "nat4",
            format!("{VIP_V4}:80"),
            format!("mode = \"nat\"\nsnat = \"{SNAT_V4}\""),
            format!("{}:{SERVICE_PORT}", backend.v4),
        ),
        ("dsr4", format!("{VIP_V4}:{SERVICE_PORT}"), "mode = \"dsr\"".into(), format!("{}:{SERVICE_PORT}", backend.v4)),
        (
            "nat6",
            format!("[{VIP_V6}]:80"),
            format!("mode = \"nat\"\nsnat = \"{SNAT_V6}\""),
            format!("[{}]:{SERVICE_PORT}", backend.v6),
        ),
        (
            "dsr6",
            format!("[{VIP_V6}]:{SERVICE_PORT}"),
            "mode = \"dsr\"".into(),
            format!("[{}]:{SERVICE_PORT}", backend.v6),
        ),
    ];
    for (name, address, mode, backend) in vips {
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nprotocol = \"tcp\"\n{mode}\n\n[[vip.backend]]\naddress = \"{backend}\"\n"
        ));
    }
    config
}

/// Turns the topology's client into a router towards a far client (10.0.9.2, fd09::2) whose own
/// interface takes 1500-byte frames while the router's end of the link sends only FAR_MTU: the
/// router answers bigger packets with "fragmentation needed" / "packet too big", as a WAN hop
/// would.
fn far_client(topology: &Topology) -> Netns {
    let router = &topology.client;
    let far = Netns::new("far").unwrap();
    veth(router, "far0", &far, "eth0").unwrap();
    router.ip(&["addr", "add", "10.0.9.1/24", "dev", "far0"]).unwrap();
    router.ip(&["-6", "addr", "add", "fd09::1/64", "dev", "far0", "nodad"]).unwrap();
    far.ip(&["addr", "add", "10.0.9.2/24", "dev", "eth0"]).unwrap();
    far.ip(&["-6", "addr", "add", "fd09::2/64", "dev", "eth0", "nodad"]).unwrap();
    far.ip(&["route", "add", "default", "via", "10.0.9.1"]).unwrap();
    far.ip(&["-6", "route", "add", "default", "via", "fd09::1"]).unwrap();
    router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]).unwrap();
    // Only the router's end is narrow: the far client still offers a 1500-byte MSS.
    router.ip(&["link", "set", "far0", "mtu", FAR_MTU]).unwrap();
    for backend in &topology.backends {
        // DSR answers go straight to the client, through the router.
        backend.ns.ip(&["route", "add", "10.0.9.0/24", "via", &CLIENT_V4.to_string()]).unwrap();
        backend.ns.ip(&["-6", "route", "add", "fd09::/64", "via", &CLIENT_V6.to_string()]).unwrap();
    }
    for target in [topology.backends[0].v4.to_string(), topology.backends[0].v6.to_string()] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while far.exec(&["ping", "-c1", "-W1", "-q", &target]).is_err() {
            assert!(Instant::now() < deadline, "{target} not reachable from the far client:\n{}", topology.diagnose());
        }
    }
    far
}

#[test]
fn a_client_behind_a_smaller_mtu_downloads_through_the_vip_in_both_modes_and_families() {
    if !require_root("a_client_behind_a_smaller_mtu_downloads_through_the_vip_in_both_modes_and_families") {
        return;
    }
    let topology = Topology::new(1, true).unwrap();
    let far = far_client(&topology);
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config(&topology)).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    for url in [
        format!("http://{VIP_V4}:80/bytes/{DOWNLOAD}"),
        format!("http://{VIP_V4}:{SERVICE_PORT}/bytes/{DOWNLOAD}"),
        format!("http://[{VIP_V6}]:80/bytes/{DOWNLOAD}"),
        format!("http://[{VIP_V6}]:{SERVICE_PORT}/bytes/{DOWNLOAD}"),
    ] {
        let relayed = daemon.reason_count("tx_icmp_to_backend").unwrap();
        let started = Instant::now();
        let output = far
            .command(&["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", "--max-time", "15", &url])
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            got,
            DOWNLOAD.to_string(),
            "{url}: {}\n{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            daemon.ok(&["stats"]).unwrap_or_default(),
            daemon.log()
        );
        let after = daemon.reason_count("tx_icmp_to_backend").unwrap();
        assert!(
            after > relayed,
            "{url}: no ICMP error reached the backend through the load balancer\n{}",
            daemon.ok(&["stats"]).unwrap_or_default()
        );
        eprintln!("{url}: {DOWNLOAD} bytes in {:?}, {} ICMP errors relayed", started.elapsed(), after - relayed);
    }
}
