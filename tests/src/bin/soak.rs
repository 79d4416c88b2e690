//! `cargo xtask soak`: the load balancer under steady mixed traffic for a long time (30 minutes by
//! default), with backend churn, health flaps and a daemon restart every few minutes. Reports,
//! over time, the requests that failed (and what was happening then), the daemon's memory and
//! open file descriptors, and the connection-table entries; writes the report to
//! `bench/results/<date>-soak.md`.
//!
//! Usage: soak [--minutes N] [--out FILE]

use anyhow::{Context, Result, bail};
use lb_tests::daemon::{LbDaemon, table_entries, unique_instance};
use lb_tests::service::{tcp_request, udp_stream};
use lb_tests::topology::{SERVICE_PORT, SNAT_V4, Topology, VIP_V4};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BACKENDS: usize = 4;
/// Something happens every this often, in turn: a health flap, a backend removed and added
/// back, a drain and undrain.
const EVENT_EVERY: Duration = Duration::from_secs(20);
/// And the daemon restarts this often.
const RESTART_EVERY: Duration = Duration::from_secs(180);
/// A report row this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(1);

fn nat_vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), 80)
}
fn dsr_vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), SERVICE_PORT)
}
fn udp_vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), 53)
}

fn config(topology: &Topology) -> String {
    let mut config =
        "[daemon]\ninterface = \"eth0\"\ninstance = \"{instance}\"\nmax_vips = 8\nmax_conns = 262144\n".to_string();
    let check = "{ kind = \"tcp\", interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2 }";
    for (name, address, protocol, mode) in [
        ("web-nat", nat_vip(), "tcp", "nat"),
        ("web-dsr", dsr_vip(), "tcp", "dsr"),
        ("dns-nat", udp_vip(), "udp", "nat"),
    ] {
        let snat = if mode == "nat" { format!("snat = \"{SNAT_V4}\"\n") } else { String::new() };
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nprotocol = \"{protocol}\"\nmode = \"{mode}\"\n{snat}check = {check}\n"
        ));
        for host in &topology.backends {
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\n", host.v4));
        }
    }
    config
}

