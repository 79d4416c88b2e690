//! The health-check thread: one loop that owns every checker, starts each check when it is due
//! (one timer wheel for all of them) and waits for all their sockets at once (one epoll set).
//! A check allocates and formats nothing: its result is recorded as a small value, put into
//! words only when someone reads it or when it changes a backend's state.

use super::engine::{Record, Transition, lock};
use super::http::HttpProbe;
use super::icmp::{EchoSockets, IcmpProbe};
use super::probe::{Dial, Failure, ICMP_TOKENS, Readiness, Registrar, Step, Via, WAKER, checker_of};
use super::tcp::TcpProbe;
use super::timer_wheel::TimerWheel;
use super::tracker::{Health, Tracker};
use crate::model::{CheckKind, CheckSpec};
use mio::{Events, Poll, Waker};
use rand::Rng;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How many checks a turn of the loop starts or times out at most before it reads its sockets
/// again.
const TIMERS_PER_TURN: usize = 64;
/// The timers' resolution: a check times out at most this late.
const TICK: Duration = Duration::from_millis(1);

/// Checks start on a grid of a hundredth of their interval (1 to 10 ms): the thread then wakes
/// up for a few dozen checks at a time rather than for each one (at 5,000 checks a second), and
/// the kernel serves them with its caches still warm. On the benchmark this took a sixth off
/// ICMP and HTTP checks; a check starts at most a hundredth of its interval later than its
/// jitter says.
fn start_grid(interval: Duration) -> Duration {
    (interval / 100).clamp(TICK, Duration::from_millis(10))
}

/// What the engine asks of its thread.
pub enum Command {
    Start(Box<NewChecker>),
    Stop(u64),
    Quit,
}

pub struct NewChecker {
    /// The engine's name for this checker (a restarted check gets a new one).
    pub id: u64,
    pub vip: String,
    pub backend: SocketAddr,
    pub spec: CheckSpec,
    pub target: SocketAddr,
    pub via: Option<Via>,
    pub record: Arc<Mutex<Record>>,
}

pub struct Scheduler {
    poll: Poll,
    commands: Receiver<Command>,
    transitions: UnboundedSender<Transition>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_id: HashMap<u64, u32>,
    /// (slot, tag) at a time: a checker's next start or its running check's timeout. A timer
    /// whose tag is no longer its slot's is stale and skipped.
    timers: TimerWheel,
    due: Vec<(u32, u32)>,
    icmp: EchoSockets,
    replies: Vec<(u32, IpAddr, u16)>,
}

#[derive(Default)]
struct Slot {
    checker: Option<Checker>,
    tag: u32,
    /// The generation of the checker's current socket (in its tokens).
    epoch: u32,
}

struct Checker {
    vip: String,
    backend: SocketAddr,
    interval: Duration,
    timeout: Duration,
    target: SocketAddr,
    via: Option<Via>,
    tracker: Tracker,
    record: Arc<Mutex<Record>>,
    /// When the running check started; None between checks.
    started: Option<Instant>,
    /// When the next check is due.
    next: Instant,
    probe: Probe,
}

enum Probe {
    Icmp(IcmpProbe),
    Tcp(TcpProbe),
    Http(Box<HttpProbe>),
}

impl Scheduler {
    pub fn new(transitions: UnboundedSender<Transition>) -> io::Result<(Self, Arc<Waker>, Sender<Command>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (sender, commands) = std::sync::mpsc::channel();
        let scheduler = Self {
            poll,
            commands,
            transitions,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            timers: TimerWheel::new(TICK),
            due: Vec::new(),
            icmp: EchoSockets::new(),
            replies: Vec::new(),
        };
        Ok((scheduler, waker, sender))
    }

