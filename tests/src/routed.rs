//! A routed test network for the tunnel modes, entirely inside namespaces: nothing is on-link
//! between the load balancer and its backends. A router joins four networks:
//!
//! ```text
//! client 10.30.0.2 fd30::2 ─ r-c ┐
//! lb     10.10.0.2 fd10::2 ─ r-lb┤ router ─ r-b1 ─ bridge 10.21.0.0/24 fd21::/64: be1 .5, be2 .6
//!                                └──────── r-b2 ─ 10.22.0.0/24 fd22::/64: be3 .5
//! ```
//!
//! The router sends the VIPs (10.99.0.0/24, fd99::/64) to the load balancer; every other host's
//! default route is the router. The backends hold the VIPs on loopback, run `name-server` and
//! strip the tunnels with `lb decap`. The router counts the VIPs' answers by where they come
//! from: through the load balancer, or straight from a backend.

use crate::netns::{Bridge, Netns, Process, veth};
use anyhow::{Context, Result, bail};
use lb::dataplane::{AttachMode, PassThrough};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd30, 0, 0, 0, 0, 0, 0, 2);
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 2);
/// The VIPs' networks, routed to the load balancer.
pub const VIP_NET_V4: &str = "10.99.0.0/24";
pub const VIP_NET_V6: &str = "fd99::/64";
/// The port the backends serve (and the VIPs': tunnels keep the port).
pub const SERVICE_PORT: u16 = 8080;

/// `n`-th VIP address of a family (1, 2, …).
pub fn vip(v6: bool, n: u16) -> IpAddr {
    if v6 { Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, n).into() } else { Ipv4Addr::new(10, 99, 0, n as u8).into() }
}

pub struct RoutedBackend {
    /// Dropped first: the server dies before its namespace goes.
    server: Option<Process>,
    pub ns: Netns,
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    decap: bool,
}

impl RoutedBackend {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }

    /// Runs `lb` in the backend's network namespace (host mount namespace: the pins are seen).
    pub fn lb(&self, args: &[&str]) -> Result<std::process::Output> {
        let lb = crate::daemon::lb_binary();
        let lb = lb.to_string_lossy();
        self.ns.nsenter(&[&[lb.as_ref()][..], args].concat())
    }

    /// `lb decap attach` on eth0.
    pub fn attach_decap(&mut self) -> Result<()> {
        self.lb(&["decap", "attach", "--interface", "eth0"])?;
        self.decap = true;
        Ok(())
    }

    pub fn detach_decap(&mut self) -> Result<()> {
        self.decap = false;
        self.lb(&["decap", "detach", "--interface", "eth0"]).map(drop)
    }

    /// Holds the VIP `addr` on loopback (or drops it): what makes the backend serve it.
    pub fn hold_vip(&self, addr: IpAddr, hold: bool) -> Result<()> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let verb = if hold { "add" } else { "del" };
        self.ns.ip(&["addr", verb, &format!("{addr}/{prefix}"), "dev", "lo"]).map(drop)
    }
}

impl Drop for RoutedBackend {
    fn drop(&mut self) {
        // The pinned link would outlive the namespace's interface: detach while it exists.
        if self.decap {
            let _ = self.detach_decap();
        }
    }
}

pub struct RoutedLab {
    pub backends: Vec<RoutedBackend>,
    pub client: Netns,
    pub lb: Netns,
    pub router: Netns,
    /// Lets the router receive what the load balancer sends back out of its veth (XDP_TX).
    _lb_port_pass: PassThrough,
    _subnet1: Bridge,
}

