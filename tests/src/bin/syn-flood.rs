//! Real clients' TCP connections to a VIP while a generator floods the same VIP with SYNs from
//! spoofed sources, in `dsr` and `nat` mode, against the same clients without a flood: how many
//! connections still succeed, and what the load balancer and the backends counted meanwhile.
//!
//! Topology (`lb_tests::topology`, all inside namespaces on one bridge): the client, the load
//! balancer running the real `lb daemon`, three backends running `name-server` (holding the VIP
//! on loopback for dsr), and a flooder. One VIP address, two services with the same backends:
//! 10.0.0.100:8080 in dsr mode and 10.0.0.100:80 in nat mode (SNAT 10.0.0.3), the daemon's
//! default table sizes (1,048,576 connection entries).
//!
//! The flood (`lb_tests::syn_flood`): TCP SYNs (54-byte frames, no TCP options) to the VIP's
//! port from random addresses of 198.18.0.0/15 and random source ports, addressed to the load
//! balancer's MAC, sent by one thread with `sendmmsg` on an AF_PACKET socket past the qdisc, as
//! fast as the path takes them. veth hands each frame over in the sender's softirq, so the
//! flooder's rate is the inverse of the whole path's cost: bridge, the XDP program, and the
//! backends' kernels for what the load balancer forwards. The SYN-ACKs to the spoofed sources
//! end at the flooder: the backends and the load balancer route 198.18.0.0/15 to it (a static
//! neighbour entry), and an XDP program on its interface counts and drops every frame. Nothing
//! is routed out of the namespaces, and the root namespace gets no route into them.
//!
//! The clients: from the client namespace, CLIENT_RATE new connections per second on a fixed
//! schedule (open loop: a slow answer does not delay the next attempt), each connecting,
//! sending a line and reading the backend's name within 3 s all told: time for one SYN
//! retransmission (Linux resends an unanswered SYN after 1 s, then after 3 s more).
//!
//! Runs: both services without a flood (one daemon); then per mode a fresh daemon (empty
//! tables), the flood starting 1 s before the first client attempt and stopping when the last
//! one has ended, and the clients again right after the flood, to show what it left behind.
//!
//! Usage: syn-flood [SECONDS] [CLIENT_RATE] [FLOOD_PPS]   (default 10 s of clients per run, 200
//! connections/s, the flood unpaced: 0); prints Markdown tables. Needs root.

use anyhow::{Context, Result, anyhow, bail, ensure};
use ipnet::Ipv4Net;
use lb::dataplane::{AttachMode, Sink};
use lb_tests::daemon::{LbDaemon, table_entries, unique_instance};
use lb_tests::netns::Netns;
use lb_tests::packet_socket::PacketSocket;
use lb_tests::service::tcp_request;
use lb_tests::syn_flood::{FloodLimits, FloodReport, SPOOFED_PREFIX, SpoofedSyns, flood};
use lb_tests::topology::{SERVICE_PORT, SNAT_V4, Topology, VIP_V4};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A client's whole budget for one connection: connect, request, answer.
const TIMEOUT: Duration = Duration::from_secs(3);
/// The flood runs this long before the first client attempt.
const LEAD: Duration = Duration::from_secs(1);
const NAT_PORT: u16 = 80;
/// The flooder's address: the next hop of the spoofed prefix's route, where the SYN-ACKs end.
const SINK_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const BACKENDS: usize = 3;
/// However fast the path, a flood sends no more than this.
const MAX_FRAMES: u64 = 1_000_000_000;
/// The clients run after the flood for at most this long.
const AFTER_SECONDS: f64 = 5.0;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Dsr,
    Nat,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Dsr => "dsr",
            Mode::Nat => "nat",
        }
    }

    fn vip(self) -> SocketAddrV4 {
        match self {
            Mode::Dsr => SocketAddrV4::new(VIP_V4, SERVICE_PORT),
            Mode::Nat => SocketAddrV4::new(VIP_V4, NAT_PORT),
        }
    }
}

/// The standard topology plus the flooder, which is also the sink of the SYN-ACKs.
struct Lab {
    /// Detached before the namespaces go.
    sink: Sink,
    flooder: Netns,
    flooder_mac: [u8; 6],
    lb_mac: [u8; 6],
    prefix: Ipv4Net,
    topology: Topology,
}

