//! End to end in namespaces: real TCP and UDP clients and servers through the XDP program
//! attached natively to the load balancer's veth, in DSR and NAT modes, IPv4 and IPv6.

use lb::dataplane::{AttachMode, Dataplane, DataplaneSizes, VipForwarding};
use lb_common::maglev::{MaglevBackend, build_table};
use lb_common::maps::*;
use lb_tests::harness::{addr16, backend, maglev_key, vip_key};
use lb_tests::privilege::require_root;
use lb_tests::topology::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

const CONNECTIONS: usize = 300;
const VIP_PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(3);

struct Lab {
    topology: Topology,
    dataplane: Dataplane,
    mode: u8,
    v6: bool,
}

impl Lab {
    fn new(mode: u8, v6: bool) -> Self {
        let topology = Topology::new(3, mode == MODE_DSR).unwrap();
        let dataplane = topology
            .lb
            .enter(|| -> anyhow::Result<Dataplane> {
                let mut dataplane = Dataplane::load(DataplaneSizes { max_vips: 4, ..Default::default() })?;
                dataplane.attach("eth0", AttachMode::Native)?;
                Ok(dataplane)
            })
            .unwrap()
            .unwrap();
        let mut lab = Self { topology, dataplane, mode, v6 };
        lab.publish(3);
        lab
    }

    /// The network's state and the program's verdicts, for a failure message.
    fn diagnose(&self) -> String {
        let reasons = self.dataplane.reason_counters().map(|r| format!("{r:?}")).unwrap_or_else(|e| e.to_string());
        format!("{}--- verdicts ---\n{reasons}", self.topology.diagnose())
    }

    fn vip(&self) -> SocketAddr {
        let ip: IpAddr = if self.v6 { VIP_V6.into() } else { VIP_V4.into() };
        // DSR backends answer on the VIP's port, so the service port is the VIP's.
        SocketAddr::new(ip, if self.mode == MODE_DSR { SERVICE_PORT } else { VIP_PORT })
    }

    /// Writes the first `count` backends and publishes both protocols' VIPs over them.
    fn publish(&mut self, count: usize) {
        let mut members = Vec::new();
        for (i, host) in self.topology.backends.iter().take(count).enumerate() {
            let index = i as u32 + 1;
            let addr = SocketAddr::new(host.addr(self.v6), SERVICE_PORT);
            self.dataplane.set_backend(index, &backend(addr, host.mac)).unwrap();
            members.push(MaglevBackend { index, key: maglev_key(index), weight: 1 });
        }
        let table = build_table(&members, self.dataplane.sizes().ring_size).unwrap();
        let snat: IpAddr = if self.v6 { SNAT_V6.into() } else { SNAT_V4.into() };
        for (slot, proto) in [(0, PROTO_TCP), (1, PROTO_UDP)] {
            let forwarding = VipForwarding {
                vip_index: slot,
                mode: self.mode,
                snat_addr: addr16(snat),
                snat_port_min: 20000,
                snat_port_max: 60000,
                client_affinity: None,
                observe: false,
            };
            self.dataplane.publish_vip(&vip_key(self.vip(), proto), &forwarding, &table).unwrap();
        }
    }
}

