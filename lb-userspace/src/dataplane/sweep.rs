//! The sweep of the connection tables. `CONNS` and `NAT_REV` are plain hash maps, so that a
//! full table refuses new flows instead of evicting established ones; what an LRU map did on
//! its own, a pass here does: it removes the NAT ports that are free (`port_free`) together
//! with their flows' entries, and the entries without a port whose clients went quiet
//! (`conn_expired`). The rules are the ones the program applies when it reclaims a port, so an
//! entry goes no sooner than the program would have given its port away.
//!
//! Both tables are read with `BPF_MAP_LOOKUP_BATCH`: a syscall per few thousand entries rather
//! than two per entry. A free NAT port is removed only if its entry, and its holder's, are
//! still as read (the program may have given the port to a new flow meanwhile: under a flood
//! ports change hands by the thousand a second), one entry at a time. Flows without a port
//! (DSR, tunnels) go with `BPF_MAP_DELETE_BATCH`: one whose client sends in the milliseconds
//! between the read and the removal, after minutes of silence, is placed anew by its next
//! packet, on the same backend unless the table changed.

use anyhow::{Context, Result};
use aya::Pod;
use lb_common::maps::{ConnState, FlowKey, NatReverse};
use lb_common::nat::{Holder, client_flow, conn_expired, port_free};
use serde::Serialize;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// How often the daemon sweeps at most: the shortest wait (a half-open flow's second), so that
/// a table holds little more than what its flows still need.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Above this share of a table's capacity, room matters more than the sweep's CPU time.
pub const URGENT_PERCENT: u64 = 75;

/// When the next pass is due, after one that took `pass` and found the fuller table
/// `fullest_percent` full: every [`SWEEP_EVERY`] while a pass is cheap or the tables are
/// filling up, otherwise spaced so that sweeping takes at most a tenth of one core (a pass over
/// a million flows takes most of a second on a small virtual machine).
pub fn next_sweep(pass: Duration, fullest_percent: u64) -> Duration {
    if fullest_percent >= URGENT_PERCENT { SWEEP_EVERY } else { SWEEP_EVERY.max(pass * 9) }
}

/// Entries per batch syscall. A hash bucket must fit in one batch (ENOSPC otherwise): buckets
/// hold a handful of entries.
const BATCH: usize = 4096;

/// Both tables, by their own file descriptors: the sweep runs on a thread of its own, beside
/// the daemon's loop (a pass over a million flows takes most of a second on a small VM).
pub struct Sweeper {
    conns: OwnedFd,
    nat_rev: OwnedFd,
}

/// What one pass saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Swept {
    /// Entries in the tables when the pass read them.
    pub connections: usize,
    pub nat_entries: usize,
    /// Entries the pass removed.
    pub removed_connections: usize,
    pub removed_nat_entries: usize,
    /// How long the pass took, in microseconds.
    pub micros: u64,
}

impl Sweeper {
    pub(super) fn new(conns: BorrowedFd, nat_rev: BorrowedFd) -> Result<Self> {
        Ok(Self {
            conns: conns.try_clone_to_owned().context("duplicating CONNS' descriptor")?,
            nat_rev: nat_rev.try_clone_to_owned().context("duplicating NAT_REV's descriptor")?,
        })
    }

    /// One pass at the program's clock reading `now` ([`super::clock_ticks`]).
    pub fn sweep(&self, now: u32) -> Result<Swept> {
        let plan = self.plan(now)?;
        self.apply(plan)
    }

