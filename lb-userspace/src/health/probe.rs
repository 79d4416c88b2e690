//! What every probe shares: why a check failed, kept as a small value on the hot path and put
//! into the words operators read in logs ("timeout after 500ms", "status 503", ...) only when
//! someone reads it; and the TCP socket steps of the TCP and HTTP probes.

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// How a check via a VIP leaves: the socket mark the load balancer's `lb_hc` program steers by,
/// and the address the backend answers to (the interface's own, of the VIP's family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via {
    pub mark: u32,
    pub source: Option<IpAddr>,
}

/// What one checker checks, as its failure reasons name it.
#[derive(Clone, Debug)]
pub struct Subject {
    pub target: SocketAddr,
    pub via: Option<Via>,
    pub timeout: Duration,
    /// The substring an HTTP check wants in the body.
    pub needle: Option<String>,
}

/// Why one check failed. Copy-sized: a check records it without building a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the timeout (TCP and HTTP).
    Timeout,
    /// No echo reply within the timeout.
    NoEchoReply,
    Refused,
    Unreachable,
    /// Any other error of the connection, by errno.
    Os(i32),
    /// A check via a VIP with no address of the VIP's family to leave from.
    NoSource,
    Mark(i32),
    Bind(i32),
    /// The engine's ICMP socket for the family could not be opened.
    NoIcmpSocket,
    /// A marked ICMP socket for a check via a VIP could not be opened or marked.
    IcmpSocket(i32),
    IcmpMark(i32),
    EchoSend(i32),
    /// The configured request cannot be sent (method, path or host header).
    BadRequest(&'static str),
    Status(u16),
    BodyLacks,
    BodyTooLarge,
    /// The server closed the connection before a whole answer.
    Closed,
    /// The answer is not HTTP/1.x as we read it.
    BadResponse(&'static str),
    /// Sending or receiving on an open HTTP connection failed, by errno.
    HttpIo(i32),
}

impl Failure {
    /// The reason in words, as logs, `lb backend list` and transitions show it.
    pub fn reason(&self, subject: &Subject) -> String {
        let io = |errno: i32| io::Error::from_raw_os_error(errno);
        let text = match *self {
            Self::Timeout => format!("timeout after {}", humantime::format_duration(subject.timeout)),
            Self::NoEchoReply => "no echo reply".into(),
            Self::Refused => "connection refused".into(),
            Self::Unreachable => "unreachable".into(),
            Self::Os(errno) => io(errno).to_string(),
            Self::NoSource => {
                let family = if subject.target.is_ipv4() { "IPv4" } else { "IPv6" };
                format!("the load balancer's interface has no {family} address to check from")
            }
            Self::Mark(errno) => format!("cannot mark the socket: {}", io(errno)),
            Self::Bind(errno) => match subject.via.and_then(|v| v.source) {
                Some(source) => format!("cannot bind {source}: {}", io(errno)),
                None => format!("cannot bind: {}", io(errno)),
            },
            Self::NoIcmpSocket => "cannot open an ICMP socket".into(),
            Self::IcmpSocket(errno) => format!("cannot open an ICMP socket: {}", io(errno)),
            Self::IcmpMark(errno) => format!("cannot mark the ICMP socket: {}", io(errno)),
            Self::EchoSend(errno) => format!("echo failed: {}", io(errno)),
            Self::BadRequest(what) => format!("bad request: {what}"),
            Self::Status(status) => format!("status {status}"),
            Self::BodyLacks => format!("body lacks {:?}", subject.needle.as_deref().unwrap_or_default()),
            Self::BodyTooLarge => "reading the body: length limit exceeded".into(),
            Self::Closed => "HTTP request: connection closed before message completed".into(),
            Self::BadResponse(what) => format!("HTTP request: {what}"),
            Self::HttpIo(errno) => format!("HTTP request: {}", io(errno)),
        };
        match subject.via {
            // The backend's own address may well answer: say what this check is about.
            Some(_) => {
                format!("via VIP {}: {text} (does the backend hold the VIP and strip the tunnel?)", subject.target)
            }
            None => text,
        }
    }
}

/// What a step of a probe came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Waiting for its socket (or for its timeout).
    Pending,
    Done(Result<(), Failure>),
}

/// What the poller reported for a socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// EPOLLERR: the socket has an error to read (SO_ERROR).
    pub error: bool,
    /// The peer closed its side, or the connection is gone.
    pub closed: bool,
}

impl From<&mio::event::Event> for Readiness {
    fn from(event: &mio::event::Event) -> Self {
        Self {
            readable: event.is_readable(),
            writable: event.is_writable(),
            error: event.is_error(),
            closed: event.is_read_closed() || event.is_write_closed(),
        }
    }
}

// Tokens: a checker's sockets carry its slot and the generation of its socket, so that an event
// of a socket it has closed since is never taken for one of its new socket's; the engine's ICMP
// sockets and its waker live above every checker token.
const _: () = assert!(usize::BITS >= 64, "tokens pack a slot and a generation into 64 bits");
const EPOCH_BITS: u32 = 30;
pub const ICMP_TOKENS: usize = 1 << 62;
pub const WAKER: Token = Token(usize::MAX);

pub fn checker_token(slot: u32, epoch: u32) -> Token {
    Token(slot as usize | ((epoch as usize) << 32))
}

/// The checker slot and socket generation of a token, or None for the engine's own sockets.
pub fn checker_of(token: Token) -> Option<(u32, u32)> {
    (token.0 < ICMP_TOKENS).then_some(((token.0 & 0xffff_ffff) as u32, (token.0 >> 32) as u32))
}

