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
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const VIP_PORT: u16 = 80;

/// (completed, failed) exchanges in `seconds`, from `threads` client threads in the client namespace.
fn measure(topology: &Topology, vip: SocketAddr, seconds: f64, threads: usize) -> Result<(u64, u64)> {
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                topology.client.enter(|| {
                    while Instant::now() < deadline {
                        match exchange(vip) {
                            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            });
        }
    });
    Ok((done.into_inner(), failed.into_inner()))
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
    topology.client.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535"])?;

    let mut rows = Vec::new();
    for mode in ["nat", "dsr"] {
        let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &lb_config(&topology, mode))?;
        let port = if mode == "dsr" { SERVICE_PORT } else { VIP_PORT };
        let vip = SocketAddr::new(VIP_V4.into(), port);
        measure(&topology, vip, 0.5, threads)?; // warm-up: neighbours, caches
        let (done, failed) = measure(&topology, vip, seconds, threads)?;
        rows.push((format!("lb (XDP, {mode})"), done, failed));
        drop(daemon);
    }

    // HAProxy terminates the VIP in the balancer's own stack.
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
    let (done, failed) = measure(&topology, vip, seconds, threads)?;
    rows.push(("HAProxy 2.6, mode tcp, roundrobin".into(), done, failed));
    drop(haproxy);
    let _ = std::fs::remove_dir_all(&dir);

    println!("# New TCP connections per second (connect, one line each way, close)\n");
    println!(
        "{threads} client threads for {seconds} s each; 2 backends running name-server; client, balancer and backends share the machine's cores.\n"
    );
    println!("| balancer | connections/s | failed |\n|---|---:|---:|");
    for (name, done, failed) in &rows {
        println!("| {name} | {:.0} | {failed} |", *done as f64 / seconds);
    }
    let haproxy_cps = rows[2].1 as f64;
    println!();
    for row in &rows[..2] {
        println!("{} / HAProxy = {:.2}x", row.0, row.1 as f64 / haproxy_cps.max(1.0));
    }
    Ok(())
}
