//! Prometheus text exposition of the data plane's counters, served at `/metrics`.

use crate::report::StatsReport;
use std::fmt::Write;

/// Renders counters in the Prometheus text format (version 0.0.4).
pub fn render(stats: &StatsReport, instance: &str) -> String {
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
        };
        let text = render(&stats, "lb");
        for line in [
            "# TYPE lb_vip_packets_total counter",
            "lb_vip_packets_total{instance=\"lb\",vip=\"we\\\"b\"} 5",
            "lb_backend_packets_total{instance=\"lb\",vip=\"we\\\"b\",backend=\"10.0.1.1:80\"} 5",
            "lb_backend_up{instance=\"lb\",vip=\"web\",backend=\"10.0.1.1:80\"} 0",
            "lb_backend_health_transitions_total{instance=\"lb\",vip=\"web\",backend=\"10.0.1.1:80\"} 2",
            "lb_packets_total{instance=\"lb\",reason=\"tx_forward\"} 5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