impl Lab {
    fn new() -> Result<Self> {
        let mut topology = Topology::new(BACKENDS, true).context("building the test network")?;
        let flooder = Netns::new("flood")?;
        topology.bridge.plug(&flooder, "eth0")?;
        flooder.addr("eth0", &format!("{SINK_V4}/24"))?;
        let flooder_mac = flooder.mac("eth0")?;
        let sink = flooder.enter(|| Sink::attach("eth0", AttachMode::Native))??;
        let prefix: Ipv4Net = SPOOFED_PREFIX.parse()?;
        // The sink drops ARP too: its neighbour entry is static.
        let mac = flooder_mac.map(|b| format!("{b:02x}")).join(":");
        for ns in topology.backends.iter().map(|b| &b.ns).chain([&topology.lb]) {
            ns.ip(&["neigh", "replace", &SINK_V4.to_string(), "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
            ns.ip(&["route", "add", &prefix.to_string(), "via", &SINK_V4.to_string(), "dev", "eth0"])?;
        }
        // Short connections leave the client's ports in TIME_WAIT: reuse them, use all of them.
        topology.client.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65535",
        ])?;
        let lb_mac = topology.lb.mac("eth0")?;
        Ok(Self { sink, flooder, flooder_mac, lb_mac, prefix, topology })
    }

    fn config(&self) -> String {
        let mut config =
            "[daemon]\ninterface = \"eth0\"\nxdp_mode = \"native\"\ninstance = \"{instance}\"\nmax_vips = 4\n"
                .to_string();
        for mode in [Mode::Dsr, Mode::Nat] {
            let snat = if mode == Mode::Nat { format!("snat = \"{SNAT_V4}\"\n") } else { String::new() };
            config.push_str(&format!(
                "\n[[vip]]\nname = \"{}\"\naddress = \"{}\"\nprotocol = \"tcp\"\nmode = \"{}\"\n{snat}",
                mode.name(),
                mode.vip(),
                mode.name()
            ));
            for backend in &self.topology.backends {
                config.push_str(&format!("\n[[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\n", backend.v4));
            }
        }
        config
    }

    /// A fresh daemon with both services, checked to answer through each.
    fn start_daemon(&self) -> Result<LbDaemon> {
        let daemon = LbDaemon::start(&self.topology.lb, &unique_instance(), &self.config())?;
        daemon.wait_none_down(Duration::from_secs(10))?;
        for mode in [Mode::Dsr, Mode::Nat] {
            let vip = SocketAddr::V4(mode.vip());
            let answered = self.topology.client.enter(|| {
                (0..5).any(|_| tcp_request(vip, Duration::from_secs(1)).is_ok_and(|name| !name.is_empty()))
            })?;
            if !answered {
                bail!(
                    "no answer through the {} VIP {vip} before any flood:\n{}\n{}",
                    mode.name(),
                    daemon.log(),
                    self.topology.diagnose()
                );
            }
        }
        Ok(daemon)
    }
}

/// What the clients saw in one run.
#[derive(Default)]
struct Clients {
    attempts: u64,
    /// Time from the attempt's start to the backend's answer, per success.
    latencies: Vec<Duration>,
    /// Failures by kind ("connect timed out", "refused", …).
    failed: BTreeMap<String, u64>,
    /// (attempts, successes) of the attempts started in each second of the run.
    by_second: Vec<(u64, u64)>,
    seconds: f64,
}

impl Clients {
    fn succeeded(&self) -> u64 {
        self.latencies.len() as u64
    }

    fn success_percent(&self) -> f64 {
        100.0 * self.succeeded() as f64 / self.attempts.max(1) as f64
    }

