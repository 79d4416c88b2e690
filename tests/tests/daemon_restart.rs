//! Hitless restart: the daemon is killed with SIGKILL and started again while a UDP stream and a
//! long-lived TCP connection cross the VIP. The pinned data plane forwards throughout: no
//! datagram is lost and the connection survives.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, tcp_vip, udp_stream, udp_vip};
use lb_tests::topology::Topology;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const DATAGRAMS: usize = 3000;
/// Checked backends start down on a fresh start; after a takeover they must start as the
/// running data plane serves them, or the restart itself would take them out.
const RESTART_CHECK: &str = "{ kind = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 3, fall = 2 }";

#[test]
fn sigkill_and_restart_lose_no_packet_and_keep_connections() {
    if !require_root("sigkill_and_restart_lose_no_packet_and_keep_connections") {
        return;
    }
    let topology = Topology::new(3, false).unwrap();
    let mut daemon =
        LbDaemon::start(&topology.lb, &unique_instance(), &nat_config(&topology, 3, Some(RESTART_CHECK))).unwrap();
    let client = &topology.client;
    // Wait until the checks have brought every backend into the published tables.
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();

    let ((sent, answered), exchanges, restart_took) = std::thread::scope(|scope| {
        let udp =
            scope.spawn(|| client.enter(|| udp_stream(udp_vip(), DATAGRAMS, Duration::from_millis(1), 4)).unwrap());
        let tcp = scope.spawn(|| {
            client
                .enter(|| {
                    let stream = TcpStream::connect_timeout(&tcp_vip(), Duration::from_secs(2)).expect("connect");
                    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut names = Vec::new();
                    let end = Instant::now() + Duration::from_millis(3500);
                    while Instant::now() < end {
                        (&stream).write_all(b"still there?\n").expect("write on the long-lived connection");
                        let mut line = String::new();
                        reader.read_line(&mut line).expect("read on the long-lived connection");
                        names.push(line.trim().to_string());
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    names
                })
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(1000));
        daemon.kill();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        daemon.restart().unwrap();
        let took = started.elapsed();
        (udp.join().unwrap(), tcp.join().unwrap(), took)
    });

    eprintln!(
        "UDP: {answered} of {sent} datagrams answered; TCP: {} exchanges; restart took {restart_took:?}",
        exchanges.len()
    );
    assert_eq!(answered, sent, "datagrams lost across the SIGKILL and restart");
    assert!(exchanges.len() > 100, "the TCP connection kept exchanging: {}", exchanges.len());
    assert!(exchanges.iter().all(|n| *n == exchanges[0]), "the connection stayed on one backend");
    assert!(daemon.ok(&["status"]).unwrap().contains("took over the running data plane"));
}
