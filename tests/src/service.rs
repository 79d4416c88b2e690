//! A daemon configuration for the standard topology, and client traffic to measure through it.

use crate::topology::{SERVICE_PORT, SNAT_V4, Topology, VIP_V4};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

pub const TCP_VIP_PORT: u16 = 80;
pub const UDP_VIP_PORT: u16 = 53;

pub fn tcp_vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), TCP_VIP_PORT)
}

pub fn udp_vip() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), UDP_VIP_PORT)
}

/// NAT VIPs "web" (TCP) and "dns" (UDP) over the first `backends` backends of the topology,
/// with `check` (a TOML inline table) on both when given. `{instance}` is left for the daemon
/// helper to fill in.
pub fn nat_config(topology: &Topology, backends: usize, check: Option<&str>) -> String {
    let mut config = "[daemon]\ninterface = \"eth0\"\nxdp_mode = \"native\"\ninstance = \"{instance}\"\nring_size = 65537\nmax_vips = 8\nmax_conns = 262144\n".to_string();
    for (name, proto, port) in [("web", "tcp", TCP_VIP_PORT), ("dns", "udp", UDP_VIP_PORT)] {
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{VIP_V4}:{port}\"\nprotocol = \"{proto}\"\nmode = \"nat\"\nsnat = \"{SNAT_V4}\"\n"
        ));
        if let Some(check) = check {
            config.push_str(&format!("check = {check}\n"));
        }
        for host in topology.backends.iter().take(backends) {
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"{}:{SERVICE_PORT}\"\n", host.v4));
        }
    }
    config
}

/// One short TCP exchange: connect, send a line, read the backend's name.
pub fn tcp_request(vip: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    exchange_on(&TcpStream::connect_timeout(&vip, timeout)?, timeout)
}

/// As [`tcp_request`], from the client address `from` (one the calling namespace holds).
pub fn tcp_request_from(from: IpAddr, vip: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(vip), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&vip.into(), timeout)?;
    exchange_on(&socket.into(), timeout)
}

/// One line to the name server over an open connection, and its answer (the server's name);
/// the connection stays open.
pub fn exchange_on(stream: &TcpStream, timeout: Duration) -> std::io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    let mut writer = stream;
    writer.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed without an answer"));
    }
    Ok(line.trim().to_string())
}

/// Sends `count` datagrams, one every `gap`, from `sockets` sockets in turn, and counts the
/// answers. Returns (sent, answered).
pub fn udp_stream(vip: SocketAddr, count: usize, gap: Duration, sockets: usize) -> (usize, usize) {
    let sockets: Vec<UdpSocket> = (0..sockets)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind UDP");
            s.set_nonblocking(true).expect("non-blocking");
            s
        })
        .collect();
    let mut answered = 0;
    let mut buf = [0u8; 64];
    let drain = |answered: &mut usize, buf: &mut [u8]| {
        for s in &sockets {
            while s.recv(buf).is_ok() {
                *answered += 1;
            }
        }
    };
    let start = Instant::now();
    for i in 0..count {
        let _ = sockets[i % sockets.len()].send_to(format!("datagram {i}").as_bytes(), vip);
        drain(&mut answered, &mut buf);
        let next = start + gap * (i as u32 + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // Late answers.
    let deadline = Instant::now() + Duration::from_secs(1);
    while answered < count && Instant::now() < deadline {
        drain(&mut answered, &mut buf);
        std::thread::sleep(Duration::from_millis(10));
    }
    (count, answered)
}

/// The daemon's Prometheus page (the whole HTTP answer), fetched on `ns`'s loopback.
pub fn scrape_metrics(ns: &crate::netns::Netns, port: u16) -> anyhow::Result<String> {
    ns.enter(|| -> std::io::Result<String> {
        let mut http = TcpStream::connect(("127.0.0.1", port))?;
        http.set_read_timeout(Some(Duration::from_secs(5)))?;
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut http, &mut answer)?;
        Ok(answer)
    })?
    .map_err(Into::into)
}
