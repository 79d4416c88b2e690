//! The daemon's API: one JSON request and one JSON response per connection, on a Unix socket
//! (`/run/lb/<instance>.sock`, mode 0600) that only root may use (checked on every connection
//! from the peer's credentials, not only from the file mode).

use crate::model::{BackendSpec, Protocol, VipSpec};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub const RUN_ROOT: &str = "/run/lb";
/// Largest request accepted (an `apply` carries a whole configuration file).
const MAX_REQUEST: usize = 4 << 20;

pub fn socket_path(instance: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(format!("{instance}.sock"))
}

/// Runtime files of one instance other than its socket (BIRD's configuration and socket).
pub fn run_dir(instance: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(instance)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    VipList,
    VipAdd {
        vip: VipSpec,
    },
    VipDel {
        name: String,
    },
    BackendList {
        vip: Option<String>,
    },
    BackendAdd {
        vip: String,
        backend: BackendSpec,
    },
    BackendDel {
        vip: String,
        address: SocketAddr,
    },
    BackendDrain {
        vip: String,
        address: SocketAddr,
        drained: bool,
    },
    /// A whole configuration file: validated, diffed against the running state, applied atomically.
    Apply {
        file: String,
        source: String,
        dry_run: bool,
    },
    Stats,
    Explain {
        src: SocketAddr,
        dst: SocketAddr,
        protocol: Protocol,
    },
    /// Hand the VIPs over to the standby (maintenance).
    Failover,
    /// Stop the daemon; with `detach`, also remove the program, pins and saved state.
    Shutdown {
        detach: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn success(data: impl Serialize) -> Self {
        Self { ok: true, error: None, data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null) }
    }

    pub fn failure(error: impl std::fmt::Display) -> Self {
        Self { ok: false, error: Some(error.to_string()), data: serde_json::Value::Null }
    }
}

/// Sends one request to the daemon of `instance` and returns its data, or its error.
pub async fn call(instance: &str, request: &Request) -> Result<serde_json::Value> {
    let path = socket_path(instance);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!("cannot reach the lb daemon of instance {instance:?} at {} (is `lb daemon` running?)", path.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // The daemon may answer (a refusal) and close before reading: read its answer even when
    // the write fails.
    let written = write.write_all(&line).await;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await.context("reading the daemon's answer")?;
    if answer.is_empty() {
        written.context("sending the request")?;
        bail!("the daemon closed the connection without answering");
    }
    let response: Response = serde_json::from_str(&answer).context("the daemon's answer is not valid JSON")?;
    match response.error {
        Some(error) if !response.ok => bail!("{error}"),
        _ => Ok(response.data),
    }
}

/// Binds the socket with mode 0600, replacing a stale socket file but never a live daemon's.
pub async fn bind(instance: &str) -> Result<UnixListener> {
    let path = socket_path(instance);
    std::fs::create_dir_all(RUN_ROOT).with_context(|| format!("creating {RUN_ROOT}"))?;
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            bail!("another lb daemon already serves instance {instance:?} at {}", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    // Created with no permissions for group and others from the start, so there is no window
    // in which another user could connect.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(&path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Reads one request from a connection after checking that the peer is root. Answers refusals
/// itself and returns None for them.
pub async fn read_request(stream: &mut UnixStream) -> Option<Request> {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::warn!("API connection without peer credentials refused: {e}");
            return None;
        }
    };
    if uid != 0 {
        tracing::warn!(uid, "API request from a non-root user refused");
        let _ = reply(
            stream,
            &Response::failure(format!("permission denied: the lb API serves root only (you are uid {uid})")),
        )
        .await;
        return None;
    }
    let mut line = String::new();
    let mut reader = BufReader::new(&mut *stream).take(MAX_REQUEST as u64);
    if reader.read_line(&mut line).await.is_err() || line.is_empty() {
        return None;
    }
    match serde_json::from_str::<Request>(&line) {
        Ok(request) => Some(request),
        Err(e) => {
            let _ = reply(stream, &Response::failure(format!("invalid request: {e}"))).await;
            None
        }
    }
}

pub async fn reply(stream: &mut UnixStream, response: &Response) -> Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    Ok(())
}
