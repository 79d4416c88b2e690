//! `cargo xtask`: installs what the build needs, builds both toolchains' crates, runs tests and the demo.

mod bench;
#[path = "../../lb-userspace/build_ebpf.rs"]
mod build_ebpf;
mod install;
mod leftovers;
mod setup;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (Debian packages, bpf-linker, bpffs). Idempotent; root.
    Setup,
    /// Build the XDP object for bpfel-unknown-none.
    BuildEbpf,
    /// Build the `lb` binary (release), with the XDP object embedded.
    Build,
    /// Install `lb` as a service: the binary (PREFIX/sbin), the systemd unit
    /// (/etc/systemd/system/lb.service), an example /etc/lb/lb.toml (never over an existing one),
    /// shell completions and the manual page. Starts nothing.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Install under this directory instead of / (packaging, tests).
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
        /// Install this `lb` binary instead of building the release one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Build a Debian package (target/package/lb_VERSION_ARCH.deb) with the files `install`
    /// puts in place, under /usr; installing it starts nothing.
    Package {
        /// Package this `lb` binary instead of building the release one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Build everything and run every test, privileged ones included (root).
    Test {
        /// Arguments passed on to `cargo test` (e.g. a test name filter, after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Show the load balancer at work in network namespaces: balancing, health checks,
    /// failover to a backup, a restart under load.
    Demo {
        /// Leave the network and the daemon running afterwards, to explore.
        #[arg(long)]
        keep: bool,
    },
    /// Run the load balancer for a long time (30 minutes) under mixed traffic with backend churn,
    /// health flaps and daemon restarts; report failed requests, the daemon's memory and file
    /// descriptors and the table entries over time (bench/results/<date>-soak.md). Not part of
    /// `test`.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
    },
    /// Measure the XDP program's per-packet cost (BPF_PROG_TEST_RUN) beside floor programs,
    /// the control plane's table build and publish times, end-to-end pps against nftables and
    /// the health checks' CPU; writes target/bench/<date>-<kernel>.{md,json} (with --record:
    /// bench/results/, to keep them in the repository), each figure beside the previous recorded
    /// run's.
    Bench {
        /// Write the results to bench/results/ (tracked) instead of target/bench/.
        #[arg(long)]
        record: bool,
        /// Fewer iterations: the whole run in under a minute.
        #[arg(long)]
        quick: bool,
        /// Also print the results as JSON at the end.
        #[arg(long)]
        json: bool,
        /// Compare with this run's JSON rather than the newest in bench/results/.
        #[arg(long, value_name = "PATH")]
        previous: Option<PathBuf>,
        /// Run nothing: draw the chart of this recorded run's JSON again, beside it.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["record", "quick", "json", "previous"])]
        redraw: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            setup::ensure()?;
            let object = build_ebpf::build_ebpf(&root.join("lb-ebpf")).map_err(anyhow::Error::msg)?;
            println!("XDP object: {}", object.display());
            Ok(())
        }
        Task::Build => {
            setup::ensure()?;
            cargo(&root, &["build", "--release", "-p", "lb-userspace"])?;
            println!("built {}", target_dir(&root).join("release/lb").display());
            Ok(())
        }
        Task::Install { prefix, destdir, binary } => {
            install::run(&root, &release_binary(&root, binary)?, &prefix, &destdir)
        }
        Task::Package { binary } => install::package(&root, &release_binary(&root, binary)?).map(|_| ()),
        Task::Test { cargo_args } => test(&root, &cargo_args),
        Task::Demo { keep } => demo(&root, keep),
        Task::Bench { redraw: Some(json), .. } => {
            println!("chart: {}", bench::redraw(&json)?.display());
            Ok(())
        }
        Task::Bench { record, quick, json, previous, redraw: None } => {
            bench(&root, record, quick, json, previous.as_deref())
        }
        Task::Soak { minutes } => soak(&root, minutes),
    }
}

