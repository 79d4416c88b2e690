//! Health checks at L3, L4 and L7 against real servers in namespaces: failures are detected and
//! routed around within `fall x interval + timeout + 1 s`, recoveries rejoin within
//! `rise x interval + 1 s`, and nothing else is disturbed.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{tcp_request, tcp_vip};
use lb_tests::topology::{SERVICE_PORT, SNAT_V4, Topology, VIP_V4};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 100;
const RISE: u64 = 2;
const FALL: u64 = 2;

fn detection_bound() -> Duration {
    Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS + 1000)
}

fn recovery_bound() -> Duration {
    Duration::from_millis(RISE * INTERVAL_MS + 1000)
}

/// A NAT VIP "web" over the given backends (name → backup?), checked with `check`.
fn config(topology: &Topology, check: &str, backends: &[(usize, bool)]) -> String {
    let mut config = format!(
        "[daemon]\ninterface = \"eth0\"\ninstance = \"{{instance}}\"\nmax_vips = 4\nmax_conns = 65536\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP_V4}:80\"\nprotocol = \"tcp\"\nmode = \"nat\"\nsnat = \"{SNAT_V4}\"\ncheck = {check}\n"
    );
    for (i, backup) in backends {
        config.push_str(&format!(
            "\n[[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\nbackup = {backup}\n",
            topology.backends[*i].v4
        ));
    }
    config
}

fn addr(i: usize, topology: &Topology) -> String {
    format!("{}:{SERVICE_PORT}", topology.backends[i].v4)
}

fn check(kind: &str, rise: u64) -> String {
    let extra = if kind == "http" { ", path = \"/healthz\", expect_status = 200" } else { "" };
    format!(
        "{{ kind = \"{kind}\"{extra}, interval = \"{INTERVAL_MS}ms\", timeout = \"{TIMEOUT_MS}ms\", rise = {rise}, fall = {FALL} }}"
    )
}

/// Answers to `n` new connections, by backend name ("failed" for errors). The timeout stays
/// below TCP's first SYN retransmission (1 s), so a SYN the data plane dropped is never hidden
/// by its retry, and is long enough for a loaded machine to answer.
fn spread(topology: &Topology, n: usize) -> HashMap<String, usize> {
    topology
        .client
        .enter(|| {
            let mut answers = HashMap::new();
            for _ in 0..n {
                let name = tcp_request(tcp_vip(), Duration::from_millis(900)).unwrap_or_else(|_| "failed".into());
                *answers.entry(name).or_insert(0) += 1;
            }
            answers
        })
        .unwrap()
}

/// Waits until the published tables have `backend` in `state`; returns how long it took.
fn wait_for_state(daemon: &LbDaemon, backend: &str, state: &str, limit: Duration) -> Duration {
    daemon.wait_backend_state(backend, state, limit).unwrap()
}

/// Starts all three backends healthy, breaks backend 1 with `fail`, checks it is routed around
/// in time, repairs it with `repair`, checks it rejoins in time. Prints the detection time.
fn failure_and_recovery(kind: &str, fail: impl FnOnce(&mut Topology), repair: impl FnOnce(&mut Topology)) {
    let mut topology = Topology::new(3, false).unwrap();
    let daemon = LbDaemon::start(
        &topology.lb,
        &unique_instance(),
        &config(&topology, &check(kind, RISE), &[(0, false), (1, false), (2, false)]),
    )
    .unwrap();
    let victim = addr(0, &topology);
    wait_for_state(&daemon, &victim, "serving", Duration::from_secs(5));
    assert!(spread(&topology, 60).contains_key("be1"), "be1 serves before the failure");

    let failed_at = Instant::now();
    fail(&mut topology);
    let detected = wait_for_state(&daemon, &victim, "down", detection_bound() + Duration::from_secs(2));
    let elapsed = failed_at.elapsed().max(detected);
    eprintln!(
        "{kind}: failure detected and table published after {} ms (bound {} ms)",
        elapsed.as_millis(),
        detection_bound().as_millis()
    );
    assert!(elapsed <= detection_bound(), "{kind}: detection took {elapsed:?}");
    let after = spread(&topology, 60);
    assert!(!after.contains_key("be1") && !after.contains_key("failed"), "{kind}: after detection: {after:?}");

    repair(&mut topology);
    // From the moment the backend is healthy again (a restarted server is listening).
    let repaired_at = Instant::now();
    let rejoined = wait_for_state(&daemon, &victim, "serving", recovery_bound() + Duration::from_secs(2));
    eprintln!("{kind}: recovery seen after {} ms (bound {} ms)", rejoined.as_millis(), recovery_bound().as_millis());
    assert!(
        repaired_at.elapsed() <= recovery_bound() + Duration::from_millis(100),
        "{kind}: recovery took {:?}",
        repaired_at.elapsed()
    );
    assert!(spread(&topology, 60).contains_key("be1"), "{kind}: be1 gets traffic again");
    let log = daemon.log();
    assert!(log.contains("backend down") && log.contains("backend up"), "transitions are logged:\n{log}");
    let stats: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "stats"]).unwrap()).unwrap();
    let victim_health =
        stats["health"].as_array().unwrap().iter().find(|h| h["backend"] == victim.as_str()).unwrap().clone();
    assert_eq!(victim_health["transitions"], 3, "up at start, down, up again: {victim_health}");
}