    /// A pass's first half: reads both tables and judges them.
    pub fn plan(&self, now: u32) -> Result<SweepPlan> {
        let started = Instant::now();
        let mut swept = Swept::default();
        let mut gone_flows = Vec::new();
        // A flow without a port is judged alone; a NAT flow with its port, below.
        let mut nat_flows: HashMap<FlowKey, NatFlow, foldhash::fast::RandomState> = HashMap::default();
        read_all(self.conns.as_fd(), |key: FlowKey, conn: ConnState| {
            swept.connections += 1;
            if conn.snat_port != 0 {
                nat_flows.insert(key, NatFlow { conn, has_port: false });
            } else if conn_expired(&conn, key.proto, now) {
                gone_flows.push(key);
            }
        })
        .context("reading CONNS")?;
        let mut free_ports = Vec::new();
        read_all(self.nat_rev.as_fd(), |reply: FlowKey, reverse: NatReverse| {
            swept.nat_entries += 1;
            let holder_key = client_flow(&reply, &reverse);
            // The client flow holds this port while its entry names it (it may have moved on
            // to another port since, whose entry is judged on its own).
            let holder = nat_flows.get_mut(&holder_key).filter(|flow| flow.conn.snat_port == reply.dport);
            let state = holder.as_ref().map(|flow| Holder { last_seen: flow.conn.last_seen, flags: flow.conn.flags });
            if port_free(&reverse, reply.proto, state, now) {
                free_ports.push(FreePort {
                    reply,
                    reverse,
                    holder: holder.as_ref().map(|flow| (holder_key, flow.conn)),
                });
            }
            if let Some(flow) = holder {
                flow.has_port = true;
            }
        })
        .context("reading NAT_REV")?;
        // NAT flows whose port entry is gone are judged as flows without a port.
        gone_flows.extend(
            nat_flows
                .iter()
                .filter(|(key, flow)| !flow.has_port && conn_expired(&flow.conn, key.proto, now))
                .map(|(key, _)| *key),
        );
        Ok(SweepPlan { started, swept, free_ports, gone_flows })
    }

    /// A pass's second half: removes what [`Self::plan`] found expired or free, as far as it
    /// still is.
    pub fn apply(&self, plan: SweepPlan) -> Result<Swept> {
        let SweepPlan { started, mut swept, free_ports, gone_flows } = plan;
        for port in &free_ports {
            let (nat, conns) = self.take_port(port).context("sweeping a NAT port")?;
            swept.removed_nat_entries += nat;
            swept.removed_connections += conns;
        }
        swept.removed_connections += delete_all(self.conns.as_fd(), &gone_flows).context("sweeping CONNS")?;
        swept.micros = started.elapsed().as_micros() as u64;
        Ok(swept)
    }
}

/// What a pass read and judged, to remove.
pub struct SweepPlan {
    started: Instant,
    /// The entries read.
    swept: Swept,
    free_ports: Vec<FreePort>,
    /// Flows without a port, expired.
    gone_flows: Vec<FlowKey>,
}

/// A port the pass found free: its entry, and its holder's when a flow still held it, as read.
struct FreePort {
    reply: FlowKey,
    reverse: NatReverse,
    holder: Option<(FlowKey, ConnState)>,
}

impl Sweeper {
    /// Removes a free port's entry, and its holder's, when they are still as the pass read them:
    /// meanwhile the program may have given the port to a new flow (a port the pass finds free
    /// is free for the program too, and under a flood ports change hands by the thousand a
    /// second), or the holder's client may have sent again. One entry at a time, each looked at
    /// just before it goes. Returns how many port and connection entries it removed.
    fn take_port(&self, port: &FreePort) -> std::io::Result<(usize, usize)> {
        if let Some((key, conn)) = &port.holder
            && lookup::<FlowKey, ConnState>(self.conns.as_fd(), key)?.as_ref() != Some(conn)
        {
            return Ok((0, 0));
        }
        if lookup::<FlowKey, NatReverse>(self.nat_rev.as_fd(), &port.reply)?.as_ref() != Some(&port.reverse) {
            return Ok((0, 0));
        }
        let nat = delete(self.nat_rev.as_fd(), &port.reply)? as usize;
        let conns = match &port.holder {
            Some((key, _)) => delete(self.conns.as_fd(), key)? as usize,
            None => 0,
        };
        Ok((nat, conns))
    }
}

