//! Upgrades across pinned-layout versions: a daemon of this build finds the pins an earlier
//! release (layout 1, layout 2) left, forwarding live connections, and migrates them into maps
//! of its own layout without losing one; pins of a layout newer than it knows are refused
//! untouched.

use lb::config::parse;
use lb_common::maps::Reason;
use lb_tests::daemon::{LbDaemon, unique_instance};

use lb_tests::legacy::{Release, pin_release, release_reason_count};
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, tcp_vip, udp_stream, udp_vip};
use lb_tests::topology::{CLIENT_V4, Topology};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

const CONNECTIONS: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(2);

/// One exchange on a long-lived connection: the backend's name.
fn exchange(stream: &TcpStream) -> std::io::Result<String> {
    (&*stream).write_all(b"still there?\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim().to_string())
}

/// Long-lived connections to the TCP VIP, each with the backend that answered its first line.
fn open_connections(topology: &Topology) -> Vec<(TcpStream, String)> {
    topology
        .client
        .enter(|| {
            (0..CONNECTIONS)
                .map(|i| {
                    let stream = TcpStream::connect_timeout(&tcp_vip(), TIMEOUT)
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                    let name = exchange(&stream).unwrap_or_else(|e| panic!("connection {i}, first answer: {e}"));
                    (stream, name)
                })
                .collect()
        })
        .unwrap()
}

#[test]
fn pins_of_layout_1_are_migrated_without_losing_a_connection() {
    if require_root("pins_of_layout_1_are_migrated_without_losing_a_connection") {
        migrates_without_losing_a_connection(Release::Layout1);
    }
}

/// Layout 2's connection tables were LRU maps; this build's are plain hash maps.
#[test]
fn pins_of_layout_2_are_migrated_without_losing_a_connection() {
    if require_root("pins_of_layout_2_are_migrated_without_losing_a_connection") {
        migrates_without_losing_a_connection(Release::Layout2);
    }
}

fn migrates_without_losing_a_connection(release: Release) {
    let topology = Topology::new(3, false).unwrap();
    let instance = unique_instance();
    let config_text = nat_config(&topology, 3, None);
    let config = parse("lb.toml", &config_text.replace("{instance}", &instance)).unwrap();
    let macs: Vec<(IpAddr, [u8; 6])> = topology.backends.iter().map(|b| (IpAddr::from(b.v4), b.mac)).collect();
    let mac_of = |ip: IpAddr| macs.iter().find(|(a, _)| *a == ip).map(|(_, m)| *m).expect("a backend's MAC");
    pin_release(release, &topology.lb, &instance, config.daemon.sizes, &config.state, &mac_of).unwrap();

    // Long-lived connections through the old program, each answering from its backend.
    let connections = open_connections(&topology);
    let forwarded_before = release_reason_count(release, &instance, Reason::TxForward).unwrap();
    assert!(forwarded_before >= 2 * CONNECTIONS as u64, "the old program forwarded: {forwarded_before}");

    // A UDP stream runs across the migration and the program swap.
    let (sent, answered, daemon) = std::thread::scope(|scope| {
        let client = &topology.client;
        let udp = scope.spawn(|| client.enter(|| udp_stream(udp_vip(), 1500, Duration::from_millis(1), 4)).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        let daemon = LbDaemon::start(&topology.lb, &instance, &config_text).unwrap();
        let (sent, answered) = udp.join().unwrap();
        (sent, answered, daemon)
    });

    let status: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "status"]).unwrap()).unwrap();
    let attachment = status["attachment"].as_str().unwrap();
    assert!(
        attachment.starts_with(&format!(
            "took over the running data plane; state migrated from layout {}",
            release.version()
        )),
        "{attachment}\n{}",
        daemon.log()
    );
    assert!(status["pinned_maps"].as_str().unwrap().starts_with("layout 3"), "{status}");
    eprintln!("migration: {attachment}; UDP {answered} of {sent} answered");
    assert_eq!(answered, sent, "datagrams lost across the migration");
    for (i, (stream, name)) in connections.iter().enumerate() {
        let now = exchange(stream).unwrap_or_else(|e| panic!("connection {i} to {name} broke: {e}\n{}", daemon.log()));
        assert_eq!(&now, name, "connection {i} moved to another backend");
        let local = stream.local_addr().unwrap();
        let explained = daemon
            .ok(&[
                "--json",
                "explain",
                "--src",
                &format!("{CLIENT_V4}:{}", local.port()),
                "--dst",
                &tcp_vip().to_string(),
            ])
            .unwrap();
        assert!(explained.contains("connection table"), "the migrated table keeps connection {i}: {explained}");
    }
    let forwarded_after = daemon.reason_count("tx_forward").unwrap();
    assert!(
        forwarded_after >= forwarded_before + sent as u64,
        "counters carried over: {forwarded_before} → {forwarded_after}"
    );
    // The old pins are gone; the new set is in its own directory.
    let pins = lb::dataplane::PinDir::for_instance(&instance);
    assert!(!release.map_dir(&pins).join("VIPS").exists(), "the old pins removed");
    let sets: Vec<String> = std::fs::read_dir(pins.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let new_set =
        sets.iter().find(|name| name.starts_with("v3-")).unwrap_or_else(|| panic!("no layout-3 set: {sets:?}"));
    assert!(pins.path().join(new_set).join("CONNS").exists(), "layout-3 pins in place");
}

