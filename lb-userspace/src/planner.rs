//! From the desired state (and backend health) to what the data plane holds: a stable slot for
//! every VIP and backend, each backend's entry, and the members of each VIP's Maglev table.

use crate::model::{BackendSpec, DesiredState, VipSpec};
use anyhow::{Result, bail};
use lb_common::maglev::MaglevBackend;
use lb_common::maps::{
    BACKEND_USABLE, Backend, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, VIP_ADDR_ANSWER_PING, VipAddr, VipAddrKey, VipKey,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Slots handed out to VIPs and backends. Persisted with the state: connection-table entries
/// name backend indexes, so an index must never change while its backend exists, and a freed
/// index is reused as late as possible.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    /// VIP identity → VIP slot (counters and ring pair).
    pub vips: BTreeMap<String, u32>,
    /// "VIP identity / backend address" → backend index.
    pub backends: BTreeMap<String, u32>,
    /// Where the search for a free backend index starts (round robin).
    pub next_backend: u32,
}

pub fn vip_id(vip: &VipSpec) -> String {
    format!("{} {}", vip.protocol, vip.address)
}

pub fn backend_id(vip: &VipSpec, address: SocketAddr) -> String {
    format!("{} / {address}", vip_id(vip))
}

impl Slots {
    /// Gives every VIP and backend of `state` a slot, keeping the slots of those that stay and
    /// freeing the slots of those that are gone.
    pub fn assign(&mut self, state: &DesiredState, max_vips: u32) -> Result<()> {
        let wanted_vips: Vec<String> = state.vips.iter().map(vip_id).collect();
        self.vips.retain(|id, _| wanted_vips.contains(id));
        let wanted_backends: Vec<String> =
            state.vips.iter().flat_map(|v| v.backends.iter().map(move |b| backend_id(v, b.address))).collect();
        self.backends.retain(|id, _| wanted_backends.contains(id));
        for id in wanted_vips {
            if !self.vips.contains_key(&id) {
                let used: Vec<u32> = self.vips.values().copied().collect();
                let Some(free) = (0..max_vips).find(|s| !used.contains(s)) else {
                    bail!("no free VIP slot for {id}: all {max_vips} are in use (raise daemon.max_vips)");
                };
                self.vips.insert(id, free);
            }
        }
        for id in wanted_backends {
            if !self.backends.contains_key(&id) {
                let used: std::collections::HashSet<u32> = self.backends.values().copied().collect();
                let Some(free) =
                    (0..MAX_BACKENDS).map(|i| (self.next_backend + i) % MAX_BACKENDS).find(|s| !used.contains(s))
                else {
                    bail!("no free backend slot for {id}: all {MAX_BACKENDS} are in use");
                };
                self.backends.insert(id, free);
                self.next_backend = (free + 1) % MAX_BACKENDS;
            }
        }
        Ok(())
    }

    pub fn vip(&self, vip: &VipSpec) -> Option<u32> {
        self.vips.get(&vip_id(vip)).copied()
    }

    pub fn backend(&self, vip: &VipSpec, address: SocketAddr) -> Option<u32> {
        self.backends.get(&backend_id(vip, address)).copied()
    }
}

/// The data plane's key of a VIP.
pub fn vip_key(vip: &VipSpec) -> VipKey {
    VipKey {
        addr: addr16(vip.address.ip()),
        port: vip.address.port().to_be(),
        proto: vip.protocol.number(),
        family: family(vip.address.ip()),
    }
}

/// The `VIP_ADDRS` entries of a state: every VIP address that answers ping, once.
pub fn vip_addresses(state: &DesiredState) -> Vec<(VipAddrKey, VipAddr)> {
    let mut out: Vec<(VipAddrKey, VipAddr)> = Vec::new();
    for vip in state.vips.iter().filter(|v| v.answer_ping) {
        let ip = vip.address.ip();
        let key = VipAddrKey { addr: addr16(ip), family: family(ip), _pad: [0; 3] };
        if !out.iter().any(|(k, _)| *k == key) {
            out.push((key, VipAddr::with_flags(VIP_ADDR_ANSWER_PING)));
        }
    }
    out
}

