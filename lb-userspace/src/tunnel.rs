//! The tunnel modes' settings on the load balancer: the outer source addresses (configured, or
//! the interface's own), the GUE port and the interface's MTU, as the data plane gets them.

use crate::neighbor::ip_json;
use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use lb_common::maps::Settings;
use std::net::IpAddr;

/// The outer source of each family: one address (a full-length prefix), or a prefix whose
/// host bits take each flow's entropy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelSources {
    pub v4: Option<IpNet>,
    pub v6: Option<IpNet>,
}

impl TunnelSources {
    /// `configured` ([daemon] tunnel_source, at most one per family), completed for a family it
    /// does not name with the first global address `interface` has of that family.
    pub fn resolve(configured: &[IpNet], interface: &str) -> Result<Self> {
        let mut sources = Self::default();
        for net in configured {
            match net {
                IpNet::V4(_) => sources.v4 = Some(*net),
                IpNet::V6(_) => sources.v6 = Some(*net),
            }
        }
        if sources.v4.is_none() || sources.v6.is_none() {
            for address in global_addresses(interface)? {
                match address {
                    IpAddr::V4(_) if sources.v4.is_none() => sources.v4 = Some(IpNet::from(address)),
                    IpAddr::V6(_) if sources.v6.is_none() => sources.v6 = Some(IpNet::from(address)),
                    _ => {}
                }
            }
        }
        Ok(sources)
    }

    /// The source of `backend`'s family, if there is one.
    pub fn for_backend(&self, backend: IpAddr) -> Option<IpNet> {
        if backend.is_ipv4() { self.v4 } else { self.v6 }
    }

    /// Written into the program's settings.
    pub fn apply(&self, settings: &mut Settings) {
        let (v4, v4_len) = self.v4.map_or(([0; 16], 0), |net| (crate::planner::addr16(net.addr()), net.prefix_len()));
        let (v6, v6_len) = self.v6.map_or(([0; 16], 0), |net| (crate::planner::addr16(net.addr()), net.prefix_len()));
        settings.tunnel_source_v4 = v4;
        settings.tunnel_prefix_v4 = v4_len;
        settings.tunnel_source_v6 = v6;
        settings.tunnel_prefix_v6 = v6_len;
    }

    pub fn describe(&self) -> String {
        let show = |net: Option<IpNet>| net.map_or("none".to_string(), |n| n.to_string());
        format!("IPv4 {}, IPv6 {}", show(self.v4), show(self.v6))
    }
}

/// A `tunnel_source` entry: an address, or a prefix (`172.16.0.0/16`).
pub fn parse_source(text: &str) -> Result<IpNet, String> {
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|e| format!("{text:?} is not an address or prefix: {e}"))?
    } else {
        IpNet::from(text.parse::<IpAddr>().map_err(|e| format!("{text:?} is not an address or prefix: {e}"))?)
    };
    if net.addr().is_unspecified() || net.addr().is_multicast() || net.addr().is_loopback() {
        return Err(format!("{text:?} cannot be a source address"));
    }
    if net.prefix_len() == 0 {
        return Err(format!("{text:?}: a prefix of length 0 is every address"));
    }
    // Host bits given in a prefix would be overwritten: say so rather than surprise.
    if net.addr() != net.network() && net.prefix_len() < net.max_prefix_len() {
        return Err(format!("{text:?} has host bits set; the prefix is {}", net.trunc()));
    }
    Ok(net)
}

/// The interface's addresses of global scope, in the kernel's order.
pub fn global_addresses(interface: &str) -> Result<Vec<IpAddr>> {
    let links = ip_json(&["address", "show", "dev", interface])?;
    let mut addresses = Vec::new();
    for info in links.get(0).and_then(|l| l["addr_info"].as_array()).into_iter().flatten() {
        if info["scope"].as_str() != Some("global") {
            continue;
        }
        if let Some(local) = info["local"].as_str().and_then(|a| a.parse().ok()) {
            addresses.push(local);
        }
    }
    Ok(addresses)
}

/// The interface's MTU (what a tunnelled packet must fit in, outer headers included).
pub fn interface_mtu(interface: &str) -> Result<u16> {
    let links = ip_json(&["link", "show", "dev", interface])?;
    let mtu = links.get(0).and_then(|l| l["mtu"].as_u64()).with_context(|| format!("{interface} has no MTU"))?;
    if mtu < 68 {
        bail!("{interface} has MTU {mtu}, below what IPv4 allows");
    }
    Ok(mtu.min(u16::MAX as u64) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_or_prefixes() {
        assert_eq!(parse_source("10.0.0.2").unwrap().to_string(), "10.0.0.2/32");
        assert_eq!(parse_source("172.16.0.0/16").unwrap().prefix_len(), 16);
        assert_eq!(parse_source("fd00:1::/64").unwrap().prefix_len(), 64);
        assert!(parse_source("172.16.0.1/16").unwrap_err().contains("172.16.0.0/16"));
        assert!(parse_source("0.0.0.0").is_err());
        assert!(parse_source("10.0.0.0/0").is_err());
        assert!(parse_source("bogus").unwrap_err().contains("bogus"));
    }
}
