//! Passive failure detection (`observe = true`): a NAT VIP under a steady 100 requests a second
//! loses at most one request when a backend's server is killed; the backend is taken out by
//! what the data plane saw, long before its (slow) health check would have noticed. So is a
//! backend whose host goes down silently (no RST, no ICMP): its connection attempts go
//! unanswered, seen when the clients send their SYNs again. A backend that refuses only now
//! and then stays in, and its refusals cost the clients nothing.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::netns::Netns;
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, tcp_request, tcp_vip};
use lb_tests::topology::{SERVICE_PORT, SNAT_V4, Topology};
use std::time::{Duration, Instant};

const REQUESTS: usize = 400;
const GAP: Duration = Duration::from_millis(10);
/// Each request's time limit: beyond a SYN's second retransmission (1 s, then 2 s more).
const REQUEST_LIMIT: Duration = Duration::from_secs(4);
const KILL_AT: usize = 100;
/// The backend that refuses now and then refuses every this many new connections.
const REFUSE_EVERY: u32 = 10;

/// A slow check: what would take a backend out within a run is the observation.
const SLOW_CHECK: &str =
    "{ kind = \"tcp\", interval = \"3s\", timeout = \"1s\", rise = 2, fall = 3, initial = \"up\" }";

/// `count` requests from `client`, one every `GAP`, each on its own thread; returns how many
/// failed.
fn paced_requests(client: &Netns, count: usize) -> usize {
    client
        .enter(|| {
            let start = Instant::now();
            let handles: Vec<_> = (0..count)
                .map(|i| {
                    let next = start + GAP * i as u32;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // Beyond a SYN retransmission (1 s): a held-back refusal, or a SYN
                    // lost to a silent host, gets its second chance within the request's time.
                    std::thread::spawn(|| tcp_request(tcp_vip(), REQUEST_LIMIT))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).filter(|r| r.is_err()).count()
        })
        .unwrap()
}

/// The `web` VIP of [`nat_config`] with `observe = true` and a slow check.
fn observed_config(topology: &Topology) -> String {
    nat_config(topology, 3, Some(SLOW_CHECK)).replacen("mode = \"nat\"\n", "mode = \"nat\"\nobserve = true\n", 1)
}

#[test]
fn a_killed_server_costs_at_most_one_request_with_observe() {
    if !require_root("a_killed_server_costs_at_most_one_request_with_observe") {
        return;
    }
    let mut topology = Topology::new(3, false).unwrap();
    let config = observed_config(&topology);
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let victim = format!("{}:{SERVICE_PORT}", topology.backends[0].v4);
    let (client, backends) = (&topology.client, &mut topology.backends);
    let (failures, killed_at) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| paced_requests(client, REQUESTS));
        std::thread::sleep(GAP * KILL_AT as u32);
        backends[0].stop_server();
        let killed_at = Instant::now();
        (traffic.join().unwrap(), killed_at)
    });
    let rows = daemon.ok(&["--json", "backend", "list"]).unwrap();
    let parsed: Vec<serde_json::Value> = serde_json::from_str(&rows).unwrap();
    let web = parsed.iter().find(|r| r["vip"] == "web" && r["address"] == victim.as_str()).unwrap();
    let log = daemon.log();
    let observed_line = log.lines().find(|l| l.contains("observed:")).unwrap_or("").to_string();
    eprintln!(
        "observe: {failures} of {REQUESTS} requests failed; killed at {:?} into the run; log: {observed_line}",
        killed_at.elapsed()
    );
    assert_eq!(web["state"], "down", "{rows}");
    assert!(web["last_check"].as_str().unwrap_or("").starts_with("observed:"), "{rows}");
    assert!(observed_line.contains("connection attempts refused"), "{log}");
    assert!(failures <= 1, "{failures} requests failed\n{rows}\n{log}");
}

