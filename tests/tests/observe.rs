//! Passive failure detection (`observe = true`): a NAT VIP under a steady 100 requests a second
//! loses at most one request when a backend's server is killed; the backend is taken out by
//! what the data plane saw, long before its (slow) health check would have noticed.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, tcp_request, tcp_vip};
use lb_tests::topology::{SERVICE_PORT, Topology};
use std::time::{Duration, Instant};

const REQUESTS: usize = 400;
const GAP: Duration = Duration::from_millis(10);
const KILL_AT: usize = 100;

#[test]
fn a_killed_server_costs_at_most_one_request_with_observe() {
    if !require_root("a_killed_server_costs_at_most_one_request_with_observe") {
        return;
    }
    let mut topology = Topology::new(3, false).unwrap();
    // A slow check: what takes the backend out within the run is the observation.
    let check = "{ kind = \"tcp\", interval = \"3s\", timeout = \"1s\", rise = 2, fall = 3, initial = \"up\" }";
    let config =
        nat_config(&topology, 3, Some(check)).replacen("mode = \"nat\"\n", "mode = \"nat\"\nobserve = true\n", 1);
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let victim = format!("{}:{SERVICE_PORT}", topology.backends[0].v4);
    let (client, backends) = (&topology.client, &mut topology.backends);
    let (failures, killed_at) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
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
        });
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
