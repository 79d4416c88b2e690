//! The health-check engine as the daemon sees it: which backends are checked and how, their
//! status, and their transitions. The checks themselves run on one thread of their own (see
//! `scheduler`), which records each result in the backend's status record.

use super::probe::{Failure, Subject, Via};
use super::scheduler::{Command, NewChecker, Scheduler};
use super::tracker::Health;
use crate::model::{BackendSpec, CheckKind, CheckSpec, DesiredState, VipSpec};
use crate::planner::backend_id;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc::UnboundedSender;

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

/// One backend's status as the checks keep it: written by the check thread after every check,
/// read by the daemon. It outlives a restart of the backend's check (a changed check).
pub struct Record {
    pub health: Health,
    pub since_unix_ms: u64,
    pub checks: u64,
    pub transitions: u64,
    /// The last check's latency, or why it failed.
    pub last: Option<Result<Duration, Failure>>,
    pub subject: Arc<Subject>,
    /// Why watching the backend's answers took it out ("observed: 3 of 4 connection attempts
    /// refused"), until it comes back up.
    pub observed: Option<String>,
    /// Set when an observation took the backend out: the check thread starts counting `rise`
    /// from there, and ignores the check that was running meanwhile.
    pub observed_at: Option<std::time::Instant>,
}

impl Record {
    /// The last check's result in words.
    pub fn detail(&self) -> String {
        let last = self.last_check();
        match &self.observed {
            Some(observed) => format!("{observed}; last check: {last}"),
            None => last,
        }
    }

    fn last_check(&self) -> String {
        match &self.last {
            None => "not checked yet".into(),
            Some(Ok(latency)) => format!("ok in {:.1} ms", latency.as_secs_f64() * 1e3),
            Some(Err(failure)) => failure.reason(&self.subject),
        }
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            health: self.health,
            since_unix_ms: self.since_unix_ms,
            last_ok: self.last.as_ref().map(Result::is_ok),
            last_detail: self.detail(),
            last_latency_ms: self.last.as_ref().and_then(|r| r.as_ref().ok()).map(|l| l.as_secs_f64() * 1e3),
            checks: self.checks,
            transitions: self.transitions,
        }
    }
}

/// A status record stays readable even if a thread panicked while holding it (it holds plain
/// counters).
pub fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A checked backend, as the engine started its check.
struct Checked {
    id: u64,
    spec: CheckSpec,
    target: SocketAddr,
    via: Option<Via>,
    record: Arc<Mutex<Record>>,
}

pub struct HealthEngine {
    checked: HashMap<String, Checked>,
    commands: Sender<Command>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<()>>,
    next_id: u64,
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The check a backend gets: its own, or its VIP's.
pub fn effective_check<'a>(vip: &'a VipSpec, backend: &'a BackendSpec) -> Option<&'a CheckSpec> {
    backend.check.as_ref().or(vip.check.as_ref())
}

impl HealthEngine {
    /// Starts the check thread (it checks nothing until `sync`).
    pub fn new(events: UnboundedSender<Transition>) -> std::io::Result<Self> {
        raise_open_files_limit();
        let (scheduler, waker, commands) = Scheduler::new(events)?;
        let thread = std::thread::Builder::new().name("lb-health".into()).spawn(move || scheduler.run())?;
        Ok(Self { checked: HashMap::new(), commands, waker, thread: Some(thread), next_id: 1 })
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
        let mut wanted = HashSet::new();
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
                wanted.insert(id.clone());
                let subject = Arc::new(Subject {
                    target,
                    via,
                    timeout: spec.timeout,
                    needle: match &spec.kind {
                        CheckKind::Http { body_contains, .. } => body_contains.clone(),
                        _ => None,
                    },
                });
                let record = match self.checked.remove(&id) {
                    Some(checked) if checked.spec == *spec && checked.target == target && checked.via == via => {
                        self.checked.insert(id, checked);
                        continue;
                    }
                    Some(checked) => {
                        self.send(Command::Stop(checked.id));
                        lock(&checked.record).subject = subject;
                        checked.record
                    }
                    None => Arc::new(Mutex::new(Record {
                        health: initial(vip, backend),
                        since_unix_ms: unix_ms(),
                        checks: 0,
                        transitions: 0,
                        last: None,
                        subject,
                        observed: None,
                        observed_at: None,
                    })),
                };
                let id_number = self.next_id;
                self.next_id += 1;
                self.send(Command::Start(Box::new(NewChecker {
                    id: id_number,
                    vip: vip.name.clone(),
                    backend: backend.address,
                    spec: spec.clone(),
                    target,
                    via,
                    record: record.clone(),
                })));
                self.checked.insert(id, Checked { id: id_number, spec: spec.clone(), target, via, record });
            }
        }
        let gone: Vec<String> = self.checked.keys().filter(|id| !wanted.contains(*id)).cloned().collect();
        for id in gone {
            if let Some(checked) = self.checked.remove(&id) {
                self.send(Command::Stop(checked.id));
            }
        }
        let _ = self.waker.wake();
    }

    /// Whether a checked backend is up; None for backends without a check.
    pub fn is_up(&self, id: &str) -> Option<bool> {
        self.checked.get(id).map(|c| lock(&c.record).health == Health::Up)
    }

    /// Watching its answers says the backend refuses connections: down at once, for its check
    /// to confirm (it comes back after `rise` good checks). Returns whether it was up (a
    /// transition), false for a backend without a check or already down.
    pub fn mark_observed_down(&self, id: &str, reason: &str) -> bool {
        let Some(checked) = self.checked.get(id) else { return false };
        let mut record = lock(&checked.record);
        if record.health == Health::Down {
            return false;
        }
        record.health = Health::Down;
        record.since_unix_ms = unix_ms();
        record.transitions += 1;
        record.observed = Some(reason.to_string());
        record.observed_at = Some(std::time::Instant::now());
        true
    }

    pub fn status(&self, id: &str) -> Option<BackendStatus> {
        self.checked.get(id).map(|c| lock(&c.record).status())
    }

    pub fn checked(&self) -> usize {
        self.checked.len()
    }

    fn send(&self, command: Command) {
        // The thread only ends when told to (below), so a send cannot fail before.
        let _ = self.commands.send(command);
    }
}

impl Drop for HealthEngine {
    fn drop(&mut self) {
        self.send(Command::Quit);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// TCP and HTTP checks keep a socket (an HTTP check its connection) open between checks, one
/// per checked backend: thousands of backends need more descriptors than the 1024 a service
/// gets by default. The hard limit stays the system's word.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read or fill the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}
