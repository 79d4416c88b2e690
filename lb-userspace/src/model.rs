//! The desired state an operator declares: VIPs, their backends and health checks, and the rules
//! that make it valid. Shared by the config file, the API and the persisted state.

use lb_common::maps::{MODE_DSR, MODE_GUE, MODE_IPIP, MODE_NAT, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(format!("unknown protocol {other:?}: expected \"tcp\" or \"udp\"")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// L2 direct server return: only MAC addresses change; backends hold the VIP.
    Dsr,
    /// Full NAT: destination to the backend, source to the SNAT address.
    Nat,
    /// Direct server return through an IP-in-IP tunnel: backends anywhere behind routers, which
    /// hold the VIP and strip the outer header (`lb decap`).
    Ipip,
    /// As `ipip`, with the outer header IP + UDP + GUE (spreads over ECMP paths and receive
    /// queues by the UDP source port, and crosses networks that pass only TCP/UDP).
    Gue,
}

impl Mode {
    pub fn number(self) -> u8 {
        match self {
            Mode::Dsr => MODE_DSR,
            Mode::Nat => MODE_NAT,
            Mode::Ipip => MODE_IPIP,
            Mode::Gue => MODE_GUE,
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "dsr" => Ok(Mode::Dsr),
            "nat" => Ok(Mode::Nat),
            "ipip" => Ok(Mode::Ipip),
            "gue" => Ok(Mode::Gue),
            other => Err(format!("unknown mode {other:?}: expected \"nat\", \"dsr\", \"ipip\" or \"gue\"")),
        }
    }

    /// Whether the backends' answers bypass the load balancer (every mode but `nat`).
    pub fn is_direct_return(self) -> bool {
        self != Mode::Nat
    }

    pub fn is_tunnel(self) -> bool {
        matches!(self, Mode::Ipip | Mode::Gue)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Dsr => "dsr",
            Mode::Nat => "nat",
            Mode::Ipip => "ipip",
            Mode::Gue => "gue",
        })
    }
}

/// Which connections of a VIP share a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Each connection is placed by its own 5-tuple.
    #[default]
    Connection,
    /// Every connection of a client address (or, with `affinity_prefix`, of its network)
    /// reaches the same backend.
    Client,
}

impl Affinity {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "connection" => Ok(Affinity::Connection),
            "client" => Ok(Affinity::Client),
            other => Err(format!("unknown affinity {other:?}: expected \"connection\" or \"client\"")),
        }
    }
}

impl std::fmt::Display for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Affinity::Connection => "connection",
            Affinity::Client => "client",
        })
    }
}

/// A health check, as data (run by the health-check engine).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub kind: CheckKind,
    /// Port to check instead of the backend's own (TCP and HTTP).
    #[serde(default)]
    pub port: Option<u16>,
    /// A backend seen for the first time starts up (traffic at once) or down (the default:
    /// traffic after `rise` good checks).
    #[serde(default)]
    pub initial_up: bool,
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Sent to the VIP's address instead of the backend's, the way the VIP's client traffic
    /// reaches the backend (inside its tunnel, or with its MAC for `dsr`): the check then proves
    /// that the backend serves the VIP (tunnel stripped, VIP held, service listening).
    #[serde(default)]
    pub via_vip: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CheckKind {
    Icmp,
    Tcp,
    Http {
        method: String,
        path: String,
        host: Option<String>,
        /// Inclusive range of accepted status codes.
        expect_status: (u16, u16),
        body_contains: Option<String>,
    },
}

/// Durations as human-readable strings ("1s", "500ms") in JSON.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub address: SocketAddr,
    pub weight: u32,
    /// Cold standby: receives traffic only while every primary of the VIP is down.
    #[serde(default)]
    pub backup: bool,
    /// Keeps its connections, gets no new ones.
    #[serde(default)]
    pub drained: bool,
    /// Next-hop MAC; resolved from the neighbour table when absent.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// Overrides the VIP's health check for this backend.
    #[serde(default)]
    pub check: Option<CheckSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSpec {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub mode: Mode,
    #[serde(default)]
    pub snat: Option<IpAddr>,
    /// NAT source ports, inclusive.
    pub snat_ports: (u16, u16),
    #[serde(default)]
    pub affinity: Affinity,
    /// Client affinity: how many leading bits of the client's address count (default: all).
    #[serde(default)]
    pub affinity_prefix: Option<u8>,
    /// ICMP echo requests to the VIP's address are answered by the data plane.
    #[serde(default = "answer_ping_default")]
    pub answer_ping: bool,
    #[serde(default)]
    pub check: Option<CheckSpec>,
    /// Passive failure detection (NAT only): backends that refuse new connections are taken
    /// out at once, and their checks bring them back.
    #[serde(default)]
    pub observe: Option<ObserveSpec>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

/// When watching a backend's answers takes it out: at least `refused` failed attempts
/// (refused, or unanswered), making at least `percent` % of its attempts, counted from its
/// first failure within `window`. The name stays `refused`: configurations carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserveSpec {
    pub refused: u32,
    pub percent: u8,
    pub window: std::time::Duration,
}

