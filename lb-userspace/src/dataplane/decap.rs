//! `lb decap` on a backend: the decapsulation program (`lb_decap`) on one interface, pinned so
//! that it stays attached after the command exits, its GUE port, and its counters.
//!
//! ```text
//! /sys/fs/bpf/lb-decap/netns<inode>-<interface>/link             keeps the program attached
//! /sys/fs/bpf/lb-decap/netns<inode>-<interface>/DECAP_SETTINGS   the GUE port
//! /sys/fs/bpf/lb-decap/netns<inode>-<interface>/DECAP_STATS      packets per verdict
//! ```
//!
//! bpffs is shared by every network namespace, so the directory names this one (as
//! `lb xdp-pass` does). No daemon is involved.

use super::pins::map_type;
use super::probe::small_object;
use super::{AttachMode, BPFFS_ROOT};
use crate::netdev::{self, Interface};
use anyhow::{Context, Result, anyhow, bail};
use aya::Ebpf;
use aya::maps::{Array, MapData, MapInfo, PerCpuArray};
use aya::programs::Xdp;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use lb_common::decap::{DECAP_PROGRAM_NAME, DecapSettings, DecapVerdict, MAP_DECAP_SETTINGS, MAP_DECAP_STATS};
use lb_common::layout::map_spec;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The directory under bpffs that holds one directory per (namespace, interface).
pub const DECAP_PIN_DIR: &str = "lb-decap";
const LINK_PIN: &str = "link";
const MAPS: [&str; 2] = [MAP_DECAP_SETTINGS, MAP_DECAP_STATS];

/// Where decapsulation on one interface of this network namespace is pinned.
#[derive(Clone, Debug)]
pub struct DecapPins {
    interface: String,
    dir: PathBuf,
}

impl DecapPins {
    /// The pins for `interface` of the current network namespace (they need not exist).
    pub fn for_interface(interface: &str) -> Result<Self> {
        if interface.is_empty() || interface.contains('/') {
            bail!("{interface:?} is not an interface name");
        }
        let dir = root().join(format!("{}{interface}", netns_prefix()?));
        Ok(Self { interface: interface.to_string(), dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn link(&self) -> PathBuf {
        self.dir.join(LINK_PIN)
    }

    fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes the pins (the program leaves the interface with its link) and the shared
    /// directory when no other interface's are left. False when there was nothing.
    pub fn remove(&self) -> Result<bool> {
        if !self.dir.exists() {
            return Ok(false);
        }
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))?;
        let _ = std::fs::remove_dir(root()); // only when empty
        Ok(true)
    }
}

fn root() -> PathBuf {
    Path::new(BPFFS_ROOT).join(DECAP_PIN_DIR)
}

/// `netns<inode>-`: what this namespace's pin directories start with.
fn netns_prefix() -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata("/proc/self/ns/net").context("reading this network namespace")?.ino();
    Ok(format!("netns{inode}-"))
}

/// What `lb decap attach` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecapAttach {
    /// Attached now.
    Fresh,
    /// Attached already with this build's program.
    Already,
    /// Attached already with another build's program: replaced atomically in the same link
    /// (`counters_kept`: the pinned counters fit this build and go on).
    Upgraded { counters_kept: bool },
    /// The pins no longer held the interface (why): removed, and attached anew.
    Replaced { stale: String },
}

/// The outcome of `lb decap attach`.
#[derive(Clone, Debug)]
pub struct DecapAttached {
    pub how: DecapAttach,
    /// The GUE port before (when attached already) and now; 0: GUE off.
    pub previous_gue_port: Option<u16>,
    pub gue_port: u16,
    pub pin_dir: PathBuf,
}

