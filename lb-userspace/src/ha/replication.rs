//! Keeping the standby's desired state and NAT flows identical to the active's: the active
//! pushes over TCP; every push answers a fresh random challenge with HMAC-SHA256 under the
//! shared key, so a captured push cannot be replayed and nobody without the key can change a node.
//!
//! One exchange (lines of text): receiver → `NONCE_HEX` · sender → `PUSH_JSON` ·
//! sender → `HMAC_HEX(nonce ‖ PUSH_JSON)` · receiver → `ACK_JSON`. The receiver then sends the
//! next challenge on the same connection, so that a stream of small pushes (NAT flows every few
//! milliseconds) costs no connection set-up each; a sender that closes instead is fine too.

use crate::model::DesiredState;
use anyhow::{Context, Result, anyhow, bail};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Largest push accepted (a state with thousands of backends is well below).
const MAX_LINE: usize = 8 << 20;
/// Bound on one exchange: a silent peer must not hold a push or a receiver forever.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on connecting: the peer is on our segment, so anything slower means it is not there
/// (a node whose link is down); the next attempt comes soon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection with no push for this long is closed (the active pushes every second).
const SESSION_IDLE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Push {
    /// The sender's replication address, for logs and status.
    pub from: SocketAddr,
    /// The digest of the sender's desired state (of the last one it sent, when `state` is None).
    pub digest: String,
    /// The whole desired state, after every change and every second; pushes that only carry
    /// NAT flows leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DesiredState>,
    /// NAT flows the sender opened since its last push ([`encode_flows`]), so that they survive
    /// a takeover.
    #[serde(default)]
    pub nat_flows: String,
    /// The sender had no other NAT flow waiting: with this push the receiver has them all.
    #[serde(default)]
    pub flows_complete: bool,
    /// Sent by a returning node that will preempt: the master answers with every NAT flow it has
    /// waiting, at once.
    #[serde(default)]
    pub wants_flows: bool,
}

/// Most NAT flows one push carries (~3 MB of hex); more wait for the next push.
pub const MAX_FLOWS_PER_PUSH: usize = 10_000;

/// NAT flow records as one hex string (plain `repr(C)` data, the same layout on both nodes).
pub fn encode_flows(flows: &[lb_common::maps::NatFlowRecord]) -> String {
    // SAFETY: repr(C) records of integers and byte arrays without padding, laid out back to back.
    hex::encode(unsafe { std::slice::from_raw_parts(flows.as_ptr().cast::<u8>(), std::mem::size_of_val(flows)) })
}

pub fn decode_flows(text: &str) -> Result<Vec<lb_common::maps::NatFlowRecord>> {
    let bytes = hex::decode(text).context("NAT flows are not hex")?;
    let size = std::mem::size_of::<lb_common::maps::NatFlowRecord>();
    if bytes.len() % size != 0 {
        bail!("NAT flows: {} bytes is not a whole number of {size}-byte records", bytes.len());
    }
    // SAFETY: every byte pattern is a valid NatFlowRecord (integers and byte arrays).
    Ok(bytes.chunks_exact(size).map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) }).collect())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ack {
    pub ok: bool,
    /// The receiver's digest after handling the push.
    pub digest: Option<String>,
    pub error: Option<String>,
}

fn mac(key: &str, nonce: &str, push: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(nonce.as_bytes());
    mac.update(b"\n");
    mac.update(push.as_bytes());
    mac
}

/// Sends `push` to `peer` on a connection of its own; returns the peer's answer.
pub async fn send(peer: SocketAddr, key: &str, push: &Push) -> Result<Ack> {
    Session::open(peer).await?.exchange(key, push).await
}

/// A connection to the peer that carries one push after another.
pub struct Session {
    peer: SocketAddr,
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
    /// The peer's challenge for the next push; None once the peer closed the connection.
    nonce: Option<String>,
}

