//! New TCP connections per second through a load balancer: `lb` (XDP, nat and dsr) against
//! HAProxy in `mode tcp`, same namespaces, same backends, same client.
//!
//! Each connection is one short exchange (connect, a line, the backend's name, close), made by
//! client threads for a fixed time. The backends are the tests' `name-server` (a thread per
//! connection), on the same 2 cores as everything else: the figure is the capacity of client +
//! balancer + backends on this machine, and the ratio shows what the balancer's share costs.
//!
//! Usage: tcp-cps [SECONDS] [THREADS]   (default 5 s, 4 client threads); prints a Markdown table.

use anyhow::{Context, Result};
use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::topology::{SERVICE_PORT, Topology, VIP_V4};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const VIP_PORT: u16 = 80;

/// What one measurement saw.
struct Measured {
    done: u64,
    /// Failed exchanges by error kind ("timed out", "connection refused", …).
    failed: BTreeMap<String, u64>,
    /// SYNs the listening sockets (backends, and HAProxy's) dropped meanwhile: a full accept
    /// queue, the usual cause of a timed-out connect at this rate.
    listen_drops: u64,
}

impl Measured {
    fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    fn failed_text(&self) -> String {
        let kinds: Vec<String> = self.failed.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
        if kinds.is_empty() { "0".into() } else { format!("{} ({})", self.failed_total(), kinds.join(", ")) }
    }
}

/// Exchanges in `seconds` from `threads` client threads in the client namespace.
fn measure(topology: &Topology, vip: SocketAddr, seconds: f64, threads: usize) -> Result<Measured> {
    let drops_before = listen_drops(topology)?;
    let done = AtomicU64::new(0);
    let failed = Mutex::new(BTreeMap::<String, u64>::new());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                topology.client.enter(|| {
                    while Instant::now() < deadline {
                        match exchange(vip) {
                            Ok(()) => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(error) => *failed.lock().unwrap().entry(error_kind(&error)).or_default() += 1,
                        }
                    }
                })
            });
        }
    });
    let listen_drops = listen_drops(topology)? - drops_before;
    Ok(Measured { done: done.into_inner(), failed: failed.into_inner().unwrap(), listen_drops })
}

fn error_kind(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".into(),
        kind => kind.to_string(),
    }
}

/// TcpExtListenDrops summed over the backends' and the balancer's namespaces.
fn listen_drops(topology: &Topology) -> Result<u64> {
    let mut total = 0;
    for ns in topology.backends.iter().map(|b| &b.ns).chain([&topology.lb]) {
        // /proc/net is the reader's namespace: read it from inside.
        let text = String::from_utf8(ns.exec(&["cat", "/proc/net/netstat"])?.stdout)?;
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        let [names, values] = lines.as_slice() else { anyhow::bail!("no TcpExt lines in /proc/net/netstat") };
        let drops = names.split_whitespace().zip(values.split_whitespace()).find(|(n, _)| *n == "ListenDrops");
        total += drops.context("no ListenDrops in /proc/net/netstat")?.1.parse::<u64>()?;
    }
    Ok(total)
}

fn exchange(vip: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&vip, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    (&stream).write_all(b"hi\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer"));
    }
    Ok(())
}

fn lb_config(topology: &Topology, mode: &str) -> String {
    let port = if mode == "dsr" { SERVICE_PORT } else { VIP_PORT };
    let snat = if mode == "nat" { "snat = \"10.0.0.3\"\n" } else { "" };
    let mut config = format!(
        "[daemon]\ninterface = \"eth0\"\ninstance = \"{{instance}}\"\nmax_vips = 4\nmax_conns = 1048576\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP_V4}:{port}\"\nprotocol = \"tcp\"\nmode = \"{mode}\"\n{snat}"
    );
    for backend in &topology.backends {
        config.push_str(&format!("\n[[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\n", backend.v4));
    }
    config
}