impl RoutedLab {
    /// Builds the network with three backends, each holding `vips` on loopback, serving, with
    /// `lb decap` attached.
    pub fn new(vips: &[IpAddr]) -> Result<Self> {
        let router = Netns::new("rtr")?;
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        let client = Netns::new("rc")?;
        let lb = Netns::new("rlb")?;
        veth(&router, "r-c", &client, "eth0")?;
        veth(&router, "r-lb", &lb, "eth0")?;
        for (ns, dev, v4, v6) in [
            (&router, "r-c", "10.30.0.1/24", "fd30::1/64"),
            (&client, "eth0", "10.30.0.2/24", "fd30::2/64"),
            (&router, "r-lb", "10.10.0.1/24", "fd10::1/64"),
            (&lb, "eth0", "10.10.0.2/24", "fd10::2/64"),
        ] {
            ns.addr(dev, v4)?;
            ns.addr(dev, v6)?;
        }
        default_routes(&client, ("10.30.0.1", "fd30::1"))?;
        default_routes(&lb, ("10.10.0.1", "fd10::1"))?;
        router.ip(&["route", "add", VIP_NET_V4, "via", &LB_V4.to_string()])?;
        router.ip(&["-6", "route", "add", VIP_NET_V6, "via", &LB_V6.to_string()])?;
        let lb_port_pass = router.enter(|| PassThrough::attach("r-lb", AttachMode::Native))??;

        let mut subnet1 = Bridge::new("rbr")?;
        subnet1.plug(&router, "r-b1")?;
        router.addr("r-b1", "10.21.0.1/24")?;
        router.addr("r-b1", "fd21::1/64")?;
        let mut lab = Self { backends: Vec::new(), client, lb, router, _lb_port_pass: lb_port_pass, _subnet1: subnet1 };
        lab.count_answers()?;
        for (n, (v4, v6)) in [("10.21.0.5", "fd21::5"), ("10.21.0.6", "fd21::6")].into_iter().enumerate() {
            let ns = Netns::new(&format!("rbe{}", n + 1))?;
            lab._subnet1.plug(&ns, "eth0")?;
            lab.add_backend(ns, v4, v6, ("10.21.0.1", "fd21::1"), vips)?;
        }
        let ns = Netns::new("rbe3")?;
        veth(&lab.router, "r-b2", &ns, "eth0")?;
        lab.router.addr("r-b2", "10.22.0.1/24")?;
        lab.router.addr("r-b2", "fd22::1/64")?;
        lab.add_backend(ns, "10.22.0.5", "fd22::5", ("10.22.0.1", "fd22::1"), vips)?;
        let mut targets: Vec<IpAddr> = vec![LB_V4.into(), LB_V6.into()];
        targets.extend(lab.backends.iter().flat_map(|b| [b.addr(false), b.addr(true)]));
        lab.wait_reachable(&targets)?;
        Ok(lab)
    }

    fn add_backend(&mut self, ns: Netns, v4: &str, v6: &str, gateway: (&str, &str), vips: &[IpAddr]) -> Result<()> {
        ns.addr("eth0", &format!("{v4}/24"))?;
        ns.addr("eth0", &format!("{v6}/64"))?;
        ns.ip(&["route", "add", "default", "via", gateway.0])?;
        ns.ip(&["-6", "route", "add", "default", "via", gateway.1])?;
        // The VIPs are on loopback only to accept traffic: never answer ARP for them.
        ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"])?;
        let name = ns.name().to_string();
        let mut backend = RoutedBackend {
            server: None,
            ns,
            name: format!("be{}", self.backends.len() + 1),
            v4: v4.parse()?,
            v6: v6.parse()?,
            decap: false,
        };
        for vip in vips {
            backend.hold_vip(*vip, true)?;
        }
        backend.attach_decap().with_context(|| format!("lb decap attach in {name}"))?;
        let server = crate::topology::name_server_path();
        let mut process = backend.ns.spawn(&[&server, &backend.name, &SERVICE_PORT.to_string()])?;
        let stdout = process.child().stdout.take().context("name-server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("name-server in {name} did not start: {line:?}");
        }
        backend.server = Some(process);
        self.backends.push(backend);
        Ok(())
    }

