//! VRRP on the wire (RFC 5798 §5.1): IP protocol 112 to 224.0.0.18 / ff02::12 with TTL / hop
//! limit 255, on one interface. Receivers drop anything that arrived with another TTL: such a
//! packet crossed a router and cannot come from our segment.

use super::takeover::HeldAddress;
use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

pub const IPPROTO_VRRP: i32 = 112;
pub const GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
pub const GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);

/// One received VRRP packet: its payload, source, destination and TTL / hop limit.
pub struct Received {
    pub payload: Vec<u8>,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub ttl: u8,
}

/// A VRRP endpoint for one address family on one interface.
pub struct VrrpSocket {
    /// Sends from our primary (IPv4) or link-local (IPv6) address: the source takes part in
    /// the checksum and breaks priority ties, so it must not be left to the kernel's choice.
    send: Socket,
    /// Receives the group; unbound, since a bound raw socket would only see its own address.
    receive: Socket,
    pub source: IpAddr,
    pub group: IpAddr,
    scope: u32,
}

impl VrrpSocket {
    /// `source` is our primary IPv4 address or our IPv6 link-local address on `interface`.
    pub fn open(interface: &str, source: IpAddr) -> Result<Self> {
        let ifindex = ifindex(interface)?;
        let protocol = Some(Protocol::from(IPPROTO_VRRP));
        let domain = if source.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let send = Socket::new(domain, Type::RAW, protocol).context("opening a raw VRRP socket")?;
        let receive = Socket::new(domain, Type::RAW, protocol).context("opening a raw VRRP socket")?;
        for socket in [&send, &receive] {
            socket.bind_device(Some(interface.as_bytes())).with_context(|| format!("binding to {interface}"))?;
        }
        let group = match source {
            IpAddr::V4(v4) => {
                send.set_multicast_ttl_v4(255)?;
                send.set_multicast_loop_v4(false)?;
                send.set_multicast_if_v4(&v4)?;
                send.bind(&SockAddr::from(SocketAddrV4::new(v4, 0))).with_context(|| format!("binding to {v4}"))?;
                receive
                    .join_multicast_v4_n(&GROUP_V4, &socket2::InterfaceIndexOrAddress::Index(ifindex))
                    .context("joining 224.0.0.18")?;
                IpAddr::V4(GROUP_V4)
            }
            IpAddr::V6(v6) => {
                send.set_multicast_hops_v6(255)?;
                send.set_multicast_loop_v6(false)?;
                send.set_multicast_if_v6(ifindex)?;
                send.bind(&SockAddr::from(SocketAddrV6::new(v6, 0, 0, ifindex)))
                    .with_context(|| format!("binding to {v6}%{interface}"))?;
                receive.join_multicast_v6(&GROUP_V6, ifindex).context("joining ff02::12")?;
                receive.set_recv_hoplimit_v6(true)?;
                IpAddr::V6(GROUP_V6)
            }
        };
        Ok(Self { send, receive, source, group, scope: ifindex })
    }

    pub fn send(&self, payload: &[u8]) -> Result<()> {
        let to = match self.group {
            IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, 0)),
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, 0, 0, self.scope)),
        };
        self.send.send_to(payload, &to.into()).context("sending a VRRP advertisement")?;
        Ok(())
    }

    /// Waits up to `timeout` for one packet (None when the time is up).
    pub fn receive(&self, timeout: Duration) -> Result<Option<Received>> {
        self.receive.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        let mut control = [MaybeUninit::<u8>::uninit(); 64];
        let mut from = unsafe { SockAddr::try_init(|_, _| Ok(())) }?.1;
        let mut bufs = [socket2::MaybeUninitSlice::new(&mut buf)];
        let mut message =
            socket2::MsgHdrMut::new().with_addr(&mut from).with_buffers(&mut bufs).with_control(&mut control);
        let length = match self.receive.recvmsg(&mut message, 0) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Ok(None);
            }
            Err(e) => return Err(e).context("receiving VRRP"),
        };
        let control_len = message.control_len();
        // SAFETY: the kernel initialised the first `length` bytes and `control_len` control bytes.
        let data: Vec<u8> = buf[..length].iter().map(|b| unsafe { b.assume_init() }).collect();
        let control: Vec<u8> = control[..control_len].iter().map(|b| unsafe { b.assume_init() }).collect();
        match self.group {
            // IPv4 raw sockets see the IP header.
            IpAddr::V4(_) => {
                if data.len() < 20 {
                    bail!("a {length}-byte IPv4 packet is shorter than its header");
                }
                let header = usize::from(data[0] & 0x0f) * 4;
                if data.len() < header {
                    bail!("IPv4 header length {header} beyond the packet");
                }
                Ok(Some(Received {
                    ttl: data[8],
                    source: IpAddr::from(<[u8; 4]>::try_from(&data[12..16]).expect("4 bytes")),
                    destination: IpAddr::from(<[u8; 4]>::try_from(&data[16..20]).expect("4 bytes")),
                    payload: data[header..].to_vec(),
                }))
            }
            IpAddr::V6(_) => {
                let source = from.as_socket().map(|s| s.ip()).context("VRRP packet without an IPv6 source")?;
                Ok(Some(Received {
                    ttl: hop_limit(&control).context("no hop limit with the packet")?,
                    source,
                    destination: self.group,
                    payload: data,
                }))
            }
        }
    }
}

