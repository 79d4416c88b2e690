//! One probe per check kind: ICMP echo (host up), TCP connect (port open), HTTP request with an
//! expected status and optional body substring (service healthy). Each returns its latency or
//! the reason it failed, in words an operator reads in logs ("timeout", "status 503", ...).

use crate::model::CheckKind;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use surge_ping::{Client, Config, ICMP, PingIdentifier, PingSequence};
use tokio::net::TcpStream;

/// How much of a response body an HTTP check reads at most.
const MAX_BODY: usize = 64 * 1024;

/// Shared ICMP sockets (one per family) for every ICMP check of the engine.
#[derive(Clone)]
pub struct IcmpClients {
    v4: Option<Arc<Client>>,
    v6: Option<Arc<Client>>,
}

impl IcmpClients {
    /// Opens the sockets; a family that cannot be opened fails its checks with the reason.
    pub fn open() -> Self {
        let open = |kind| Client::new(&Config::builder().kind(kind).build()).ok().map(Arc::new);
        Self { v4: open(ICMP::V4), v6: open(ICMP::V6) }
    }
}

/// Runs one check against `target` within `timeout`.
pub async fn probe(
    kind: &CheckKind,
    target: SocketAddr,
    timeout: Duration,
    icmp: &IcmpClients,
    ident: u16,
    seq: u16,
) -> Result<Duration, String> {
    let started = Instant::now();
    let attempt = async {
        match kind {
            CheckKind::Icmp => icmp_echo(icmp, target.ip(), ident, seq, timeout).await,
            CheckKind::Tcp => TcpStream::connect(target).await.map(drop).map_err(describe_io),
            CheckKind::Http { method, path, host, expect_status, body_contains } => {
                http_request(target, method, path, host.as_deref(), *expect_status, body_contains.as_deref()).await
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err(format!("timeout after {}", humantime::format_duration(timeout))),
    }
}

async fn icmp_echo(icmp: &IcmpClients, ip: IpAddr, ident: u16, seq: u16, timeout: Duration) -> Result<(), String> {
    let client = if ip.is_ipv4() { &icmp.v4 } else { &icmp.v6 };
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
    method: &str,
    path: &str,
    host: Option<&str>,
    (low, high): (u16, u16),
    body_contains: Option<&str>,
) -> Result<(), String> {
    let stream = TcpStream::connect(target).await.map_err(describe_io)?;
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
