//! Running the program without an interface (BPF_PROG_TEST_RUN), and the pass-through helper
//! program that test topologies attach to veth peers.

use super::{AttachMode, Dataplane, EBPF_OBJECT, program_mut};
use anyhow::{Context, Result, anyhow};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use lb_common::maps::{
    FLOOR_TX_PROGRAM_NAME, MAP_CONNS, MAP_NAT_REV, MAP_RINGS, MAP_SINK_COUNT, PASS_PROGRAM_NAME, SINK_PROGRAM_NAME,
};
use std::time::Duration;

impl Dataplane {
    /// Runs the program once on `frame` and returns the verdict and the packet as the program
    /// left it.
    pub fn run_once(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program()?
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs `program` (the load balancer, or a floor program) once on `frame` without copying
    /// the packet back; returns the verdict and the kernel's measure of the run. A floor program
    /// is loaded on first use.
    pub fn run_timed(&mut self, program: &str, frame: &[u8]) -> Result<(u32, Duration)> {
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

    /// Loads the program only (for `lb verify`): the verifier's verdict and the sizes.
    pub fn verify() -> Result<(usize, u32, u32)> {
        let mut ebpf = small_object()?;
        let program = program_mut(&mut ebpf)?;
        program.load().context("verifying and loading the XDP program")?;
        let info = program.info()?;
        Ok((EBPF_OBJECT.len(), info.size_translated().unwrap_or(0), info.size_jitted()))
    }
}

/// The object with tiny maps, for programs that use none of them.
pub(super) fn small_object() -> Result<Ebpf> {
    small_object_with(|_| {})
}

/// The same, with more loader settings (e.g. pinned maps to reuse).
pub(super) fn small_object_with<'a>(customize: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(MAP_RINGS, 2).map_max_entries(MAP_CONNS, 2).map_max_entries(MAP_NAT_REV, 2);
    customize(&mut loader);
    loader.load(EBPF_OBJECT).context("loading the XDP object")
}

/// Loads `program` from the small object and attaches it to `interface`.
fn attach_small(program: &str, interface: &str, mode: AttachMode) -> Result<(Ebpf, aya::programs::xdp::XdpLinkId)> {
    let mut ebpf = small_object()?;
    let xdp: &mut Xdp =
        ebpf.program_mut(program).ok_or_else(|| anyhow!("program {program} missing from the object"))?.try_into()?;
    xdp.load().with_context(|| format!("loading {program}"))?;
    let link = xdp.attach(interface, mode.xdp_mode()).with_context(|| format!("attaching {program} to {interface}"))?;
    Ok((ebpf, link))
}

/// An XDP program that passes every frame, attached for as long as this value lives.
///
/// On a veth it lets the device receive the frames its peer sends with XDP_TX: the kernel needs
/// an XDP program (or GRO) on the receiving side, and GRO alone was seen to hold frames back.
pub struct PassThrough {
    ebpf: Ebpf,
    link: Option<aya::programs::xdp::XdpLinkId>,
}

impl PassThrough {
    pub fn attach(interface: &str, mode: AttachMode) -> Result<Self> {
        let (ebpf, link) = attach_small(PASS_PROGRAM_NAME, interface, mode)?;
        Ok(Self { ebpf, link: Some(link) })
    }

    /// Where `lb xdp-pass attach` pins the program for `interface` of the current network
    /// namespace (bpffs is shared by every namespace, so the path names this one).
    pub fn pin_path(interface: &str) -> Result<std::path::PathBuf> {
        use std::os::unix::fs::MetadataExt;
        if interface.is_empty() || interface.contains('/') {
            anyhow::bail!("{interface:?} is not an interface name");
        }
        let netns = std::fs::metadata("/proc/self/ns/net").context("reading this network namespace")?.ino();
        let root = std::path::Path::new(super::BPFFS_ROOT);
        if let Some(warning) = super::bpffs::ensure_mounted(root)? {
            // A pin there would vanish with this command, and the program with it.
            anyhow::bail!("{warning}");
        }
        let dir = root.join("lb-xdp-pass");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!("netns{netns}-{interface}")))
    }

    /// Keeps the program attached after this process exits, by pinning its link at `path`
    /// (remove the file, or the interface, to detach it).
    pub fn pin(mut self, path: &std::path::Path) -> Result<()> {
        let program: &mut Xdp = self.ebpf.program_mut(PASS_PROGRAM_NAME).context("pass-through program")?.try_into()?;
        let link = program.take_link(self.link.take().context("already pinned")?)?;
        let fd_link =
            aya::programs::links::FdLink::try_from(link).context("the pass-through attach gave no BPF link")?;
        fd_link.pin(path).with_context(|| format!("pinning the pass-through link at {}", path.display()))?;
        Ok(())
    }
}

/// The floor of any forwarding XDP program on an interface: swaps the MAC addresses and sends
/// every frame back out (XDP_TX). Throughput benchmarks run it in the balancer's place to measure
/// what the topology itself carries. Detached when dropped.
pub struct ForwardFloor {
    _ebpf: Ebpf,
}

impl ForwardFloor {
    pub fn attach(interface: &str, mode: AttachMode) -> Result<Self> {
        // As for the sink, the link lives as long as the object.
        let (ebpf, _link) = attach_small(FLOOR_TX_PROGRAM_NAME, interface, mode)?;
        Ok(Self { _ebpf: ebpf })
    }
}

/// Counts and drops every frame arriving on an interface: the receiving end of throughput
/// benchmarks. Detached when dropped.
pub struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    pub fn attach(interface: &str, mode: AttachMode) -> Result<Self> {
        // The link lives as long as the object: dropping the sink detaches it.
        let (ebpf, _link) = attach_small(SINK_PROGRAM_NAME, interface, mode)?;
        Ok(Self { ebpf })
    }

    /// Frames received so far, over all CPUs.
    pub fn count(&self) -> Result<u64> {
        let map = self.ebpf.map(MAP_SINK_COUNT).ok_or_else(|| anyhow!("map {MAP_SINK_COUNT} missing"))?;
        let counts: aya::maps::PerCpuArray<&aya::maps::MapData, u64> = aya::maps::PerCpuArray::try_from(map)?;
        Ok(counts.get(&0, 0)?.iter().sum())
    }
}
