//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), with weights.
//!
//! Each backend walks its own permutation of the table's slots, derived only from its stable
//! key; backends take turns claiming their next free preferred slot. Removing a backend frees
//! only its slots (plus a little reshuffle), which is what keeps established flows in place on
//! the other backends and lets every load balancer node compute the very same table.

use crate::maps::NO_BACKEND;
use std::fmt;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Written into the table: the backend's slot in the `BACKENDS` map.
    pub index: u32,
    /// Stable identity (e.g. a hash of address and port): decides the permutation.
    pub key: u64,
    /// Relative share of the table; at least 1.
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaglevError {
    RingSizeNotPrime(u32),
    TooManyBackends { backends: usize, ring_size: u32 },
    ZeroWeight { index: u32 },
    DuplicateKey { key: u64 },
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevError::RingSizeNotPrime(m) => write!(f, "Maglev table size {m} is not a prime"),
            MaglevError::TooManyBackends { backends, ring_size } => {
                write!(f, "{backends} backends need a Maglev table larger than {ring_size} slots")
            }
            MaglevError::ZeroWeight { index } => write!(f, "backend {index} has weight 0"),
            MaglevError::DuplicateKey { key } => write!(f, "two backends share the Maglev key {key:#x}"),
        }
    }
}

impl std::error::Error for MaglevError {}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// splitmix64's finaliser: a fixed, well-mixed 64-bit hash (no per-process randomness).
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Builds the lookup table: `table[slot]` is a backend index, `NO_BACKEND` everywhere when
/// there is no backend. The result does not depend on the order of `backends`.
pub fn build_table(backends: &[MaglevBackend], ring_size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(ring_size) {
        return Err(MaglevError::RingSizeNotPrime(ring_size));
    }
    if backends.len() >= ring_size as usize {
        return Err(MaglevError::TooManyBackends { backends: backends.len(), ring_size });
    }
    let mut sorted = backends.to_vec();
    sorted.sort_by_key(|b| b.key);
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].key == pair[1].key) {
        return Err(MaglevError::DuplicateKey { key: pair[0].key });
    }
    if let Some(b) = sorted.iter().find(|b| b.weight == 0) {
        return Err(MaglevError::ZeroWeight { index: b.index });
    }
    let m = ring_size as u64;
    let mut table = vec![NO_BACKEND; ring_size as usize];
    if sorted.is_empty() {
        return Ok(table);
    }
    let offsets: Vec<u64> = sorted.iter().map(|b| mix64(b.key ^ 0x6d61_676c_6576_3031) % m).collect();
    let skips: Vec<u64> = sorted.iter().map(|b| mix64(b.key ^ 0x736b_6970_7365_6564) % (m - 1) + 1).collect();
    let mut next = vec![0u64; sorted.len()];
    // Weighted turns: each round a backend earns its weight in credit and takes one slot per
    // `max_weight` of credit, so its share of slots is proportional to its weight.
    let max_weight = sorted.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let mut credit = vec![0u64; sorted.len()];
    let mut filled = 0u64;
    while filled < m {
        for i in 0..sorted.len() {
            credit[i] += sorted[i].weight as u64;
            while credit[i] >= max_weight && filled < m {
                credit[i] -= max_weight;
                let mut slot = (offsets[i] + next[i] * skips[i]) % m;
                while table[slot as usize] != NO_BACKEND {
                    next[i] += 1;
                    slot = (offsets[i] + next[i] * skips[i]) % m;
                }
                table[slot as usize] = sorted[i].index;
                next[i] += 1;
                filled += 1;
            }
        }
    }
    Ok(table)
}

/// How many slots differ between two tables of equal length.
pub fn slots_changed(old: &[u32], new: &[u32]) -> usize {
    old.iter().zip(new).filter(|(a, b)| a != b).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::DEFAULT_RING_SIZE;

    fn backends(weights: &[u32]) -> Vec<MaglevBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| MaglevBackend { index: i as u32, key: mix64(1000 + i as u64), weight })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for &b in table {
            counts[b as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / table.len() as f64).collect()
    }

    fn assert_balanced(weights: &[u32]) {
        let table = build_table(&backends(weights), DEFAULT_RING_SIZE).unwrap();
        let total: u32 = weights.iter().sum();
        for (i, share) in shares(&table, weights.len()).iter().enumerate() {
            let expected = weights[i] as f64 / total as f64;
            assert!(
                (share - expected).abs() <= 0.01 * expected,
                "weights {weights:?}: backend {i} share {share} vs {expected}"
            );
        }
    }

    #[test]
    fn equal_weights_share_the_table_within_one_percent() {
        assert_balanced(&[1; 3]);
        assert_balanced(&[1; 10]);
        assert_balanced(&[1; 100]);
    }

    #[test]
    fn weighted_backends_share_the_table_in_proportion() {
        assert_balanced(&[1, 2, 3, 4]);
        assert_balanced(&[1, 1000]);
        assert_balanced(&[5, 5, 10]);
    }

    #[test]
    fn removing_a_backend_moves_little_besides_its_own_slots() {
        for n in [10usize, 100] {
            let all = backends(&vec![1; n]);
            let before = build_table(&all, DEFAULT_RING_SIZE).unwrap();
            let removed = all[n / 2].index;
            let rest: Vec<_> = all.iter().copied().filter(|b| b.index != removed).collect();
            let after = build_table(&rest, DEFAULT_RING_SIZE).unwrap();
            let others_moved = before.iter().zip(&after).filter(|(old, new)| **old != removed && old != new).count();
            let others = before.iter().filter(|&&b| b != removed).count();
            assert!(after.iter().all(|&b| b != removed));
            assert!(
                others_moved as f64 <= 0.01 * others as f64,
                "n={n}: {others_moved} of {others} slots of remaining backends moved"
            );
        }
    }

    #[test]
    fn adding_a_backend_moves_about_its_share() {
        for n in [10usize, 100] {
            let all = backends(&vec![1; n + 1]);
            let before = build_table(&all[..n], DEFAULT_RING_SIZE).unwrap();
            let after = build_table(&all, DEFAULT_RING_SIZE).unwrap();
            let moved = slots_changed(&before, &after) as f64 / DEFAULT_RING_SIZE as f64;
            let share = 1.0 / (n + 1) as f64;
            assert!(moved <= share + 0.01, "n={n}: {moved} of the table moved for a new share of {share}");
        }
    }

    #[test]
    fn table_does_not_depend_on_input_order() {
        let mut list = backends(&[1, 2, 3, 1, 1]);
        let a = build_table(&list, 251).unwrap();
        list.reverse();
        assert_eq!(a, build_table(&list, 251).unwrap());
    }

    #[test]
    fn every_slot_is_filled_when_a_backend_exists() {
        for n in [1usize, 2, 7] {
            let table = build_table(&backends(&vec![1; n]), 251).unwrap();
            assert!(table.iter().all(|&b| (b as usize) < n));
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(build_table(&[], 251).unwrap(), vec![NO_BACKEND; 251]);
        assert_eq!(build_table(&[], 250), Err(MaglevError::RingSizeNotPrime(250)));
        assert_eq!(build_table(&backends(&[1, 0]), 251), Err(MaglevError::ZeroWeight { index: 1 }));
        let dup = [MaglevBackend { index: 0, key: 7, weight: 1 }, MaglevBackend { index: 1, key: 7, weight: 1 }];
        assert_eq!(build_table(&dup, 251), Err(MaglevError::DuplicateKey { key: 7 }));
        assert!(matches!(build_table(&backends(&[1; 7]), 7), Err(MaglevError::TooManyBackends { .. })));
    }
}
