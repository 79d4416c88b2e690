//! Answers to API requests: edits become a new desired state applied whole; reads become reports.

use super::{Daemon, Sample};
use crate::api::{Request, Response};
use crate::config;
use crate::dataplane::FlowRoute;
use crate::model::{DesiredState, Protocol, VipSpec};
use crate::planner::{addr16, backend_id, family};
use crate::report::*;
use anyhow::{Result, anyhow, bail};
use lb_common::maps::{FlowKey, Traffic};
use std::net::{IpAddr, SocketAddr};

impl Daemon {
    pub fn handle(&mut self, request: Request) -> Response {
        // Once stopping (a detach may already have removed the saved state), change nothing.
        if self.stop.is_some() {
            return Response::failure("the daemon is stopping");
        }
        let result = match request {
            Request::Status => self.status().map(Response::success),
            Request::VipList => Ok(Response::success(self.vip_rows())),
            Request::BackendList { vip } => self.backend_rows(vip.as_deref()).map(Response::success),
            Request::Stats => Ok(Response::success(self.stats_report())),
            Request::Explain { src, dst, protocol } => self.explain(src, dst, protocol).map(Response::success),
            Request::Apply { file, source, dry_run } => self.apply_file(&file, &source, dry_run).map(Response::success),
            Request::Failover => self.failover().map(Response::success),
            Request::Shutdown { detach } => {
                self.stop = Some(detach);
                Ok(Response::success("stopping"))
            }
            edit => self.edit(edit).map(|changes| Response::success(ApplyReport { changes, dry_run: false })),
        };
        result.unwrap_or_else(|error| {
            tracing::warn!("request refused: {error:#}");
            Response::failure(format!("{error:#}"))
        })
    }

    /// A CLI edit: the current state with one change, applied whole.
    fn edit(&mut self, request: Request) -> Result<Vec<String>> {
        self.ensure_active()?;
        let mut state = self.state.clone();
        let cause = match request {
            Request::VipAdd { vip } => {
                if state.vip(&vip.name).is_some() {
                    bail!("VIP {:?} exists already", vip.name);
                }
                state.vips.push(vip);
                "vip add"
            }
            Request::VipDel { name } => {
                let before = state.vips.len();
                state.vips.retain(|v| v.name != name);
                if state.vips.len() == before {
                    bail!("no VIP named {name:?}");
                }
                "vip del"
            }
            Request::BackendAdd { vip, backend } => {
                let target = state.vip_mut(&vip).ok_or_else(|| anyhow!("no VIP named {vip:?}"))?;
                if target.backend(backend.address).is_some() {
                    bail!("VIP {vip:?} has backend {} already", backend.address);
                }
                target.backends.push(backend);
                "backend add"
            }
            Request::BackendDel { vip, address } => {
                let target = state.vip_mut(&vip).ok_or_else(|| anyhow!("no VIP named {vip:?}"))?;
                let before = target.backends.len();
                target.backends.retain(|b| b.address != address);
                if target.backends.len() == before {
                    bail!("VIP {vip:?} has no backend {address}");
                }
                "backend del"
            }
            Request::BackendDrain { vip, address, drained } => {
                let target = state.vip_mut(&vip).ok_or_else(|| anyhow!("no VIP named {vip:?}"))?;
                let backend = target
                    .backends
                    .iter_mut()
                    .find(|b| b.address == address)
                    .ok_or_else(|| anyhow!("VIP {vip:?} has no backend {address}"))?;
                backend.drained = drained;
                if drained { "backend drain" } else { "backend undrain" }
            }
            other => bail!("not an edit: {other:?}"),
        };
        self.apply(state, cause)
    }

    fn apply_file(&mut self, file: &str, source: &str, dry_run: bool) -> Result<ApplyReport> {
        let config = config::parse(file, source).map_err(|e| anyhow!("{e}"))?;
        let differing = self.settings.differences(&config.daemon);
        if !differing.is_empty() {
            bail!(
                "{file}: daemon settings differ from the running daemon's ({}): restart the daemon to change them; nothing was applied",
                differing.join(", ")
            );
        }
        // Drain flags are runtime state the file does not carry: keep them.
        let mut state: DesiredState = config.state;
        for vip in &mut state.vips {
            for backend in &mut vip.backends {
                backend.drained =
                    self.state.vip(&vip.name).and_then(|v| v.backend(backend.address)).is_some_and(|b| b.drained);
            }
        }
        if !dry_run {
            self.ensure_active()?;
        }
        if dry_run {
            self.plan(state.clone())?;
            return Ok(ApplyReport { changes: super::diff::changes(&self.state, &state), dry_run });
        }
        Ok(ApplyReport { changes: self.apply(state, "apply")?, dry_run })
    }

