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
    lb_port_pass: Option<PassThrough>,
    pub bridge: Bridge,
    dsr: bool,
}

/// The test server binary, built by cargo with the tests.
fn name_server_path() -> String {
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
        let lb_port = bridge.plug(&lb, "eth0")?;
        let lb_port_pass = bridge.accept_xdp_tx_from(&lb_port)?;
        client.addr("eth0", &format!("{CLIENT_V4}/24"))?;
        client.addr("eth0", &format!("{CLIENT_V6}/64"))?;
        client.ip(&["route", "add", &format!("{VIP_V4}/32"), "via", &LB_V4.to_string()])?;
        client.ip(&["-6", "route", "add", &format!("{VIP_V6}/128"), "via", &LB_V6.to_string()])?;
        for addr in [format!("{LB_V4}/24"), format!("{SNAT_V4}/24"), format!("{LB_V6}/64"), format!("{SNAT_V6}/64")] {
            lb.addr("eth0", &addr)?;
        }
        let mut topology = Self { backends: Vec::new(), client, lb, lb_port_pass: Some(lb_port_pass), bridge, dsr };
        for _ in 0..backends {
            topology.add_backend()?;
        }
        Ok(topology)
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
        self.backends.push(host);
        Ok(self.backends.last_mut().expect("just pushed"))
    }
}
