//! One bulk TCP upload through a tunnelled VIP (`ipip`, `gue`) against the same upload straight
//! to the backend's own address with no XDP program on the path, in the routed test network
//! (`lb_tests::routed`: client → router → load balancer → router → backend). The upload is the
//! direction that crosses the load balancer and the tunnel; answers go straight back.
//!
//! Usage: tunnel-throughput [MIB] [RUNS]. Prints a Markdown table (median of the runs).

use anyhow::{Context, Result, bail};
use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::routed::{RoutedLab, vip};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const PORT: u16 = 9000;
const CHUNK: usize = 256 * 1024;

/// Counts what each connection sends until it closes its side, then answers the count.
fn sink(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = vec![0u8; CHUNK];
            let mut total: u64 = 0;
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = stream.write_all(format!("{total}\n").as_bytes());
        });
    }
}

/// Uploads `bytes` to `to`; returns the seconds from connect to the receiver's count.
fn upload(to: SocketAddr, bytes: u64) -> Result<f64> {
    let started = Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).with_context(|| format!("connect {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let chunk = vec![0x5au8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let received: u64 = line.trim().parse().with_context(|| format!("receiver answered {line:?}"))?;
    if received != bytes {
        bail!("{to}: the receiver got {received} of {bytes} bytes");
    }
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let runs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let bytes = mib << 20;
    let vips = [("ipip", vip(false, 1)), ("gue", vip(false, 2))];
    let addresses: Vec<IpAddr> = vips.iter().map(|v| v.1).collect();
    let mut lab = RoutedLab::new(&addresses)?;
    let backend = lab.backends[0].addr(false);
    let mut config = "[daemon]\ninterface = \"eth0\"\ninstance = \"{instance}\"\nring_size = 1021\nmax_vips = 4\nmax_conns = 65536\n".to_string();
    for (mode, address) in &vips {
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{mode}\"\naddress = \"{}\"\nprotocol = \"tcp\"\nmode = \"{mode}\"\n\n[[vip.backend]]\naddress = \"{}\"\n",
            SocketAddr::new(*address, PORT),
            SocketAddr::new(backend, PORT)
        ));
    }
    // The receiver on the backend: its own address and the VIPs on its loopback.
    let listener = lab.backends[0].ns.enter(|| TcpListener::bind(("::", PORT)))??;
    std::thread::spawn(move || sink(listener));

    println!("# One bulk TCP upload: through a tunnelled VIP, and straight to the backend");
    println!(
        "{mib} MiB per upload, median of {runs}; client → router → load balancer (XDP) → router → backend (lb decap)"
    );
    println!();
    println!("| path | MB/s | Gbit/s | seconds |");
    println!("|---|---:|---:|---:|");
    let measure = |lab: &RoutedLab, to: SocketAddr| -> Result<f64> {
        let mut seconds = lab.client.enter(|| (0..runs).map(|_| upload(to, bytes)).collect::<Result<Vec<f64>>>())??;
        seconds.sort_by(f64::total_cmp);
        Ok(seconds[runs / 2])
    };
    let row = |path: &str, seconds: f64| {
        let rate = bytes as f64 / seconds;
        println!("| {path} | {:.0} | {:.2} | {seconds:.2} |", rate / 1e6, rate * 8.0 / 1e9);
    };
    // No XDP program on the path: the backend's own address, the decapsulation detached; first
    // straight through the router, then through the load balancer's kernel as a router would
    // send it (the VIP's path, without XDP), before the daemon attaches.
    lab.backends[0].detach_decap()?;
    row("straight to the backend's address, no XDP", measure(&lab, SocketAddr::new(backend, PORT))?);
    lab.route_through_lb(backend, true)?;
    row("through the load balancer's kernel (IP forwarding), no XDP", measure(&lab, SocketAddr::new(backend, PORT))?);
    lab.route_through_lb(backend, false)?;
    lab.backends[0].attach_decap()?;
    let daemon = LbDaemon::start(&lab.lb, &unique_instance(), &config)?;
    for (mode, address) in &vips {
        row(&format!("through the {mode} VIP (lb + lb decap)"), measure(&lab, SocketAddr::new(*address, PORT))?);
    }
    let forwarded = daemon.reason_count("tx_forward")?;
    println!("\nthe load balancer forwarded {forwarded} packets into the tunnels");
    Ok(())
}
