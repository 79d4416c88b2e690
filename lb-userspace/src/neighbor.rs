//! Next-hop MAC addresses of backends, from the kernel's routing and neighbour tables (iproute2).

use anyhow::{Context, Result, bail};
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

/// The MAC the data plane must send a backend's packets to: the backend's own when it is on
/// a connected network, the gateway's otherwise. Probes once with a ping when the neighbour
/// table has no answer yet.
pub fn resolve_next_hop_mac(backend: IpAddr) -> Result<[u8; 6]> {
    let (next_hop, dev) = next_hop(backend)?;
    for attempt in 0..10 {
        if let Some(mac) = neighbour_mac(next_hop, &dev)? {
            return Ok(mac);
        }
        if attempt == 0 {
            // Any packet makes the kernel resolve the neighbour; an echo request is the
            // least intrusive one (health checks send the same).
            let _ = Command::new("ping").args(["-c", "1", "-W", "1", &next_hop.to_string()]).output();
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    bail!(
        "cannot resolve the MAC address of next hop {next_hop} on {dev} for backend {backend}: no neighbour entry after probing (set `mac` for this backend)"
    )
}

/// The MAC address of one of our interfaces. Asked over netlink (through `ip`), not read from
/// /sys/class/net: sysfs shows the namespace it was mounted in, which is not ours when the daemon
/// was moved into a network namespace with `nsenter` (it then named the host's MAC).
pub fn interface_mac(interface: &str) -> Result<[u8; 6]> {
    let links = ip_json(&["link", "show", "dev", interface])?;
    let text = links[0]["address"].as_str().with_context(|| format!("{interface} has no link-layer address"))?;
    crate::config::parse_mac(text).map_err(anyhow::Error::msg)
}

pub(crate) fn ip_json(args: &[&str]) -> Result<serde_json::Value> {
    let output = Command::new("ip").arg("-j").args(args).output().context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("parsing `ip -j {}`", args.join(" ")))
}

fn next_hop(backend: IpAddr) -> Result<(IpAddr, String)> {
    let routes =
        ip_json(&["route", "get", &backend.to_string()]).with_context(|| format!("no route to backend {backend}"))?;
    let route = routes.get(0).context("empty route")?;
    let dev = route.get("dev").and_then(|d| d.as_str()).context("route without device")?.to_string();
    let next_hop = match route.get("gateway").and_then(|g| g.as_str()) {
        Some(gateway) => gateway.parse().with_context(|| format!("gateway {gateway:?}"))?,
        None => backend,
    };
    Ok((next_hop, dev))
}

fn neighbour_mac(next_hop: IpAddr, dev: &str) -> Result<Option<[u8; 6]>> {
    let entries = ip_json(&["neigh", "show", "to", &next_hop.to_string(), "dev", dev])?;
    for entry in entries.as_array().into_iter().flatten() {
        let states: Vec<&str> =
            entry.get("state").and_then(|s| s.as_array()).into_iter().flatten().filter_map(|s| s.as_str()).collect();
        if states.iter().any(|s| matches!(*s, "FAILED" | "INCOMPLETE")) {
            continue;
        }
        if let Some(mac) = entry.get("lladdr").and_then(|m| m.as_str()) {
            return Ok(Some(crate::config::parse_mac(mac).map_err(anyhow::Error::msg)?));
        }
    }
    Ok(None)
}
