//! CPU used by the health-check engine: N backends checked at a 1 s interval for a while,
//! against a few local servers on loopback (each checked many times, as distinct backends).
//!
//! Usage: health-cost [BACKENDS] [SECONDS] [KIND]   (default 5000, 20, tcp;
//! kind tcp | http | http-close | icmp)
//! Prints the engine's CPU time per second of wall time (the servers run in other processes).
//! `http` checks servers that keep connections open between requests and serve them from an
//! epoll loop, as web servers do;
//! `http-close` the test backend `name-server`, which closes the connection after each answer.
//! On loopback the kernel's work for both ends of a connection (the server's half of the
//! handshake too) is done in the sender's context, so it counts as the engine's. For tcp and
//! http a second line shows that share on its own: the same work as the checks done, from a bare
//! loop of blocking calls with no engine.

use anyhow::{Result, bail};
use lb::health::HealthEngine;
use lb::model::{BackendSpec, CheckKind, CheckSpec, DesiredState, Mode, Protocol, VipSpec};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVERS: u16 = 20;
const FIRST_PORT: u16 = 31000;

fn cpu_time() -> Duration {
    cpu_time_of(libc::RUSAGE_SELF)
}

fn cpu_time_of(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--serve-http") {
        let port = args.nth(1).map(|a| a.parse()).transpose()?.unwrap_or(FIRST_PORT);
        return serve_http(port);
    }
    let backends: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5000);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let kind_name = args.next().unwrap_or_else(|| "tcp".into());
    let http = CheckKind::Http {
        method: "GET".into(),
        path: "/".into(),
        host: None,
        expect_status: (200, 299),
        body_contains: None,
    };
    let (kind, servers) = match kind_name.as_str() {
        "tcp" => (CheckKind::Tcp, "name-server"),
        "icmp" => (CheckKind::Icmp, "name-server"),
        "http" => (http, "keep-alive"),
        "http-close" => (http, "name-server"),
        other => bail!("unknown kind {other}"),
    };
    let exe = std::env::current_exe()?;
    let name_server = exe.parent().expect("target dir").join("name-server");
    let _servers = Servers(
        (0..SERVERS)
            .map(|i| {
                let port = (FIRST_PORT + i).to_string();
                let mut command = if servers == "keep-alive" {
                    let mut command = Command::new(&exe);
                    command.args(["--serve-http", &port]);
                    command
                } else {
                    let mut command = Command::new(&name_server);
                    command.args([format!("s{i}"), port]);
                    command
                };
                command.stdout(Stdio::null()).spawn()
            })
            .collect::<Result<_, _>>()?,
    );
    std::thread::sleep(Duration::from_millis(300));

    // Backends 127.0.x.y:port, spread over the servers' ports: all on loopback.
    let list: Vec<BackendSpec> = (0..backends)
        .map(|i| {
            let address: SocketAddr = format!(
                "127.{}.{}.{}:{}",
                1 + i / 65536,
                (i / 256) % 256,
                1 + i % 250,
                FIRST_PORT + (i % SERVERS as u32) as u16
            )
            .parse()
            .unwrap();
            BackendSpec { address, weight: 1, backup: false, drained: false, mac: None, check: None }
        })
        .collect();
    let check = CheckSpec {
        kind,
        port: None,
        initial_up: false,
        via_vip: false,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
    };
    let state = DesiredState {
        vips: vec![VipSpec {
            name: "bench".into(),
            address: "10.0.0.10:80".parse()?,
            protocol: Protocol::Tcp,
            mode: Mode::Nat,
            snat: Some("10.0.0.2".parse()?),
            snat_ports: (1024, 65535),
            affinity: Default::default(),
            affinity_prefix: None,
            answer_ping: true,
            observe: None,
            check: Some(check),
            backends: list.clone(),
        }],
    };
    let (events, mut transitions) = tokio::sync::mpsc::unbounded_channel();
    let mut engine = HealthEngine::new(events)?;
    engine.sync(&state, &|_, _| lb::health::Health::Down, &|_, _| None);
    // Let every checker start, then measure.
    std::thread::sleep(Duration::from_secs(3));
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let mut ups = 0;
    while let Ok(t) = transitions.try_recv() {
        ups += (t.health == lb::health::Health::Up) as u32;
    }
    let checks: u64 = list
        .iter()
        .filter_map(|b| engine.status(&lb::planner::backend_id(&state.vips[0], b.address)))
        .map(|s| s.checks)
        .sum();
    let what = match kind_name.as_str() {
        "tcp" => "Tcp checks",
        "icmp" => "Icmp checks",
        "http" => "Http checks (servers keep connections open)",
        _ => "Http checks (servers close after each answer)",
    };
    println!(
        "{backends} backends, {what} at a 1 s interval: {:.1}% of one core ({:.2} s CPU in {:.1} s), {checks} checks done, {ups} backends came up",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        wall.as_secs_f64()
    );
    drop(engine);
    // Every backend once per interval (1 s).
    let per_second = f64::from(backends);
    let bare = match kind_name.as_str() {
        "tcp" => Some(("connect, then reset with connect(AF_UNSPEC) as the checks do", bare_connections(&list)?)),
        "http" => Some(("one request and its answer on a kept connection", bare_requests()?)),
        _ => None,
    };
    if let Some((what, per_check)) = bare {
        println!(
            "bare loop without the engine, {what}: {:.1} µs each, {:.1}% of one core at the checks' {per_second:.0}/s \
             (the kernel's share above, both ends on loopback)",
            per_check.as_secs_f64() * 1e6,
            100.0 * per_check.as_secs_f64() * per_second
        );
    }
    Ok(())
}

