//! The engine against small servers on loopback: what each kind of server makes of a check, how
//! often connections are opened, and the reasons a failing check gives.

use super::{BackendStatus, Health, HealthEngine};
use crate::model::{BackendSpec, CheckKind, CheckSpec, DesiredState, Mode, Protocol, VipSpec};
use crate::planner::backend_id;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How a test server answers.
#[derive(Clone, Copy)]
enum Answer {
    /// HTTP/1.1, the connection kept for the next request.
    KeepAlive,
    /// HTTP/1.1 with "Connection: close", then closes.
    Close,
    /// HTTP/1.0 without keep-alive, then closes.
    Http10,
    /// Keeps the connection after the answer, then drops it a little later without a word
    /// (as a server's keep-alive timeout does).
    DropsIdle,
    /// A chunked body.
    Chunked,
    /// Status 503.
    Unavailable,
    /// Reads the request and never answers.
    Never,
    /// Answers `n` requests on the first connection, then nothing, on any connection.
    StopsAfter(usize),
}

struct Server {
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

fn server(answer: Answer) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (counted, asked) = (connections.clone(), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
            let asked = asked.clone();
            std::thread::spawn(move || serve(stream, answer, &asked));
        }
    });
    Server { address, connections, requests }
}

fn serve(mut stream: TcpStream, answer: Answer, asked: &AtomicUsize) {
    let mut received = Vec::new();
    let mut chunk = [0; 1024];
    loop {
        while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            received.drain(..end + 4);
            let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
            let text: &[u8] = match answer {
                Answer::KeepAlive | Answer::DropsIdle => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
                Answer::Close => b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nok\n",
                Answer::Http10 => b"HTTP/1.0 200 OK\r\n\r\nok, old style\n",
                Answer::Chunked => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nall g\r\n6;x=y\r\nood ok\r\n0\r\n\r\n"
                }
                Answer::Unavailable => b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n",
                Answer::StopsAfter(limit) if n <= limit => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
                Answer::Never | Answer::StopsAfter(_) => b"",
            };
            if !text.is_empty() && stream.write_all(text).is_err() {
                return;
            }
            match answer {
                Answer::Close | Answer::Http10 => return,
                Answer::DropsIdle => {
                    std::thread::sleep(Duration::from_millis(20));
                    return;
                }
                _ => {}
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

fn http(path: &str, body_contains: Option<&str>) -> CheckKind {
    CheckKind::Http {
        method: "GET".into(),
        path: path.into(),
        host: None,
        expect_status: (200, 299),
        body_contains: body_contains.map(Into::into),
    }
}

fn state(kind: CheckKind, backend: SocketAddr) -> DesiredState {
    let check = CheckSpec {
        kind,
        port: None,
        initial_up: false,
        via_vip: false,
        interval: Duration::from_millis(40),
        timeout: Duration::from_millis(300),
        rise: 1,
        fall: 1,
    };
    DesiredState {
        vips: vec![VipSpec {
            name: "web".into(),
            address: "10.0.0.10:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode: Mode::Nat,
            snat: Some("10.0.0.2".parse().unwrap()),
            snat_ports: (1024, 65535),
            affinity: Default::default(),
            affinity_prefix: None,
            answer_ping: true,
            observe: None,
            check: Some(check),
            backends: vec![BackendSpec {
                address: backend,
                weight: 1,
                backup: false,
                drained: false,
                mac: None,
                check: None,
            }],
        }],
    }
}

/// Checks `backend` with `kind` until `done` holds for its status (or 5 s passed); returns it.
fn check_until(kind: CheckKind, backend: SocketAddr, done: impl Fn(&BackendStatus) -> bool) -> BackendStatus {
    let (events, _transitions) = tokio::sync::mpsc::unbounded_channel();
    let mut engine = HealthEngine::new(events).unwrap();
    let state = state(kind, backend);
    engine.sync(&state, &|_, _| Health::Down, &|_, _| None);
    let id = backend_id(&state.vips[0], backend);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let status = engine.status(&id).unwrap();
        if done(&status) || Instant::now() > end {
            return status;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn checked(n: u64) -> impl Fn(&BackendStatus) -> bool {
    move |s| s.checks >= n
}

fn all_good(status: &BackendStatus) {
    assert_eq!(status.health, Health::Up, "{status:?}");
    assert_eq!(status.transitions, 1, "up once and never down: {status:?}");
    assert!(status.last_detail.starts_with("ok in "), "{status:?}");
}

#[test]
fn http_checks_reuse_one_connection_to_a_keep_alive_server() {
    let server = server(Answer::KeepAlive);
    let status = check_until(http("/healthz", None), server.address, checked(8));
    all_good(&status);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1, "one connection for {} checks", status.checks);
}

#[test]
fn a_server_that_closes_after_each_answer_stays_up() {
    let server = server(Answer::Close);
    let status = check_until(http("/", None), server.address, checked(6));
    all_good(&status);
    assert!(server.connections.load(Ordering::SeqCst) >= 6, "a new connection for each check");
}

#[test]
fn an_http_1_0_server_stays_up() {
    let server = server(Answer::Http10);
    all_good(&check_until(http("/", Some("old style")), server.address, checked(6)));
}

#[test]
fn a_connection_the_server_dropped_while_idle_is_reopened_by_the_next_check() {
    let server = server(Answer::DropsIdle);
    let status = check_until(http("/", None), server.address, checked(6));
    all_good(&status);
    assert!(server.connections.load(Ordering::SeqCst) >= 6);
}

#[test]
fn a_chunked_body_is_searched_whole() {
    let server = server(Answer::Chunked);
    let status = check_until(http("/", Some("all good ok")), server.address, checked(4));
    all_good(&status);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1, "the connection outlives a chunked answer");
    let lacking = check_until(http("/", Some("bad")), server.address, checked(2));
    assert_eq!(lacking.last_detail, "body lacks \"bad\"");
    assert_eq!(lacking.health, Health::Down);
}

#[test]
fn a_status_outside_the_range_fails_with_the_status() {
    let server = server(Answer::Unavailable);
    let status = check_until(http("/", None), server.address, checked(2));
    assert_eq!((status.health, status.last_detail.as_str()), (Health::Down, "status 503"));
}

#[test]
fn a_server_that_never_answers_fails_by_timeout() {
    let server = server(Answer::Never);
    let status = check_until(http("/", None), server.address, checked(2));
    assert_eq!((status.health, status.last_detail.as_str()), (Health::Down, "timeout after 300ms"));
}

#[test]
fn a_server_that_stops_answering_on_its_kept_connection_goes_down() {
    let server = server(Answer::StopsAfter(3));
    let status = check_until(http("/", None), server.address, |s| s.transitions >= 2);
    assert_eq!((status.health, status.last_detail.as_str()), (Health::Down, "timeout after 300ms"), "{status:?}");
    assert_eq!(status.checks, 4, "three good checks, then one that timed out: {status:?}");
}

#[test]
fn a_closed_port_fails_the_http_and_the_tcp_check_as_refused() {
    let address = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for kind in [http("/", None), CheckKind::Tcp] {
        let status = check_until(kind, address, checked(3));
        assert_eq!((status.health, status.last_detail.as_str()), (Health::Down, "connection refused"));
    }
}

#[test]
fn a_port_that_closes_takes_a_kept_http_connection_down() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    // Answers on one connection until told to stop, then closes it and the port.
    let stop = Arc::new(AtomicUsize::new(0));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut chunk = [0; 1024];
        while stopped.load(Ordering::SeqCst) == 0 {
            match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => drop(stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
    });
    let (events, _transitions) = tokio::sync::mpsc::unbounded_channel();
    let mut engine = HealthEngine::new(events).unwrap();
    let state = state(http("/", None), address);
    engine.sync(&state, &|_, _| Health::Down, &|_, _| None);
    let id = backend_id(&state.vips[0], address);
    let wait = |what: &dyn Fn(&BackendStatus) -> bool| {
        let end = Instant::now() + Duration::from_secs(5);
        while !what(&engine.status(&id).unwrap()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        engine.status(&id).unwrap()
    };
    all_good(&wait(&|s| s.checks >= 4));
    stop.store(1, Ordering::SeqCst);
    let status = wait(&|s| s.health == Health::Down);
    assert_eq!(status.last_detail, "connection refused", "{status:?}");
}

#[test]
fn tcp_checks_connect_each_time_and_pass() {
    let server = server(Answer::KeepAlive);
    let status = check_until(CheckKind::Tcp, server.address, checked(6));
    all_good(&status);
    assert!(server.connections.load(Ordering::SeqCst) >= 6, "a connection per check");
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn icmp_checks_of_the_loopback_address_pass() {
    let status = check_until(CheckKind::Icmp, "127.0.0.1:0".parse().unwrap(), checked(4));
    if status.last_detail.starts_with("cannot open an ICMP socket") {
        eprintln!("skipped: no ICMP socket here ({})", status.last_detail);
        return;
    }
    all_good(&status);
}

#[test]
fn a_bad_request_is_reported_not_sent() {
    let server = server(Answer::KeepAlive);
    let status = check_until(http("/with space", None), server.address, checked(2));
    assert_eq!(status.last_detail, "bad request: invalid uri character");
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);
}