#[test]
fn tcp_check_routes_around_a_killed_server_and_takes_it_back() {
    if require_root("tcp_check_routes_around_a_killed_server_and_takes_it_back") {
        failure_and_recovery("tcp", |t| t.backends[0].stop_server(), |t| t.backends[0].start_server().unwrap());
    }
}

#[test]
fn http_check_routes_around_status_503_and_takes_it_back() {
    if require_root("http_check_routes_around_status_503_and_takes_it_back") {
        failure_and_recovery("http", |t| t.backends[0].set_http_status(503), |t| t.backends[0].set_http_status(200));
    }
}

#[test]
fn icmp_check_routes_around_a_dead_link_and_takes_it_back() {
    if require_root("icmp_check_routes_around_a_dead_link_and_takes_it_back") {
        failure_and_recovery(
            "icmp",
            |t| drop(t.backends[0].ns.ip(&["link", "set", "eth0", "down"]).unwrap()),
            |t| drop(t.backends[0].ns.ip(&["link", "set", "eth0", "up"]).unwrap()),
        );
    }
}

#[test]
fn established_connections_to_healthy_backends_survive_a_failure() {
    if !require_root("established_connections_to_healthy_backends_survive_a_failure") {
        return;
    }
    let mut topology = Topology::new(3, false).unwrap();
    let daemon = LbDaemon::start(
        &topology.lb,
        &unique_instance(),
        &config(&topology, &check("tcp", RISE), &[(0, false), (1, false), (2, false)]),
    )
    .unwrap();
    for b in &topology.backends {
        wait_for_state(&daemon, &format!("{}:{SERVICE_PORT}", b.v4), "serving", Duration::from_secs(5));
    }
    // Long-lived connections until the two healthy backends have five each.
    let mut connections: Vec<(TcpStream, String)> = Vec::new();
    topology
        .client
        .enter(|| {
            let mut per = HashMap::<String, usize>::new();
            while per.get("be2").copied().unwrap_or(0) < 5 || per.get("be3").copied().unwrap_or(0) < 5 {
                let stream = TcpStream::connect_timeout(&tcp_vip(), Duration::from_secs(1)).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                (&stream).write_all(b"hi\n").unwrap();
                let mut name = String::new();
                BufReader::new(&stream).read_line(&mut name).unwrap();
                let name = name.trim().to_string();
                if name != "be1" {
                    *per.entry(name.clone()).or_insert(0) += 1;
                    connections.push((stream, name));
                }
            }
        })
        .unwrap();
    topology.backends[0].stop_server();
    wait_for_state(&daemon, &addr(0, &topology), "down", detection_bound() + Duration::from_secs(2));
    for (stream, name) in &connections {
        (&*stream).write_all(b"still there?\n").unwrap_or_else(|e| panic!("connection to {name} broke: {e}"));
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap_or_else(|e| panic!("connection to {name} broke: {e}"));
        assert_eq!(line.trim(), name);
    }
}

