//! The daemon in environments the project's own topology does not give it: an interface that
//! went away and came back, `ip netns exec` (no bpffs), a veth whose peer drops XDP_TX frames.
//! Each time it either copes and says what it did, or warns loudly in the log and `lb status`.

use lb_tests::daemon::{Launcher, LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, scrape_metrics, tcp_request, tcp_vip};
use lb_tests::topology::Topology;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);

/// `n` requests to the TCP VIP; returns how many were answered.
fn answered(topology: &Topology, n: usize) -> usize {
    topology.client.enter(|| (0..n).filter(|_| tcp_request(tcp_vip(), TIMEOUT).is_ok()).count()).unwrap()
}

fn status_json(daemon: &LbDaemon) -> serde_json::Value {
    serde_json::from_str(&daemon.ok(&["--json", "status"]).unwrap()).unwrap()
}

fn forwarded(daemon: &LbDaemon) -> u64 {
    daemon.reason_count("tx_forward").unwrap()
}

/// Polls `check` every 100 ms until it holds or `limit` passes; says what it waited for.
fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_severed_pinned_link_is_replaced_and_the_state_kept() {
    if !require_root("a_severed_pinned_link_is_replaced_and_the_state_kept") {
        return;
    }
    let mut topology = Topology::new(2, false).unwrap();
    let mut daemon = LbDaemon::start(&topology.lb, &unique_instance(), &nat_config(&topology, 2, None)).unwrap();
    assert_eq!(answered(&topology, 20), 20);
    let before = forwarded(&daemon);

    // The daemon dies, then its interface goes away and comes back (same name, new ifindex):
    // the pinned link now holds nothing.
    daemon.kill();
    topology.replug_lb().unwrap();
    daemon.restart().unwrap();

    let status = status_json(&daemon);
    let attachment = status["attachment"].as_str().unwrap();
    assert!(attachment.starts_with("attached anew (the pinned link was stale"), "{attachment}");
    assert!(daemon.log().contains("the pinned XDP link is stale"), "{}", daemon.log());
    assert_eq!(answered(&topology, 20), 20, "the new link serves");
    let after = forwarded(&daemon);
    assert!(after >= before + 20, "counters were kept with the maps: {before} before, {after} after");
    // And the next restart takes over the new link as usual.
    daemon.restart().unwrap();
    assert_eq!(status_json(&daemon)["attachment"], "took over the running data plane");
    assert_eq!(answered(&topology, 5), 5);
}

#[test]
fn under_ip_netns_exec_the_daemon_mounts_bpffs_and_says_the_data_plane_dies_with_it() {
    if !require_root("under_ip_netns_exec_the_daemon_mounts_bpffs_and_says_the_data_plane_dies_with_it") {
        return;
    }
    let topology = Topology::new(2, false).unwrap();
    // `ip netns exec` gives the daemon a fresh /sys without bpffs.
    let daemon =
        LbDaemon::start_with(&topology.lb, &unique_instance(), &nat_config(&topology, 2, None), Launcher::IpNetnsExec)
            .unwrap();
    let warnings = status_json(&daemon)["warnings"].clone();
    let warnings = warnings.as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w.as_str().unwrap().contains("vanishes when the daemon exits")),
        "lb status must warn: {warnings:?}"
    );
    assert!(daemon.log().contains("bpffs was not mounted"), "{}", daemon.log());
    assert_eq!(answered(&topology, 10), 10, "it serves nevertheless");
    // The host's bpffs never saw these pins.
    assert!(!lb::dataplane::PinDir::for_instance(&daemon.instance).path().exists());
}

#[test]
fn a_veth_peer_that_drops_xdp_tx_frames_is_reported_until_it_is_fixed() {
    if !require_root("a_veth_peer_that_drops_xdp_tx_frames_is_reported_until_it_is_fixed") {
        return;
    }
    const METRICS_PORT: u16 = 9931;
    let mut topology = Topology::new(2, false).unwrap();
    topology.remove_lb_port_pass();
    let config = nat_config(&topology, 2, None)
        .replace("[daemon]\n", &format!("[daemon]\nmetrics = \"127.0.0.1:{METRICS_PORT}\"\n"));
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config).unwrap();
    let port = topology.lb_port.clone();
    let status = daemon.ok(&["status"]).unwrap();
    assert!(
        status.contains("WARNING: eth0 is a veth whose peer")
            && status.contains(&format!("`lb xdp-pass attach {port}`")),
        "lb status must name the problem and its fix:\n{status}"
    );
    assert!(daemon.log().contains("has no native XDP program"), "{}", daemon.log());

    // Requests fail, and the driver's count of lost frames says why.
    assert_eq!(answered(&topology, 3), 0, "frames sent back out are dropped");
    let stats: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "stats"]).unwrap()).unwrap();
    let errors = stats["xdp_tx_errors"].as_u64().expect("veth counts XDP_TX errors");
    assert!(errors > 0, "{stats}");
    let metrics = scrape_metrics(&topology.lb, METRICS_PORT).unwrap();
    assert!(metrics.contains("lb_xdp_tx_errors_total{instance="), "{metrics}");

    // The fix the warning names, run where the peer lives.
    let lb = lb_tests::daemon::lb_binary();
    let fixed = topology.bridge.ns.nsenter(&[lb.to_str().unwrap(), "xdp-pass", "attach", &port]).unwrap();
    assert!(String::from_utf8_lossy(&fixed.stdout).contains("attached and pinned"), "{fixed:?}");
    assert_eq!(answered(&topology, 10), 10, "with the peer fixed, every request is answered");
    wait_until("the warning goes once the peer is fixed", Duration::from_secs(12), || {
        status_json(&daemon)["warnings"].as_array().unwrap().is_empty()
    });
    assert!(daemon.log().contains("arrive again"), "{}", daemon.log());
    let removed = topology.bridge.ns.nsenter(&[lb.to_str().unwrap(), "xdp-pass", "detach", &port]).unwrap();
    assert!(String::from_utf8_lossy(&removed.stdout).contains("detached"), "{removed:?}");
}
