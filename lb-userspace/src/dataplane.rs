//! The only owner of the XDP program and its maps: load, attach, and read counters.

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::{TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader, Pod};
use lb_common::maps::*;

/// The XDP object, built by `build.rs` from `lb-ebpf` and embedded so `lb` is self-contained.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// How the program is attached to the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (XDP native): the fast path.
    Native,
    /// In the generic network stack (XDP SKB): works on any interface.
    Generic,
}

impl AttachMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// Map sizes chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneSizes {
    pub max_vips: u32,
    /// Maglev table size M (prime).
    pub ring_size: u32,
    /// Connection-table and NAT-table entries.
    pub max_conns: u32,
}

impl Default for DataplaneSizes {
    fn default() -> Self {
        Self { max_vips: DEFAULT_MAX_VIPS, ring_size: DEFAULT_RING_SIZE, max_conns: DEFAULT_MAX_CONNS }
    }
}

/// How a VIP forwards, as published to the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipForwarding {
    /// Slot of the VIP: index of its counters and of its pair of rings.
    pub vip_index: u32,
    pub mode: u8,
    pub snat_addr: [u8; 16],
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

pub struct Dataplane {
    ebpf: Ebpf,
    sizes: DataplaneSizes,
}

impl Dataplane {
    /// Loads the embedded program into the kernel (verifier included), not yet attached.
    pub fn load(sizes: DataplaneSizes) -> Result<Self> {
        let ring_entries =
            sizes.max_vips.checked_mul(2).and_then(|n| n.checked_mul(sizes.ring_size)).ok_or_else(|| {
                anyhow!("2 x {} VIPs x ring size {} does not fit a BPF array", sizes.max_vips, sizes.ring_size)
            })?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_VIPS, sizes.max_vips)
            .map_max_entries(MAP_STATS_VIP, sizes.max_vips)
            .map_max_entries(MAP_RINGS, ring_entries)
            .map_max_entries(MAP_CONNS, sizes.max_conns)
            .map_max_entries(MAP_NAT_REV, sizes.max_conns)
            .load(EBPF_OBJECT)
            .context("loading the XDP object")?;
        let program: &mut Xdp = program_mut(&mut ebpf)?;
        program.load().context("verifying and loading the XDP program")?;
        Ok(Self { ebpf, sizes })
    }

    pub fn sizes(&self) -> DataplaneSizes {
        self.sizes
    }

    /// Writes a backend's slot. Rings must only name slots written here.
    pub fn set_backend(&mut self, index: u32, backend: &Backend) -> Result<()> {
        let mut backends: Array<&mut MapData, Backend> = Array::try_from(map_mut(&mut self.ebpf, MAP_BACKENDS)?)?;
        backends.set(index, backend, 0).with_context(|| format!("writing backend {index}"))?;
        Ok(())
    }

    /// Publishes a VIP with a new Maglev table: the table goes into the VIP's inactive ring, then
    /// one update of the VIP's entry switches packets to it, so no packet sees a half-written table.
    pub fn publish_vip(&mut self, key: &VipKey, forwarding: &VipForwarding, table: &[u32]) -> Result<()> {
        let ring_size = self.sizes.ring_size;
        if table.len() != ring_size as usize {
            bail!("Maglev table has {} entries, the data plane expects {ring_size}", table.len());
        }
        if forwarding.vip_index >= self.sizes.max_vips {
            bail!("VIP slot {} is beyond the {} VIP slots", forwarding.vip_index, self.sizes.max_vips);
        }
        let base = forwarding.vip_index * 2 * ring_size;
        let active = self.vip(key)?.map(|meta| meta.ring_offset);
        let inactive = if active == Some(base) { base + ring_size } else { base };
        {
            let mut rings: Array<&mut MapData, u32> = Array::try_from(map_mut(&mut self.ebpf, MAP_RINGS)?)?;
            for (i, backend) in table.iter().enumerate() {
                rings.set(inactive + i as u32, backend, 0).context("writing the Maglev ring")?;
            }
        }
        let meta = VipMeta {
            vip_index: forwarding.vip_index,
            ring_offset: inactive,
            ring_size,
            mode: forwarding.mode,
            flags: 0,
            _pad: [0; 2],
            snat_addr: forwarding.snat_addr,
            snat_port_min: forwarding.snat_port_min,
            snat_port_max: forwarding.snat_port_max,
        };
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> = HashMap::try_from(map_mut(&mut self.ebpf, MAP_VIPS)?)?;
        vips.insert(key, meta, 0).context("publishing the VIP")?;
        Ok(())
    }

    pub fn vip(&self, key: &VipKey) -> Result<Option<VipMeta>> {
        let vips: HashMap<&MapData, VipKey, VipMeta> = HashMap::try_from(map(&self.ebpf, MAP_VIPS)?)?;
        not_found_is_none(vips.get(key, 0))
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let mut vips: HashMap<&mut MapData, VipKey, VipMeta> = HashMap::try_from(map_mut(&mut self.ebpf, MAP_VIPS)?)?;
        vips.remove(key).context("removing the VIP")?;
        Ok(())
    }

    /// The backend a client flow is pinned to, if any.
    pub fn connection(&self, flow: &FlowKey) -> Result<Option<ConnState>> {
        let conns: HashMap<&MapData, FlowKey, ConnState> = HashMap::try_from(map(&self.ebpf, MAP_CONNS)?)?;
        not_found_is_none(conns.get(flow, 0))
    }

    pub fn connections(&self) -> Result<Vec<(FlowKey, ConnState)>> {
        let conns: HashMap<&MapData, FlowKey, ConnState> = HashMap::try_from(map(&self.ebpf, MAP_CONNS)?)?;
        Ok(conns.iter().collect::<Result<_, _>>()?)
    }

    pub fn nat_reverses(&self) -> Result<Vec<(FlowKey, NatReverse)>> {
        let nat: HashMap<&MapData, FlowKey, NatReverse> = HashMap::try_from(map(&self.ebpf, MAP_NAT_REV)?)?;
        Ok(nat.iter().collect::<Result<_, _>>()?)
    }

    pub fn vip_traffic(&self, vip_index: u32) -> Result<Traffic> {
        sum_traffic(&self.ebpf, MAP_STATS_VIP, vip_index)
    }

    pub fn backend_traffic(&self, index: u32) -> Result<Traffic> {
        sum_traffic(&self.ebpf, MAP_STATS_BACKEND, index)
    }

    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN) and returns the verdict and the
    /// packet as the program left it.
    pub fn run_once(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program()?
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Attaches to `interface` in the current network namespace.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<()> {
        let program = program_mut(&mut self.ebpf)?;
        program
            .attach(interface, mode.xdp_mode())
            .with_context(|| format!("attaching XDP ({mode:?}) to {interface}"))?;
        Ok(())
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> Result<&Xdp> {
        self.ebpf
            .program(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object"))?
            .try_into()
            .context("program type")
    }

    /// Runs `program` (the load balancer, or a floor program) once on `frame` without copying
    /// the packet back, and returns the verdict and the kernel's measure of the run time.
    /// A floor program is loaded on first use.
    pub fn run_timed(&mut self, program: &str, frame: &[u8]) -> Result<(u32, std::time::Duration)> {
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("program {program} missing from the object"))?
            .try_into()?;
        if xdp.fd().is_err() {
            xdp.load().with_context(|| format!("loading {program}"))?;
        }
        let result =
            xdp.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() }).context("BPF_PROG_TEST_RUN")?;
        Ok((result.return_value, result.duration))
    }

    /// Runs the load balancer `repeat` times on one buffer (BPF_PROG_TEST_RUN's own repeat).
    pub fn run_repeated(&self, frame: &[u8], repeat: u32) -> Result<u32> {
        let result = self
            .program()?
            .test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        Ok(result.return_value)
    }

    /// Packets seen per verdict reason, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>> {
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(&self.ebpf, MAP_STATS_REASON)?)?;
        Reason::ALL.iter().map(|&reason| Ok((reason, stats.get(&(reason as u32), 0)?.iter().sum()))).collect()
    }

    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        Ok(self.reason_counters()?.into_iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| n))
    }
}

