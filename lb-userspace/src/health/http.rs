//! The HTTP check: a request whose answer has an expected status (and, if asked, a body with
//! a given substring).
//!
//! A check reuses the connection of the one before (HTTP/1.1 keep-alive): each checker keeps at
//! most one connection open to its backend, and a check on it is one request and one answer. A
//! connection that is not open, or that the server closed meanwhile (it is then re-opened within
//! the same check), is opened as part of the check, so a server that closes after each answer
//! ("Connection: close", HTTP/1.0) is simply checked with a new connection each time. A failed
//! check always closes its connection: the next one starts from a new connection, so a server
//! that stopped answering or whose port closed fails as it did before.

use super::probe::{Dial, Failure, Readiness, Step, connect_outcome, errno, start_connect, stream_socket};
use httparse::Status;
use socket2::Socket;
use std::io;
use std::net::SocketAddr;

/// How much of a response body an HTTP check reads at most.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a response's status line and headers may be.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

pub struct HttpProbe {
    /// The request, written once for the checker's life (or why it cannot be sent).
    request: Result<Box<[u8]>, &'static str>,
    head_request: bool,
    expect: (u16, u16),
    needle: Option<Box<[u8]>>,
    connection: Option<Socket>,
    state: State,
    /// The answer as received, and its body when a substring is looked for (both reused).
    received: Vec<u8>,
    body: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No check under way; an open connection waits for the next.
    Idle,
    Connecting,
    Sending {
        sent: usize,
        reused: bool,
    },
    Receiving {
        reused: bool,
    },
    /// The check is decided; the rest of the body is read so that the connection can carry the
    /// next check (which closes it if it is still not read by then).
    Draining,
}

/// How the request's response ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
    /// 1xx (but 101): a final answer follows.
    interim: bool,
}

/// What happens to the connection once a check is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Keep,
    Drain,
    Close,
}

impl HttpProbe {
    pub fn new(
        (method, path, host): (&str, &str, Option<&str>),
        expect: (u16, u16),
        needle: Option<&str>,
        target: SocketAddr,
    ) -> Self {
        Self {
            request: request(method, path, host, target),
            head_request: method.eq_ignore_ascii_case("HEAD"),
            expect,
            needle: needle.map(|n| n.as_bytes().into()),
            connection: None,
            state: State::Idle,
            received: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn start(&mut self, dial: &mut Dial<'_>) -> Step {
        if let Err(what) = self.request {
            return Step::Done(Err(Failure::BadRequest(what)));
        }
        if self.state != State::Idle {
            self.close();
        }
        if self.received.capacity() > 8 * 1024 {
            // Let a large answer's buffers go rather than keep them for every checker.
            self.received = Vec::new();
            self.body = Vec::new();
        }
        if self.connection.is_some() { self.send(true, dial) } else { self.connect(dial) }
    }

    pub fn on_event(&mut self, ready: Readiness, dial: &mut Dial<'_>) -> Step {
        let readable = ready.readable || ready.closed || ready.error;
        match self.state {
            // An idle connection the server closed (or that says anything unasked): gone.
            State::Idle => {
                if readable {
                    self.close();
                }
                Step::Pending
            }
            State::Connecting => {
                let Some(connection) = &self.connection else { return Step::Pending };
                match connect_outcome(connection, ready) {
                    None => Step::Pending,
                    Some(Ok(())) => self.send(false, dial),
                    Some(Err(failure)) => self.fail(failure),
                }
            }
            State::Sending { sent, reused } if ready.writable || ready.closed || ready.error => {
                self.resume_send(sent, reused, dial)
            }
            State::Receiving { reused } if readable => self.receive(reused, dial),
            State::Draining if readable => {
                self.drain();
                Step::Pending
            }
            State::Sending { .. } | State::Receiving { .. } | State::Draining => Step::Pending,
        }
    }

    /// The check ran out of time: whatever the connection was doing, it is not reused.
    pub fn on_timeout(&mut self) {
        self.close();
    }

    fn close(&mut self) {
        self.connection = None;
        self.state = State::Idle;
    }

    fn fail(&mut self, failure: Failure) -> Step {
        self.close();
        Step::Done(Err(failure))
    }

    fn connect(&mut self, dial: &mut Dial<'_>) -> Step {
        self.close();
        let socket = match stream_socket(dial.target, dial.via).and_then(|s| dial.registrar.register(&s).map(|()| s)) {
            Ok(socket) => socket,
            Err(failure) => return Step::Done(Err(failure)),
        };
        // One write per request: never held back waiting for an acknowledgement.
        let _ = socket.set_tcp_nodelay(true);
        match start_connect(&socket, dial.target) {
            Ok(up) => {
                self.connection = Some(socket);
                if up {
                    self.send(false, dial)
                } else {
                    self.state = State::Connecting;
                    Step::Pending
                }
            }
            Err(failure) => Step::Done(Err(failure)),
        }
    }

    fn send(&mut self, reused: bool, dial: &mut Dial<'_>) -> Step {
        self.received.clear();
        self.resume_send(0, reused, dial)
    }

    fn resume_send(&mut self, mut sent: usize, reused: bool, dial: &mut Dial<'_>) -> Step {
        let (Some(connection), Ok(request)) = (&self.connection, &self.request) else { return Step::Pending };
        while sent < request.len() {
            match connection.send_with_flags(&request[sent..], libc::MSG_NOSIGNAL) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.state = State::Sending { sent, reused };
                    return Step::Pending;
                }
                Err(e) => return self.broken(reused, Failure::HttpIo(errno(&e)), dial),
            }
        }
        self.state = State::Receiving { reused };
        Step::Pending
    }