/// A NAT flow's entry, and whether a port entry names it.
struct NatFlow {
    conn: ConnState,
    has_port: bool,
}

// `enum bpf_cmd` values and `struct bpf_attr`'s element and batch members
// (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf(cmd, attr)` for one element: Ok(false) when the key is not there.
fn bpf_elem(cmd: libc::c_long, attr: &mut ElemAttr) -> std::io::Result<bool> {
    // SAFETY: `attr` is a valid bpf_attr prefix of its own size; the key and value it points
    // to are sized for the map and outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut ElemAttr as *mut libc::c_void, size_of::<ElemAttr>() as u32)
    };
    match rc {
        0.. => Ok(true),
        _ => match std::io::Error::last_os_error() {
            error if error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            error => Err(error),
        },
    }
}

/// The value of `key` in the hash map `map`, if it is there.
fn lookup<K: Pod, V: Pod + Default>(map: BorrowedFd, key: &K) -> std::io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    Ok(bpf_elem(BPF_MAP_LOOKUP_ELEM, &mut attr)?.then_some(value))
}

/// Removes `key` from the hash map `map`; whether it was there.
fn delete<K: Pod>(map: BorrowedFd, key: &K) -> std::io::Result<bool> {
    let mut attr = ElemAttr { map_fd: map.as_raw_fd() as u32, key: key as *const K as u64, ..Default::default() };
    bpf_elem(BPF_MAP_DELETE_ELEM, &mut attr)
}

/// `bpf(cmd, attr)`; on failure the error and how many elements the kernel still handled.
fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix of its own size; the buffers it points to are
    // sized by its count and outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr as *mut libc::c_void, size_of::<BatchAttr>() as u32)
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Calls `each` with every entry of the hash map `map`, a batch at a time.
fn read_all<K: Pod, V: Pod>(map: BorrowedFd, mut each: impl FnMut(K, V)) -> Result<()> {
    let mut keys: Vec<K> = Vec::with_capacity(BATCH);
    let mut values: Vec<V> = Vec::with_capacity(BATCH);
    // The kernel's cursor for hash maps: a bucket index.
    let (mut cursor, mut next): (u32, u32) = (0, 0);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &cursor as *const u32 as u64 },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = (attr.count as usize).min(BATCH);
        // SAFETY: the kernel wrote `read` whole keys and values; K and V are plain data.
        unsafe {
            keys.set_len(read);
            values.set_len(read);
        }
        for (key, value) in keys.drain(..).zip(values.drain(..)) {
            each(key, value);
        }
        match result {
            Ok(()) => {}
            // The last batch.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(error) => return Err(error).context("BPF_MAP_LOOKUP_BATCH"),
        }
        cursor = next;
        first = false;
    }
}

/// Removes `keys` from the hash map `map`; returns how many it removed. A key the program
/// removed meanwhile (a port taken over) stops a batch: it is skipped and the rest goes on.
fn delete_all<K: Pod>(map: BorrowedFd, keys: &[K]) -> Result<usize> {
    let (mut done, mut removed) = (0, 0);
    while done < keys.len() {
        let chunk = &keys[done..keys.len().min(done + BATCH)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr);
        let handled = (attr.count as usize).min(chunk.len());
        removed += handled;
        done += handled;
        match result {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(error) => return Err(error).context("BPF_MAP_DELETE_BATCH"),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_are_spaced_by_their_cost_unless_the_tables_fill_up() {
        let ms = Duration::from_millis;
        assert_eq!(next_sweep(ms(20), 10), SWEEP_EVERY, "cheap passes: every second");
        assert_eq!(next_sweep(ms(800), 10), ms(7200), "a pass of 0.8 s: at most a tenth of a core");
        assert_eq!(next_sweep(ms(800), URGENT_PERCENT), SWEEP_EVERY, "a filling table: room first");
    }
}
