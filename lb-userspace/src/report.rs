//! What the daemon answers to read requests: plain data, rendered by the CLI as tables or JSON.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub instance: String,
    pub interface: String,
    pub xdp_mode: String,
    /// "attached" or "took over a running data plane".
    pub attachment: String,
    pub pin_dir: String,
    /// The pinned map set in use: layout version, generation, directory.
    #[serde(default)]
    pub pinned_maps: Option<String>,
    /// What keeps this node from working as it should; empty when all is well.
    #[serde(default)]
    pub warnings: Vec<String>,
    pub state_file: String,
    pub config_file: String,
    pub uptime_seconds: u64,
    pub vips: usize,
    pub backends: usize,
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_conns: u32,
    /// The tunnel modes' settings: outer sources, GUE port, the interface MTU packets must fit.
    #[serde(default)]
    pub tunnel: Option<TunnelStatus>,
    /// Active/standby state, when `[vrrp]` is configured.
    #[serde(default)]
    pub vrrp: Option<VrrpStatus>,
    /// Active/active announcements, when `[bgp]` is configured.
    #[serde(default)]
    pub bgp: Option<BgpStatus>,
    /// Backends out of rotation (down in the published tables), each with why.
    #[serde(default)]
    pub down: Vec<DownBackend>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DownBackend {
    pub vip: String,
    pub address: String,
    /// As `lb backend list` shows it: the check's result, or what the data plane observed.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// Per family: the address or prefix outer headers are sent from, or "none".
    pub source_v4: String,
    pub source_v6: String,
    pub gue_port: u16,
    pub mtu: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VrrpStatus {
    pub vrid: u8,
    pub priority: u8,
    /// "master", "backup", "fault", "failed" or "initialize"; per family when they differ.
    pub state: String,
    /// Why this node is in fault, if it is.
    pub fault: Option<String>,
    /// Why a family's router cannot run ("IPv6: …"); it is retried after 0.1 s, then up to 1 s.
    pub errors: Vec<String>,
    /// The current master's address, when known.
    pub master: Option<String>,
    /// The addresses the pair owns (VIPs and SNAT addresses).
    pub addresses: Vec<String>,
    pub peer: String,
    /// "in sync", "out of sync: …" or "never synchronised".
    pub sync: String,
    /// Digest of this node's desired state (equal on both nodes when in sync).
    pub digest: String,
    /// NAT flows sent to the peer, and the peer's flows installed here.
    #[serde(default)]
    pub nat_flows_sent: u64,
    #[serde(default)]
    pub nat_flows_adopted: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BgpStatus {
    pub neighbor: String,
    /// BIRD's view of the session ("Established", "Active", …).
    pub session: String,
    pub announced: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipRow {
    pub name: String,
    pub address: String,
    pub protocol: String,
    pub mode: String,
    /// "connection", "client" or "client/24": which connections share a backend.
    #[serde(default)]
    pub affinity: String,
    /// Echo requests to the address are answered by the data plane.
    #[serde(default)]
    pub answer_ping: bool,
    pub snat: Option<String>,
    /// NAT: the source ports its flows take ("1024-32767"), clear of the host's own.
    #[serde(default)]
    pub snat_ports: Option<String>,
    pub backends: usize,
    /// Backends in the VIP's current table.
    pub serving: usize,
    pub slot: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendRow {
    pub vip: String,
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    /// Drained by the operator (shown as the state unless the backend is also down).
    pub drained: bool,
    /// "serving", "down", "standby" (backup not in use), "drained", "weight 0", "out".
    pub state: String,
    /// Health check view: "up", "down", or None without a check.
    pub health: Option<String>,
    /// The last check's result ("ok in 0.4 ms", "status 503", "timeout after 500ms").
    pub last_check: Option<String>,
    /// Seconds since the last health transition.
    pub since_seconds: Option<u64>,
    pub index: Option<u32>,
    pub mac: Option<String>,
    /// Share of the VIP's Maglev table.
    pub table_share: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrafficRow {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub packets_per_second: f64,
    pub bits_per_second: f64,
    pub new_flows_per_second: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStats {
    pub name: String,
    pub traffic: TrafficRow,
    pub backends: Vec<(String, TrafficRow)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthRow {
    pub vip: String,
    pub backend: String,
    pub up: bool,
    pub checks: u64,
    pub transitions: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsReport {
    /// Checked backends' health.
    #[serde(default)]
    pub health: Vec<HealthRow>,
    pub vips: Vec<VipStats>,
    /// Packets per verdict reason since the data plane was created.
    pub reasons: Vec<(String, u64)>,
    /// Seconds between the two samples the rates come from (0: no rate yet).
    pub rate_interval_seconds: f64,
    /// Frames the interface's driver failed to send back out (XDP_TX), when the driver counts
    /// them (veth does): forwarded by the program, lost on the wire.
    #[serde(default)]
    pub xdp_tx_errors: Option<u64>,
    /// Connection-table events (`FlowEvent`: half-open NAT ports taken back, table full) since
    /// this daemon loaded the program.
    #[serde(default)]
    pub flow_events: Vec<(String, u64)>,
    /// Whether a flood of new flows is on, and the rates behind it.
    #[serde(default)]
    pub flood: crate::flood::FloodState,
    /// In a pair: new NAT flows the program could not report to the daemon (its ring was full),
    /// so that the standby does not know them.
    #[serde(default)]
    pub nat_flows_lost: Option<u64>,
    /// The connection tables as the last sweep found them.
    #[serde(default)]
    pub tables: TablesState,
}

/// The connection tables (`CONNS`, `NAT_REV`) as the last sweep found them, and what the
/// sweeps removed since the daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablesState {
    /// Entries each table holds at most (`daemon.max_conns`).
    pub capacity: u32,
    pub connections: usize,
    pub nat_entries: usize,
    pub sweeps: u64,
    pub removed_connections: u64,
    pub removed_nat_entries: u64,
    pub last_sweep_micros: u64,
    /// Why the last pass failed, while sweeping fails.
    #[serde(default)]
    pub sweep_error: Option<String>,
}

impl TablesState {
    /// Adds one pass.
    pub fn record(&mut self, swept: &crate::dataplane::Swept) {
        self.connections = swept.connections.saturating_sub(swept.removed_connections);
        self.nat_entries = swept.nat_entries.saturating_sub(swept.removed_nat_entries);
        self.sweeps += 1;
        self.removed_connections += swept.removed_connections as u64;
        self.removed_nat_entries += swept.removed_nat_entries as u64;
        self.last_sweep_micros = swept.micros;
        self.sweep_error = None;
    }

    /// The fuller table's share of its capacity, in percent.
    pub fn fullest_percent(&self) -> u64 {
        (self.connections.max(self.nat_entries) as u64 * 100).checked_div(self.capacity as u64).unwrap_or(0)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub vip: Option<String>,
    pub backend: Option<String>,
    /// "connection table", "maglev", "not a VIP", "no backend".
    pub decided_by: String,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyReport {
    pub changes: Vec<String>,
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_leaves_the_tables_fill_and_ends_an_earlier_failure() {
        let mut tables = TablesState { capacity: 100, sweep_error: Some("EINVAL".into()), ..Default::default() };
        let swept = crate::dataplane::Swept {
            connections: 80,
            nat_entries: 30,
            removed_connections: 5,
            removed_nat_entries: 10,
            micros: 7,
        };
        tables.record(&swept);
        assert_eq!((tables.connections, tables.nat_entries, tables.sweeps), (75, 20, 1));
        assert_eq!((tables.removed_connections, tables.removed_nat_entries), (5, 10));
        assert_eq!(tables.fullest_percent(), 75, "the fuller table counts");
        assert_eq!(tables.sweep_error, None, "a pass that worked ends the warning");
        assert_eq!(TablesState::default().fullest_percent(), 0, "no capacity known yet");
    }
}
