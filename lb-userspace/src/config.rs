//! The declarative TOML configuration: parsed and validated as a whole before anything is applied.
//! Every problem is reported as `FILE:LINE: FIELD: message`.

mod redundancy;

pub use redundancy::{BgpSettings, VrrpSettings};

use crate::dataplane::{AttachMode, DataplaneSizes};
use crate::model::{
    Affinity, BackendSpec, CheckKind, CheckSpec, DEFAULT_SNAT_PORTS, DesiredState, Mode, ObserveSpec, Protocol, VipSpec,
};
use lb_common::maglev::is_prime;
use lb_common::maps::{DEFAULT_MAX_CONNS, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use toml::Spanned;

/// Settings of the daemon itself; changing them needs a restart. Serialised with the names the
/// file uses, so that [`DaemonSettings::differences`] can name them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DaemonSettings {
    pub interface: String,
    pub xdp_mode: AttachMode,
    /// Forward only frames addressed to the interface's MAC (default). Off for setups where VIP
    /// traffic legitimately arrives for another MAC (e.g. the program on a bridge member port).
    pub check_destination_mac: bool,
    pub instance: String,
    pub metrics: Option<SocketAddr>,
    #[serde(flatten)]
    pub sizes: DataplaneSizes,
    pub vrrp: Option<VrrpSettings>,
    pub bgp: Option<BgpSettings>,
    /// Tunnel modes: GUE's UDP port on the backends.
    pub gue_port: u16,
    /// Tunnel modes: outer source addresses or prefixes, at most one per family (a family not
    /// named takes the interface's first global address).
    pub tunnel_source: Vec<ipnet::IpNet>,
    /// New flows per second on one CPU above which the data plane is told of a flood (0: never).
    pub flood_new_flows: u64,
}

/// `flood_new_flows` when not set: far above what one CPU sees of real clients' new connections,
/// far below what a SYN flood sends.
pub const DEFAULT_FLOOD_NEW_FLOWS: u64 = 50_000;

impl DaemonSettings {
    /// The settings whose values differ from `other`'s, named as in the file (`[vrrp]` and
    /// `[bgp]` for those sections). Every field is compared through its serialised form, so a
    /// setting added later is compared without being listed anywhere.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let as_map = |settings: &Self| match serde_json::to_value(settings) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable!("daemon settings serialise to an object"),
        };
        let (ours, theirs) = (as_map(self), as_map(other));
        let mut keys: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|key| ours.get(*key) != theirs.get(*key))
            .map(|key| match key.as_str() {
                "vrrp" | "bgp" => format!("[{key}]"),
                other => other.to_string(),
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonSettings,
    pub state: DesiredState,
}

/// All the problems of one file, each with its line.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Spanned<RawDaemon>,
    vrrp: Option<redundancy::RawVrrp>,
    bgp: Option<redundancy::RawBgp>,
    #[serde(default)]
    vip: Vec<Spanned<RawVip>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    interface: Spanned<String>,
    xdp_mode: Option<Spanned<String>>,
    check_destination_mac: Option<bool>,
    instance: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    ring_size: Option<Spanned<u32>>,
    max_vips: Option<Spanned<u32>>,
    max_conns: Option<Spanned<u32>>,
    gue_port: Option<Spanned<u16>>,
    tunnel_source: Option<Spanned<OneOrMore>>,
    flood_new_flows: Option<u64>,
}

/// A setting given as one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMore {
    One(String),
    More(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: Spanned<String>,
    address: Spanned<String>,
    protocol: Spanned<String>,
    mode: Spanned<String>,
    snat: Option<Spanned<String>>,
    snat_ports: Option<Spanned<String>>,
    affinity: Option<Spanned<String>>,
    affinity_prefix: Option<Spanned<u8>>,
    answer_ping: Option<Spanned<bool>>,
    check: Option<Spanned<RawCheck>>,
    /// `true`, or a table of thresholds (`refused`, `percent`, `window`).
    observe: Option<Spanned<toml::Value>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    kind: Spanned<String>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    method: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect_status: Option<Spanned<toml::Value>>,
    body_contains: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    initial: Option<Spanned<String>>,
    via_vip: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    backup: Option<Spanned<bool>>,
    mac: Option<Spanned<String>>,
    check: Option<Spanned<RawCheck>>,
}