    /// Milliseconds at quantile `q` of the successes' latencies ("-" without any).
    fn latency_ms(&self, q: f64) -> String {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        match sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))) {
            Some(latency) if !sorted.is_empty() => format!("{:.1}", latency.as_secs_f64() * 1e3),
            _ => "-".into(),
        }
    }

    /// Successes that took a second or more: the first SYN (or SYN-ACK) was lost.
    fn slow(&self) -> usize {
        self.latencies.iter().filter(|l| **l >= Duration::from_secs(1)).count()
    }

    /// "100 100 41 0 …": the success percentage of each second's attempts, which shows when a
    /// flood's effect set in (or wore off) where the run's total cannot.
    fn timeline(&self) -> String {
        let percent = |(attempts, ok): &(u64, u64)| format!("{:.0}", 100.0 * *ok as f64 / (*attempts).max(1) as f64);
        self.by_second.iter().map(percent).collect::<Vec<_>>().join(" ")
    }

    fn failed_text(&self) -> String {
        let total: u64 = self.failed.values().sum();
        let kinds: Vec<String> = self.failed.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
        if kinds.is_empty() { "0".into() } else { format!("{total} ({})", kinds.join(", ")) }
    }
}

/// CLIENT_RATE attempts per second for `seconds`, from the calling thread's namespace.
fn run_clients(vip: SocketAddr, seconds: f64, rate: f64) -> Result<Clients> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let attempts = (seconds * rate).round() as u64;
        let started = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..attempts {
            if INTERRUPTED.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
            let second = (i as f64 / rate) as usize;
            tasks.spawn(async move { (second, attempt(vip).await) });
        }
        let mut clients = Clients::default();
        while let Some(joined) = tasks.join_next().await {
            let (second, outcome) = joined?;
            clients.attempts += 1;
            if clients.by_second.len() <= second {
                clients.by_second.resize(second + 1, (0, 0));
            }
            clients.by_second[second].0 += 1;
            match outcome {
                Ok(latency) => {
                    clients.latencies.push(latency);
                    clients.by_second[second].1 += 1;
                }
                Err(kind) => *clients.failed.entry(kind).or_default() += 1,
            }
        }
        clients.seconds = started.elapsed().as_secs_f64();
        Ok(clients)
    })
}

/// One connection: connect, a line, the backend's name, all within [`TIMEOUT`].
async fn attempt(vip: SocketAddr) -> Result<Duration, String> {
    let started = tokio::time::Instant::now();
    let deadline = started + TIMEOUT;
    let mut stream = match tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(vip)).await {
        Err(_) => return Err("connect timed out".into()),
        Ok(Err(error)) => return Err(error_kind(&error)),
        Ok(Ok(stream)) => stream,
    };
    let exchange = async {
        stream.write_all(b"hi\n").await?;
        let mut line = String::new();
        BufReader::new(&mut stream).read_line(&mut line).await?;
        if line.is_empty() {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        Ok(())
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Err(_) => Err("answer timed out".into()),
        Ok(Err(error)) => Err(error_kind(&error)),
        Ok(Ok(())) => Ok(started.elapsed()),
    }
}

fn error_kind(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => "reset".into(),
        std::io::ErrorKind::UnexpectedEof => "closed without an answer".into(),
        kind => kind.to_string(),
    }
}

/// The counters a run reads before and after: the load balancer's verdicts and the backends'
/// and the sink's view.
#[derive(Clone, Default)]
struct Counters {
    /// Packets per verdict reason (`lb stats`), whatever reasons the data plane has.
    reasons: BTreeMap<String, u64>,
    xdp_tx_errors: u64,
    /// Over all backends: frames received on eth0, SYN cookies sent, SYNs their listening
    /// sockets dropped.
    backend_rx: u64,
    syncookies: u64,
    listen_drops: u64,
    /// Frames the flooder's XDP program caught: the answers to the spoofed sources.
    sink: u64,
    /// Frames the bridge could not hand to the load balancer's veth: its receive ring was full
    /// (veth counts them on the sending side, the bridge's port).
    lb_ring_full: u64,
    /// The daemon's connection-table events (`lb stats`), by name.
    flow_events: BTreeMap<String, u64>,
    /// Floods the daemon detected since it started.
    floods: u64,
}

