//! The VRRPv3 state machine of one virtual router (RFC 5798 §6.4), without I/O: inputs carry
//! the time, outputs are actions for the I/O layer, `next_deadline` says when to call `tick`.
//!
//! Two additions, both keepalived practice: `Fault` (this node is unfit: it leaves mastership
//! with a priority-0 advertisement and stays out until healthy), and `hand_over` (an operator's
//! failover: priority 0, then backup without preempting back until the new master fails).
//! And one of ours: `hold_preemption` (a returning node waits for the NAT flows the other node
//! opened meanwhile: it follows a lower-priority master as if it did not preempt).

use super::packet::Advertisement;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Initialize,
    Backup,
    Master,
    Fault,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    SendAdvert {
        priority: u8,
    },
    /// Take the addresses and announce them (gratuitous ARP / unsolicited NA).
    BecomeMaster,
    /// Give the addresses up.
    BecomeBackup,
}

#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub vrid: u8,
    /// 1-254, or 255 for the owner of the addresses.
    pub priority: u8,
    pub advert_interval: Duration,
    pub preempt: bool,
    /// Breaks ties between equal priorities (§6.4.3: the greater primary address wins).
    pub primary_address: IpAddr,
}

pub struct Machine {
    config: MachineConfig,
    state: State,
    /// Learned from the master's advertisements while backup (§6.4.2).
    master_adver_interval: Duration,
    /// Backup: when the master is declared down. Master: when the next advertisement is due.
    deadline: Option<Instant>,
    master: Option<IpAddr>,
    /// Set by `hand_over`: behave as non-preempting until we become master by timeout again.
    yielded: bool,
    /// Set by the I/O layer: follow a lower-priority master instead of preempting it.
    preemption_held: bool,
    /// A lower-priority master was followed only because of the hold, since it was set.
    deferred: bool,
}

impl Machine {
    pub fn new(config: MachineConfig) -> Self {
        let interval = config.advert_interval;
        Self {
            config,
            state: State::Initialize,
            master_adver_interval: interval,
            deadline: None,
            master: None,
            yielded: false,
            preemption_held: false,
            deferred: false,
        }
    }

    /// While held, a backup follows a lower-priority master as if it did not preempt; once
    /// released, it preempts after Master_Down_Interval as usual. A master that falls silent is
    /// replaced whatever the hold.
    pub fn hold_preemption(&mut self, held: bool) {
        if held != self.preemption_held {
            self.preemption_held = held;
            self.deferred = false;
        }
    }

    pub fn preemption_held(&self) -> bool {
        self.preemption_held
    }

    /// Whether the hold kept this backup from preempting a lower-priority master.
    pub fn preemption_deferred(&self) -> bool {
        self.deferred
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The current master as seen from a backup (None while master or unknown).
    pub fn master(&self) -> Option<IpAddr> {
        self.master
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// §6.1: Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256.
    pub fn skew_time(&self) -> Duration {
        self.master_adver_interval * (256 - u32::from(self.config.priority)) / 256
    }

    /// §6.1: Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time.
    pub fn master_down_interval(&self) -> Duration {
        3 * self.master_adver_interval + self.skew_time()
    }

    /// §6.4.1: the owner becomes master at once, anyone else backup.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Initialize {
            return Vec::new();
        }
        if self.config.priority == 255 {
            return self.become_master(now);
        }
        self.become_backup(now);
        Vec::new()
    }

