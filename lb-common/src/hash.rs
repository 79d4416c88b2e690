//! The flow hash: one function, run by the XDP program and by the host, so both pick the same backend.
//!
//! MurmurHash3 (x86, 32-bit) over the ten 32-bit words of a [`FlowKey`], with a fixed seed so
//! that every load balancer node computes the same hash for a flow (active/active needs that).
//! Fixed length and no data-dependent loops keep it cheap and verifier-friendly.

use crate::maps::{FlowKey, VIP_AFFINITY_CLIENT, VipMeta};

pub const FLOW_HASH_SEED: u32 = 0x5eed_1b0b;

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(bytes: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
}

/// Hash of a client flow. Ports are mixed as they sit in the key (network byte order).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = mix(h, word(&key.src, 0));
    h = mix(h, word(&key.src, 4));
    h = mix(h, word(&key.src, 8));
    h = mix(h, word(&key.src, 12));
    h = mix(h, word(&key.dst, 0));
    h = mix(h, word(&key.dst, 4));
    h = mix(h, word(&key.dst, 8));
    h = mix(h, word(&key.dst, 12));
    h = mix(h, (key.sport as u32) | ((key.dport as u32) << 16));
    h = mix(h, (key.proto as u32) | ((key.family as u32) << 8));
    // fmix32 with the length (40 bytes) folded in, as MurmurHash3 does.
    fmix32(h ^ 40)
}

/// MurmurHash3's finalizer: a bijection with full avalanche, for deriving further values (NAT
/// port candidates, tunnel entropy) from a hash without their bits following its own.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The hash that picks a new flow's slot in `vip`'s Maglev ring. `flow_hash` is the flow's own
/// hash (computed once: NAT source ports are drawn from it in either case).
///
/// With client affinity it is the hash of the client's address masked to the VIP's prefix,
/// towards the VIP's address, with both ports zero: every connection of that client (or of
/// that client network) reaches the same slot, whatever its ports. The protocol stays in the
/// key, as it is part of the VIP.
#[inline(always)]
pub fn placement_hash(flow: &FlowKey, flow_hash: u32, vip: &VipMeta) -> u32 {
    if vip.flags & VIP_AFFINITY_CLIENT == 0 {
        return flow_hash;
    }
    self::flow_hash(&client_key(flow, vip.affinity_prefix))
}

