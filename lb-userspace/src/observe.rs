//! Passive failure detection: what the data plane saw of each backend's answers to new NAT
//! flows (`OBSERVED`), and when that takes a backend out.
//!
//! The rule: counted from the backend's first failed attempt within the window (refused, or
//! unanswered: the client sent its SYN again before any answer), at least `refused` failed
//! attempts making at least `percent` % of its attempts. A killed server refuses every attempt
//! from its first refusal on (3 of 3 with the defaults, about 100 ms at 30 new connections a
//! second); a host that is down answers nothing, and its attempts fail from the clients' first
//! retransmissions on, about a second after they sent their SYN. A server that refuses now and
//! then (a full listen queue) answers many attempts between two refusals, and one refusal is
//! never enough. Counting from the first failure rather than over the whole window keeps the
//! successes before a crash from hiding it.

use crate::model::ObserveSpec;
use lb_common::maps::Attempts;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How often the daemon reads the counters.
pub const READ_EVERY: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    totals: Attempts,
}

/// The attempts that call for taking a backend out, counted from its first failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failing {
    pub refused: u64,
    pub unanswered: u64,
    /// Failed and answered ones.
    pub attempts: u64,
}

impl Failing {
    /// Why the backend was taken out, for the log, `lb backend list` and `lb status`.
    pub fn reason(&self) -> String {
        let Failing { refused, unanswered, attempts } = *self;
        match (refused, unanswered) {
            (_, 0) => format!("observed: {refused} of {attempts} connection attempts refused"),
            (0, _) => format!("observed: {unanswered} of {attempts} connection attempts unanswered"),
            _ => format!("observed: {refused} refused and {unanswered} unanswered of {attempts} connection attempts"),
        }
    }
}

#[derive(Default)]
pub struct Observer {
    backends: HashMap<String, VecDeque<Sample>>,
}

impl Observer {
    /// Records backend `id`'s counters (totals since the program was loaded); returns its
    /// failed attempts when they call for taking it out.
    pub fn record(&mut self, id: &str, now: Instant, totals: Attempts, spec: &ObserveSpec) -> Option<Failing> {
        let samples = self.backends.entry(id.to_string()).or_default();
        if samples.back().is_some_and(|s| {
            s.totals.refused > totals.refused
                || s.totals.answered > totals.answered
                || s.totals.unanswered > totals.unanswered
        }) {
            // A new program (the daemon restarted): its counters start from 0.
            samples.clear();
        }
        samples.push_back(Sample { at: now, totals });
        // Samples inside the window, and the one before them as the baseline.
        while samples.len() > 2 && now.saturating_duration_since(samples[1].at) > spec.window {
            samples.pop_front();
        }
        let first = (1..samples.len()).find(|&i| failed(&samples[i].totals) > failed(&samples[i - 1].totals))?;
        let (base, last) = (samples[first - 1].totals, totals);
        let refused = last.refused - base.refused;
        let unanswered = last.unanswered - base.unanswered;
        let attempts = refused + unanswered + (last.answered - base.answered);
        let failures = refused + unanswered;
        (failures >= spec.refused as u64 && failures * 100 >= spec.percent as u64 * attempts).then_some(Failing {
            refused,
            unanswered,
            attempts,
        })
    }

    /// Starts afresh for a backend that was taken out.
    pub fn forget(&mut self, id: &str) {
        self.backends.remove(id);
    }

    /// Drops backends no longer observed.
    pub fn retain(&mut self, ids: &HashSet<String>) {
        self.backends.retain(|id, _| ids.contains(id));
    }
}

