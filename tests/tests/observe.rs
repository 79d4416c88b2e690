//! Passive failure detection (`observe = true`): a NAT VIP under a steady 100 requests a second
//! loses at most one request when a backend's server is killed; the backend is taken out by
//! what the data plane saw, long before its (slow) health check would have noticed. A backend
//! that refuses only now and then stays in, and its refusals cost the clients nothing.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::netns::Netns;
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, tcp_request, tcp_vip};
use lb_tests::topology::{SERVICE_PORT, SNAT_V4, Topology};
use std::time::{Duration, Instant};

const REQUESTS: usize = 400;
const GAP: Duration = Duration::from_millis(10);
const KILL_AT: usize = 100;
/// The backend that refuses now and then refuses every this many new connections.
const REFUSE_EVERY: u32 = 10;

/// A slow check: what would take a backend out within a run is the observation.
const SLOW_CHECK: &str =
    "{ kind = \"tcp\", interval = \"3s\", timeout = \"1s\", rise = 2, fall = 3, initial = \"up\" }";

/// `REQUESTS` requests from `client`, one every `GAP`, each on its own thread; returns how
/// many failed.
fn paced_requests(client: &Netns) -> usize {
    client
        .enter(|| {
            let start = Instant::now();
            let handles: Vec<_> = (0..REQUESTS)
                .map(|i| {
                    let next = start + GAP * i as u32;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // Beyond a SYN retransmission (1 s): a held-back refusal gets its
                    // second chance within the request's time.
                    std::thread::spawn(|| tcp_request(tcp_vip(), Duration::from_secs(4)))
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
        let traffic = scope.spawn(|| paced_requests(client));
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
    let failures = paced_requests(&topology.client);
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
