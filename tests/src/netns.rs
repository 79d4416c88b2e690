//! Network namespaces, veths, bridges and processes for tests, each torn down on drop (and so on panic).
//!
//! Every topology lives entirely inside namespaces created here; the root namespace gets no
//! interface, address or route, so test traffic cannot leave the sandbox.

use anyhow::{Context, Result, bail};
use lb::dataplane::{AttachMode, PassThrough};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`ip netns`), deleted with everything in it when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `lbt<pid>-<n>-<tag>` with its loopback up. Names are unique per test process.
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("lbt{}-{}-{tag}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace and fails with its stderr if it fails.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        run(&mut self.command(args))
    }

    /// Runs a command in the namespace's network only (`nsenter --net`): it keeps the host's
    /// mounts, bpffs among them, which `ip netns exec` would replace.
    pub fn nsenter(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("nsenter").arg(format!("--net=/run/netns/{}", self.name)).arg("--").args(args))
    }

    /// A command that will run inside the namespace (not yet started).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Starts a long-running process inside the namespace; it is killed when the guard drops.
    pub fn spawn(&self, args: &[&str]) -> Result<Process> {
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {args:?} in {}", self.name))?;
        Ok(Process { child })
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it opens and interfaces it
    /// names (e.g. an XDP attach) belong to the namespace. The calling thread is unaffected.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file =
            File::open(format!("/run/netns/{}", self.name)).with_context(|| format!("opening netns {}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a valid namespace fd; it only changes this thread's namespace.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns into {}: {}", self.name, std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Adds an address to an interface and brings it up.
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        let family = if cidr.contains(':') { "-6" } else { "-4" };
        // nodad: IPv6 addresses are usable at once instead of after duplicate address detection.
        let mut args = vec![family, "addr", "add", cidr, "dev", dev];
        if family == "-6" {
            args.push("nodad");
        }
        self.ip(&args)?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// The MAC address of an interface in this namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        // /sys/class/net shows the reader's namespace, so read it from inside.
        let text = String::from_utf8(self.exec(&["cat", &format!("/sys/class/net/{dev}/address")])?.stdout)?;
        lb::config::parse_mac(text.trim()).map_err(anyhow::Error::msg)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs inside, then remove the namespace (its veths go with it).
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: could not delete netns {}: {e}", self.name);
        }
    }
}

/// Connects `a_dev` in `a` to `b_dev` in `b` with a veth pair created directly inside the two
/// namespaces. Transmit checksum offload is turned off on both ends: veth would otherwise hand
/// XDP frames with partial checksums, which real NICs never deliver.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    a.ip(&["link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b.name()])?;
    for (ns, dev) in [(a, a_dev), (b, b_dev)] {
        ns.exec(&["ethtool", "-K", dev, "tx", "off"])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}

/// An L2 segment: a Linux bridge living in its own namespace.
pub struct Bridge {
    pub ns: Netns,
    ports: u32,
}

impl Bridge {
    pub fn new(tag: &str) -> Result<Self> {
        let ns = Netns::new(tag)?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Self { ns, ports: 0 })
    }

    /// Plugs `host` into the bridge through a new veth; the host end is called `dev`.
    /// Returns the bridge-side port's name.
    pub fn plug(&mut self, host: &Netns, dev: &str) -> Result<String> {
        let port = format!("p{}", self.ports);
        self.ports += 1;
        veth(&self.ns, &port, host, dev)?;
        self.ns.ip(&["link", "set", &port, "master", "br0"])?;
        Ok(port)
    }

    /// Lets the host behind `port` send frames with XDP_TX, for as long as the guard lives.
    pub fn accept_xdp_tx_from(&self, port: &str) -> Result<PassThrough> {
        self.ns.enter(|| PassThrough::attach(port, AttachMode::Native))?
    }
}

/// A process started by [`Netns::spawn`], killed and reaped on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output)
}
