//! The command line: clap definitions, one API request per command, output as aligned tables
//! or, with `--json`, as the daemon's data.

use crate::api::{self, Request};
use crate::config::{parse_mac, parse_port_range};
use crate::dataplane::AttachMode;
use crate::dataplane::decap::{DecapAttach, DecapAttached, DecapStatus};
use crate::model::{Affinity, BackendSpec, DEFAULT_SNAT_PORTS, Mode, Protocol, VipSpec};
use crate::report::*;
use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::NOTHING};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "lb", version, about = "eBPF/XDP layer-4 load balancer")]
pub struct Cli {
    /// The daemon instance to talk to (socket /run/lb/INSTANCE.sock).
    #[arg(long, global = true, default_value = "lb")]
    pub instance: String,
    /// Print the daemon's data as JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: load or take over the data plane, apply the configuration, serve the API.
    Daemon {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Manage backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Apply a configuration file: validated whole, diffed against the running state, applied at once.
    Apply {
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The daemon and its data plane.
    Status,
    /// Traffic per VIP and backend, and packets per verdict reason.
    Stats {
        /// Redraw every `--interval` until interrupted: a live view of the rates.
        #[arg(long)]
        watch: bool,
        /// With --watch: time between screens.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// With --watch: stop after this many screens.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Which backend a flow goes to, and why.
    Explain {
        #[arg(long)]
        src: SocketAddr,
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value = "tcp", value_parser = Protocol::parse)]
        proto: Protocol,
    },
    /// Active/standby: hand the VIPs over to the standby now (maintenance of the active node).
    Failover,
    /// Remove the data plane of an instance: program, pins and saved state (stops its daemon).
    Detach,
    /// Load the embedded XDP program through the verifier, without attaching it.
    Verify,
    /// Shell completions, on standard output (e.g. `lb completions bash > /etc/bash_completion.d/lb`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff), on standard output (e.g. `lb man > lb.8`).
    Man,
    /// A veth peer of the load balancer's interface: attach a program that passes every frame,
    /// so that the peer receives what the load balancer sends back out (XDP_TX). Run it where
    /// the peer lives (the host, for a container's eth0); it stays attached until detached.
    #[command(subcommand)]
    XdpPass(XdpPassCommand),
    /// On a backend of `ipip` and `gue` VIPs: strip the tunnel headers from packets for this
    /// host, in XDP, without kernel tunnel modules. Runs without the daemon; what it attaches
    /// stays attached until detached.
    #[command(subcommand)]
    Decap(DecapCommand),
}

#[derive(Subcommand)]
pub enum DecapCommand {
    /// Attach decapsulation to INTERFACE and pin it. Again on an attached interface: sets the
    /// GUE port, and replaces another build's program in place.
    Attach {
        /// The interface the tunnelled packets arrive on (e.g. eth0).
        #[arg(long)]
        interface: String,
        /// The UDP port GUE arrives on (the load balancer's `gue_port`); 0: IPIP only.
        #[arg(long, default_value_t = lb_common::tunnel::GUE_DEFAULT_PORT)]
        gue_port: u16,
        /// native: in the driver (fast); generic: in the network stack, for drivers without XDP.
        #[arg(long, default_value = "native", value_parser = parse_xdp_mode)]
        xdp_mode: AttachMode,
    },
    /// Remove decapsulation from INTERFACE.
    Detach {
        /// The interface `lb decap attach` was given.
        #[arg(long)]
        interface: String,
    },
    /// The interfaces of this network namespace with decapsulation: GUE port and packets per verdict.
    Status,
}

fn parse_xdp_mode(mode: &str) -> Result<AttachMode, String> {
    match mode {
        "native" => Ok(AttachMode::Native),
        "generic" => Ok(AttachMode::Generic),
        other => Err(format!("{other:?} is not an XDP mode: native or generic")),
    }
}

#[derive(Subcommand)]
pub enum XdpPassCommand {
    /// Attach the pass-through program to INTERFACE (native XDP) and pin it.
    Attach { interface: String },
    /// Remove it again.
    Detach { interface: String },
}

#[derive(Subcommand)]
pub enum VipCommand {
    List,
    Add(VipArgs),
    Del { name: String },
}

#[derive(Args)]
pub struct VipArgs {
    #[arg(long)]
    name: String,
    /// Address and port, e.g. 10.0.0.10:80 or [fd00::10]:80 (port 0: every port).
    #[arg(long)]
    address: SocketAddr,
    #[arg(long, default_value = "tcp", value_parser = Protocol::parse)]
    protocol: Protocol,
    #[arg(long, value_parser = Mode::parse)]
    mode: Mode,
    /// NAT mode: the load balancer's source address towards backends.
    #[arg(long)]
    snat: Option<IpAddr>,
    /// NAT mode: source ports, e.g. 1024-65535.
    #[arg(long, value_parser = parse_port_range)]
    snat_ports: Option<(u16, u16)>,
    /// Which connections share a backend: each on its own (connection) or every connection
    /// of a client (client).
    #[arg(long, default_value = "connection", value_parser = Affinity::parse)]
    affinity: Affinity,
    /// Client affinity: leading bits of the client's address that count, e.g. 24 (IPv4) or
    /// 56 (IPv6) to keep the clients behind one NAT pool together.
    #[arg(long)]
    affinity_prefix: Option<u8>,
    /// Leave ICMP echo requests to the VIP's address unanswered (answered by default).
    #[arg(long)]
    no_answer_ping: bool,
}

#[derive(Subcommand)]
pub enum BackendCommand {
    List {
        #[arg(long)]
        vip: Option<String>,
    },
    Add {
        #[arg(long)]
        vip: String,
        #[arg(long)]
        address: SocketAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Cold standby: traffic only while every primary is down.
        #[arg(long)]
        backup: bool,
        /// Next-hop MAC (resolved from the neighbour table when omitted).
        #[arg(long, value_parser = parse_mac)]
        mac: Option<[u8; 6]>,
    },
    Del {
        #[arg(long)]
        vip: String,
        #[arg(long)]
        address: SocketAddr,
    },
    /// Keep existing connections, send no new ones.
    Drain {
        #[arg(long)]
        vip: String,
        #[arg(long)]
        address: SocketAddr,
    },
    Undrain {
        #[arg(long)]
        vip: String,
        #[arg(long)]
        address: SocketAddr,
    },
}

/// Runs a client command against the daemon and prints the answer.
pub async fn run_client(cli: Cli) -> Result<()> {
    let request = match cli.command {
        Command::Vip(VipCommand::List) => Request::VipList,
        Command::Vip(VipCommand::Add(a)) => Request::VipAdd {
            vip: VipSpec {
                name: a.name,
                address: a.address,
                protocol: a.protocol,
                mode: a.mode,
                snat: a.snat,
                snat_ports: a.snat_ports.unwrap_or(DEFAULT_SNAT_PORTS),
                affinity: a.affinity,
                affinity_prefix: a.affinity_prefix,
                answer_ping: !a.no_answer_ping,
                observe: None,
                check: None,
                backends: Vec::new(),
            },
        },
        Command::Vip(VipCommand::Del { name }) => Request::VipDel { name },
        Command::Backend(BackendCommand::List { vip }) => Request::BackendList { vip },
        Command::Backend(BackendCommand::Add { vip, address, weight, backup, mac }) => Request::BackendAdd {
            vip,
            backend: BackendSpec { address, weight, backup, drained: false, mac, check: None },
        },
        Command::Backend(BackendCommand::Del { vip, address }) => Request::BackendDel { vip, address },
        Command::Backend(BackendCommand::Drain { vip, address }) => {
            Request::BackendDrain { vip, address, drained: true }
        }
        Command::Backend(BackendCommand::Undrain { vip, address }) => {
            Request::BackendDrain { vip, address, drained: false }
        }
        Command::Apply { file, dry_run } => {
            let source = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            Request::Apply { file: file.display().to_string(), source, dry_run }
        }
        Command::Status => Request::Status,
        Command::Failover => Request::Failover,
        Command::Stats { watch: true, interval, count } => {
            return watch_stats(&cli.instance, interval, count, cli.json).await;
        }
        Command::Stats { .. } => Request::Stats,
        Command::Explain { src, dst, proto } => Request::Explain { src, dst, protocol: proto },
        Command::Daemon { .. }
        | Command::Detach
        | Command::Verify
        | Command::XdpPass(_)
        | Command::Decap(_)
        | Command::Completions { .. }
        | Command::Man => {
            unreachable!("handled by main")
        }
    };
    let data = api::call(&cli.instance, &request).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let typed = |what: &str| anyhow!("the daemon's answer is not a {what}");
    match request {
        Request::VipList => print_vips(&serde_json::from_value::<Vec<VipRow>>(data).map_err(|_| typed("VIP list"))?),
        Request::BackendList { .. } => {
            print_backends(&serde_json::from_value::<Vec<BackendRow>>(data).map_err(|_| typed("backend list"))?)
        }
        Request::Status => print_status(&serde_json::from_value(data).map_err(|_| typed("status"))?),
        Request::Stats => print_stats(&serde_json::from_value(data).map_err(|_| typed("stats report"))?),
        Request::Explain { .. } => {
            let e: Explanation = serde_json::from_value(data).map_err(|_| typed("explanation"))?;
            println!("vip:        {}", e.vip.as_deref().unwrap_or("-"));
            println!("backend:    {}", e.backend.as_deref().unwrap_or("-"));
            println!("decided by: {}", e.decided_by);
            println!("why:        {}", e.detail);
        }
        Request::Failover => println!("{}", data.as_str().unwrap_or_default()),
        _ => {
            let report: ApplyReport = serde_json::from_value(data).map_err(|_| typed("change report"))?;
            if report.changes.is_empty() {
                println!("no change");
            }
            for change in &report.changes {
                println!("{change}");
            }
            if report.dry_run {
                println!("(dry run: nothing was changed)");
            }
        }
    }
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header.iter().map(|h| h.to_uppercase()));
    table
}