    /// `lb failover`: the master gives up the VIPs to the standby (maintenance).
    fn failover(&mut self) -> Result<String> {
        let Some(pair) = &self.pair else {
            bail!("no [vrrp] section in the configuration: this node has no standby to hand over to")
        };
        let mut view = pair.view.lock().expect("pair view poisoned");
        if !view.is_master() {
            bail!("this node is not the master ({}): nothing to hand over", view.role());
        }
        view.hand_over += 1;
        tracing::warn!(peer = %pair.settings.peer.ip(), "failover requested by the operator");
        Ok(format!("handing the VIPs over to the standby {}", pair.settings.peer.ip()))
    }

    pub(crate) fn status(&self) -> Result<StatusReport> {
        Ok(StatusReport {
            instance: self.settings.instance.clone(),
            interface: self.settings.interface.clone(),
            xdp_mode: format!("{:?}", self.settings.xdp_mode).to_lowercase(),
            attachment: self.attachment.as_ref().map_or_else(|| "not attached".into(), |a| a.describe()),
            pin_dir: self.pins.path().display().to_string(),
            pinned_maps: self.dataplane.map_set().map(ToString::to_string),
            warnings: self.warnings(),
            state_file: self.store.path().display().to_string(),
            config_file: self.config_file.display().to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            vips: self.state.vips.len(),
            backends: self.state.vips.iter().map(|v| v.backends.len()).sum(),
            ring_size: self.settings.sizes.ring_size,
            max_vips: self.settings.sizes.max_vips,
            max_conns: self.settings.sizes.max_conns,
            tunnel: Some(crate::report::TunnelStatus {
                source_v4: self.tunnel.v4.map_or_else(|| "none".into(), |n| n.to_string()),
                source_v6: self.tunnel.v6.map_or_else(|| "none".into(), |n| n.to_string()),
                gue_port: self.settings.gue_port,
                mtu: self.mtu,
            }),
            vrrp: self.pair.as_ref().map(|pair| {
                let view = pair.view.lock().expect("pair view poisoned");
                let digest = crate::store::digest(&self.state);
                VrrpStatus {
                    vrid: pair.settings.vrid,
                    priority: pair.settings.priority,
                    state: view.role(),
                    fault: view.fault.clone(),
                    errors: view.errors(),
                    master: view.master().map(|m| m.to_string()),
                    addresses: view.addresses.iter().map(ToString::to_string).collect(),
                    peer: pair.settings.peer.to_string(),
                    sync: self.sync.describe(view.is_master(), &digest),
                    digest,
                    nat_flows_sent: self.sync.nat_flows_sent,
                    nat_flows_adopted: self.sync.nat_flows_adopted,
                }
            }),
            bgp: self.bgp.as_ref().map(|b| b.status()),
            down: self
                .backend_rows(None)?
                .into_iter()
                .filter(|row| row.state == "down")
                .map(|row| DownBackend {
                    vip: row.vip,
                    address: row.address,
                    reason: row.last_check.unwrap_or_else(|| "no check result".into()),
                })
                .collect(),
        })
    }

    pub(crate) fn vip_rows(&self) -> Vec<VipRow> {
        self.state
            .vips
            .iter()
            .map(|vip| VipRow {
                name: vip.name.clone(),
                address: vip.address.to_string(),
                protocol: vip.protocol.to_string(),
                mode: vip.mode.to_string(),
                affinity: vip.affinity_text(),
                answer_ping: vip.answer_ping,
                snat: vip.snat.map(|s| s.to_string()),
                snat_ports: self.nat_ports.get(&crate::planner::vip_id(vip)).map(|(a, b)| format!("{a}-{b}")),
                backends: vip.backends.len(),
                serving: self.table_shares(vip).len(),
                slot: self.slots.vip(vip),
            })
            .collect()
    }

