//! The standard test network, entirely inside namespaces: a client, a load balancer and backends
//! running `name-server`, each with an `eth0` on one bridge (in its own namespace).
//!
//! Addresses: 10.0.0.0/24 and fd00::/64. The client reaches the VIP through the load balancer
//! by a host route; in DSR mode the backends hold the VIP on loopback.

use crate::netns::{Bridge, Netns, Process};
use anyhow::{Context, Result, bail};
use lb::dataplane::PassThrough;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const SNAT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const SNAT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
/// The port backends listen on (and, in DSR mode, the VIP's port).
pub const SERVICE_PORT: u16 = 8080;

pub struct BackendHost {
    /// Dropped first: the server dies before its namespace goes.
    server: Option<Process>,
    pub ns: Netns,
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mac: [u8; 6],
    /// The HTTP status the server answers, read from this file on every request.
    status_file: std::path::PathBuf,
}

impl BackendHost {
    /// Makes the server answer HTTP requests with `status` (e.g. 503).
    pub fn set_http_status(&self, status: u16) {
        std::fs::write(&self.status_file, status.to_string()).expect("writing the status file");
    }
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }

    /// Starts `name-server` answering with this backend's name and waits until it listens.
    pub fn start_server(&mut self) -> Result<()> {
        let status_file = self.status_file.to_string_lossy().into_owned();
        let mut process = self.ns.spawn(&[&name_server_path(), &self.name, &SERVICE_PORT.to_string(), &status_file])?;
        let stdout = process.child().stdout.take().context("name-server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("name-server in {} did not start: {line:?}", self.name);
        }
        self.server = Some(process);
        Ok(())
    }

    pub fn stop_server(&mut self) {
        self.server = None;
    }

    pub fn server_running(&self) -> bool {
        self.server.is_some()
    }
}

impl Drop for BackendHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.status_file);
    }
}

pub struct Topology {
    pub backends: Vec<BackendHost>,
    pub client: Netns,
    pub lb: Netns,
    /// The bridge's port that the load balancer's eth0 is plugged into (its veth peer).
    pub lb_port: String,
    lb_port_pass: Option<PassThrough>,
    pub bridge: Bridge,
    dsr: bool,
}

/// The test server binary, built by cargo with the tests.
pub fn name_server_path() -> String {
    crate::sibling_binary("name-server").to_string_lossy().into_owned()
}

impl Topology {
    /// Builds the network with `backends` backends, servers started. `dsr` puts the VIP on the
    /// backends' loopback.
    pub fn new(backends: usize, dsr: bool) -> Result<Self> {
        let mut bridge = Bridge::new("br")?;
        let client = Netns::new("client")?;
        let lb = Netns::new("lb")?;
        bridge.plug(&client, "eth0")?;
        client.addr("eth0", &format!("{CLIENT_V4}/24"))?;
        client.addr("eth0", &format!("{CLIENT_V6}/64"))?;
        client.ip(&["route", "add", &format!("{VIP_V4}/32"), "via", &LB_V4.to_string()])?;
        client.ip(&["-6", "route", "add", &format!("{VIP_V6}/128"), "via", &LB_V6.to_string()])?;
        let mut topology =
            Self { backends: Vec::new(), client, lb, lb_port: String::new(), lb_port_pass: None, bridge, dsr };
        topology.plug_lb()?;
        topology.wait_reachable(&[LB_V4.into(), LB_V6.into()])?;
        for _ in 0..backends {
            topology.add_backend()?;
        }
        Ok(topology)
    }

    /// Plugs the load balancer into the bridge: a new eth0 with its addresses, and the
    /// pass-through program on the bridge's side that lets it receive XDP_TX frames.
    fn plug_lb(&mut self) -> Result<()> {
        self.lb_port = self.bridge.plug(&self.lb, "eth0")?;
        self.lb_port_pass = Some(self.bridge.accept_xdp_tx_from(&self.lb_port)?);
        for addr in [format!("{LB_V4}/24"), format!("{SNAT_V4}/24"), format!("{LB_V6}/64"), format!("{SNAT_V6}/64")] {
            self.lb.addr("eth0", &addr)?;
        }
        Ok(())
    }

