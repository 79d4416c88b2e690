//! Interoperability: an `lb` node and a keepalived node (Debian's keepalived, VRRPv3) form one
//! virtual router: they elect one master and fail over to each other in both directions.

use lb_tests::netns::{Netns, Process};
use lb_tests::pair::{
    ADVERT_INTERVAL_MS, KEEPALIVED_V4, PairTopology, VRID, holds, preemption_bound, takeover_bound, wait_vrrp,
};
use lb_tests::privilege::require_root;
use lb_tests::topology::{SNAT_V4, VIP_V4};
use std::time::{Duration, Instant};

fn keepalived_config(priority: u8) -> String {
    format!(
        "global_defs {{\n  vrrp_version 3\n  router_id lbtest\n}}\n\
         vrrp_instance VI_1 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id {VRID}\n  priority {priority}\n  \
         advert_int {}\n  virtual_ipaddress {{\n    {SNAT_V4}/32\n    {VIP_V4}/32\n  }}\n}}\n",
        ADVERT_INTERVAL_MS as f64 / 1000.0
    )
}

struct Keepalived {
    _process: Process,
    dir: std::path::PathBuf,
}

impl Keepalived {
    fn start(ns: &Netns, priority: u8) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-test-keepalived-{}", ns.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("keepalived.conf");
        std::fs::write(&config, keepalived_config(priority)).unwrap();
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let process = ns
            .spawn(&[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--vrrp",
                "--use-file",
                &path("keepalived.conf"),
                "--pid",
                &path("keepalived.pid"),
                "--vrrp_pid",
                &path("vrrp.pid"),
            ])
            .expect("keepalived is installed (cargo xtask setup installs it)");
        Self { _process: process, dir }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `ns` holds (or no longer holds) the VIP; returns how long it took.
fn wait_holds(ns: &Netns, want: bool, what: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while holds(ns, VIP_V4) != want {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

#[test]
fn lb_and_keepalived_elect_one_master_and_fail_over_to_each_other() {
    if !require_root("lb_and_keepalived_elect_one_master_and_fail_over_to_each_other") {
        return;
    }
    let bound = takeover_bound();
    let mut pair = PairTopology::new(1).unwrap();
    let keepalived_ns = Netns::new("keepalived").unwrap();
    pair.net.bridge.plug(&keepalived_ns, "eth0").unwrap();
    keepalived_ns.addr("eth0", &format!("{KEEPALIVED_V4}/24")).unwrap();

    // keepalived alone becomes master.
    let _keepalived = Keepalived::start(&keepalived_ns, 100);
    wait_holds(&keepalived_ns, true, "keepalived alone becomes master", bound + Duration::from_secs(2));

    // Our node, with the higher priority, preempts it: keepalived accepts our advertisements.
    let lb = pair.start(false, 200).unwrap();
    let took =
        wait_vrrp(&lb, "lb preempts keepalived", bound + Duration::from_secs(1), |s| s["state"] == "master").unwrap();
    wait_holds(&keepalived_ns, false, "keepalived steps back", bound);
    println!("lb (priority 200) took over from keepalived (100) in {took:?}; keepalived released the VIP");
    assert!(holds(pair.node(false), VIP_V4));

    // Our node is cut off: keepalived takes over by itself.
    let cut = Instant::now();
    pair.node(false).ip(&["link", "set", "eth0", "down"]).unwrap();
    wait_holds(&keepalived_ns, true, "keepalived takes over from a cut-off lb", bound);
    println!("keepalived took over from the cut-off lb node in {:?}", cut.elapsed());

    // It comes back and preempts again; keepalived sees our advertisements and steps back.
    pair.node(false).ip(&["link", "set", "eth0", "up"]).unwrap();
    let took = wait_vrrp(&lb, "lb preempts again", preemption_bound(), |s| s["state"] == "master").unwrap();
    wait_holds(&keepalived_ns, false, "keepalived steps back again", bound);
    println!("lb preempted keepalived again {took:?} after its link came back");

    // `lb failover`: our node hands over on purpose and keepalived takes over at once.
    let handed = Instant::now();
    lb.ok(&["failover"]).unwrap();
    wait_holds(&keepalived_ns, true, "keepalived takes over after lb failover", bound);
    println!("keepalived took over after `lb failover` in {:?}", handed.elapsed());
    wait_vrrp(&lb, "lb is backup after handing over", Duration::from_secs(2), |s| s["state"] == "backup").unwrap();
    assert!(!holds(pair.node(false), VIP_V4), "only one node holds the VIP");
}