/// Makes `backend` refuse (RST) every `REFUSE_EVERY`-th new connection from the load balancer's
/// NAT ports, as a server with a full listen queue would now and then, and accept the client's
/// retransmitted SYN of a refused connection (so that every refusal is a single one). The
/// health check's connections (from the local port range, 32768 and up) are left alone. The
/// rules live in the backend's namespace and go with it.
fn refuse_now_and_then(backend: &Netns) -> anyhow::Result<()> {
    let syn = format!("ip saddr {SNAT_V4} tcp dport {SERVICE_PORT} tcp sport < 32768 tcp flags & (syn | ack) == syn");
    let rules = format!(
        "table inet lbtest {{\n set refused {{ type inet_service; flags dynamic, timeout; timeout 30s; }}\n \
         chain input {{\n  type filter hook input priority 0; policy accept;\n  \
         {syn} tcp sport @refused accept\n  \
         {syn} numgen inc mod {REFUSE_EVERY} == 0 add @refused {{ tcp sport }} counter reject with tcp reset comment \"refused\"\n \
         }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("{}.nft", backend.name()));
    std::fs::write(&file, rules)?;
    let loaded = backend.exec(&["nft", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    loaded.map(drop)
}

/// Connections `refuse_now_and_then` refused so far.
fn refused_by(backend: &Netns) -> anyhow::Result<u64> {
    let out = backend.exec(&["nft", "-j", "list", "table", "inet", "lbtest"])?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|item| item["rule"]["comment"] == "refused")
        .flat_map(|item| item["rule"]["expr"].as_array().into_iter().flatten())
        .find_map(|e| e["counter"]["packets"].as_u64())
        .unwrap_or(0))
}

#[test]
fn a_backend_refusing_some_connections_stays_in_with_observe() {
    if !require_root("a_backend_refusing_some_connections_stays_in_with_observe") {
        return;
    }
    let topology = Topology::new(3, false).unwrap();
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &observed_config(&topology)).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let flaky = format!("{}:{SERVICE_PORT}", topology.backends[0].v4);
    refuse_now_and_then(&topology.backends[0].ns).unwrap();
    let failures = paced_requests(&topology.client, REQUESTS);
    let refused = refused_by(&topology.backends[0].ns).unwrap();
    let held = daemon.reason_count("drop_refusal_held").unwrap();
    let rows = daemon.ok(&["--json", "backend", "list"]).unwrap();
    let parsed: Vec<serde_json::Value> = serde_json::from_str(&rows).unwrap();
    let web = parsed.iter().find(|r| r["vip"] == "web" && r["address"] == flaky.as_str()).unwrap();
    let log = daemon.log();
    eprintln!(
        "observe: {refused} connections refused by the flaky backend, {held} refusals held back, {failures} of {REQUESTS} requests failed"
    );
    // About a third of the requests reach the backend, a tenth of those are refused: several
    // refusals a second, enough for `refused = 3` alone, far below `percent = 50`.
    assert!(refused >= 5, "only {refused} refusals: the test did not exercise the rule\n{log}");
    assert_eq!(held, refused, "every refusal was the first answer of its connection, and held back");
    assert_eq!(web["health"], "up", "{rows}\n{log}");
    assert_eq!(web["state"], "serving", "{rows}\n{log}");
    assert!(!log.contains("observed:"), "{log}");
    assert_eq!(failures, 0, "the retransmitted SYN of each refused connection was accepted\n{rows}\n{log}");
}

/// Requests of a host-down run: the host goes down after `DOWN_AT` of them; the rest cover
/// the slow check's time to take it out (up to 3 intervals and a timeout, 10 s) and more.
const DOWN_REQUESTS: usize = 1200;
const DOWN_AT: usize = 100;
/// The client's first SYN retransmission (Linux's initial retransmission timeout).
const SYN_RETRANSMISSION: Duration = Duration::from_secs(1);
/// The soonest the slow check takes a backend out: `fall` failures, `interval` apart, the last
/// one after its `timeout`.
const SLOW_CHECK_SOONEST: Duration = Duration::from_secs(2 * 3 + 1);