/// Registers a checker's new socket with the scheduler's poller, under a new generation.
pub struct Registrar<'a> {
    pub registry: &'a Registry,
    pub slot: u32,
    pub epoch: &'a mut u32,
}

impl Registrar<'_> {
    pub fn register(&mut self, socket: &Socket) -> Result<(), Failure> {
        *self.epoch = (*self.epoch + 1) & ((1 << EPOCH_BITS) - 1);
        // Edge-triggered, read and write interest for the socket's whole life: never changed,
        // so no epoll_ctl per check.
        self.registry
            .register(
                &mut SourceFd(&socket.as_raw_fd()),
                checker_token(self.slot, *self.epoch),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| Failure::Os(errno(&e)))
    }
}

/// Where a checker's probe connects to, and how its new sockets join the poller.
pub struct Dial<'a> {
    pub target: SocketAddr,
    pub via: Option<Via>,
    pub registrar: Registrar<'a>,
}

pub fn errno(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

/// A failed connection attempt, in the words operators know.
pub fn connect_failure(errno: i32) -> Failure {
    match errno {
        libc::ECONNREFUSED => Failure::Refused,
        libc::EHOSTUNREACH | libc::ENETUNREACH => Failure::Unreachable,
        other => Failure::Os(other),
    }
}

/// A non-blocking TCP socket towards `target`, marked and bound to the source address for a
/// check via a VIP.
pub fn stream_socket(target: SocketAddr, via: Option<Via>) -> Result<Socket, Failure> {
    let source = match via {
        Some(via) => Some((via.mark, via.source.ok_or(Failure::NoSource)?)),
        None => None,
    };
    let socket = Socket::new(Domain::for_address(target), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))
        .map_err(|e| Failure::Os(errno(&e)))?;
    if let Some((mark, source)) = source {
        socket.set_mark(mark).map_err(|e| Failure::Mark(errno(&e)))?;
        // The port is chosen at connect, knowing the destination: a bind to port 0 alone would
        // hold one port of the range for this socket whatever it connects to.
        let _ = set_bind_address_no_port(&socket);
        socket.bind(&SocketAddr::new(source, 0).into()).map_err(|e| Failure::Bind(errno(&e)))?;
    }
    Ok(socket)
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Starts a connection: true when it is already up (rare), false when it is under way.
pub fn start_connect(socket: &Socket, target: SocketAddr) -> Result<bool, Failure> {
    match socket.connect(&target.into()) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(connect_failure(errno(&e))),
    }
}

/// How a connection under way ended, from what the poller reported: Some(Ok) when it is up,
/// Some(Err) when it failed (its error read from SO_ERROR), None while it is still under way.
/// As a blocking connect(2) would: a connection the server accepted and closed at once counts
/// as made.
pub fn connect_outcome(socket: &Socket, ready: Readiness) -> Option<Result<(), Failure>> {
    if ready.error || (ready.closed && !ready.writable) {
        return Some(match socket.take_error() {
            Ok(Some(error)) => Err(connect_failure(errno(&error))),
            Ok(None) if ready.writable => Ok(()),
            Ok(None) => Err(Failure::Os(libc::ECONNRESET)),
            Err(error) => Err(Failure::Os(errno(&error))),
        });
    }
    ready.writable.then_some(Ok(()))
}

/// Dissolves the connection (connect(2) with AF_UNSPEC): the socket goes back to the state of a
/// new one and can connect again, which saves creating, registering and closing one per check.
/// An established connection ends with a reset, so neither side keeps it in TIME_WAIT.
pub fn disconnect(socket: &Socket) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr is a valid AF_UNSPEC address (AF_UNSPEC is 0).
    let unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
    // SAFETY: a valid socket and a sockaddr of the size given.
    let rc =
        unsafe { libc::connect(socket.as_raw_fd(), &raw const unspec, size_of::<libc::sockaddr>() as libc::socklen_t) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// An initialised buffer seen as the uninitialised kind socket2 reads into.
pub fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and a read only ever writes initialised
    // bytes into the slice, so it stays initialised for its owner.
    unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(via: Option<Via>) -> Subject {
        Subject {
            target: "10.0.0.10:80".parse().unwrap(),
            via,
            timeout: Duration::from_millis(500),
            needle: Some("ok".into()),
        }
    }

    #[test]
    fn reasons_keep_the_words_operators_and_tests_know() {
        let plain = subject(None);
        assert_eq!(Failure::Timeout.reason(&plain), "timeout after 500ms");
        assert_eq!(Failure::Refused.reason(&plain), "connection refused");
        assert_eq!(Failure::Status(503).reason(&plain), "status 503");
        assert_eq!(Failure::NoEchoReply.reason(&plain), "no echo reply");
        assert_eq!(Failure::BodyLacks.reason(&plain), "body lacks \"ok\"");
        assert_eq!(Failure::NoIcmpSocket.reason(&plain), "cannot open an ICMP socket");
        assert_eq!(
            Failure::Os(libc::ECONNRESET).reason(&plain),
            io::Error::from_raw_os_error(libc::ECONNRESET).to_string()
        );
        let via = subject(Some(Via { mark: 7, source: None }));
        assert_eq!(
            Failure::Timeout.reason(&via),
            "via VIP 10.0.0.10:80: timeout after 500ms (does the backend hold the VIP and strip the tunnel?)"
        );
        assert!(Failure::NoSource.reason(&via).contains("has no IPv4 address to check from"));
    }

    #[test]
    fn a_disconnected_socket_connects_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let socket = stream_socket(target, None).unwrap();
        for _ in 0..3 {
            socket.set_nonblocking(false).unwrap();
            assert!(start_connect(&socket, target).unwrap());
            socket.set_nonblocking(true).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            disconnect(&socket).unwrap();
            drop(accepted);
        }
    }
}
