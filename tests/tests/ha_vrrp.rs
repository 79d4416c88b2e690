//! Active/standby: two `lb` nodes elect a master with VRRPv3, the master owns the VIP and the
//! SNAT address, the standby follows its desired state, and takes over when the active node is
//! cut off or removed, while a client keeps requesting through the VIP.

use lb_tests::pair::{
    LongLived, METRICS_PORT, PairTopology, VRID, holds, neighbour_mac, preemption_bound, takeover_bound, vrrp_status,
    wait_vrrp,
};
use lb_tests::privilege::require_root;
use lb_tests::service::{scrape_metrics, tcp_request, tcp_vip};
use lb_tests::topology::{SERVICE_PORT, VIP_V4, VIP_V6};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Requests made by the client: when each started and whether it was answered.
#[derive(Default)]
struct Outcomes(Mutex<Vec<(Instant, bool)>>);

impl Outcomes {
    /// (answered, failed) among requests started in `[from, to)`.
    fn between(&self, from: Instant, to: Instant) -> (usize, usize) {
        let all = self.0.lock().unwrap();
        let window: Vec<bool> = all.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, ok)| *ok).collect();
        (window.iter().filter(|ok| **ok).count(), window.iter().filter(|ok| !**ok).count())
    }
}

fn master(status: &serde_json::Value) -> bool {
    status["state"] == "master"
}

fn backup(status: &serde_json::Value) -> bool {
    status["state"] == "backup"
}

fn in_sync(status: &serde_json::Value) -> bool {
    status["sync"].as_str().is_some_and(|s| s.starts_with("in sync"))
}

#[test]
fn the_standby_takes_over_when_the_active_is_cut_off_or_removed() {
    if !require_root("the_standby_takes_over_when_the_active_is_cut_off_or_removed") {
        return;
    }
    let pair = PairTopology::new(2).unwrap();
    let a = pair.start(false, 200).unwrap();
    wait_vrrp(&a, "node a becomes master", Duration::from_secs(5), master).unwrap();
    assert!(holds(pair.node(false), VIP_V4), "the master holds the VIP");
    let b = pair.start(true, 100).unwrap();
    wait_vrrp(&b, "node b is a synchronised backup", Duration::from_secs(5), |s| backup(s) && in_sync(s)).unwrap();
    wait_vrrp(&a, "node a sees b in sync", Duration::from_secs(5), in_sync).unwrap();
    assert!(!holds(pair.node(true), VIP_V4), "the backup does not hold the VIP");
    wait_until("the master holds the IPv6 VIP (its IPv6 router needs a usable link-local address)", || {
        holds(pair.node(false), VIP_V6)
    });
    assert!(!holds(pair.node(true), VIP_V6));
    assert_ipv6_answers(&pair);
    // What an operator's monitoring sees on each node.
    for (name, node, daemon, master) in [("a", false, &a, 1), ("b", true, &b, 0)] {
        let metrics = scrape_metrics(pair.node(node), METRICS_PORT).unwrap();
        let labels = format!("{{instance=\"{}\",vrid=\"{VRID}\"}}", daemon.instance);
        for line in [format!("lb_vrrp_master{labels} {master}"), format!("lb_vrrp_peer_in_sync{labels} 1")] {
            assert!(metrics.lines().any(|l| l == line), "node {name}: missing {line:?} in:\n{metrics}");
        }
    }

    // The configuration stays identical: an edit on the active node reaches the standby;
    // the standby refuses edits of its own.
    let be2 = format!("{}:{SERVICE_PORT}", pair.net.backends[1].v4);
    a.ok(&["backend", "drain", "--vip", "web", "--address", &be2]).unwrap();
    let started = Instant::now();
    while b.configuration().unwrap() != a.configuration().unwrap() {
        assert!(started.elapsed() < Duration::from_secs(3), "the drain did not reach the standby:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("replication: an edit on the active node reached the standby in {:?}", started.elapsed());
    a.ok(&["backend", "undrain", "--vip", "web", "--address", &be2]).unwrap();
    let refused = b.cli(&["backend", "drain", "--vip", "web", "--address", &be2]).unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("standby") && message.contains("active node"), "{message}");
    wait_vrrp(&b, "digests equal", Duration::from_secs(3), |s| {
        in_sync(s) && vrrp_status(&a).is_ok_and(|sa| sa["digest"] == s["digest"])
    })
    .unwrap();

    let outcomes = Outcomes::default();
    let running = AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            pair.net
                .client
                .enter(|| {
                    // Bounded: stops when the test says so, or after 60 s whatever happens.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while running.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let at = Instant::now();
                        // Below TCP's first SYN retransmission (1 s): a dropped SYN is a
                        // failure, a slow but answered request on a busy machine is not.
                        let ok = tcp_request(tcp_vip(), Duration::from_millis(900)).is_ok();
                        outcomes.0.lock().unwrap().push((at, ok));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
                .unwrap();
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            scenarios(&pair, a, &b, &outcomes);
        }));
        running.store(false, Ordering::Relaxed);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}

