//! IP fragments through a VIP: UDP requests far above the 1500-byte MTU, and answers as large,
//! in both modes (nat, dsr) and both families. The client's kernel fragments every request; only
//! the first fragment has the UDP ports the load balancer places a flow by, so the later ones
//! reach the backend only if the load balancer sends them where their first fragment went (to
//! one of two backends: a later fragment sent elsewhere leaves both datagrams unassembled). In
//! NAT the backend's answer comes back fragmented through the load balancer, every fragment
//! translated; in DSR the backend answers the client directly. Every request must be answered,
//! byte for byte, and the reason counters must show the fragments handled in XDP
//! (`tx_fragment`), not passed to the load balancer's kernel, which would drop them.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::topology::{SERVICE_PORT, SNAT_V4, SNAT_V6, Topology, VIP_V4, VIP_V6};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Requests per VIP, each from its own socket (its own source port, so its own flow).
const REQUESTS: usize = 20;
/// Request sizes (UDP payload), used in turn: all far above the MTU. 2953 bytes leaves a last
/// IPv4 fragment of one byte (2 × 1480 + 1 bytes of IP payload), 2889 one of IPv6 (2 × 1448 + 1).
const SIZES: [usize; 5] = [3000, 4000, 8000, 2953, 2889];
/// How long a request waits for its answer before it is sent again.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Sends per request at most: a lost frame is tolerated (and counted), a lost path is not.
const TRIES: usize = 3;
/// The counters read around each VIP's exchanges: what the load balancer did with the fragments
/// (the pass_ ones say why it handed them to its kernel instead; IPv6 fragments without fragment
/// support count as an extension header).
const REASONS: [&str; 6] =
    ["tx_forward", "tx_fragment", "tx_nat_reply", "pass_fragment", "pass_fragment_no_first", "pass_ipv6_ext_header"];

struct Vip {
    name: &'static str,
    addr: SocketAddr,
    dsr: bool,
}

fn vips() -> [Vip; 4] {
    // DSR cannot change ports: the VIP's port is the service's.
    [
        Vip { name: "nat4", addr: SocketAddr::new(VIP_V4.into(), 80), dsr: false },
        Vip { name: "dsr4", addr: SocketAddr::new(VIP_V4.into(), SERVICE_PORT), dsr: true },
        Vip { name: "nat6", addr: SocketAddr::new(VIP_V6.into(), 80), dsr: false },
        Vip { name: "dsr6", addr: SocketAddr::new(VIP_V6.into(), SERVICE_PORT), dsr: true },
    ]
}

fn config(topology: &Topology) -> String {
    let mut config = "[daemon]\ninterface = \"eth0\"\ninstance = \"{instance}\"\nring_size = 1021\nmax_vips = 4\nmax_conns = 65536\n".to_string();
    for vip in vips() {
        let v6 = vip.addr.is_ipv6();
        let mode = match (vip.dsr, v6) {
            (true, _) => "mode = \"dsr\"".to_string(),
            (false, false) => format!("mode = \"nat\"\nsnat = \"{SNAT_V4}\""),
            (false, true) => format!("mode = \"nat\"\nsnat = \"{SNAT_V6}\""),
        };
        config.push_str(&format!(
            "\n[[vip]]\nname = \"{}\"\naddress = \"{}\"\nprotocol = \"udp\"\n{mode}\n",
            vip.name, vip.addr
        ));
        for backend in &topology.backends {
            config.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{}\"\n",
                SocketAddr::new(backend.addr(v6), SERVICE_PORT)
            ));
        }
    }
    config
}

/// Later fragments (all but the first) of a `size`-byte UDP payload on a 1500-byte link, at
/// least: an IPv4 fragment carries at most 1480 bytes of the IP payload (UDP header included),
/// an IPv6 one 1448.
fn later_fragments(size: usize) -> usize {
    (size + 8).div_ceil(1480) - 1
}

/// Request `i` of `size` bytes: a header naming it, then bytes that depend on the request and the
/// position, so an answer carrying another request's bytes or misplaced fragments shows.
fn request(vip: &Vip, i: usize, size: usize) -> Vec<u8> {
    let mut bytes = format!("{} request {i}, {size} bytes\n", vip.name).into_bytes();
    let start = bytes.len();
    bytes.extend((start..size).map(|at| (at * 7 + i * 13) as u8));
    bytes.truncate(size);
    bytes
}

/// A UDP socket whose large datagrams leave fragmented: the kernel must never set DF on them
/// (IPv4) nor refuse them (IPv6), whatever the path MTU discovery default.
fn fragmenting_socket(v6: bool) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
    let (level, name, value) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT)
    };
    // SAFETY: setsockopt on our own open socket, with a c_int value of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.set_read_timeout(Some(TIMEOUT))?;
    Ok(socket)
}

/// What one VIP's exchanges came to.
#[derive(Default, Debug)]
struct Outcome {
    /// Requests sent (the last one perhaps unanswered).
    sent: usize,
    answered: usize,
    resends: usize,
    /// Answers per backend name.
    backends: BTreeMap<String, usize>,
    /// Later fragments the requests were sent in (first tries only), at least.
    request_fragments: usize,
    /// The first request that failed, and how: the VIP's exchanges stop there.
    failure: Option<String>,
}

