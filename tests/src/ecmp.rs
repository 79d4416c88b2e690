//! Active/active over ECMP, entirely in namespaces: a client behind a router that runs BIRD,
//! and, on one L2 segment (a bridge) behind the router, two `lb` nodes announcing the VIP over
//! BGP and DSR backends answering the client directly through the router.
//!
//! ```text
//! client 10.9.0.1 ── 10.9.0.2 router 10.0.0.1 ── bridge ── node a 10.0.0.2, node b 10.0.0.4
//!                                                       └─ be1 10.0.0.11, be2 10.0.0.12, … (VIP on lo)
//! ```

use crate::daemon::{LbDaemon, unique_instance};
use crate::netns::{Bridge, Netns, Process, veth};
use anyhow::{Context, Result, bail};
use lb::dataplane::PassThrough;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
pub const ROUTER_UP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const NODES: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 4)];
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const PORT: u16 = 8080;
/// Each node serves /metrics on its own namespace's loopback.
pub const METRICS_PORT: u16 = 9900;
pub const ROUTER_AS: u32 = 65000;
const NODE_AS: u32 = 65001;

pub struct EcmpTopology {
    /// How the nodes reach the backends: "dsr", or a tunnel ("ipip", "gue") that the backends
    /// strip with `lb decap`.
    pub mode: &'static str,
    /// Dropped first: servers and BIRD die before their namespaces go.
    servers: Vec<Process>,
    router_bird: Option<Process>,
    run_dir: std::path::PathBuf,
    _passes: Vec<PassThrough>,
    pub client: Netns,
    pub router: Netns,
    pub nodes: Vec<Netns>,
    pub backends: Vec<(Netns, Ipv4Addr)>,
    pub bridge: Bridge,
}

impl EcmpTopology {
    pub fn new(backends: usize) -> Result<Self> {
        Self::with_mode(backends, "dsr")
    }