/// An XDP program that passes every frame, attached for as long as this value lives.
///
/// On a veth it lets the device receive the frames its peer sends with XDP_TX: the kernel needs
/// an XDP program (or GRO) on the receiving side, and GRO alone was seen to hold frames back.
pub struct PassThrough {
    _ebpf: Ebpf,
}

impl PassThrough {
    pub fn attach(interface: &str, mode: AttachMode) -> Result<Self> {
        // The object's maps are created too; keep them tiny, this program uses none.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_RINGS, 2)
            .map_max_entries(MAP_CONNS, 2)
            .map_max_entries(MAP_NAT_REV, 2)
            .load(EBPF_OBJECT)
            .context("loading the XDP object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PASS_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PASS_PROGRAM_NAME} missing from the object"))?
            .try_into()?;
        program.load().context("loading the pass-through program")?;
        program
            .attach(interface, mode.xdp_mode())
            .with_context(|| format!("attaching pass-through XDP to {interface}"))?;
        Ok(Self { _ebpf: ebpf })
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object"))?
        .try_into()
        .context("program type")
}

fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Map> {
    ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn not_found_is_none<V: Pod>(result: Result<V, MapError>) -> Result<Option<V>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn sum_traffic(ebpf: &Ebpf, name: &str, index: u32) -> Result<Traffic> {
    let stats: PerCpuArray<&MapData, Traffic> = PerCpuArray::try_from(map(ebpf, name)?)?;
    Ok(stats.get(&index, 0)?.iter().fold(Traffic::default(), |sum, cpu| Traffic {
        packets: sum.packets + cpu.packets,
        bytes: sum.bytes + cpu.bytes,
        new_flows: sum.new_flows + cpu.new_flows,
    }))
}