/// Collects problems with their line numbers while converting.
struct Report<'a> {
    file: &'a str,
    source: &'a str,
    problems: Vec<String>,
}

impl Report<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        self.source[..span.start.min(self.source.len())].matches('\n').count() + 1
    }

    fn add(&mut self, span: &Range<usize>, field: &str, message: impl std::fmt::Display) {
        let line = self.line(span);
        self.problems.push(format!("{}:{line}: {field}: {message}", self.file));
    }

    /// Parses a spanned string with `parse`, reporting the error at its line.
    fn parse<T>(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(value.get_ref()) {
            Ok(v) => Some(v),
            Err(message) => {
                self.add(&value.span(), field, message);
                None
            }
        }
    }
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![format!("{}: cannot read the configuration: {e}", path.display())],
    })?;
    parse(&path.display().to_string(), &source)
}

/// Parses and validates a whole configuration. `file` names it in error messages.
pub fn parse(file: &str, source: &str) -> Result<Config, ConfigError> {
    let mut report = Report { file, source, problems: Vec::new() };
    let raw: RawConfig = match toml::from_str(source) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            // toml's message starts with its own position banner; keep its first line of prose.
            let message = e.message().lines().next().unwrap_or("invalid TOML").to_string();
            report.add(&span, "syntax", message);
            return Err(ConfigError { problems: report.problems });
        }
    };
    let mut daemon = convert_daemon(&mut report, &raw.daemon);
    let vrrp = raw.vrrp.as_ref().map(|v| redundancy::convert_vrrp(&mut report, v));
    let bgp = raw.bgp.as_ref().map(|b| redundancy::convert_bgp(&mut report, b));
    if let Some(daemon) = &mut daemon {
        daemon.vrrp = vrrp.flatten();
        daemon.bgp = bgp.flatten();
    }
    let vips: Vec<Option<VipSpec>> = raw.vip.iter().map(|v| convert_vip(&mut report, v)).collect();
    let (Some(daemon), true) = (daemon, report.problems.is_empty()) else {
        return Err(ConfigError { problems: report.problems });
    };
    let state =
        DesiredState { vips: vips.into_iter().map(|v| v.expect("no problems, so every VIP converted")).collect() };
    for problem in state.problems(daemon.sizes.max_vips, daemon.sizes.ring_size) {
        let vip = problem.vip.and_then(|i| raw.vip.get(i));
        let span = match (vip, problem.backend) {
            (Some(vip), Some(j)) => backend_field_span(&vip.get_ref().backend[j], problem.field),
            (Some(vip), None) => vip_field_span(vip, problem.field),
            (None, _) => raw.daemon.span(),
        };
        let prefix = match (problem.vip.and_then(|i| state.vips.get(i)), problem.backend) {
            (Some(vip), Some(j)) => format!("vip {:?} backend #{}: {}", vip.name, j + 1, problem.field),
            (Some(vip), None) => format!("vip {:?}: {}", vip.name, problem.field),
            (None, _) => problem.field.to_string(),
        };
        report.add(&span, &prefix, problem.message);
    }
    if report.problems.is_empty() {
        Ok(Config { daemon, state })
    } else {
        Err(ConfigError { problems: report.problems })
    }
}

fn vip_field_span(vip: &Spanned<RawVip>, field: &str) -> Range<usize> {
    let raw = vip.get_ref();
    let span = match field {
        "name" => Some(raw.name.span()),
        "address" => Some(raw.address.span()),
        "snat" => raw.snat.as_ref().map(Spanned::span),
        "snat_ports" => raw.snat_ports.as_ref().map(Spanned::span),
        "affinity_prefix" => raw.affinity_prefix.as_ref().map(Spanned::span),
        "answer_ping" => raw.answer_ping.as_ref().map(Spanned::span),
        f if f.starts_with("check") => raw.check.as_ref().map(Spanned::span),
        f if f.starts_with("observe") => raw.observe.as_ref().map(Spanned::span),
        _ => None,
    };
    span.unwrap_or_else(|| vip.span())
}

