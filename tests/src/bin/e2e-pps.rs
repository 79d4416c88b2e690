//! End-to-end forwarding rate: UDP from a packet generator (trafgen, netsniff-ng) through a load
//! balancer to backends, with the same traffic through our XDP program (NAT and DSR) and through
//! the kernel path an operator would otherwise build: nftables `jhash` DNAT + SNAT with conntrack.
//!
//! Topology (one-armed, as the XDP program forwards with XDP_TX): namespace `gen` holds the
//! generator on `g0` and, on the same `g0`, an XDP sink that counts and drops whatever the load
//! balancer sends back; namespace `lb` holds `l0`, the load balancer's side of the veth. The
//! backends' addresses lead back to `g0` (static neighbour entries), so every forwarded packet is
//! counted exactly once. Only loopback-free namespace traffic: nothing leaves the sandbox.
//!
//! veth delivers a frame in the sender's softirq, so generator, balancer and sink all run on the
//! generator's CPU, one after the other: the forwarded rate is the inverse of their summed cost.
//! The same run with a bare MAC swap + XDP_TX in the balancer's place gives the topology's own
//! cost; the CPU time per packet above it is the balancer's own work, the figure a machine that
//! only balances would see.
//!
//! Usage: e2e-pps [PACKETS] [RATE]   (default 1,000,000 per run, paced at 1,000,000 pps); prints
//! a Markdown table. Frames cross veth as skbs (trafgen uses AF_PACKET), so the XDP program pays
//! the skb-to-XDP conversion that a real NIC's driver avoids: these are lower bounds for XDP.

use anyhow::{Context, Result, bail};
use lb::dataplane::{AttachMode, Dataplane, DataplaneSizes, ForwardFloor, Sink, VipForwarding};
use lb_common::maglev::{MaglevBackend, build_table};
use lb_common::maps::{MODE_DSR, MODE_NAT, PROTO_UDP};
use lb_tests::harness::{addr16, backend, maglev_key, vip_key};
use lb_tests::netns::{Netns, veth};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const GEN_IP: &str = "10.0.0.1";
const LB_IP: &str = "10.0.0.2";
const SNAT_IP: &str = "10.0.0.3";
const VIP: &str = "10.0.0.100";
const BACKENDS: [&str; 3] = ["10.0.1.1", "10.0.1.2", "10.0.1.3"];
/// Distinct flows: the generator walks source ports over this range.
const FLOWS: u32 = 64_512;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Balancer {
    /// No balancing: a MAC swap and XDP_TX in the balancer's place, what the topology carries.
    Floor,
    XdpNat,
    XdpDsr,
    Nftables,
}

impl Balancer {
    fn name(self) -> &'static str {
        match self {
            Balancer::Floor => "XDP_TX floor, no balancing (MAC swap)",
            Balancer::XdpNat => "lb (XDP, nat)",
            Balancer::XdpDsr => "lb (XDP, dsr)",
            Balancer::Nftables => "nftables jhash DNAT+SNAT, conntrack",
        }
    }
}

struct Run {
    offered: u64,
    forwarded: u64,
    seconds: f64,
    /// Busy time of all CPUs while the generator ran.
    cpu_seconds: f64,
}

