//! Owning the pair's addresses on this node: the master adds them to its interface (so its
//! kernel answers ARP and neighbour solicitations for them) and tells the segment at once with
//! gratuitous ARP and unsolicited neighbour advertisements; a node that is not master removes them.

use anyhow::{Context, Result, bail};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

/// How many announcements a new master sends per address (keepalived sends 5 by default): one
/// lost frame must not leave a neighbour cache pointing at the old master.
const ANNOUNCEMENTS: usize = 3;

/// Adds `addresses` to `interface` (those already there are kept) and announces them.
pub fn claim(interface: &str, addresses: &[IpAddr]) -> Result<()> {
    for address in addresses {
        let (prefix, extra): (&str, &[&str]) = match address {
            // The node's own traffic leaves from its subnet's primary address, never from this /32.
            IpAddr::V4(_) => ("32", &[]),
            // No duplicate address detection: the address must work now, and the peer gave it up.
            // Deprecated at once (preferred lifetime 0): it still receives and answers neighbour
            // solicitations, but source address selection (RFC 6724 rule 3) never picks it for
            // the node's own traffic. Otherwise health checks could leave from the VIP or the
            // SNAT address, and their answers would go to whichever node holds it next.
            IpAddr::V6(_) => ("128", &["nodad", "preferred_lft", "0"]),
        };
        let cidr = format!("{address}/{prefix}");
        let mut args = vec!["addr", "replace", &cidr, "dev", interface];
        args.extend_from_slice(extra);
        ip(&args)?;
    }
    let mac = crate::neighbor::interface_mac(interface)?;
    let socket = PacketSocket::open(interface)?;
    for _ in 0..ANNOUNCEMENTS {
        for address in addresses {
            let frame = match address {
                IpAddr::V4(v4) => gratuitous_arp(mac, *v4),
                IpAddr::V6(v6) => unsolicited_na(mac, *v6),
            };
            socket.send(&frame).with_context(|| format!("announcing {address} on {interface}"))?;
        }
    }
    Ok(())
}

/// Removes those of `addresses` that `interface` holds.
pub fn release(interface: &str, addresses: &[IpAddr]) -> Result<()> {
    let held: Vec<IpAddr> = held_addresses(interface)?.into_iter().map(|h| h.address).collect();
    for address in addresses.iter().filter(|a| held.contains(a)) {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        ip(&["addr", "del", &format!("{address}/{prefix}"), "dev", interface])?;
    }
    Ok(())
}

/// An address configured on an interface.
pub struct HeldAddress {
    pub address: IpAddr,
    /// IPv6 only: still in duplicate address detection, so the kernel refuses it as a source
    /// until it passes.
    pub tentative: bool,
    /// IPv6 only: duplicate address detection found another node using it.
    pub dad_failed: bool,
}

/// The addresses configured on `interface`.
pub fn held_addresses(interface: &str) -> Result<Vec<HeldAddress>> {
    let links = crate::neighbor::ip_json(&["addr", "show", "dev", interface])?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|info| {
            let flag = |name: &str| info[name].as_bool().unwrap_or(false);
            Some(HeldAddress {
                address: info["local"].as_str()?.parse().ok()?,
                tentative: flag("tentative"),
                dad_failed: flag("dadfailed"),
            })
        })
        .collect())
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// A gratuitous ARP request (sender = target = the address), broadcast, as RFC 5227 §3 and
/// keepalived send it.
pub fn gratuitous_arp(mac: [u8; 6], address: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&address.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&address.octets());
    frame
}

/// An unsolicited neighbour advertisement to all nodes (RFC 4861 §7.2.6): override set, with
/// our link-layer address, hop limit 255 (receivers drop anything else).
pub fn unsolicited_na(mac: [u8; 6], address: Ipv6Addr) -> Vec<u8> {
    let all_nodes: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0]); // type NA, code 0, checksum below
    icmp.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // Override
    icmp.extend_from_slice(&address.octets());
    icmp.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    icmp.extend_from_slice(&mac);
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&address.octets());
    pseudo.extend_from_slice(&all_nodes.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let sum = lb_common::csum::add_words(lb_common::csum::add_words(0, &pseudo), &icmp);
    let check = !lb_common::csum::fold(sum);
    icmp[2..4].copy_from_slice(&check.to_ne_bytes());

    let mut frame = Vec::with_capacity(14 + 40 + icmp.len());
    frame.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&address.octets());
    frame.extend_from_slice(&all_nodes.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// A raw link-layer socket bound to one interface, for frames the kernel would not send itself.
struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn open(interface: &str) -> Result<Self> {
        use std::os::fd::FromRawFd;
        let ifindex = super::vrrp_net::ifindex(interface)? as i32;
        // Protocol 0: this socket only sends, it never receives.
        // SAFETY: a plain socket(2) call; the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening a packet socket");
        }
        Ok(Self { fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }, ifindex })
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

    #[test]
    fn gratuitous_arp_names_the_address_as_sender_and_target() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(frame.len(), 42);
        assert_eq!(&frame[..6], &[0xff; 6]);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        assert_eq!(&frame[20..22], &[0, 1], "request");
        assert_eq!(&frame[22..28], &MAC);
        assert_eq!(&frame[28..32], &[10, 0, 0, 100]);
        assert_eq!(&frame[38..42], &[10, 0, 0, 100]);
    }

    #[test]
    fn unsolicited_na_has_a_valid_checksum_and_hop_limit_255() {
        let address: Ipv6Addr = "fd00::100".parse().unwrap();
        let frame = unsolicited_na(MAC, address);
        assert_eq!(frame.len(), 14 + 40 + 32);
        assert_eq!(frame[14 + 7], 255);
        let icmp = &frame[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(&icmp[8..24], &address.octets());
        assert_eq!(&icmp[26..32], &MAC);
        // A correct checksum makes the whole sum, pseudo-header included, fold to 0xffff.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[22..54]);
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        let sum = lb_common::csum::add_words(lb_common::csum::add_words(0, &pseudo), icmp);
        assert_eq!(lb_common::csum::fold(sum), 0xffff);
    }
}
