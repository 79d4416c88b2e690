//! The `[vrrp]` (active/standby) and `[bgp]` (active/active) sections: settings of this node,
//! never replicated (priorities and AS numbers differ between nodes).

use super::{Report, parse_ip, parse_socket_addr};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use toml::Spanned;

/// Active/standby with VRRPv3 (RFC 5798) and replication of the desired state to the peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VrrpSettings {
    pub vrid: u8,
    pub priority: u8,
    pub advert_interval: Duration,
    pub preempt: bool,
    /// Where this node accepts the desired state from the active peer.
    pub listen: SocketAddr,
    /// Where the peer accepts it from us.
    pub peer: SocketAddr,
    /// Shared secret authenticating replication (HMAC-SHA256).
    pub key: String,
}

/// Active/active: the healthy VIPs are announced over BGP by a BIRD the daemon runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BgpSettings {
    pub local_as: u32,
    pub router_id: std::net::Ipv4Addr,
    pub neighbor: IpAddr,
    pub neighbor_as: u32,
    pub hold_time: u16,
    /// The BIRD binary (found on PATH by default).
    pub bird: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVrrp {
    vrid: Spanned<u32>,
    priority: Option<Spanned<u32>>,
    advert_interval: Option<Spanned<String>>,
    preempt: Option<bool>,
    listen: Spanned<String>,
    peer: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBgp {
    local_as: Spanned<u32>,
    router_id: Spanned<String>,
    neighbor: Spanned<String>,
    neighbor_as: Spanned<u32>,
    hold_time: Option<Spanned<u32>>,
    bird: Option<String>,
}

/// Shortest key accepted: a replication key must not be guessable.
const MIN_KEY_LEN: usize = 16;

pub(super) fn convert_vrrp(report: &mut Report, raw: &RawVrrp) -> Option<VrrpSettings> {
    let before = report.problems.len();
    let vrid = *raw.vrid.get_ref();
    if !(1..=255).contains(&vrid) {
        report.add(&raw.vrid.span(), "vrrp.vrid", format!("{vrid} is not a virtual router id (1-255)"));
    }
    let priority = raw.priority.as_ref().map_or(100, |p| *p.get_ref());
    if !(1..=254).contains(&priority) {
        let span = raw.priority.as_ref().map(Spanned::span).unwrap_or_default();
        report.add(
            &span,
            "vrrp.priority",
            format!("{priority} is not a backup priority (1-254; 255 is reserved for the owner of the addresses)"),
        );
    }
    let advert_interval = match &raw.advert_interval {
        None => Some(Duration::from_secs(1)),
        Some(text) => report.parse(text, "vrrp.advert_interval", |t| {
            let d = humantime::parse_duration(t).map_err(|e| format!("{t:?} is not a duration ({e})"))?;
            // VRRPv3 carries the interval in centiseconds, 12 bits.
            if d < Duration::from_millis(10) || d > Duration::from_millis(40_950) || d.as_millis() % 10 != 0 {
                return Err(format!("{t:?}: VRRPv3 intervals are whole centiseconds from 10ms to 40.95s"));
            }
            Ok(d)
        }),
    };
    let listen = report.parse(&raw.listen, "vrrp.listen", parse_socket_addr);
    let peer = report.parse(&raw.peer, "vrrp.peer", parse_socket_addr);
    let key = raw.key.get_ref().clone();
    if key.len() < MIN_KEY_LEN {
        report.add(&raw.key.span(), "vrrp.key", format!("the shared key must be at least {MIN_KEY_LEN} characters"));
    }
    if report.problems.len() > before {
        return None;
    }
    Some(VrrpSettings {
        vrid: vrid as u8,
        priority: priority as u8,
        advert_interval: advert_interval?,
        preempt: raw.preempt.unwrap_or(true),
        listen: listen?,
        peer: peer?,
        key,
    })
}

pub(super) fn convert_bgp(report: &mut Report, raw: &RawBgp) -> Option<BgpSettings> {
    let before = report.problems.len();
    for (value, field) in [(&raw.local_as, "bgp.local_as"), (&raw.neighbor_as, "bgp.neighbor_as")] {
        if *value.get_ref() == 0 {
            report.add(&value.span(), field, "0 is not an AS number");
        }
    }
    let router_id = report.parse(&raw.router_id, "bgp.router_id", |t| {
        t.parse().map_err(|_| format!("{t:?} is not a router id (an IPv4 address)"))
    });
    let neighbor = report.parse(&raw.neighbor, "bgp.neighbor", parse_ip);
    let hold_time = raw.hold_time.as_ref().map_or(9, |h| *h.get_ref());
    if hold_time != 0 && !(3..=65535).contains(&hold_time) {
        let span = raw.hold_time.as_ref().map(Spanned::span).unwrap_or_default();
        report.add(&span, "bgp.hold_time", format!("{hold_time}: BGP hold times are 0 or 3-65535 seconds"));
    }
    if report.problems.len() > before {
        return None;
    }
    Some(BgpSettings {
        local_as: *raw.local_as.get_ref(),
        router_id: router_id?,
        neighbor: neighbor?,
        neighbor_as: *raw.neighbor_as.get_ref(),
        hold_time: hold_time as u16,
        bird: raw.bird.clone().unwrap_or_else(|| "bird".to_string()),
    })
}