    /// Removes the load balancer's eth0 (and with it anything attached to it) and plugs in a
    /// new one, as when a NIC goes away and comes back: same name, MAC and addresses, new ifindex.
    pub fn replug_lb(&mut self) -> Result<()> {
        let mac = self.lb.mac("eth0")?;
        self.lb_port_pass = None;
        self.lb.ip(&["link", "del", "eth0"])?;
        self.plug_lb()?;
        let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        self.lb.ip(&["link", "set", "eth0", "address", &mac.join(":")])?;
        self.wait_reachable(&[LB_V4.into(), LB_V6.into()])
    }

    /// Takes the pass-through program off the load balancer's veth peer: the peer no longer
    /// receives what the load balancer sends back out (XDP_TX), as on a bare veth.
    pub fn remove_lb_port_pass(&mut self) {
        self.lb_port_pass = None;
    }

    /// Waits until the client reaches `targets`: the network is ready (links up, bridge ports
    /// forwarding, neighbours answering) before a test sends its first packet through the data
    /// plane, so a failure later is the data plane's, not the topology's.
    pub fn wait_reachable(&self, targets: &[IpAddr]) -> Result<()> {
        for target in targets {
            let target = target.to_string();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while self.client.exec(&["ping", "-c1", "-W1", "-q", &target]).is_err() {
                if std::time::Instant::now() > deadline {
                    bail!("{target} is not reachable from the client after 10 s:\n{}", self.diagnose());
                }
            }
        }
        Ok(())
    }

    /// Every namespace's links, addresses, neighbours and the bridge's forwarding database: what
    /// a failed test prints to tell a network problem from a data-plane one.
    pub fn diagnose(&self) -> String {
        let mut report = String::new();
        let mut namespaces = vec![("client", &self.client), ("lb", &self.lb), ("bridge", &self.bridge.ns)];
        namespaces.extend(self.backends.iter().map(|b| (b.name.as_str(), &b.ns)));
        for (name, ns) in namespaces {
            for args in [&["-s", "link"][..], &["addr"], &["neigh"], &["-6", "neigh"]] {
                let text = ns.ip(args).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                report.push_str(&format!(
                    "--- {name}: ip {} ---\n{}\n",
                    args.join(" "),
                    text.unwrap_or_else(|e| e.to_string())
                ));
            }
        }
        for args in [&["fdb", "show", "br", "br0"][..], &["mdb", "show"]] {
            let text = self
                .bridge
                .ns
                .exec(&[&["bridge"][..], args].concat())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            report.push_str(&format!(
                "--- bridge {} ---\n{}\n",
                args.join(" "),
                text.unwrap_or_else(|e| e.to_string())
            ));
        }
        report
    }

    /// Keeps the network usable after this process exits (the demo's `--keep`): the bridge
    /// port's pass-through program is pinned at `pin`.
    pub fn outlive_process(&mut self, pin: &std::path::Path) -> Result<()> {
        if let Some(pass) = self.lb_port_pass.take() {
            pass.pin(pin)?;
        }
        Ok(())
    }

    /// Adds one more backend (be<n>, 10.0.0.1<n> / fd00::1<n>) and starts its server.
    pub fn add_backend(&mut self) -> Result<&mut BackendHost> {
        let n = self.backends.len() as u8 + 1;
        let name = format!("be{n}");
        let ns = Netns::new(&name)?;
        self.bridge.plug(&ns, "eth0")?;
        let v4 = Ipv4Addr::new(10, 0, 0, 10 + n);
        let v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10 + n as u16);
        ns.addr("eth0", &format!("{v4}/24"))?;
        ns.addr("eth0", &format!("{v6}/64"))?;
        if self.dsr {
            ns.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
            ns.ip(&["-6", "addr", "add", &format!("{VIP_V6}/128"), "dev", "lo"])?;
            // The VIP is on loopback only to accept traffic: never answer ARP for it.
            ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"])?;
        }
        let mac = ns.mac("eth0")?;
        let status_file = std::env::temp_dir().join(format!("{}-status", ns.name()));
        let _ = std::fs::remove_file(&status_file);
        let mut host = BackendHost { server: None, ns, name, v4, v6, mac, status_file };
        host.start_server()?;
        self.wait_reachable(&[v4.into(), v6.into()])?;
        self.backends.push(host);
        Ok(self.backends.last_mut().expect("just pushed"))
    }
}
