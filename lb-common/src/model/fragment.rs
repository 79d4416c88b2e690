//! The model of the fragments' routes (`lb-ebpf/src/fragment.rs`): a first fragment's route is
//! remembered under its datagram's key; later fragments take it, or go to the kernel.

use super::tunnel::Tunnel;
use super::{ModelMaps, Parsed, get16, put16, set_macs};
use crate::csum::replace_bytes;
use crate::maps::*;
use crate::packet::{ETH_HLEN, ipv4, ipv6};

impl ModelMaps {
    /// `address_flags`: the destination's `VIP_ADDRS` flags.
    pub(super) fn later_fragment(
        &mut self,
        p: &mut Vec<u8>,
        parsed: &Parsed,
        address_flags: u32,
    ) -> Result<Reason, Reason> {
        let Some(route) = self.frags.get(&key(parsed)).copied() else {
            return Err(if address_flags & VIP_ADDR_VIP != 0 {
                Reason::PassFragmentNoFirst
            } else {
                Reason::PassFragment
            });
        };
        if route.flags & FRAG_TUNNEL != 0 {
            let backend = self.backends.get(&route.backend).copied().unwrap_or_default();
            let tunnel = Tunnel { backend, gue: route.flags & FRAG_GUE != 0, hash: route.hash };
            return self.encapsulate(p, parsed.family, parsed.l4_end - ETH_HLEN, &tunnel, Reason::TxFragment);
        }
        if route.flags & FRAG_REWRITE != 0 {
            set_addresses(p, parsed, &route.src, &route.dst);
        }
        set_macs(p, route.mac);
        Ok(Reason::TxFragment)
    }

    pub(super) fn remember_forward(
        &mut self,
        parsed: &Parsed,
        vip: &VipMeta,
        index: u32,
        backend: &Backend,
        hash: u32,
    ) {
        let nat = vip.mode == MODE_NAT;
        let flags = match vip.mode {
            MODE_NAT => FRAG_REWRITE,
            MODE_IPIP => FRAG_TUNNEL,
            MODE_GUE => FRAG_TUNNEL | FRAG_GUE,
            _ => 0,
        };
        let route = FragRoute {
            src: if nat { vip.snat_addr } else { [0; 16] },
            dst: if nat { backend.addr } else { [0; 16] },
            mac: backend.mac,
            flags,
            _pad: 0,
            vip_index: vip.vip_index,
            backend: index,
            hash,
        };
        self.frags.insert(key(parsed), route);
    }

    pub(super) fn remember_reply(&mut self, parsed: &Parsed, reverse: &NatReverse) {
        let route = FragRoute {
            src: reverse.vip_addr,
            dst: reverse.client_addr,
            mac: reverse.client_mac,
            flags: FRAG_REWRITE,
            _pad: 0,
            vip_index: FRAG_NO_STATS,
            backend: 0,
            hash: 0,
        };
        self.frags.insert(key(parsed), route);
    }
}

fn key(parsed: &Parsed) -> FragKey {
    let flow = &parsed.flow;
    FragKey { src: flow.src, dst: flow.dst, id: parsed.frag_id, proto: flow.proto, family: flow.family, _pad: [0; 2] }
}

/// The IP header's addresses, and IPv4's header checksum.
pub(super) fn set_addresses(p: &mut [u8], parsed: &Parsed, src: &[u8; 16], dst: &[u8; 16]) {
    let from = &parsed.flow;
    if parsed.family == FAMILY_V4 {
        let v4 = |a: &[u8; 16]| -> [u8; 4] { a[..4].try_into().unwrap() };
        let check = replace_bytes(
            replace_bytes(get16(p, ETH_HLEN + ipv4::CHECK), &v4(&from.src), &v4(src)),
            &v4(&from.dst),
            &v4(dst),
        );
        put16(p, ETH_HLEN + ipv4::CHECK, check);
        p[ETH_HLEN + ipv4::SRC..][..4].copy_from_slice(&src[..4]);
        p[ETH_HLEN + ipv4::DST..][..4].copy_from_slice(&dst[..4]);
    } else {
        p[ETH_HLEN + ipv6::SRC..][..16].copy_from_slice(src);
        p[ETH_HLEN + ipv6::DST..][..16].copy_from_slice(dst);
    }
}