/// One TCP request: connect, send a line, read the backend's name.
fn tcp_request(vip: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&vip, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    (&stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

fn udp_request(vip: SocketAddr) -> std::io::Result<String> {
    let bind = if vip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"hello", vip)?;
    let mut buf = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

fn spread_over_backends(mode: u8, v6: bool) {
    let lab = Lab::new(mode, v6);
    let vip = lab.vip();
    let answers = lab
        .topology
        .client
        .enter(|| -> Result<_, String> {
            let mut tcp: HashMap<String, usize> = HashMap::new();
            for _ in 0..CONNECTIONS {
                let name = tcp_request(vip).map_err(|e| format!("TCP request to {vip}: {e}"))?;
                *tcp.entry(name).or_default() += 1;
            }
            let mut udp: HashMap<String, usize> = HashMap::new();
            for _ in 0..30 {
                let name = udp_request(vip).map_err(|e| format!("UDP request to {vip}: {e}"))?;
                *udp.entry(name).or_default() += 1;
            }
            Ok((tcp, udp))
        })
        .unwrap();
    let (tcp, udp) = answers.unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnose()));
    eprintln!("mode {mode} v6 {v6}: TCP answers per backend {tcp:?}, UDP {udp:?}");
    assert_eq!(tcp.values().sum::<usize>(), CONNECTIONS);
    assert_eq!(tcp.len(), 3, "every backend answers: {tcp:?}");
    for (name, count) in &tcp {
        let share = *count as f64 / CONNECTIONS as f64;
        assert!((0.20..=0.47).contains(&share), "{name} got {:.0}% of connections", share * 100.0);
    }
    assert_eq!(udp.values().sum::<usize>(), 30);
    let traffic = lab.dataplane.vip_traffic(0).unwrap();
    assert!(traffic.new_flows >= CONNECTIONS as u64, "VIP counted {} new flows", traffic.new_flows);
}

fn long_lived_connection_survives_a_new_backend(mode: u8, v6: bool) {
    let mut lab = Lab::new(mode, v6);
    let vip = lab.vip();
    let first_exchange = lab
        .topology
        .client
        .enter(|| -> std::io::Result<(TcpStream, String)> {
            let stream = TcpStream::connect_timeout(&vip, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            (&stream).write_all(b"first\n")?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok((stream, line.trim().to_string()))
        })
        .unwrap();
    let (stream, first) =
        first_exchange.unwrap_or_else(|e| panic!("first exchange with {vip}: {e}\n{}", lab.diagnose()));
    lab.topology.add_backend().unwrap();
    lab.publish(4);
    // The socket keeps its namespace; it can be used from this thread.
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for i in 0..20 {
        (&stream).write_all(format!("again {i}\n").as_bytes()).unwrap();
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("exchange {i} after the new backend: {e}\n{}", lab.diagnose()));
        assert_eq!(line.trim(), first, "the connection moved to another backend");
    }
    // New connections do reach the fourth backend.
    let names: std::io::Result<std::collections::HashSet<String>> =
        lab.topology.client.enter(|| (0..200).map(|_| tcp_request(vip)).collect()).unwrap();
    let names = names.unwrap_or_else(|e| panic!("new connection to {vip}: {e}\n{}", lab.diagnose()));
    assert!(names.contains("be4"), "no new connection reached the new backend: {names:?}");
}

macro_rules! e2e {
    ($name:ident, $body:ident, $mode:expr, $v6:expr) => {
        #[test]
        fn $name() {
            if require_root(stringify!($name)) {
                $body($mode, $v6);
            }
        }
    };
}

e2e!(dsr_v4_spreads_connections_over_all_backends, spread_over_backends, MODE_DSR, false);
e2e!(dsr_v6_spreads_connections_over_all_backends, spread_over_backends, MODE_DSR, true);
e2e!(nat_v4_spreads_connections_over_all_backends, spread_over_backends, MODE_NAT, false);
e2e!(nat_v6_spreads_connections_over_all_backends, spread_over_backends, MODE_NAT, true);
e2e!(
    dsr_v4_long_lived_connection_survives_a_new_backend,
    long_lived_connection_survives_a_new_backend,
    MODE_DSR,
    false
);
e2e!(
    nat_v4_long_lived_connection_survives_a_new_backend,
    long_lived_connection_survives_a_new_backend,
    MODE_NAT,
    false
);
e2e!(dsr_v6_long_lived_connection_survives_a_new_backend, long_lived_connection_survives_a_new_backend, MODE_DSR, true);
e2e!(nat_v6_long_lived_connection_survives_a_new_backend, long_lived_connection_survives_a_new_backend, MODE_NAT, true);