fn haproxy_config(topology: &Topology) -> String {
    let mut config = format!(
        "global\n  maxconn 5000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
         frontend vip\n  bind {VIP_V4}:{VIP_PORT}\n  default_backend pool\nbackend pool\n  balance roundrobin\n"
    );
    for (i, backend) in topology.backends.iter().enumerate() {
        config.push_str(&format!("  server be{} {}:{SERVICE_PORT}\n", i + 1, backend.v4));
    }
    config
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map_or(Ok(5.0), |a| a.parse()).context("SECONDS")?;
    let threads: usize = args.next().map_or(Ok(4), |a| a.parse()).context("THREADS")?;
    // DSR needs the VIP on the backends' loopback; NAT and HAProxy address the backends directly.
    let topology = Topology::new(2, true)?;
    // Short connections leave the client's ports in TIME_WAIT: reuse them, use all of them.
    let tune = ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535"];
    topology.client.exec(&tune)?;

    let mut rows = Vec::new();
    for mode in ["nat", "dsr"] {
        let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &lb_config(&topology, mode))?;
        let port = if mode == "dsr" { SERVICE_PORT } else { VIP_PORT };
        let vip = SocketAddr::new(VIP_V4.into(), port);
        measure(&topology, vip, 0.5, threads)?; // warm-up: neighbours, caches
        let measured = measure(&topology, vip, seconds, threads)?;
        let stats: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "stats"])?)?;
        let reasons = stats["reasons"].as_array().cloned().unwrap_or_default();
        let no_port = reasons.iter().find(|r| r[0] == "drop_nat_ports").and_then(|r| r[1].as_u64()).unwrap_or(0);
        println!("lb {mode}: {no_port} SYNs dropped for want of a free NAT source port");
        rows.push((format!("lb (XDP, {mode})"), measured));
        drop(daemon);
    }

    // HAProxy terminates the VIP in the balancer's own stack. Its own connections to the
    // backends get the same tuning (an operator running it at this rate tunes it so; without
    // it, HAProxy's rate fell from ~5,000 to ~1,300 connections/s within 30 s as its ports sat in
    // TIME_WAIT). Only now: lb's NAT ports must stay outside the host's local port range.
    topology.lb.exec(&tune)?;
    topology.lb.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
    let dir = std::env::temp_dir().join(format!("lb-bench-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("haproxy.cfg");
    std::fs::write(&config, haproxy_config(&topology))?;
    let mut haproxy = topology.lb.spawn(&["haproxy", "-db", "-f", &config.to_string_lossy()])?;
    let vip = SocketAddr::new(VIP_V4.into(), VIP_PORT);
    let started = Instant::now();
    while topology.client.enter(|| exchange(vip).is_err())? {
        if started.elapsed() > Duration::from_secs(5) || haproxy.child().try_wait()?.is_some() {
            let _ = haproxy.child().kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = haproxy.child().stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
            }
            anyhow::bail!("HAProxy did not answer within 5 s: {}", stderr.trim());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    measure(&topology, vip, 0.5, threads)?;
    rows.push(("HAProxy 2.6, mode tcp, roundrobin".into(), measure(&topology, vip, seconds, threads)?));
    drop(haproxy);
    let _ = std::fs::remove_dir_all(&dir);

    println!("# New TCP connections per second (connect, one line each way, close)\n");
    println!(
        "{threads} client threads for {seconds} s each; 2 backends running name-server; client, balancer and backends share the machine's cores.\n"
    );
    println!("| balancer | connections/s | failed | listen drops |\n|---|---:|---:|---:|");
    for (name, m) in &rows {
        println!("| {name} | {:.0} | {} | {} |", m.done as f64 / seconds, m.failed_text(), m.listen_drops);
    }
    println!(
        "\nA failed exchange is one that took more than 500 ms (connect or answer); listen drops are SYNs the \
         backends' (or HAProxy's) listening sockets dropped meanwhile, whose retransmission comes 1 s later."
    );
    let haproxy_cps = rows[2].1.done as f64;
    println!();
    for (name, m) in &rows[..2] {
        println!("{name} / HAProxy = {:.2}x", m.done as f64 / haproxy_cps.max(1.0));
    }
    Ok(())
}