#[test]
fn backup_serves_only_while_every_primary_is_down() {
    if !require_root("backup_serves_only_while_every_primary_is_down") {
        return;
    }
    let mut topology = Topology::new(3, false).unwrap();
    let daemon = LbDaemon::start(
        &topology.lb,
        &unique_instance(),
        &config(&topology, &check("tcp", RISE), &[(0, false), (1, false), (2, true)]),
    )
    .unwrap();
    wait_for_state(&daemon, &addr(0, &topology), "serving", Duration::from_secs(5));
    wait_for_state(&daemon, &addr(1, &topology), "serving", Duration::from_secs(5));
    wait_for_state(&daemon, &addr(2, &topology), "standby", Duration::from_secs(5));
    let both_up = spread(&topology, 60);
    assert!(!both_up.contains_key("be3"), "backup idle while primaries are up: {both_up:?}");

    topology.backends[0].stop_server();
    wait_for_state(&daemon, &addr(0, &topology), "down", Duration::from_secs(5));
    let one_up = spread(&topology, 60);
    assert_eq!(one_up.get("be2"), Some(&60), "one primary left takes everything, backup stays idle: {one_up:?}");

    topology.backends[1].stop_server();
    wait_for_state(&daemon, &addr(1, &topology), "down", Duration::from_secs(5));
    wait_for_state(&daemon, &addr(2, &topology), "serving", Duration::from_secs(2));
    let none_up = spread(&topology, 60);
    assert_eq!(none_up.get("be3"), Some(&60), "the backup takes all connections: {none_up:?}");

    topology.backends[0].start_server().unwrap();
    wait_for_state(&daemon, &addr(0, &topology), "serving", Duration::from_secs(5));
    wait_for_state(&daemon, &addr(2, &topology), "standby", Duration::from_secs(2));
    let recovered = spread(&topology, 60);
    assert_eq!(recovered.get("be1"), Some(&60), "the recovered primary takes over again: {recovered:?}");
}

#[test]
fn a_drained_backend_keeps_its_connections_and_gets_no_new_ones() {
    if !require_root("a_drained_backend_keeps_its_connections_and_gets_no_new_ones") {
        return;
    }
    let topology = Topology::new(2, false).unwrap();
    let daemon = LbDaemon::start(
        &topology.lb,
        &unique_instance(),
        &config(&topology, &check("tcp", RISE), &[(0, false), (1, false)]),
    )
    .unwrap();
    let be1 = addr(0, &topology);
    wait_for_state(&daemon, &be1, "serving", Duration::from_secs(5));
    // Both must serve before the drain, or the VIP is briefly left without a backend.
    wait_for_state(&daemon, &addr(1, &topology), "serving", Duration::from_secs(5));
    let stream = topology
        .client
        .enter(|| {
            loop {
                let stream = TcpStream::connect_timeout(&tcp_vip(), Duration::from_secs(1)).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                (&stream).write_all(b"hi\n").unwrap();
                let mut name = String::new();
                BufReader::new(&stream).read_line(&mut name).unwrap();
                if name.trim() == "be1" {
                    break stream;
                }
            }
        })
        .unwrap();
    daemon.ok(&["backend", "drain", "--vip", "web", "--address", &be1]).unwrap();
    let after = spread(&topology, 60);
    assert_eq!(after.get("be2"), Some(&60), "no new connection reaches the drained backend: {after:?}");
    for i in 0..10 {
        (&stream).write_all(b"again\n").unwrap();
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("exchange {i} on the drained backend: {e}"));
        assert_eq!(line.trim(), "be1");
    }
}

#[test]
fn a_flapping_backend_gets_no_connection_inside_its_rise_window() {
    if !require_root("a_flapping_backend_gets_no_connection_inside_its_rise_window") {
        return;
    }
    // rise = 5 at a 100 ms interval: a backend up for 300 ms at a time never passes 5 checks in a row.
    let topology = Topology::new(3, false).unwrap();
    let check = format!(
        "{{ kind = \"http\", path = \"/\", interval = \"100ms\", timeout = \"50ms\", rise = 5, fall = {FALL} }}"
    );
    // Failing before the daemon starts: its first check must not find it healthy (a first
    // success puts a backend in service at once, and it would then serve until `fall` failures).
    let flapper = &topology.backends[2];
    flapper.set_http_status(503);
    let daemon = LbDaemon::start(
        &topology.lb,
        &unique_instance(),
        &config(&topology, &check, &[(0, false), (1, false), (2, false)]),
    )
    .unwrap();
    for b in &topology.backends[..2] {
        wait_for_state(&daemon, &format!("{}:{SERVICE_PORT}", b.v4), "serving", Duration::from_secs(5));
    }

    let mut answers = HashMap::<String, usize>::new();
    let end = Instant::now() + Duration::from_secs(4);
    let mut up = false;
    let mut next_flip = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_flip {
            up = !up;
            flapper.set_http_status(if up { 200 } else { 503 });
            next_flip += Duration::from_millis(300);
        }
        for (name, n) in spread(&topology, 5) {
            *answers.entry(name).or_insert(0) += n;
        }
    }
    eprintln!("answers while be3 flapped: {answers:?}");
    assert!(!answers.contains_key("be3"), "the flapping backend received connections: {answers:?}");
    assert!(!answers.contains_key("failed"), "{answers:?}");
    let rows = daemon.ok(&["--json", "backend", "list"]).unwrap();
    assert!(rows.contains("\"health\": \"down\""), "{rows}");
}
