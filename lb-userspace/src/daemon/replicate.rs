//! The sending side of replication. On the master: new NAT flows go to the standby in small
//! batches as the program reports them, the desired state after every change and every second.
//! On a returning node that waits to preempt: the request for the master's NAT flows.

use super::Daemon;
use crate::config::VrrpSettings;
use crate::dataplane::NatFlowReader;
use crate::ha::pair::PairView;
use crate::ha::replication::{MAX_FLOWS_PER_PUSH, Push, Session, encode_flows};
use anyhow::{Result, bail};
use lb_common::maps::NatFlowRecord;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often the program's new NAT flows are collected and sent: a flow reaches the standby at
/// most this long (plus one exchange) after its first packet. Reading the ring is a look at
/// shared memory, so an idle tick costs only the wake-up.
const FLOW_BATCH_EVERY: Duration = Duration::from_millis(10);
/// The whole desired state goes at least this often (and after every change).
const STATE_EVERY: Duration = Duration::from_secs(1);
/// After a failed exchange, NAT flows (and requests for them) wait this long before the next
/// attempt; the state waits for its next second.
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// A returning node asks the master for its NAT flows at most this often (the master answers
/// a request with a push at once; a lost answer is asked for again).
const REQUEST_EVERY: Duration = Duration::from_millis(500);
/// NAT flows kept for a standby that does not answer; the oldest go first.
const MAX_PENDING_FLOWS: usize = 200_000;

struct Sender {
    vrrp: VrrpSettings,
    session: Option<Session>,
    /// NAT flows not yet acknowledged by the peer, oldest first.
    pending: VecDeque<NatFlowRecord>,
    /// The digest of the last state pushed, sent along with pushes that only carry flows.
    digest: String,
}

impl Sender {
    /// One push over the open connection (a new one when the peer closed it).
    async fn exchange(&mut self, push: &Push) -> Result<String> {
        let session = match &mut self.session {
            Some(session) if session.is_open() => session,
            _ => self.session.insert(Session::open(self.vrrp.peer).await?),
        };
        let outcome = session.exchange(&self.vrrp.key, push).await;
        if outcome.is_err() {
            self.session = None;
        }
        let ack = outcome?;
        if !ack.ok {
            bail!("the peer refused: {}", ack.error.unwrap_or_default());
        }
        Ok(ack.digest.unwrap_or_default())
    }

    /// A push of the oldest pending flows (all, when they fit) and maybe the state.
    fn push(&self, state: Option<crate::model::DesiredState>) -> (Push, usize) {
        let sending = self.pending.len().min(MAX_FLOWS_PER_PUSH);
        let flows: Vec<_> = self.pending.iter().take(sending).copied().collect();
        let push = Push {
            from: self.vrrp.listen,
            digest: self.digest.clone(),
            state,
            nat_flows: encode_flows(&flows),
            flows_complete: sending == self.pending.len(),
            wants_flows: false,
        };
        (push, sending)
    }
}

pub(crate) async fn replicate(
    daemon: Arc<Mutex<Daemon>>,
    vrrp: VrrpSettings,
    mut flows: NatFlowReader,
    view: Arc<Mutex<PairView>>,
    wake: Arc<Notify>,
) {
    let mut sender = Sender { vrrp, session: None, pending: VecDeque::new(), digest: String::new() };
    let mut tick = tokio::time::interval(FLOW_BATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state_due = true;
    let mut last_state = Instant::now();
    let mut last_failure: Option<Instant> = None;
    let mut was_master = false;
    let mut last_request: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => state_due = true,
        }
        sender.pending.extend(flows.drain(MAX_PENDING_FLOWS));
        while sender.pending.len() > MAX_PENDING_FLOWS {
            sender.pending.pop_front();
        }
        let (master, awaiting) = match view.lock() {
            Ok(v) => (v.is_master(), v.awaiting_flows()),
            Err(_) => return,
        };
        let retry_wait = last_failure.is_some_and(|at| at.elapsed() < RETRY_AFTER);
        if !master {
            if was_master && !sender.pending.is_empty() {
                // Flows opened in the last milliseconds before the peer took over: it keeps any
                // of its own for the same tuples.
                let (push, sending) = sender.push(None);
                match sender.exchange(&push).await {
                    Ok(_) => tracing::info!(flows = sending, "the last NAT flows handed to the new master"),
                    Err(error) => {
                        tracing::warn!(flows = sending, "the last NAT flows did not reach the new master: {error:#}")
                    }
                }
            }
            was_master = false;
            sender.pending.clear();
            if !awaiting {
                last_request = None;
            } else if last_request.is_none_or(|at| at.elapsed() >= REQUEST_EVERY) {
                let answered = request_flows(&mut sender, last_request.is_none()).await;
                last_request = Some(Instant::now());
                if let Ok(mut v) = view.lock() {
                    v.flows_requested = Some((Instant::now(), answered));
                }
            }
            continue;
        }
        was_master = true;
        state_due |= last_state.elapsed() >= STATE_EVERY;
        if !(state_due || !sender.pending.is_empty() && !retry_wait) {
            continue;
        }
        let state = if state_due {
            let Ok(daemon) = daemon.lock() else { return };
            sender.digest = crate::store::digest(&daemon.state);
            Some(daemon.state.clone())
        } else {
            None
        };
        let with_state = state.is_some();
        let (push, sending) = sender.push(state);
        if with_state {
            state_due = false;
            last_state = Instant::now();
        }
        let outcome = sender.exchange(&push).await.map_err(|error| format!("{error:#}"));
        match &outcome {
            Ok(_) => {
                sender.pending.drain(..sending);
                last_failure = None;
            }
            Err(_) => last_failure = Some(Instant::now()),
        }
        record(&daemon, &sender.vrrp, outcome, sending);
    }
}

/// Asks the master for every NAT flow it has waiting; true when an `lb` peer took the request.
async fn request_flows(sender: &mut Sender, first: bool) -> bool {
    let push = Push {
        from: sender.vrrp.listen,
        digest: sender.digest.clone(),
        state: None,
        nat_flows: String::new(),
        flows_complete: false,
        wants_flows: true,
    };
    match sender.exchange(&push).await {
        Ok(_) => {
            if first {
                tracing::info!(peer = %sender.vrrp.peer, "VRRP: asked the master for its NAT flows before preempting");
            }
            true
        }
        Err(error) => {
            tracing::info!(peer = %sender.vrrp.peer, "VRRP: no lb peer answers for NAT flows: {error:#}");
            false
        }
    }
}

/// Notes an exchange for `lb status` and the metrics; logs when synchronisation starts or stops.
fn record(daemon: &Mutex<Daemon>, vrrp: &VrrpSettings, outcome: Result<String, String>, flows: usize) {
    let Ok(mut daemon) = daemon.lock() else { return };
    let sync = &mut daemon.sync;
    let changed = match &sync.last_push {
        Some((_, before)) => before.is_ok() != outcome.is_ok(),
        None => true,
    };
    if changed {
        match &outcome {
            Ok(digest) => tracing::info!(peer = %vrrp.peer, %digest, "standby synchronised"),
            Err(error) => tracing::warn!(peer = %vrrp.peer, "standby not synchronised: {error}"),
        }
    }
    if outcome.is_ok() {
        sync.nat_flows_sent += flows as u64;
    }
    sync.last_push = Some((Instant::now(), outcome));
}