    pub fn with_mode(backends: usize, mode: &'static str) -> Result<Self> {
        let mut bridge = Bridge::new("ecmp-br")?;
        let client = Netns::new("ecmp-client")?;
        let router = Netns::new("ecmp-router")?;
        veth(&client, "eth0", &router, "eth0")?;
        client.addr("eth0", &format!("{CLIENT}/24"))?;
        client.ip(&["route", "add", "default", "via", &ROUTER_UP.to_string()])?;
        router.addr("eth0", &format!("{ROUTER_UP}/24"))?;
        bridge.plug(&router, "eth1")?;
        router.addr("eth1", &format!("{ROUTER}/24"))?;
        // Forward, and spread flows over equal paths by their ports (L4 hash), not only addresses.
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1"])?;
        let mut passes = Vec::new();
        let mut nodes = Vec::new();
        for (i, address) in NODES.iter().enumerate() {
            let node = Netns::new(&format!("ecmp-node{i}"))?;
            let port = bridge.plug(&node, "eth0")?;
            passes.push(bridge.accept_xdp_tx_from(&port)?);
            node.addr("eth0", &format!("{address}/24"))?;
            nodes.push(node);
        }
        let mut topology = Self {
            mode,
            servers: Vec::new(),
            router_bird: None,
            run_dir: std::env::temp_dir().join(format!("lb-test-{}", router.name())),
            _passes: passes,
            client,
            router,
            nodes,
            backends: Vec::new(),
            bridge,
        };
        for n in 1..=backends {
            let ns = Netns::new(&format!("ecmp-be{n}"))?;
            topology.bridge.plug(&ns, "eth0")?;
            let address = Ipv4Addr::new(10, 0, 0, 10 + n as u8);
            ns.addr("eth0", &format!("{address}/24"))?;
            ns.ip(&["route", "add", "default", "via", &ROUTER.to_string()])?;
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"])?;
            if mode != "dsr" {
                let lb = crate::daemon::lb_binary().to_string_lossy().into_owned();
                ns.nsenter(&[&lb, "decap", "attach", "--interface", "eth0"])?;
            }
            let server = crate::sibling_binary("name-server").to_string_lossy().into_owned();
            let mut process = ns.spawn(&[&server, &format!("be{n}"), &PORT.to_string()])?;
            let stdout = process.child().stdout.take().context("name-server stdout")?;
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("name-server be{n} did not start: {line:?}");
            }
            topology.servers.push(process);
            topology.backends.push((ns, address));
        }
        topology.start_router_bird()?;
        Ok(topology)
    }

    /// BIRD on the router: one eBGP session per node, routes merged into ECMP in the kernel.
    fn start_router_bird(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.run_dir)?;
        let mut config = format!(
            "router id {ROUTER};\nprotocol device {{ }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths yes; }}\n"
        );
        for (i, node) in NODES.iter().enumerate() {
            config.push_str(&format!(
                "protocol bgp node{i} {{\n  local {ROUTER} as {ROUTER_AS};\n  neighbor {node} as {NODE_AS};\n  \
                 hold time 3;\n  keepalive time 1;\n  ipv4 {{ import all; export none; }};\n}}\n"
            ));
        }
        let conf = self.run_dir.join("router.conf");
        std::fs::write(&conf, config)?;
        let socket = self.run_dir.join("router.ctl");
        let (conf, socket) = (conf.to_string_lossy().into_owned(), socket.to_string_lossy().into_owned());
        self.router_bird = Some(self.router.spawn(&["bird", "-f", "-c", &conf, "-s", &socket])?);
        Ok(())
    }

    /// A node's configuration: a VIP of the topology's mode over every backend, announced over
    /// BGP to the router.
    pub fn node_config(&self, node: usize) -> String {
        let mut config = format!(
            "[daemon]\ninterface = \"eth0\"\ninstance = \"{{instance}}\"\nmax_vips = 4\nmax_conns = 65536\n\
             metrics = \"127.0.0.1:{METRICS_PORT}\"\n\n\
             [bgp]\nlocal_as = {NODE_AS}\nrouter_id = \"{}\"\nneighbor = \"{ROUTER}\"\nneighbor_as = {ROUTER_AS}\nhold_time = 3\n\n\
             [[vip]]\nname = \"web\"\naddress = \"{VIP}:{PORT}\"\nprotocol = \"tcp\"\nmode = \"{}\"\n\
             check = {{ kind = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 2, initial = \"up\" }}\n",
            NODES[node], self.mode
        );
        for (_, address) in &self.backends {
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"{address}:{PORT}\"\n"));
        }
        config
    }

    pub fn start_node(&self, node: usize) -> Result<LbDaemon> {
        LbDaemon::start(&self.nodes[node], &unique_instance(), &self.node_config(node))
    }

    /// The router's next hops for the VIP (none while no node announces it).
    pub fn next_hops(&self) -> Result<Vec<String>> {
        let out = self.router.ip(&["-j", "route", "show", &VIP.to_string()])?;
        let routes: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut hops = Vec::new();
        for route in routes.as_array().into_iter().flatten() {
            if let Some(gateway) = route["gateway"].as_str() {
                hops.push(gateway.to_string());
            }
            for hop in route["nexthops"].as_array().into_iter().flatten() {
                if let Some(gateway) = hop["gateway"].as_str() {
                    hops.push(gateway.to_string());
                }
            }
        }
        hops.sort();
        Ok(hops)
    }

    /// Waits until the router's next hops for the VIP are exactly `want`.
    pub fn wait_next_hops(&self, want: &[Ipv4Addr], limit: Duration) -> Result<Duration> {
        let want: Vec<String> = want.iter().map(ToString::to_string).collect();
        let started = Instant::now();
        loop {
            let hops = self.next_hops()?;
            if hops == want {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!("the router's next hops for {VIP} are {hops:?}, not {want:?}, after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EcmpTopology {
    fn drop(&mut self) {
        if self.mode != "dsr" {
            // The pinned decap links would outlive the backends' interfaces.
            let lb = crate::daemon::lb_binary().to_string_lossy().into_owned();
            for (ns, _) in &self.backends {
                let _ = ns.nsenter(&[&lb, "decap", "detach", "--interface", "eth0"]);
            }
        }
        self.servers.clear();
        self.router_bird = None;
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}
