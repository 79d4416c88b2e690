//! What the daemon learns about its network interface: its kind, the XDP program on it, its veth
//! peer, and the driver's count of frames it failed to send back out (XDP_TX).

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::os::fd::AsRawFd;
use std::process::Command;

/// One interface as `ip -j -d link show` describes it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Interface {
    pub ifindex: u32,
    pub ifname: String,
    /// The peer's ifindex (a veth's other end).
    #[serde(default)]
    pub link_index: Option<u32>,
    /// The namespace of the peer, as an id of this namespace's, when it is another namespace.
    #[serde(default)]
    pub link_netnsid: Option<i32>,
    #[serde(default)]
    pub linkinfo: Option<LinkInfo>,
    #[serde(default)]
    pub xdp: Option<XdpInfo>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LinkInfo {
    #[serde(default)]
    pub info_kind: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct XdpInfo {
    /// 1 native (driver), 2 generic (skb), 3 offloaded.
    #[serde(default)]
    pub mode: u8,
    #[serde(default)]
    pub prog: Option<XdpProgram>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct XdpProgram {
    pub id: u32,
    #[serde(default)]
    pub name: Option<String>,
}

/// The kernel's XDP attach mode numbers (`XDP_ATTACHED_*`).
const XDP_ATTACHED_DRV: u8 = 1;

impl Interface {
    pub fn is_veth(&self) -> bool {
        self.linkinfo.as_ref().and_then(|l| l.info_kind.as_deref()) == Some("veth")
    }

    /// The XDP program attached to the interface, if any.
    pub fn xdp_program(&self) -> Option<&XdpProgram> {
        self.xdp.as_ref().and_then(|x| x.prog.as_ref())
    }

    fn has_native_xdp(&self) -> bool {
        self.xdp.as_ref().is_some_and(|x| x.mode == XDP_ATTACHED_DRV && x.prog.is_some())
    }
}

/// Every interface of the current network namespace.
pub fn interfaces() -> Result<Vec<Interface>> {
    let output = Command::new("ip").args(["-j", "-d", "link", "show"]).output().context("running `ip link show`")?;
    if !output.status.success() {
        bail!("`ip -j -d link show` failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    serde_json::from_slice(&output.stdout).context("reading `ip -j -d link show`")
}

/// The interface called `name` in the current network namespace.
pub fn interface(name: &str) -> Result<Interface> {
    interfaces()?
        .into_iter()
        .find(|i| i.ifname == name)
        .with_context(|| format!("no interface {name} in this network namespace"))
}

/// Why the frames this load balancer sends back out of `iface` (XDP_TX) would not arrive, or
/// None when they do. A veth delivers an XDP_TX frame only when its peer runs NAPI: with a
/// native XDP program of its own (GRO alone drops nothing, but a burst that fills the peer's
/// ring was seen to stall the link for good on Linux 6.18). Other drivers transmit XDP_TX
/// frames themselves.
pub fn xdp_tx_problem(iface: &Interface) -> Option<String> {
    if !iface.is_veth() {
        return None;
    }
    let fix = |peer: &str| {
        format!(
            "give the peer an XDP program that passes every frame: `lb xdp-pass attach {peer}`, run where {peer} lives"
        )
    };
    match veth_peer(iface) {
        Ok(Some((peer, place))) if peer.has_native_xdp() => {
            tracing::debug!(peer = %peer.ifname, %place, "the veth peer runs native XDP: XDP_TX frames arrive");
            None
        }
        Ok(Some((peer, place))) => Some(format!(
            "{} is a veth whose peer {} ({place}) has no native XDP program: the kernel drops the frames this load \
             balancer sends back out (XDP_TX), or stalls under bursts when only GRO is on. Fix: {}",
            iface.ifname,
            peer.ifname,
            fix(&peer.ifname)
        )),
        Ok(None) | Err(_) => Some(format!(
            "{} is a veth whose peer (ifindex {}) is in a network namespace this daemon cannot see: unless the peer runs \
             a native XDP program, the kernel drops the frames this load balancer sends back out (XDP_TX). Fix: {}",
            iface.ifname,
            iface.link_index.unwrap_or(0),
            fix("<peer>")
        )),
    }
}

/// Finds a veth's peer: in this namespace, in a named one (`ip netns`), or in PID 1's. Returns
/// the peer and where it was found.
fn veth_peer(iface: &Interface) -> Result<Option<(Interface, String)>> {
    let Some(peer_index) = iface.link_index else { return Ok(None) };
    let is_peer = |candidate: &Interface| candidate.ifindex == peer_index && candidate.is_veth();
    let Some(nsid) = iface.link_netnsid else {
        return Ok(interfaces()?.into_iter().find(is_peer).map(|p| (p, "this network namespace".into())));
    };
    #[derive(Deserialize)]
    struct NsId {
        nsid: i32,
        name: Option<String>,
    }
    let output = Command::new("ip").args(["-j", "netns", "list-id"]).output()?;
    let ids: Vec<NsId> = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let mut places: Vec<(String, String)> = Vec::new();
    if let Some(name) = ids.into_iter().find(|id| id.nsid == nsid).and_then(|id| id.name) {
        places.push((format!("/run/netns/{name}"), format!("network namespace {name}")));
    }
    places.push(("/proc/1/ns/net".into(), "the host's network namespace".into()));
    for (path, place) in places {
        let Ok(found) = in_netns(&path, interfaces) else { continue };
        // The peer's own peer must be us, or this is another namespace's interface.
        if let Some(peer) = found.into_iter().find(|c| is_peer(c) && c.link_index == Some(iface.ifindex)) {
            return Ok(Some((peer, place)));
        }
    }
    Ok(None)
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a namespace fd changes only this thread's network namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("entering {path}: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("inspecting {path} panicked"))
    })
}

/// The driver's count of frames it could not send back out with XDP_TX, summed over queues
/// (veth: `rx_queue_N_xdp_tx_errors`; mlx5: `rx_xdp_tx_err`, …). None when the driver does not
/// count them.
pub fn xdp_tx_errors(interface: &str) -> Result<Option<u64>> {
    let stats = ethtool::driver_stats(interface)?;
    let failures: Vec<u64> = stats
        .into_iter()
        .filter(|(name, _)| name.contains("xdp_tx_err") || name.contains("xdp_tx_drop"))
        .map(|(_, value)| value)
        .collect();
    Ok((!failures.is_empty()).then(|| failures.iter().sum()))
}

/// The driver statistics of `ethtool -S`, read with the SIOCETHTOOL ioctl.
mod ethtool {
    use anyhow::{Result, bail};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GSSET_INFO: u32 = 0x37;
    const ETHTOOL_GSTRINGS: u32 = 0x1b;
    const ETHTOOL_GSTATS: u32 = 0x1d;
    const ETH_SS_STATS: u32 = 1;
    const ETH_GSTRING_LEN: usize = 32;

    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }

    fn ioctl(socket: &OwnedFd, interface: &str, data: *mut libc::c_void) -> std::io::Result<()> {
        let mut request = IfReq { name: [0; libc::IFNAMSIZ], data, _pad: [0; 16] };
        let name = interface.as_bytes();
        if name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        request.name[..name.len()].copy_from_slice(name);
        // SAFETY: SIOCETHTOOL with an ifreq whose data points at a buffer sized for the command.
        if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut request) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// (name, value) of every driver statistic; empty when the driver has none.
    pub fn driver_stats(interface: &str) -> Result<Vec<(String, u64)>> {
        // SAFETY: a plain datagram socket, owned from here on.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            bail!("socket for ethtool: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // ethtool_sset_info: cmd, reserved, sset_mask, then one u32 per set in the mask.
        let mut info = [0u32; 5];
        info[0] = ETHTOOL_GSSET_INFO;
        info[2] = 1 << ETH_SS_STATS; // sset_mask (u64, little end first)
        if let Err(error) = ioctl(&socket, interface, info.as_mut_ptr().cast()) {
            if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(Vec::new());
            }
            bail!("reading {interface}'s driver statistics: {error}");
        }
        let count = if info[2] & (1 << ETH_SS_STATS) != 0 { info[4] as usize } else { 0 };
        if count == 0 {
            return Ok(Vec::new());
        }
        // ethtool_gstrings: cmd, string_set, len, then len names of 32 bytes.
        let mut strings = vec![0u8; 12 + count * ETH_GSTRING_LEN];
        strings[0..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
        strings[4..8].copy_from_slice(&ETH_SS_STATS.to_ne_bytes());
        strings[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
        ioctl(&socket, interface, strings.as_mut_ptr().cast())?;
        // ethtool_stats: cmd, n_stats, then n_stats u64 values.
        let mut values = vec![0u64; 1 + count];
        values[0] = ETHTOOL_GSTATS as u64 | ((count as u64) << 32);
        ioctl(&socket, interface, values.as_mut_ptr().cast())?;
        Ok((0..count)
            .map(|i| {
                let raw = &strings[12 + i * ETH_GSTRING_LEN..12 + (i + 1) * ETH_GSTRING_LEN];
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                (String::from_utf8_lossy(&raw[..end]).into_owned(), values[1 + i])
            })
            .collect())
    }
}
