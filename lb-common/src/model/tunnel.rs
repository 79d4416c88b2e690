//! The model of the tunnel modes (`lb-ebpf/src/tunnel.rs`): the outer headers written out field
//! by field here, not with `crate::tunnel`'s encoders (only the entropy rules are shared, as the
//! flow hash is), and the "too big" answer.

use super::ModelMaps;
use crate::csum::{add_words, fold};
use crate::maps::*;
use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
use crate::tunnel::{TOO_BIG_QUOTE, flow_label, gue_source_port, outer_source};

/// Where a packet goes through a tunnel.
pub(super) struct Tunnel {
    pub backend: Backend,
    pub gue: bool,
    pub hash: u32,
}

impl ModelMaps {
    /// `p` (an IP packet of `family`, `ip_len` bytes after the Ethernet header, maybe padded)
    /// sent through `tunnel`; `sent` when it went.
    pub(super) fn encapsulate(
        &self,
        p: &mut Vec<u8>,
        family: u8,
        ip_len: usize,
        tunnel: &Tunnel,
        sent: Reason,
    ) -> Result<Reason, Reason> {
        let outer_v6 = tunnel.backend.family == FAMILY_V6;
        let ip_hlen = if outer_v6 { 40 } else { 20 };
        let added = ip_hlen + if tunnel.gue { 12 } else { 0 };
        let mtu = self.settings.mtu as usize;
        if mtu != 0 && ip_len + added > mtu {
            if sent == Reason::TxIcmpToBackend {
                return Err(Reason::DropTooBig);
            }
            return self.too_big(p, family, ip_len, mtu.saturating_sub(added));
        }
        let s = &self.settings;
        let (prefix, prefix_len) =
            if outer_v6 { (s.tunnel_source_v6, s.tunnel_prefix_v6) } else { (s.tunnel_source_v4, s.tunnel_prefix_v4) };
        if prefix_len == 0 {
            return Err(Reason::DropInternal);
        }
        let src = outer_source(&prefix, prefix_len, tunnel.backend.family, tunnel.hash);
        let dst = tunnel.backend.addr;
        let tos = if family == FAMILY_V6 { (p[ETH_HLEN] << 4) | (p[ETH_HLEN + 1] >> 4) } else { p[ETH_HLEN + 1] };
        let inner_proto = if family == FAMILY_V6 { 41 } else { 4 };
        let next = if tunnel.gue { PROTO_UDP } else { inner_proto };
        let total = ip_len + added;
        let mut outer = Vec::with_capacity(ETH_HLEN + added);
        outer.extend_from_slice(&tunnel.backend.mac);
        outer.extend_from_slice(&p[0..6]);
        if outer_v6 {
            outer.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let label = flow_label(tunnel.hash);
            outer.push(0x60 | (tos >> 4));
            outer.push((tos << 4) | (label >> 16) as u8);
            outer.extend_from_slice(&(label as u16).to_be_bytes());
            outer.extend_from_slice(&((total - 40) as u16).to_be_bytes());
            outer.extend_from_slice(&[next, 64]);
            outer.extend_from_slice(&src);
            outer.extend_from_slice(&dst);
        } else {
            outer.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut h = vec![0x45, tos];
            h.extend_from_slice(&(total as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, next, 0, 0]);
            h.extend_from_slice(&src[..4]);
            h.extend_from_slice(&dst[..4]);
            let check = !fold(add_words(0, &h));
            h[10..12].copy_from_slice(&check.to_ne_bytes());
            outer.extend_from_slice(&h);
        }
        if tunnel.gue {
            let dport = u16::from_be(s.gue_port);
            outer.extend_from_slice(&gue_source_port(tunnel.hash).to_be_bytes());
            outer.extend_from_slice(&dport.to_be_bytes());
            outer.extend_from_slice(&((8 + 4 + ip_len) as u16).to_be_bytes());
            outer.extend_from_slice(&[0, 0]);
            outer.extend_from_slice(&[0, inner_proto, 0, 0]);
        }
        outer.extend_from_slice(&p[ETH_HLEN..]);
        *p = outer;
        Ok(sent)
    }

    /// ICMP "fragmentation needed" / "packet too big" back to the sender, from the address it
    /// sent to, quoting the packet's first `TOO_BIG_QUOTE` bytes.
    fn too_big(&self, p: &mut Vec<u8>, family: u8, ip_len: usize, fits: usize) -> Result<Reason, Reason> {
        if ip_len < TOO_BIG_QUOTE {
            return Err(Reason::DropTooBig);
        }
        let v6 = family == FAMILY_V6;
        let (client, vip) = if v6 {
            (p[ETH_HLEN + 8..ETH_HLEN + 24].to_vec(), p[ETH_HLEN + 24..ETH_HLEN + 40].to_vec())
        } else {
            (p[ETH_HLEN + 12..ETH_HLEN + 16].to_vec(), p[ETH_HLEN + 16..ETH_HLEN + 20].to_vec())
        };
        let quoted = p[ETH_HLEN..ETH_HLEN + TOO_BIG_QUOTE].to_vec();
        let icmp_len = 8 + TOO_BIG_QUOTE;
        let mut icmp = if v6 {
            let mut h = vec![2, 0, 0, 0];
            h.extend_from_slice(&(fits as u32).to_be_bytes());
            h
        } else {
            let mut h = vec![3, 4, 0, 0, 0, 0];
            h.extend_from_slice(&(fits as u16).to_be_bytes());
            h
        };
        icmp.extend_from_slice(&quoted);
        let mut frame = Vec::new();
        frame.extend_from_slice(&p[6..12]);
        frame.extend_from_slice(&p[0..6]);
        let mut sum = add_words(0, &icmp);
        if v6 {
            frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(icmp_len as u16).to_be_bytes());
            frame.extend_from_slice(&[PROTO_ICMPV6, 64]);
            frame.extend_from_slice(&vip);
            frame.extend_from_slice(&client);
            sum = add_words(add_words(add_words(sum, &vip), &client), &(icmp_len as u32).to_be_bytes());
            sum = add_words(sum, &[0, 0, 0, PROTO_ICMPV6]);
        } else {
            frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&((20 + icmp_len) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_ICMP, 0, 0]);
            h.extend_from_slice(&vip);
            h.extend_from_slice(&client);
            let check = !fold(add_words(0, &h));
            h[10..12].copy_from_slice(&check.to_ne_bytes());
            frame.extend_from_slice(&h);
        }
        let check = !fold(sum);
        icmp[2..4].copy_from_slice(&check.to_ne_bytes());
        frame.extend_from_slice(&icmp);
        *p = frame;
        Ok(Reason::TxIcmpTooBig)
    }
}
