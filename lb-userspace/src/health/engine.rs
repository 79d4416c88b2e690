//! The health-check engine: one lightweight task per checked backend on the daemon's runtime (no
//! thread per check), results in a shared status table, transitions sent to the daemon.

use super::probe::{IcmpClients, Via, probe};
use super::tracker::{Health, Tracker};
use crate::model::{BackendSpec, CheckSpec, DesiredState, VipSpec};
use crate::planner::backend_id;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A backend changed state.
#[derive(Clone, Debug)]
pub struct Transition {
    pub vip: String,
    pub backend: SocketAddr,
    pub health: Health,
    /// The last check's result: latency, or why it failed.
    pub reason: String,
}

/// What the engine knows of one backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub health: Health,
    /// When the backend entered its current state (Unix milliseconds).
    pub since_unix_ms: u64,
    pub last_ok: Option<bool>,
    /// "ok" or the failure reason of the last check.
    pub last_detail: String,
    pub last_latency_ms: Option<f64>,
    pub checks: u64,
    pub transitions: u64,
}

struct Checker {
    spec: CheckSpec,
    target: SocketAddr,
    via: Option<Via>,
    task: JoinHandle<()>,
}

pub struct HealthEngine {
    runtime: tokio::runtime::Handle,
    icmp: IcmpClients,
    status: Arc<Mutex<HashMap<String, BackendStatus>>>,
    checkers: HashMap<String, Checker>,
    events: UnboundedSender<Transition>,
    next_ident: u16,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The check a backend gets: its own, or its VIP's.
pub fn effective_check<'a>(vip: &'a VipSpec, backend: &'a BackendSpec) -> Option<&'a CheckSpec> {
    backend.check.as_ref().or(vip.check.as_ref())
}

impl HealthEngine {
    pub fn new(runtime: tokio::runtime::Handle, events: UnboundedSender<Transition>) -> Self {
        // The ICMP sockets register with the runtime's reactor.
        let icmp = {
            let _context = runtime.enter();
            IcmpClients::open()
        };
        Self { runtime, icmp, status: Default::default(), checkers: HashMap::new(), events, next_ident: 1 }
    }

    /// Checks exactly the backends of `state` that have a check: starts new checkers, restarts
    /// those whose check changed, stops those of removed backends. `initial` gives the state a
    /// backend starts in when it is first seen; `via` how a check via the VIP leaves.
    pub fn sync(
        &mut self,
        state: &DesiredState,
        initial: &dyn Fn(&VipSpec, &BackendSpec) -> Health,
        via: &dyn Fn(&VipSpec, &BackendSpec) -> Option<Via>,
    ) {
        let mut wanted = Vec::new();
        for vip in &state.vips {
            for backend in &vip.backends {
                let Some(spec) = effective_check(vip, backend) else { continue };
                let id = backend_id(vip, backend.address);
                let port = spec.port.unwrap_or(backend.address.port());
                let (target, via) = if spec.via_vip {
                    // The VIP's address, at the port the backend serves it on.
                    let port = if port == 0 { vip.address.port() } else { port };
                    (SocketAddr::new(vip.address.ip(), port), via(vip, backend))
                } else {
                    (SocketAddr::new(backend.address.ip(), port), None)
                };
                wanted.push(id.clone());
                if let Some(checker) = self.checkers.get(&id) {
                    if checker.spec == *spec && checker.target == target && checker.via == via {
                        continue;
                    }
                    checker.task.abort();
                }
                let start = self
                    .status
                    .lock()
                    .expect("status lock")
                    .get(&id)
                    .map(|s| s.health)
                    .unwrap_or_else(|| initial(vip, backend));
                self.status.lock().expect("status lock").entry(id.clone()).or_insert_with(|| BackendStatus {
                    health: start,
                    since_unix_ms: unix_ms(),
                    last_ok: None,
                    last_detail: "not checked yet".into(),
                    last_latency_ms: None,
                    checks: 0,
                    transitions: 0,
                });
                let ident = self.next_ident;
                self.next_ident = self.next_ident.wrapping_add(1).max(1);
                let task = self.runtime.spawn(check_loop(CheckLoop {
                    id: id.clone(),
                    vip: vip.name.clone(),
                    backend: backend.address,
                    spec: spec.clone(),
                    target,
                    via,
                    start,
                    ident,
                    icmp: self.icmp.clone(),
                    status: self.status.clone(),
                    events: self.events.clone(),
                }));
                self.checkers.insert(id, Checker { spec: spec.clone(), target, via, task });
            }
        }
        self.checkers.retain(|id, checker| {
            let keep = wanted.contains(id);
            if !keep {
                checker.task.abort();
            }
            keep
        });
        self.status.lock().expect("status lock").retain(|id, _| wanted.contains(id));
        let marks: Vec<u32> = self.checkers.values().filter_map(|c| c.via.map(|v| v.mark)).collect();
        self.icmp.retain_marked(&|mark| marks.contains(&mark));
    }

    /// Whether a checked backend is up; None for backends without a check.
    pub fn is_up(&self, id: &str) -> Option<bool> {
        self.status.lock().expect("status lock").get(id).map(|s| s.health == Health::Up)
    }

    pub fn status(&self, id: &str) -> Option<BackendStatus> {
        self.status.lock().expect("status lock").get(id).cloned()
    }

    pub fn checked(&self) -> usize {
        self.checkers.len()
    }
}

impl Drop for HealthEngine {
    fn drop(&mut self) {
        for checker in self.checkers.values() {
            checker.task.abort();
        }
    }
}

struct CheckLoop {
    id: String,
    vip: String,
    backend: SocketAddr,
    spec: CheckSpec,
    target: SocketAddr,
    via: Option<Via>,
    start: Health,
    ident: u16,
    icmp: IcmpClients,
    status: Arc<Mutex<HashMap<String, BackendStatus>>>,
    events: UnboundedSender<Transition>,
}

async fn check_loop(c: CheckLoop) {
    let mut tracker = Tracker::new(c.start, c.spec.rise, c.spec.fall);
    let interval = c.spec.interval;
    // A random first offset and a little jitter on every round keep thousands of checks from
    // firing in lockstep.
    let first = rand::rng().random_range(Duration::ZERO..interval.max(Duration::from_millis(1)) / 4);
    let mut next = Instant::now() + first;
    let mut seq: u16 = 0;
    loop {
        tokio::time::sleep_until(next).await;
        let jitter = rand::rng().random_range(Duration::ZERO..=interval / 10);
        next = Instant::now() + interval + jitter;
        let result = probe(&c.spec.kind, c.target, c.spec.timeout, &c.icmp, (c.ident, seq), c.via).await;
        seq = seq.wrapping_add(1);
        let transition = tracker.record(result.is_ok());
        let detail = match &result {
            Ok(latency) => format!("ok in {:.1} ms", latency.as_secs_f64() * 1e3),
            Err(reason) => reason.clone(),
        };
        {
            let mut table = c.status.lock().expect("status lock");
            let Some(status) = table.get_mut(&c.id) else { return };
            status.checks += 1;
            status.last_ok = Some(result.is_ok());
            status.last_latency_ms = result.as_ref().ok().map(|l| l.as_secs_f64() * 1e3);
            status.last_detail = detail.clone();
            if let Some(health) = transition {
                status.health = health;
                status.since_unix_ms = unix_ms();
                status.transitions += 1;
            }
        }
        if let Some(health) = transition {
            let _ = c.events.send(Transition { vip: c.vip.clone(), backend: c.backend, health, reason: detail });
        }
    }
}