fn scenarios(
    pair: &PairTopology,
    mut a: lb_tests::daemon::LbDaemon,
    b: &lb_tests::daemon::LbDaemon,
    outcomes: &Outcomes,
) {
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed) = outcomes.between(Instant::now() - Duration::from_secs(1), Instant::now());
    assert!(ok > 0 && failed == 0, "steady state through the master: {ok} answered, {failed} failed");
    // Long-lived NAT connections through the active node; the standby learns them within
    // milliseconds (the active streams new NAT flows).
    let mut connections = LongLived::open(pair, 10);
    wait_until("the standby knows every long-lived connection", || connections.known_to(pair, b).is_ok());
    connections.known_to(pair, b).unwrap();

    // 1. The active node is cut off (its link goes down): the standby takes over.
    let cut = Instant::now();
    pair.node(false).ip(&["link", "set", "eth0", "down"]).unwrap();
    let took = wait_vrrp(b, "node b takes over", takeover_bound(), master).unwrap();
    assert!(holds(pair.node(true), VIP_V4));
    settle_and_report("active node cut off", cut, took, takeover_bound(), outcomes);
    connections.still_answer("after the takeover by the standby");

    // It comes back with the higher priority and preempts.
    let back = Instant::now();
    pair.node(false).ip(&["link", "set", "eth0", "up"]).unwrap();
    let took = wait_vrrp(&a, "node a takes the VIP back", preemption_bound(), master).unwrap();
    wait_vrrp(b, "node b steps back", Duration::from_secs(2), backup).unwrap();
    settle_and_report("active node back (preemption)", back, took, preemption_bound(), outcomes);
    connections.still_answer("after the active node took the VIPs back");

    // 2. The active node's daemon and program are removed (`lb detach`): it gives up at once.
    let removed = Instant::now();
    a.ok(&["detach"]).unwrap();
    wait_vrrp(b, "node b takes over", takeover_bound(), master).unwrap();
    // From the request on: a stopping master hands over before `lb detach` returns.
    let took = removed.elapsed();
    assert!(!holds(pair.node(false), VIP_V4), "a removed node keeps no VIP behind");
    assert!(!holds(pair.node(false), VIP_V6));
    wait_until("the new master holds the IPv6 VIP", || holds(pair.node(true), VIP_V6));
    // Holding the address comes a moment before the announcement: the client must have taken
    // the unsolicited neighbour advertisement before its requests can find the new master.
    let new_master = pair.node(true).mac("eth0").unwrap();
    wait_until("the client's neighbour cache follows the new master's advertisement", || {
        neighbour_mac(&pair.net.client, VIP_V6).unwrap().is_none_or(|mac| mac == new_master)
    });
    assert_ipv6_answers(pair);
    settle_and_report("active node's daemon and program removed", removed, took, takeover_bound(), outcomes);
    a.kill();
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(5), "{what}: not within 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Requests to the IPv6 VIP are answered (the client found the master by neighbour discovery
/// or its unsolicited advertisement).
fn assert_ipv6_answers(pair: &PairTopology) {
    let vip = SocketAddr::new(VIP_V6.into(), 80);
    let answered =
        pair.net.client.enter(|| (0..10).filter(|_| tcp_request(vip, Duration::from_secs(1)).is_ok()).count());
    assert_eq!(answered.unwrap(), 10, "IPv6 requests through the master");
}

/// Lets traffic run one more second through the new master, checks it flows, prints the figures.
fn settle_and_report(what: &str, since: Instant, took: Duration, limit: Duration, outcomes: &Outcomes) {
    std::thread::sleep(Duration::from_secs(1));
    let now = Instant::now();
    let (ok, failed) = outcomes.between(since, now);
    let (recent_ok, recent_failed) = outcomes.between(now - Duration::from_millis(500), now);
    println!(
        "{what}: takeover in {:.0} ms (limit {:.0} ms); requests in the following {:.1} s: {ok} answered, {failed} failed",
        took.as_secs_f64() * 1000.0,
        limit.as_secs_f64() * 1000.0,
        now.duration_since(since).as_secs_f64()
    );
    assert!(
        recent_ok > 0 && recent_failed == 0,
        "{what}: traffic flows again ({recent_ok} ok, {recent_failed} failed)"
    );
}
