//! The XDP program and the host reference model, given the same maps and the same packets.

use anyhow::Result;
use lb::dataplane::{Dataplane, DataplaneSizes, VipForwarding};
pub use lb::planner::{addr16, family};
use lb_common::maglev::{MaglevBackend, build_table};
use lb_common::maps::*;
use lb_common::model::{ModelMaps, Outcome, flow_of};
use std::net::{IpAddr, SocketAddr};

/// A small ring keeps publishing fast; the logic does not depend on M.
pub const TEST_RING_SIZE: u32 = 1021;

pub struct Harness {
    pub dataplane: Dataplane,
    pub model: ModelMaps,
}

pub fn vip_key(addr: SocketAddr, proto: u8) -> VipKey {
    VipKey { addr: addr16(addr.ip()), port: addr.port().to_be(), proto, family: family(addr.ip()) }
}

pub fn vip_addr_key(ip: IpAddr) -> VipAddrKey {
    VipAddrKey { addr: addr16(ip), family: family(ip), _pad: [0; 3] }
}

pub fn backend(addr: SocketAddr, mac: [u8; 6]) -> Backend {
    Backend {
        addr: addr16(addr.ip()),
        mac,
        port: addr.port().to_be(),
        family: family(addr.ip()),
        flags: BACKEND_USABLE,
        _pad: [0; 2],
    }
}

/// A stable Maglev identity for a backend slot in tests.
pub fn maglev_key(index: u32) -> u64 {
    0x9e37_79b9_7f4a_7c15u64.wrapping_mul(index as u64 + 1)
}

/// The program's clock, to set the model's and to bound the kernel's timestamps.
pub use lb::dataplane::clock_ticks as kernel_clock_ticks;

/// Map sizes small enough to load fast, large enough for every test here.
pub fn test_sizes() -> DataplaneSizes {
    DataplaneSizes { max_vips: 16, ring_size: TEST_RING_SIZE, max_conns: 1 << 18 }
}

impl Harness {
    pub fn new() -> Result<Self> {
        Self::with_sizes(test_sizes())
    }

    /// A harness whose maps have `sizes` (e.g. a connection table too small for the traffic).
    pub fn with_sizes(sizes: DataplaneSizes) -> Result<Self> {
        let dataplane = Dataplane::load(sizes)?;
        let model = ModelMaps {
            ring_len: 2 * sizes.max_vips * sizes.ring_size,
            table_capacity: Some(sizes.max_conns as usize),
            ..Default::default()
        };
        Ok(Self { dataplane, model })
    }

    pub fn set_backend(&mut self, index: u32, backend: &Backend) -> Result<()> {
        self.dataplane.set_backend(index, backend)?;
        self.model.backends.insert(index, *backend);
        Ok(())
    }

