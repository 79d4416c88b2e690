//! The VRRPv3 advertisement (RFC 5798 §5.2): 8 bytes of header, then the addresses.
//!
//! ```text
//! version(4)=3 type(4)=1 | VRID | priority | count | rsvd(4) max adver int(12, cs) | checksum | addresses
//! ```

use lb_common::csum::{add_words, fold};
use std::net::IpAddr;

pub const PROTOCOL: u8 = 112;
const HEADER: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    pub vrid: u8,
    pub priority: u8,
    /// Maximum advertisement interval in centiseconds (12 bits).
    pub max_advert_int_cs: u16,
    /// All IPv4 or all IPv6, as the packet's own family.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VrrpError {
    #[error("{0} bytes are shorter than a VRRP header")]
    Short(usize),
    #[error("VRRP version {0}: only version 3 is spoken")]
    Version(u8),
    #[error("VRRP type {0}: only advertisements (1) exist")]
    Type(u8),
    #[error("{count} addresses need {need} bytes, the packet has {have}")]
    Length { count: u8, need: usize, have: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("source and destination are of different address families")]
    Family,
}

impl Advertisement {
    /// The VRRP payload from `src` to `dst` (the IP header is the kernel's).
    pub fn encode(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut packet = vec![0x31, self.vrid, self.priority, self.addresses.len() as u8];
        packet.extend_from_slice(&(self.max_advert_int_cs & 0x0fff).to_be_bytes());
        packet.extend_from_slice(&[0, 0]);
        for address in &self.addresses {
            match address {
                IpAddr::V4(v4) => packet.extend_from_slice(&v4.octets()),
                IpAddr::V6(v6) => packet.extend_from_slice(&v6.octets()),
            }
        }
        let check = checksum(&packet, src, dst);
        packet[6..8].copy_from_slice(&check.to_ne_bytes());
        packet
    }

    /// Parses and checks a payload received from `src` to `dst` (RFC 5798 §7.1).
    pub fn decode(payload: &[u8], src: IpAddr, dst: IpAddr) -> Result<Self, VrrpError> {
        if payload.len() < HEADER {
            return Err(VrrpError::Short(payload.len()));
        }
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(VrrpError::Family);
        }
        let (version, kind) = (payload[0] >> 4, payload[0] & 0x0f);
        if version != 3 {
            return Err(VrrpError::Version(version));
        }
        if kind != 1 {
            return Err(VrrpError::Type(kind));
        }
        let count = payload[3];
        let size = if src.is_ipv4() { 4 } else { 16 };
        let need = HEADER + usize::from(count) * size;
        if payload.len() < need {
            return Err(VrrpError::Length { count, need, have: payload.len() });
        }
        // The checksum covers the whole VRRP message as received.
        if fold(add_words(pseudo_sum(src, dst, payload.len()), payload)) != 0xffff {
            return Err(VrrpError::Checksum);
        }
        let addresses = payload[HEADER..need]
            .chunks(size)
            .map(|c| match size {
                4 => IpAddr::from(<[u8; 4]>::try_from(c).expect("4 bytes")),
                _ => IpAddr::from(<[u8; 16]>::try_from(c).expect("16 bytes")),
            })
            .collect();
        Ok(Self {
            vrid: payload[1],
            priority: payload[2],
            max_advert_int_cs: u16::from_be_bytes([payload[4], payload[5]]) & 0x0fff,
            addresses,
        })
    }
}

/// The pseudo-header sum: IPv4's (RFC 768 layout) or IPv6's (RFC 8200 §8.1), protocol 112.
fn pseudo_sum(src: IpAddr, dst: IpAddr, length: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, PROTOCOL]);
            pseudo.extend_from_slice(&(length as u16).to_be_bytes());
        }
        (s, d) => {
            let octets = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            pseudo.extend_from_slice(&octets(s));
            pseudo.extend_from_slice(&octets(d));
            pseudo.extend_from_slice(&(length as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, PROTOCOL]);
        }
    }
    add_words(0, &pseudo)
}

fn checksum(packet: &[u8], src: IpAddr, dst: IpAddr) -> u16 {
    !fold(add_words(pseudo_sum(src, dst, packet.len()), packet))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv4_advertisement_matches_the_bytes_worked_out_by_hand() {
        let advert =
            Advertisement { vrid: 51, priority: 100, max_advert_int_cs: 100, addresses: vec![v4("10.0.0.100")] };
        let bytes = advert.encode(v4("10.0.0.2"), v4("224.0.0.18"));
        // 0x31 0x33 0x64 0x01 | 0x00 0x64 | checksum | 10.0.0.100
        assert_eq!(&bytes[..6], &[0x31, 51, 100, 1, 0x00, 0x64]);
        assert_eq!(&bytes[8..], &[10, 0, 0, 100]);
        // By hand: pseudo 0a00+0002+e000+0012+0070+000c, message 3133+6401+0064+0a00+0064.
        let words: u32 =
            [0x0a00, 0x0002, 0xe000, 0x0012, 0x0070, 0x000c, 0x3133, 0x6401, 0x0064, 0x0a00, 0x0064].iter().sum();
        let folded = (words & 0xffff) + (words >> 16);
        assert_eq!(u16::from_be_bytes([bytes[6], bytes[7]]), !(folded as u16));
        assert_eq!(Advertisement::decode(&bytes, v4("10.0.0.2"), v4("224.0.0.18")), Ok(advert));
    }

    #[test]
    fn an_ipv6_advertisement_round_trips() {
        let (src, dst) = (v4("fe80::1"), v4("ff02::12"));
        let advert = Advertisement {
            vrid: 7,
            priority: 254,
            max_advert_int_cs: 4095,
            addresses: vec![v4("fd00::100"), v4("fd00::3")],
        };
        let bytes = advert.encode(src, dst);
        assert_eq!(bytes.len(), 8 + 32);
        assert_eq!(Advertisement::decode(&bytes, src, dst), Ok(advert));
    }

    #[test]
    fn every_broken_advertisement_is_refused_with_its_reason() {
        let (src, dst) = (v4("10.0.0.2"), v4("224.0.0.18"));
        let good = Advertisement { vrid: 1, priority: 1, max_advert_int_cs: 50, addresses: vec![v4("10.0.0.100")] }
            .encode(src, dst);
        assert_eq!(Advertisement::decode(&good[..7], src, dst), Err(VrrpError::Short(7)));
        let mut v2 = good.clone();
        v2[0] = 0x21;
        assert_eq!(Advertisement::decode(&v2, src, dst), Err(VrrpError::Version(2)));
        let mut kind = good.clone();
        kind[0] = 0x32;
        assert_eq!(Advertisement::decode(&kind, src, dst), Err(VrrpError::Type(2)));
        let mut count = good.clone();
        count[3] = 2;
        assert_eq!(Advertisement::decode(&count, src, dst), Err(VrrpError::Length { count: 2, need: 16, have: 12 }));
        let mut flipped = good.clone();
        flipped[11] ^= 1;
        assert_eq!(Advertisement::decode(&flipped, src, dst), Err(VrrpError::Checksum));
        // The pseudo-header is covered: the same bytes from another source do not check.
        assert_eq!(Advertisement::decode(&good, v4("10.0.0.9"), dst), Err(VrrpError::Checksum));
        assert_eq!(Advertisement::decode(&good, src, v4("ff02::12")), Err(VrrpError::Family));
    }
}