fn backend_field_span(backend: &Spanned<RawBackend>, field: &str) -> Range<usize> {
    let raw = backend.get_ref();
    match field {
        "address" => raw.address.span(),
        "weight" => raw.weight.as_ref().map_or_else(|| backend.span(), Spanned::span),
        _ => backend.span(),
    }
}

fn convert_daemon(report: &mut Report, daemon: &Spanned<RawDaemon>) -> Option<DaemonSettings> {
    let raw = daemon.get_ref();
    let before = report.problems.len();
    let interface = raw.interface.get_ref().clone();
    if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
        report.add(
            &raw.interface.span(),
            "daemon.interface",
            format!("{interface:?} is not an interface name (1-15 characters, no '/' or space)"),
        );
    }
    let xdp_mode = match &raw.xdp_mode {
        None => Some(AttachMode::Native),
        Some(mode) => report.parse(mode, "daemon.xdp_mode", |m| match m {
            "native" => Ok(AttachMode::Native),
            "generic" => Ok(AttachMode::Generic),
            other => Err(format!("unknown XDP mode {other:?}: expected \"native\" or \"generic\"")),
        }),
    };
    let instance = raw.instance.as_ref().map_or_else(|| "lb".to_string(), |i| i.get_ref().clone());
    if instance.is_empty()
        || instance.len() > 32
        || !instance.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        let span = raw.instance.as_ref().map_or_else(|| daemon.span(), Spanned::span);
        report.add(
            &span,
            "daemon.instance",
            format!("{instance:?} must be 1-32 letters, digits, '-' or '_' (it names paths)"),
        );
    }
    let metrics = raw.metrics.as_ref().and_then(|m| report.parse(m, "daemon.metrics", parse_socket_addr));
    let ring_size = raw.ring_size.as_ref().map_or(DEFAULT_RING_SIZE, |r| *r.get_ref());
    if !is_prime(ring_size) || ring_size < 7 {
        let span = raw.ring_size.as_ref().map_or_else(|| daemon.span(), Spanned::span);
        report.add(
            &span,
            "daemon.ring_size",
            format!("{ring_size} is not a prime of at least 7 (Maglev needs a prime table size; 65537 is usual)"),
        );
    }
    let max_vips = raw.max_vips.as_ref().map_or(DEFAULT_MAX_VIPS, |m| *m.get_ref());
    let max_conns = raw.max_conns.as_ref().map_or(DEFAULT_MAX_CONNS, |m| *m.get_ref());
    for (value, field, span) in [
        (max_vips, "daemon.max_vips", raw.max_vips.as_ref().map(Spanned::span)),
        (max_conns, "daemon.max_conns", raw.max_conns.as_ref().map(Spanned::span)),
    ] {
        if value == 0 {
            report.add(&span.unwrap_or_else(|| daemon.span()), field, "must be at least 1");
        }
    }
    if (max_vips as u64) * 2 * (ring_size as u64) > u32::MAX as u64 {
        let span = raw.max_vips.as_ref().map_or_else(|| daemon.span(), Spanned::span);
        report.add(
            &span,
            "daemon.max_vips",
            format!("2 x {max_vips} VIPs x ring_size {ring_size} entries do not fit one BPF array"),
        );
    }
    let gue_port = raw.gue_port.as_ref().map_or(lb_common::tunnel::GUE_DEFAULT_PORT, |p| *p.get_ref());
    if gue_port == 0 {
        report.add(
            &raw.gue_port.as_ref().map_or_else(|| daemon.span(), Spanned::span),
            "daemon.gue_port",
            "must be 1-65535",
        );
    }
    let mut tunnel_source = Vec::new();
    if let Some(sources) = &raw.tunnel_source {
        let texts = match sources.get_ref() {
            OneOrMore::One(text) => vec![text.clone()],
            OneOrMore::More(texts) => texts.clone(),
        };
        for text in texts {
            match crate::tunnel::parse_source(&text) {
                Ok(net) if tunnel_source.iter().any(|n: &ipnet::IpNet| n.addr().is_ipv4() == net.addr().is_ipv4()) => {
                    report.add(
                        &sources.span(),
                        "daemon.tunnel_source",
                        format!("{text:?}: one source per address family"),
                    )
                }
                Ok(net) => tunnel_source.push(net),
                Err(message) => report.add(&sources.span(), "daemon.tunnel_source", message),
            }
        }
    }
    if report.problems.len() > before {
        return None;
    }
    Some(DaemonSettings {
        interface,
        xdp_mode: xdp_mode?,
        check_destination_mac: raw.check_destination_mac.unwrap_or(true),
        instance,
        metrics,
        sizes: DataplaneSizes { max_vips, ring_size, max_conns },
        vrrp: None,
        bgp: None,
        gue_port,
        tunnel_source,
        flood_new_flows: raw.flood_new_flows.unwrap_or(DEFAULT_FLOOD_NEW_FLOWS),
    })
}