    /// §6.4.3 Shutdown: a master says priority 0 so a backup takes over after its skew time.
    pub fn shutdown(&mut self, _now: Instant) -> Vec<Action> {
        let was_master = self.state == State::Master;
        self.state = State::Initialize;
        self.deadline = None;
        self.master = None;
        if was_master { vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup] } else { Vec::new() }
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        match (self.state, self.deadline) {
            (State::Backup, Some(down)) if now >= down => {
                // §6.4.2: Master_Down_Timer fired.
                self.yielded = false;
                self.become_master(now)
            }
            (State::Master, Some(due)) if now >= due => {
                self.deadline = Some(now + self.config.advert_interval);
                vec![Action::SendAdvert { priority: self.config.priority }]
            }
            _ => Vec::new(),
        }
    }

    pub fn received(&mut self, advert: &Advertisement, source: IpAddr, now: Instant) -> Vec<Action> {
        if advert.vrid != self.config.vrid {
            return Vec::new();
        }
        let interval = Duration::from_millis(u64::from(advert.max_advert_int_cs) * 10);
        match self.state {
            State::Backup => {
                if advert.priority == 0 {
                    // §6.4.2: the master is leaving; take over after the skew time only.
                    self.deadline = Some(now + self.skew_time());
                } else if !self.config.preempt
                    || self.yielded
                    || self.preemption_held
                    || advert.priority >= self.config.priority
                {
                    let would_preempt = self.config.preempt && !self.yielded && advert.priority < self.config.priority;
                    self.deferred |= would_preempt;
                    self.master_adver_interval = interval;
                    self.deadline = Some(now + self.master_down_interval());
                    self.master = Some(source);
                }
                // Otherwise a lower priority master is ignored: our timer runs out and we preempt.
                Vec::new()
            }
            State::Master => {
                if advert.priority == 0 {
                    // §6.4.3: another router is leaving; answer at once so nobody waits.
                    self.deadline = Some(now + self.config.advert_interval);
                    vec![Action::SendAdvert { priority: self.config.priority }]
                } else if advert.priority > self.config.priority
                    || (advert.priority == self.config.priority && source > self.config.primary_address)
                {
                    self.master_adver_interval = interval;
                    self.state = State::Backup;
                    self.deadline = Some(now + self.master_down_interval());
                    self.master = Some(source);
                    vec![Action::BecomeBackup]
                } else {
                    Vec::new()
                }
            }
            State::Fault | State::Initialize => {
                if advert.priority != 0 {
                    self.master = Some(source);
                }
                Vec::new()
            }
        }
    }

    /// An unfit node leaves mastership and stays out; once fit again it starts over as backup.
    pub fn set_healthy(&mut self, healthy: bool, now: Instant) -> Vec<Action> {
        match (healthy, self.state) {
            (false, State::Master) => {
                self.state = State::Fault;
                self.deadline = None;
                vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup]
            }
            (false, State::Backup) => {
                self.state = State::Fault;
                self.deadline = None;
                Vec::new()
            }
            (true, State::Fault) => {
                self.state = State::Initialize;
                self.start(now)
            }
            _ => Vec::new(),
        }
    }

    /// The operator's failover: a master says priority 0 and becomes backup, not preempting
    /// back until the new master fails.
    pub fn hand_over(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Master {
            return Vec::new();
        }
        self.yielded = true;
        self.master = None;
        self.become_backup(now);
        vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup]
    }

    fn become_master(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Master;
        self.master = None;
        self.deadline = Some(now + self.config.advert_interval);
        vec![Action::SendAdvert { priority: self.config.priority }, Action::BecomeMaster]
    }

    fn become_backup(&mut self, now: Instant) {
        self.state = State::Backup;
        self.master_adver_interval = self.config.advert_interval;
        self.deadline = Some(now + self.master_down_interval());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(1000);

    fn machine(priority: u8, address: &str, preempt: bool) -> Machine {
        Machine::new(MachineConfig {
            vrid: 51,
            priority,
            advert_interval: INTERVAL,
            preempt,
            primary_address: address.parse().unwrap(),
        })
    }

    fn advert(priority: u8) -> Advertisement {
        Advertisement { vrid: 51, priority, max_advert_int_cs: 100, addresses: vec!["10.0.0.100".parse().unwrap()] }
    }

    /// Two routers on one simulated segment, stepped in 10 ms increments.
    struct Segment {
        routers: Vec<(Machine, IpAddr, bool)>,
        now: Instant,
    }

    impl Segment {
        fn new(routers: Vec<Machine>) -> Self {
            let now = Instant::now();
            let mut segment = Self {
                routers: routers
                    .into_iter()
                    .map(|m| {
                        let address = m.config.primary_address;
                        (m, address, true)
                    })
                    .collect(),
                now,
            };
            for i in 0..segment.routers.len() {
                let actions = segment.routers[i].0.start(now);
                segment.deliver(i, actions);
            }
            segment
        }

        fn deliver(&mut self, from: usize, actions: Vec<Action>) {
            let source = self.routers[from].1;
            for action in actions {
                if let Action::SendAdvert { priority } = action {
                    for to in 0..self.routers.len() {
                        if to != from && self.routers[to].2 && self.routers[from].2 {
                            let now = self.now;
                            let replies = self.routers[to].0.received(&advert(priority), source, now);
                            self.deliver(to, replies);
                        }
                    }
                }
            }
        }

        fn run(&mut self, duration: Duration) {
            let end = self.now + duration;
            while self.now < end {
                self.now += Duration::from_millis(10);
                for i in 0..self.routers.len() {
                    if self.routers[i].2 {
                        let now = self.now;
                        let actions = self.routers[i].0.tick(now);
                        self.deliver(i, actions);
                    }
                }
            }
        }

        fn states(&self) -> Vec<State> {
            self.routers.iter().map(|r| r.0.state()).collect()
        }

        /// Runs until router `i` is master; returns how long it took.
        fn until_master(&mut self, i: usize, limit: Duration) -> Duration {
            let start = self.now;
            while self.routers[i].0.state() != State::Master {
                assert!(self.now - start < limit, "router {i} not master within {limit:?}: {:?}", self.states());
                self.run(Duration::from_millis(10));
            }
            self.now - start
        }
    }

    #[test]
    fn the_higher_priority_wins_and_the_other_stays_backup() {
        let mut segment = Segment::new(vec![machine(100, "10.0.0.2", true), machine(200, "10.0.0.4", true)]);
        segment.run(Duration::from_secs(10));
        assert_eq!(segment.states(), vec![State::Backup, State::Master]);
        assert_eq!(segment.routers[0].0.master(), Some("10.0.0.4".parse().unwrap()));
    }

    #[test]
    fn equal_priorities_elect_the_higher_address() {
        let mut segment = Segment::new(vec![machine(100, "10.0.0.9", true), machine(100, "10.0.0.2", true)]);
        segment.run(Duration::from_secs(10));
        assert_eq!(segment.states(), vec![State::Master, State::Backup]);
    }

    #[test]
    fn a_backup_declares_the_master_down_after_exactly_master_down_interval() {
        let mut segment = Segment::new(vec![machine(200, "10.0.0.2", true), machine(100, "10.0.0.4", true)]);
        segment.run(Duration::from_secs(5));
        assert_eq!(segment.states(), vec![State::Master, State::Backup]);
        // The master's last advertisement was at most one interval ago; from then on, 3 x 1 s +
        // (256 - 100) / 256 s = 3.609 s.
        let expected = segment.routers[1].0.master_down_interval();
        assert_eq!(expected, Duration::from_millis(3609) + Duration::from_nanos(375_000));
        segment.routers[0].2 = false; // cut off
        let took = segment.until_master(1, Duration::from_secs(6));
        assert!(took <= expected + Duration::from_millis(10), "{took:?}");
        assert!(took + INTERVAL >= expected, "{took:?}");
    }

    #[test]
    fn a_shutdown_hands_over_after_the_skew_time_only() {
        let mut segment = Segment::new(vec![machine(200, "10.0.0.2", true), machine(100, "10.0.0.4", true)]);
        segment.run(Duration::from_secs(5));
        let actions = segment.routers[0].0.shutdown(segment.now);
        assert_eq!(actions, vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup]);
        segment.deliver(0, actions);
        segment.routers[0].2 = false;
        let took = segment.until_master(1, Duration::from_secs(2));
        // Skew_Time = 156/256 s = 609 ms.
        assert!(took <= Duration::from_millis(620), "{took:?}");
    }

    #[test]
    fn preemption_takes_over_from_a_lower_priority_master_and_its_absence_does_not() {
        for preempt in [true, false] {
            let mut segment = Segment::new(vec![machine(100, "10.0.0.2", true)]);
            segment.run(Duration::from_secs(5));
            assert_eq!(segment.states(), vec![State::Master]);
            let mut late = machine(200, "10.0.0.4", preempt);
            let _ = late.start(segment.now);
            segment.routers.push((late, "10.0.0.4".parse().unwrap(), true));
            segment.run(Duration::from_secs(10));
            let expected =
                if preempt { vec![State::Backup, State::Master] } else { vec![State::Master, State::Backup] };
            assert_eq!(segment.states(), expected, "preempt = {preempt}");
        }
    }

    #[test]
    fn a_handed_over_master_stays_backup_until_the_new_master_fails() {
        let mut segment = Segment::new(vec![machine(200, "10.0.0.2", true), machine(100, "10.0.0.4", true)]);
        segment.run(Duration::from_secs(5));
        let actions = segment.routers[0].0.hand_over(segment.now);
        assert_eq!(actions, vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup]);
        segment.deliver(0, actions);
        segment.until_master(1, Duration::from_secs(1));
        segment.run(Duration::from_secs(10));
        assert_eq!(segment.states(), vec![State::Backup, State::Master], "no preemption back");
        segment.routers[1].2 = false;
        segment.until_master(0, Duration::from_secs(5));
    }

    #[test]
    fn an_unfit_master_leaves_at_once_and_returns_as_backup_when_fit() {
        let mut segment = Segment::new(vec![machine(200, "10.0.0.2", true), machine(100, "10.0.0.4", true)]);
        segment.run(Duration::from_secs(5));
        let actions = segment.routers[0].0.set_healthy(false, segment.now);
        assert_eq!(actions, vec![Action::SendAdvert { priority: 0 }, Action::BecomeBackup]);
        segment.deliver(0, actions);
        assert_eq!(segment.routers[0].0.state(), State::Fault);
        segment.until_master(1, Duration::from_secs(1));
        segment.run(Duration::from_secs(10));
        assert_eq!(segment.routers[0].0.state(), State::Fault, "a faulty node never takes over");
        let actions = segment.routers[0].0.set_healthy(true, segment.now);
        segment.deliver(0, actions);
        assert_eq!(segment.routers[0].0.state(), State::Backup);
        segment.until_master(0, Duration::from_secs(5)); // it preempts again with priority 200
    }

    /// A master of priority 100, then a node of priority 200 joining with its preemption held.
    fn master_and_held_returning_node() -> Segment {
        let mut segment = Segment::new(vec![machine(100, "10.0.0.4", true)]);
        segment.run(Duration::from_secs(5));
        let mut returning = machine(200, "10.0.0.2", true);
        let _ = returning.start(segment.now);
        returning.hold_preemption(true);
        segment.routers.push((returning, "10.0.0.2".parse().unwrap(), true));
        segment
    }

    #[test]
    fn a_held_backup_follows_a_lower_priority_master_and_preempts_once_released() {
        let mut segment = master_and_held_returning_node();
        segment.run(Duration::from_secs(10));
        assert_eq!(segment.states(), vec![State::Master, State::Backup], "held: no preemption");
        assert!(segment.routers[1].0.preemption_deferred());
        segment.routers[1].0.hold_preemption(false);
        let took = segment.until_master(1, Duration::from_secs(10));
        assert!(took <= segment.routers[1].0.master_down_interval() + INTERVAL, "{took:?}");
        segment.run(Duration::from_secs(2));
        assert_eq!(segment.states(), vec![State::Backup, State::Master]);
    }

    #[test]
    fn a_held_backup_still_replaces_a_master_that_falls_silent() {
        let mut segment = master_and_held_returning_node();
        segment.run(Duration::from_secs(5));
        segment.routers[0].2 = false; // the lower-priority master is cut off
        segment.until_master(1, Duration::from_secs(5));
    }

    #[test]
    fn the_owner_becomes_master_at_once() {
        let mut owner = machine(255, "10.0.0.2", true);
        assert_eq!(owner.start(Instant::now()), vec![Action::SendAdvert { priority: 255 }, Action::BecomeMaster]);
    }

    #[test]
    fn a_master_answers_a_priority_zero_advertisement_at_once() {
        let mut m = machine(100, "10.0.0.2", true);
        let now = Instant::now();
        m.start(now);
        m.tick(now + Duration::from_secs(5));
        assert_eq!(m.state(), State::Master);
        let actions = m.received(&advert(0), "10.0.0.4".parse().unwrap(), now + Duration::from_secs(5));
        assert_eq!(actions, vec![Action::SendAdvert { priority: 100 }]);
    }
}
