//! Builds the XDP program and hands it to the crate, so `lb` is one self-contained binary.
#[path = "build_ebpf.rs"]
mod build_ebpf;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("lb-userspace sits in the workspace root").to_path_buf();
    let ebpf_dir = root.join("lb-ebpf");
    for watched in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-ebpf/Cargo.lock",
        "lb-ebpf/.cargo/config.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
        "lb-userspace/build_ebpf.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let object = match build_ebpf::build_ebpf(&ebpf_dir) {
        Ok(object) => object,
        Err(message) => {
            // Shown by cargo as the build script's error.
            eprintln!("error: {message}");
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("lb-ebpf.o");
    std::fs::copy(&object, &out).unwrap_or_else(|e| panic!("copy {} to {}: {e}", object.display(), out.display()));
}
