//! A SYN flood from spoofed sources: TCP SYNs to one address and port, each from a random
//! address of a prefix and a random source port, sent by one thread as fast as the device takes
//! them (or at a set rate).
//!
//! One frame is built once ([`Frame::tcp`], checksums included); every frame sent is a copy with
//! the source address and port replaced and both checksums updated incrementally, so a frame
//! costs a few nanoseconds of the generator's time and the rate is the path's, not ours.

use crate::packet_socket::PacketSocket;
use anyhow::{Result, bail};
use ipnet::Ipv4Net;
use lb_common::csum::{replace_bytes, replace_u16};
use lb_common::packet::build::Frame;
use lb_common::packet::{ETH_HLEN, ipv4, l4};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::net::{IpAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The sources a flood spoofs: the benchmarking range (RFC 2544), never routed anywhere.
pub const SPOOFED_PREFIX: &str = "198.18.0.0/15";

/// Frames handed to the kernel per `sendmmsg`.
const BATCH: usize = 256;

/// Lowest source port a spoofed SYN comes from (as clients' ephemeral ports do).
const FIRST_PORT: u16 = 1024;

/// SYNs to one destination from random sources of a prefix.
pub struct SpoofedSyns {
    template: Vec<u8>,
    prefix: Ipv4Net,
    rng: SmallRng,
}

impl SpoofedSyns {
    /// SYNs from `src_mac` to `dst_mac`, for `dst`, from addresses of `prefix`; `seed` makes the
    /// sequence of sources repeatable.
    pub fn new(src_mac: [u8; 6], dst_mac: [u8; 6], prefix: Ipv4Net, dst: SocketAddrV4, seed: u64) -> Self {
        let frame = Frame {
            src_mac,
            dst_mac,
            ..Frame::tcp(IpAddr::V4(prefix.network()), FIRST_PORT, IpAddr::V4(*dst.ip()), dst.port())
        };
        Self { template: frame.bytes(), prefix, rng: SmallRng::seed_from_u64(seed) }
    }

    pub fn frame_len(&self) -> usize {
        self.template.len()
    }

    /// Writes the next SYN into `frame` (exactly [`SpoofedSyns::frame_len`] bytes).
    pub fn next_into(&mut self, frame: &mut [u8]) {
        frame.copy_from_slice(&self.template);
        let hosts = !u32::from(self.prefix.netmask());
        let src = (u32::from(self.prefix.network()) | (self.rng.random::<u32>() & hosts)).to_be_bytes();
        let sport = FIRST_PORT + (self.rng.random::<u32>() % (65536 - FIRST_PORT as u32)) as u16;
        let ip = ETH_HLEN;
        let tcp = ETH_HLEN + (frame[ip + ipv4::VERSION_IHL] & 0x0f) as usize * 4;
        let old_src: [u8; 4] = frame[ip + ipv4::SRC..ip + ipv4::SRC + 4].try_into().expect("4 bytes");
        frame[ip + ipv4::SRC..ip + ipv4::SRC + 4].copy_from_slice(&src);
        // Checksum fields and words are read and written in native order (lb_common::csum).
        let word = |bytes: &[u8], at: usize| u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        let ip_check = replace_bytes(word(frame, ip + ipv4::CHECK), &old_src, &src);
        frame[ip + ipv4::CHECK..ip + ipv4::CHECK + 2].copy_from_slice(&ip_check.to_ne_bytes());
        // The TCP checksum covers the source address (pseudo-header) and the source port.
        let old_sport = word(frame, tcp + l4::SPORT);
        frame[tcp + l4::SPORT..tcp + l4::SPORT + 2].copy_from_slice(&sport.to_be_bytes());
        let tcp_check = replace_bytes(word(frame, tcp + l4::TCP_CHECK), &old_src, &src);
        let tcp_check = replace_u16(tcp_check, old_sport, word(frame, tcp + l4::SPORT));
        frame[tcp + l4::TCP_CHECK..tcp + l4::TCP_CHECK + 2].copy_from_slice(&tcp_check.to_ne_bytes());
    }
}

/// When a flood stops: the first bound reached.
#[derive(Clone, Copy, Debug)]
pub struct FloodLimits {
    pub duration: Duration,
    pub max_frames: u64,
    /// Frames per second to pace at; 0: as fast as the device takes them.
    pub max_pps: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FloodReport {
    /// Frames the device took.
    pub sent: u64,
    /// Frames the device refused (its peer's queue was full); not counted in `sent`.
    pub refused: u64,
    pub seconds: f64,
}

impl FloodReport {
    pub fn pps(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-9)
    }
}

/// Sends `syns` through `socket` until `limits` or `stop` end it.
pub fn flood(
    socket: &PacketSocket,
    syns: &mut SpoofedSyns,
    limits: FloodLimits,
    stop: &AtomicBool,
) -> Result<FloodReport> {
    if limits.max_frames == 0 {
        bail!("a flood of 0 frames");
    }
    let mut buffers = vec![vec![0u8; syns.frame_len()]; BATCH];
    let started = Instant::now();
    let deadline = started + limits.duration;
    let mut report = FloodReport::default();
    while report.sent < limits.max_frames && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if limits.max_pps > 0 {
            let due = started + Duration::from_secs_f64(report.sent as f64 / limits.max_pps as f64);
            if due > now {
                std::thread::sleep((due - now).min(Duration::from_millis(10)));
                continue;
            }
        }
        let want = BATCH.min((limits.max_frames - report.sent) as usize);
        for buffer in &mut buffers[..want] {
            syns.next_into(buffer);
        }
        let frames: Vec<&[u8]> = buffers[..want].iter().map(Vec::as_slice).collect();
        let sent = socket.send_batch(&frames)?;
        report.sent += sent as u64;
        if sent < want {
            // The frame after the last one taken was refused; the rest were not tried.
            report.refused += 1;
            std::thread::yield_now();
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::packet::build::{TCP_SYN, verify_checksums};
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    #[test]
    fn spoofed_syns_come_from_the_prefix_with_valid_checksums() {
        let prefix: Ipv4Net = SPOOFED_PREFIX.parse().unwrap();
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
        let mut syns = SpoofedSyns::new([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], prefix, dst, 7);
        let mut frame = vec![0u8; syns.frame_len()];
        let mut sources = HashSet::new();
        for _ in 0..10_000 {
            syns.next_into(&mut frame);
            verify_checksums(&frame).unwrap();
            let ip = &frame[ETH_HLEN..];
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            assert!(prefix.contains(&src), "{src} outside {prefix}");
            assert_eq!(&ip[16..20], &dst.ip().octets());
            let tcp = &ip[20..];
            let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            assert!(sport >= FIRST_PORT);
            assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 80);
            assert_eq!(tcp[l4::TCP_FLAGS], TCP_SYN);
            assert_eq!(&frame[..6], &[2, 0, 0, 0, 0, 2]);
            sources.insert((src, sport));
        }
        assert!(sources.len() > 9_990, "sources repeat: {} distinct of 10,000", sources.len());
    }
}
