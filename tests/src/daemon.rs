//! A real `lb daemon` inside a test namespace, driven through the real `lb` CLI.
//!
//! The daemon runs under `nsenter --net=…`, which changes only the network namespace: `ip netns
//! exec` would also remount /sys and hide the host's bpffs, where the daemon pins its data plane.
//! Every daemon gets its own instance name (socket, pins, saved state), removed on drop.

use crate::netns::Netns;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The `lb` binary cargo built beside the test executables.
pub fn lb_binary() -> PathBuf {
    let path = crate::sibling_binary("lb");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p lb-userspace` (cargo xtask test does)",
        path.display()
    );
    path
}

/// A fresh instance name for one test daemon.
pub fn unique_instance() -> String {
    format!("t{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

pub struct LbDaemon {
    pub instance: String,
    pub config: PathBuf,
    netns: String,
    launcher: Launcher,
    /// Extra environment of the daemon process (e.g. systemd's `NOTIFY_SOCKET`).
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

/// How the daemon enters its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// `nsenter --net=…`: only the network namespace changes (as an operator should run it).
    Nsenter,
    /// `ip netns exec`: also a mount namespace of its own with a fresh /sys, without bpffs.
    IpNetnsExec,
}

impl LbDaemon {
    /// Writes `config` (with `{instance}` replaced) and starts the daemon in `ns`; returns once
    /// it answers `lb status`.
    pub fn start(ns: &Netns, instance: &str, config: &str) -> Result<Self> {
        Self::start_with(ns, instance, config, Launcher::Nsenter)
    }

    pub fn start_with(ns: &Netns, instance: &str, config: &str, launcher: Launcher) -> Result<Self> {
        Self::start_full(ns, instance, config, launcher, &[])
    }

    /// As [`LbDaemon::start`], with `env` added to the daemon's environment.
    pub fn start_with_env(ns: &Netns, instance: &str, config: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_full(ns, instance, config, Launcher::Nsenter, env)
    }

    fn start_full(ns: &Netns, instance: &str, config: &str, launcher: Launcher, env: &[(&str, &str)]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-test-{instance}"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("lb.toml");
        std::fs::write(&path, config.replace("{instance}", instance))?;
        let mut daemon = Self {
            instance: instance.to_string(),
            config: path,
            netns: ns.name().to_string(),
            launcher,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
            log: dir.join("daemon.log"),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = match self.launcher {
            Launcher::Nsenter => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{}", self.netns)).arg("--");
                command
            }
            Launcher::IpNetnsExec => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &self.netns]);
                command
            }
        };
        let child = command
            .arg(lb_binary())
            .arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lb daemon")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cli(&["status"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("lb daemon exited ({status}) while starting:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("lb daemon did not answer within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `lb --instance <instance> ARGS` (the CLI talks to the socket; no namespace needed).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(lb_binary()).arg("--instance").arg(&self.instance).args(args).output()?)
    }

    /// Like `cli`, but fails with stderr unless the command succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let output = self.cli(args)?;
        if !output.status.success() {
            bail!("lb {args:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Waits until `lb backend list` shows `backend` (address, in every VIP that has it) in
    /// `state` ("serving", "down", "standby", …): the state of the published tables, so traffic
    /// sent afterwards sees it. Returns how long it took; fails with the row and the log.
    pub fn wait_backend_state(&self, backend: &str, state: &str, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let rows: Vec<serde_json::Value> = serde_json::from_str(&self.ok(&["--json", "backend", "list"])?)?;
            let mine: Vec<&serde_json::Value> = rows.iter().filter(|r| r["address"] == backend).collect();
            if mine.is_empty() {
                bail!("no backend {backend} in `lb backend list`");
            }
            if mine.iter().all(|r| r["state"] == state) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!("{backend} not {state} after {limit:?}: {mine:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until no backend of any VIP is down: every one is serving (or standing by, drained…)
    /// in the published tables.
    pub fn wait_none_down(&self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let rows: Vec<serde_json::Value> = serde_json::from_str(&self.ok(&["--json", "backend", "list"])?)?;
            if rows.iter().all(|r| r["state"] != "down") {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!("backends still down after {limit:?}: {rows:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The configured VIPs and backends as the CLI reports them, without runtime fields
    /// (health, last check, table share, serving counts), for "nothing changed" comparisons.
    pub fn configuration(&self) -> Result<serde_json::Value> {
        let keep = |text: String, fields: &[&str]| -> Result<serde_json::Value> {
            let rows: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(&text)?;
            let kept: Vec<serde_json::Map<String, serde_json::Value>> = rows
                .into_iter()
                .map(|row| row.into_iter().filter(|(k, _)| fields.contains(&k.as_str())).collect())
                .collect();
            Ok(serde_json::Value::from(kept.into_iter().map(serde_json::Value::Object).collect::<Vec<_>>()))
        };
        Ok(serde_json::json!({
            "vips": keep(self.ok(&["--json", "vip", "list"])?, &["name", "address", "protocol", "mode", "affinity", "answer_ping", "snat", "backends", "slot"])?,
            "backends": keep(self.ok(&["--json", "backend", "list"])?, &["vip", "address", "weight", "backup", "drained", "index", "mac"])?,
        }))
    }

    /// Packets the data plane counted under `reason` (e.g. "tx_forward"): 0 for none yet.
    pub fn reason_count(&self, reason: &str) -> Result<u64> {
        let stats: serde_json::Value = serde_json::from_str(&self.ok(&["--json", "stats"])?)?;
        // Pairs of (reason, packets).
        let rows = stats["reasons"].as_array().into_iter().flatten();
        Ok(rows.filter(|r| r[0] == reason).find_map(|r| r[1].as_u64()).unwrap_or(0))
    }

    /// Kills the daemon with SIGKILL (no chance to clean anything up).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn terminate(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait()?;
            if !status.success() {
                bail!("lb daemon exited with {status} on SIGTERM:\n{}", self.log());
            }
        }
        Ok(())
    }

    /// Starts the daemon again with the same configuration (after `kill` or `terminate`).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for LbDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: what the daemon saw is the first thing to read.
            let stats = self.ok(&["stats"]).unwrap_or_default();
            eprintln!("--- lb daemon {} log ---\n{}--- lb stats ---\n{stats}---", self.instance, self.log());
        }
        // Stops a running daemon with detach, or removes what a dead one left pinned.
        let _ = self.cli(&["detach"]);
        self.kill();
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Entries in a running daemon's pinned connection table and NAT reverse table.
pub fn table_entries(instance: &str) -> Result<(usize, usize)> {
    use aya::maps::{HashMap, Map, MapData};
    use lb_common::maps::{ConnState, FlowKey, MAP_CONNS, MAP_NAT_REV, NatReverse};
    let pins = lb::dataplane::PinDir::for_instance(instance);
    let set = pins.map_sets()?.pop().context("no pinned map set")?;
    let conns = Map::from_map_data(MapData::from_pin(set.map(MAP_CONNS))?)?;
    let conns: HashMap<_, FlowKey, ConnState> = HashMap::try_from(&conns)?;
    let nat = Map::from_map_data(MapData::from_pin(set.map(MAP_NAT_REV))?)?;
    let nat: HashMap<_, FlowKey, NatReverse> = HashMap::try_from(&nat)?;
    Ok((conns.keys().count(), nat.keys().count()))
}
