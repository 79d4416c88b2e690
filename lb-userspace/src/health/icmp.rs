//! ICMP echo for every ICMP check of the engine: one socket per family (and one per mark and
//! source address for checks via a VIP), opened on first use, and a table from sequence number
//! to the checker waiting for that reply.
//!
//! Raw sockets (the daemon has CAP_NET_RAW) get a kernel filter that lets through only echo
//! replies carrying the engine's identifier: the engine then reads its own replies and nothing
//! else of the host's ICMP traffic (nor, on loopback, its own echo requests). Without
//! CAP_NET_RAW the kernel's ping sockets (`net.ipv4.ping_group_range`) do the same.

use super::probe::{Failure, ICMP_TOKENS, Step, Via, as_uninit, errno};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

const PAYLOAD: &[u8] = b"lb health check";
const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
/// `SOL_RAW`/`ICMP_FILTER` (linux/icmp.h) and `ICMP6_FILTER` (linux/icmpv6.h).
const SOL_RAW: libc::c_int = 255;
const ICMP_FILTER: libc::c_int = 1;
const ICMP6_FILTER: libc::c_int = 1;

/// What a checker holds of the ICMP sockets: the one its echoes leave by, once it has it, and
/// the sequence number of the echo it waits for.
#[derive(Default)]
pub struct IcmpProbe {
    socket: Option<usize>,
    waiting: Option<u16>,
}

struct EchoSocket {
    socket: Socket,
    /// A raw socket (its IPv4 replies carry the IP header), or a ping socket.
    raw: bool,
}

pub struct EchoSockets {
    sockets: Vec<Option<EchoSocket>>,
    /// The engine's own sockets for IPv4 and IPv6, once opened (or the reason they are not).
    plain: [Option<Result<usize, Failure>>; 2],
    /// Sockets of checks via a VIP, by (mark, source), with the number of checkers using each.
    marked: HashMap<(u32, IpAddr), (usize, usize)>,
    /// By sequence number: 1 + the slot of the checker waiting for that reply, 0 for none.
    waiting: Box<[u32]>,
    next_seq: u16,
    ident: u16,
    packet: [u8; 8 + PAYLOAD.len()],
    buf: [u8; 512],
}

impl EchoSockets {
    pub fn new() -> Self {
        Self {
            sockets: Vec::new(),
            plain: [None, None],
            marked: HashMap::new(),
            waiting: vec![0; 1 << 16].into_boxed_slice(),
            next_seq: 0,
            // Another engine on the host (another daemon, a test) has another identifier.
            ident: rand::random(),
            packet: [0; 8 + PAYLOAD.len()],
            buf: [0; 512],
        }
    }

