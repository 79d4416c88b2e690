//! Installs what a fresh Debian 12 machine lacks to build and test the load balancer, and nothing else.
//!
//! Every step checks first, so a second run installs nothing. Without root, a missing piece is an
//! error that names it and the command that installs it.

use crate::build_ebpf::{LLVM_BIN, bpf_linker_path};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// Debian packages: the eBPF toolchain (compiler, its std source, LLVM 22 for bpf-linker) and the
/// tools the tests, the demo and the benchmarks drive (namespaces, veths, offload settings,
/// ping, curl, trafgen from netsniff-ng, nftables, a headless browser for the status page).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "curl",
    "netsniff-ng",
    "nftables",
    "keepalived",
    "bird2",
    "haproxy",
    "librsvg2-bin",
    "chromium",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs setup only if something is missing, so other tasks can call it cheaply first.
pub fn ensure() -> Result<()> {
    if missing().is_empty() { Ok(()) } else { run() }
}

/// Installs whatever is missing (root only).
pub fn run() -> Result<()> {
    let needed = missing();
    if needed.is_empty() {
        println!("setup: everything is installed (packages, bpf-linker {BPF_LINKER_VERSION}, bpffs)");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing: {}\ninstall with `sudo cargo xtask setup` (it needs root for apt-get and mounting bpffs)",
            needed.iter().map(Piece::describe).collect::<Vec<_>>().join(", ")
        );
    }
    let packages: Vec<&str> =
        needed.iter().filter_map(|p| if let Piece::Package(p) = p { Some(*p) } else { None }).collect();
    if !packages.is_empty() {
        println!("setup: installing Debian packages: {}", packages.join(" "));
        run_cmd(Command::new("apt-get").arg("update"))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if needed.iter().any(|p| matches!(p, Piece::BpfLinker)) {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute on 2 cores)");
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run_cmd(
            Command::new(cargo)
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("PATH", path),
        )?;
    }
    if needed.iter().any(|p| matches!(p, Piece::Bpffs)) {
        println!("setup: mounting bpffs at {BPFFS}");
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    let still = missing();
    if !still.is_empty() {
        bail!("setup finished but still missing: {}", still.iter().map(Piece::describe).collect::<Vec<_>>().join(", "));
    }
    println!("setup: done");
    Ok(())
}

enum Piece {
    Package(&'static str),
    BpfLinker,
    Bpffs,
}

impl Piece {
    fn describe(&self) -> String {
        match self {
            Piece::Package(p) => format!("Debian package {p}"),
            Piece::BpfLinker => format!("bpf-linker {BPF_LINKER_VERSION} ({})", bpf_linker_path().display()),
            Piece::Bpffs => format!("bpffs mounted at {BPFFS}"),
        }
    }
}

fn missing() -> Vec<Piece> {
    let mut missing: Vec<Piece> =
        PACKAGES.iter().filter(|p| !package_installed(p)).map(|p| Piece::Package(p)).collect();
    if !bpf_linker_installed() {
        missing.push(Piece::BpfLinker);
    }
    if !bpffs_mounted() {
        missing.push(Piece::Bpffs);
    }
    missing
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker_installed() -> bool {
    Command::new(bpf_linker_path())
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|mounts| {
            mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf"))
        })
        .unwrap_or(false)
        && Path::new(BPFFS).is_dir()
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
