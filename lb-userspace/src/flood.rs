//! Telling a flood of new flows from ordinary traffic, from the program's per-CPU new-flow
//! counters. The program only reads the verdict (`Settings::flood`): deciding in the daemon
//! costs the data plane no instructions, where a per-CPU rate kept in the program took the
//! verifier past its limit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often the daemon samples the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A flood ends once every CPU has stayed below half the threshold this long: a flood that
/// pauses for a moment does not flip the data plane back and forth.
pub const CALM_BEFORE_END: Duration = Duration::from_secs(2);

/// What changed with a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// `cpu` saw `rate` new flows per second, above the threshold.
    Started { cpu: usize, rate: u64 },
    /// Every CPU has been calm for [`CALM_BEFORE_END`]; `lasted` since it started.
    Ended { lasted: Duration },
}

/// The state visible in `lb stats` and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FloodState {
    pub active: bool,
    /// The highest new-flow rate of one CPU in the last sample (per second).
    pub busiest_cpu_rate: u64,
    /// The threshold (`[daemon] flood_new_flows`, 0: detection off).
    pub threshold: u64,
    /// Floods seen since the daemon started.
    pub floods: u64,
}

pub struct FloodDetector {
    threshold: u64,
    /// The previous sample: per VIP slot, new flows per CPU.
    previous: Option<(Instant, HashMap<u32, Vec<u64>>)>,
    started: Option<Instant>,
    calm_since: Option<Instant>,
    state: FloodState,
}

impl FloodDetector {
    /// `threshold`: new flows per second on one CPU (0: never a flood).
    pub fn new(threshold: u64) -> Self {
        FloodDetector {
            threshold,
            previous: None,
            started: None,
            calm_since: None,
            state: FloodState { threshold, ..FloodState::default() },
        }
    }

    pub fn state(&self) -> FloodState {
        self.state
    }

    /// Takes a sample of the counters (per VIP slot in use, cumulative new flows per CPU). Only
    /// slots present in both samples count, so that a VIP added (its slot's old counts) or
    /// removed between two samples is no burst.
    pub fn observe(&mut self, now: Instant, sample: HashMap<u32, Vec<u64>>) -> Option<Change> {
        let previous = self.previous.replace((now, sample));
        let (then, before) = previous?;
        let (_, after) = self.previous.as_ref().expect("just stored");
        let elapsed = now.duration_since(then).as_secs_f64();
        if elapsed <= 0.0 || self.threshold == 0 {
            return None;
        }
        let mut per_cpu: Vec<u64> = Vec::new();
        for (slot, counts) in after {
            let Some(old) = before.get(slot) else { continue };
            per_cpu.resize(per_cpu.len().max(counts.len()), 0);
            for (cpu, (new, old)) in counts.iter().zip(old).enumerate() {
                per_cpu[cpu] += new.saturating_sub(*old);
            }
        }
        let (busiest, delta) = per_cpu.iter().copied().enumerate().max_by_key(|&(_, d)| d).unwrap_or((0, 0));
        let rate = (delta as f64 / elapsed) as u64;
        self.state.busiest_cpu_rate = rate;
        if !self.state.active {
            if rate > self.threshold {
                self.state.active = true;
                self.state.floods += 1;
                self.started = Some(now);
                self.calm_since = None;
                return Some(Change::Started { cpu: busiest, rate });
            }
            return None;
        }
        if rate * 2 >= self.threshold {
            self.calm_since = None;
            return None;
        }
        let calm_since = *self.calm_since.get_or_insert(now);
        if now.duration_since(calm_since) < CALM_BEFORE_END {
            return None;
        }
        self.state.active = false;
        self.calm_since = None;
        let lasted = self.started.take().map_or(Duration::ZERO, |started| now.duration_since(started));
        Some(Change::Ended { lasted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cumulative counts for one VIP slot on two CPUs.
    fn sample(slot: u32, cpu0: u64, cpu1: u64) -> HashMap<u32, Vec<u64>> {
        HashMap::from([(slot, vec![cpu0, cpu1])])
    }

    #[test]
    fn a_flood_starts_when_one_cpu_passes_the_threshold_and_ends_after_a_calm_spell() {
        let mut detector = FloodDetector::new(1_000);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(detector.observe(at(0), sample(0, 0, 0)), None, "the first sample is a baseline");
        // 90 new flows per 100 ms on each CPU: 900/s each, under the threshold (the sum is not).
        assert_eq!(detector.observe(at(100), sample(0, 90, 90)), None);
        // CPU 1: 200 in 100 ms = 2,000/s.
        assert_eq!(detector.observe(at(200), sample(0, 100, 290)), Some(Change::Started { cpu: 1, rate: 2_000 }));
        assert!(detector.state().active);
        // Above half the threshold: still a flood.
        assert_eq!(detector.observe(at(300), sample(0, 100, 350)), None);
        // Calm (100/s), but not for long enough yet.
        let mut counts = 350;
        let mut ms = 300;
        while ms < 300 + CALM_BEFORE_END.as_millis() as u64 {
            ms += 100;
            counts += 10;
            assert_eq!(detector.observe(at(ms), sample(0, 100, counts)), None, "at {ms} ms");
        }
        let ended = detector.observe(at(ms + 100), sample(0, 100, counts + 10));
        assert_eq!(ended, Some(Change::Ended { lasted: Duration::from_millis(ms + 100 - 200) }));
        assert_eq!(detector.state().floods, 1);
        assert!(!detector.state().active);
    }

    #[test]
    fn a_vip_appearing_with_old_counts_is_no_burst() {
        let mut detector = FloodDetector::new(1_000);
        let t0 = Instant::now();
        detector.observe(t0, sample(0, 10, 10));
        let mut both = sample(0, 20, 20);
        both.insert(5, vec![1_000_000, 1_000_000]);
        assert_eq!(detector.observe(t0 + SAMPLE_EVERY, both), None);
        assert_eq!(detector.state().busiest_cpu_rate, 100);
    }

    #[test]
    fn a_threshold_of_zero_never_reports_a_flood() {
        let mut detector = FloodDetector::new(0);
        let t0 = Instant::now();
        detector.observe(t0, sample(0, 0, 0));
        assert_eq!(detector.observe(t0 + SAMPLE_EVERY, sample(0, u64::MAX / 2, 0)), None);
    }
}