    /// The connection broke before an answer. On a reused connection that had answered nothing
    /// yet, the server closed it while it was idle: the check goes on with a new connection.
    fn broken(&mut self, reused: bool, failure: Failure, dial: &mut Dial<'_>) -> Step {
        if reused && self.received.is_empty() {
            return self.connect(dial);
        }
        self.fail(failure)
    }

    fn receive(&mut self, reused: bool, dial: &mut Dial<'_>) -> Step {
        loop {
            let end = match self.read() {
                Ok(Some(_)) => false,
                Ok(None) => true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Pending,
                Err(e) => return self.broken(reused, Failure::HttpIo(errno(&e)), dial),
            };
            if end && self.received.is_empty() {
                return self.broken(reused, Failure::Closed, dial);
            }
            let Some((result, after)) = self.judge(end) else {
                if end {
                    return self.fail(Failure::Closed);
                }
                continue;
            };
            match after {
                After::Keep => self.state = State::Idle,
                After::Drain => self.state = State::Draining,
                After::Close => self.close(),
            }
            return Step::Done(result);
        }
    }

    /// One read into `received`: Some(bytes) read, None at the end of the stream.
    fn read(&mut self) -> io::Result<Option<usize>> {
        let Some(connection) = &self.connection else { return Ok(None) };
        // Room for a usual answer at first (thousands of checkers keep theirs), more as needed.
        if self.received.capacity() - self.received.len() < 512 {
            self.received.reserve(self.received.len().max(1024));
        }
        let len = self.received.len();
        loop {
            match connection.recv(self.received.spare_capacity_mut()) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    // SAFETY: recv initialised the first `n` bytes of the spare capacity.
                    unsafe { self.received.set_len(len + n) };
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// What the answer so far decides: None while more of it is needed.
    fn judge(&mut self, end: bool) -> Option<(Result<(), Failure>, After)> {
        let head = loop {
            match parse_head(&self.received, self.head_request) {
                Ok(Some(head)) if head.interim => drop(self.received.drain(..head.len)),
                Ok(Some(head)) => break head,
                Ok(None) if self.received.len() > MAX_HEAD => {
                    return Some((Err(Failure::BadResponse("message head is too large")), After::Close));
                }
                Ok(None) => return None,
                Err(what) => return Some((Err(Failure::BadResponse(what)), After::Close)),
            }
        };
        let (low, high) = self.expect;
        if !(low..=high).contains(&head.status) {
            return Some((Err(Failure::Status(head.status)), After::Close));
        }
        let body = &self.received[head.len..];
        let Some(needle) = &self.needle else {
            // The status decides (the body is not waited for): the connection stays if the
            // rest of the answer can be read.
            return Some((Ok(()), connection_after(&head, body_end(body, head.framing, end, None), body.len())));
        };
        match body_end(body, head.framing, end, Some(&mut self.body)) {
            Ok(None) => None,
            Err(failure) => Some((Err(failure), After::Close)),
            Ok(Some(used)) => {
                let found = needle.is_empty() || self.body.windows(needle.len()).any(|w| w == &needle[..]);
                let after = if head.keep_alive && used == body.len() { After::Keep } else { After::Close };
                Some((if found { Ok(()) } else { Err(Failure::BodyLacks) }, after))
            }
        }
    }

    /// Reads the rest of a decided answer's body.
    fn drain(&mut self) {
        loop {
            let end = match self.read() {
                Ok(Some(_)) => false,
                Ok(None) => true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.close(),
            };
            let Ok(Some(head)) = parse_head(&self.received, self.head_request) else { return self.close() };
            let body = &self.received[head.len..];
            match connection_after(&head, body_end(body, head.framing, end, None), body.len()) {
                After::Keep => return self.state = State::Idle,
                After::Close => return self.close(),
                After::Drain if end => return self.close(),
                After::Drain => {}
            }
        }
    }
}

/// Whether a connection carries the next check, from its answer's head and how far its body is.
fn connection_after(head: &Head, body: Result<Option<usize>, Failure>, received: usize) -> After {
    match body {
        // Bytes after the answer: the server says something unasked; not reused.
        Ok(Some(used)) if head.keep_alive && used == received => After::Keep,
        Ok(None) if head.keep_alive && head.framing != Framing::UntilClose => After::Drain,
        _ => After::Close,
    }
}

/// The request, written once: HTTP/1.1 keeps the connection open unless a side says otherwise.
fn request(method: &str, path: &str, host: Option<&str>, target: SocketAddr) -> Result<Box<[u8]>, &'static str> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if method.is_empty() || !method.bytes().all(token) {
        return Err("invalid HTTP method");
    }
    if path.is_empty() || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("invalid uri character");
    }
    let host = host.map_or_else(|| target.to_string(), str::to_string);
    if host.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return Err("failed to parse header value");
    }
    let mut text = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: lb-health-check\r\n");
    if matches!(method, "POST" | "PUT" | "PATCH") {
        text.push_str("content-length: 0\r\n");
    }
    text.push_str("\r\n");
    Ok(text.into_bytes().into_boxed_slice())
}