/// Attaches decapsulation to `interface` (GUE on `gue_port`, 0 for IPIP only) and pins it, or
/// brings an existing attachment to this build's program and this port.
pub fn attach(interface: &str, gue_port: u16, mode: AttachMode) -> Result<DecapAttached> {
    let pins = DecapPins::for_interface(interface)?;
    if let Some(warning) = super::bpffs::ensure_mounted(Path::new(BPFFS_ROOT))? {
        // A pin there would vanish with this command, and the program with it.
        bail!("{warning}");
    }
    let iface = netdev::interface(interface)?;
    if let Some(problem) = ipv6_forwarding_problem(interface) {
        bail!("{problem}");
    }
    let mut stale = None;
    if pins.link().exists() {
        match live_link(&pins, &iface)? {
            Ok(link) => return update(&pins, link, gue_port),
            Err(why) => stale = Some(why),
        }
    }
    // A stale attachment, or what an interrupted attach left.
    pins.remove()?;
    if let Some(other) = iface.xdp_program() {
        bail!(
            "{interface} already runs an XDP program `lb decap` did not attach (id {}, {}): an interface takes one \
             XDP program; remove it (`ip link set dev {interface} xdp off`) or attach to another interface",
            other.id,
            other.name.as_deref().unwrap_or("unnamed")
        );
    }
    let mut ebpf = small_object()?;
    set_gue_port(&mut settings_of(&mut ebpf)?, gue_port)?;
    let program = decap_program(&mut ebpf)?;
    program.load().context("verifying and loading the decapsulation program")?;
    let id = program.attach(interface, mode.xdp_mode()).with_context(|| {
        let hint = match mode {
            AttachMode::Native => {
                ": the driver may lack native XDP; `--xdp-mode generic` runs it in the stack instead (slower)"
            }
            AttachMode::Generic => "",
        };
        format!("attaching the decapsulation program to {interface} ({mode:?} XDP){hint}")
    })?;
    let link = FdLink::try_from(program.take_link(id)?).context("XDP attach gave no BPF link (kernel before 5.9?)")?;
    let pinned = pin_all(&pins, &ebpf, link);
    if pinned.is_err() {
        // The link was not pinned, so the program leaves the interface as this process exits.
        let _ = pins.remove();
    }
    pinned?;
    let how = match stale {
        Some(stale) => DecapAttach::Replaced { stale },
        None => DecapAttach::Fresh,
    };
    Ok(DecapAttached { how, previous_gue_port: None, gue_port, pin_dir: pins.dir.clone() })
}

/// The maps first, the link last: a pinned link always has its maps beside it.
fn pin_all(pins: &DecapPins, ebpf: &Ebpf, link: FdLink) -> Result<()> {
    std::fs::create_dir_all(&pins.dir).with_context(|| format!("creating {}", pins.dir.display()))?;
    for name in MAPS {
        let map = ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        map.pin(pins.map(name)).with_context(|| format!("pinning {name} in {}", pins.dir.display()))?;
    }
    link.pin(pins.link()).with_context(|| format!("pinning the XDP link in {}", pins.dir.display()))?;
    Ok(())
}

/// Attached already: the GUE port set, and the program replaced in its link (keeping the
/// counters when they fit) when another build's runs.
fn update(pins: &DecapPins, link: XdpLink, gue_port: u16) -> Result<DecapAttached> {
    let running = link_program(&pins.link())?;
    let previous_gue_port = gue_port_of(&pins.map(MAP_DECAP_SETTINGS)).ok();
    let maps_fit = MAPS.iter().all(|name| pinned_map_fits(&pins.map(name)));
    if !maps_fit {
        // Another build's layout: this build's maps replace them (the counters start again).
        for name in MAPS {
            let _ = std::fs::remove_file(pins.map(name));
        }
    }
    let mut ebpf = reusing_pins(pins)?;
    set_gue_port(&mut settings_of(&mut ebpf)?, gue_port)?;
    let program = decap_program(&mut ebpf)?;
    program.load().context("verifying and loading the decapsulation program")?;
    let tag = program.info().context("reading the loaded program")?.tag();
    let how = if maps_fit && loaded_tag(running) == Some(tag) {
        DecapAttach::Already
    } else {
        // The link keeps the new program, the pins keep the maps: nothing is lost as this exits.
        program.attach_to_link(link).context("replacing the program in the pinned XDP link")?;
        DecapAttach::Upgraded { counters_kept: maps_fit }
    };
    Ok(DecapAttached { how, previous_gue_port, gue_port, pin_dir: pins.dir.clone() })
}

/// The object with its decapsulation maps taken from (or, when missing, pinned to) `pins`.
fn reusing_pins(pins: &DecapPins) -> Result<Ebpf> {
    let settings = pins.map(MAP_DECAP_SETTINGS);
    let stats = pins.map(MAP_DECAP_STATS);
    super::probe::small_object_with(|loader| {
        loader.map_pin_path(MAP_DECAP_SETTINGS, settings.as_path()).map_pin_path(MAP_DECAP_STATS, stats.as_path());
    })
}