impl Default for ObserveSpec {
    fn default() -> Self {
        Self { refused: 3, percent: 50, window: std::time::Duration::from_secs(1) }
    }
}

pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 65535);

fn answer_ping_default() -> bool {
    true
}

impl VipSpec {
    /// The identity of a VIP in the data plane.
    pub fn key(&self) -> (SocketAddr, Protocol) {
        (self.address, self.protocol)
    }

    /// The client-address prefix that places new flows, or `None` for per-connection placement.
    pub fn client_affinity_prefix(&self) -> Option<u8> {
        let full = if self.address.is_ipv4() { 32 } else { 128 };
        (self.affinity == Affinity::Client).then(|| self.affinity_prefix.unwrap_or(full))
    }

    /// `connection`, `client`, or `client/24` with a prefix.
    pub fn affinity_text(&self) -> String {
        match self.affinity_prefix {
            Some(prefix) if self.affinity == Affinity::Client => format!("client/{prefix}"),
            _ => self.affinity.to_string(),
        }
    }

    pub fn backend(&self, address: SocketAddr) -> Option<&BackendSpec> {
        self.backends.iter().find(|b| b.address == address)
    }
}

/// Everything the operator asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub vips: Vec<VipSpec>,
}

/// One rule broken by a desired state: where (VIP, backend, field) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub vip: Option<usize>,
    pub backend: Option<usize>,
    pub field: &'static str,
    pub message: String,
}

impl DesiredState {
    pub fn vip(&self, name: &str) -> Option<&VipSpec> {
        self.vips.iter().find(|v| v.name == name)
    }

    pub fn vip_mut(&mut self, name: &str) -> Option<&mut VipSpec> {
        self.vips.iter_mut().find(|v| v.name == name)
    }