    /// Sends one echo request to `ip` for the checker in `slot`.
    pub fn start(
        &mut self,
        probe: &mut IcmpProbe,
        registry: &Registry,
        slot: u32,
        ip: IpAddr,
        via: Option<Via>,
    ) -> Step {
        let index = match probe.socket {
            Some(index) => index,
            None => match self.acquire(registry, ip, via) {
                Ok(index) => *probe.socket.insert(index),
                Err(failure) => return Step::Done(Err(failure)),
            },
        };
        let Some(seq) = self.take_seq(slot) else { return Step::Done(Err(Failure::EchoSend(libc::EAGAIN))) };
        let Some(socket) = &self.sockets[index] else { return Step::Done(Err(Failure::NoIcmpSocket)) };
        let v6 = ip.is_ipv6();
        self.packet[0] = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
        self.packet[1] = 0;
        self.packet[2..4].fill(0);
        self.packet[4..6].copy_from_slice(&self.ident.to_be_bytes());
        self.packet[6..8].copy_from_slice(&seq.to_be_bytes());
        self.packet[8..].copy_from_slice(PAYLOAD);
        if !v6 {
            // ICMPv6 checksums are the kernel's (they cover addresses it picks).
            let sum = checksum(&self.packet);
            self.packet[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        match socket.socket.send_to(&self.packet, &SockAddr::from(SocketAddr::new(ip, 0))) {
            Ok(_) => {
                probe.waiting = Some(seq);
                Step::Pending
            }
            Err(error) => {
                self.waiting[seq as usize] = 0;
                Step::Done(Err(Failure::EchoSend(errno(&error))))
            }
        }
    }

    /// The checker gives up waiting (its timeout passed).
    pub fn cancel(&mut self, probe: &mut IcmpProbe) {
        if let Some(seq) = probe.waiting.take() {
            self.waiting[seq as usize] = 0;
        }
    }

    /// The reply `seq` reached the checker waiting for it.
    pub fn answered(&mut self, probe: &mut IcmpProbe, seq: u16) -> bool {
        if probe.waiting != Some(seq) {
            return false;
        }
        self.cancel(probe);
        true
    }

    /// The checker is gone: forget its echo and let go of its marked socket.
    pub fn release(&mut self, probe: &mut IcmpProbe, via: Option<Via>) {
        self.cancel(probe);
        let (Some(index), Some(Via { mark, source: Some(source) })) = (probe.socket.take(), via) else { return };
        if let Some((marked, users)) = self.marked.get_mut(&(mark, source))
            && *marked == index
        {
            *users -= 1;
            if *users == 0 {
                self.marked.remove(&(mark, source));
                self.sockets[index] = None;
            }
        }
    }

    /// Reads every datagram queued on socket `index`; each echo reply that a checker waits for
    /// goes to `replies` as (slot, source, sequence number).
    pub fn receive(&mut self, index: usize, replies: &mut Vec<(u32, IpAddr, u16)>) {
        let Some(Some(socket)) = self.sockets.get(index) else { return };
        loop {
            let (len, from) = match socket.socket.recv_from(as_uninit(&mut self.buf)) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Would block (all read), or an error queued for the socket: nothing more now.
                Err(_) => return,
            };
            let Some((source, ident, seq)) = parse_reply(&self.buf[..len.min(self.buf.len())], socket.raw, &from)
            else {
                continue;
            };
            // A ping socket's identifier is the kernel's, and it only passes our own replies.
            if socket.raw && ident != self.ident {
                continue;
            }
            let waiting = self.waiting[seq as usize];
            if waiting != 0 {
                replies.push((waiting - 1, source, seq));
            }
        }
    }

    fn take_seq(&mut self, slot: u32) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            if self.waiting[seq as usize] == 0 {
                self.waiting[seq as usize] = slot + 1;
                return Some(seq);
            }
        }
        None
    }

    fn acquire(&mut self, registry: &Registry, ip: IpAddr, via: Option<Via>) -> Result<usize, Failure> {
        let Some(via) = via else {
            let family = usize::from(ip.is_ipv6());
            if let Some(opened) = self.plain[family] {
                return opened;
            }
            let opened = self.open(registry, ip.is_ipv6(), None).map_err(|_| Failure::NoIcmpSocket);
            self.plain[family] = Some(opened);
            return opened;
        };
        let source = via.source.ok_or(Failure::NoSource)?;
        if let Some((index, users)) = self.marked.get_mut(&(via.mark, source)) {
            *users += 1;
            return Ok(*index);
        }
        let index = self.open(registry, ip.is_ipv6(), Some((via.mark, source)))?;
        self.marked.insert((via.mark, source), (index, 1));
        Ok(index)
    }

    fn open(&mut self, registry: &Registry, v6: bool, marked: Option<(u32, IpAddr)>) -> Result<usize, Failure> {
        let (domain, protocol) = if v6 { (Domain::IPV6, Protocol::ICMPV6) } else { (Domain::IPV4, Protocol::ICMPV4) };
        let open = |kind: Type| Socket::new(domain, kind.nonblocking().cloexec(), Some(protocol));
        let (socket, raw) = match open(Type::RAW) {
            Ok(socket) => (socket, true),
            Err(raw_error) => (open(Type::DGRAM).map_err(|_| Failure::IcmpSocket(errno(&raw_error)))?, false),
        };
        if raw {
            // Without the filters the socket still works (every reply is checked anyway), it only
            // reads more.
            let _ =
                if v6 { pass_only_echo_replies_v6(&socket) } else { pass_only_echo_replies_v4(&socket, self.ident) };
        }
        if let Some((mark, source)) = marked {
            socket.set_mark(mark).map_err(|e| Failure::IcmpMark(errno(&e)))?;
            socket.bind(&SocketAddr::new(source, 0).into()).map_err(|e| Failure::IcmpSocket(errno(&e)))?;
        }
        let index = self.sockets.iter().position(Option::is_none).unwrap_or(self.sockets.len());
        registry
            .register(&mut SourceFd(&socket.as_raw_fd()), Token(ICMP_TOKENS + index), Interest::READABLE)
            .map_err(|e| Failure::IcmpSocket(errno(&e)))?;
        if index == self.sockets.len() {
            self.sockets.push(None);
        }
        self.sockets[index] = Some(EchoSocket { socket, raw });
        Ok(index)
    }
}

