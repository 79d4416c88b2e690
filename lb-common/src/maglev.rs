//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), with weights.
//!
//! Every backend owns a permutation of the table's `M` slots, derived only from its stable
//! key: `offset = h1(key) % M`, `skip = h2(key) % (M - 1) + 1`, and its `j`-th preferred slot is
//! `(offset + j * skip) % M`. Backends take turns; on its turn a backend claims its next
//! preferred slot that is still free. `M` is prime, so every permutation visits every slot and
//! each turn fills exactly one slot: a backend ends with exactly as many slots as turns.
//!
//! Weights decide the turns. A backend of weight `w` takes its `k`-th turn at the virtual time
//! `(k - 1/2) / w`, ties going to the smaller key. Its number of turns (hence slots) is then
//! `M * w / W` to within one slot, and since a backend's turn times depend on its own weight
//! alone, adding or removing a backend leaves the order of everyone else's turns unchanged,
//! which is what keeps disruption minimal. With equal weights this is the paper's round robin.
//!
//! The builder sorts the backends by key first, so the table does not depend on the order of the
//! input: every load balancer node computes the same table from the same set of backends.
//!
//! Cost: the turns are scheduled per weight class (a heap of as many entries as there are
//! distinct weights, not backends), and the permutation walks take about `M ln M` probes in
//! total (each backend's walk only moves forward, so never more than `M` probes per backend),
//! into a bitmap of taken slots. The walks dominate: ~2 ms for M = 65,537 on the development
//! VM, whether 100 or 10,000 backends (`cargo xtask bench`, control-plane step).

use crate::maps::NO_BACKEND;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;

/// One backend as the Maglev builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Written into the table: the backend's slot in the `BACKENDS` map.
    pub index: u32,
    /// Stable identity (e.g. a hash of address and port): decides the permutation.
    pub key: u64,
    /// Relative share of the table; at least 1.
    pub weight: u32,
}

/// Why a table cannot be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size must be prime so that every permutation covers every slot.
    RingSizeNotPrime(u32),
    /// The table needs more slots than there are backends.
    RingSizeTooSmall { ring_size: u32, backends: usize },
    /// A backend with weight 0 would get no slot; leave it out instead.
    ZeroWeight { index: u32 },
    /// Two backends with one key would walk the same permutation.
    DuplicateKey { key: u64 },
    /// `NO_BACKEND` marks empty slots and cannot be a backend index.
    ReservedIndex { key: u64 },
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevError::RingSizeNotPrime(m) => write!(f, "Maglev table size {m} is not a prime"),
            MaglevError::RingSizeTooSmall { ring_size, backends } => {
                write!(f, "Maglev table size {ring_size} must be larger than the number of backends ({backends})")
            }
            MaglevError::ZeroWeight { index } => write!(f, "backend {index} has weight 0"),
            MaglevError::DuplicateKey { key } => write!(f, "two backends share the Maglev key {key:#018x}"),
            MaglevError::ReservedIndex { key } => {
                write!(f, "backend with key {key:#018x} uses the reserved index {NO_BACKEND:#x}")
            }
        }
    }
}

impl std::error::Error for MaglevError {}

/// Whether `n` is prime (trial division: at most ~32k odd divisors for a `u32`).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

// Fixed seeds: the table must be the same on every node and across restarts.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66;
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b;

/// splitmix64 (Steele, Lea, Flood): the offset hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// MurmurHash3's fmix64: the skip hash. A different function from the offset hash, so that
/// backends with nearby offsets do not also get related skips.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A next turn, at virtual time `num / den`; `pos` (the rank by key, or the weight class)
/// breaks ties.
struct Turn {
    num: u64,
    den: u64,
    pos: usize,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // Both sides stay below 2^66, hence u128.
        let lhs = u128::from(self.num) * u128::from(other.den);
        let rhs = u128::from(other.num) * u128::from(self.den);
        lhs.cmp(&rhs).then(self.pos.cmp(&other.pos))
    }
}

