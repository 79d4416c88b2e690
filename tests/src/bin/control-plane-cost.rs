//! Control-plane costs: building Maglev tables, and publishing one whole to the data plane
//! (inactive ring written through the memory mapping, then one VIP update); the daemon's sweep
//! of the connection tables (`lb::dataplane::Sweeper`), over full tables.
//!
//! Usage: control-plane-cost [RUNS]   (default 5; medians are printed)

use anyhow::Result;
use lb::dataplane::{Dataplane, DataplaneSizes, VipForwarding};
use lb_common::maglev::{MaglevBackend, build_table};
use lb_common::maps::{DEFAULT_RING_SIZE, MODE_DSR};
use lb_tests::harness::{backend, maglev_key, vip_key};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn members(n: u32) -> Vec<MaglevBackend> {
    (0..n).map(|i| MaglevBackend { index: i, key: maglev_key(i), weight: 1 + i % 3 }).collect()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() -> Result<()> {
    let runs: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(5);
    println!("# Control-plane cost (median of {runs} runs, M = {DEFAULT_RING_SIZE})\n");
    println!("| backends | Maglev table build | publish (ring + VIP update) |");
    println!("|---:|---:|---:|");
    let mut dataplane = Dataplane::load(DataplaneSizes { max_vips: 4, ring_size: DEFAULT_RING_SIZE, max_conns: 1024 })?;
    let vip: SocketAddr = "10.0.0.10:80".parse()?;
    for i in 0..10_000u32 {
        let addr: SocketAddr = format!("10.{}.{}.{}:80", 1 + i / 65536, (i / 256) % 256, i % 256).parse()?;
        dataplane.set_backend(i, &backend(addr, [2, 0, 0, 0, 0, 1]))?;
    }
    let forwarding = VipForwarding {
        vip_index: 0,
        mode: MODE_DSR,
        snat_addr: [0; 16],
        snat_port_min: 1,
        snat_port_max: 2,
        client_affinity: None,
        observe: false,
    };
    for n in [10u32, 100, 1_000, 10_000] {
        let list = members(n);
        let mut builds = Vec::new();
        let mut publishes = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            let table = build_table(&list, DEFAULT_RING_SIZE)?;
            builds.push(started.elapsed());
            let started = Instant::now();
            dataplane.publish_vip(&vip_key(vip, 6), &forwarding, &table)?;
            publishes.push(started.elapsed());
        }
        println!(
            "| {n} | {:.2} ms | {:.3} ms |",
            median(builds).as_secs_f64() * 1e3,
            median(publishes).as_secs_f64() * 1e3
        );
    }
    sweep_cost(runs)
}

/// One sweep pass over tables of `n` flows (half DSR, half NAT with their ports): with nothing
/// to remove (what a daemon pays every second), and removing every entry.
fn sweep_cost(runs: usize) -> Result<()> {
    use lb_common::maps::{ConnState, FlowKey, NatReverse};
    use lb_common::nat::TCP_IDLE;
    const CAPACITY: u32 = 1 << 20;
    println!("\n# Connection-table sweep (median of {runs} passes; tables of {CAPACITY} entries each)\n");
    println!(
        "| flows (connections + NAT ports) | pass, nothing to remove | per entry | pass removing all | per entry |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let mut dataplane = Dataplane::load(DataplaneSizes { max_vips: 4, ring_size: 251, max_conns: CAPACITY })?;
    let sweeper = dataplane.sweeper()?;
    for n in [0u32, 100_000, 1_000_000] {
        let now = lb::dataplane::clock_ticks();
        let fill = |dataplane: &mut Dataplane| -> Result<usize> {
            for i in 0..n {
                let flow = FlowKey {
                    src: lb::planner::addr16(std::net::IpAddr::from([
                        10,
                        1 + (i >> 16) as u8,
                        (i >> 8) as u8,
                        i as u8,
                    ])),
                    dst: lb::planner::addr16("10.0.0.10".parse()?),
                    sport: (1024 + i % 60000) as u16,
                    dport: 80u16.to_be(),
                    proto: 6,
                    family: lb_common::maps::FAMILY_V4,
                    _pad: [0; 2],
                };
                let nat = i % 2 == 1;
                let snat_port = if nat { (i / 2 % 65536) as u16 } else { 0 };
                dataplane.insert_connection(
                    &flow,
                    &ConnState { backend: i % 64, snat_port, last_seen: now, ..Default::default() },
                )?;
                if nat {
                    let reply = FlowKey { src: flow.dst, dst: flow.src, sport: flow.dport, dport: snat_port, ..flow };
                    let reverse = NatReverse {
                        client_addr: flow.src,
                        vip_addr: flow.dst,
                        client_port: flow.sport,
                        vip_port: flow.dport,
                        last_seen: now,
                        ..Default::default()
                    };
                    dataplane.insert_nat_reverse(&reply, &reverse)?;
                }
            }
            Ok(n as usize + n as usize / 2)
        };
        let entries = fill(&mut dataplane)?;
        let mut idle = Vec::new();
        for _ in 0..runs {
            let swept = sweeper.sweep(now)?;
            anyhow::ensure!(swept.removed_connections == 0 && swept.connections == n as usize, "{swept:?}");
            idle.push(Duration::from_micros(swept.micros));
        }
        let mut removing = Vec::new();
        for run in 0..runs.min(3) {
            if run > 0 {
                fill(&mut dataplane)?;
            }
            let swept = sweeper.sweep(now.wrapping_add(2 * TCP_IDLE))?;
            anyhow::ensure!(swept.removed_connections == n as usize, "{swept:?}");
            removing.push(Duration::from_micros(swept.micros));
        }
        let (idle, removing) = (median(idle), median(removing));
        // Empty tables: the pass is the walk over their buckets alone.
        let per_entry = |d: Duration| {
            if entries == 0 { "-".to_string() } else { format!("{:.0} ns", d.as_secs_f64() * 1e9 / entries as f64) }
        };
        println!(
            "| {n} + {} | {:.1} ms | {} | {:.1} ms | {} |",
            n / 2,
            idle.as_secs_f64() * 1e3,
            per_entry(idle),
            removing.as_secs_f64() * 1e3,
            per_entry(removing)
        );
    }
    println!("\nThe daemon sweeps once a second ({:?}) on a thread of its own.", lb::dataplane::SWEEP_EVERY);
    Ok(())
}