/// Makes `backend`'s host silent: everything it receives is dropped, so nothing answers (no
/// RST, no ICMP), as for a host that lost its power. The rules go with the namespace.
fn go_silent(backend: &Netns) -> anyhow::Result<()> {
    let rules = "table inet lbdown {\n chain input { type filter hook input priority -300; policy drop; }\n \
                 chain output { type filter hook output priority -300; policy drop; }\n}\n";
    let file = std::env::temp_dir().join(format!("{}-down.nft", backend.name()));
    std::fs::write(&file, rules)?;
    let loaded = backend.exec(&["nft", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    loaded.map(drop)
}

/// `backend`'s row of the `web` VIP in `lb backend list`.
fn web_backend(daemon: &LbDaemon, backend: &str) -> serde_json::Value {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&daemon.ok(&["--json", "backend", "list"]).unwrap()).unwrap();
    rows.into_iter().find(|r| r["vip"] == "web" && r["address"] == backend).unwrap()
}

/// Waits until `backend` is down in the `web` VIP's published table (the `dns` VIP, which
/// has it too, is not observed); returns how long that took.
fn web_backend_down(daemon: &LbDaemon, backend: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while web_backend(daemon, backend)["state"] != "down" {
        assert!(started.elapsed() < limit, "{backend} not down after {limit:?}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

struct HostDown {
    failures: usize,
    /// From the host going silent to its backend's state `down` in `lb backend list`.
    taken_out_after: Duration,
    reason: String,
    /// `lb status` once it was out.
    status: String,
    victim: std::net::Ipv4Addr,
}

/// `DOWN_REQUESTS` paced requests to the `web` VIP (the slow check; `observe` or not); one
/// backend's host goes silent after `DOWN_AT` of them.
fn host_down_run(observe: bool) -> HostDown {
    let topology = Topology::new(3, false).unwrap();
    let config = if observe { observed_config(&topology) } else { nat_config(&topology, 3, Some(SLOW_CHECK)) };
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let victim = format!("{}:{SERVICE_PORT}", topology.backends[0].v4);
    let (failures, taken_out_after) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| paced_requests(&topology.client, DOWN_REQUESTS));
        std::thread::sleep(GAP * DOWN_AT as u32);
        go_silent(&topology.backends[0].ns).unwrap();
        let taken_out_after = web_backend_down(&daemon, &victim, Duration::from_secs(15));
        (traffic.join().unwrap(), taken_out_after)
    });
    let reason = web_backend(&daemon, &victim)["last_check"].as_str().unwrap_or("").to_string();
    let status = daemon.ok(&["status"]).unwrap();
    HostDown { failures, taken_out_after, reason, status, victim: topology.backends[0].v4 }
}

#[test]
fn a_host_that_goes_down_silently_is_taken_out_by_its_unanswered_attempts_with_observe() {
    if !require_root("a_host_that_goes_down_silently_is_taken_out_by_its_unanswered_attempts_with_observe") {
        return;
    }
    let observed = host_down_run(true);
    let checked = host_down_run(false);
    for (what, run) in [("observe", &observed), ("check only", &checked)] {
        eprintln!(
            "host down, {what}: {} of {DOWN_REQUESTS} requests failed (limit {REQUEST_LIMIT:?} each); taken out after {:?}: {}",
            run.failures, run.taken_out_after, run.reason
        );
    }
    // The first SYNs the host dropped come again after a second, and three unanswered ones
    // (of about 33 new connections a second) take it out at the daemon's next reading (50 ms).
    // A second more for a busy machine: still far below the check's soonest.
    let bound = SYN_RETRANSMISSION * 2 + Duration::from_millis(500);
    assert!(observed.reason.starts_with("observed: "), "{}", observed.reason);
    assert!(observed.reason.contains("connection attempts unanswered"), "{}", observed.reason);
    assert!(observed.taken_out_after < bound, "out after {:?}, not within {bound:?}", observed.taken_out_after);
    assert!(bound < SLOW_CHECK_SOONEST);
    assert!(observed.taken_out_after * 2 < checked.taken_out_after, "the check alone was about as quick");
    assert!(!checked.reason.starts_with("observed"), "{}", checked.reason);
    // A SYN lost to the silent host is sent again after 1 s and 3 s: by then it goes elsewhere.
    // At most a request that was under way when the host went down fails.
    assert!(observed.failures <= 1, "{} requests failed", observed.failures);
    // `lb status` tells why each backend is out (the last check's result may have moved on).
    for run in [&observed, &checked] {
        let why = run.reason.split("; last check").next().unwrap_or_default();
        let line = run.status.lines().find(|l| l.contains("backend down")).unwrap_or_default();
        assert!(line.contains(&format!("web {}:{SERVICE_PORT}: ", run.victim)), "{}", run.status);
        assert!(line.contains(why), "{why:?} not in {}", run.status);
    }
}
