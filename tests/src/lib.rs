//! Shared helpers for the integration tests: namespaces, privileges, packets.

pub mod daemon;
pub mod ecmp;
pub mod harness;
pub mod invalid_configs;
pub mod legacy;
pub mod netns;
pub mod packet_socket;
pub mod pair;
pub mod privilege;
pub mod routed;
pub mod service;
pub mod syn_flood;
pub mod topology;

/// A binary cargo built into `target/<profile>/`, found from the running executable (a test in
/// `target/<profile>/deps/` or a binary beside the one wanted).
pub fn sibling_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let mut dir = exe.parent().expect("executable directory").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}