impl Counters {
    fn read(lab: &Lab, daemon: &LbDaemon) -> Result<Self> {
        let stats: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "stats"])?)?;
        let reasons = stats["reasons"]
            .as_array()
            .context("`lb stats` without reasons")?
            .iter()
            .filter_map(|r| Some((r[0].as_str()?.to_string(), r[1].as_u64()?)))
            .collect();
        let flow_events = stats["flow_events"]
            .as_array()
            .context("`lb stats` without flow events")?
            .iter()
            .filter_map(|r| Some((r[0].as_str()?.to_string(), r[1].as_u64()?)))
            .collect();
        let mut counters = Self {
            reasons,
            flow_events,
            floods: stats["flood"]["floods"].as_u64().unwrap_or(0),
            xdp_tx_errors: stats["xdp_tx_errors"].as_u64().unwrap_or(0),
            sink: lab.sink.count()?,
            ..Self::default()
        };
        let port = format!("/sys/class/net/{}/statistics/tx_dropped", lab.topology.lb_port);
        counters.lb_ring_full = read_number(&lab.topology.bridge.ns, &port)?;
        for backend in &lab.topology.backends {
            let tcp_ext = tcp_ext(&backend.ns)?;
            counters.syncookies += tcp_ext.get("SyncookiesSent").copied().unwrap_or(0);
            counters.listen_drops += tcp_ext.get("ListenDrops").copied().unwrap_or(0);
            counters.backend_rx += read_number(&backend.ns, "/sys/class/net/eth0/statistics/rx_packets")?;
        }
        Ok(counters)
    }

    fn since(&self, before: &Self) -> Self {
        let reasons = self
            .reasons
            .iter()
            .map(|(reason, n)| (reason.clone(), n.saturating_sub(before.reasons.get(reason).copied().unwrap_or(0))))
            .collect();
        let flow_events = self
            .flow_events
            .iter()
            .map(|(event, n)| (event.clone(), n.saturating_sub(before.flow_events.get(event).copied().unwrap_or(0))))
            .collect();
        Self {
            reasons,
            flow_events,
            floods: self.floods.saturating_sub(before.floods),
            xdp_tx_errors: self.xdp_tx_errors.saturating_sub(before.xdp_tx_errors),
            backend_rx: self.backend_rx.saturating_sub(before.backend_rx),
            syncookies: self.syncookies.saturating_sub(before.syncookies),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
            sink: self.sink.saturating_sub(before.sink),
            lb_ring_full: self.lb_ring_full.saturating_sub(before.lb_ring_full),
        }
    }

    /// Every packet the XDP program saw counts under exactly one reason.
    fn lb_packets(&self) -> u64 {
        self.reasons.values().sum()
    }
}

/// The TcpExt counters of /proc/net/netstat in `ns`.
fn tcp_ext(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    // /proc/net is the reader's namespace: read it from inside.
    let text = String::from_utf8(ns.exec(&["cat", "/proc/net/netstat"])?.stdout)?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines.as_slice() else { bail!("no TcpExt lines in /proc/net/netstat") };
    Ok(names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(name, value)| Some((name.to_string(), value.parse().ok()?)))
        .collect())
}

fn read_number(ns: &Netns, path: &str) -> Result<u64> {
    let text = String::from_utf8(ns.exec(&["cat", path])?.stdout)?;
    text.trim().parse().with_context(|| format!("{path} in {}: {text:?}", ns.name()))
}

/// One run's figures.
struct Run {
    label: String,
    flood: Option<FloodReport>,
    clients: Clients,
    counters: Counters,
    /// Seconds the counters cover (the flood's when there is one, else the clients').
    seconds: f64,
    /// (CONNS, NAT_REV) entries once the run ended.
    tables: (usize, usize),
}

#[derive(Clone, Copy)]
struct Settings {
    seconds: f64,
    client_rate: f64,
    flood_pps: u64,
}