/// `flow` reduced to its client: the source address masked to `prefix` bits, ports zero.
#[inline(always)]
pub fn client_key(flow: &FlowKey, prefix: u8) -> FlowKey {
    let mut key = FlowKey { sport: 0, dport: 0, ..*flow };
    let mut i = 0;
    while i < 16 {
        // Bits of byte i that lie inside the prefix: 0..=8.
        let inside = (prefix as i32 - 8 * i as i32).clamp(0, 8) as u32;
        key.src[i] &= !(0xffu16 >> inside) as u8;
        i += 1;
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{FAMILY_V4, PROTO_TCP};

    fn v4_flow(src: [u8; 4], sport: u16) -> FlowKey {
        let mut key = FlowKey { proto: PROTO_TCP, family: FAMILY_V4, ..Default::default() };
        key.src[..4].copy_from_slice(&src);
        key.dst[..4].copy_from_slice(&[10, 0, 0, 10]);
        key.sport = sport.to_be();
        key.dport = 80u16.to_be();
        key
    }

    /// Plain MurmurHash3_x86_32 over bytes, to prove `flow_hash` is exactly that function.
    fn murmur3_32(data: &[u8], seed: u32) -> u32 {
        let mut h = seed;
        let mut chunks = data.chunks_exact(4);
        for chunk in &mut chunks {
            h = mix(h, u32::from_le_bytes(chunk.try_into().unwrap()));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let mut k = 0u32;
            for (i, b) in tail.iter().enumerate() {
                k |= (*b as u32) << (8 * i);
            }
            h ^= k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
        }
        h ^= data.len() as u32;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    #[test]
    fn reference_murmur3_matches_published_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_32(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3_32(b"aaaa", 0x9747_b28c), 0x5a97_808a);
        assert_eq!(murmur3_32(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
        assert_eq!(murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c), 0x2fa8_26cd);
    }

    #[test]
    fn flow_hash_is_murmur3_of_the_key_bytes() {
        let key = v4_flow([192, 0, 2, 1], 40000);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&key.src);
        bytes.extend_from_slice(&key.dst);
        bytes.extend_from_slice(&key.sport.to_le_bytes());
        bytes.extend_from_slice(&key.dport.to_le_bytes());
        bytes.extend_from_slice(&[key.proto, key.family, 0, 0]);
        assert_eq!(flow_hash(&key), murmur3_32(&bytes, FLOW_HASH_SEED));
    }

    /// The hash is part of the wire contract between nodes and across releases:
    /// these values must never change (a change would move every established flow).
    #[test]
    fn flow_hash_is_stable_across_runs_and_releases() {
        assert_eq!(flow_hash(&v4_flow([192, 0, 2, 1], 40000)), 0x70c1_7ad0);
        assert_eq!(flow_hash(&v4_flow([192, 0, 2, 2], 40000)), 0xaba6_b23d);
        assert_eq!(flow_hash(&FlowKey::default()), 0x76d4_48e0);
    }

    fn client_vip(prefix: u8) -> VipMeta {
        VipMeta { flags: VIP_AFFINITY_CLIENT, affinity_prefix: prefix, ..Default::default() }
    }

    #[test]
    fn connection_affinity_places_by_the_flow_hash() {
        let flow = v4_flow([192, 0, 2, 1], 40000);
        assert_eq!(placement_hash(&flow, flow_hash(&flow), &VipMeta::default()), flow_hash(&flow));
    }

    #[test]
    fn client_affinity_ignores_ports_and_keeps_the_address() {
        let vip = client_vip(32);
        let a = v4_flow([192, 0, 2, 1], 40000);
        let mut b = v4_flow([192, 0, 2, 1], 40001);
        b.dport = 8080u16.to_be();
        let place = |f: &FlowKey| placement_hash(f, flow_hash(f), &vip);
        assert_eq!(place(&a), place(&b));
        assert_ne!(place(&a), place(&v4_flow([192, 0, 2, 2], 40000)));
        assert_ne!(place(&a), flow_hash(&a), "the client key is not the flow");
    }

    #[test]
    fn the_affinity_prefix_groups_a_client_network() {
        let vip = client_vip(24);
        let place = |f: &FlowKey| placement_hash(f, flow_hash(f), &vip);
        assert_eq!(place(&v4_flow([192, 0, 2, 1], 1)), place(&v4_flow([192, 0, 2, 254], 2)));
        assert_ne!(place(&v4_flow([192, 0, 2, 1], 1)), place(&v4_flow([192, 0, 3, 1], 1)));
    }

    #[test]
    fn client_key_masks_exactly_the_prefix_bits() {
        let mut flow = FlowKey { src: [0xff; 16], sport: 7, dport: 9, ..Default::default() };
        flow.dst = [0xaa; 16];
        for (prefix, expected_first_bytes) in [
            (0u8, [0u8, 0, 0, 0]),
            (3, [0xe0, 0, 0, 0]),
            (8, [0xff, 0, 0, 0]),
            (24, [0xff, 0xff, 0xff, 0]),
            (29, [0xff, 0xff, 0xff, 0xf8]),
        ] {
            let key = client_key(&flow, prefix);
            assert_eq!(key.src[..4], expected_first_bytes, "prefix {prefix}");
            assert_eq!((key.sport, key.dport, key.dst), (0, 0, flow.dst));
        }
        assert_eq!(client_key(&flow, 56).src, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(client_key(&flow, 128).src, [0xff; 16]);
    }

    /// Part of the wire contract like the flow hash: nodes of a pair or an ECMP group and
    /// releases must place a client alike.
    #[test]
    fn client_placement_is_stable_across_releases() {
        let flow = v4_flow([192, 0, 2, 1], 40000);
        assert_eq!(placement_hash(&flow, 0, &client_vip(32)), 0x7c3f_b3b6);
    }

    #[test]
    fn flow_hash_spreads_source_ports_evenly() {
        let buckets = 16usize;
        let mut counts = [0u32; 16];
        let n = 160_000u32;
        for i in 0..n {
            let port = (1024 + i % 60000) as u16;
            let src = [10, 1, (i / 60000) as u8, 7];
            counts[flow_hash(&v4_flow(src, port)) as usize % buckets] += 1;
        }
        let expected = n as f64 / buckets as f64;
        for c in counts {
            assert!((c as f64 - expected).abs() / expected < 0.03, "bucket {c} vs {expected}");
        }
    }
}
