//! `lb`: the load balancer's daemon and command-line client.

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser};
use lb::cli::{Cli, Command, DecapCommand, XdpPassCommand, print_decap_attached, print_decap_status, run_client};
use lb::dataplane::{AttachMode, Dataplane, PassThrough, PinDir, decap};
use lb::store::StateStore;
use lb::{api, daemon};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // Errors are for operators: one clear message, never a backtrace.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // Like other Unix tools, stop quietly when the reader of our output goes away (`lb … | head`).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Daemon { config } => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            runtime.block_on(daemon::run::run(&config))
        }
        Command::Detach => runtime.block_on(detach(&cli.instance)),
        Command::XdpPass(XdpPassCommand::Attach { interface }) => {
            let pin = PassThrough::pin_path(&interface)?;
            if pin.exists() {
                println!("{interface} has the pass-through program already ({})", pin.display());
                return Ok(());
            }
            PassThrough::attach(&interface, AttachMode::Native)?.pin(&pin)?;
            println!("{interface}: pass-through XDP program attached and pinned at {}", pin.display());
            Ok(())
        }
        Command::XdpPass(XdpPassCommand::Detach { interface }) => {
            let pin = PassThrough::pin_path(&interface)?;
            if !pin.exists() {
                bail!(
                    "{interface} has no pass-through program attached by `lb xdp-pass attach` ({} is missing)",
                    pin.display()
                );
            }
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            if let Some(dir) = pin.parent() {
                let _ = std::fs::remove_dir(dir); // only when no other interface's pin is left
            }
            println!("{interface}: pass-through XDP program detached");
            Ok(())
        }
        Command::Decap(DecapCommand::Attach { interface, gue_port, xdp_mode }) => {
            print_decap_attached(&interface, &decap::attach(&interface, gue_port, xdp_mode)?);
            Ok(())
        }
        Command::Decap(DecapCommand::Detach { interface }) => {
            let dir = decap::detach(&interface)?;
            println!("{interface}: decapsulation detached (removed {})", dir.display());
            Ok(())
        }
        Command::Decap(DecapCommand::Status) => {
            let interfaces = decap::status()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&interfaces)?);
            } else {
                print_decap_status(&interfaces);
            }
            Ok(())
        }
        Command::Verify => {
            let (object, translated, jited) = Dataplane::verify()?;
            println!(
                "XDP program verified and loaded: {object} bytes of object, {translated} bytes translated, {jited} bytes JIT-ed"
            );
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).section("8").render(&mut std::io::stdout())?;
            Ok(())
        }
        _ => runtime.block_on(run_client(cli)),
    }
}

/// Stops a running daemon of the instance with detach, or removes what a stopped one left.
async fn detach(instance: &str) -> Result<()> {
    let socket = api::socket_path(instance);
    if socket.exists() && api::call(instance, &api::Request::Shutdown { detach: true }).await.is_ok() {
        // The daemon removes everything as it exits, its socket last: wait for that.
        for _ in 0..100 {
            if !socket.exists() {
                println!("instance {instance}: daemon stopped, data plane removed");
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        bail!("instance {instance}: the daemon did not finish removing its data plane within 10 s");
    }
    let pins = PinDir::for_instance(instance).remove()?;
    let state = StateStore::for_instance(instance).remove()?;
    // What a killed daemon left: BIRD still announcing, its socket and BIRD's files in /run.
    if lb::ha::bgp::stop_orphan(&api::run_dir(instance).join("bgp")) {
        println!("instance {instance}: stopped the BIRD a killed daemon left running");
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(api::run_dir(instance));
    if pins || state {
        println!("instance {instance}: data plane removed (program, pins{})", if state { ", saved state" } else { "" });
    } else {
        println!("instance {instance}: nothing to remove");
    }
    Ok(())
}
