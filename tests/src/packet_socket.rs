//! Raw Ethernet frames in and out of one interface (AF_PACKET): what tests send that no socket
//! would (tunnelled packets, as a load balancer sends them) and what they watch for on the wire.
//!
//! Open it on a thread inside the namespace ([`crate::netns::Netns::enter`]); it stays bound to
//! that namespace's interface wherever it is used afterwards.

use anyhow::{Context, Result, bail};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const ETH_P_ALL: u16 = 0x0003;
/// `sll_pkttype` of a frame this host sent.
const PACKET_OUTGOING: u8 = 4;
/// However long it waits, a receive looks at no more frames than this.
const MAX_FRAMES: usize = 100_000;

pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// A socket on `interface` of the calling thread's network namespace.
    pub fn open(interface: &str) -> Result<Self> {
        let name = CString::new(interface)?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            bail!("no interface {interface} here");
        }
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ALL.to_be()) as i32) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut addr = sockaddr_ll(ifindex);
        addr.sll_protocol = ETH_P_ALL.to_be();
        // SAFETY: bind with a sockaddr_ll of the right size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("binding to {interface}"));
        }
        Ok(Self { fd, ifindex })
    }

    /// A socket on `interface` that only sends (bound to protocol 0, it receives nothing) and
    /// hands its frames straight to the driver, past the qdisc (`PACKET_QDISC_BYPASS`): a frame
    /// the device cannot take is refused at once instead of queued. For generators.
    pub fn open_sender(interface: &str) -> Result<Self> {
        let name = CString::new(interface)?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            bail!("no interface {interface} here");
        }
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr_ll(ifindex);
        // SAFETY: bind with a sockaddr_ll of the right size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("binding to {interface}"));
        }
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with an int.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &on as *const libc::c_int as *const libc::c_void,
                size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
        }
        Ok(Self { fd, ifindex })
    }

    /// Sends `frames` (Ethernet, all to the destination MAC of the first, of the protocol its
    /// ethertype names) with one `sendmmsg`; returns how many the device took, in order. A
    /// device that refuses even the first (`ENOBUFS`, `EAGAIN`: its peer's queue is full)
    /// gives 0, not an error.
    pub fn send_batch(&self, frames: &[&[u8]]) -> Result<usize> {
        let Some(first) = frames.first() else { return Ok(0) };
        let mut addr = sockaddr_ll(self.ifindex);
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&first[..6]);
        addr.sll_protocol = u16::from_ne_bytes([first[12], first[13]]);
        let addr_ptr = &mut addr as *mut libc::sockaddr_ll as *mut libc::c_void;
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: all-zero is a valid msghdr; the fields that matter are set below.
                let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
                header.msg_name = addr_ptr;
                header.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
                header.msg_iov = iov;
                header.msg_iovlen = 1;
                libc::mmsghdr { msg_hdr: header, msg_len: 0 }
            })
            .collect();
        // SAFETY: every message points at a frame, an iovec and the address, all alive until
        // the call returns.
        let sent = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), messages.as_mut_ptr(), messages.len() as u32, 0) };
        if sent < 0 {
            let error = std::io::Error::last_os_error();
            if matches!(error.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                return Ok(0);
            }
            return Err(error).context("sendmmsg on a packet socket");
        }
        Ok(sent as usize)
    }

    /// Sends one Ethernet frame out of the interface as it is.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let mut addr = sockaddr_ll(self.ifindex);
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and address outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent != frame.len() as isize {
            return Err(std::io::Error::last_os_error()).context("sending a raw frame");
        }
        Ok(())
    }

    /// The first frame arriving on the interface (sent by others) for which `wanted` holds,
    /// within `timeout`; None when none came.
    pub fn receive(&self, timeout: Duration, mut wanted: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65536];
        for _ in 0..MAX_FRAMES {
            let left = deadline.checked_duration_since(Instant::now())?;
            let wait = libc::timeval {
                tv_sec: left.as_secs() as libc::time_t,
                tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
            };
            // SAFETY: setsockopt with a timeval.
            unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &wait as *const libc::timeval as *const libc::c_void,
                    size_of::<libc::timeval>() as u32,
                )
            };
            let mut from = sockaddr_ll(0);
            let mut from_len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: the buffer and address are ours and large enough.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut from_len,
                )
            };
            if n < 0 {
                // Timed out (or interrupted): the deadline decides.
                continue;
            }
            let frame = &buffer[..n as usize];
            if from.sll_pkttype != PACKET_OUTGOING && wanted(frame) {
                return Some(frame.to_vec());
            }
        }
        None
    }
}

fn sockaddr_ll(ifindex: i32) -> libc::sockaddr_ll {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex;
    addr
}
