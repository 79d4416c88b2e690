//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, eqn. 3).
//!
//! The one's-complement sum does not care about byte order as long as every word is read
//! the same way, so callers pass 16-bit words exactly as they sit in memory (native loads)
//! and store the result back the same way. No function here ever zeroes a checksum.

/// Folds a 32-bit accumulator into 16 bits (end-around carry).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the 16-bit words of `bytes` (even length) to `sum`, words read in native order.
#[inline(always)]
pub fn add_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    if i < bytes.len() {
        sum += u16::from_ne_bytes([bytes[i], 0]) as u32;
    }
    sum
}

/// Checksum field value after replacing the word `old` with `new` (RFC 1624: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + new as u32;
    !fold(sum)
}

/// Checksum field value after replacing `old` with `new` (both of even, equal length: 4 or 16 bytes).
#[inline(always)]
pub fn replace_bytes<const N: usize>(check: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i + 1 < N {
        sum += !u16::from_ne_bytes([old[i], old[i + 1]]) as u32;
        sum += u16::from_ne_bytes([new[i], new[i + 1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    !fold(sum)
}

/// A UDP checksum field of 0 means "none" (IPv4); a computed 0 is sent as 0xffff.
#[inline(always)]
pub fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(bytes: &[u8]) -> u16 {
        !fold(add_words(0, bytes))
    }

    #[test]
    fn full_checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example words: 0001 f203 f4f5 f6f7 → sum ddf2, checksum 220d.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(u16::from_be(fold(add_words(0, &bytes))), 0xddf2);
        assert_eq!(u16::from_be(full(&bytes)), 0x220d);
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..10_000 {
            let mut data = [0u8; 40];
            rng.fill(&mut data[..]);
            data[10] = 0;
            data[11] = 0;
            let check = full(&data);
            data[10..12].copy_from_slice(&check.to_ne_bytes());
            assert_eq!(full(&data), 0);

            let old: [u8; 16] = data[20..36].try_into().unwrap();
            let new: [u8; 16] = rng.random();
            data[20..36].copy_from_slice(&new);
            let updated = replace_bytes(check, &old, &new);
            let old_port = u16::from_ne_bytes([data[36], data[37]]);
            let new_port: u16 = rng.random();
            data[36..38].copy_from_slice(&new_port.to_ne_bytes());
            let updated = replace_u16(updated, old_port, new_port);
            data[10..12].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(full(&data), 0, "incrementally updated checksum must verify");
        }
    }
}