pub fn addr16(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

/// A backend's Maglev identity: a fixed hash of its address, so that every load balancer node
/// builds the same table whatever slots it gave its backends.
pub fn maglev_key(address: SocketAddr) -> u64 {
    // FNV-1a over address and port, then a 64-bit finaliser for spread.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = addr16(address.ip());
    for b in bytes.iter().chain(address.port().to_be_bytes().iter()) {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The data plane's entry for a backend. A drained backend stays usable for its existing
/// connections; a down one does not.
pub fn backend_entry(backend: &BackendSpec, mac: [u8; 6], healthy: bool) -> Backend {
    Backend {
        addr: addr16(backend.address.ip()),
        mac,
        port: backend.address.port().to_be(),
        family: family(backend.address.ip()),
        flags: if healthy { BACKEND_USABLE } else { 0 },
        _pad: [0; 2],
    }
}

/// Which backends receive new flows: healthy, undrained primaries with weight; only when there
/// is none, the healthy, undrained backups (cold standby).
pub fn table_members(vip: &VipSpec, slots: &Slots, healthy: &dyn Fn(&BackendSpec) -> bool) -> Vec<MaglevBackend> {
    let eligible = |b: &&BackendSpec| !b.drained && b.weight > 0 && healthy(b);
    let primaries: Vec<&BackendSpec> = vip.backends.iter().filter(|b| !b.backup).filter(eligible).collect();
    let chosen = if primaries.is_empty() {
        vip.backends.iter().filter(|b| b.backup).filter(eligible).collect()
    } else {
        primaries
    };
    chosen
        .into_iter()
        .filter_map(|b| {
            Some(MaglevBackend { index: slots.backend(vip, b.address)?, key: maglev_key(b.address), weight: b.weight })
        })
        .collect()
}

/// The source ports NAT flows of a VIP take: `configured`, kept clear of the kernel's local
/// port range `local` (`net.ipv4.ip_local_port_range`). The host's own connections take their
/// source ports from there, health checks among them, and one that used the SNAT address and
/// a port a NAT flow holds towards the same backend would have its answers translated into
/// that flow. The default range means "every port outside it": the larger part is taken. An
/// explicit range that overlaps it is refused, naming a range that fits.
pub fn nat_source_ports(vip: &str, configured: (u16, u16), local: (u16, u16)) -> Result<(u16, u16)> {
    let (first, last) = configured;
    if last < local.0 || first > local.1 {
        return Ok(configured);
    }
    let below = (first < local.0).then(|| (first, local.0 - 1));
    let above = (last > local.1).then(|| (local.1 + 1, last));
    let size = |range: Option<(u16, u16)>| range.map_or(0, |(a, b)| b as u32 - a as u32 + 1);
    let larger = if size(below) >= size(above) { below } else { above };
    if configured == crate::model::DEFAULT_SNAT_PORTS
        && let Some(range) = larger
    {
        return Ok(range);
    }
    let suggestion = match larger.or(Some((crate::model::DEFAULT_SNAT_PORTS.0, local.0.saturating_sub(1)))) {
        Some((a, b)) if a <= b => format!(", e.g. \"{a}-{b}\""),
        _ => String::new(),
    };
    bail!(
        "vip {vip:?}: snat_ports {first}-{last} overlaps the kernel's local port range {}-{} \
         (net.ipv4.ip_local_port_range): the host's own connections, health checks among them, take their \
         source ports from there and would collide with NAT flows. Choose ports outside it{suggestion}, or \
         leave snat_ports unset (every port outside it)",
        local.0,
        local.1
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DEFAULT_SNAT_PORTS, Mode, Protocol};

    const LINUX_LOCAL: (u16, u16) = (32768, 60999);

    #[test]
    fn nat_ports_stay_clear_of_the_kernels_local_ports() {
        assert_eq!(nat_source_ports("web", DEFAULT_SNAT_PORTS, LINUX_LOCAL).unwrap(), (1024, 32767));
        assert_eq!(nat_source_ports("web", DEFAULT_SNAT_PORTS, (1024, 20000)).unwrap(), (20001, 65535));
        assert_eq!(nat_source_ports("web", (1024, 30000), LINUX_LOCAL).unwrap(), (1024, 30000), "clear of it: kept");
        assert_eq!(nat_source_ports("web", (61000, 65535), LINUX_LOCAL).unwrap(), (61000, 65535));
        let overlap = nat_source_ports("web", (30000, 40000), LINUX_LOCAL).unwrap_err().to_string();
        assert!(
            overlap.contains("snat_ports 30000-40000 overlaps the kernel's local port range 32768-60999")
                && overlap.contains("e.g. \"30000-32767\""),
            "{overlap}"
        );
        let inside = nat_source_ports("web", (40000, 50000), LINUX_LOCAL).unwrap_err().to_string();
        assert!(inside.contains("e.g. \"1024-32767\""), "{inside}");
        assert!(nat_source_ports("web", DEFAULT_SNAT_PORTS, (1, 65535)).is_err(), "no port left");
    }

    fn backend(addr: &str, backup: bool) -> BackendSpec {
        BackendSpec { address: addr.parse().unwrap(), weight: 1, backup, drained: false, mac: None, check: None }
    }

    fn vip(name: &str, addr: &str, backends: Vec<BackendSpec>) -> VipSpec {
        VipSpec {
            name: name.into(),
            address: addr.parse().unwrap(),
            protocol: Protocol::Tcp,
            mode: Mode::Dsr,
            snat: None,
            snat_ports: DEFAULT_SNAT_PORTS,
            affinity: Default::default(),
            affinity_prefix: None,
            answer_ping: true,
            observe: None,
            check: None,
            backends,
        }
    }

    #[test]
    fn slots_of_remaining_backends_never_move() {
        let mut state = DesiredState {
            vips: vec![vip("a", "10.0.0.1:80", vec![backend("10.0.1.1:80", false), backend("10.0.1.2:80", false)])],
        };
        let mut slots = Slots::default();
        slots.assign(&state, 4).unwrap();
        let b2 = slots.backend(&state.vips[0], "10.0.1.2:80".parse().unwrap()).unwrap();
        state.vips[0].backends.remove(0);
        state.vips[0].backends.push(backend("10.0.1.3:80", false));
        slots.assign(&state, 4).unwrap();
        assert_eq!(slots.backend(&state.vips[0], "10.0.1.2:80".parse().unwrap()), Some(b2));
        let b3 = slots.backend(&state.vips[0], "10.0.1.3:80".parse().unwrap()).unwrap();
        assert_ne!(b3, 0, "the freed index 0 is not reused at once");
    }

    #[test]
    fn vip_slots_run_out_with_a_clear_error() {
        let state = DesiredState { vips: vec![vip("a", "10.0.0.1:80", vec![]), vip("b", "10.0.0.2:80", vec![])] };
        let error = Slots::default().assign(&state, 1).unwrap_err().to_string();
        assert!(error.contains("no free VIP slot for tcp 10.0.0.2:80"), "{error}");
    }

    #[test]
    fn backups_serve_only_when_every_primary_is_out() {
        let v = vip(
            "a",
            "10.0.0.1:80",
            vec![backend("10.0.1.1:80", false), backend("10.0.1.2:80", false), backend("10.0.1.9:80", true)],
        );
        let mut slots = Slots::default();
        slots.assign(&DesiredState { vips: vec![v.clone()] }, 4).unwrap();
        let all_up = table_members(&v, &slots, &|_| true);
        assert_eq!(all_up.len(), 2);
        let one_down =
            table_members(&v, &slots, &|b| b.address.port() == 80 && b.address.ip().to_string() != "10.0.1.1");
        assert_eq!(one_down.len(), 1, "one primary left, backup unused");
        let primaries_down = table_members(&v, &slots, &|b| b.backup);
        assert_eq!(primaries_down.len(), 1);
        assert_eq!(primaries_down[0].key, maglev_key("10.0.1.9:80".parse().unwrap()));
    }

    #[test]
    fn drained_and_zero_weight_backends_get_no_new_flows() {
        let mut v = vip("a", "10.0.0.1:80", vec![backend("10.0.1.1:80", false), backend("10.0.1.2:80", false)]);
        v.backends[0].drained = true;
        v.backends[1].weight = 0;
        let mut slots = Slots::default();
        slots.assign(&DesiredState { vips: vec![v.clone()] }, 4).unwrap();
        assert!(table_members(&v, &slots, &|_| true).is_empty());
    }

    #[test]
    fn maglev_identity_depends_on_the_address_only() {
        let a: SocketAddr = "10.0.1.1:80".parse().unwrap();
        assert_eq!(maglev_key(a), maglev_key(a));
        assert_ne!(maglev_key(a), maglev_key("10.0.1.1:81".parse().unwrap()));
        assert_ne!(maglev_key(a), maglev_key("10.0.1.2:80".parse().unwrap()));
    }
}