    /// Runs the checks until the engine says quit (or is gone).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            // Zero while timers are overdue: a turn runs a bounded number of them, so that the
            // sockets' events (answers that came meanwhile) are read before any check is
            // declared timed out, even when the thread falls behind.
            let wait = self.timers.next_in(Instant::now());
            if let Err(error) = self.poll.poll(&mut events, wait) {
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("health checks: waiting for sockets failed: {error}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for event in &events {
                let token = event.token();
                if token == WAKER {
                    if !self.take_commands() {
                        return;
                    }
                } else if let Some((slot, epoch)) = checker_of(token) {
                    self.on_socket(slot, epoch, Readiness::from(event));
                } else {
                    self.on_echo_replies(token.0 - ICMP_TOKENS);
                }
            }
            self.run_timers();
        }
    }

    /// False once told to quit.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Start(new)) => self.add(*new),
                Ok(Command::Stop(id)) => self.remove(id),
                Ok(Command::Quit) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn add(&mut self, new: NewChecker) {
        let NewChecker { id, vip, backend, spec, target, via, record } = new;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            (self.slots.len() - 1) as u32
        });
        let probe = match &spec.kind {
            CheckKind::Icmp => Probe::Icmp(IcmpProbe::default()),
            CheckKind::Tcp => Probe::Tcp(TcpProbe::default()),
            CheckKind::Http { method, path, host, expect_status, body_contains } => Probe::Http(Box::new(
                HttpProbe::new((method, path, host.as_deref()), *expect_status, body_contains.as_deref(), target),
            )),
        };
        // Started from the state the backend is in now (a restarted check keeps it).
        let start = lock(&record).health;
        // A random first offset (and a little jitter on every round, below) keeps thousands of
        // checks from firing in lockstep.
        let first = rand::rng().random_range(Duration::ZERO..spec.interval.max(Duration::from_millis(1)) / 4);
        let next = self.timers.round_up(Instant::now() + first, start_grid(spec.interval));
        self.slots[slot as usize].checker = Some(Checker {
            vip,
            backend,
            interval: spec.interval,
            timeout: spec.timeout,
            target,
            via,
            tracker: Tracker::new(start, spec.rise, spec.fall),
            record,
            started: None,
            next,
            probe,
        });
        self.by_id.insert(id, slot);
        self.schedule(slot, next);
    }

    fn remove(&mut self, id: u64) {
        let Some(slot) = self.by_id.remove(&id) else { return };
        let entry = &mut self.slots[slot as usize];
        entry.tag = entry.tag.wrapping_add(1);
        entry.epoch = entry.epoch.wrapping_add(1);
        if let Some(mut checker) = entry.checker.take()
            && let Probe::Icmp(probe) = &mut checker.probe
        {
            self.icmp.release(probe, checker.via);
        }
        // Its sockets close as it drops, which also takes them out of the epoll set.
        self.free.push(slot);
    }

    fn schedule(&mut self, slot: u32, at: Instant) {
        let entry = &mut self.slots[slot as usize];
        entry.tag = entry.tag.wrapping_add(1);
        self.timers.insert(at, slot, entry.tag);
    }

    fn run_timers(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        self.timers.expire(Instant::now(), TIMERS_PER_TURN, &mut due);
        for &(slot, tag) in &due {
            let entry = &self.slots[slot as usize];
            let Some(checker) = &entry.checker else { continue };
            if entry.tag != tag {
                continue;
            }
            if checker.started.is_some() {
                self.time_out(slot);
            } else {
                self.start(slot);
            }
        }
        due.clear();
        self.due = due;
    }

    fn start(&mut self, slot: u32) {
        let Self { poll, slots, icmp, timers, .. } = self;
        let entry = &mut slots[slot as usize];
        let Some(checker) = entry.checker.as_mut() else { return };
        let now = Instant::now();
        checker.started = Some(now);
        let jitter = rand::rng().random_range(Duration::ZERO..=checker.interval / 10);
        checker.next = timers.round_up(now + checker.interval + jitter, start_grid(checker.interval));
        let deadline = now + checker.timeout;
        let mut dial = Dial {
            target: checker.target,
            via: checker.via,
            registrar: Registrar { registry: poll.registry(), slot, epoch: &mut entry.epoch },
        };
        let step = match &mut checker.probe {
            Probe::Icmp(probe) => icmp.start(probe, poll.registry(), slot, checker.target.ip(), checker.via),
            Probe::Tcp(probe) => probe.start(&mut dial),
            Probe::Http(probe) => probe.start(&mut dial),
        };
        match step {
            Step::Pending => self.schedule(slot, deadline),
            Step::Done(result) => self.finish(slot, result),
        }
    }

    fn time_out(&mut self, slot: u32) {
        let Some(checker) = self.slots[slot as usize].checker.as_mut() else { return };
        let failure = match &mut checker.probe {
            Probe::Icmp(probe) => {
                self.icmp.cancel(probe);
                Failure::NoEchoReply
            }
            Probe::Tcp(probe) => {
                probe.on_timeout();
                Failure::Timeout
            }
            Probe::Http(probe) => {
                probe.on_timeout();
                Failure::Timeout
            }
        };
        self.finish(slot, Err(failure));
    }

    fn on_socket(&mut self, slot: u32, epoch: u32, ready: Readiness) {
        let Self { poll, slots, .. } = self;
        let Some(entry) = slots.get_mut(slot as usize) else { return };
        if entry.epoch != epoch {
            return;
        }
        let Some(checker) = entry.checker.as_mut() else { return };
        let mut dial = Dial {
            target: checker.target,
            via: checker.via,
            registrar: Registrar { registry: poll.registry(), slot, epoch: &mut entry.epoch },
        };
        let step = match &mut checker.probe {
            Probe::Tcp(probe) => probe.on_event(ready),
            Probe::Http(probe) => probe.on_event(ready, &mut dial),
            Probe::Icmp(_) => Step::Pending,
        };
        if let Step::Done(result) = step
            && checker.started.is_some()
        {
            self.finish(slot, result);
        }
    }

    fn on_echo_replies(&mut self, index: usize) {
        let mut replies = std::mem::take(&mut self.replies);
        self.icmp.receive(index, &mut replies);
        for &(slot, source, seq) in &replies {
            let Some(checker) = self.slots.get_mut(slot as usize).and_then(|e| e.checker.as_mut()) else { continue };
            let Probe::Icmp(probe) = &mut checker.probe else { continue };
            if checker.target.ip() == source && self.icmp.answered(probe, seq) {
                self.finish(slot, Ok(()));
            }
        }
        replies.clear();
        self.replies = replies;
    }

    /// Records a check's result; a transition goes to the daemon with its reason in words.
    fn finish(&mut self, slot: u32, result: Result<(), Failure>) {
        let Some(checker) = self.slots[slot as usize].checker.as_mut() else { return };
        let Some(started) = checker.started.take() else { return };
        let now = Instant::now();
        let result = result.map(|()| now.saturating_duration_since(started));
        let mut record = lock(&checker.record);
        let mut counts = true;
        if let Some(at) = record.observed_at.take() {
            // Taken out by what the data plane saw: `rise` good checks from now on bring it
            // back; a check that started before says nothing about it.
            checker.tracker.force(Health::Down);
            counts = started >= at;
        }
        let transition = if counts { checker.tracker.record(result.is_ok()) } else { None };
        if transition == Some(Health::Up) {
            record.observed = None;
        }
        let reason = {
            record.checks += 1;
            record.last = Some(result);
            match transition {
                Some(health) => {
                    record.health = health;
                    record.since_unix_ms = super::engine::unix_ms();
                    record.transitions += 1;
                    Some(record.detail())
                }
                None => None,
            }
        };
        drop(record);
        if let (Some(health), Some(reason)) = (transition, reason) {
            let _ = self.transitions.send(Transition {
                vip: checker.vip.clone(),
                backend: checker.backend,
                health,
                reason,
            });
        }
        let next = checker.next.max(now);
        self.schedule(slot, next);
    }
}