fn convert_vip(report: &mut Report, vip: &Spanned<RawVip>) -> Option<VipSpec> {
    let raw = vip.get_ref();
    let before = report.problems.len();
    let name = raw.name.get_ref().clone();
    let field = |f: &str| format!("vip {name:?}: {f}");
    let address = report.parse(&raw.address, &field("address"), parse_socket_addr);
    let protocol = report.parse(&raw.protocol, &field("protocol"), Protocol::parse);
    let mode = report.parse(&raw.mode, &field("mode"), Mode::parse);
    let snat = raw.snat.as_ref().and_then(|s| report.parse(s, &field("snat"), parse_ip));
    let snat_ports = match &raw.snat_ports {
        None => Some(DEFAULT_SNAT_PORTS),
        Some(range) => report.parse(range, &field("snat_ports"), parse_port_range),
    };
    let affinity = match &raw.affinity {
        None => Some(Affinity::Connection),
        Some(text) => report.parse(text, &field("affinity"), Affinity::parse),
    };
    let check = raw.check.as_ref().and_then(|c| convert_check(report, c, &format!("vip {name:?}")));
    let backends: Vec<Option<BackendSpec>> = raw
        .backend
        .iter()
        .enumerate()
        .map(|(j, b)| {
            let raw = b.get_ref();
            let field = |f: &str| format!("vip {name:?} backend #{}: {f}", j + 1);
            let address = report.parse(&raw.address, &field("address"), parse_socket_addr);
            let mac = raw.mac.as_ref().and_then(|m| report.parse(m, &field("mac"), parse_mac)).map(Some);
            let check =
                raw.check.as_ref().map(|c| convert_check(report, c, &format!("vip {name:?} backend #{}", j + 1)));
            Some(BackendSpec {
                address: address?,
                weight: raw.weight.as_ref().map_or(1, |w| *w.get_ref()),
                backup: raw.backup.as_ref().is_some_and(|b| *b.get_ref()),
                drained: false,
                mac: if raw.mac.is_some() { mac? } else { None },
                check: match check {
                    Some(converted) => Some(converted?),
                    None => None,
                },
            })
        })
        .collect();
    let observe = raw.observe.as_ref().and_then(|o| convert_observe(report, o, &name));
    if let (Some(observe), Some(mode)) = (&raw.observe, mode)
        && observe.get_ref().as_bool() != Some(false)
    {
        if mode != Mode::Nat {
            report.add(
                &observe.span(),
                &field("observe"),
                format!(
                    "only nat VIPs can be observed: in {} mode the backends answer clients directly, past the load balancer, which never sees a refusal",
                    mode
                ),
            );
        } else if check.is_none() && raw.backend.iter().any(|b| b.get_ref().check.is_none()) {
            report.add(
                &observe.span(),
                &field("observe"),
                "needs a health check (on the VIP, or on every backend): the check brings an observed backend back",
            );
        }
    }
    if report.problems.len() > before {
        return None;
    }
    Some(VipSpec {
        name,
        address: address?,
        protocol: protocol?,
        mode: mode?,
        snat,
        snat_ports: snat_ports?,
        affinity: affinity?,
        affinity_prefix: raw.affinity_prefix.as_ref().map(|p| *p.get_ref()),
        answer_ping: raw.answer_ping.as_ref().is_none_or(|a| *a.get_ref()),
        check,
        observe: observe.flatten(),
        backends: backends.into_iter().collect::<Option<Vec<_>>>()?,
    })
}