    /// nftables counters on the router: the VIPs' answers forwarded to the client, by whether
    /// they came from the load balancer or not.
    fn count_answers(&self) -> Result<()> {
        let rules = format!(
            "table inet lbtest {{\n chain answers {{\n  type filter hook forward priority 0;\n  \
             ip saddr {VIP_NET_V4} iifname \"r-lb\" counter comment \"via-lb\"\n  \
             ip6 saddr {VIP_NET_V6} iifname \"r-lb\" counter comment \"via-lb\"\n  \
             ip saddr {VIP_NET_V4} oifname \"r-c\" iifname != \"r-lb\" counter comment \"direct\"\n  \
             ip6 saddr {VIP_NET_V6} oifname \"r-c\" iifname != \"r-lb\" counter comment \"direct\"\n }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{}.nft", self.router.name()));
        std::fs::write(&file, rules)?;
        let loaded = self.router.exec(&["nft", "-f", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        loaded.map(drop)
    }

    /// Packets of the VIPs' answers the router forwarded: (through the load balancer, straight
    /// from a backend to the client).
    pub fn answers(&self) -> Result<(u64, u64)> {
        let out = self.router.exec(&["nft", "-j", "list", "table", "inet", "lbtest"])?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let (mut via_lb, mut direct) = (0, 0);
        for item in json["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let Some(comment) = rule["comment"].as_str() else { continue };
            let packets = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| e["counter"]["packets"].as_u64())
                .unwrap_or(0);
            match comment {
                "via-lb" => via_lb += packets,
                "direct" => direct += packets,
                _ => {}
            }
        }
        Ok((via_lb, direct))
    }

    /// Sends the client's packets for `backend` (IPv4) through the load balancer's kernel, which
    /// forwards them like a router (the same path as a VIP's packets, without XDP), or stops.
    pub fn route_through_lb(&self, backend: IpAddr, through: bool) -> Result<()> {
        let verb = if through { "add" } else { "del" };
        self.lb.exec(&["sysctl", "-qw", &format!("net.ipv4.ip_forward={}", through as u8)])?;
        self.lb.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ])?;
        // Only what comes from the client takes the detour: the load balancer's own packets to
        // the backend come back to the router on r-lb, and go the normal way.
        self.router.ip(&["rule", verb, "iif", "r-c", "table", "100"])?;
        if through {
            self.router.ip(&["route", "add", &format!("{backend}/32"), "via", &LB_V4.to_string(), "table", "100"])?;
        }
        Ok(())
    }

    /// Waits until the client reaches `targets` (links up, routes in place, neighbours known).
    pub fn wait_reachable(&self, targets: &[IpAddr]) -> Result<()> {
        for target in targets {
            let target = target.to_string();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.client.exec(&["ping", "-c1", "-W1", "-q", &target]).is_err() {
                if Instant::now() > deadline {
                    bail!("{target} is not reachable from the client after 10 s:\n{}", self.diagnose());
                }
            }
        }
        Ok(())
    }

    /// Links, addresses, routes and neighbours of every namespace, and the router's counters.
    pub fn diagnose(&self) -> String {
        let mut report = String::new();
        let mut namespaces = vec![("client", &self.client), ("lb", &self.lb), ("router", &self.router)];
        namespaces.extend(self.backends.iter().map(|b| (b.name.as_str(), &b.ns)));
        for (name, ns) in namespaces {
            for args in [&["-s", "link"][..], &["addr"], &["route"], &["-6", "route"], &["neigh"], &["-6", "neigh"]] {
                let text = ns.ip(args).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                report.push_str(&format!(
                    "--- {name}: ip {} ---\n{}\n",
                    args.join(" "),
                    text.unwrap_or_else(|e| e.to_string())
                ));
            }
        }
        report.push_str(&format!("--- router answers (via lb, direct) ---\n{:?}\n", self.answers()));
        report
    }
}

/// Default routes of a host on the router's client or load-balancer network.
fn default_routes(ns: &Netns, gateway: (&str, &str)) -> Result<()> {
    ns.ip(&["route", "add", "default", "via", gateway.0])?;
    ns.ip(&["-6", "route", "add", "default", "via", gateway.1]).map(drop)
}
