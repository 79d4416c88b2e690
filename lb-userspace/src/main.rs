//! `lb`: the load balancer's daemon and command-line client.

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb::dataplane::{Dataplane, DataplaneSizes, EBPF_OBJECT};

#[derive(Parser)]
#[command(name = "lb", version, about = "eBPF/XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the embedded XDP program into the kernel (verifier check) and report its size, without attaching it.
    Verify,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Verify => {
            let dataplane = Dataplane::load(DataplaneSizes::default())?;
            let info = dataplane.program()?.info()?;
            println!(
                "XDP program verified and loaded: {} bytes of object, {} bytes translated, {} bytes JIT-ed",
                EBPF_OBJECT.len(),
                info.size_translated().unwrap_or(0),
                info.size_jitted()
            );
        }
    }
    Ok(())
}