/// `observe = true`, `false`, or `{ refused = 3, percent = 50, window = "1s" }`: Some(None) for
/// false, None after a problem.
fn convert_observe(report: &mut Report, value: &Spanned<toml::Value>, name: &str) -> Option<Option<ObserveSpec>> {
    let field = |f: &str| format!("vip {name:?}: observe{f}");
    let defaults = ObserveSpec::default();
    let table = match value.get_ref() {
        toml::Value::Boolean(true) => return Some(Some(defaults)),
        toml::Value::Boolean(false) => return Some(None),
        toml::Value::Table(table) => table,
        _ => {
            report.add(&value.span(), &field(""), "expected true, false or a table { refused, percent, window }");
            return None;
        }
    };
    let before = report.problems.len();
    let mut spec = defaults;
    for (key, v) in table {
        match (key.as_str(), v) {
            ("refused", toml::Value::Integer(n)) if (1..=1000).contains(n) => spec.refused = *n as u32,
            ("refused", _) => report.add(&value.span(), &field(".refused"), "expected a whole number from 1 to 1000"),
            ("percent", toml::Value::Integer(n)) if (1..=100).contains(n) => spec.percent = *n as u8,
            ("percent", _) => report.add(&value.span(), &field(".percent"), "expected a whole number from 1 to 100"),
            ("window", toml::Value::String(text)) => match humantime::parse_duration(text) {
                Ok(d) if d >= std::time::Duration::from_millis(100) && d <= std::time::Duration::from_secs(60) => {
                    spec.window = d
                }
                Ok(_) => report.add(&value.span(), &field(".window"), "must be from 100ms to 60s"),
                Err(e) => report.add(&value.span(), &field(".window"), format!("{text:?} is not a duration ({e})")),
            },
            ("window", _) => report.add(&value.span(), &field(".window"), "expected a duration such as \"1s\""),
            (other, _) => report.add(
                &value.span(),
                &field(&format!(".{other}")),
                "unknown field: expected refused, percent or window",
            ),
        }
    }
    (report.problems.len() == before).then_some(Some(spec))
}

/// `owner` names where the check sits in messages: `vip "web"` or `vip "web" backend #2`.
fn convert_check(report: &mut Report, check: &Spanned<RawCheck>, owner: &str) -> Option<CheckSpec> {
    let raw = check.get_ref();
    let before = report.problems.len();
    let field = |f: &str| format!("{owner}: check.{f}");
    let duration = |report: &mut Report, value: &Option<Spanned<String>>, name: &str, default: &str| {
        let text = value.as_ref().map_or(default, |v| v.get_ref().as_str());
        match humantime::parse_duration(text) {
            Ok(d) => Some(d),
            Err(e) => {
                report.add(
                    &value.as_ref().map_or_else(|| check.span(), Spanned::span),
                    &field(name),
                    format!("{text:?} is not a duration ({e}); write e.g. \"1s\" or \"500ms\""),
                );
                None
            }
        }
    };
    let interval = duration(report, &raw.interval, "interval", "1s");
    let timeout = duration(report, &raw.timeout, "timeout", "500ms");
    let kind = match raw.kind.get_ref().as_str() {
        "icmp" => Some(CheckKind::Icmp),
        "tcp" => Some(CheckKind::Tcp),
        "http" => {
            let expect_status = match &raw.expect_status {
                None => Some((200, 299)),
                Some(v) => match v.get_ref() {
                    toml::Value::Integer(code) => u16::try_from(*code).ok().map(|c| (c, c)),
                    toml::Value::String(range) => parse_status_range(range),
                    _ => None,
                }
                .or_else(|| {
                    report.add(
                        &v.span(),
                        &field("expect_status"),
                        "expected a status code (200) or a range (\"200-399\")",
                    );
                    None
                }),
            };
            Some(CheckKind::Http {
                method: raw.method.as_ref().map_or_else(|| "GET".to_string(), |m| m.get_ref().clone()),
                path: raw.path.as_ref().map_or_else(|| "/".to_string(), |p| p.get_ref().clone()),
                host: raw.host.as_ref().map(|h| h.get_ref().clone()),
                expect_status: expect_status?,
                body_contains: raw.body_contains.as_ref().map(|b| b.get_ref().clone()),
            })
        }
        other => {
            report.add(
                &raw.kind.span(),
                &field("kind"),
                format!("unknown check kind {other:?}: expected \"icmp\", \"tcp\" or \"http\""),
            );
            None
        }
    };
    if !matches!(kind, Some(CheckKind::Http { .. })) {
        for (present, name) in [
            (raw.method.as_ref().map(Spanned::span), "method"),
            (raw.path.as_ref().map(Spanned::span), "path"),
            (raw.host.as_ref().map(Spanned::span), "host"),
            (raw.expect_status.as_ref().map(Spanned::span), "expect_status"),
            (raw.body_contains.as_ref().map(Spanned::span), "body_contains"),
        ] {
            if let Some(span) = present {
                report.add(&span, &field(name), "applies to http checks only");
            }
        }
    }
    let initial_up = match &raw.initial {
        None => Some(false),
        Some(initial) => report.parse(initial, &field("initial"), |i| match i {
            "down" => Ok(false),
            "up" => Ok(true),
            other => Err(format!("{other:?} is not a state: expected \"down\" (the default) or \"up\"")),
        }),
    };
    if report.problems.len() > before {
        return None;
    }
    Some(CheckSpec {
        port: raw.port.as_ref().map(|p| *p.get_ref()),
        initial_up: initial_up?,
        kind: kind?,
        interval: interval?,
        timeout: timeout?,
        rise: raw.rise.as_ref().map_or(2, |r| *r.get_ref()),
        fall: raw.fall.as_ref().map_or(3, |f| *f.get_ref()),
        via_vip: raw.via_vip.unwrap_or(false),
    })
}

pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| format!("{text:?} is not an address with a port (\"10.0.0.10:80\", \"[fd00::10]:80\")"))
}

pub fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| format!("{text:?} is not an IP address"))
}

pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not a port range like \"1024-65535\"");
    let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
    Ok((lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?))
}

fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let (lo, hi) = text.split_once('-')?;
    Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{text:?} is not a MAC address like \"02:00:00:00:00:01\"");
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[daemon]\ninterface = \"eth0\"\n";

    fn settings(extra: &str) -> DaemonSettings {
        parse("lb.toml", &format!("{BASE}{extra}")).expect("valid").daemon
    }

    #[test]
    fn equal_settings_have_no_differences() {
        assert_eq!(settings("").differences(&settings("")), Vec::<String>::new());
    }

    #[test]
    fn every_changed_setting_is_named_as_in_the_file() {
        let base = settings("");
        for (line, name) in [
            ("check_destination_mac = false", "check_destination_mac"),
            ("xdp_mode = \"generic\"", "xdp_mode"),
            ("instance = \"other\"", "instance"),
            ("metrics = \"127.0.0.1:9901\"", "metrics"),
            ("ring_size = 1021", "ring_size"),
            ("max_vips = 8", "max_vips"),
            ("max_conns = 4096", "max_conns"),
            ("flood_new_flows = 0", "flood_new_flows"),
        ] {
            assert_eq!(base.differences(&settings(&format!("{line}\n"))), vec![name.to_string()], "{line}");
        }
        let pair = settings(
            "\n[vrrp]\nvrid = 1\nlisten = \"10.0.0.2:7946\"\npeer = \"10.0.0.4:7946\"\nkey = \"0123456789abcdef\"\n",
        );
        assert_eq!(base.differences(&pair), vec!["[vrrp]".to_string()]);
    }

    /// The comparison covers the whole section: settings that differ in any way are reported.
    #[test]
    fn differences_agree_with_equality() {
        let variants = ["", "check_destination_mac = false\n", "max_conns = 4096\n", "xdp_mode = \"generic\"\n"];
        for a in variants {
            for b in variants {
                let (a, b) = (settings(a), settings(b));
                assert_eq!(a.differences(&b).is_empty(), a == b);
            }
        }
    }
}
