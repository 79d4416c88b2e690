//! Passive failure detection: what the data plane saw of each backend's answers to new NAT
//! flows (`OBSERVED`), and when that takes a backend out.
//!
//! The rule: counted from the backend's first refusal within the window, at least `refused`
//! refusals making at least `percent` % of its attempts. A killed server refuses every attempt
//! from its first refusal on (3 of 3 with the defaults, about 100 ms at 30 new connections a
//! second); a server that refuses now and then (a full listen queue) answers many attempts
//! between two refusals, and one refusal is never enough. Counting from the first refusal
//! rather than over the whole window keeps the successes before a crash from hiding it.

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

#[derive(Default)]
pub struct Observer {
    backends: HashMap<String, VecDeque<Sample>>,
}

impl Observer {
    /// Records backend `id`'s counters (totals since the program was loaded); returns
    /// `(refused, attempts)` when they call for taking it out.
    pub fn record(&mut self, id: &str, now: Instant, totals: Attempts, spec: &ObserveSpec) -> Option<(u64, u64)> {
        let samples = self.backends.entry(id.to_string()).or_default();
        if samples.back().is_some_and(|s| s.totals.refused > totals.refused || s.totals.answered > totals.answered) {
            // A new program (the daemon restarted): its counters start from 0.
            samples.clear();
        }
        samples.push_back(Sample { at: now, totals });
        // Samples inside the window, and the one before them as the baseline.
        while samples.len() > 2 && now.saturating_duration_since(samples[1].at) > spec.window {
            samples.pop_front();
        }
        let first = (1..samples.len()).find(|&i| samples[i].totals.refused > samples[i - 1].totals.refused)?;
        let (base, last) = (samples[first - 1].totals, totals);
        let refused = last.refused - base.refused;
        let attempts = refused + (last.answered - base.answered);
        (refused >= spec.refused as u64 && refused * 100 >= spec.percent as u64 * attempts)
            .then_some((refused, attempts))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(observer: &mut Observer, steps: &[(u64, u64)]) -> Vec<Option<(u64, u64)>> {
        let start = Instant::now();
        let spec = ObserveSpec::default();
        let mut totals = Attempts::default();
        steps
            .iter()
            .enumerate()
            .map(|(i, (refused, answered))| {
                totals.refused += refused;
                totals.answered += answered;
                observer.record("b", start + READ_EVERY * i as u32, totals, &spec)
            })
            .collect()
    }

    #[test]
    fn a_killed_server_is_taken_out_after_its_third_refusal_despite_earlier_successes() {
        let mut observer = Observer::default();
        let verdicts = run(&mut observer, &[(0, 2), (0, 2), (0, 2), (1, 1), (1, 0), (1, 0)]);
        assert_eq!(verdicts[..5], [None; 5]);
        assert_eq!(verdicts[5], Some((3, 4)));
    }

    #[test]
    fn one_refusal_among_many_successes_never_takes_a_backend_out() {
        let mut observer = Observer::default();
        let mut steps = vec![(0, 2); 10];
        steps.extend([(1, 2), (0, 2), (1, 1), (0, 2), (1, 2), (0, 2)]);
        assert!(run(&mut observer, &steps).iter().all(Option::is_none));
    }

    #[test]
    fn refusals_spread_beyond_the_window_do_not_add_up() {
        let mut observer = Observer::default();
        let mut steps = Vec::new();
        for _ in 0..5 {
            steps.push((1, 0));
            steps.extend([(0, 0); 25]);
        }
        assert!(run(&mut observer, &steps).iter().all(Option::is_none));
    }
}