    /// Every rule the state breaks, in file order. `max_vips` and `ring_size` come from the daemon.
    pub fn problems(&self, max_vips: u32, ring_size: u32) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut at = |vip: usize, backend: Option<usize>, field: &'static str, message: String| {
            problems.push(Problem { vip: Some(vip), backend, field, message });
        };
        for (i, vip) in self.vips.iter().enumerate() {
            if vip.name.is_empty() || !vip.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                at(
                    i,
                    None,
                    "name",
                    format!("VIP name {:?} must be non-empty letters, digits, '-', '_' or '.'", vip.name),
                );
            }
            if let Some(j) = self.vips[..i].iter().position(|o| o.name == vip.name) {
                at(i, None, "name", format!("VIP name {:?} is already used by VIP #{}", vip.name, j + 1));
            }
            if let Some(other) = self.vips[..i].iter().find(|o| o.key() == vip.key()) {
                at(i, None, "address", format!("{} {} is already VIP {:?}", vip.protocol, vip.address, other.name));
            }
            if vip.address.ip().is_unspecified() {
                at(i, None, "address", format!("VIP address {} is unspecified", vip.address.ip()));
            }
            match (vip.mode, vip.snat) {
                (Mode::Nat, None) => at(
                    i,
                    None,
                    "snat",
                    "nat mode needs `snat`, the load balancer's source address towards backends".into(),
                ),
                (Mode::Nat, Some(snat)) if snat.is_ipv4() != vip.address.is_ipv4() => {
                    at(i, None, "snat", format!("SNAT address {snat} is not of the VIP's address family"))
                }
                (mode, Some(_)) if mode != Mode::Nat => at(i, None, "snat", "`snat` applies to nat mode only".into()),
                _ => {}
            }
            let (min, max) = vip.snat_ports;
            if min == 0 || min > max {
                at(i, None, "snat_ports", format!("port range {min}-{max} must satisfy 1 <= first <= last"));
            }
            if let Some(prefix) = vip.affinity_prefix {
                let full = if vip.address.is_ipv4() { 32 } else { 128 };
                if vip.affinity != Affinity::Client {
                    at(i, None, "affinity_prefix", "affinity_prefix applies to affinity = \"client\" only".into());
                } else if prefix == 0 || prefix > full {
                    at(
                        i,
                        None,
                        "affinity_prefix",
                        format!("prefix length {prefix} must be 1-{full} for this VIP's address family"),
                    );
                }
            }
            if let Some(other) =
                self.vips[..i].iter().find(|o| o.address.ip() == vip.address.ip() && o.answer_ping != vip.answer_ping)
            {
                at(
                    i,
                    None,
                    "answer_ping",
                    format!(
                        "answer_ping = {} differs from VIP {:?} on the same address {}: ping is answered per address",
                        vip.answer_ping,
                        other.name,
                        vip.address.ip()
                    ),
                );
            }
            if let Some(check) = &vip.check {
                check_problems(check, &mut |field, message| at(i, None, field, message));
            }
            let via_vip =
                vip.check.iter().chain(vip.backends.iter().filter_map(|b| b.check.as_ref())).any(|c| c.via_vip);
            if via_vip && vip.mode == Mode::Nat {
                at(
                    i,
                    None,
                    "check.via_vip",
                    "via_vip needs backends that hold the VIP (modes dsr, ipip, gue); nat backends do not".into(),
                );
            }
            for (j, backend) in vip.backends.iter().enumerate() {
                if let Some(check) = &backend.check {
                    check_problems(check, &mut |field, message| at(i, Some(j), field, message));
                }
                let check = backend.check.as_ref().or(vip.check.as_ref());
                if let Some(check) = check
                    && !matches!(check.kind, CheckKind::Icmp)
                    && check.port.is_none()
                    && backend.address.port() == 0
                {
                    at(
                        i,
                        Some(j),
                        "check.port",
                        "a TCP or HTTP check of a backend without a port needs `check.port`".into(),
                    );
                }
            }
            for (j, backend) in vip.backends.iter().enumerate() {
                // A tunnel carries either family in either (4in6, 6in4).
                if backend.address.is_ipv4() != vip.address.is_ipv4() && !vip.mode.is_tunnel() {
                    at(
                        i,
                        Some(j),
                        "address",
                        format!("backend {} is not of the VIP's address family ({})", backend.address, vip.address),
                    );
                }
                if backend.address.ip().is_unspecified() {
                    at(i, Some(j), "address", format!("backend address {} is unspecified", backend.address.ip()));
                }
                if vip.backends[..j].iter().any(|o| o.address == backend.address) {
                    at(i, Some(j), "address", format!("backend {} is listed twice", backend.address));
                }
                if vip.mode.is_direct_return()
                    && backend.address.port() != vip.address.port()
                    && backend.address.port() != 0
                {
                    at(
                        i,
                        Some(j),
                        "address",
                        format!(
                            "{} mode cannot change ports: backend port {} differs from the VIP's {}",
                            vip.mode,
                            backend.address.port(),
                            vip.address.port()
                        ),
                    );
                }
                if vip.mode == Mode::Nat && backend.address.port() == 0 && vip.address.port() != 0 {
                    at(i, Some(j), "address", "nat backend needs a port (0 only on an any-port VIP)".into());
                }
            }
            let primaries: Vec<&BackendSpec> = vip.backends.iter().filter(|b| !b.backup).collect();
            if !primaries.is_empty() && primaries.iter().all(|b| b.weight == 0) {
                let j = vip.backends.iter().position(|b| !b.backup).unwrap_or(0);
                at(i, Some(j), "weight", "every primary backend has weight 0: the VIP could never send traffic".into());
            }
            if vip.backends.len() as u64 >= ring_size as u64 {
                at(
                    i,
                    None,
                    "backend",
                    format!("{} backends need a Maglev table larger than ring_size {ring_size}", vip.backends.len()),
                );
            }
        }
        if self.vips.len() > max_vips as usize {
            problems.push(Problem {
                vip: Some(max_vips as usize),
                backend: None,
                field: "vip",
                message: format!("{} VIPs exceed max_vips = {max_vips}", self.vips.len()),
            });
        }
        problems
    }
}

fn check_problems(check: &CheckSpec, at: &mut dyn FnMut(&'static str, String)) {
    if check.interval.is_zero() {
        at("check.interval", "interval must be longer than 0".into());
    }
    if check.timeout.is_zero() || check.timeout > check.interval {
        at(
            "check.timeout",
            format!("timeout {:?} must be above 0 and at most the interval {:?}", check.timeout, check.interval),
        );
    }
    if check.rise == 0 {
        at("check.rise", "rise must be at least 1".into());
    }
    if check.fall == 0 {
        at("check.fall", "fall must be at least 1".into());
    }
    if let CheckKind::Http { path, expect_status: (lo, hi), method, .. } = &check.kind {
        if !path.starts_with('/') {
            at("check.path", format!("HTTP path {path:?} must start with '/'"));
        }
        if !(100..=599).contains(lo) || !(100..=599).contains(hi) || lo > hi {
            at("check.expect_status", format!("status {lo}-{hi} must be within 100-599"));
        }
        if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) {
            at("check.method", format!("HTTP method {method:?} must be upper-case letters, like GET"));
        }
    }
}
