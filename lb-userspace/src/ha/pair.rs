//! This node's half of an active/standby pair: one VRRPv3 virtual router per address family,
//! driven on its own thread (advertisements must not wait behind a slow API request), owning
//! the pair's addresses while master; the daemon feeds it what to own and whether it is fit.

use super::takeover;
use super::vrrp::machine::{Action, Machine, MachineConfig, State};
use super::vrrp::packet::Advertisement;
use super::vrrp_net::{VrrpSocket, primary_address};
use crate::config::VrrpSettings;
use anyhow::Result;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a router thread looks at the daemon's inputs when nothing else wakes it.
const POLL: Duration = Duration::from_millis(50);

const FAMILIES: [&str; 2] = ["IPv4", "IPv6"];

/// What the daemon tells the routers, and what they report back.
#[derive(Debug, Default)]
pub struct PairView {
    /// The addresses the pair owns (VIPs and SNAT addresses), sorted.
    pub addresses: Vec<IpAddr>,
    /// Why this node must not be master (data plane not attached, a VIP without backends).
    pub fault: Option<String>,
    /// Bumped by `lb failover`: a master hands over once per bump.
    pub hand_over: u64,
    pub stopping: bool,
    /// Per family (IPv4, IPv6): state and the master's address as last seen.
    pub routers: [RouterView; 2],
    /// When a push from the master last brought every NAT flow it had waiting.
    pub flows_complete_at: Option<Instant>,
    /// The last request for the master's NAT flows: when, and whether an `lb` peer took it.
    pub flows_requested: Option<(Instant, bool)>,
}

#[derive(Clone, Debug, Default)]
pub struct RouterView {
    pub state: Option<State>,
    pub master: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub error: Option<String>,
    /// Backup held back from preempting a lower-priority master until its NAT flows are here.
    pub awaiting_flows: bool,
}

impl PairView {
    pub fn is_master(&self) -> bool {
        self.routers.iter().any(|r| r.state == Some(State::Master))
    }

    /// "master", "backup", "fault", "failed" (a router that cannot run, see `errors`), or per
    /// family when they differ. A family with nothing to own has no router and is left out.
    pub fn role(&self) -> String {
        let states: Vec<(&str, String)> = FAMILIES
            .into_iter()
            .zip(&self.routers)
            .filter_map(|(family, r)| match (r.state, &r.error) {
                (Some(state), _) => Some((family, format!("{state:?}").to_lowercase())),
                (None, Some(_)) => Some((family, "failed".to_string())),
                (None, None) => None,
            })
            .collect();
        match states.as_slice() {
            [] => "initialize".into(),
            [(_, s)] => s.clone(),
            [(_, a), (_, b)] if a == b => a.clone(),
            many => many.iter().map(|(f, s)| format!("{s} ({f})")).collect::<Vec<_>>().join(", "),
        }
    }

    /// Why a router cannot run, per family ("IPv6: binding to …").
    pub fn errors(&self) -> Vec<String> {
        FAMILIES
            .into_iter()
            .zip(&self.routers)
            .filter_map(|(family, r)| Some(format!("{family}: {}", r.error.as_ref()?)))
            .collect()
    }

    pub fn master(&self) -> Option<IpAddr> {
        self.routers.iter().find_map(|r| r.master)
    }

    /// Whether a router waits for the master's NAT flows before it preempts.
    pub fn awaiting_flows(&self) -> bool {
        self.routers.iter().any(|r| r.awaiting_flows)
    }

    /// Whether a backup since `since` may preempt: once the master sent every NAT flow it had
    /// (a returning node must not take the VIPs before it knows their connections), or when no
    /// `lb` peer answers for them (e.g. keepalived is master), or after `PREEMPT_HOLD_MAX`.
    /// `since`: when the router became backup; `deferred_since`: when it first held back.
    fn hold_preemption(&self, since: Instant, deferred_since: Option<Instant>, now: Instant) -> bool {
        let complete = self.flows_complete_at.is_some_and(|at| at >= since);
        let no_lb_peer = self.flows_requested.is_some_and(|(at, answered)| at >= since && !answered);
        let waited_enough = deferred_since.is_some_and(|d| now.saturating_duration_since(d) >= PREEMPT_HOLD_MAX);
        !complete && !no_lb_peer && !waited_enough
    }
}

/// Longest a returning node waits for the master's NAT flows before it preempts anyway. The
/// master answers a request within milliseconds and pushes on its own every second; this only
/// bounds the wait for a master whose pushes fail.
pub const PREEMPT_HOLD_MAX: Duration = Duration::from_secs(3);