const BARE_ROUNDS: u32 = 20_000;

/// CPU time of this thread per round of `round`, over `BARE_ROUNDS` rounds back to back.
fn per_round(mut round: impl FnMut(u32) -> Result<()>) -> Result<Duration> {
    let start = cpu_time_of(libc::RUSAGE_THREAD);
    for i in 0..BARE_ROUNDS {
        round(i)?;
    }
    Ok((cpu_time_of(libc::RUSAGE_THREAD) - start) / BARE_ROUNDS)
}

/// A TCP check's kernel work alone: one socket, connected to the backends in turn and dissolved
/// again with connect(AF_UNSPEC), which resets the connection.
fn bare_connections(backends: &[BackendSpec]) -> Result<Duration> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    per_round(|i| {
        socket.connect(&backends[i as usize % backends.len()].address.into())?;
        lb::health::disconnect(&socket)?;
        Ok(())
    })
}

/// An HTTP check's kernel work alone, against servers that keep connections: a request written
/// and its whole answer read, on connections opened once.
fn bare_requests() -> Result<Duration> {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
    let mut connections = (0..SERVERS)
        .map(|i| std::net::TcpStream::connect(("127.0.0.1", FIRST_PORT + i)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut answer = [0u8; ANSWER.len()];
    per_round(|i| {
        let connection = &mut connections[(i % SERVERS as u32) as usize];
        connection.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nuser-agent: lb-health\r\n\r\n")?;
        connection.read_exact(&mut answer)?;
        anyhow::ensure!(answer == ANSWER, "unexpected answer {:?}", String::from_utf8_lossy(&answer));
        Ok(())
    })
}

/// An HTTP/1.1 server that keeps each connection open for the next request and serves all of
/// them from one epoll loop, as an nginx worker does: answers every request with 200 and "ok".
fn serve_http(port: u16) -> Result<()> {
    use std::collections::HashMap;
    use std::os::fd::AsRawFd;
    const LISTENER: u64 = u64::MAX;
    let listener = TcpListener::bind(("::", port))?;
    listener.set_nonblocking(true)?;
    // SAFETY: epoll_create1 takes flags only.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let watch = |fd: i32, data: u64| {
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: data };
        // SAFETY: valid descriptors and an event that outlives the call.
        unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &raw mut event) }
    };
    watch(listener.as_raw_fd(), LISTENER);
    let mut connections: HashMap<u64, (std::net::TcpStream, Vec<u8>)> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut chunk = [0u8; 4096];
    loop {
        // SAFETY: the buffer holds as many events as passed.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        for event in &events[..n.max(0) as usize] {
            let key = event.u64;
            if key == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    let fd = stream.as_raw_fd();
                    watch(fd, fd as u64);
                    connections.insert(fd as u64, (stream, Vec::new()));
                }
                continue;
            }
            let Some((stream, received)) = connections.get_mut(&key) else { continue };
            let open = match stream.read(&mut chunk) {
                Ok(0) => false,
                Ok(n) => {
                    received.extend_from_slice(&chunk[..n]);
                    let mut open = true;
                    while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                        // A client that asks for "Connection: close" gets it.
                        let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
                        received.drain(..end + 4);
                        open &= stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").is_ok();
                        open &= !head.contains("\r\nconnection: close");
                    }
                    open
                }
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            };
            if !open {
                // Closing the descriptor takes it out of the epoll set.
                connections.remove(&key);
            }
        }
    }
}

/// The local servers, killed however the benchmark ends.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for server in &mut self.0 {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}