impl Session {
    pub async fn open(peer: SocketAddr) -> Result<Self> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer))
            .await
            .map_err(|_| anyhow!("connecting to {peer}: no answer within {CONNECT_TIMEOUT:?}"))?
            .with_context(|| format!("connecting to {peer}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let nonce = tokio::time::timeout(EXCHANGE_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| anyhow!("{peer} sent no challenge within {EXCHANGE_TIMEOUT:?}"))??
            .ok_or_else(|| anyhow!("{peer} closed before its challenge"))?;
        Ok(Self { peer, lines, write, nonce: Some(nonce) })
    }

    /// Whether the peer still takes pushes on this connection.
    pub fn is_open(&self) -> bool {
        self.nonce.is_some()
    }

    /// Sends one push and returns the peer's answer.
    pub async fn exchange(&mut self, key: &str, push: &Push) -> Result<Ack> {
        let peer = self.peer;
        let nonce = self.nonce.take().ok_or_else(|| anyhow!("{peer} closed the connection"))?;
        tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            let body = serde_json::to_string(push)?;
            let tag = hex::encode(mac(key, &nonce, &body).finalize().into_bytes());
            self.write.write_all(format!("{body}\n{tag}\n").as_bytes()).await?;
            let answer = self.lines.next_line().await?.ok_or_else(|| anyhow!("{peer} closed without an answer"))?;
            let ack: Ack =
                serde_json::from_str(&answer).with_context(|| format!("{peer} answered something else: {answer:?}"))?;
            // The next challenge follows the answer at once, unless the peer closes.
            self.nonce = self.lines.next_line().await.ok().flatten();
            Ok(ack)
        })
        .await
        .map_err(|_| anyhow!("{peer} did not answer within {EXCHANGE_TIMEOUT:?}"))?
    }
}

/// Accepts pushes on `listener` forever; `handle` decides what to do with an authentic one and
/// returns the digest to answer with. Unauthenticated pushes are refused and logged.
pub async fn serve<F>(listener: TcpListener, key: String, handle: F)
where
    F: Fn(Push) -> Result<String> + Clone + Send + Sync + 'static,
{
    loop {
        let Ok((stream, from)) = listener.accept().await else { continue };
        let (key, handle) = (key.clone(), handle.clone());
        tokio::spawn(async move {
            if let Err(error) = receive(stream, &key, handle).await {
                tracing::warn!(%from, "replication push refused: {error:#}");
            }
        });
    }
}

/// Takes pushes on one connection until the sender closes it or falls silent.
async fn receive<F>(stream: TcpStream, key: &str, handle: F) -> Result<()>
where
    F: Fn(Push) -> Result<String> + Clone + Send + 'static,
{
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let nonce = hex::encode(rand::random::<[u8; 32]>());
        write.write_all(format!("{nonce}\n").as_bytes()).await?;
        let body = match tokio::time::timeout(SESSION_IDLE, read_line(&mut reader)).await {
            Err(_) => return Ok(()), // idle: the sender opens a new connection when it needs one
            Ok(Err(_)) if reader.buffer().is_empty() => return Ok(()), // closed between pushes
            Ok(body) => body?,
        };
        let handle = handle.clone();
        tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            let tag = read_line(&mut reader).await?;
            let tag = hex::decode(tag.trim()).context("the authentication tag is not hex")?;
            if mac(key, &nonce, &body).verify_slice(&tag).is_err() {
                let ack = Ack { ok: false, digest: None, error: Some("authentication failed (check vrrp.key)".into()) };
                write.write_all(format!("{}\n", serde_json::to_string(&ack)?).as_bytes()).await?;
                bail!("authentication failed: the sender does not have our key");
            }
            let push: Push = serde_json::from_str(&body).context("malformed push")?;
            let ack = match tokio::task::spawn_blocking(move || handle(push)).await? {
                Ok(digest) => Ack { ok: true, digest: Some(digest), error: None },
                Err(error) => Ack { ok: false, digest: None, error: Some(format!("{error:#}")) },
            };
            write.write_all(format!("{}\n", serde_json::to_string(&ack)?).as_bytes()).await?;
            match ack.error {
                Some(error) => bail!("{error}"),
                None => Ok(()),
            }
        })
        .await
        .map_err(|_| anyhow!("too slow"))??;
    }
}