/// The clients for `seconds` at the settings' rate against `mode`'s VIP, with a flood at that
/// VIP from [`LEAD`] before the first attempt to the end of the last when `flooding`.
fn measure(
    lab: &Lab,
    daemon: &LbDaemon,
    mode: Mode,
    label: &str,
    flooding: bool,
    seconds: f64,
    settings: Settings,
) -> Result<Run> {
    eprintln!("syn-flood: {label}: {seconds} s of clients at {}/s", settings.client_rate);
    let before = Counters::read(lab, daemon)?;
    let stop = AtomicBool::new(false);
    let (flood_report, clients) = std::thread::scope(|scope| -> Result<(Option<FloodReport>, Clients)> {
        let flooder = flooding.then(|| {
            scope.spawn(|| {
                let outcome = lab.flooder.enter(|| -> Result<FloodReport> {
                    let socket = PacketSocket::open_sender("eth0")?;
                    let mut syns = SpoofedSyns::new(lab.flooder_mac, lab.lb_mac, lab.prefix, mode.vip(), 0x5eed);
                    let limits = FloodLimits {
                        duration: LEAD + Duration::from_secs_f64(seconds) + TIMEOUT + Duration::from_secs(2),
                        max_frames: MAX_FRAMES,
                        max_pps: settings.flood_pps,
                    };
                    flood(&socket, &mut syns, limits, &stop)
                });
                // Ends the lead at once when the flooder failed to start.
                stop.store(true, Ordering::Relaxed);
                outcome
            })
        });
        if flooding {
            let lead_ends = Instant::now() + LEAD;
            while Instant::now() < lead_ends && !stop.load(Ordering::Relaxed) && !INTERRUPTED.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let clients =
            lab.topology.client.enter(|| run_clients(SocketAddr::V4(mode.vip()), seconds, settings.client_rate));
        stop.store(true, Ordering::Relaxed);
        let flood_report = match flooder {
            Some(handle) => Some(handle.join().map_err(|_| anyhow!("the flooder panicked"))???),
            None => None,
        };
        Ok((flood_report, clients??))
    })?;
    // Packets still in flight (SYN-ACK answers, retransmissions) land in this run's counters.
    std::thread::sleep(Duration::from_millis(200));
    let counters = Counters::read(lab, daemon)?.since(&before);
    let seconds = flood_report.map_or(clients.seconds, |f| f.seconds).max(1e-9);
    let tables = table_entries(&daemon.instance)?;
    ensure!(!INTERRUPTED.load(Ordering::Relaxed), "interrupted");
    Ok(Run { label: label.to_string(), flood: flood_report, clients, counters, seconds, tables })
}

fn run(settings: Settings) -> Result<Vec<Run>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("syn-flood creates network namespaces and loads XDP programs: run it as root");
    }
    for binary in ["lb", "name-server"] {
        let path = lb_tests::sibling_binary(binary);
        ensure!(
            path.exists(),
            "{} is missing: build it with `cargo build --release -p lb-tests -p lb-userspace --bins`",
            path.display()
        );
    }
    let lab = Lab::new()?;
    let mut runs = Vec::new();
    {
        let daemon = lab.start_daemon()?;
        for mode in [Mode::Dsr, Mode::Nat] {
            let label = format!("{}, no flood", mode.name());
            runs.push(measure(&lab, &daemon, mode, &label, false, settings.seconds, settings)?);
        }
    }
    for mode in [Mode::Dsr, Mode::Nat] {
        // A fresh daemon: the flood meets empty tables, as the baseline did.
        let daemon = lab.start_daemon()?;
        let label = format!("{}, SYN flood", mode.name());
        runs.push(measure(&lab, &daemon, mode, &label, true, settings.seconds, settings)?);
        let label = format!("{}, right after the flood", mode.name());
        let after = settings.seconds.min(AFTER_SECONDS);
        runs.push(measure(&lab, &daemon, mode, &label, false, after, settings)?);
    }
    Ok(runs)
}

