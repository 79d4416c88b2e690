//! One probe per check kind: ICMP echo (host up), TCP connect (port open), HTTP request with an
//! expected status and optional body substring (service healthy). Each returns its latency or
//! the reason it failed, in words an operator reads in logs ("timeout", "status 503", ...).

use crate::model::CheckKind;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use surge_ping::{Client, Config, ICMP, PingIdentifier, PingSequence};
use tokio::net::{TcpSocket, TcpStream};

/// How much of a response body an HTTP check reads at most.
const MAX_BODY: usize = 64 * 1024;

/// Shared ICMP sockets (one per family) for every ICMP check of the engine, and one per
/// backend for ICMP checks via a VIP (a socket's mark names the backend).
#[derive(Clone)]
pub struct IcmpClients {
    v4: Option<Arc<Client>>,
    v6: Option<Arc<Client>>,
    marked: Arc<Mutex<MarkedClients>>,
}

/// ICMP sockets for checks via a VIP, by (mark, source address).
type MarkedClients = HashMap<(u32, IpAddr), Arc<Client>>;

impl IcmpClients {
    /// Opens the sockets; a family that cannot be opened fails its checks with the reason.
    pub fn open() -> Self {
        let open = |kind| Client::new(&Config::builder().kind(kind).build()).ok().map(Arc::new);
        Self { v4: open(ICMP::V4), v6: open(ICMP::V6), marked: Default::default() }
    }

    /// The socket for checks via a VIP with `mark`, sent from `source`.
    fn marked(&self, mark: u32, source: IpAddr) -> Result<Arc<Client>, String> {
        let mut marked = self.marked.lock().map_err(|_| "ICMP sockets poisoned".to_string())?;
        if let Some(client) = marked.get(&(mark, source)) {
            return Ok(client.clone());
        }
        let kind = if source.is_ipv4() { ICMP::V4 } else { ICMP::V6 };
        let config = Config::builder().kind(kind).bind(SocketAddr::new(source, 0)).build();
        let client = Client::new(&config).map_err(|e| format!("cannot open an ICMP socket: {e}"))?;
        let fd = client.get_socket().get_native_sock();
        // SAFETY: the client owns the open socket for as long as the borrow is used.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        socket2::SockRef::from(&socket).set_mark(mark).map_err(|e| format!("cannot mark the ICMP socket: {e}"))?;
        let client = Arc::new(client);
        marked.insert((mark, source), client.clone());
        Ok(client)
    }

    /// Closes the sockets of checks via a VIP that are gone.
    pub fn retain_marked(&self, keep: &dyn Fn(u32) -> bool) {
        if let Ok(mut marked) = self.marked.lock() {
            marked.retain(|(mark, _), _| keep(*mark));
        }
    }
}

/// How a check via a VIP leaves: the socket mark the load balancer's `lb_hc` program steers by,
/// and the address the backend answers to (the interface's own, of the VIP's family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via {
    pub mark: u32,
    pub source: Option<IpAddr>,
}

/// Runs one check against `target` within `timeout`; `via` for a check via a VIP.
pub async fn probe(
    kind: &CheckKind,
    target: SocketAddr,
    timeout: Duration,
    icmp: &IcmpClients,
    (ident, seq): (u16, u16),
    via: Option<Via>,
) -> Result<Duration, String> {
    let started = Instant::now();
    let attempt = async {
        match kind {
            CheckKind::Icmp => icmp_echo(icmp, target.ip(), ident, seq, timeout, via).await,
            CheckKind::Tcp => connect(target, via).await.map(drop),
            CheckKind::Http { method, path, host, expect_status, body_contains } => {
                let request = (method.as_str(), path.as_str(), host.as_deref());
                http_request(target, via, request, *expect_status, body_contains.as_deref()).await
            }
        }
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => return Ok(started.elapsed()),
        Ok(Err(reason)) => reason,
        Err(_) => format!("timeout after {}", humantime::format_duration(timeout)),
    };
    Err(match via {
        // The backend's own address may well answer: say what this check is about.
        Some(_) => format!("via VIP {target}: {result} (does the backend hold the VIP and strip the tunnel?)"),
        None => result,
    })
}

/// A TCP connection to `target`, marked and from the given source for a check via a VIP.
async fn connect(target: SocketAddr, via: Option<Via>) -> Result<TcpStream, String> {
    let Some(via) = via else {
        return TcpStream::connect(target).await.map_err(describe_io);
    };
    let source = via_source(target.ip(), via)?;
    let socket = if target.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(describe_io)?;
    socket2::SockRef::from(&socket).set_mark(via.mark).map_err(|e| format!("cannot mark the socket: {e}"))?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("cannot bind {source}: {e}"))?;
    socket.connect(target).await.map_err(describe_io)
}

fn via_source(target: IpAddr, via: Via) -> Result<IpAddr, String> {
    via.source.ok_or_else(|| {
        let family = if target.is_ipv4() { "IPv4" } else { "IPv6" };
        format!("the load balancer's interface has no {family} address to check from")
    })
}

async fn icmp_echo(
    icmp: &IcmpClients,
    ip: IpAddr,
    ident: u16,
    seq: u16,
    timeout: Duration,
    via: Option<Via>,
) -> Result<(), String> {
    let marked;
    let client = match via {
        Some(via) => {
            marked = Some(icmp.marked(via.mark, via_source(ip, via)?)?);
            &marked
        }
        None if ip.is_ipv4() => &icmp.v4,
        None => &icmp.v6,
    };
    let Some(client) = client else { return Err("cannot open an ICMP socket".into()) };
    let mut pinger = client.pinger(ip, PingIdentifier(ident)).await;
    pinger.timeout(timeout);
    pinger.ping(PingSequence(seq), b"lb health check").await.map(drop).map_err(|e| match e {
        surge_ping::SurgeError::Timeout { .. } => "no echo reply".to_string(),
        other => format!("echo failed: {other}"),
    })
}

async fn http_request(
    target: SocketAddr,
    via: Option<Via>,
    (method, path, host): (&str, &str, Option<&str>),
    (low, high): (u16, u16),
    body_contains: Option<&str>,
) -> Result<(), String> {
    let stream = connect(target, via).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let connection = tokio::spawn(connection);
    let host = host.map_or_else(|| target.to_string(), str::to_string);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "lb-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP request: {e}"))?;
        let status = response.status().as_u16();
        if !(low..=high).contains(&status) {
            return Err(format!("status {status}"));
        }
        if let Some(needle) = body_contains {
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            if !String::from_utf8_lossy(&body).contains(needle) {
                return Err(format!("body lacks {needle:?}"));
            }
        }
        Ok(())
    }
    .await;
    connection.abort();
    result
}

fn describe_io(error: std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => "unreachable".into(),
        _ => error.to_string(),
    }
}