pub struct Pair {
    pub settings: VrrpSettings,
    pub view: Arc<Mutex<PairView>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pair {
    /// Starts both routers on `interface`; each one owns the addresses of its family.
    pub fn start(settings: &VrrpSettings, interface: &str, view: PairView) -> Result<Self> {
        let view = Arc::new(Mutex::new(view));
        let mut threads = Vec::new();
        for ipv6 in [false, true] {
            let (settings, interface, view) = (settings.clone(), interface.to_string(), view.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(if ipv6 { "vrrp-v6" } else { "vrrp-v4" }.into())
                    .spawn(move || router(&settings, &interface, ipv6, &view))?,
            );
        }
        Ok(Self { settings: settings.clone(), view, threads })
    }

    /// Gives up mastership (priority 0, addresses removed) and waits for the routers to end.
    pub fn stop(&mut self) {
        if let Ok(mut view) = self.view.lock() {
            view.stopping = true;
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop();
    }
}

/// First and longest wait before a failed router starts again. Short throughout: the usual
/// failure is a link that went down and comes back, and every moment spent waiting after its
/// source address is usable again keeps this node out of the election. A restart costs two
/// `ip` runs and two sockets, so retrying four times a second is cheap.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_millis(250);

/// One virtual router: runs until the daemon stops, restarting after errors.
fn router(settings: &VrrpSettings, interface: &str, ipv6: bool, view: &Mutex<PairView>) {
    let family = usize::from(ipv6);
    let mut retry = RETRY_FIRST;
    loop {
        let started = Instant::now();
        let error = match run_router(settings, interface, ipv6, view) {
            Ok(()) => return,
            Err(error) => format!("{error:#}"),
        };
        if started.elapsed() > RETRY_MAX {
            retry = RETRY_FIRST; // it ran for a while: a fresh failure, not the same one again
        }
        let mut v = view.lock().expect("pair view poisoned");
        if v.stopping {
            return;
        }
        if v.routers[family].error.as_deref() != Some(&error) {
            tracing::error!(family = if ipv6 { "IPv6" } else { "IPv4" }, "VRRP router failed: {error}");
        }
        v.routers[family] = RouterView { error: Some(error), ..Default::default() };
        drop(v);
        std::thread::sleep(retry);
        retry = (retry * 2).min(RETRY_MAX);
    }
}

fn run_router(settings: &VrrpSettings, interface: &str, ipv6: bool, view: &Mutex<PairView>) -> Result<()> {
    let family = usize::from(ipv6);
    let label = if ipv6 { "IPv6" } else { "IPv4" };
    let mine = |v: &PairView| -> Vec<IpAddr> { v.addresses.iter().filter(|a| a.is_ipv6() == ipv6).copied().collect() };
    // Idle until this family has something to own.
    let (addresses, fault, mut hand_over) = loop {
        let v = view.lock().expect("pair view poisoned");
        if v.stopping {
            return Ok(());
        }
        let addresses = mine(&v);
        if !addresses.is_empty() {
            break (addresses, v.fault.clone(), v.hand_over);
        }
        drop(v);
        std::thread::sleep(POLL);
    };
    let source = primary_address(interface, ipv6, &addresses)?;
    let socket = VrrpSocket::open(interface, source)?;
    // Whatever a previous run left behind: only a master holds the addresses.
    takeover::release(interface, &addresses)?;
    let mut machine = Machine::new(MachineConfig {
        vrid: settings.vrid,
        priority: settings.priority,
        advert_interval: settings.advert_interval,
        preempt: settings.preempt,
        primary_address: source,
    });
    let mut owned = addresses;
    let mut healthy = fault.is_none();
    let now = Instant::now();
    let mut actions = machine.start(now);
    if !healthy {
        actions.extend(machine.set_healthy(false, now));
    }
    tracing::info!(family = label, %source, vrid = settings.vrid, priority = settings.priority, "VRRP router started");
    let mut mismatch_logged = false;
    let (mut backup_since, mut deferred_since) = (None, None);
    loop {
        perform(&actions, &machine, &socket, interface, &owned, settings)?;
        let now = Instant::now();
        match machine.state() {
            State::Backup => _ = backup_since.get_or_insert(now),
            _ => (backup_since, deferred_since) = (None, None),
        }
        if machine.preemption_deferred() {
            deferred_since.get_or_insert(now);
        }
        // Report our state and read the daemon's inputs in one go.
        let (addresses, fault, bump, stopping, hold) = {
            let mut v = view.lock().expect("pair view poisoned");
            let hold =
                settings.preempt && backup_since.is_some_and(|since| v.hold_preemption(since, deferred_since, now));
            v.routers[family] = RouterView {
                state: Some(machine.state()),
                master: machine.master().or_else(|| (machine.state() == State::Master).then_some(source)),
                source: Some(source),
                error: None,
                awaiting_flows: hold && machine.preemption_deferred(),
            };
            (mine(&v), v.fault.clone(), v.hand_over, v.stopping, hold)
        };
        if hold != machine.preemption_held() {
            if !hold && machine.preemption_deferred() {
                let view = view.lock().expect("pair view poisoned");
                let since = backup_since.unwrap_or(now);
                let why = if view.flows_complete_at.is_some_and(|at| at >= since) {
                    "the master's NAT flows are here"
                } else if view.flows_requested.is_some_and(|(at, answered)| at >= since && !answered) {
                    "no lb peer answers for NAT flows"
                } else {
                    "no NAT flows came from the master in time; their connections may break"
                };
                let waited = now.saturating_duration_since(deferred_since.unwrap_or(now));
                tracing::warn!(family = label, ?waited, "VRRP: {why}: preempting");
            }
            machine.hold_preemption(hold);
        }
        if stopping || addresses.is_empty() {
            let (farewell, release): (Vec<Action>, Vec<Action>) =
                machine.shutdown(now).into_iter().partition(|a| matches!(a, Action::SendAdvert { .. }));
            perform(&farewell, &machine, &socket, interface, &owned, settings)?;
            if stopping && !farewell.is_empty() {
                // Keep the addresses (and the caller keeps the data plane) until the peer has
                // taken over, so that no request falls into the gap between the two.
                match await_successor(&socket, settings, source) {
                    Some(peer) => tracing::info!(family = label, %peer, "VRRP: the peer took over"),
                    None => tracing::warn!(family = label, "VRRP: no peer took over; leaving anyway"),
                }
            }
            perform(&release, &machine, &socket, interface, &owned, settings)?;
            takeover::release(interface, &owned)?;
            tracing::info!(family = label, "VRRP router stopped; addresses released");
            view.lock().expect("pair view poisoned").routers[family] = RouterView::default();
            return Ok(());
        }
        if addresses != owned {
            if machine.state() == State::Master {
                let gone: Vec<IpAddr> = owned.iter().filter(|a| !addresses.contains(a)).copied().collect();
                takeover::release(interface, &gone)?;
                takeover::claim(interface, &addresses)?;
            }
            owned = addresses;
        }
        actions = Vec::new();
        if fault.is_none() != healthy {
            healthy = fault.is_none();
            match &fault {
                Some(reason) => tracing::warn!(family = label, %reason, "VRRP: this node is not fit to be master"),
                None => tracing::info!(family = label, "VRRP: this node is fit to be master again"),
            }
            actions.extend(machine.set_healthy(healthy, now));
        }
        if bump != hand_over {
            hand_over = bump;
            if machine.state() == State::Master {
                tracing::warn!(family = label, "VRRP: handing over to the peer on request");
                actions.extend(machine.hand_over(now));
            }
        }
        if !actions.is_empty() {
            continue;
        }
        let wait = machine.next_deadline().map_or(POLL, |d| d.saturating_duration_since(now)).min(POLL);
        if let Some(packet) = socket.receive(wait)? {
            if packet.ttl != 255 {
                tracing::debug!(source = %packet.source, ttl = packet.ttl, "VRRP packet with TTL != 255 dropped");
            } else {
                match Advertisement::decode(&packet.payload, packet.source, packet.destination) {
                    Ok(advert) if advert.vrid == settings.vrid => {
                        if advert.addresses != owned && !mismatch_logged {
                            mismatch_logged = true;
                            tracing::warn!(family = label, peer = %packet.source, theirs = ?advert.addresses, ours = ?owned,
                                "VRRP peer advertises other addresses: the two configurations differ");
                        }
                        actions.extend(machine.received(&advert, packet.source, Instant::now()));
                    }
                    Ok(_) => {} // another virtual router on the segment
                    Err(error) => tracing::debug!(source = %packet.source, "VRRP packet dropped: {error}"),
                }
            }
        }
        actions.extend(machine.tick(Instant::now()));
    }
}

/// After our priority-0 advertisement a backup takes over within its skew time (less than one
/// advertisement interval) and advertises at once: waits for that advertisement, a little
/// longer than one interval at most. Returns the new master's address.
fn await_successor(socket: &VrrpSocket, settings: &VrrpSettings, ours: IpAddr) -> Option<IpAddr> {
    let deadline = Instant::now() + settings.advert_interval + POLL;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let packet = socket.receive(left).ok()??;
        let from_peer = packet.ttl == 255 && packet.source != ours;
        match Advertisement::decode(&packet.payload, packet.source, packet.destination) {
            Ok(advert) if from_peer && advert.vrid == settings.vrid && advert.priority > 0 => {
                return Some(packet.source);
            }
            _ => {}
        }
    }
}

fn perform(
    actions: &[Action],
    machine: &Machine,
    socket: &VrrpSocket,
    interface: &str,
    owned: &[IpAddr],
    settings: &VrrpSettings,
) -> Result<()> {
    for action in actions {
        match action {
            Action::SendAdvert { priority } => {
                let advert = Advertisement {
                    vrid: settings.vrid,
                    priority: *priority,
                    max_advert_int_cs: (settings.advert_interval.as_millis() / 10) as u16,
                    addresses: owned.to_vec(),
                };
                socket.send(&advert.encode(socket.source, socket.group))?;
            }
            Action::BecomeMaster => {
                takeover::claim(interface, owned)?;
                tracing::warn!(addresses = ?owned, "VRRP: became master; addresses taken over and announced");
            }
            Action::BecomeBackup => {
                takeover::release(interface, owned)?;
                tracing::warn!(master = ?machine.master(), state = ?machine.state(), "VRRP: no longer master; addresses released");
            }
        }
    }
    Ok(())
}

/// The last replication exchanges, for `lb status`.
#[derive(Debug, Default)]
pub struct SyncView {
    /// Master side: when we last pushed and what the peer answered (its digest, or the error).
    pub last_push: Option<(Instant, Result<String, String>)>,
    /// Standby side: when the master last pushed, from where, and the digest we then had.
    pub last_received: Option<(Instant, std::net::SocketAddr, String)>,
    /// NAT flows this node sent to its peer, and the peer's flows it installed.
    pub nat_flows_sent: u64,
    pub nat_flows_adopted: u64,
}

/// A replication older than this no longer proves anything about the peer.
const SYNC_FRESH: Duration = Duration::from_secs(5);

impl SyncView {
    pub fn describe(&self, master: bool, digest: &str) -> String {
        let ago = |at: &Instant| format!("{:.1} s ago", at.elapsed().as_secs_f64());
        if master {
            match &self.last_push {
                None => "never synchronised".into(),
                Some((at, Ok(theirs))) if theirs == digest && at.elapsed() < SYNC_FRESH => {
                    format!("in sync (the standby confirmed {})", ago(at))
                }
                Some((at, Ok(theirs))) if theirs == digest => format!("out of sync: last confirmed {}", ago(at)),
                Some((_, Ok(theirs))) => format!("out of sync: the standby holds {theirs}"),
                Some((at, Err(error))) => format!("out of sync: {error} ({})", ago(at)),
            }
        } else {
            match &self.last_received {
                None => "never synchronised".into(),
                Some((at, from, theirs)) if theirs == digest && at.elapsed() < SYNC_FRESH => {
                    format!("in sync with {} ({})", from.ip(), ago(at))
                }
                Some((at, from, _)) => {
                    format!("out of sync: nothing from the active node {} for {}", from.ip(), ago(at))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(state: Option<State>, error: Option<&str>) -> RouterView {
        RouterView { state, error: error.map(String::from), ..Default::default() }
    }

    #[test]
    fn a_failed_router_shows_in_the_role_and_its_error_is_reported() {
        let mut view = PairView::default();
        assert_eq!(view.role(), "initialize");
        view.routers = [router(Some(State::Master), None), router(None, None)];
        assert_eq!(view.role(), "master", "a family with nothing to own has no router");
        view.routers[1] = router(Some(State::Master), None);
        assert_eq!(view.role(), "master");
        // A node whose IPv6 router cannot bind is not master of both families.
        view.routers[1] = router(None, Some("binding to fe80::1%eth0: Cannot assign requested address"));
        assert_eq!(view.role(), "master (IPv4), failed (IPv6)");
        assert_eq!(view.errors(), ["IPv6: binding to fe80::1%eth0: Cannot assign requested address"]);
        assert!(view.is_master());
    }
}
