//! The status page served at `/` on the metrics address: every VIP with its backends, their
//! state, health and share of the table, the rates, and the pair and BGP state. Plain HTML that
//! reloads itself every few seconds; no script, nothing fetched from elsewhere.

use crate::report::{BackendRow, StatsReport, StatusReport, TrafficRow, VipRow};
use std::fmt::Write;

/// Seconds between the page's own reloads.
pub const REFRESH_SECONDS: u32 = 2;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .3em}\
table{border-collapse:collapse;margin:.3em 0}th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}\
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.serving{background:#e3f6e3}.down{background:#fbe0e0}.drained,.standby,.out{background:#fff4d6}\
.warn{color:#a00}.meta{color:#555}";

/// The whole page.
pub fn render(status: &StatusReport, vips: &[VipRow], backends: &[BackendRow], stats: &StatsReport) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>lb {instance}</title><style>{STYLE}</style></head><body>",
        instance = escape(&status.instance)
    );
    let _ = write!(
        page,
        "<h1>lb {}: {} VIPs, {} backends</h1><p class=\"meta\">interface {} ({}), {}; up {}; rates over the last {:.0} s</p>",
        escape(&status.instance),
        status.vips,
        status.backends,
        escape(&status.interface),
        escape(&status.xdp_mode),
        escape(&status.attachment),
        uptime(status.uptime_seconds),
        stats.rate_interval_seconds
    );
    for warning in &status.warnings {
        let _ = write!(page, "<p class=\"warn\">warning: {}</p>", escape(warning));
    }
    if let Some(vrrp) = &status.vrrp {
        let _ = write!(
            page,
            "<p>VRRP {} (priority {}), peer {}, sync {}{}</p>",
            escape(&vrrp.state),
            vrrp.priority,
            escape(&vrrp.peer),
            escape(&vrrp.sync),
            vrrp.fault
                .as_deref()
                .map(|f| format!(", <span class=\"warn\">fault: {}</span>", escape(f)))
                .unwrap_or_default()
        );
    }
    if let Some(bgp) = &status.bgp {
        let _ = write!(
            page,
            "<p>BGP with {}: {}, announcing {}</p>",
            escape(&bgp.neighbor),
            escape(&bgp.session),
            escape(&bgp.announced.join(", "))
        );
    }
    for vip in vips {
        let traffic = stats.vips.iter().find(|v| v.name == vip.name);
        let _ = write!(
            page,
            "<h2 id=\"vip-{name}\">{name}: {} {} ({}, affinity {})</h2><p>{} of {} backends serving; {}</p>",
            escape(&vip.address),
            escape(&vip.protocol),
            escape(&vip.mode),
            escape(&vip.affinity),
            vip.serving,
            vip.backends,
            traffic.map(|t| rates(&t.traffic)).unwrap_or_default(),
            name = escape(&vip.name),
        );
        page.push_str(
            "<table><tr><th>backend</th><th>state</th><th>health</th><th>last check</th><th>since</th>\
             <th>weight</th><th>table share</th><th>packets/s</th><th>bit/s</th><th>new flows/s</th></tr>",
        );
        for backend in backends.iter().filter(|b| b.vip == vip.name) {
            let traffic = traffic.and_then(|t| t.backends.iter().find(|(a, _)| *a == backend.address)).map(|(_, t)| t);
            let role = if backend.backup { " (backup)" } else { "" };
            let _ = write!(
                page,
                "<tr class=\"{state}\"><td>{}{role}</td><td>{state}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{:.1} %</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&backend.address),
                escape(backend.health.as_deref().unwrap_or("not checked")),
                escape(backend.last_check.as_deref().unwrap_or("")),
                backend.since_seconds.map(uptime).unwrap_or_default(),
                backend.weight,
                backend.table_share * 100.0,
                traffic.map(|t| si(t.packets_per_second)).unwrap_or_default(),
                traffic.map(|t| si(t.bits_per_second)).unwrap_or_default(),
                traffic.map(|t| si(t.new_flows_per_second)).unwrap_or_default(),
                state = escape(&backend.state),
            );
        }
        page.push_str("</table>");
    }
    page.push_str("</body></html>\n");
    page
}

fn rates(traffic: &TrafficRow) -> String {
    format!(
        "{} packets/s, {} bit/s, {} new flows/s",
        si(traffic.packets_per_second),
        si(traffic.bits_per_second),
        si(traffic.new_flows_per_second)
    )
}

/// 1234567 → "1.2M".
fn si(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn uptime(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Text as HTML: names and messages come from the configuration and the network.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_numbers_readable() {
        assert_eq!(escape("<b>\"a\" & 'b'</b>"), "&lt;b&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/b&gt;");
        assert_eq!(si(1_234_567.0), "1.2M");
        assert_eq!(si(12.4), "12");
        assert_eq!(uptime(3_725), "1h 2m");
    }
}
