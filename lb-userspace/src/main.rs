//! `lb`: the load balancer's daemon and command-line client.

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb::dataplane::Dataplane;

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
            let (object, translated, jited) = Dataplane::verify()?;
            println!(
                "XDP program verified and loaded: {object} bytes of object, {translated} bytes translated, {jited} bytes JIT-ed"
            );
        }
    }
    Ok(())
}