/// The status line and headers, once all received; None while incomplete.
fn parse_head(received: &[u8], head_request: bool) -> Result<Option<Head>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(received) {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return Ok(None),
        Err(error) => return Err(describe(error)),
    };
    let status = response.code.unwrap_or_default();
    let interim = (100..200).contains(&status) && status != 101;
    let (mut length, mut chunked, mut encoded, mut close, mut keep_alive) = (None, false, false, false, false);
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or_default();
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed: usize = value.trim().parse().map_err(|_| "invalid content-length")?;
            if length.is_some_and(|l| l != parsed) {
                return Err("invalid content-length");
            }
            length = Some(parsed);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            chunked = value.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    let framing = if head_request || interim || status == 204 || status == 304 {
        Framing::Empty
    } else if encoded {
        if chunked { Framing::Chunked } else { Framing::UntilClose }
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when told to.
    let keep_alive = status != 101 && !close && (response.version == Some(1) || keep_alive);
    Ok(Some(Head { len, status, framing, keep_alive, interim }))
}

/// Where the body ends: Some(bytes it takes) once whole, None while more is needed. With
/// `collect`, its decoded bytes (at most MAX_BODY) go there.
fn body_end(
    body: &[u8],
    framing: Framing,
    end: bool,
    mut collect: Option<&mut Vec<u8>>,
) -> Result<Option<usize>, Failure> {
    if let Some(out) = collect.as_deref_mut() {
        out.clear();
    }
    let whole = match framing {
        Framing::Empty => 0,
        Framing::Length(len) if len > MAX_BODY => return Err(Failure::BodyTooLarge),
        Framing::Length(len) if body.len() < len => return Ok(None),
        Framing::Length(len) => len,
        Framing::UntilClose if body.len() > MAX_BODY => return Err(Failure::BodyTooLarge),
        Framing::UntilClose if !end => return Ok(None),
        Framing::UntilClose => body.len(),
        Framing::Chunked => return dechunk(body, collect),
    };
    if let Some(out) = collect {
        out.extend_from_slice(&body[..whole]);
    }
    Ok(Some(whole))
}

