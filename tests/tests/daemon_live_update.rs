//! Live updates under load: while new TCP connections arrive steadily, backends are added and
//! removed 50 times. Every connection completes, and once a removal has returned, no new
//! connection reaches the removed backend.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, tcp_request, tcp_vip};
use lb_tests::topology::{SERVICE_PORT, Topology};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const CHANGES: usize = 50;

struct Attempt {
    started: Instant,
    answer: Result<String, String>,
}

#[test]
fn backends_change_50_times_under_load_without_a_failed_connection() {
    if !require_root("backends_change_50_times_under_load_without_a_failed_connection") {
        return;
    }
    let topology = Topology::new(5, false).unwrap();
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &nat_config(&topology, 3, None)).unwrap();
    let extra: Vec<(String, String)> =
        topology.backends[3..].iter().map(|b| (b.name.clone(), format!("{}:{SERVICE_PORT}", b.v4))).collect();
    let stop = AtomicBool::new(false);

    let (attempts, removals) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            topology
                .client
                .enter(|| {
                    let mut attempts = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let answer = tcp_request(tcp_vip(), Duration::from_secs(3)).map_err(|e| e.to_string());
                        attempts.push(Attempt { started, answer });
                    }
                    attempts
                })
                .unwrap()
        });
        // (backend name, when its removal returned, when it was next added)
        let mut removals: Vec<(String, Instant, Option<Instant>)> = Vec::new();
        for i in 0..CHANGES {
            let (name, address) = &extra[i % extra.len()];
            let added_at = Instant::now();
            for removal in removals.iter_mut().filter(|r| &r.0 == name && r.2.is_none()) {
                removal.2 = Some(added_at);
            }
            daemon.ok(&["backend", "add", "--vip", "web", "--address", address]).unwrap();
            std::thread::sleep(Duration::from_millis(40));
            daemon.ok(&["backend", "del", "--vip", "web", "--address", address]).unwrap();
            removals.push((name.clone(), Instant::now(), None));
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        (load.join().unwrap(), removals)
    });

    let failed: Vec<&String> = attempts.iter().filter_map(|a| a.answer.as_ref().err()).collect();
    let to_extra =
        attempts.iter().filter(|a| a.answer.as_ref().is_ok_and(|n| extra.iter().any(|(e, _)| e == n))).count();
    eprintln!(
        "{} connections, {} failed, {to_extra} answered by the backends that came and went",
        attempts.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        attempts.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(to_extra > 0, "the added backends took part");
    for (name, removed, readded) in &removals {
        let leaked = attempts
            .iter()
            .filter(|a| a.started > *removed && readded.is_none_or(|r| a.started < r))
            .filter(|a| a.answer.as_deref() == Ok(name.as_str()))
            .count();
        assert_eq!(leaked, 0, "{leaked} connections started after {name} was removed reached it");
    }
    assert!(daemon.log().matches("table published").count() >= 2 * CHANGES, "every change published a table");
}