fn test(root: &Path, cargo_args: &[String]) -> Result<()> {
    let started = Instant::now();
    setup::ensure()?;
    if !setup::is_root() && std::env::var("LB_SKIP_PRIVILEGED").as_deref() != Ok("1") {
        bail!(
            "the privileged tests (XDP attach, network namespaces) need root: run `sudo cargo xtask test`; \
             to run only the unprivileged tests, set LB_SKIP_PRIVILEGED=1 (they will be reported as skipped)"
        );
    }
    // The daemon tests run the `lb` binary itself: build it first so it is never stale.
    cargo(root, &["build", "--workspace", "--bins"])?;
    leftovers::remove_stale();
    let before = leftovers::snapshot();
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if !cargo_args.is_empty() {
        args.push("--");
        args.extend(cargo_args.iter().map(String::as_str));
    }
    let tests = cargo(root, &args).and_then(|()| {
        // The demo is a test too: every step checks what it promises.
        if cargo_args.is_empty() && setup::is_root() {
            println!("xtask test: running the demo");
            let status = Command::new(target_dir(root).join("debug/lb-demo")).status().context("running the demo")?;
            if !status.success() {
                bail!("the demo did not behave as described ({status})");
            }
        }
        Ok(())
    });
    // Tests clean up after themselves, also when they fail.
    let clean = leftovers::check(&before);
    match (tests, clean) {
        (Ok(()), Ok(())) => {}
        (Err(error), Ok(())) | (Ok(()), Err(error)) => return Err(error),
        (Err(error), Err(left)) => return Err(error.context(format!("{left:#}"))),
    }
    println!("xtask test: all tests passed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn demo(root: &Path, keep: bool) -> Result<()> {
    setup::ensure()?;
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads XDP programs: run `sudo cargo xtask demo`");
    }
    cargo(root, &["build", "--quiet", "--workspace", "--bins"])?;
    let demo = target_dir(root).join("debug/lb-demo");
    let mut command = Command::new(&demo);
    if keep {
        command.arg("--keep");
    }
    let status = command.status().with_context(|| format!("running {}", demo.display()))?;
    if !status.success() {
        bail!("the demo did not behave as described ({status})");
    }
    Ok(())
}

fn soak(root: &Path, minutes: f64) -> Result<()> {
    setup::ensure()?;
    if !setup::is_root() {
        bail!("the soak run creates network namespaces and loads XDP programs: run `sudo cargo xtask soak`");
    }
    // Release builds: the daemon's memory and CPU are measured as operators would run it.
    cargo(root, &["build", "--release", "--workspace", "--bins"])?;
    let status = Command::new(target_dir(root).join("release/soak"))
        .args(["--minutes", &minutes.to_string()])
        .current_dir(root)
        .status()
        .context("running the soak")?;
    if !status.success() {
        bail!("the soak run failed ({status})");
    }
    Ok(())
}

fn bench(root: &Path, record: bool, quick: bool, json: bool, previous: Option<&Path>) -> Result<()> {
    setup::ensure()?;
    if !setup::is_root() {
        bail!("the benchmarks load XDP programs and need root: run `sudo cargo xtask bench`");
    }
    let dir = if record { root.join("bench/results") } else { root.join("target/bench") };
    bench::run(root, &dir, quick, json, previous).map(|_| ())
}

/// `binary`, or the release `lb`, built now.
fn release_binary(root: &Path, binary: Option<PathBuf>) -> Result<PathBuf> {
    match binary {
        Some(binary) => Ok(binary),
        None => {
            cargo(root, &["build", "--release", "-p", "lb-userspace"])?;
            Ok(target_dir(root).join("release/lb"))
        }
    }
}

/// Runs the host toolchain's cargo (the one that runs this xtask) in the workspace.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` (relative to the workspace root, as
/// cargo reads it there) when set, `target/` otherwise.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root").to_path_buf()
}
