//! What an operator reads: `lb stats`, `lb explain` and the Prometheus endpoint, checked against
//! real traffic through the VIP.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, scrape_metrics, tcp_request, tcp_vip};
use lb_tests::topology::{CLIENT_V4, Topology};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn stats_explain_and_metrics_describe_real_traffic() {
    if !require_root("stats_explain_and_metrics_describe_real_traffic") {
        return;
    }
    let topology = Topology::new(3, false).unwrap();
    let config = nat_config(&topology, 3, None)
        .replace("max_conns = 262144\n", "max_conns = 262144\nmetrics = \"127.0.0.1:9900\"\n");
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config).unwrap();

    // A long-lived connection whose backend we know, and 60 short ones.
    let (stream, local_port, backend_name) = topology
        .client
        .enter(|| {
            let stream = TcpStream::connect_timeout(&tcp_vip(), Duration::from_secs(2)).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            (&stream).write_all(b"hi\n").unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let port = stream.local_addr().unwrap().port();
            for _ in 0..60 {
                tcp_request(tcp_vip(), Duration::from_secs(2)).unwrap();
            }
            (stream, port, line.trim().to_string())
        })
        .unwrap();
    let backend_address = {
        let host = topology.backends.iter().find(|b| b.name == backend_name).unwrap();
        format!("{}:8080", host.v4)
    };

    let explained = daemon
        .ok(&["--json", "explain", "--src", &format!("{CLIENT_V4}:{local_port}"), "--dst", &tcp_vip().to_string()])
        .unwrap();
    let explained: serde_json::Value = serde_json::from_str(&explained).unwrap();
    assert_eq!(explained["decided_by"], "connection table", "{explained}");
    assert_eq!(explained["backend"], backend_address.as_str(), "{explained}");
    let fresh = daemon.ok(&["explain", "--src", &format!("{CLIENT_V4}:1"), "--dst", &tcp_vip().to_string()]).unwrap();
    assert!(fresh.contains("decided by: maglev") && fresh.contains("Maglev slot"), "{fresh}");
    let not_vip = daemon.ok(&["explain", "--src", &format!("{CLIENT_V4}:1"), "--dst", "10.0.0.99:80"]).unwrap();
    assert!(not_vip.contains("not a VIP"), "{not_vip}");

    std::thread::sleep(Duration::from_millis(2100)); // two counter samples for rates
    let stats: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "stats"]).unwrap()).unwrap();
    let web = stats["vips"].as_array().unwrap().iter().find(|v| v["name"] == "web").unwrap();
    assert_eq!(web["traffic"]["new_flows"], 61, "{web}");
    let per_backend: u64 =
        web["backends"].as_array().unwrap().iter().map(|b| b[1]["new_flows"].as_u64().unwrap()).sum();
    assert_eq!(per_backend, 61, "backend counters add up to the VIP's");
    assert!(daemon.ok(&["stats"]).unwrap().contains("tx_forward"), "human stats list verdict reasons");
    // `lb stats --watch`: a screen per interval, as many as asked; with --json one report a line.
    let watched = daemon.ok(&["stats", "--watch", "--interval", "100ms", "--count", "3"]).unwrap();
    assert_eq!(watched.matches("lb stats, every 100ms").count(), 3, "{watched}");
    assert_eq!(watched.matches("tx_forward").count(), 3, "{watched}");
    let lines = daemon.ok(&["--json", "stats", "--watch", "--interval", "100ms", "--count", "2"]).unwrap();
    let reports = lines.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    assert_eq!(reports.filter(|r| r["vips"].is_array()).count(), 2, "{lines}");

    let metrics = scrape_metrics(&topology.lb, 9900).unwrap();
    assert!(metrics.contains("application/openmetrics-text") && metrics.contains("# EOF"), "{metrics}");
    assert!(metrics.contains("lb_build_info{instance="), "{metrics}");
    assert!(
        metrics.contains(&format!("lb_vip_new_flows_total{{instance=\"{}\",vip=\"web\"}} 61", daemon.instance)),
        "{metrics}"
    );
    assert!(metrics.contains("lb_packets_total{") && metrics.contains("reason=\"tx_forward\""), "{metrics}");
    drop(stream);
}
