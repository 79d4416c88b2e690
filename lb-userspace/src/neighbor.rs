//! Next-hop MAC addresses of backends, from the kernel's routing and neighbour tables (iproute2).

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
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

/// The next-hop MACs of many backends at once, from two `ip` runs (every route in one batch,
/// then the whole neighbour table), so that refreshing them costs the same for 10 backends as
/// for 10,000. A backend whose next hop has no usable neighbour entry is resolved on its own
/// (with a probe), at most `probes` of them; the others are left out this time.
pub fn refresh_next_hops(backends: &[IpAddr], probes: usize) -> HashMap<IpAddr, [u8; 6]> {
    let mut found = HashMap::new();
    if backends.is_empty() {
        return found;
    }
    let routes = route_batch(backends).unwrap_or_default();
    let neighbours = neighbour_table().unwrap_or_default();
    let mut probed = 0;
    for backend in backends {
        let mac = routes.get(backend).and_then(|hop| neighbours.get(hop)).copied();
        match mac {
            Some(mac) => {
                found.insert(*backend, mac);
            }
            None if probed < probes => {
                probed += 1;
                if let Ok(mac) = resolve_next_hop_mac(*backend) {
                    found.insert(*backend, mac);
                }
            }
            None => {}
        }
    }
    found
}

/// Each backend's next hop (gateway or itself) and device, by `ip -batch`.
fn route_batch(backends: &[IpAddr]) -> Result<HashMap<IpAddr, (IpAddr, String)>> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-j", "-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running ip (iproute2)")?;
    let mut commands = String::new();
    for backend in backends {
        commands.push_str(&format!("route get {backend}\n"));
    }
    child.stdin.take().context("ip's stdin")?.write_all(commands.as_bytes())?;
    let output = child.wait_with_output()?;
    let mut routes = HashMap::new();
    // One JSON array per command that found a route.
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(serde_json::Value::Array(entries)) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(route) = entries.first() else { continue };
        let (Some(dst), Some(dev)) = (route["dst"].as_str(), route["dev"].as_str()) else { continue };
        let Ok(dst) = dst.parse::<IpAddr>() else { continue };
        let hop = route["gateway"].as_str().and_then(|g| g.parse().ok()).unwrap_or(dst);
        routes.insert(dst, (hop, dev.to_string()));
    }
    Ok(routes)
}

/// Every usable neighbour entry: (address, device) → MAC.
fn neighbour_table() -> Result<HashMap<(IpAddr, String), [u8; 6]>> {
    let mut table = HashMap::new();
    for entry in ip_json(&["neigh", "show"])?.as_array().into_iter().flatten() {
        let states: Vec<&str> =
            entry.get("state").and_then(|s| s.as_array()).into_iter().flatten().filter_map(|s| s.as_str()).collect();
        if states.iter().any(|s| matches!(*s, "FAILED" | "INCOMPLETE")) {
            continue;
        }
        let (Some(dst), Some(dev), Some(mac)) =
            (entry["dst"].as_str(), entry["dev"].as_str(), entry.get("lladdr").and_then(|m| m.as_str()))
        else {
            continue;
        };
        if let (Ok(dst), Ok(mac)) = (dst.parse::<IpAddr>(), crate::config::parse_mac(mac)) {
            table.insert((dst, dev.to_string()), mac);
        }
    }
    Ok(table)
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
