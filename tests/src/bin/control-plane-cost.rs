//! Control-plane costs: building Maglev tables, and publishing one whole to the data plane
//! (inactive ring written through the memory mapping, then one VIP update).
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
    Ok(())
}
