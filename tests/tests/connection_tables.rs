//! Full connection tables through a running daemon: a `nat` VIP whose tables are full drops
//! new connections (counted, logged) and keeps every established one; the daemon's sweep takes
//! out finished connections, and new ones get in again.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{exchange_on as exchange, tcp_vip};
use lb_tests::topology::{LB_V4, SERVICE_PORT, Topology, VIP_V4};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const TABLE: usize = 8;

fn config(topology: &Topology) -> String {
    format!(
        "[daemon]\ninterface = \"eth0\"\ninstance = \"{{instance}}\"\nring_size = 1021\nmax_vips = 4\nmax_conns = {TABLE}\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP_V4}:80\"\nprotocol = \"tcp\"\nmode = \"nat\"\nsnat = \"{LB_V4}\"\n\
         check = {{ kind = \"tcp\", interval = \"250ms\", timeout = \"250ms\", rise = 1, fall = 3 }}\n\n\
         [[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\n",
        topology.backends[0].v4
    )
}

/// A connection to the VIP that answered once, left open.
fn connect(timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&tcp_vip(), timeout)?;
    exchange(&stream, timeout)?;
    Ok(stream)
}

#[test]
fn a_full_table_drops_new_connections_keeps_the_open_ones_and_the_sweep_makes_room() {
    if !require_root("a_full_table_drops_new_connections_keeps_the_open_ones_and_the_sweep_makes_room") {
        return;
    }
    let topology = Topology::new(1, false).unwrap();
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config(&topology)).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    let timeout = Duration::from_millis(1500);
    let mut open: Vec<TcpStream> =
        topology.client.enter(|| (0..TABLE).map(|_| connect(timeout).unwrap()).collect()).unwrap();

    // One more: its SYNs are dropped (and its retransmission a second later).
    let refused = topology.client.enter(|| connect(timeout)).unwrap();
    assert!(refused.is_err(), "a connection got in beyond a full table");
    for (i, stream) in open.iter().enumerate() {
        exchange(stream, timeout).unwrap_or_else(|e| panic!("open connection {i} broke: {e}\n{}", daemon.log()));
    }
    let stats = || -> serde_json::Value { serde_json::from_str(&daemon.ok(&["--json", "stats"]).unwrap()).unwrap() };
    let dropped = |stats: &serde_json::Value| {
        let reasons = stats["reasons"].as_array().unwrap();
        reasons.iter().find(|r| r[0] == "drop_table_full").map_or(0, |r| r[1].as_u64().unwrap())
    };
    let full = stats();
    assert!(dropped(&full) >= 1, "the dropped SYNs are counted: {}", full["reasons"]);
    assert_eq!(full["tables"]["capacity"], TABLE, "{}", full["tables"]);
    // The sweep runs every second and reports what it found.
    let started = Instant::now();
    while stats()["tables"]["connections"] != TABLE || !daemon.log().contains("the connection tables are 100% full") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no sweep saw the full table: {}\n{}",
            stats()["tables"],
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = String::from_utf8(daemon.cli(&["stats"]).unwrap().stdout).unwrap();
    assert!(
        text.contains(&format!(
            "connection tables: {TABLE} connections and {TABLE} NAT ports of {TABLE} each (100% full)"
        )),
        "{text}"
    );

    // Half of them end (the client closes first): a few seconds later the sweep has taken
    // them out, and new connections get in.
    open.truncate(TABLE / 2);
    let started = Instant::now();
    loop {
        let tables = stats()["tables"].clone();
        if tables["removed_connections"].as_u64().unwrap() >= (TABLE / 2) as u64 {
            eprintln!("swept {:.1} s after the connections ended: {tables}", started.elapsed().as_secs_f64());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the ended connections were not swept: {tables}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let again: Vec<TcpStream> =
        topology.client.enter(|| (0..TABLE / 2).map(|_| connect(timeout).unwrap()).collect()).unwrap();
    for (i, stream) in open.iter().chain(&again).enumerate() {
        exchange(stream, timeout).unwrap_or_else(|e| panic!("connection {i} broke: {e}\n{}", daemon.log()));
    }
}