impl Turn {
    fn at_same_time(&self, other: &Turn) -> bool {
        u128::from(self.num) * u128::from(other.den) == u128::from(other.num) * u128::from(self.den)
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

/// Where a backend is in its permutation.
struct Walk {
    slot: u64,
    skip: u64,
    index: u32,
}

/// Builds the lookup table: `table[slot]` is a backend index, `NO_BACKEND` everywhere when
/// `backends` is empty. The result does not depend on the order of `backends`.
///
/// `ring_size` must be prime and larger than the number of backends; weights must be at least
/// 1 and keys distinct.
pub fn build_table(backends: &[MaglevBackend], ring_size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(ring_size) {
        return Err(MaglevError::RingSizeNotPrime(ring_size));
    }
    if backends.len() >= ring_size as usize {
        return Err(MaglevError::RingSizeTooSmall { ring_size, backends: backends.len() });
    }
    let mut sorted = backends.to_vec();
    sorted.sort_unstable_by_key(|b| b.key);
    // Checked in key order so that the error, too, does not depend on the input order.
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].key == pair[1].key) {
        return Err(MaglevError::DuplicateKey { key: pair[0].key });
    }
    for b in &sorted {
        if b.weight == 0 {
            return Err(MaglevError::ZeroWeight { index: b.index });
        }
        if b.index == NO_BACKEND {
            return Err(MaglevError::ReservedIndex { key: b.key });
        }
    }

    let m = u64::from(ring_size);
    let mut table = vec![NO_BACKEND; ring_size as usize];
    if sorted.is_empty() {
        return Ok(table);
    }
    let mut walks: Vec<Walk> = sorted
        .iter()
        .map(|b| Walk {
            slot: splitmix64(b.key ^ OFFSET_SEED) % m,
            skip: fmix64(b.key ^ SKIP_SEED) % (m - 1) + 1,
            index: b.index,
        })
        .collect();
    // Which slots are taken, one bit each: the walks probe it, not the table, and at 8 KiB for
    // the default size it stays in the L1 cache where the table would not.
    let mut taken = vec![0u64; (ring_size as usize).div_ceil(64)];
    let mut claim = |walk: &mut Walk, table: &mut [u32]| {
        // A free slot exists (not all M are filled yet) and the permutation covers all slots,
        // and the slots already walked past are taken for good, so this terminates.
        while taken[(walk.slot / 64) as usize] & (1 << (walk.slot % 64)) != 0 {
            walk.slot += walk.skip;
            if walk.slot >= m {
                walk.slot -= m;
            }
        }
        taken[(walk.slot / 64) as usize] |= 1 << (walk.slot % 64);
        table[walk.slot as usize] = walk.index;
    };
    // Backends of one weight take their k-th turns at the same time, in key order. So the turns
    // are scheduled per weight class (few, however many backends), not per backend: a class's
    // k-th round gives each member its k-th turn, and rounds of classes whose times tie are
    // merged by key order, exactly as the one-turn-at-a-time order has it.
    let mut classes: Vec<(u32, Vec<usize>)> = Vec::new();
    let mut by_weight: Vec<(u32, usize)> = sorted.iter().enumerate().map(|(pos, b)| (b.weight, pos)).collect();
    by_weight.sort_unstable();
    for (weight, pos) in by_weight {
        match classes.last_mut() {
            Some((w, members)) if *w == weight => members.push(pos),
            _ => classes.push((weight, vec![pos])),
        }
    }
    // k-th turn at (2k - 1) / (2w): the half step rounds each backend's turn count to the
    // nearest instead of down, which would favour heavy backends.
    let mut rounds: BinaryHeap<Reverse<Turn>> = classes
        .iter()
        .enumerate()
        .map(|(class, (weight, _))| Reverse(Turn { num: 1, den: 2 * u64::from(*weight), pos: class }))
        .collect();
    let mut due: Vec<Turn> = Vec::new();
    let mut merged: Vec<usize> = Vec::new();
    let mut filled = 0u64;
    while filled < m {
        // The heap holds one round per class and is never empty.
        let Some(Reverse(first)) = rounds.pop() else { unreachable!("no backend turn") };
        due.clear();
        due.push(first);
        // Rounds of other classes at the very same time are merged into this one.
        while rounds.peek().is_some_and(|Reverse(next)| next.at_same_time(&due[0])) {
            if let Some(Reverse(next)) = rounds.pop() {
                due.push(next);
            }
        }
        let members: &[usize] = if due.len() == 1 {
            &classes[due[0].pos].1
        } else {
            merged.clear();
            for turn in &due {
                merged.extend_from_slice(&classes[turn.pos].1);
            }
            merged.sort_unstable();
            &merged
        };
        for &pos in members {
            if filled == m {
                break;
            }
            claim(&mut walks[pos], &mut table);
            filled += 1;
        }
        rounds.extend(due.drain(..).map(|turn| Reverse(Turn { num: turn.num + 2, ..turn })));
    }
    Ok(table)
}