/// The IPV6_HOPLIMIT value from a control-message buffer.
fn hop_limit(control: &[u8]) -> Option<u8> {
    let header = std::mem::size_of::<libc::cmsghdr>();
    let mut at = 0;
    while at + header <= control.len() {
        // SAFETY: read_unaligned of a plain struct within bounds.
        let cmsg: libc::cmsghdr = unsafe { std::ptr::read_unaligned(control[at..].as_ptr().cast()) };
        let len = cmsg.cmsg_len;
        if len < header {
            return None;
        }
        if cmsg.cmsg_level == libc::IPPROTO_IPV6 && cmsg.cmsg_type == libc::IPV6_HOPLIMIT {
            let value = control.get(at + header..at + header + 4)?;
            return Some(i32::from_ne_bytes(value.try_into().ok()?) as u8);
        }
        at += len.div_ceil(std::mem::align_of::<usize>()) * std::mem::align_of::<usize>();
    }
    None
}

pub fn ifindex(interface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(interface).context("interface name")?;
    // SAFETY: a NUL-terminated name; returns 0 when there is no such interface.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {interface}");
    }
    Ok(index)
}

/// Our VRRP source on `interface` for one family: the first IPv4 address not in `owned`, or the
/// IPv6 link-local address once it has passed duplicate address detection (after a link comes
/// up, that takes 1-2 s; until then the kernel refuses to bind or send from it).
pub fn primary_address(interface: &str, ipv6: bool, owned: &[IpAddr]) -> Result<IpAddr> {
    choose_source(interface, &super::takeover::held_addresses(interface)?, ipv6, owned)
}

fn choose_source(interface: &str, held: &[HeldAddress], ipv6: bool, owned: &[IpAddr]) -> Result<IpAddr> {
    let candidates: Vec<_> = held
        .iter()
        .filter(|h| match h.address {
            IpAddr::V4(_) => !ipv6 && !owned.contains(&h.address),
            IpAddr::V6(v6) => ipv6 && v6.segments()[0] & 0xffc0 == 0xfe80,
        })
        .collect();
    if let Some(usable) = candidates.iter().find(|h| !h.tentative && !h.dad_failed) {
        return Ok(usable.address);
    }
    if let Some(unusable) = candidates.first() {
        let why = if unusable.dad_failed {
            "failed duplicate address detection: another node on the link uses it"
        } else {
            "has not passed duplicate address detection yet"
        };
        bail!("{interface}'s IPv6 link-local address {} {why}", unusable.address);
    }
    let what = if ipv6 { "IPv6 link-local address" } else { "IPv4 address of its own" };
    bail!("{interface} has no {what} to send VRRP advertisements from")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(address: &str, tentative: bool, dad_failed: bool) -> HeldAddress {
        HeldAddress { address: address.parse().unwrap(), tentative, dad_failed }
    }

    #[test]
    fn the_source_is_our_own_address_never_an_owned_one_and_never_a_tentative_one() {
        let owned: Vec<IpAddr> = vec!["10.0.0.100".parse().unwrap()];
        let addresses = [
            held("10.0.0.100", false, false),
            held("10.0.0.2", false, false),
            held("fd00::2", false, false),
            held("fe80::1", true, false),
        ];
        assert_eq!(choose_source("eth0", &addresses, false, &owned).unwrap().to_string(), "10.0.0.2");
        let error = choose_source("eth0", &addresses, true, &owned).unwrap_err().to_string();
        assert_eq!(error, "eth0's IPv6 link-local address fe80::1 has not passed duplicate address detection yet");

        let passed = [held("fd00::2", false, false), held("fe80::1", false, false)];
        assert_eq!(choose_source("eth0", &passed, true, &owned).unwrap().to_string(), "fe80::1");
        let duplicate = [held("fe80::1", false, true)];
        let error = choose_source("eth0", &duplicate, true, &owned).unwrap_err().to_string();
        assert!(error.contains("failed duplicate address detection"), "{error}");

        let only_owned = [held("10.0.0.100", false, false), held("fd00::2", false, false)];
        let error = choose_source("eth0", &only_owned, false, &owned).unwrap_err().to_string();
        assert_eq!(error, "eth0 has no IPv4 address of its own to send VRRP advertisements from");
        let error = choose_source("eth0", &only_owned, true, &owned).unwrap_err().to_string();
        assert_eq!(error, "eth0 has no IPv6 link-local address to send VRRP advertisements from");
    }
}