    pub(crate) fn backend_rows(&self, only: Option<&str>) -> Result<Vec<BackendRow>> {
        if let Some(name) = only
            && self.state.vip(name).is_none()
        {
            bail!("no VIP named {name:?}");
        }
        let mut rows = Vec::new();
        for vip in self.state.vips.iter().filter(|v| only.is_none_or(|n| n == v.name)) {
            // What the data plane does now: the published table, and the health it was built with.
            let shares = self.table_shares(vip);
            for backend in &vip.backends {
                let index = self.slots.backend(vip, backend.address);
                let share = index.and_then(|i| shares.get(&i)).copied().unwrap_or(0.0);
                let serving = share > 0.0;
                let status = self.health.status(&backend_id(vip, backend.address));
                let down = self.published_down.contains(&backend_id(vip, backend.address));
                let state = if down {
                    "down"
                } else if backend.drained {
                    "drained"
                } else if backend.weight == 0 {
                    "weight 0"
                } else if serving {
                    "serving"
                } else if backend.backup {
                    "standby"
                } else {
                    "out"
                };
                rows.push(BackendRow {
                    vip: vip.name.clone(),
                    address: backend.address.to_string(),
                    weight: backend.weight,
                    backup: backend.backup,
                    drained: backend.drained,
                    state: state.into(),
                    index,
                    mac: self
                        .macs
                        .get(&backend.address.ip())
                        .map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                    table_share: share,
                    health: status
                        .as_ref()
                        .map(|s| if s.health == crate::health::Health::Up { "up".into() } else { "down".into() }),
                    last_check: status.as_ref().map(|s| s.last_detail.clone()),
                    since_seconds: status.as_ref().map(|s| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64);
                        now.saturating_sub(s.since_unix_ms) / 1000
                    }),
                });
            }
        }
        Ok(rows)
    }

    /// Each backend slot's share of the VIP's published table (slots without a share are absent).
    fn table_shares(&self, vip: &crate::model::VipSpec) -> std::collections::HashMap<u32, f64> {
        let mut counts = std::collections::HashMap::<u32, usize>::new();
        let Some(table) = self.published.get(&crate::planner::vip_id(vip)) else { return Default::default() };
        for &index in table {
            if index != lb_common::maps::NO_BACKEND {
                *counts.entry(index).or_default() += 1;
            }
        }
        counts.into_iter().map(|(index, n)| (index, n as f64 / table.len() as f64)).collect()
    }

    pub(crate) fn stats_report(&self) -> StatsReport {
        let (previous, last) = (&self.samples.0, &self.samples.1);
        let interval = match (previous, last) {
            (Some(p), Some(l)) => l.at.duration_since(p.at).as_secs_f64(),
            _ => 0.0,
        };
        // Totals are read now; rates come from the last two one-second samples.
        let current = self.read_counters();
        let row = |pick: &dyn Fn(&Sample) -> Option<Traffic>| -> TrafficRow {
            let total = pick(&current).unwrap_or_default();
            let now = last.as_ref().and_then(pick).unwrap_or_default();
            let before = previous.as_ref().and_then(pick);
            let rate = |n: u64, b: u64| if interval > 0.0 { n.saturating_sub(b) as f64 / interval } else { 0.0 };
            let (pps, bps, fps) = match before {
                Some(b) => {
                    (rate(now.packets, b.packets), rate(now.bytes, b.bytes) * 8.0, rate(now.new_flows, b.new_flows))
                }
                None => (0.0, 0.0, 0.0),
            };
            TrafficRow {
                packets: total.packets,
                bytes: total.bytes,
                new_flows: total.new_flows,
                packets_per_second: pps,
                bits_per_second: bps,
                new_flows_per_second: fps,
            }
        };
        let vips = self
            .state
            .vips
            .iter()
            .map(|vip| VipStats {
                name: vip.name.clone(),
                traffic: row(&|s: &Sample| s.vips.get(&vip.name).copied()),
                backends: vip
                    .backends
                    .iter()
                    .map(|b| {
                        let id = backend_id(vip, b.address);
                        (b.address.to_string(), row(&|s: &Sample| s.backends.get(&id).copied()))
                    })
                    .collect(),
            })
            .collect();
        let reasons = self
            .dataplane
            .reason_counters()
            .unwrap_or_default()
            .into_iter()
            .map(|(r, n)| (r.name().to_string(), n))
            .collect();
        let health = self
            .state
            .vips
            .iter()
            .flat_map(|vip| {
                vip.backends.iter().filter_map(move |b| {
                    let status = self.health.status(&backend_id(vip, b.address))?;
                    Some(HealthRow {
                        vip: vip.name.clone(),
                        backend: b.address.to_string(),
                        up: status.health == crate::health::Health::Up,
                        checks: status.checks,
                        transitions: status.transitions,
                    })
                })
            })
            .collect();
        let flow_events = self
            .dataplane
            .flow_events()
            .unwrap_or_default()
            .into_iter()
            .map(|(event, n)| (event.name().to_string(), n))
            .collect();
        let nat_flows_lost = self.pair.as_ref().and_then(|_| self.dataplane.nat_flows_lost().ok());
        StatsReport {
            health,
            vips,
            reasons,
            rate_interval_seconds: interval,
            xdp_tx_errors: current.xdp_tx_errors,
            flow_events,
            flood: self.flood_state(),
            nat_flows_lost,
            tables: self.tables.lock().map(|t| t.clone()).unwrap_or_default(),
        }
    }

    fn explain(&self, src: SocketAddr, dst: SocketAddr, protocol: Protocol) -> Result<Explanation> {
        if src.is_ipv4() != dst.is_ipv4() {
            bail!("source {src} and destination {dst} are of different address families");
        }
        let flow = FlowKey {
            src: addr16(src.ip()),
            dst: addr16(dst.ip()),
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
            proto: protocol.number(),
            family: family(src.ip()),
            _pad: [0; 2],
        };
        let vip = self.state.vips.iter().find(|v| v.protocol == protocol && v.address == dst).or_else(|| {
            self.state
                .vips
                .iter()
                .find(|v| v.protocol == protocol && v.address.ip() == dst.ip() && v.address.port() == 0)
        });
        let backend_at = |index: u32| -> Option<String> {
            let vip = vip?;
            vip.backends
                .iter()
                .find(|b| self.slots.backend(vip, b.address) == Some(index))
                .map(|b| b.address.to_string())
        };
        let (decided_by, backend, detail) = match self.dataplane.route(&flow)? {
            FlowRoute::NotAVip => {
                ("not a VIP".to_string(), None, format!("no VIP is {protocol} {dst}: the kernel gets the packet"))
            }
            FlowRoute::ConnectionTable { backend } => (
                "connection table".to_string(),
                backend_at(backend),
                format!("an established flow, pinned to backend slot {backend}"),
            ),
            FlowRoute::Maglev { hash, slot, ring_size, backend: Some(index) } => (
                "maglev".to_string(),
                backend_at(index),
                format!(
                    "a new flow{}: hash {hash:#010x}, Maglev slot {slot} of {ring_size}, backend slot {index}",
                    placed_by(vip, src.ip())
                ),
            ),
            FlowRoute::Maglev { hash, slot, ring_size, backend: None } => (
                "no backend".to_string(),
                None,
                format!(
                    "hash {hash:#010x}, Maglev slot {slot} of {ring_size} is empty: the VIP has no usable backend, packets are dropped"
                ),
            ),
        };
        Ok(Explanation { vip: vip.map(|v| v.name.clone()), backend, decided_by, detail })
    }
}

/// How a new flow of `client` is placed, as words after "a new flow": nothing for per-connection
/// placement, the client (network) for client affinity.
fn placed_by(vip: Option<&VipSpec>, client: IpAddr) -> String {
    let Some(prefix) = vip.and_then(VipSpec::client_affinity_prefix) else { return String::new() };
    match ipnet::IpNet::new(client, prefix) {
        Ok(net) if prefix < net.max_prefix_len() => {
            format!(" of client network {} (client affinity: every connection from it goes alike)", net.trunc())
        }
        _ => format!(" of client {client} (client affinity: every connection from it goes alike)"),
    }
}
