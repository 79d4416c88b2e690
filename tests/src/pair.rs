//! An active/standby pair on the standard test network: node a is the standard load balancer
//! namespace (10.0.0.2), node b a second one (10.0.0.4); the client reaches the VIP on-link, so
//! it follows whichever node answers ARP for it. The SNAT address is the pair's, not node a's.

use crate::daemon::{LbDaemon, unique_instance};
use crate::netns::Netns;
use crate::topology::{LB_V4, SERVICE_PORT, SNAT_V4, SNAT_V6, Topology, VIP_V4, VIP_V6};
use anyhow::Result;
use lb::dataplane::PassThrough;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const NODE_B_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
pub const NODE_B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 4);
pub const KEEPALIVED_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
pub const VRID: u8 = 51;
/// Sub-second takeover (3 x 100 ms + skew, ~0.36 s for the backup's priority 100).
pub const ADVERT_INTERVAL_MS: u64 = 100;
pub const REPLICATION_PORT: u16 = 7946;
/// Each node serves /metrics on its own namespace's loopback.
pub const METRICS_PORT: u16 = 9900;
const KEY: &str = "test-pair-shared-key-0123";

/// The bound for a takeover: 3 x advertisement interval + 1 s.
pub fn takeover_bound() -> Duration {
    Duration::from_millis(3 * ADVERT_INTERVAL_MS + 1000)
}

/// How long a node whose link comes back may take to preempt. Longer than a takeover: its
/// link-local address goes through duplicate address detection again (up to 1 s random delay +
/// 1 s probe) before its IPv6 router can speak, its health checks (failed while cut off) must
/// pass again, and then it waits Master_Down_Interval like any backup (RFC 5798 §6.4.2) before
/// preempting. Not a target of the issue, so the limit leaves room for a slow host.
pub fn preemption_bound() -> Duration {
    Duration::from_secs(2) + takeover_bound() + Duration::from_secs(2)
}

pub struct PairTopology {
    pub net: Topology,
    pub node_b: Netns,
    _node_b_pass: PassThrough,
}

impl PairTopology {
    pub fn new(backends: usize) -> Result<Self> {
        let mut net = Topology::new(backends, false)?;
        // The VRRP group and ff02::12 must reach every port, querier or not.
        net.bridge.ns.ip(&["link", "set", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        let node_b = Netns::new("lb-b")?;
        let port = net.bridge.plug(&node_b, "eth0")?;
        let node_b_pass = net.bridge.accept_xdp_tx_from(&port)?;
        node_b.addr("eth0", &format!("{NODE_B_V4}/24"))?;
        node_b.addr("eth0", &format!("{NODE_B_V6}/64"))?;
        // The tests cut a node's link: its own IPv6 address must survive that, as IPv4's does.
        for node in [&net.lb, &node_b] {
            node.exec(&["sysctl", "-qw", "net.ipv6.conf.eth0.keep_addr_on_down=1"])?;
        }
        net.lb.ip(&["addr", "del", &format!("{SNAT_V4}/24"), "dev", "eth0"])?;
        net.lb.ip(&["addr", "del", &format!("{SNAT_V6}/64"), "dev", "eth0"])?;
        net.client.ip(&["route", "replace", &format!("{VIP_V4}/32"), "dev", "eth0"])?;
        net.client.ip(&["-6", "route", "replace", &format!("{VIP_V6}/128"), "dev", "eth0"])?;
        Ok(Self { net, node_b, _node_b_pass: node_b_pass })
    }

    pub fn node(&self, b: bool) -> &Netns {
        if b { &self.node_b } else { &self.net.lb }
    }

    /// The configuration of one node: NAT VIPs (IPv4 "web", IPv6 "web6") over every backend
    /// with TCP checks, and VRRP.
    pub fn config(&self, b: bool, priority: u8) -> String {
        self.config_with_interval(b, priority, ADVERT_INTERVAL_MS)
    }

    /// As [`Self::config`], with another advertisement interval.
    pub fn config_with_interval(&self, b: bool, priority: u8, advert_interval_ms: u64) -> String {
        let (me, peer) = if b { (NODE_B_V4, LB_V4) } else { (LB_V4, NODE_B_V4) };
        let mut config = format!(
            "[daemon]\ninterface = \"eth0\"\ninstance = \"{{instance}}\"\nmax_vips = 4\nmax_conns = 65536\n\
             metrics = \"127.0.0.1:{METRICS_PORT}\"\n\n\
             [vrrp]\nvrid = {VRID}\npriority = {priority}\nadvert_interval = \"{advert_interval_ms}ms\"\n\
             listen = \"{me}:{REPLICATION_PORT}\"\npeer = \"{peer}:{REPLICATION_PORT}\"\nkey = \"{KEY}\"\n\n\
             [[vip]]\nname = \"web\"\naddress = \"{VIP_V4}:80\"\nprotocol = \"tcp\"\nmode = \"nat\"\nsnat = \"{SNAT_V4}\"\n\
             check = {{ kind = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 2, initial = \"up\" }}\n"
        );
        for backend in &self.net.backends {
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\n", backend.v4));
        }
        config.push_str(&format!(
            "\n[[vip]]\nname = \"web6\"\naddress = \"[{VIP_V6}]:80\"\nprotocol = \"tcp\"\nmode = \"nat\"\nsnat = \"{SNAT_V6}\"\n\
             check = {{ kind = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 2, initial = \"up\" }}\n"
        ));
        for backend in &self.net.backends {
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"[{}]:{SERVICE_PORT}\"\n", backend.v6));
        }
        config
    }

