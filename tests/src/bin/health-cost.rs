//! CPU used by the health-check engine: N backends checked at a 1 s interval for a while,
//! against a few local servers on loopback (each checked many times, as distinct backends).
//!
//! Usage: health-cost [BACKENDS] [SECONDS] [KIND]   (default 5000, 20, tcp; kind tcp | http | icmp)
//! Prints the engine's CPU time per second of wall time (the servers run in other processes).

use anyhow::{Result, bail};
use lb::health::HealthEngine;
use lb::model::{BackendSpec, CheckKind, CheckSpec, DesiredState, Mode, Protocol, VipSpec};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVERS: u16 = 20;
const FIRST_PORT: u16 = 31000;

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let backends: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5000);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let kind = match args.next().as_deref().unwrap_or("tcp") {
        "tcp" => CheckKind::Tcp,
        "icmp" => CheckKind::Icmp,
        "http" => CheckKind::Http {
            method: "GET".into(),
            path: "/".into(),
            host: None,
            expect_status: (200, 299),
            body_contains: None,
        },
        other => bail!("unknown kind {other}"),
    };
    let server = std::env::current_exe()?.parent().expect("target dir").join("name-server");
    let _servers = Servers(
        (0..SERVERS)
            .map(|i| {
                Command::new(&server)
                    .args([format!("s{i}"), (FIRST_PORT + i).to_string()])
                    .stdout(Stdio::null())
                    .spawn()
            })
            .collect::<Result<_, _>>()?,
    );
    std::thread::sleep(Duration::from_millis(300));

    // Backends 127.0.x.y:port, spread over the servers' ports: all on loopback.
    let list: Vec<BackendSpec> = (0..backends)
        .map(|i| {
            let address: SocketAddr = format!(
                "127.{}.{}.{}:{}",
                1 + i / 65536,
                (i / 256) % 256,
                1 + i % 250,
                FIRST_PORT + (i % SERVERS as u32) as u16
            )
            .parse()
            .unwrap();
            BackendSpec { address, weight: 1, backup: false, drained: false, mac: None, check: None }
        })
        .collect();
    let check = CheckSpec {
        kind,
        port: None,
        initial_up: false,
        via_vip: false,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
    };
    let state = DesiredState {
        vips: vec![VipSpec {
            name: "bench".into(),
            address: "10.0.0.10:80".parse()?,
            protocol: Protocol::Tcp,
            mode: Mode::Nat,
            snat: Some("10.0.0.2".parse()?),
            snat_ports: (1024, 65535),
            affinity: Default::default(),
            affinity_prefix: None,
            answer_ping: true,
            check: Some(check),
            backends: list.clone(),
        }],
    };
    // One runtime, as in the daemon.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (events, mut transitions) = tokio::sync::mpsc::unbounded_channel();
    let mut engine = HealthEngine::new(runtime.handle().clone(), events);
    engine.sync(&state, &|_, _| lb::health::Health::Down, &|_, _| None);
    // Let every checker start, then measure.
    std::thread::sleep(Duration::from_secs(3));
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let mut ups = 0;
    while let Ok(t) = transitions.try_recv() {
        ups += (t.health == lb::health::Health::Up) as u32;
    }
    let checks: u64 = list
        .iter()
        .filter_map(|b| engine.status(&lb::planner::backend_id(&state.vips[0], b.address)))
        .map(|s| s.checks)
        .sum();
    println!(
        "{backends} backends, {} checks at a 1 s interval: {:.1}% of one core ({:.2} s CPU in {:.1} s), {checks} checks done, {ups} backends came up",
        state.vips[0]
            .check
            .as_ref()
            .map(|c| format!("{:?}", c.kind))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or(""),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        wall.as_secs_f64()
    );
    drop(engine);
    Ok(())
}

/// The local servers, killed however the benchmark ends.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for server in &mut self.0 {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}
