//! The XDP program attaches to a veth inside a namespace, sees real traffic, and detaches.

use lb::dataplane::{AttachMode, Dataplane};
use lb_tests::netns::{Netns, veth};
use lb_tests::privilege::require_root;

const PINGS: u64 = 5;

/// Attaches to the receiving end of a veth pair between two fresh namespaces, pings across, and
/// checks that every echo request passed through the program (counted) and was answered (passed).
fn counts_packets_crossing_a_veth(mode: AttachMode) {
    let a = Netns::new("a").unwrap();
    let b = Netns::new("b").unwrap();
    veth(&a, "va", &b, "vb").unwrap();
    a.addr("va", "192.0.2.1/24").unwrap();
    b.addr("vb", "192.0.2.2/24").unwrap();

    let dataplane = b
        .enter(|| -> anyhow::Result<Dataplane> {
            let mut dataplane = Dataplane::load(lb_tests::harness::test_sizes())?;
            dataplane.attach("vb", mode)?;
            Ok(dataplane)
        })
        .unwrap()
        .unwrap();
    let attached = b.ip(&["link", "show", "vb"]).unwrap();
    assert!(String::from_utf8_lossy(&attached.stdout).contains("xdp"), "vb shows no XDP program: {attached:?}");

    let total_before: u64 = dataplane.reason_counters().unwrap().iter().map(|(_, n)| n).sum();
    let ping = a.exec(&["ping", "-c", &PINGS.to_string(), "-i", "0.05", "-W", "2", "192.0.2.2"]).unwrap();
    assert!(String::from_utf8_lossy(&ping.stdout).contains(&format!("{PINGS} received")), "{ping:?}");
    let total_after: u64 = dataplane.reason_counters().unwrap().iter().map(|(_, n)| n).sum();
    assert!(
        total_after - total_before >= PINGS,
        "program counted {} packets for {PINGS} pings",
        total_after - total_before
    );

    // Dropping the dataplane detaches the program; the link works without it.
    drop(dataplane);
    let detached = b.ip(&["link", "show", "vb"]).unwrap();
    assert!(!String::from_utf8_lossy(&detached.stdout).contains("xdp"), "program still attached: {detached:?}");
    a.exec(&["ping", "-c", "1", "-W", "2", "192.0.2.2"]).unwrap();
}

#[test]
fn native_mode_counts_packets_crossing_a_veth() {
    if require_root("native_mode_counts_packets_crossing_a_veth") {
        counts_packets_crossing_a_veth(AttachMode::Native);
    }
}

#[test]
fn generic_mode_counts_packets_crossing_a_veth() {
    if require_root("generic_mode_counts_packets_crossing_a_veth") {
        counts_packets_crossing_a_veth(AttachMode::Generic);
    }
}