/// Chunked transfer coding (RFC 9112 7.1), read from the start each time (answers are small).
fn dechunk(body: &[u8], mut collect: Option<&mut Vec<u8>>) -> Result<Option<usize>, Failure> {
    let invalid = Failure::BadResponse("invalid chunk");
    let (mut at, mut total) = (0, 0);
    loop {
        let (header, size) = match httparse::parse_chunk_size(&body[at..]) {
            Ok(Status::Complete(parsed)) => parsed,
            Ok(Status::Partial) => return Ok(None),
            Err(_) => return Err(invalid),
        };
        at += header;
        let Ok(size) = usize::try_from(size) else { return Err(Failure::BodyTooLarge) };
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(line) = body[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                at += line + 2;
                if line == 0 {
                    return Ok(Some(at));
                }
            }
        }
        total += size;
        if total > MAX_BODY {
            return Err(Failure::BodyTooLarge);
        }
        if body.len() < at + size + 2 {
            return Ok(None);
        }
        if &body[at + size..at + size + 2] != b"\r\n" {
            return Err(invalid);
        }
        if let Some(out) = collect.as_deref_mut() {
            out.extend_from_slice(&body[at..at + size]);
        }
        at += size + 2;
    }
}

fn describe(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid new line",
        httparse::Error::Status => "invalid response status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes(), false).unwrap().unwrap()
    }

    #[test]
    fn the_request_keeps_the_connection_and_names_the_target() {
        let target = "10.1.2.3:8080".parse().unwrap();
        let text = request("GET", "/healthz", None, target).unwrap();
        assert_eq!(&*text, b"GET /healthz HTTP/1.1\r\nhost: 10.1.2.3:8080\r\nuser-agent: lb-health-check\r\n\r\n");
        let posted = request("POST", "/", Some("example.org"), target).unwrap();
        assert!(posted.starts_with(b"POST / HTTP/1.1\r\nhost: example.org\r\n"));
        assert!(posted.ends_with(b"content-length: 0\r\n\r\n"));
        assert_eq!(request("GE T", "/", None, target), Err("invalid HTTP method"));
        assert_eq!(request("GET", "/a b", None, target), Err("invalid uri character"));
        assert_eq!(request("GET", "/", Some("a\r\nx: y"), target), Err("failed to parse header value"));
    }

    #[test]
    fn heads_say_how_the_answer_ends_and_whether_the_connection_stays() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert_eq!((h.status, h.framing, h.keep_alive), (200, Framing::Length(12), true));
        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        let h = head("HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(0), true));
        assert_eq!(head("HTTP/1.1 204 No Content\r\n\r\n").framing, Framing::Empty);
        assert!(head("HTTP/1.1 100 Continue\r\n\r\n").interim);
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Empty, "an answer to HEAD has no body");
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false), Ok(None));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false), Err("invalid content-length"));
        assert_eq!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n", false), Err("invalid HTTP version"));
    }

    #[test]
    fn bodies_end_where_their_framing_says() {
        let mut out = Vec::new();
        assert_eq!(body_end(b"hello world", Framing::Length(5), false, Some(&mut out)), Ok(Some(5)));
        assert_eq!(out, b"hello");
        assert_eq!(body_end(b"hel", Framing::Length(5), false, None), Ok(None));
        assert_eq!(body_end(b"hel", Framing::UntilClose, false, None), Ok(None));
        assert_eq!(body_end(b"hel", Framing::UntilClose, true, None), Ok(Some(3)));
        assert_eq!(body_end(b"", Framing::Length(MAX_BODY + 1), false, None), Err(Failure::BodyTooLarge));
        let chunked = b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nExpires: never\r\n\r\nNEXT";
        assert_eq!(body_end(chunked, Framing::Chunked, false, Some(&mut out)), Ok(Some(chunked.len() - 4)));
        assert_eq!(out, b"wikipedia");
        for cut in 0..chunked.len() - 4 {
            assert_eq!(body_end(&chunked[..cut], Framing::Chunked, false, None), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            body_end(b"4\r\nwikiXX0\r\n\r\n", Framing::Chunked, false, None),
            Err(Failure::BadResponse("invalid chunk"))
        );
    }

    #[test]
    fn a_connection_stays_only_after_a_whole_answer_and_nothing_more() {
        let kept = head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(connection_after(&kept, Ok(Some(2)), 2), After::Keep);
        assert_eq!(connection_after(&kept, Ok(Some(2)), 3), After::Close, "bytes nobody asked for");
        assert_eq!(connection_after(&kept, Ok(None), 1), After::Drain);
        let closing = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(connection_after(&closing, Ok(Some(2)), 2), After::Close);
    }
}