/// Whether a pinned map has the type, key and value sizes and entries of this build's.
fn pinned_map_fits(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    let Some(spec) = map_spec(name) else { return false };
    let Ok(info) = MapInfo::from_pin(path) else { return false };
    let wanted = spec.entries.resolve(&Default::default());
    info.map_type().ok() == Some(map_type(spec.kind))
        && (info.key_size(), info.value_size()) == (spec.key_size, spec.value_size)
        && Some(info.max_entries()) == wanted
}

/// The pinned link when its program is the one `iface` runs; otherwise why it is stale.
fn live_link(pins: &DecapPins, iface: &Interface) -> Result<Result<XdpLink, String>> {
    super::pinned::pinned_link_on(&pins.link(), iface)
}

fn link_program(path: &Path) -> Result<u32> {
    let pinned = PinnedLink::from_pin(path).with_context(|| format!("opening the pinned link {}", path.display()))?;
    Ok(FdLink::from(pinned).info().context("reading the pinned link")?.program_id())
}

fn loaded_tag(program_id: u32) -> Option<u64> {
    aya::programs::loaded_programs().filter_map(Result::ok).find(|p| p.id() == program_id).map(|p| p.tag())
}

fn decap_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(DECAP_PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program {DECAP_PROGRAM_NAME} missing from the object"))?
        .try_into()
        .context("program type")
}

fn settings_of(ebpf: &mut Ebpf) -> Result<Array<&mut MapData, DecapSettings>> {
    let map = ebpf.map_mut(MAP_DECAP_SETTINGS).ok_or_else(|| anyhow!("map {MAP_DECAP_SETTINGS} missing"))?;
    Ok(Array::try_from(map)?)
}

fn set_gue_port(settings: &mut Array<&mut MapData, DecapSettings>, port: u16) -> Result<()> {
    let value = DecapSettings { gue_port: port.to_be(), _pad: [0; 2] };
    settings.set(0, value, 0).context("writing the GUE port")
}

fn gue_port_of(path: &Path) -> Result<u16> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let settings: Array<MapData, DecapSettings> = Array::try_from(aya::maps::Map::Array(data))?;
    Ok(u16::from_be(settings.get(&0, 0).context("reading the GUE port")?.gue_port))
}

/// Removes decapsulation from `interface`. Errors when `lb decap attach` left nothing there.
pub fn detach(interface: &str) -> Result<PathBuf> {
    let pins = DecapPins::for_interface(interface)?;
    if !pins.remove()? {
        bail!(
            "{interface} has no decapsulation attached by `lb decap attach` in this network namespace ({} is missing)",
            pins.dir.display()
        );
    }
    Ok(pins.dir)
}

/// One interface with decapsulation, as `lb decap status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DecapStatus {
    pub interface: String,
    /// "attached", or why the pins no longer hold the interface.
    pub state: String,
    /// "native" or "generic", while attached.
    pub xdp_mode: Option<String>,
    /// 0: GUE off (IPIP only).
    pub gue_port: u16,
    pub program_id: Option<u32>,
    pub pin_dir: String,
    /// Packets per verdict since attached, summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
    /// What keeps decapsulation from working as it should.
    pub warnings: Vec<String>,
}

/// Every interface of this network namespace with decapsulation pinned, by name.
pub fn status() -> Result<Vec<DecapStatus>> {
    let prefix = netns_prefix()?;
    let entries = match std::fs::read_dir(root()) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", root().display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix(&prefix)).map(str::to_string))
        .collect();
    names.sort();
    let interfaces = netdev::interfaces()?;
    names.iter().map(|name| status_of(&DecapPins::for_interface(name)?, &interfaces)).collect()
}

fn status_of(pins: &DecapPins, interfaces: &[Interface]) -> Result<DecapStatus> {
    let name = &pins.interface;
    let program = link_program(&pins.link()).ok();
    let iface = interfaces.iter().find(|i| &i.ifname == name);
    let running = iface.and_then(|i| i.xdp_program()).map(|p| p.id);
    let state = match (program, iface, running) {
        (None, _, _) => "incomplete pins: run `lb decap attach` again, or `lb decap detach`".to_string(),
        (Some(_), None, _) => format!("stale: no interface {name} in this network namespace"),
        (Some(p), Some(_), Some(r)) if p == r => "attached".to_string(),
        (Some(p), Some(_), Some(r)) => format!("stale: {name} runs XDP program {r}, not the pinned link's {p}"),
        (Some(p), Some(_), None) => format!("stale: the pinned link's program {p} is not on {name}"),
    };
    let attached = state == "attached";
    let xdp_mode = iface.and_then(|i| i.xdp.as_ref()).filter(|_| attached).map(|x| match x.mode {
        1 => "native".to_string(),
        2 => "generic".to_string(),
        other => format!("mode {other}"),
    });
    let counters = counters(&pins.map(MAP_DECAP_STATS)).unwrap_or_default();
    let gue_port = gue_port_of(&pins.map(MAP_DECAP_SETTINGS)).unwrap_or(0);
    let warnings = ipv6_forwarding_problem(name).into_iter().collect();
    Ok(DecapStatus {
        interface: name.clone(),
        state,
        xdp_mode,
        gue_port,
        program_id: program,
        pin_dir: pins.dir.display().to_string(),
        counters,
        warnings,
    })
}