async fn read_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<String> {
    let mut line = Vec::new();
    let read = (&mut *reader).take(MAX_LINE as u64).read_until(b'\n', &mut line).await?;
    if read == 0 || line.last() != Some(&b'\n') {
        bail!("the push ended early or is larger than {MAX_LINE} bytes");
    }
    line.pop();
    String::from_utf8(line).context("the push is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    async fn receiver(key: &str) -> (SocketAddr, Arc<Mutex<Vec<Push>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(serve(listener, key.to_string(), move |push: Push| {
            let digest = push.digest.clone();
            sink.lock().unwrap().push(push);
            Ok(digest)
        }));
        (address, received)
    }

    #[test]
    fn nat_flows_cross_as_hex_and_come_back_whole() {
        use lb_common::maps::{ConnState, FlowKey, NatFlowRecord, NatReverse};
        let record = NatFlowRecord {
            flow: FlowKey {
                src: [1; 16],
                dst: [2; 16],
                sport: 7,
                dport: 80u16.to_be(),
                proto: 6,
                family: 4,
                _pad: [0; 2],
            },
            conn: ConnState { backend: 3, snat_port: 4000, flags: 0, _pad: 0, last_seen: 9 },
            reply: FlowKey { src: [3; 16], dst: [4; 16], sport: 8080, dport: 4000, proto: 6, family: 4, _pad: [0; 2] },
            reverse: NatReverse { client_port: 7, vip_port: 80, client_mac: [2, 0, 0, 0, 0, 1], ..Default::default() },
        };
        let text = encode_flows(&[record, record]);
        assert_eq!(decode_flows(&text).unwrap(), vec![record, record]);
        assert!(decode_flows("").unwrap().is_empty());
        assert!(decode_flows(&text[..text.len() - 2]).unwrap_err().to_string().contains("whole number"));
    }

    fn push() -> Push {
        Push {
            from: "127.0.0.1:1".parse().unwrap(),
            digest: "abc".into(),
            state: Some(DesiredState::default()),
            nat_flows: String::new(),
            flows_complete: false,
            wants_flows: false,
        }
    }

    #[tokio::test]
    async fn a_push_with_the_right_key_is_handled_and_acknowledged() {
        let (address, received) = receiver("0123456789abcdef").await;
        let ack = send(address, "0123456789abcdef", &push()).await.unwrap();
        assert!(ack.ok, "{ack:?}");
        assert_eq!(ack.digest.as_deref(), Some("abc"));
        assert_eq!(received.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn one_connection_carries_push_after_push_each_with_a_fresh_challenge() {
        let (address, received) = receiver("0123456789abcdef").await;
        let mut session = Session::open(address).await.unwrap();
        for _ in 0..3 {
            let ack = session.exchange("0123456789abcdef", &push()).await.unwrap();
            assert!(ack.ok, "{ack:?}");
            assert!(session.is_open(), "the receiver sent its next challenge");
        }
        assert_eq!(received.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_push_with_another_key_is_refused_and_not_handled() {
        let (address, received) = receiver("0123456789abcdef").await;
        let ack = send(address, "fedcba9876543210", &push()).await.unwrap();
        assert!(!ack.ok);
        assert!(ack.error.unwrap().contains("authentication failed"));
        assert!(received.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_replayed_push_fails_because_the_challenge_changed() {
        // Record what an honest sender sends for one challenge, then replay it on a new connection.
        let (address, received) = receiver("0123456789abcdef").await;
        let body = serde_json::to_string(&push()).unwrap();
        let tag = hex::encode(mac("0123456789abcdef", "an-old-nonce", &body).finalize().into_bytes());
        let stream = TcpStream::connect(address).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let _fresh_nonce = lines.next_line().await.unwrap();
        write.write_all(format!("{body}\n{tag}\n").as_bytes()).await.unwrap();
        let ack: Ack = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(!ack.ok);
        assert!(received.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_refusal_by_the_handler_reaches_the_sender() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, "0123456789abcdef".into(), |_| bail!("this node is master")));
        let ack = send(address, "0123456789abcdef", &push()).await.unwrap();
        assert_eq!(ack.error.as_deref(), Some("this node is master"));
    }
}