/// The source, identifier and sequence number of an echo reply; None for anything else.
fn parse_reply(packet: &[u8], raw: bool, from: &SockAddr) -> Option<(IpAddr, u16, u16)> {
    let from = from.as_socket()?.ip();
    let (icmp, source, reply) = match from {
        IpAddr::V4(_) if raw => {
            // A raw IPv4 socket hands over the IP header too.
            let header = usize::from(*packet.first()? & 0x0f) * 4;
            let source = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
            (packet.get(header..)?, IpAddr::V4(source), ECHO_REPLY_V4)
        }
        IpAddr::V4(_) => (packet, from, ECHO_REPLY_V4),
        IpAddr::V6(_) => (packet, from, ECHO_REPLY_V6),
    };
    if icmp.len() < 8 || icmp[0] != reply || icmp[1] != 0 {
        return None;
    }
    Some((source, u16::from_be_bytes([icmp[4], icmp[5]]), u16::from_be_bytes([icmp[6], icmp[7]])))
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Raw IPv4: the kernel's type filter drops every ICMP message but echo replies before it copies
/// anything for the socket, then a socket filter keeps only the replies with our identifier.
fn pass_only_echo_replies_v4(socket: &Socket, ident: u16) -> io::Result<()> {
    let blocked: u32 = !(1 << ECHO_REPLY_V4);
    setsockopt(socket, SOL_RAW, ICMP_FILTER, &blocked)?;
    // Classic BPF over the IP packet: X = IP header length; accept if the ICMP type is an echo
    // reply and the identifier ours.
    const LDX_MSH: u16 = 0xb1; // ldx 4*([k]&0xf)
    const LDB_IND: u16 = 0x50; // ldb [x+k]
    const LDH_IND: u16 = 0x48; // ldh [x+k]
    const JEQ: u16 = 0x15; // jeq #k, jt, jf
    const RET: u16 = 0x06; // ret #k
    let program = [
        SockFilter::new(LDX_MSH, 0, 0, 0),
        SockFilter::new(LDB_IND, 0, 0, 0),
        SockFilter::new(JEQ, 0, 3, u32::from(ECHO_REPLY_V4)),
        SockFilter::new(LDH_IND, 0, 0, 4),
        SockFilter::new(JEQ, 0, 1, u32::from(ident)),
        SockFilter::new(RET, 0, 0, u32::MAX),
        SockFilter::new(RET, 0, 0, 0),
    ];
    socket.attach_filter(&program)
}

/// Raw ICMPv6: the kernel's type filter passes echo replies only.
fn pass_only_echo_replies_v6(socket: &Socket) -> io::Result<()> {
    let mut blocked = [u32::MAX; 8];
    blocked[usize::from(ECHO_REPLY_V6 >> 5)] &= !(1 << (ECHO_REPLY_V6 & 31));
    setsockopt(socket, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &blocked)
}

fn setsockopt<T>(socket: &Socket, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: a valid socket, and a value of the size given that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_of_a_packet_with_its_checksum_is_zero() {
        let mut packet = [ECHO_REQUEST_V4, 0, 0, 0, 0x12, 0x34, 0, 7, b'l', b'b', b'!'];
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(checksum(&packet), 0);
    }

    #[test]
    fn replies_are_read_with_and_without_the_ip_header() {
        let from = SockAddr::from(SocketAddr::new("10.1.2.3".parse().unwrap(), 0));
        let icmp = [ECHO_REPLY_V4, 0, 0, 0, 0xab, 0xcd, 0x00, 0x05];
        let mut with_header = vec![0x46, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 1, 2, 3, 10, 0, 0, 1, 0, 0, 0, 0];
        with_header.extend_from_slice(&icmp);
        let expected = Some(("10.1.2.3".parse().unwrap(), 0xabcd, 5));
        assert_eq!(parse_reply(&with_header, true, &from), expected, "a 24-byte header (options) is skipped");
        assert_eq!(parse_reply(&icmp, false, &from), expected);
        let request = [ECHO_REQUEST_V4, 0, 0, 0, 0xab, 0xcd, 0x00, 0x05];
        assert_eq!(parse_reply(&request, false, &from), None, "our own request on loopback is no reply");
    }
}