fn print_vips(rows: &[VipRow]) {
    let mut t = table(&["name", "address", "proto", "mode", "affinity", "ping", "snat", "backends", "serving"]);
    for r in rows {
        t.add_row(vec![
            r.name.clone(),
            r.address.clone(),
            r.protocol.clone(),
            r.mode.clone(),
            r.affinity.clone(),
            if r.answer_ping { "yes" } else { "no" }.into(),
            match (&r.snat, &r.snat_ports) {
                (Some(snat), Some(ports)) => format!("{snat} ports {ports}"),
                (Some(snat), None) => snat.clone(),
                _ => "-".into(),
            },
            r.backends.to_string(),
            r.serving.to_string(),
        ]);
    }
    println!("{t}");
}

fn print_backends(rows: &[BackendRow]) {
    let mut t =
        table(&["vip", "backend", "weight", "backup", "state", "share", "health", "since", "last check", "mac"]);
    for r in rows {
        t.add_row(vec![
            r.vip.clone(),
            r.address.clone(),
            r.weight.to_string(),
            if r.backup { "yes".into() } else { "no".into() },
            r.state.clone(),
            format!("{:.1}%", r.table_share * 100.0),
            r.health.clone().unwrap_or_else(|| "-".into()),
            r.since_seconds.map_or_else(|| "-".into(), |s| format!("{s} s")),
            r.last_check.clone().unwrap_or_else(|| "-".into()),
            r.mac.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
}

fn print_status(s: &StatusReport) {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    for (k, v) in [
        ("instance", s.instance.clone()),
        ("interface", format!("{} ({})", s.interface, s.xdp_mode)),
        ("data plane", s.attachment.clone()),
        ("vips / backends", format!("{} / {}", s.vips, s.backends)),
        ("ring size", s.ring_size.to_string()),
        ("uptime", format!("{} s", s.uptime_seconds)),
        ("config", s.config_file.clone()),
        ("state", s.state_file.clone()),
        ("pins", s.pinned_maps.clone().unwrap_or_else(|| s.pin_dir.clone())),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }

    if let Some(tunnel) = &s.tunnel {
        let sources = format!("{}, {}", tunnel.source_v4, tunnel.source_v6);
        t.add_row(vec!["tunnels".into(), format!("from {sources}; GUE port {}; MTU {}", tunnel.gue_port, tunnel.mtu)]);
    }

    if let Some(v) = &s.vrrp {
        let state = match &v.fault {
            Some(fault) => format!("{} ({fault})", v.state),
            None => v.state.clone(),
        };
        t.add_row(vec!["vrrp".into(), format!("vrid {} priority {}: {state}", v.vrid, v.priority)]);
        if !v.errors.is_empty() {
            t.add_row(vec!["vrrp errors".into(), v.errors.join("; ")]);
        }
        t.add_row(vec!["vrrp master".into(), v.master.clone().unwrap_or_else(|| "unknown".into())]);
        t.add_row(vec!["vrrp addresses".into(), v.addresses.join(" ")]);
        t.add_row(vec!["peer".into(), format!("{}: {}", v.peer, v.sync)]);
        t.add_row(vec!["state digest".into(), v.digest.clone()]);
    }
    if let Some(b) = &s.bgp {
        t.add_row(vec!["bgp".into(), format!("neighbor {}: {}", b.neighbor, b.session)]);
        let announced = if b.announced.is_empty() { "nothing".into() } else { b.announced.join(" ") };
        t.add_row(vec!["bgp announces".into(), announced]);
    }
    for down in &s.down {
        t.add_row(vec!["backend down".into(), format!("{} {}: {}", down.vip, down.address, down.reason)]);
    }
    println!("{t}");
    for warning in &s.warnings {
        println!("WARNING: {warning}");
    }
}

/// `lb stats --watch`: the stats screen, redrawn in place.
async fn watch_stats(instance: &str, interval: std::time::Duration, count: Option<u64>, json: bool) -> Result<()> {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    let mut shown = 0;
    loop {
        let data = api::call(instance, &Request::Stats).await?;
        if json {
            // One report per line, for scripts.
            println!("{}", serde_json::to_string(&data)?);
            shown += 1;
            if count.is_some_and(|count| shown >= count) {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
            continue;
        }
        let report: StatsReport =
            serde_json::from_value(data).map_err(|_| anyhow!("the daemon's answer is not a stats report"))?;
        if terminal {
            print!("\x1b[H\x1b[2J"); // home, clear: redraw in place
        } else if shown > 0 {
            println!();
        }
        println!("lb stats, every {} (Ctrl-C to stop)\n", humantime::format_duration(interval));
        print_stats(&report);
        shown += 1;
        if count.is_some_and(|count| shown >= count) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

fn print_stats(s: &StatsReport) {
    let mut t = table(&["vip", "backend", "packets", "bytes", "new flows", "pps", "bit/s", "flows/s"]);
    let row = |vip: &str, backend: &str, r: &TrafficRow| {
        vec![
            vip.to_string(),
            backend.to_string(),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.new_flows.to_string(),
            format!("{:.0}", r.packets_per_second),
            format!("{:.0}", r.bits_per_second),
            format!("{:.0}", r.new_flows_per_second),
        ]
    };
    for vip in &s.vips {
        t.add_row(row(&vip.name, "(all)", &vip.traffic));
        for (backend, traffic) in &vip.backends {
            t.add_row(row("", backend, traffic));
        }
    }
    println!("{t}");
    let mut reasons = table(&["verdict reason", "packets"]);
    for (reason, count) in s.reasons.iter().filter(|(_, n)| *n > 0) {
        reasons.add_row(vec![reason.clone(), count.to_string()]);
    }
    if let Some(errors) = s.xdp_tx_errors {
        // Not a verdict: frames the program sent back out and the driver then dropped.
        reasons.add_row(vec!["xdp_tx_errors (driver)".into(), errors.to_string()]);
    }
    if let Some(lost) = s.nat_flows_lost {
        // Not a verdict either: new NAT flows the standby will not know (the ring was full).
        reasons.add_row(vec!["nat_flows_lost (ring full)".into(), lost.to_string()]);
    }
    println!("\n{reasons}");
    if s.flood.threshold == 0 {
        println!("\nflood detection: off (daemon.flood_new_flows = 0)");
    } else {
        let now = if s.flood.active {
            "FLOOD: DSR/tunnel VIPs record no new flows, NAT half-open ports freed sooner"
        } else {
            "no flood"
        };
        println!(
            "\nflood detection: {now}; busiest CPU {} new flows/s (threshold {}/s); floods since start: {}",
            s.flood.busiest_cpu_rate, s.flood.threshold, s.flood.floods
        );
    }
    let t = &s.tables;
    if t.sweeps > 0 {
        println!(
            "\nconnection tables: {} connections and {} NAT ports of {} each ({}% full); swept {} times, {} connections and {} NAT ports removed, last pass {:.1} ms",
            t.connections,
            t.nat_entries,
            t.capacity,
            t.fullest_percent(),
            t.sweeps,
            t.removed_connections,
            t.removed_nat_entries,
            t.last_sweep_micros as f64 / 1000.0
        );
    }
    if let Some(error) = &t.sweep_error {
        println!("\nconnection tables: NOT SWEPT (they fill up, then refuse new NAT flows): {error}");
    }
    if s.flow_events.iter().any(|(_, n)| *n > 0) {
        let mut events = table(&["connection-table event", "count"]);
        for (event, count) in s.flow_events.iter().filter(|(_, n)| *n > 0) {
            events.add_row(vec![event.clone(), count.to_string()]);
        }
        println!("\n{events}");
    }
}

/// What `lb decap attach` did, in a sentence or two.
pub fn print_decap_attached(interface: &str, done: &DecapAttached) {
    let gue = |port: u16| if port == 0 { "GUE off (IPIP only)".to_string() } else { format!("GUE on UDP port {port}") };
    match &done.how {
        DecapAttach::Fresh => println!("{interface}: decapsulation attached, {}", gue(done.gue_port)),
        DecapAttach::Replaced { stale } => {
            println!("{interface}: decapsulation attached anew ({stale}), {}", gue(done.gue_port))
        }
        DecapAttach::Already => println!("{interface}: decapsulation is attached already"),
        DecapAttach::Upgraded { counters_kept } => println!(
            "{interface}: decapsulation was attached with another build's program: replaced in place{}",
            if *counters_kept { "" } else { " (its counters start again)" }
        ),
    }
    match done.previous_gue_port {
        Some(previous) if previous != done.gue_port => {
            println!("{interface}: {} (was: {})", gue(done.gue_port), gue(previous))
        }
        Some(_) if done.how == DecapAttach::Already => println!("{interface}: {}", gue(done.gue_port)),
        _ => {}
    }
    println!("pinned in {}", done.pin_dir.display());
}

/// `lb decap status`: one block per interface, counters that moved.
pub fn print_decap_status(interfaces: &[DecapStatus]) {
    if interfaces.is_empty() {
        println!("no interface of this network namespace has decapsulation attached (`lb decap attach`)");
        return;
    }
    for (i, s) in interfaces.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let mut t = Table::new();
        t.load_preset(NOTHING);
        let state = match &s.xdp_mode {
            Some(mode) => format!("{} ({mode} XDP, program {})", s.state, s.program_id.unwrap_or(0)),
            None => s.state.clone(),
        };
        let gue = if s.gue_port == 0 { "off (IPIP only)".to_string() } else { format!("UDP port {}", s.gue_port) };
        for (k, v) in [("interface", s.interface.clone()), ("state", state), ("gue", gue), ("pins", s.pin_dir.clone())]
        {
            t.add_row(vec![k.to_string(), v]);
        }
        println!("{t}");
        let mut counters = table(&["verdict", "packets"]);
        for verdict in lb_common::decap::DecapVerdict::ALL {
            let packets = s.counters.get(verdict.name()).copied().unwrap_or(0);
            counters.add_row(vec![verdict.name().to_string(), packets.to_string()]);
        }
        println!("\n{counters}");
        for warning in &s.warnings {
            println!("WARNING: {warning}");
        }
    }
}