fn counters(path: &Path) -> Result<BTreeMap<&'static str, u64>> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    DecapVerdict::ALL
        .iter()
        .map(|&verdict| Ok((verdict.name(), stats.get(&(verdict as u32), 0)?.iter().sum())))
        .collect()
}

/// The program asks the kernel whether it would forward a packet that arrived on the interface,
/// and the kernel's answer for IPv6 reads the interface's `forwarding`, while IPv6 forwarding
/// itself follows `all.forwarding` (or the interface's `force_forwarding`): an interface at 0
/// under `all` at 1 would forward tunnelled packets the program takes as undeliverable anywhere
/// else. A relay: refused.
fn ipv6_forwarding_problem(interface: &str) -> Option<String> {
    let read = |path: String| std::fs::read_to_string(path).ok().map(|v| v.trim() != "0");
    let conf = |dev: &str, key: &str| read(format!("/proc/sys/net/ipv6/conf/{dev}/{key}"));
    let own = conf(interface, "forwarding")?;
    let forwards = conf("all", "forwarding") == Some(true) || conf(interface, "force_forwarding") == Some(true);
    (forwards && !own).then(|| {
        format!(
            "IPv6 forwarding is on in this namespace but net.ipv6.conf.{interface}.forwarding is 0: the kernel would \
             forward tunnelled IPv6 packets that the decapsulation program takes as undeliverable (an open relay). \
             Set net.ipv6.conf.{interface}.forwarding to 1 (or turn IPv6 forwarding off)"
        )
    })
}

/// The decapsulation program loaded but attached nowhere: BPF_PROG_TEST_RUN runs it on crafted
/// frames (tests). Its route lookups see the network namespace of the thread that runs it.
pub struct DecapProgram {
    ebpf: Ebpf,
}

impl DecapProgram {
    pub fn load(gue_port: u16) -> Result<Self> {
        let mut ebpf = small_object()?;
        set_gue_port(&mut settings_of(&mut ebpf)?, gue_port)?;
        decap_program(&mut ebpf)?.load().context("verifying and loading the decapsulation program")?;
        Ok(Self { ebpf })
    }

    pub fn set_gue_port(&mut self, port: u16) -> Result<()> {
        set_gue_port(&mut settings_of(&mut self.ebpf)?, port)
    }

    /// Runs the program once on `frame`, as if it had arrived on the interface `ingress_ifindex`
    /// (None: the namespace's loopback, as BPF_PROG_TEST_RUN does by default). Returns the XDP
    /// verdict and the frame as the program left it.
    pub fn run(&self, frame: &[u8], ingress_ifindex: Option<u32>) -> Result<(u32, Vec<u8>)> {
        use aya::programs::{TestRun, TestRunOptions};
        let program: &Xdp = self
            .ebpf
            .program(DECAP_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {DECAP_PROGRAM_NAME} missing"))?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u32; 6];
        ctx[1] = frame.len() as u32;
        ctx[3] = ingress_ifindex.unwrap_or(0);
        let ctx: Vec<u8> = ctx.iter().flat_map(|word| word.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ingress_ifindex.map(|_| ctx.as_slice()),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Packets per verdict so far, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(DecapVerdict, u64)>> {
        let map = self.ebpf.map(MAP_DECAP_STATS).ok_or_else(|| anyhow!("map {MAP_DECAP_STATS} missing"))?;
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        DecapVerdict::ALL.iter().map(|&v| Ok((v, stats.get(&(v as u32), 0)?.iter().sum()))).collect()
    }

    /// How many instructions the verifier processed to accept the program.
    pub fn verified_instructions(&self) -> Result<Option<u32>> {
        let program: &Xdp = self
            .ebpf
            .program(DECAP_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {DECAP_PROGRAM_NAME} missing"))?
            .try_into()?;
        Ok(program.info()?.verified_instruction_count())
    }
}