/// Sends one request from a fresh socket, up to TRIES times, and checks its answer: exactly as
/// long, `NAME\n` of a backend, then the request's own bytes; from the VIP (NAT), or in DSR from
/// the VIP or the answering backend's own address (the backend's wildcard socket picks its
/// source by route). Returns the backend's name.
fn exchange(vip: &Vip, backends: &[(String, IpAddr)], request: &[u8], resends: &mut usize) -> Result<String, String> {
    let socket = fragmenting_socket(vip.addr.is_ipv6()).map_err(|e| format!("socket: {e}"))?;
    let mut buf = vec![0u8; 65536];
    for attempt in 0..TRIES {
        if attempt > 0 {
            *resends += 1;
        }
        let sent = socket.send_to(request, vip.addr).map_err(|e| format!("send: {e}"))?;
        if sent != request.len() {
            return Err(format!("sent {sent} of {} bytes", request.len()));
        }
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("receive: {e}")),
        };
        let answer = &buf[..len];
        let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
        let name = String::from_utf8_lossy(line).into_owned();
        let Some((_, backend_addr)) = backends.iter().find(|(n, _)| *n == name) else {
            return Err(format!("{len}-byte answer from {from} does not start with a backend name: {:?}", &name));
        };
        // Address and port only (an IPv6 address's flow information is no part of it).
        let is = |addr: SocketAddr| from.ip() == addr.ip() && from.port() == addr.port();
        if !(is(vip.addr) || (vip.dsr && is(SocketAddr::new(*backend_addr, SERVICE_PORT)))) {
            return Err(format!("answer from {name} came from {from}"));
        }
        if len != request.len() {
            return Err(format!("{len}-byte answer from {name} to a {}-byte request", request.len()));
        }
        let head = name.len() + 1;
        if answer[head..] != request[head..] {
            let at = head + answer[head..].iter().zip(&request[head..]).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("answer from {name} differs from the request at byte {at} of {len}"));
        }
        return Ok(name);
    }
    Err(format!("no answer to {TRIES} tries of {TIMEOUT:?}"))
}

/// REQUESTS exchanges with `vip`, in the calling thread's namespace; stops at the first failure.
fn exchanges(vip: &Vip, backends: &[(String, IpAddr)]) -> Outcome {
    let mut outcome = Outcome::default();
    for i in 0..REQUESTS {
        let size = SIZES[i % SIZES.len()];
        outcome.sent += 1;
        outcome.request_fragments += later_fragments(size);
        match exchange(vip, backends, &request(vip, i, size), &mut outcome.resends) {
            Ok(name) => {
                outcome.answered += 1;
                *outcome.backends.entry(name).or_default() += 1;
            }
            Err(e) => {
                outcome.failure = Some(format!("request {i} ({size} bytes): {e}"));
                break;
            }
        }
    }
    outcome
}

fn counters(daemon: &LbDaemon) -> BTreeMap<&'static str, u64> {
    REASONS.iter().map(|&reason| (reason, daemon.reason_count(reason).unwrap())).collect()
}

#[test]
fn udp_requests_and_answers_far_above_the_mtu_go_through_the_vip_in_both_modes_and_families() {
    if !require_root("udp_requests_and_answers_far_above_the_mtu_go_through_the_vip_in_both_modes_and_families") {
        return;
    }
    let topology = Topology::new(2, true).unwrap();
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config(&topology)).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();

    let mut report = String::new();
    let mut failures = Vec::new();
    for vip in vips() {
        let backends: Vec<(String, IpAddr)> =
            topology.backends.iter().map(|b| (b.name.clone(), b.addr(vip.addr.is_ipv6()))).collect();
        let before = counters(&daemon);
        let started = Instant::now();
        let outcome = topology.client.enter(|| exchanges(&vip, &backends)).unwrap();
        let took = started.elapsed();
        let after = counters(&daemon);
        let delta: BTreeMap<&str, u64> = after.iter().map(|(&k, &v)| (k, v - before[k])).collect();
        let line = format!(
            "{} ({}): {}/{} requests answered in {took:?}, {} resent, backends {:?}; \
             counters {delta:?} for at least {} later request fragments",
            vip.name,
            vip.addr,
            outcome.answered,
            outcome.sent,
            outcome.resends,
            outcome.backends,
            outcome.request_fragments
        );
        eprintln!("{line}");
        report.push_str(&line);
        report.push('\n');

        let mut fail = |what: String| failures.push(format!("{}: {what}", vip.name));
        if let Some(failure) = &outcome.failure {
            fail(failure.clone());
        }
        if outcome.answered == REQUESTS && outcome.backends.len() != backends.len() {
            // 20 flows all on one of two backends: about 2 in a million.
            fail(format!("{REQUESTS} flows did not spread over the backends: {:?}", outcome.backends));
        }
        // In XDP, not by the kernel: every request's first fragment forwarded like any packet,
        // every later fragment sent where its first went, and in NAT every answer's first
        // fragment translated back (its later ones too, not counted here).
        let (sent, answered) = (outcome.sent as u64, outcome.answered as u64);
        if delta["tx_forward"] < sent {
            fail(format!("tx_forward +{} for {sent} requests", delta["tx_forward"]));
        }
        if delta["tx_fragment"] < (outcome.request_fragments as u64).max(sent) {
            fail(format!(
                "tx_fragment +{} for {sent} requests in at least {} later fragments",
                delta["tx_fragment"], outcome.request_fragments
            ));
        }
        if !vip.dsr && delta["tx_nat_reply"] < answered {
            fail(format!("tx_nat_reply +{} for {answered} answers", delta["tx_nat_reply"]));
        }
    }
    // The daemon's guard prints its log and `lb stats` as the test panics.
    assert!(failures.is_empty(), "fragmented UDP through the VIPs failed:\n{}\n\n{report}", failures.join("\n"));
}