fn print(runs: &[Run], settings: Settings) {
    println!("# TCP connections to a VIP during a SYN flood from spoofed sources\n");
    println!(
        "Clients: {} new connections/s for {} s per run (right after the flood: {} s), each connect + one line + the \
         backend's answer within {} s (one SYN retransmission fits). Flood: one thread, AF_PACKET sendmmsg past the \
         qdisc, 54-byte SYNs from random addresses of {SPOOFED_PREFIX} and random ports, {}, from {} s before the \
         first attempt to the end of the last; a fresh daemon (empty tables) per mode. {BACKENDS} backends; \
         flooder, client, load balancer and backends share the machine's cores.\n",
        settings.client_rate,
        settings.seconds,
        settings.seconds.min(AFTER_SECONDS),
        TIMEOUT.as_secs(),
        if settings.flood_pps == 0 {
            "as fast as the path takes them".to_string()
        } else {
            format!("paced at {} pps", settings.flood_pps)
        },
        LEAD.as_secs()
    );
    println!(
        "| run | flood pps offered | lb packets/s | client attempts | succeeded | success % | failed | p50 ms | p99 ms | max ms | succeeded after ≥ 1 s | success % by second |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|");
    for run in runs {
        let c = &run.clients;
        println!(
            "| {} | {:.0} | {:.0} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            run.label,
            run.flood.map_or(0.0, |f| f.pps()),
            run.counters.lb_packets() as f64 / run.seconds,
            c.attempts,
            c.succeeded(),
            c.success_percent(),
            c.failed_text(),
            c.latency_ms(0.5),
            c.latency_ms(0.99),
            c.latency_ms(1.0),
            c.slow(),
            c.timeline()
        );
    }
    println!(
        "\nflood pps offered: frames the flooder's device took, per second of flood; lb packets/s: packets the XDP \
         program saw (every source: flood, clients, backends' answers), per second of the same window. A failed \
         connect that timed out lost its SYN (and the retransmission) or the answer to it. Success % by second: \
         of the attempts started in each second of the run.\n"
    );
    println!(
        "| run | flood frames sent | refused by the flooder's device | dropped before the lb (ring full) | lb packets | xdp_tx errors | backends' rx frames | backends' SYN cookies | backends' listen drops | frames at the sink | CONNS entries after | NAT_REV entries after |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in runs {
        let k = &run.counters;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.label,
            run.flood.map_or(0, |f| f.sent),
            run.flood.map_or(0, |f| f.refused),
            k.lb_ring_full,
            k.lb_packets(),
            k.xdp_tx_errors,
            k.backend_rx,
            k.syncookies,
            k.listen_drops,
            k.sink,
            run.tables.0,
            run.tables.1
        );
    }
    println!(
        "\ndropped before the lb: frames the bridge could not hand to the load balancer's veth, its receive ring full \
         (the clients' packets cross the same ring); xdp_tx errors: frames the program sent back out that the veth dropped. Frames at \
         the sink: the answers to the spoofed sources (dsr: SYN-ACKs straight from the backends; nat: through the \
         load balancer), plus the segment's few broadcasts. Entries: the daemon's pinned tables when the run ended.\n"
    );
    println!(
        "| run | floods detected (daemon.flood_new_flows = {}/s per CPU) | half-open NAT ports taken back | DSR flows not recorded (flood) | table full |",
        lb::config::DEFAULT_FLOOD_NEW_FLOWS
    );
    println!("|---|---:|---:|---:|---:|");
    for run in runs {
        let k = &run.counters;
        let event = |name: &str| k.flow_events.get(name).copied().unwrap_or(0);
        println!(
            "| {} | {} | {} | {} | {} |",
            run.label,
            k.floods,
            event("half_open_port_taken"),
            event("flood_not_recorded"),
            event("table_full")
        );
    }
    println!();
    println!("| run | verdict reason | packets |\n|---|---|---:|");
    for run in runs {
        for (reason, packets) in run.counters.reasons.iter().filter(|(_, n)| **n > 0) {
            println!("| {} | {reason} | {packets} |", run.label);
        }
    }
}

fn main() {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed));
    let settings = match parse_args() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("syn-flood: {error:#}\nusage: syn-flood [SECONDS] [CLIENT_RATE] [FLOOD_PPS]");
            std::process::exit(2);
        }
    };
    // Everything the run created (namespaces, daemons, servers) is gone when `run` returns.
    match run(settings) {
        Ok(runs) => print(&runs, settings),
        Err(_) if INTERRUPTED.load(Ordering::Relaxed) => {
            eprintln!("syn-flood: interrupted; its namespaces and daemons were removed");
            std::process::exit(130);
        }
        Err(error) => {
            eprintln!("syn-flood failed: {error:#}");
            std::process::exit(1);
        }
    }
}

fn parse_args() -> Result<Settings> {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map_or(Ok(10.0), |a| a.parse()).context("SECONDS")?;
    let client_rate: f64 = args.next().map_or(Ok(200.0), |a| a.parse()).context("CLIENT_RATE")?;
    let flood_pps: u64 = args.next().map_or(Ok(0), |a| a.parse()).context("FLOOD_PPS")?;
    ensure!(seconds > 0.0 && seconds <= 600.0, "SECONDS must be in (0, 600]");
    ensure!(client_rate > 0.0 && client_rate <= 10_000.0, "CLIENT_RATE must be in (0, 10000]");
    Ok(Settings { seconds, client_rate, flood_pps })
}
