//! The rise/fall rule operators know from HAProxy and keepalived: a backend goes down after
//! `fall` consecutive failed checks and comes back after `rise` consecutive successes.

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

#[derive(Clone, Debug)]
pub struct Tracker {
    state: Health,
    rise: u32,
    fall: u32,
    successes: u32,
    failures: u32,
}

impl Tracker {
    pub fn new(initial: Health, rise: u32, fall: u32) -> Self {
        Self { state: initial, rise: rise.max(1), fall: fall.max(1), successes: 0, failures: 0 }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Sets the state from outside the checks (an observation), counting afresh.
    pub fn force(&mut self, state: Health) {
        self.state = state;
        self.successes = 0;
        self.failures = 0;
    }

    /// Records one check result; returns the new state when it changes.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.state == Health::Down && self.successes >= self.rise {
                self.state = Health::Up;
                return Some(Health::Up);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.state == Health::Up && self.failures >= self.fall {
                self.state = Health::Down;
                return Some(Health::Down);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_down_after_fall_consecutive_failures_only() {
        let mut t = Tracker::new(Health::Up, 2, 3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failures");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(Health::Down));
        assert_eq!(t.record(false), None, "no repeated transition");
    }

    #[test]
    fn comes_back_after_rise_consecutive_successes_only() {
        let mut t = Tracker::new(Health::Down, 2, 3);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "a failure resets the successes");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(Health::Up));
        assert_eq!(t.state(), Health::Up);
    }

    #[test]
    fn a_flapping_backend_never_rises_when_its_up_spells_are_shorter_than_rise() {
        let mut t = Tracker::new(Health::Down, 4, 1);
        for round in 0..100 {
            // three good checks, one bad: never four in a row
            let ok = round % 4 != 3;
            assert_ne!(t.record(ok), Some(Health::Up));
        }
        assert_eq!(t.state(), Health::Down);
    }
}
