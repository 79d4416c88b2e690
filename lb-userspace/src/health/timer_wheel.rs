//! The checks' timers: a hashed timing wheel of fixed ticks. Adding a timer is a push onto the
//! list of its tick; a turn of the scheduler takes the lists of the ticks that passed, in order.
//! A binary heap of the same timers cost a check more than its own bookkeeping: every pop walks
//! the whole height of a heap of thousands of entries, in lines the cache no longer holds.

use std::time::{Duration, Instant};

/// Ticks per turn of the wheel (a second at 1 ms); a timer further away than a turn waits in its
/// list, skipped until its own turn comes. A multiple of the usual start grids (2, 4, 5, 8, 10
/// ms), whose timers then always fall into the same few lists.
const SLOTS: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tick: u64,
    slot: u32,
    tag: u32,
}

pub struct TimerWheel {
    origin: Instant,
    resolution: Duration,
    /// Every tick before this one has been run.
    current: u64,
    /// Each tick's timers. A list keeps its room once run, so after the first turns adding and
    /// running timers allocates nothing, and the timers of one tick lie side by side.
    lists: Box<[Vec<Entry>]>,
    len: usize,
}

impl TimerWheel {
    pub fn new(resolution: Duration) -> Self {
        Self { origin: Instant::now(), resolution, current: 0, lists: (0..SLOTS).map(|_| Vec::new()).collect(), len: 0 }
    }

    /// A timer for (`slot`, `tag`) at `at`, or at the first tick after it: never early, at most
    /// one tick late.
    pub fn insert(&mut self, at: Instant, slot: u32, tag: u32) {
        let tick = self.nanos(at).div_ceil(self.nanos_per_tick()).max(self.current);
        self.lists[(tick % SLOTS) as usize].push(Entry { tick, slot, tag });
        self.len += 1;
    }

    /// `at`, or the first multiple of `grid` (counted from the wheel's start) after it.
    pub fn round_up(&self, at: Instant, grid: Duration) -> Instant {
        let grid = u64::try_from(grid.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.origin + Duration::from_nanos(self.nanos(at).div_ceil(grid).saturating_mul(grid))
    }

    /// Nanoseconds from the wheel's start (in 64 bits: 584 years).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn nanos_per_tick(&self) -> u64 {
        u64::try_from(self.resolution.as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// Moves the timers due by `now` into `due` as (slot, tag), earliest tick first, until
    /// `due` holds `limit` of them; the rest stay for the next call.
    pub fn expire(&mut self, now: Instant, limit: usize, due: &mut Vec<(u32, u32)>) {
        let now_tick = self.nanos(now) / self.nanos_per_tick();
        while self.current <= now_tick {
            if self.len == 0 {
                self.current = now_tick + 1;
                return;
            }
            let list = &mut self.lists[(self.current % SLOTS) as usize];
            let mut i = 0;
            while i < list.len() {
                if list[i].tick > self.current {
                    i += 1;
                    continue;
                }
                if due.len() == limit {
                    return;
                }
                let entry = list.swap_remove(i);
                due.push((entry.slot, entry.tag));
                self.len -= 1;
            }
            self.current += 1;
        }
    }

    /// How long from `now` until the next timer is due: zero if one is overdue, None if there
    /// is none.
    pub fn next_in(&self, now: Instant) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let first = (0..SLOTS)
            .map(|step| self.current + step)
            .find(|&tick| self.lists[(tick % SLOTS) as usize].iter().any(|e| e.tick == tick))
            .or_else(|| self.lists.iter().flatten().map(|e| e.tick).min())?;
        let at = self.origin + Duration::from_nanos(first.saturating_mul(self.nanos_per_tick()));
        Some(at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_order_never_early_and_within_a_tick() {
        let mut wheel = TimerWheel::new(Duration::from_millis(1));
        let start = wheel.origin;
        let ms = Duration::from_millis;
        wheel.insert(start + ms(5), 1, 0);
        wheel.insert(start + ms(3) + Duration::from_micros(10), 2, 0);
        wheel.insert(start + ms(9000), 3, 0);
        let mut due = Vec::new();
        wheel.expire(start + ms(3), 10, &mut due);
        assert!(due.is_empty(), "3.01 ms is not due at 3 ms");
        assert_eq!(wheel.next_in(start + ms(3)), Some(ms(1)));
        wheel.expire(start + ms(4), 10, &mut due);
        assert_eq!(due, [(2, 0)]);
        due.clear();
        wheel.expire(start + ms(6), 10, &mut due);
        assert_eq!(due, [(1, 0)]);
        due.clear();
        assert_eq!(wheel.next_in(start + ms(6)), Some(ms(8994)), "beyond one turn of the wheel");
        wheel.expire(start + ms(8999), 10, &mut due);
        assert!(due.is_empty(), "a timer a turn and more away waits for its own turn");
        wheel.expire(start + ms(9000), 10, &mut due);
        assert_eq!(due, [(3, 0)]);
        assert_eq!(wheel.next_in(start + ms(9000)), None);
    }

    #[test]
    fn times_round_up_to_their_grid() {
        let wheel = TimerWheel::new(Duration::from_millis(1));
        let ms = Duration::from_millis;
        assert_eq!(wheel.round_up(wheel.origin + ms(21), ms(10)), wheel.origin + ms(30));
        assert_eq!(wheel.round_up(wheel.origin + ms(30), ms(10)), wheel.origin + ms(30));
        assert_eq!(wheel.round_up(wheel.origin + Duration::from_micros(1), ms(10)), wheel.origin + ms(10));
    }

    #[test]
    fn a_turn_takes_at_most_the_limit_and_leaves_the_rest_due() {
        let mut wheel = TimerWheel::new(Duration::from_millis(1));
        let at = wheel.origin + Duration::from_millis(2);
        for slot in 0..5 {
            wheel.insert(at, slot, 7);
        }
        let mut due = Vec::new();
        wheel.expire(at, 3, &mut due);
        assert_eq!(due.len(), 3);
        assert_eq!(wheel.next_in(at), Some(Duration::ZERO), "the rest is overdue");
        due.clear();
        wheel.expire(at, 3, &mut due);
        assert_eq!(due.len(), 2);
        // A timer set in the past fires at the next tick.
        wheel.insert(wheel.origin, 9, 1);
        due.clear();
        wheel.expire(at + Duration::from_millis(1), 3, &mut due);
        assert_eq!(due, [(9, 1)]);
    }

    #[test]
    fn the_wheel_holds_its_timers_in_the_room_it_has() {
        let mut wheel = TimerWheel::new(Duration::from_millis(1));
        let mut due = Vec::new();
        for round in 1..=10 {
            let at = wheel.origin + Duration::from_millis(round * 10);
            for slot in 0..100 {
                wheel.insert(at, slot, 0);
            }
            due.clear();
            wheel.expire(at, usize::MAX, &mut due);
            assert_eq!(due.len(), 100);
        }
        let room: usize = wheel.lists.iter().map(Vec::capacity).sum();
        assert!(room <= 10 * 128, "each tick's list keeps its room: {room}");
        assert_eq!(wheel.next_in(wheel.origin), None);
    }
}