/// How many slots differ between two tables of equal length.
///
/// Tables of different lengths (a resized ring) also count the extra slots as changed, though
/// then nearly every flow moves anyway since the slot is the flow hash modulo the length.
pub fn slots_changed(old: &[u32], new: &[u32]) -> usize {
    old.iter().zip(new).filter(|(a, b)| a != b).count() + old.len().abs_diff(new.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::DEFAULT_RING_SIZE;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    const M: u32 = DEFAULT_RING_SIZE;
    const KNOWN_TABLE: [u32; 31] =
        [2, 3, 4, 2, 0, 2, 3, 3, 4, 0, 2, 4, 1, 3, 1, 3, 0, 1, 3, 1, 1, 0, 3, 1, 1, 3, 1, 1, 0, 4, 3];

    /// Backends with indexes 0.. and random (but reproducible) keys.
    fn backends(weights: &[u32], seed: u64) -> Vec<MaglevBackend> {
        let mut rng = StdRng::seed_from_u64(seed);
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| MaglevBackend { index: i as u32, key: rng.random(), weight })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0usize; n];
        for &b in table {
            counts[b as usize] += 1;
        }
        counts
    }

    /// Every backend's share is within `tolerance` (relative) of its weight share.
    fn assert_shares(weights: &[u32], tolerance: f64) {
        for seed in 0..3 {
            let table = build_table(&backends(weights, seed), M).unwrap();
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            for (i, &count) in counts(&table, weights.len()).iter().enumerate() {
                let share = count as f64 / f64::from(M);
                let expected = f64::from(weights[i]) / total as f64;
                assert!(
                    (share - expected).abs() <= tolerance * expected,
                    "weights {weights:?}, seed {seed}: backend {i} has share {share}, expected {expected}"
                );
            }
        }
    }

    /// The builder as first written (turns from the heap for every weight, the table itself
    /// probed): the faster one must produce exactly its tables, or nodes of two releases in one
    /// ECMP group would disagree.
    fn reference_table(backends: &[MaglevBackend], ring_size: u32) -> Vec<u32> {
        let mut sorted = backends.to_vec();
        sorted.sort_unstable_by_key(|b| b.key);
        let m = u64::from(ring_size);
        let mut table = vec![NO_BACKEND; ring_size as usize];
        let mut walks: Vec<Walk> = sorted
            .iter()
            .map(|b| Walk {
                slot: splitmix64(b.key ^ OFFSET_SEED) % m,
                skip: fmix64(b.key ^ SKIP_SEED) % (m - 1) + 1,
                index: b.index,
            })
            .collect();
        let mut turns: BinaryHeap<Reverse<Turn>> = sorted
            .iter()
            .enumerate()
            .map(|(pos, b)| Reverse(Turn { num: 1, den: 2 * u64::from(b.weight), pos }))
            .collect();
        for _ in 0..m {
            let mut top = turns.peek_mut().unwrap();
            let walk = &mut walks[top.0.pos];
            while table[walk.slot as usize] != NO_BACKEND {
                walk.slot = (walk.slot + walk.skip) % m;
            }
            table[walk.slot as usize] = walk.index;
            top.0.num += 2;
        }
        table
    }

    #[test]
    fn tables_are_those_of_the_reference_builder() {
        let mut rng = StdRng::seed_from_u64(7);
        // Equal weights; few weights that often tie (1/2 = 3/6); many weights; far apart ones.
        let draws: [&dyn Fn(&mut StdRng) -> u32; 4] =
            [&|_| 3, &|rng| rng.random_range(1..=8), &|rng| rng.random_range(1..=100), &|rng| {
                if rng.random_bool(0.5) { 1 } else { 1_000_000 }
            }];
        for (n, ring_size) in [(1, 7), (3, 13), (10, 251), (100, 4093), (1000, M), (5000, M)] {
            for (kind, draw) in draws.iter().enumerate() {
                let weights: Vec<u32> = (0..n).map(|_| draw(&mut rng)).collect();
                let list = backends(&weights, rng.random());
                assert_eq!(build_table(&list, ring_size).unwrap(), reference_table(&list, ring_size), "{n} {kind}");
            }
        }
    }

    /// A fixed input's table, pinned: a change to the hashes or the turn order would move flows
    /// between releases (and between the nodes of a mixed ECMP group).
    #[test]
    fn a_known_table_stays_the_same() {
        let list: Vec<MaglevBackend> = (0..5u32)
            .map(|i| MaglevBackend {
                index: i,
                key: u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                weight: 1 + i % 2,
            })
            .collect();
        let table = build_table(&list, 31).unwrap();
        assert_eq!(table, KNOWN_TABLE);
    }

    #[test]
    fn equal_weights_get_shares_within_one_percent() {
        // Each backend gets exactly as many slots as turns, so this holds for N = 100 too.
        assert_shares(&[1; 3], 0.01);
        assert_shares(&[1; 10], 0.01);
        assert_shares(&[1; 100], 0.01);
        assert_shares(&[7; 100], 0.01);
    }

    #[test]
    fn weighted_shares_are_proportional_to_weight() {
        assert_shares(&[1, 2, 3, 4], 0.01);
        assert_shares(&[3, 1, 4, 2], 0.01);
        assert_shares(&[1, 1000], 0.01);
        assert_shares(&[5, 5, 10, 100, 1], 0.01);
        // Extreme ratios still fill exactly one slot per turn.
        assert_shares(&[u32::MAX, 1 << 20], 0.01);
    }

    #[test]
    fn removing_a_backend_moves_only_its_slots_and_under_one_percent_of_the_rest() {
        for n in [10usize, 100] {
            for seed in 0..3 {
                let all = backends(&vec![1; n], seed);
                let before = build_table(&all, M).unwrap();
                for removed in [0, n / 2, n - 1] {
                    let rest: Vec<_> = all.iter().copied().filter(|b| b.index as usize != removed).collect();
                    let after = build_table(&rest, M).unwrap();
                    assert!(after.iter().all(|&b| b as usize != removed));
                    let others = before.iter().filter(|&&b| b as usize != removed).count();
                    let others_moved =
                        before.iter().zip(&after).filter(|&(&old, &new)| old as usize != removed && old != new).count();
                    assert!(
                        others_moved as f64 <= 0.01 * others as f64,
                        "n={n} seed={seed} removed={removed}: {others_moved} of {others} other slots moved"
                    );
                }
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_at_most_its_new_share_plus_one_percent() {
        for n in [10usize, 100] {
            for seed in 0..3 {
                let all = backends(&vec![1; n + 1], seed);
                let before = build_table(&all[..n], M).unwrap();
                let after = build_table(&all, M).unwrap();
                let added = all[n].index;
                let new_share = after.iter().filter(|&&b| b == added).count() as f64 / f64::from(M);
                let moved = slots_changed(&before, &after) as f64 / f64::from(M);
                assert!(
                    moved <= new_share + 0.01,
                    "n={n} seed={seed}: {moved} of the table moved, new share {new_share}"
                );
            }
        }
    }

    #[test]
    fn removing_a_weighted_backend_moves_under_one_percent_of_the_rest() {
        let weights: Vec<u32> = (0..20).map(|i| 1 + i % 4).collect();
        let all = backends(&weights, 9);
        let before = build_table(&all, M).unwrap();
        let rest: Vec<_> = all.iter().copied().filter(|b| b.index != 3).collect();
        let after = build_table(&rest, M).unwrap();
        let others = before.iter().filter(|&&b| b != 3).count();
        let others_moved = before.iter().zip(&after).filter(|&(&old, &new)| old != 3 && old != new).count();
        assert!(others_moved as f64 <= 0.01 * others as f64, "{others_moved} of {others} other slots moved");
    }

    #[test]
    fn input_order_does_not_change_the_table() {
        let mut rng = StdRng::seed_from_u64(42);
        let weights: Vec<u32> = (0..50).map(|_| rng.random_range(1..=10)).collect();
        let mut list = backends(&weights, 1);
        let reference = build_table(&list, M).unwrap();
        list.reverse();
        assert_eq!(build_table(&list, M).unwrap(), reference);
        for _ in 0..5 {
            list.shuffle(&mut rng);
            assert_eq!(build_table(&list, M).unwrap(), reference);
        }
    }

    #[test]
    fn index_does_not_decide_which_slots_a_backend_gets() {
        let list = backends(&[1, 2, 3], 5);
        let renamed: Vec<_> = list.iter().map(|b| MaglevBackend { index: b.index + 100, ..*b }).collect();
        let a = build_table(&list, 251).unwrap();
        let b = build_table(&renamed, 251).unwrap();
        assert!(a.iter().zip(&b).all(|(&x, &y)| x + 100 == y));
    }

    #[test]
    fn every_slot_is_filled_when_a_backend_exists() {
        for n in [1usize, 2, 7, 250] {
            let table = build_table(&backends(&vec![1; n], 3), 251).unwrap();
            assert!(table.iter().all(|&b| (b as usize) < n), "n={n}");
            assert!(counts(&table, n).iter().all(|&c| c > 0), "n={n}: a backend got no slot");
        }
        let table = build_table(&backends(&[1], 3), 2).unwrap();
        assert_eq!(table, vec![0, 0]);
    }

    #[test]
    fn a_thousand_backends_build_a_full_default_size_table() {
        let weights: Vec<u32> = (0..1000).map(|i| if i % 10 == 0 { 1000 } else { 1 + i % 3 }).collect();
        let table = build_table(&backends(&weights, 11), M).unwrap();
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(|&b| b < 1000));
    }

    #[test]
    fn no_backends_gives_an_all_no_backend_table() {
        assert_eq!(build_table(&[], 251).unwrap(), vec![NO_BACKEND; 251]);
        assert!(build_table(&[], M).unwrap().iter().all(|&b| b == NO_BACKEND));
    }

    #[test]
    fn non_prime_ring_size_is_refused() {
        for m in [0, 1, 4, 250, 65536, 65535] {
            assert_eq!(build_table(&[], m), Err(MaglevError::RingSizeNotPrime(m)));
        }
    }

    #[test]
    fn ring_size_not_above_backend_count_is_refused() {
        assert_eq!(
            build_table(&backends(&[1; 7], 0), 7),
            Err(MaglevError::RingSizeTooSmall { ring_size: 7, backends: 7 })
        );
        assert!(build_table(&backends(&[1; 6], 0), 7).is_ok());
    }

    #[test]
    fn zero_weight_is_refused() {
        assert_eq!(build_table(&backends(&[1, 0, 1], 0), 251), Err(MaglevError::ZeroWeight { index: 1 }));
    }

    #[test]
    fn duplicate_key_is_refused() {
        let dup = [MaglevBackend { index: 0, key: 7, weight: 1 }, MaglevBackend { index: 1, key: 7, weight: 2 }];
        assert_eq!(build_table(&dup, 251), Err(MaglevError::DuplicateKey { key: 7 }));
    }

    #[test]
    fn no_backend_index_is_refused() {
        let reserved = [MaglevBackend { index: NO_BACKEND, key: 7, weight: 1 }];
        assert_eq!(build_table(&reserved, 251), Err(MaglevError::ReservedIndex { key: 7 }));
    }

    #[test]
    fn errors_explain_themselves() {
        assert_eq!(MaglevError::RingSizeNotPrime(250).to_string(), "Maglev table size 250 is not a prime");
        assert_eq!(MaglevError::ZeroWeight { index: 4 }.to_string(), "backend 4 has weight 0");
        let boxed: Box<dyn std::error::Error> = Box::new(MaglevError::DuplicateKey { key: 1 });
        assert!(boxed.to_string().contains("0x0000000000000001"));
    }

    #[test]
    fn is_prime_agrees_with_naive_division() {
        let naive = |n: u32| n >= 2 && (2..n).all(|d| !n.is_multiple_of(d));
        for n in 0..2000 {
            assert_eq!(is_prime(n), naive(n), "n={n}");
        }
        assert!(is_prime(65537) && is_prime(4_294_967_291));
        assert!(!is_prime(65535) && !is_prime(u32::MAX) && !is_prime(65521 * 65519));
    }

    #[test]
    fn slots_changed_counts_differing_slots() {
        assert_eq!(slots_changed(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(slots_changed(&[1, 2, 3], &[3, 2, 1]), 2);
        assert_eq!(slots_changed(&[], &[]), 0);
        assert_eq!(slots_changed(&[1, 2], &[1, 2, 3]), 1);
    }
}
