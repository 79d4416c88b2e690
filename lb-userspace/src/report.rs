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
    pub state_file: String,
    pub config_file: String,
    pub uptime_seconds: u64,
    pub vips: usize,
    pub backends: usize,
    pub ring_size: u32,
    pub max_vips: u32,
    pub max_conns: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipRow {
    pub name: String,
    pub address: String,
    pub protocol: String,
    pub mode: String,
    pub snat: Option<String>,
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
    /// "serving", "standby" (backup not in use), "drained", "weight 0".
    pub state: String,
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
pub struct StatsReport {
    pub vips: Vec<VipStats>,
    /// Packets per verdict reason since the data plane was created.
    pub reasons: Vec<(String, u64)>,
    /// Seconds between the two samples the rates come from (0: no rate yet).
    pub rate_interval_seconds: f64,
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
