//! Prometheus text exposition of the data plane's counters and the node's redundancy state,
//! served at `/metrics`.

use crate::report::{BgpStatus, StatsReport, VrrpStatus};
use std::fmt::Write;

/// Renders counters in the Prometheus text format (version 0.0.4). `vrrp` and `bgp` are given
/// when the node runs them.
pub fn render(stats: &StatsReport, vrrp: Option<&VrrpStatus>, bgp: Option<&BgpStatus>, instance: &str) -> String {
    let mut out = String::new();
    let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    type Field = fn(&crate::report::TrafficRow) -> u64;
    let families: [(&str, &str, Field); 3] = [
        ("packets", "Packets forwarded", |t| t.packets),
        ("bytes", "Bytes forwarded", |t| t.bytes),
        ("new_flows", "New flows balanced", |t| t.new_flows),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP lb_vip_{name}_total {help} to a VIP.\n# TYPE lb_vip_{name}_total counter");
        for vip in &stats.vips {
            let _ = writeln!(
                out,
                "lb_vip_{name}_total{{instance=\"{}\",vip=\"{}\"}} {}",
                label(instance),
                label(&vip.name),
                value(&vip.traffic)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lb_backend_{name}_total {help} to a backend.\n# TYPE lb_backend_{name}_total counter"
        );
        for vip in &stats.vips {
            for (backend, traffic) in &vip.backends {
                let _ = writeln!(
                    out,
                    "lb_backend_{name}_total{{instance=\"{}\",vip=\"{}\",backend=\"{}\"}} {}",
                    label(instance),
                    label(&vip.name),
                    label(backend),
                    value(traffic)
                );
            }
        }
    }
    let _ =
        writeln!(out, "# HELP lb_backend_up Whether the backend passes its health check.\n# TYPE lb_backend_up gauge");
    for h in &stats.health {
        let (vip, backend) = (label(&h.vip), label(&h.backend));
        let _ = writeln!(
            out,
            "lb_backend_up{{instance=\"{}\",vip=\"{vip}\",backend=\"{backend}\"}} {}",
            label(instance),
            h.up as u8
        );
    }
    let _ = writeln!(
        out,
        "# HELP lb_backend_health_transitions_total Health state changes.\n# TYPE lb_backend_health_transitions_total counter"
    );
    for h in &stats.health {
        let (vip, backend) = (label(&h.vip), label(&h.backend));
        let _ = writeln!(
            out,
            "lb_backend_health_transitions_total{{instance=\"{}\",vip=\"{vip}\",backend=\"{backend}\"}} {}",
            label(instance),
            h.transitions
        );
    }
    let _ = writeln!(
        out,
        "# HELP lb_packets_total Packets seen by the XDP program, by verdict reason.\n# TYPE lb_packets_total counter"
    );
    for (reason, count) in &stats.reasons {
        let _ = writeln!(out, "lb_packets_total{{instance=\"{}\",reason=\"{reason}\"}} {count}", label(instance));
    }
    if let Some(errors) = stats.xdp_tx_errors {
        let _ = writeln!(
            out,
            "# HELP lb_xdp_tx_errors_total Frames the interface's driver failed to send back out (XDP_TX).\n\
             # TYPE lb_xdp_tx_errors_total counter\nlb_xdp_tx_errors_total{{instance=\"{}\"}} {errors}",
            label(instance)
        );
    }
    if let Some(vrrp) = vrrp {
        let labels = format!("instance=\"{}\",vrid=\"{}\"", label(instance), vrrp.vrid);
        let gauges: [(&str, &str, usize); 4] = [
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
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP lb_vrrp_{name} {help}\n# TYPE lb_vrrp_{name} gauge\nlb_vrrp_{name}{{{labels}}} {value}"
            );
        }
    }
    if let Some(bgp) = bgp {
        let labels = format!("instance=\"{}\",neighbor=\"{}\"", label(instance), label(&bgp.neighbor));
        let gauges: [(&str, &str, usize); 2] = [
            (
                "session_up",
                "Whether the BGP session to the router is established.",
                usize::from(bgp.session == "Established"),
            ),
            ("announced_routes", "VIP routes this node announces.", bgp.announced.len()),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP lb_bgp_{name} {help}\n# TYPE lb_bgp_{name} gauge\nlb_bgp_{name}{{{labels}}} {value}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{HealthRow, TrafficRow, VipStats};

    #[test]
    fn renders_counters_and_health_in_prometheus_text() {
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
        };
        let text = render(&stats, None, None, "lb");
        for line in [
            "# TYPE lb_vip_packets_total counter",
            "lb_vip_packets_total{instance=\"lb\",vip=\"we\\\"b\"} 5",
            "lb_backend_packets_total{instance=\"lb\",vip=\"we\\\"b\",backend=\"10.0.1.1:80\"} 5",
            "lb_backend_up{instance=\"lb\",vip=\"web\",backend=\"10.0.1.1:80\"} 0",
            "lb_backend_health_transitions_total{instance=\"lb\",vip=\"web\",backend=\"10.0.1.1:80\"} 2",
            "lb_packets_total{instance=\"lb\",reason=\"tx_forward\"} 5",
            "lb_xdp_tx_errors_total{instance=\"lb\"} 7",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
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
            "lb_vrrp_peer_in_sync{instance=\"lb\",vrid=\"51\"} 1",
            "lb_bgp_session_up{instance=\"lb\",neighbor=\"10.0.9.1\"} 1",
            "lb_bgp_announced_routes{instance=\"lb\",neighbor=\"10.0.9.1\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
