//! `ping` of a VIP through a real daemon: answered by the data plane in both modes and both
//! families (the load balancer's kernel does not hold the VIPs), counted, and switched off with
//! `answer_ping = false`.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::topology::{SERVICE_PORT, SNAT_V4, SNAT_V6, Topology, VIP_V4, VIP_V6};
use std::net::IpAddr;
use std::time::Duration;

const PINGS: usize = 3;

fn config(topology: &Topology, answer_ping: bool) -> String {
    let backend = &topology.backends[0];
    let mut config = "[daemon]\ninterface = \"eth0\"\ninstance = \"{instance}\"\nring_size = 1021\nmax_vips = 4\nmax_conns = 65536\n".to_string();
    for (name, vip, mode, backend) in [
        (
            "web4",
            format!("{VIP_V4}:80"),
            format!("mode = \"nat\"\nsnat = \"{SNAT_V4}\""),
            format!("{}:{SERVICE_PORT}", backend.v4),
        ),
        (
            "web6",
            format!("[{VIP_V6}]:{SERVICE_PORT}"),
            "mode = \"dsr\"".to_string(),
            format!("[{}]:{SERVICE_PORT}", backend.v6),
        ),
        (
            "web6nat",
            format!("[{VIP_V6}]:80"),
            format!("mode = \"nat\"\nsnat = \"{SNAT_V6}\""),
            format!("[{}]:{SERVICE_PORT}", backend.v6),
        ),
    ] {
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nprotocol = \"tcp\"\n{mode}\nanswer_ping = {answer_ping}\n\n[[vip.backend]]\naddress = \"{backend}\"\n"
        ));
    }
    config
}

/// Whether `ping` of `target` from the client got every answer.
fn ping(topology: &Topology, target: IpAddr) -> bool {
    let count = PINGS.to_string();
    topology.client.exec(&["ping", "-c", &count, "-i", "0.2", "-W", "1", "-q", &target.to_string()]).is_ok()
}

#[test]
fn a_vip_answers_ping_in_both_modes_and_families_unless_told_not_to() {
    if !require_root("a_vip_answers_ping_in_both_modes_and_families_unless_told_not_to") {
        return;
    }
    // DSR topology: the backend holds the VIPs on its loopback, the load balancer does not.
    let topology = Topology::new(1, true).unwrap();
    let vips: [IpAddr; 2] = [VIP_V4.into(), VIP_V6.into()];
    for vip in vips {
        assert!(!ping(&topology, vip), "{vip} answers ping before any load balancer runs");
    }
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config(&topology, true)).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    for vip in vips {
        assert!(ping(&topology, vip), "no answer to ping {vip}\n{}", daemon.log());
    }
    assert_eq!(
        daemon.reason_count("tx_ping_reply").unwrap(),
        2 * PINGS as u64,
        "every echo request answered by the data plane"
    );
    let listed: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "vip", "list"]).unwrap()).unwrap();
    assert!(listed.as_array().unwrap().iter().all(|v| v["answer_ping"] == true), "{listed}");

    // Switched off live: the kernel gets the requests, and it holds no VIP.
    let file = daemon.config.parent().unwrap().join("quiet.toml");
    std::fs::write(&file, config(&topology, false).replace("{instance}", &daemon.instance)).unwrap();
    let applied = daemon.ok(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    assert!(applied.contains("answer_ping true -> false"), "{applied}");
    for vip in vips {
        assert!(!ping(&topology, vip), "{vip} still answers ping");
    }
    assert_eq!(daemon.reason_count("tx_ping_reply").unwrap(), 2 * PINGS as u64);
}