/// Requests of one kind: answered and failed, since the start and since the last report row.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn record(&self, ok: bool) {
        if ok { &self.ok } else { &self.failed }.fetch_add(1, Ordering::Relaxed);
    }
    fn read(&self) -> (u64, u64) {
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

struct Traffic {
    nat: Tally,
    dsr: Tally,
    udp: Tally,
    stop: AtomicBool,
}

/// One report row.
struct Row {
    at: Duration,
    requests: u64,
    failed: u64,
    rss_kib: u64,
    fds: usize,
    conns: usize,
    nat_entries: usize,
    events: String,
}

fn main() -> Result<()> {
    let mut minutes: f64 = 30.0;
    let mut out: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--minutes" => minutes = args.next().context("--minutes needs a number")?.parse().context("--minutes")?,
            "--out" => out = Some(args.next().context("--out needs a file")?.into()),
            other => bail!("unknown argument {other:?} (usage: soak [--minutes N] [--out FILE])"),
        }
    }
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let mut topology = Topology::new(BACKENDS, true)?;
    let mut daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config(&topology))?;
    daemon.wait_none_down(Duration::from_secs(15))?;
    println!("soak: {minutes} min of TCP (NAT and DSR) and UDP (NAT) traffic through {} backends", BACKENDS);
    println!(
        "soak: every {} s a health flap, a backend removed and re-added, or a drain; a daemon restart every {} s",
        EVENT_EVERY.as_secs(),
        RESTART_EVERY.as_secs()
    );

    let traffic = Arc::new(Traffic {
        nat: Tally::default(),
        dsr: Tally::default(),
        udp: Tally::default(),
        stop: AtomicBool::new(false),
    });
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        let client = &topology.client;
        for (vip, tally_of) in [(nat_vip(), 0), (dsr_vip(), 1)] {
            let traffic = traffic.clone();
            scope.spawn(move || {
                client.enter(|| {
                    let tally = if tally_of == 0 { &traffic.nat } else { &traffic.dsr };
                    while !traffic.stop.load(Ordering::Relaxed) {
                        tally.record(tcp_request(vip, TIMEOUT).is_ok());
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            });
        }
        {
            let traffic = traffic.clone();
            scope.spawn(move || {
                client.enter(|| {
                    while !traffic.stop.load(Ordering::Relaxed) {
                        // 100 datagrams over 4 sockets in a second, answers counted.
                        let (sent, answered) = udp_stream(udp_vip(), 100, Duration::from_millis(10), 4);
                        for i in 0..sent {
                            traffic.udp.record(i < answered);
                        }
                    }
                })
            });
        }

        // The traffic threads stop however the run ends, or the scope would wait for them forever.
        let run = (|| -> Result<()> {
            let mut next_event = started + EVENT_EVERY;
            let mut next_restart = started + RESTART_EVERY;
            let mut next_row = started + SAMPLE_EVERY;
            let mut event_number = 0usize;
            let mut last = (0u64, 0u64);
            let mut flapped: Option<(usize, Instant)> = None;
            while started.elapsed() < duration {
                std::thread::sleep(Duration::from_millis(100));
                let now = Instant::now();
                if let Some((backend, since)) = flapped
                    && now.duration_since(since) > Duration::from_secs(3)
                {
                    topology.backends[backend].start_server()?;
                    flapped = None;
                }
                if now >= next_restart {
                    next_restart += RESTART_EVERY;
                    let took = Instant::now();
                    daemon.terminate()?;
                    daemon.restart()?;
                    note(&events, &started, format!("daemon restarted in {:.2} s", took.elapsed().as_secs_f64()));
                } else if now >= next_event {
                    next_event += EVENT_EVERY;
                    let backend = event_number % BACKENDS;
                    let address = format!("{}:{SERVICE_PORT}", topology.backends[backend].v4);
                    let what = match event_number % 3 {
                        0 => {
                            topology.backends[backend].stop_server();
                            flapped = Some((backend, now));
                            format!("be{} server stopped for 3 s", backend + 1)
                        }
                        1 => {
                            for vip in ["web-nat", "web-dsr", "dns-nat"] {
                                daemon.ok(&["backend", "del", "--vip", vip, "--address", &address])?;
                                daemon.ok(&["backend", "add", "--vip", vip, "--address", &address])?;
                            }
                            format!("be{} removed and added back", backend + 1)
                        }
                        _ => {
                            daemon.ok(&["backend", "drain", "--vip", "web-nat", "--address", &address])?;
                            std::thread::sleep(Duration::from_secs(2));
                            daemon.ok(&["backend", "undrain", "--vip", "web-nat", "--address", &address])?;
                            format!("be{} drained for 2 s", backend + 1)
                        }
                    };
                    event_number += 1;
                    note(&events, &started, what);
                }
                if now >= next_row {
                    next_row += SAMPLE_EVERY;
                    let totals = [traffic.nat.read(), traffic.dsr.read(), traffic.udp.read()];
                    let requests: u64 = totals.iter().map(|(ok, failed)| ok + failed).sum();
                    let failed: u64 = totals.iter().map(|(_, failed)| failed).sum();
                    let (rss_kib, fds) = process_figures(daemon.pid().context("the daemon runs")?)?;
                    let (conns, nat_entries) = table_entries(&daemon.instance)?;
                    let happened = std::mem::take(&mut *events.lock().expect("events"));
                    let row = Row {
                        at: started.elapsed(),
                        requests: requests - last.0,
                        failed: failed - last.1,
                        rss_kib,
                        fds,
                        conns,
                        nat_entries,
                        events: happened.join("; "),
                    };
                    if row.failed > 0 {
                        failures.push(format!(
                            "{} failed around {:.0} s ({})",
                            row.failed,
                            row.at.as_secs_f64(),
                            row.events
                        ));
                    }
                    println!(
                        "soak: {:>5.0} s  {:>6} requests  {:>3} failed  daemon {:>6} KiB, {:>3} fds  CONNS {:>6}  NAT_REV {:>6}  {}",
                        row.at.as_secs_f64(),
                        row.requests,
                        row.failed,
                        row.rss_kib,
                        row.fds,
                        row.conns,
                        row.nat_entries,
                        row.events
                    );
                    last = (requests, failed);
                    rows.push(row);
                }
            }
            Ok(())
        })();
        traffic.stop.store(true, Ordering::Relaxed);
        run
    })?;
    if let Some((backend, _)) = topology.backends.iter().enumerate().find(|(_, b)| !b.server_running()) {
        topology.backends[backend].start_server()?;
    }
    let report = render(&rows, &traffic, minutes, &failures);
    println!("\n{report}");
    let out = out.unwrap_or_else(|| {
        let stamp = std::process::Command::new("date")
            .arg("+%Y-%m-%d-%H%M")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        std::path::PathBuf::from(format!("bench/results/{stamp}-soak.md"))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    println!("soak: report written to {}", out.display());
    drop(daemon);
    Ok(())
}

fn note(events: &Mutex<Vec<String>>, started: &Instant, what: String) {
    println!("soak: {:>5.0} s  {what}", started.elapsed().as_secs_f64());
    events.lock().expect("events").push(what);
}

/// The daemon's resident memory (KiB) and open file descriptors.
fn process_figures(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

fn render(rows: &[Row], traffic: &Traffic, minutes: f64, failures: &[String]) -> String {
    let mut out = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(out, "# Soak run: {minutes} minutes (kernel {})\n", kernel.trim());
    let _ = writeln!(out, "| VIP | requests | failed |\n|---|---:|---:|");
    for (name, tally) in [
        ("web-nat (TCP, nat)", &traffic.nat),
        ("web-dsr (TCP, dsr)", &traffic.dsr),
        ("dns-nat (UDP, nat)", &traffic.udp),
    ] {
        let (ok, failed) = tally.read();
        let _ = writeln!(out, "| {name} | {} | {failed} |", ok + failed);
    }
    let _ = writeln!(
        out,
        "\n| time | requests | failed | daemon RSS KiB | fds | CONNS | NAT_REV | events |\n|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {:.0} s | {} | {} | {} | {} | {} | {} | {} |",
            r.at.as_secs_f64(),
            r.requests,
            r.failed,
            r.rss_kib,
            r.fds,
            r.conns,
            r.nat_entries,
            r.events
        );
    }
    let rss: Vec<u64> = rows.iter().map(|r| r.rss_kib).collect();
    let fds: Vec<usize> = rows.iter().map(|r| r.fds).collect();
    if let (Some(min), Some(max)) = (rss.iter().min(), rss.iter().max()) {
        let _ = writeln!(
            out,
            "\nDaemon RSS {min}-{max} KiB, open fds {}-{} over the run.",
            fds.iter().min().unwrap_or(&0),
            fds.iter().max().unwrap_or(&0)
        );
    }
    if failures.is_empty() {
        let _ = writeln!(out, "No request failed.");
    } else {
        let _ = writeln!(out, "\nFailed requests:\n");
        for f in failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    out
}