#[test]
fn pins_of_a_newer_layout_are_refused_and_left_alone() {
    if !require_root("pins_of_a_newer_layout_are_refused_and_left_alone") {
        return;
    }
    let topology = Topology::new(1, false).unwrap();
    let instance = unique_instance();
    let pins = lb::dataplane::PinDir::for_instance(&instance);
    pins.create().unwrap();
    let newer = pins.path().join("v99-1");
    std::fs::create_dir(&newer).unwrap();
    let config = std::env::temp_dir().join(format!("lb-test-{instance}.toml"));
    std::fs::write(&config, nat_config(&topology, 1, None).replace("{instance}", &instance)).unwrap();
    let lb = lb_tests::daemon::lb_binary();
    let started = topology.lb.nsenter(&[lb.to_str().unwrap(), "daemon", "--config", config.to_str().unwrap()]);
    std::fs::remove_file(&config).unwrap();
    let error = match started {
        Ok(output) => panic!("a daemon must not start over pins of a newer layout: {output:?}"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("comes from a newer build") && error.contains("layout 99"), "{error}");
    assert!(newer.exists(), "the newer pins are left as they were");
    // What the refused start left is removed by `lb detach`.
    let detached = std::process::Command::new(lb_tests::daemon::lb_binary())
        .args(["--instance", &instance, "detach"])
        .output()
        .unwrap();
    assert!(detached.status.success() && !pins.path().exists(), "{detached:?}");
}

#[test]
fn new_table_sizes_are_migrated_at_a_restart_without_losing_a_connection() {
    if !require_root("new_table_sizes_are_migrated_at_a_restart_without_losing_a_connection") {
        return;
    }
    let topology = Topology::new(2, false).unwrap();
    let config = nat_config(&topology, 2, None);
    assert!(config.contains("max_conns = 262144\n"));
    let mut daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config).unwrap();
    let connections = open_connections(&topology);
    // The operator doubles the connection table: a restart with the new size.
    daemon.terminate().unwrap();
    std::fs::write(
        &daemon.config,
        config.replace("max_conns = 262144", "max_conns = 524288").replace("{instance}", &daemon.instance),
    )
    .unwrap();
    daemon.restart().unwrap();
    let status: serde_json::Value = serde_json::from_str(&daemon.ok(&["--json", "status"]).unwrap()).unwrap();
    let attachment = status["attachment"].as_str().unwrap();
    assert!(
        attachment.contains(
            "state migrated from layout 3 generation 1 (CONNS has 262144 entries, the configuration gives 524288"
        ),
        "{attachment}"
    );
    assert_eq!(status["max_conns"], 524288);
    for (i, (stream, name)) in connections.iter().enumerate() {
        let now = exchange(stream).unwrap_or_else(|e| panic!("connection {i} to {name} broke: {e}\n{}", daemon.log()));
        assert_eq!(&now, name, "connection {i} moved to another backend");
    }
    let pins = lb::dataplane::PinDir::for_instance(&daemon.instance);
    assert!(
        !pins.path().join("v3-1").exists() && pins.path().join("v3-2").exists(),
        "the new generation replaced the old"
    );
}
