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
    let _ = writeln!(
        out,
        "# HELP lb_packets_total Packets seen by the XDP program, by verdict reason.\n# TYPE lb_packets_total counter"
    );
    for (reason, count) in &stats.reasons {
        let _ = writeln!(out, "lb_packets_total{{instance=\"{}\",reason=\"{reason}\"}} {count}", label(instance));
    }
    out
}
