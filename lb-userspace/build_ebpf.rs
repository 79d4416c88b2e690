//! Builds the XDP object (`lb-ebpf`) for `bpfel-unknown-none`.
//!
//! Shared, as source, by `lb-userspace/build.rs` (so a plain `cargo build` embeds a fresh object)
//! and by `cargo xtask build-ebpf`. The eBPF crate needs `-Z build-std=core`, which needs the
//! library source matching the compiler exactly: Debian's `rustc-web` + `rust-web-src` pair, not
//! the rustup toolchain that builds the host workspace. See `shared/TOOLCHAIN.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const EBPF_RUSTC: &str = "/usr/bin/rustc";
pub const EBPF_CARGO: &str = "/usr/bin/cargo";
pub const EBPF_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";
pub const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
pub const EBPF_TARGET: &str = "bpfel-unknown-none";

/// Where `cargo install` puts bpf-linker for the current user.
pub fn bpf_linker_path() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"));
    cargo_home.join("bin").join("bpf-linker")
}

/// The pieces the eBPF build needs, each with what is missing; empty when all are present.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    for (path, what) in [
        (EBPF_RUSTC, "rustc-web (Debian package)"),
        (EBPF_CARGO, "cargo-web (Debian package)"),
        (EBPF_RUST_SRC, "rust-web-src (Debian package)"),
        (LLVM_BIN, "llvm-22-dev (Debian package)"),
    ] {
        if !Path::new(path).exists() {
            missing.push(format!("{what}: {path} not found"));
        }
    }
    let linker = bpf_linker_path();
    if !linker.exists() {
        missing.push(format!("bpf-linker (built against LLVM 22): {} not found", linker.display()));
    }
    missing
}

/// Builds the eBPF crate in release mode and returns the path of the object.
/// Cargo's own fingerprints decide what is rebuilt, so a stale object is never reused.
pub fn build_ebpf(ebpf_dir: &Path) -> Result<PathBuf, String> {
    let missing = missing_prerequisites();
    if !missing.is_empty() {
        return Err(format!(
            "cannot build the XDP program, missing:\n  - {}\nrun `cargo xtask setup` as root to install them",
            missing.join("\n  - ")
        ));
    }
    let linker_dir = bpf_linker_path().parent().map(Path::to_path_buf).unwrap_or_default();
    let path = format!("{LLVM_BIN}:{}:/usr/local/bin:/usr/bin:/bin", linker_dir.display());
    // A clean environment: the outer cargo's RUSTC, RUSTFLAGS, RUSTUP_TOOLCHAIN, CARGO_* and
    // jobserver variables would otherwise leak into the nested build and pick the wrong compiler.
    let mut cmd = Command::new(EBPF_CARGO);
    cmd.env_clear()
        .env("PATH", path)
        .env("RUSTC", EBPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(ebpf_dir)
        .args(["build", "--release", "--locked", "--target", EBPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(ebpf_dir.join("target"));
    for var in ["HOME", "CARGO_HOME", "TERM"] {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    let status = cmd.status().map_err(|e| format!("cannot run {EBPF_CARGO}: {e}"))?;
    if !status.success() {
        return Err(format!("building the XDP program in {} failed ({status})", ebpf_dir.display()));
    }
    Ok(ebpf_dir.join("target").join(EBPF_TARGET).join("release").join("lb-ebpf"))
}