/// Time all CPUs have spent busy so far (user, system, interrupts, softirqs), from /proc/stat.
fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, ..] = ticks[..] else {
        bail!("/proc/stat: short cpu line {line:?}");
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((user + nice + system + irq + softirq) as f64 / per_second)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn rx_packets(ns: &Netns, dev: &str) -> Result<u64> {
    let text = String::from_utf8(ns.exec(&["cat", &format!("/sys/class/net/{dev}/statistics/rx_packets")])?.stdout)?;
    Ok(text.trim().parse()?)
}

/// How full the data plane is while it forwards: extra VIPs beside the one under load, and
/// connection entries of other flows.
#[derive(Clone, Copy)]
struct Load {
    ring_size: u32,
    extra_vips: u32,
    prefilled_conns: u32,
}

const PLAIN: Load = Load { ring_size: 65537, extra_vips: 0, prefilled_conns: 0 };

/// One measurement: a fresh pair of namespaces, the balancer, `packets` frames of `frame_len`.
fn measure(balancer: Balancer, frame_len: usize, packets: u64, rate: u64, load: Load) -> Result<Run> {
    let generator = Netns::new("gen")?;
    let lb_ns = Netns::new("lb")?;
    veth(&generator, "g0", &lb_ns, "l0")?;
    generator.addr("g0", &format!("{GEN_IP}/24"))?;
    lb_ns.addr("l0", &format!("{LB_IP}/24"))?;
    lb_ns.addr("l0", &format!("{SNAT_IP}/24"))?;
    let gen_mac_bytes = generator.mac("g0")?;
    let gen_mac = mac_text(gen_mac_bytes);
    let lb_mac = mac_text(lb_ns.mac("l0")?);
    // Backends sit behind g0 (where the sink counts); the sink drops ARP, so no resolution.
    lb_ns.ip(&["neigh", "replace", GEN_IP, "lladdr", &gen_mac, "dev", "l0", "nud", "permanent"])?;
    lb_ns.ip(&["route", "add", "10.0.1.0/24", "via", GEN_IP, "dev", "l0"])?;
    let sink = generator.enter(|| Sink::attach("g0", AttachMode::Native))??;
    // veth has no queue: when the receiver's ring is full the generator's send fails. A FIFO
    // absorbs that (trafgen uses the qdisc path), and what it cannot hold is counted as loss.
    generator.exec(&["tc", "qdisc", "replace", "dev", "g0", "root", "pfifo", "limit", "10000"])?;

    let _floor = match balancer {
        Balancer::Floor => Some(lb_ns.enter(|| ForwardFloor::attach("l0", AttachMode::Native))??),
        _ => None,
    };
    let _dataplane = match balancer {
        Balancer::Floor => None,
        Balancer::XdpNat | Balancer::XdpDsr => Some(lb_ns.enter(|| -> Result<Dataplane> {
            let mut dataplane = Dataplane::load(DataplaneSizes {
                max_vips: load.extra_vips + 4,
                ring_size: load.ring_size,
                max_conns: (1 << 18) + load.prefilled_conns,
            })?;
            let mac = gen_mac_bytes;
            let mut members = Vec::new();
            for (i, ip) in BACKENDS.iter().enumerate() {
                dataplane.set_backend(i as u32, &backend(SocketAddr::new(ip.parse()?, 0), mac))?;
                members.push(MaglevBackend { index: i as u32, key: maglev_key(i as u32), weight: 1 });
            }
            let mode = if balancer == Balancer::XdpNat { MODE_NAT } else { MODE_DSR };
            let forwarding = VipForwarding {
                vip_index: 0,
                mode,
                snat_addr: addr16(SNAT_IP.parse()?),
                snat_port_min: 1024,
                snat_port_max: 65535,
                client_affinity: None,
                observe: false,
            };
            dataplane.publish_vip(
                &vip_key(SocketAddr::new(VIP.parse()?, 0), PROTO_UDP),
                &forwarding,
                &build_table(&members, load.ring_size)?,
            )?;
            let table = build_table(&members, load.ring_size)?;
            for i in 0..load.extra_vips {
                // Other VIPs: 10.1.x.y, the same backends.
                let address = std::net::Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8);
                let forwarding = VipForwarding { vip_index: i + 1, ..forwarding };
                dataplane.publish_vip(&vip_key(SocketAddr::new(address.into(), 0), PROTO_UDP), &forwarding, &table)?;
            }
            for i in 0..load.prefilled_conns {
                // Flows of other clients (172.16/12), pinned to backend 0.
                let flow = lb_common::maps::FlowKey {
                    src: addr16(std::net::Ipv4Addr::from(0xac10_0000 | i).into()),
                    dst: addr16(VIP.parse()?),
                    sport: 40000u16.to_be(),
                    dport: 53u16.to_be(),
                    proto: PROTO_UDP,
                    family: 4,
                    ..Default::default()
                };
                let state = lb_common::maps::ConnState { backend: 0, ..Default::default() };
                dataplane.insert_connection(&flow, &state)?;
            }
            // As the daemon does: only frames for this interface are forwarded.
            dataplane.set_own_mac(lb::neighbor::interface_mac("l0")?)?;
            dataplane.attach("l0", AttachMode::Native)?;
            Ok(dataplane)
        })??),
        Balancer::Nftables => {
            lb_ns.exec(&[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.l0.rp_filter=0",
            ])?;
            let rules = format!(
                "table ip lb {{\n\
                 \tchain prerouting {{\n\
                 \t\ttype nat hook prerouting priority dstnat;\n\
                 \t\tip daddr {VIP} udp dport 1-65535 dnat to jhash ip saddr . udp sport mod 3 map {{ 0 : {}, 1 : {}, 2 : {} }}\n\
                 \t}}\n\
                 \tchain postrouting {{\n\
                 \t\ttype nat hook postrouting priority srcnat;\n\
                 \t\tip daddr 10.0.1.0/24 snat to {SNAT_IP}\n\
                 \t}}\n\
                 }}\n",
                BACKENDS[0], BACKENDS[1], BACKENDS[2]
            );
            let file = std::env::temp_dir().join(format!("{}-nft.conf", lb_ns.name()));
            std::fs::write(&file, rules)?;
            lb_ns.exec(&["nft", "-f", file.to_str().context("path")?])?;
            let _ = std::fs::remove_file(&file);
            None
        }
    };

    // 60-byte frames are the 64-byte minimum on the wire without the FCS.
    let payload = frame_len.checked_sub(4 + 14 + 20 + 8).context("frame too short")?;
    let config = format!(
        "{{\n  eth(da={lb_mac}, sa={gen_mac}),\n  ipv4(sa={GEN_IP}, da={VIP}, ttl=64),\n  udp(sp=dinc(1024, {}), dp=53, csum=0),\n  fill(0x41, {payload})\n}}\n",
        1024 + FLOWS - 1
    );
    let file = std::env::temp_dir().join(format!("{}-trafgen.cfg", generator.name()));
    std::fs::write(&file, config)?;
    let offered_before = rx_packets(&lb_ns, "l0")?;
    let busy_before = busy_cpu_seconds()?;
    let started = Instant::now();
    let output = generator
        .command(&[
            "trafgen",
            "--dev",
            "g0",
            "--conf",
            file.to_str().context("path")?,
            "--num",
            &packets.to_string(),
            "--cpus",
            "1",
            "--qdisc-path",
            "-b",
            &format!("{rate}pps"),
        ])
        .output()
        .context("running trafgen (Debian package netsniff-ng)")?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = busy_cpu_seconds()? - busy_before;
    let _ = std::fs::remove_file(&file);
    if !output.status.success() {
        bail!("trafgen failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    std::thread::sleep(Duration::from_millis(200)); // frames still in flight
    let offered = rx_packets(&lb_ns, "l0")? - offered_before;
    let forwarded = sink.count()?;
    Ok(Run { offered, forwarded, seconds, cpu_seconds })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let packets: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1_000_000);
    let rate: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1_000_000);
    println!("# End-to-end UDP forwarding through one veth pair, generator, balancer and sink on one machine\n");
    println!(
        "{packets} frames per run from trafgen (paced at {rate} pps, qdisc path), {FLOWS} flows; forwarded = counted by an XDP sink behind the backends."
    );
    println!(
        "veth hands each frame over in the sender's softirq, so generator, balancer and sink run one after the other on the generator's CPU: \
         the forwarded rate is the inverse of their summed cost, and loss stays near 0. \
         CPU = busy time of all cores during the run, per forwarded packet.\n"
    );
    println!("| balancer | frame | offered pps | forwarded pps | loss | CPU ns/packet |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut results = Vec::new();
    for frame in [64usize, 512] {
        for balancer in [Balancer::Floor, Balancer::XdpNat, Balancer::XdpDsr, Balancer::Nftables] {
            let run = measure(balancer, frame, packets, rate, PLAIN)?;
            let offered_pps = run.offered as f64 / run.seconds;
            let forwarded_pps = run.forwarded as f64 / run.seconds;
            let loss = (1.0 - run.forwarded as f64 / run.offered.max(1) as f64).max(0.0);
            let cpu_ns = run.cpu_seconds * 1e9 / run.forwarded.max(1) as f64;
            println!(
                "| {} | {frame} B | {offered_pps:.0} | {forwarded_pps:.0} | {:.1}% | {cpu_ns:.0} |",
                balancer.name(),
                loss * 100.0
            );
            results.push((balancer, frame, forwarded_pps, cpu_ns));
        }
    }
    for frame in [64usize, 512] {
        let get = |b| results.iter().find(|r| r.0 == b && r.1 == frame).map_or((0.0, 0.0), |r| (r.2, r.3));
        let (nat, dsr, nft, floor) =
            (get(Balancer::XdpNat), get(Balancer::XdpDsr), get(Balancer::Nftables), get(Balancer::Floor));
        println!(
            "\n{frame} B: lb nat / nftables = {:.2}x, lb dsr / nftables = {:.2}x forwarded pps; \
             share of the XDP_TX floor's rate: lb nat {:.0}%, lb dsr {:.0}%, nftables {:.0}%",
            nat.0 / nft.0.max(1.0),
            dsr.0 / nft.0.max(1.0),
            100.0 * nat.0 / floor.0.max(1.0),
            100.0 * dsr.0 / floor.0.max(1.0),
            100.0 * nft.0 / floor.0.max(1.0)
        );
        // Above the floor is what the balancer itself costs: generator, veth and sink are the same.
        let own = |run: (f64, f64)| (run.1 - floor.1).max(1.0);
        println!(
            "\n{frame} B, the balancer's own CPU per packet (above the floor): lb nat {:.0} ns, lb dsr {:.0} ns, \
             nftables {:.0} ns; nftables / lb nat = {:.1}x, nftables / lb dsr = {:.1}x",
            own(nat),
            own(dsr),
            own(nft),
            own(nft) / own(nat),
            own(nft) / own(dsr)
        );
    }
    scale(packets, rate)
}

/// The scale section: map memory at the default sizes, and lb nat's forwarding rate with many
/// VIPs and a full connection table.
fn scale(packets: u64, rate: u64) -> Result<()> {
    println!("\n# Scale\n");
    let sizes = DataplaneSizes::default();
    let dataplane = Dataplane::load(sizes)?;
    println!(
        "BPF map memory at the default sizes ({} VIPs, ring {}, {} connections), as the kernel charges it (fdinfo memlock):\n",
        sizes.max_vips, sizes.ring_size, sizes.max_conns
    );
    println!("| map | type | max entries | memory MiB |\n|---|---|---:|---:|");
    let mut total = 0u64;
    for (name, kind, entries, memlock) in map_memory()? {
        total += memlock;
        println!("| {name} | {kind} | {entries} | {:.1} |", memlock as f64 / (1 << 20) as f64);
    }
    println!("| total | | | {:.1} |", total as f64 / (1 << 20) as f64);
    drop(dataplane);

    println!(
        "\nlb (XDP, nat), 64 B frames, with the data plane filled (ring 4093 for every row, so 10,000 VIPs fit in memory):\n"
    );
    println!("| VIPs | prefilled connections | forwarded pps | loss |\n|---:|---:|---:|---:|");
    for (vips, conns) in [(1u32, 0u32), (100, 0), (10_000, 0), (1, 1_000_000)] {
        let load = Load { ring_size: 4093, extra_vips: vips - 1, prefilled_conns: conns };
        let run = measure(Balancer::XdpNat, 64, packets, rate, load)?;
        let loss = (1.0 - run.forwarded as f64 / run.offered.max(1) as f64).max(0.0);
        println!("| {vips} | {conns} | {:.0} | {:.1}% |", run.forwarded as f64 / run.seconds, loss * 100.0);
    }
    Ok(())
}

/// (name, type, max entries, memlock bytes) of every BPF map this process holds, from
/// /proc/self/fdinfo; names from the kernel's map info.
fn map_memory() -> Result<Vec<(String, String, u64, u64)>> {
    let mut maps = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy()))
        else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let id: u32 = field("map_id").parse().unwrap_or(0);
        let name = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|m| m.name_as_str().map(String::from))
            .unwrap_or_else(|| format!("#{id}"));
        let kind = match field("map_type").as_str() {
            "1" => "hash".to_string(),
            "2" => "array".to_string(),
            "5" => "percpu_hash".to_string(),
            "6" => "percpu_array".to_string(),
            "9" => "lru_hash".to_string(),
            "10" => "lru_percpu_hash".to_string(),
            other => format!("type {other}"),
        };
        maps.push((name, kind, field("max_entries").parse().unwrap_or(0), field("memlock").parse().unwrap_or(0)));
    }
    maps.sort();
    Ok(maps)
}
