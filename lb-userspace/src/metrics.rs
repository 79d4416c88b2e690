//! The OpenMetrics exposition of the data plane's counters and the node's redundancy state,
//! served at `/metrics`, through the `prometheus-client` crate. Every scrape encodes a fresh
//! registry from the daemon's current report: the counters live in BPF maps, not here.

use crate::report::{BgpStatus, StatsReport, TrafficRow, VrrpStatus};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The Content-Type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

fn counters() -> Family<Labels, Counter> {
    Family::default()
}

fn gauges() -> Family<Labels, Gauge> {
    Family::default()
}

/// Renders the metrics (OpenMetrics text). `vrrp` and `bgp` are given when the node runs them.
pub fn render(stats: &StatsReport, vrrp: Option<&VrrpStatus>, bgp: Option<&BgpStatus>, instance: &str) -> String {
    let mut registry = Registry::default();
    let labels = |more: &[(&'static str, &str)]| -> Labels {
        std::iter::once(("instance", instance.to_string()))
            .chain(more.iter().map(|(k, v)| (*k, v.to_string())))
            .collect()
    };
    registry.register(
        "lb_build",
        "The running lb's version.",
        Info::new(labels(&[("version", env!("CARGO_PKG_VERSION"))])),
    );
    type Field = fn(&TrafficRow) -> u64;
    let families: [(&str, &str, Field); 3] = [
        ("packets", "Packets forwarded", |t| t.packets),
        ("bytes", "Bytes forwarded", |t| t.bytes),
        ("new_flows", "New flows balanced", |t| t.new_flows),
    ];
    for (name, help, value) in families {
        let (vips, backends) = (counters(), counters());
        for vip in &stats.vips {
            vips.get_or_create(&labels(&[("vip", &vip.name)])).inc_by(value(&vip.traffic));
            for (backend, traffic) in &vip.backends {
                backends.get_or_create(&labels(&[("vip", &vip.name), ("backend", backend)])).inc_by(value(traffic));
            }
        }
        registry.register(format!("lb_vip_{name}"), format!("{help} to a VIP."), vips);
        registry.register(format!("lb_backend_{name}"), format!("{help} to a backend."), backends);
    }
    let (up, transitions) = (gauges(), counters());
    for h in &stats.health {
        let labels = labels(&[("vip", &h.vip), ("backend", &h.backend)]);
        up.get_or_create(&labels).set(h.up as i64);
        transitions.get_or_create(&labels).inc_by(h.transitions);
    }
    registry.register("lb_backend_up", "Whether the backend passes its health check.", up);
    registry.register("lb_backend_health_transitions", "Health state changes.", transitions);
    let reasons = counters();
    for (reason, count) in &stats.reasons {
        reasons.get_or_create(&labels(&[("reason", reason)])).inc_by(*count);
    }
    registry.register("lb_packets", "Packets seen by the XDP program, by verdict reason.", reasons);
    let events = counters();
    for (event, count) in &stats.flow_events {
        events.get_or_create(&labels(&[("event", event)])).inc_by(*count);
    }
    registry.register(
        "lb_flow_events",
        "Connection-table events: half-open NAT ports taken back, table full, flows not recorded during a flood.",
        events,
    );
    let flood = gauges();
    flood.get_or_create(&labels(&[])).set(stats.flood.active as i64);
    registry.register("lb_flood_active", "1 while a flood of new flows is on (daemon.flood_new_flows).", flood);
    let rate = gauges();
    rate.get_or_create(&labels(&[])).set(stats.flood.busiest_cpu_rate as i64);
    registry.register("lb_busiest_cpu_new_flows_per_second", "New flows per second on the busiest CPU.", rate);
    let tables = &stats.tables;
    let entries = gauges();
    entries.get_or_create(&labels(&[("table", "connections")])).set(tables.connections as i64);
    entries.get_or_create(&labels(&[("table", "nat_ports")])).set(tables.nat_entries as i64);
    registry.register("lb_table_entries", "Entries in the connection tables at the last sweep.", entries);
    let capacity = gauges();
    capacity.get_or_create(&labels(&[])).set(tables.capacity as i64);
    registry.register("lb_table_capacity", "Entries each connection table holds at most (daemon.max_conns).", capacity);
    let swept = counters();
    swept.get_or_create(&labels(&[("table", "connections")])).inc_by(tables.removed_connections);
    swept.get_or_create(&labels(&[("table", "nat_ports")])).inc_by(tables.removed_nat_entries);
    registry.register("lb_table_swept", "Entries the sweep removed (quiet or finished flows).", swept);
    let sweep_time = gauges();
    sweep_time.get_or_create(&labels(&[])).set(tables.last_sweep_micros as i64);
    registry.register("lb_table_sweep_microseconds", "How long the last sweep of the tables took.", sweep_time);
    if let Some(errors) = stats.xdp_tx_errors {
        let family = counters();
        family.get_or_create(&labels(&[])).inc_by(errors);
        registry.register(
            "lb_xdp_tx_errors",
            "Frames the interface's driver failed to send back out (XDP_TX).",
            family,
        );
    }
    if let Some(lost) = stats.nat_flows_lost {
        let family = counters();
        family.get_or_create(&labels(&[])).inc_by(lost);
        registry.register(
            "lb_nat_flows_lost",
            "New NAT flows the program could not report for the standby (its ring buffer was full).",
            family,
        );
    }
    if let Some(vrrp) = vrrp {
        let vrid = vrrp.vrid.to_string();
        let node = labels(&[("vrid", &vrid)]);
        let flow_counters: [(&str, &str, u64); 2] = [
            ("nat_flows_sent", "NAT flows sent to the peer node.", vrrp.nat_flows_sent),
            ("nat_flows_adopted", "NAT flows of the peer node installed here.", vrrp.nat_flows_adopted),
        ];
        for (name, help, value) in flow_counters {
            let family = counters();
            family.get_or_create(&node).inc_by(value);
            registry.register(format!("lb_vrrp_{name}"), help, family);
        }
        let gauges_of: [(&str, &str, usize); 4] = [
            (
                "master",
                "Whether this node is the VRRP master (for every address family it serves).",
                usize::from(vrrp.state == "master"),
            ),
            (
                "fault",
                "Whether this node is unfit to be master (data plane not attached, or a VIP without usable backend).",
                usize::from(vrrp.fault.is_some()),
            ),
            (
                "router_errors",
                "VRRP routers (one per address family) that cannot run; see `lb status`.",
                vrrp.errors.len(),
            ),
            (
                "peer_in_sync",
                "Whether the other node confirmed the same desired state within the last 5 s.",
                usize::from(vrrp.sync.starts_with("in sync")),
            ),
        ];
        for (name, help, value) in gauges_of {
            let family = gauges();
            family.get_or_create(&node).set(value as i64);
            registry.register(format!("lb_vrrp_{name}"), help, family);
        }
    }
    if let Some(bgp) = bgp {
        let session = labels(&[("neighbor", &bgp.neighbor)]);
        let gauges_of: [(&str, &str, usize); 2] = [
            (
                "session_up",
                "Whether the BGP session to the router is established.",
                usize::from(bgp.session == "Established"),
            ),
            ("announced_routes", "VIP routes this node announces.", bgp.announced.len()),
        ];
        for (name, help, value) in gauges_of {
            let family = gauges();
            family.get_or_create(&session).set(value as i64);
            registry.register(format!("lb_bgp_{name}"), help, family);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{HealthRow, TrafficRow, VipStats};

    #[test]
    fn renders_counters_and_health_in_openmetrics_text() {
        let stats = StatsReport {
            health: vec![HealthRow {
                vip: "web".into(),
                backend: "10.0.1.1:80".into(),
                up: false,
                checks: 9,
                transitions: 2,
            }],
            vips: vec![VipStats {
                name: "we\"b".into(),
                traffic: TrafficRow { packets: 5, bytes: 300, new_flows: 2, ..Default::default() },
                backends: vec![("10.0.1.1:80".into(), TrafficRow { packets: 5, ..Default::default() })],
            }],
            reasons: vec![("tx_forward".into(), 5)],
            rate_interval_seconds: 1.0,
            xdp_tx_errors: Some(7),
            flow_events: vec![("table_full".into(), 2)],
            flood: crate::flood::FloodState { active: true, busiest_cpu_rate: 70_000, threshold: 50_000, floods: 1 },
            nat_flows_lost: Some(3),
            tables: crate::report::TablesState {
                capacity: 1024,
                connections: 10,
                removed_nat_entries: 4,
                ..Default::default()
            },
        };
        let text = render(&stats, None, None, "lb");
        for line in [
            "lb_nat_flows_lost_total{instance=\"lb\"} 3",
            "# TYPE lb_vip_packets counter",
            "lb_build_info{instance=\"lb\",version=\"0.1.0\"} 1",
            "lb_vip_packets_total{instance=\"lb\",vip=\"we\\\"b\"} 5",
            "lb_backend_packets_total{instance=\"lb\",vip=\"we\\\"b\",backend=\"10.0.1.1:80\"} 5",
            "lb_backend_up{instance=\"lb\",vip=\"web\",backend=\"10.0.1.1:80\"} 0",
            "lb_backend_health_transitions_total{instance=\"lb\",vip=\"web\",backend=\"10.0.1.1:80\"} 2",
            "lb_packets_total{instance=\"lb\",reason=\"tx_forward\"} 5",
            "lb_xdp_tx_errors_total{instance=\"lb\"} 7",
            "lb_flow_events_total{instance=\"lb\",event=\"table_full\"} 2",
            "lb_flood_active{instance=\"lb\"} 1",
            "lb_busiest_cpu_new_flows_per_second{instance=\"lb\"} 70000",
            "lb_table_entries{instance=\"lb\",table=\"connections\"} 10",
            "lb_table_capacity{instance=\"lb\"} 1024",
            "lb_table_swept_total{instance=\"lb\",table=\"nat_ports\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(!text.contains("lb_vrrp_") && !text.contains("lb_bgp_"), "no redundancy metrics without it");
    }

    #[test]
    fn renders_the_redundancy_state() {
        let stats = StatsReport {
            health: vec![],
            vips: vec![],
            reasons: vec![],
            rate_interval_seconds: 0.0,
            xdp_tx_errors: None,
            flow_events: vec![],
            flood: Default::default(),
            nat_flows_lost: None,
            tables: Default::default(),
        };
        let vrrp = VrrpStatus {
            vrid: 51,
            priority: 100,
            state: "master (IPv4), failed (IPv6)".into(),
            fault: None,
            errors: vec!["IPv6: eth0 has no IPv6 link-local address".into()],
            master: Some("10.0.0.2".into()),
            addresses: vec![],
            peer: "10.0.0.4:7946".into(),
            sync: "in sync (the standby confirmed 0.4 s ago)".into(),
            digest: "0".into(),
            nat_flows_sent: 7,
            nat_flows_adopted: 0,
        };
        let bgp = BgpStatus {
            neighbor: "10.0.9.1".into(),
            session: "Established".into(),
            announced: vec!["10.0.0.100/32".into()],
        };
        let text = render(&stats, Some(&vrrp), Some(&bgp), "lb");
        for line in [
            "# TYPE lb_vrrp_master gauge",
            "lb_vrrp_master{instance=\"lb\",vrid=\"51\"} 0",
            "lb_vrrp_fault{instance=\"lb\",vrid=\"51\"} 0",
            "lb_vrrp_router_errors{instance=\"lb\",vrid=\"51\"} 1",
            "lb_vrrp_nat_flows_sent_total{instance=\"lb\",vrid=\"51\"} 7",
            "lb_vrrp_peer_in_sync{instance=\"lb\",vrid=\"51\"} 1",
            "lb_bgp_session_up{instance=\"lb\",neighbor=\"10.0.9.1\"} 1",
            "lb_bgp_announced_routes{instance=\"lb\",neighbor=\"10.0.9.1\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