    /// Sets the interface MAC the program accepts frames for, on both sides.
    pub fn set_own_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        self.dataplane.set_own_mac(mac)?;
        self.model.settings = Settings { own_mac: mac, check_mac: 1, ..self.model.settings };
        Ok(())
    }

    /// Tells both sides whether a flood of new flows is on (`Settings::flood`).
    pub fn set_flood(&mut self, on: bool) -> Result<()> {
        self.dataplane.set_flood(on)?;
        self.model.settings.flood = on as u8;
        Ok(())
    }

    /// The tunnel modes' outer sources, GUE port and MTU (0: no limit), on both sides.
    pub fn set_tunnel(&mut self, sources: &lb::tunnel::TunnelSources, gue_port: u16, mtu: u16) -> Result<()> {
        self.dataplane.set_tunnel(sources, gue_port, mtu)?;
        sources.apply(&mut self.model.settings);
        self.model.settings.gue_port = gue_port.to_be();
        self.model.settings.mtu = mtu;
        Ok(())
    }

    /// Builds the Maglev table over `backends` (equal weights) and publishes the VIP to both sides.
    /// Returns the table.
    pub fn publish_vip(&mut self, key: &VipKey, forwarding: &VipForwarding, backends: &[u32]) -> Result<Vec<u32>> {
        let members: Vec<MaglevBackend> =
            backends.iter().map(|&index| MaglevBackend { index, key: maglev_key(index), weight: 1 }).collect();
        let table = build_table(&members, TEST_RING_SIZE)?;
        self.dataplane.publish_vip(key, forwarding, &table)?;
        let meta = self.dataplane.vip(key)?.expect("VIP was just published");
        for (i, index) in table.iter().enumerate() {
            self.model.rings.insert(meta.ring_offset + i as u32, *index);
        }
        self.model.vips.insert(*key, meta);
        self.copy_vip_addresses()?;
        Ok(table)
    }

    /// Runs a packet through the kernel and the model; returns (kernel, model) outcomes.
    /// The kernel's reason is read from the per-reason counters around the run.
    pub fn run(&mut self, frame: &[u8]) -> Result<(Outcome, Outcome)> {
        let before = self.dataplane.reason_counters()?;
        let started = kernel_clock_ticks();
        let (action, packet) = self.dataplane.run_once(frame)?;
        let ended = kernel_clock_ticks();
        let after = self.dataplane.reason_counters()?;
        let changed: Vec<Reason> = before.iter().zip(&after).filter(|(b, a)| a.1 != b.1).map(|(_, a)| a.0).collect();
        assert_eq!(changed.len(), 1, "exactly one reason counter must move per packet, moved: {changed:?}");
        let kernel = Outcome { reason: changed[0], action, packet };
        let model = self.model_at_kernel_time(frame, started, ended, |m| m == &kernel)?;
        Ok((kernel, model))
    }

    /// The model's outcome for `frame` at the clock the program read. That clock (the coarse
    /// monotonic clock) steps once a jiffy, by a jiffy, and may step while the program runs: the
    /// program then read `started` or `ended`. Which one can decide the packet (a wait that
    /// ends in between) and the timestamps it writes, which decide later packets. So both are
    /// tried, each on its own copy of the model's state, and the model keeps the one whose
    /// outcome `is_kernels` and whose new timestamps are the kernel's.
    fn model_at_kernel_time(
        &mut self,
        frame: &[u8],
        started: u32,
        ended: u32,
        is_kernels: impl Fn(&Outcome) -> bool,
    ) -> Result<Outcome> {
        self.model.now = started;
        if started == ended {
            return Ok(self.model.process(frame));
        }
        // The rings, by far the largest part, are only read: one copy goes from one to the other.
        let rings = std::mem::take(&mut self.model.rings);
        let mut early = self.model.clone();
        let mut late = std::mem::take(&mut self.model);
        late.now = ended;
        early.rings = rings;
        let early_outcome = early.process(frame);
        late.rings = std::mem::take(&mut early.rings);
        let late_outcome = late.process(frame);
        let late_fits = is_kernels(&late_outcome) && self.kernel_agrees(frame, &late_outcome, &late, &early)?;
        let early_fits = is_kernels(&early_outcome) && self.kernel_agrees(frame, &early_outcome, &early, &late)?;
        // With neither (a real difference), the outcome at the clock read before the run.
        let rings = std::mem::take(&mut late.rings);
        let (mut model, outcome) = if late_fits && !early_fits { (late, late_outcome) } else { (early, early_outcome) };
        model.rings = rings;
        self.model = model;
        Ok(outcome)
    }

    /// Whether the kernel's entries for the packet's flows (`frame`'s, and the reverse of the
    /// packet it became, a NAT flow's reply key) are `model`'s, where `model`'s differ from
    /// `other`'s: the entries the packet wrote, by the clock it read.
    fn kernel_agrees(&self, frame: &[u8], outcome: &Outcome, model: &ModelMaps, other: &ModelMaps) -> Result<bool> {
        let reversed = |f: FlowKey| FlowKey { src: f.dst, dst: f.src, sport: f.dport, dport: f.sport, ..f };
        for key in [flow_of(frame), flow_of(&outcome.packet).map(reversed)].into_iter().flatten() {
            if let Some(conn) = model.conns.get(&key)
                && other.conns.get(&key) != Some(conn)
                && self.dataplane.connection(&key)? != Some(*conn)
            {
                return Ok(false);
            }
            if let Some(reverse) = model.nat_rev.get(&key)
                && other.nat_rev.get(&key) != Some(reverse)
                && self.dataplane.nat_reverse(&key)? != Some(*reverse)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Makes the addresses whose echo requests are answered exactly `addresses`, on both sides.
    pub fn answer_ping_on(&mut self, addresses: &[IpAddr]) -> Result<()> {
        let entries: Vec<(VipAddrKey, VipAddr)> =
            addresses.iter().map(|&ip| (vip_addr_key(ip), VipAddr::with_flags(VIP_ADDR_ANSWER_PING))).collect();
        self.dataplane.set_vip_addresses(&entries)?;
        self.copy_vip_addresses()
    }

    /// The model's `VIP_ADDRS` as the data plane derived it (the VIP and SNAT bits come from
    /// the published VIPs; `lb_userspace`'s own tests check that derivation).
    fn copy_vip_addresses(&mut self) -> Result<()> {
        self.model.vip_addrs = self.dataplane.vip_addresses()?.into_iter().collect();
        Ok(())
    }

    /// Drops the connection-table entries of backend slot `index`, on both sides.
    pub fn forget_backend_connections(&mut self, index: u32) -> Result<usize> {
        self.model.conns.retain(|_, conn| conn.backend != index);
        self.dataplane.forget_backend_connections(index)
    }

    /// Moves every NAT flow's last activity `ticks` into the past, on both sides, as if the
    /// flows had been quiet that long.
    pub fn age_nat_flows(&mut self, ticks: u32) -> Result<()> {
        for (flow, mut conn) in self.dataplane.connections()? {
            conn.last_seen = conn.last_seen.wrapping_sub(ticks);
            self.dataplane.insert_connection(&flow, &conn)?;
        }
        for (reply, mut reverse) in self.dataplane.nat_reverses()? {
            reverse.last_seen = reverse.last_seen.wrapping_sub(ticks);
            self.dataplane.insert_nat_reverse(&reply, &reverse)?;
        }
        self.model.conns.values_mut().for_each(|c| c.last_seen = c.last_seen.wrapping_sub(ticks));
        self.model.nat_rev.values_mut().for_each(|r| r.last_seen = r.last_seen.wrapping_sub(ticks));
        Ok(())
    }

    /// Runs a packet without reading reason counters (fast path for bulk comparisons).
    pub fn run_fast(&mut self, frame: &[u8]) -> Result<((u32, Vec<u8>), Outcome)> {
        let started = kernel_clock_ticks();
        let kernel = self.dataplane.run_once(frame)?;
        let ended = kernel_clock_ticks();
        let model =
            self.model_at_kernel_time(frame, started, ended, |m| m.action == kernel.0 && m.packet == kernel.1)?;
        Ok((kernel, model))
    }
}