/// Attempts that failed: refused, or left unanswered.
fn failed(totals: &Attempts) -> u64 {
    totals.refused + totals.unanswered
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each step adds (refused, answered, unanswered) in one reading.
    fn run(observer: &mut Observer, steps: &[(u64, u64, u64)]) -> Vec<Option<Failing>> {
        let start = Instant::now();
        let spec = ObserveSpec::default();
        let mut totals = Attempts::default();
        steps
            .iter()
            .enumerate()
            .map(|(i, (refused, answered, unanswered))| {
                totals.refused += refused;
                totals.answered += answered;
                totals.unanswered += unanswered;
                observer.record("b", start + READ_EVERY * i as u32, totals, &spec)
            })
            .collect()
    }

    #[test]
    fn a_killed_server_is_taken_out_after_its_third_refusal_despite_earlier_successes() {
        let mut observer = Observer::default();
        let verdicts = run(&mut observer, &[(0, 2, 0), (0, 2, 0), (0, 2, 0), (1, 1, 0), (1, 0, 0), (1, 0, 0)]);
        assert_eq!(verdicts[..5], [None; 5]);
        let failing = verdicts[5].unwrap();
        assert_eq!(failing, Failing { refused: 3, unanswered: 0, attempts: 4 });
        assert_eq!(failing.reason(), "observed: 3 of 4 connection attempts refused");
    }

    #[test]
    fn a_host_that_is_down_is_taken_out_after_its_third_unanswered_attempt() {
        let mut observer = Observer::default();
        // Answers until it goes down; nothing then until the clients retransmit, a second later.
        let mut steps = vec![(0, 2, 0); 5];
        steps.extend([(0, 0, 0); 20]);
        steps.extend([(0, 0, 1), (0, 0, 1), (0, 0, 1)]);
        let verdicts = run(&mut observer, &steps);
        assert!(verdicts[..steps.len() - 1].iter().all(Option::is_none));
        let failing = verdicts[steps.len() - 1].unwrap();
        assert_eq!(failing, Failing { refused: 0, unanswered: 3, attempts: 3 });
        assert_eq!(failing.reason(), "observed: 3 of 3 connection attempts unanswered");
    }

    #[test]
    fn refused_and_unanswered_attempts_add_up() {
        let mut observer = Observer::default();
        let verdicts = run(&mut observer, &[(0, 2, 0), (1, 1, 0), (0, 0, 1), (1, 0, 0)]);
        assert_eq!(verdicts[..3], [None; 3]);
        let failing = verdicts[3].unwrap();
        assert_eq!(failing, Failing { refused: 2, unanswered: 1, attempts: 4 });
        assert_eq!(failing.reason(), "observed: 2 refused and 1 unanswered of 4 connection attempts");
    }

    #[test]
    fn a_lost_syn_now_and_then_never_takes_a_backend_out() {
        let mut observer = Observer::default();
        let mut steps = vec![(0, 2, 0); 10];
        steps.extend([(0, 2, 1), (0, 2, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (0, 2, 0)]);
        assert!(run(&mut observer, &steps).iter().all(Option::is_none));
    }

    #[test]
    fn one_refusal_among_many_successes_never_takes_a_backend_out() {
        let mut observer = Observer::default();
        let mut steps = vec![(0, 2, 0); 10];
        steps.extend([(1, 2, 0), (0, 2, 0), (1, 1, 0), (0, 2, 0), (1, 2, 0), (0, 2, 0)]);
        assert!(run(&mut observer, &steps).iter().all(Option::is_none));
    }

    #[test]
    fn refusals_spread_beyond_the_window_do_not_add_up() {
        let mut observer = Observer::default();
        let mut steps = Vec::new();
        for _ in 0..5 {
            steps.push((1, 0, 0));
            steps.extend([(0, 0, 0); 25]);
        }
        assert!(run(&mut observer, &steps).iter().all(Option::is_none));
    }

    #[test]
    fn a_restarted_program_starts_the_count_afresh() {
        let mut observer = Observer::default();
        assert_eq!(run(&mut observer, &[(0, 0, 2)]), [None]);
        // New counters, lower than the last reading: the old ones are no baseline.
        let spec = ObserveSpec::default();
        let fresh = Attempts { refused: 0, answered: 0, unanswered: 1 };
        assert_eq!(observer.record("b", Instant::now() + READ_EVERY, fresh, &spec), None);
    }
}