    pub fn start(&self, b: bool, priority: u8) -> Result<LbDaemon> {
        LbDaemon::start(self.node(b), &unique_instance(), &self.config(b, priority))
    }
}

/// The daemon's `vrrp` status block.
pub fn vrrp_status(daemon: &LbDaemon) -> Result<serde_json::Value> {
    let status: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "status"])?)?;
    Ok(status["vrrp"].clone())
}

/// Polls until `check` holds for the daemon's VRRP status; returns how long it took.
pub fn wait_vrrp(
    daemon: &LbDaemon,
    what: &str,
    limit: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let status = vrrp_status(daemon)?;
        if check(&status) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            anyhow::bail!("{what}: not within {limit:?}; status: {status}\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The link-layer address `ns` sends `address` to, from its neighbour cache (None when it has no
/// usable entry, so its next packet resolves the address afresh).
pub fn neighbour_mac(ns: &Netns, address: impl Into<IpAddr>) -> Result<Option<[u8; 6]>> {
    let address = address.into().to_string();
    let entries: serde_json::Value = serde_json::from_slice(&ns.ip(&["-j", "neigh", "show", &address])?.stdout)?;
    let usable = |e: &&serde_json::Value| {
        !e["state"].as_array().is_some_and(|s| s.iter().any(|s| s == "FAILED" || s == "INCOMPLETE"))
    };
    entries
        .as_array()
        .into_iter()
        .flatten()
        .filter(usable)
        .find_map(|e| e["lladdr"].as_str())
        .map(|mac| lb::config::parse_mac(mac).map_err(anyhow::Error::msg))
        .transpose()
}

/// Whether `ns` holds `address` on eth0 (the sign of a VRRP master there).
pub fn holds(ns: &Netns, address: impl Into<IpAddr>) -> bool {
    let address = address.into();
    ns.ip(&["-j", "addr", "show", "dev", "eth0"])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("\"{address}\"")))
        .unwrap_or(false)
}

/// TCP connections to the NAT VIPs (IPv4 and IPv6) kept open across takeovers, each with the
/// backend that answered its first line.
pub struct LongLived(pub Vec<(SocketAddr, BufReader<TcpStream>, String)>);

impl LongLived {
    pub fn open(pair: &PairTopology, per_family: usize) -> Self {
        let vips = [SocketAddr::new(VIP_V4.into(), 80), SocketAddr::new(VIP_V6.into(), 80)];
        let opened = pair.net.client.enter(|| {
            let mut all = Vec::new();
            for vip in vips {
                for _ in 0..per_family {
                    let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).expect("connect");
                    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut reader = BufReader::new(stream);
                    let backend = exchange(&mut reader).expect("first answer");
                    all.push((vip, reader, backend));
                }
            }
            all
        });
        Self(opened.unwrap())
    }

    /// `standby` has every connection in its tables, pinned to the same backend. (Without that a
    /// new master could still rebuild a flow when the client speaks first, as the same hash
    /// gives the same first port candidate; but not when the backend speaks first, or when the
    /// active had to take another port.)
    /// Whether the standby has every connection in its table, on the right backend; if not, why.
    pub fn known_to(&self, pair: &PairTopology, standby: &LbDaemon) -> Result<(), String> {
        for (vip, reader, backend) in &self.0 {
            let client = reader.get_ref().local_addr().unwrap().to_string();
            let answer = standby.ok(&["--json", "explain", "--src", &client, "--dst", &vip.to_string()]).unwrap();
            let explained: serde_json::Value = serde_json::from_str(&answer).unwrap();
            if explained["decided_by"] != "connection table" {
                return Err(format!("the standby does not know {client}: {explained}"));
            }
            let host = pair.net.backends.iter().find(|h| &h.name == backend).expect("a backend of the topology");
            let ip: std::net::IpAddr = if vip.is_ipv4() { host.v4.into() } else { host.v6.into() };
            let expected = SocketAddr::new(ip, SERVICE_PORT).to_string();
            if explained["backend"] != expected.as_str() {
                return Err(format!("{client} pinned elsewhere: {explained}"));
            }
        }
        Ok(())
    }

    /// Every connection answers again, from the same backend (same tuple at the backend).
    pub fn still_answer(&mut self, when: &str) {
        let total = self.0.len();
        let mut answered = 0;
        for (vip, reader, backend) in &mut self.0 {
            match exchange(reader) {
                Ok(name) => {
                    assert_eq!(&name, backend, "{when}: a connection to {vip} moved to another backend");
                    answered += 1;
                }
                Err(error) => println!("{when}: a connection to {vip} failed: {error}"),
            }
        }
        println!("long-lived NAT connections {when}: {answered}/{total} answered by their backend");
        assert_eq!(answered, total, "{when}: NAT connections must survive");
    }
}

pub fn exchange(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    reader.get_mut().write_all(b"again\n")?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(line.trim().to_string())
}
