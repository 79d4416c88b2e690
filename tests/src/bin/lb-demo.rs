//! `cargo xtask demo`: the load balancer at work, in network namespaces this program creates and
//! removes. Every step says what it does, runs the real `lb` commands, shows their real output,
//! and checks that what happened is what the step promises; any surprise makes the exit status
//! non-zero.
//!
//! Usage: lb-demo [--keep]   (--keep leaves the network and the daemon running to explore)

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use lb_tests::daemon::LbDaemon;
use lb_tests::topology::{CLIENT_V4, SERVICE_PORT, SNAT_V4, SNAT_V6, Topology, VIP_V4, VIP_V6};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const REQUESTS: usize = 300;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) { bail!("interrupted") } else { Ok(()) }
}

fn vip4() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), 80)
}

fn vip6() -> SocketAddr {
    SocketAddr::new(VIP_V6.into(), 80)
}

/// One HTTP request; the backend answers with its name. The connection may take beyond the
/// client's first SYN retransmission (1 s): a refusal held back (`observe`) costs that second.
fn http_get(vip: SocketAddr) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&vip, Duration::from_secs(3)).map_err(|e| format!("connect: {}", e.kind()))?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    write!(stream, "GET / HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {}", e.kind()))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("answer: {}", e.kind()))?;
    let status = response.split_whitespace().nth(1).unwrap_or("none").to_string();
    if status != "200" {
        return Err(format!("status {status}"));
    }
    Ok(response.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string())
}

struct Demo {
    daemon: LbDaemon,
    topology: Topology,
    problems: Vec<String>,
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("  {spinner} {msg} {elapsed}").expect("valid template"));
    bar.set_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

impl Demo {
    /// Runs `lb ARGS` and shows it as the operator would see it.
    fn show(&self, args: &[&str]) -> Result<()> {
        println!("  $ lb --instance {} {}", self.daemon.instance, args.join(" "));
        let output = self.daemon.ok(args)?;
        for line in output.lines() {
            println!("    {line}");
        }
        Ok(())
    }

    /// `count` requests from the client to `vip`: answers per backend, and failures.
    fn requests(&self, vip: SocketAddr, count: usize) -> Result<BTreeMap<String, usize>> {
        let bar = ProgressBar::new(count as u64);
        bar.set_style(
            ProgressStyle::with_template("  {bar:30} {pos}/{len} requests to {msg}").expect("valid template"),
        );
        bar.set_message(vip.to_string());
        let (answers, errors) = self.topology.client.enter(|| {
            let mut answers = BTreeMap::new();
            let mut errors = BTreeMap::<String, usize>::new();
            for _ in 0..count {
                if INTERRUPTED.load(Ordering::Relaxed) {
                    break;
                }
                let key = http_get(vip).unwrap_or_else(|error| {
                    *errors.entry(error).or_insert(0) += 1;
                    "failed".to_string()
                });
                *answers.entry(key).or_insert(0) += 1;
                bar.inc(1);
            }
            (answers, errors)
        })?;
        bar.finish_and_clear();
        interrupted()?;
        let line: Vec<String> = answers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!("  {count} requests to {vip}: {}", line.join(", "));
        if !errors.is_empty() {
            let why: Vec<String> = errors.iter().map(|(k, v)| format!("{k} ({v})")).collect();
            println!("  failures: {}", why.join(", "));
        }
        Ok(answers)
    }

    /// Waits until `lb backend list` shows each listed backend in the given state.
    fn wait_for(&self, what: &str, want: &[(String, &str)], limit: Duration) -> Result<Duration> {
        let bar = spinner(what);
        let started = Instant::now();
        loop {
            interrupted()?;
            let rows: serde_json::Value =
                serde_json::from_str(&self.daemon.ok(&["--json", "backend", "list", "--vip", "web"])?)?;
            let state_of = |addr: &str| {
                rows.as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["address"] == addr)
                    .map(|r| r["state"].as_str().unwrap_or("").to_string())
            };
            if want.iter().all(|(addr, state)| state_of(addr).as_deref() == Some(*state)) {
                bar.finish_and_clear();
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bar.finish_and_clear();
                bail!("{what}: not reached after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn expect(&mut self, ok: bool, promise: &str) {
        if ok {
            println!("  ✔ {promise}");
        } else {
            println!("  ✘ {promise}: NOT what happened");
            self.problems.push(promise.to_string());
        }
    }

    fn addr(&self, i: usize) -> String {
        format!("{}:{SERVICE_PORT}", self.topology.backends[i].v4)
    }
}

fn config(topology: &Topology) -> String {
    let check = "{ kind = \"http\", path = \"/healthz\", expect_status = 200, interval = \"500ms\", timeout = \"300ms\", rise = 2, fall = 2 }";
    let mut config = String::from(
        "[daemon]\ninterface = \"eth0\"\nxdp_mode = \"native\"\ninstance = \"{instance}\"\nmetrics = \"127.0.0.1:9900\"\nring_size = 65537\nmax_vips = 8\nmax_conns = 262144\n",
    );
    for (name, vip, snat, v6) in [
        ("web", VIP_V4.to_string(), SNAT_V4.to_string(), false),
        ("web6", format!("[{VIP_V6}]"), SNAT_V6.to_string(), true),
    ] {
        config.push_str(&format!("\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}:80\"\nprotocol = \"tcp\"\nmode = \"nat\"\nobserve = true\nsnat = \"{snat}\"\ncheck = {check}\n"));
        for (i, host) in topology.backends.iter().enumerate() {
            let address =
                if v6 { format!("[{}]:{SERVICE_PORT}", host.v6) } else { format!("{}:{SERVICE_PORT}", host.v4) };
            config.push_str(&format!("\n[[vip.backend]]\naddress = \"{address}\"\nbackup = {}\n", i == 3));
        }
    }
    config
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed));
    match run(keep) {
        Ok(0) => println!("\nEverything behaved as described."),
        Ok(problems) => {
            println!("\n{problems} step(s) did not behave as described.");
            std::process::exit(1);
        }
        Err(_) if INTERRUPTED.load(Ordering::Relaxed) => {
            eprintln!("\ninterrupted: everything the demo created was removed");
            std::process::exit(130);
        }
        Err(error) => {
            eprintln!("\ndemo failed: {error:#}");
            std::process::exit(1);
        }
    }
}

fn run(keep: bool) -> Result<usize> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root (sudo cargo xtask demo)");
    }
    println!("lb demo: an XDP layer-4 load balancer with health checks and failover, in network namespaces.\n");
    let bar = spinner(
        "building the network: a client, the load balancer, web servers be1-be3 and a backup be4 on one bridge",
    );
    let topology = Topology::new(4, false).context("building the demo network")?;
    bar.finish_and_clear();
    println!(
        "Network: client {CLIENT_V4} · load balancer {SNAT_V4} (SNAT) · be1-be3 primaries, be4 backup · all on a bridge."
    );
    let instance = format!("demo{}", std::process::id());
    let daemon = LbDaemon::start(&topology.lb, &instance, &config(&topology)).context("starting lb daemon")?;
    let mut demo = Demo { daemon, topology, problems: Vec::new() };
    println!("Started `lb daemon --config {}` in the load balancer's namespace:", demo.daemon.config.display());
    println!(
        "VIP web {} and web6 {} in NAT mode, watching the backends' answers (observe), HTTP check GET /healthz every 500 ms (rise 2, fall 2).\n",
        vip4(),
        vip6()
    );
    let all =
        [(demo.addr(0), "serving"), (demo.addr(1), "serving"), (demo.addr(2), "serving"), (demo.addr(3), "standby")];
    let up = demo.wait_for("health checks bringing the backends up", &all, Duration::from_secs(10))?;
    println!("The health checks brought the backends up in {:.1} s.", up.as_secs_f64());
    demo.show(&["status"])?;
    demo.show(&["backend", "list", "--vip", "web"])?;

    println!("\n1. {REQUESTS} requests from the client to the VIP (and 100 over IPv6):");
    let answers = demo.requests(vip4(), REQUESTS)?;
    let spread = ["be1", "be2", "be3"].iter().all(|b| answers.get(*b).is_some_and(|n| *n > REQUESTS / 6));
    demo.expect(
        spread && !answers.contains_key("be4") && !answers.contains_key("failed"),
        "all three primaries answer, the backup none, no request fails",
    );
    let answers6 = demo.requests(vip6(), 100)?;
    demo.expect(answers6.len() == 3 && !answers6.contains_key("failed"), "the IPv6 VIP is balanced the same way");
    demo.show(&["stats"])?;

    println!("\n2. be1's web server is killed:");
    let held_before = demo.daemon.reason_count("drop_refusal_held")?;
    demo.topology.backends[0].stop_server();
    let (window, detected) = {
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let load = scope.spawn(|| {
                demo.topology.client.enter(|| {
                    // A steady 100 requests a second, each on its own, as a client population
                    // would send them: one waiting for its SYN retransmission holds up no other.
                    let mut requests = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        requests.push(std::thread::spawn(|| http_get(vip4()).unwrap_or_else(|_| "failed".into())));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let mut answers = BTreeMap::<String, usize>::new();
                    for request in requests {
                        *answers.entry(request.join().unwrap_or_else(|_| "failed".into())).or_insert(0) += 1;
                    }
                    answers
                })
            });
            let detected =
                demo.wait_for("waiting for be1 to be taken out", &[(demo.addr(0), "down")], Duration::from_secs(10));
            stop.store(true, Ordering::Relaxed);
            let window = load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))?;
            Ok::<_, anyhow::Error>((window?, detected?))
        })?
    };
    let failed = window.get("failed").copied().unwrap_or(0);
    let held = demo.daemon.reason_count("drop_refusal_held")? - held_before;
    let rows: serde_json::Value =
        serde_json::from_str(&demo.daemon.ok(&["--json", "backend", "list", "--vip", "web"])?)?;
    let be1 = demo.addr(0);
    let why = rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["address"] == be1.as_str())
        .and_then(|r| r["last_check"].as_str())
        .unwrap_or("")
        .to_string();
    println!(
        "  be1 was taken out {:.2} s after the kill ({}); meanwhile {} requests ran (100/s), {held} refusals by be1 were held back and their SYNs retried on be2 and be3, {failed} failed",
        detected.as_secs_f64(),
        why.split("; last check").next().unwrap_or(""),
        window.values().sum::<usize>()
    );
    demo.expect(
        why.starts_with("observed:") && failed <= 1,
        "observe takes be1 out at its first refusals, before its check does; at most one request fails",
    );
    demo.show(&["backend", "list", "--vip", "web"])?;
    let after = demo.requests(vip4(), REQUESTS)?;
    demo.expect(
        !after.contains_key("be1") && !after.contains_key("failed") && after.len() == 2,
        "requests keep succeeding on be2 and be3, none fails",
    );

    println!("\n3. be1 comes back:");
    demo.topology.backends[0].start_server()?;
    let rejoined =
        demo.wait_for("waiting for be1 to pass its checks", &[(demo.addr(0), "serving")], Duration::from_secs(10))?;
    println!("  be1 rejoined {:.2} s after its server restarted", rejoined.as_secs_f64());
    let back = demo.requests(vip4(), REQUESTS)?;
    demo.expect(back.contains_key("be1") && !back.contains_key("failed"), "be1 takes its share again");

    println!("\n4. Every primary fails; the backup takes over, then hands back:");
    for i in 0..3 {
        demo.topology.backends[i].stop_server();
    }
    let over =
        demo.wait_for("waiting for the backup to take over", &[(demo.addr(3), "serving")], Duration::from_secs(10))?;
    println!("  be4 serves {:.2} s after the primaries failed", over.as_secs_f64());
    demo.show(&["backend", "list", "--vip", "web"])?;
    let backup = demo.requests(vip4(), REQUESTS)?;
    demo.expect(backup.get("be4") == Some(&REQUESTS), "the backup answers every request");
    for i in 0..3 {
        demo.topology.backends[i].start_server()?;
    }
    let primaries =
        [(demo.addr(0), "serving"), (demo.addr(1), "serving"), (demo.addr(2), "serving"), (demo.addr(3), "standby")];
    let returned = demo.wait_for("waiting for the primaries to return", &primaries, Duration::from_secs(10))?;
    println!(
        "  the primaries are back {:.2} s after their servers restarted; be4 is on standby again",
        returned.as_secs_f64()
    );
    let handed_back = demo.requests(vip4(), REQUESTS)?;
    demo.expect(!handed_back.contains_key("be4") && handed_back.len() == 3, "the backup is left again");

    println!("\n5. The daemon is restarted while requests run (the data plane is pinned and keeps forwarding):");
    let restart = {
        let stop = AtomicBool::new(false);
        let answers = std::sync::Mutex::new(BTreeMap::<String, usize>::new());
        std::thread::scope(|scope| -> Result<Duration> {
            let load = scope.spawn(|| {
                demo.topology.client.enter(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let key = http_get(vip4()).unwrap_or_else(|_| "failed".into());
                        *answers.lock().expect("lock").entry(key).or_insert(0) += 1;
                    }
                })
            });
            std::thread::sleep(Duration::from_millis(500));
            println!("  $ kill -TERM <lb daemon>; lb daemon --config {}", demo.daemon.config.display());
            let started = Instant::now();
            let result = demo.daemon.terminate().and_then(|_| demo.daemon.restart());
            let took = started.elapsed();
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            let _ = load.join();
            result?;
            Ok(took)
        })
        .map(|took| (answers.into_inner().expect("lock"), took))?
    };
    let (during, took) = restart;
    let total: usize = during.values().sum();
    println!(
        "  the daemon was away and back in {:.2} s; {total} requests ran meanwhile: {during:?}",
        took.as_secs_f64()
    );
    demo.expect(!during.contains_key("failed") && total > 0, "not one request fails across the restart");
    demo.expect(!during.contains_key("be4"), "the backup stays on standby throughout");
    demo.show(&["status"])?;

    let problems = demo.problems.len();
    println!(
        "\nSummary: balanced {REQUESTS} requests over three backends (and IPv6), routed around a killed server in {:.2} s, took it back, failed over to the backup and back, and restarted the daemon under load without a failed request.",
        detected.as_secs_f64()
    );
    if keep {
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-bridge-port", demo.daemon.instance));
        demo.topology.outlive_process(&pin)?;
        let prefix = format!("lbt{}-", std::process::id());
        println!("\n--keep: the network and the daemon stay up. Try:");
        println!("  ip netns exec {} curl -s http://{}/", demo.topology.client.name(), VIP_V4);
        println!("  lb --instance {} backend list", demo.daemon.instance);
        println!("Remove everything with:");
        println!("  lb --instance {} detach; rm -f {} /tmp/{prefix}*-status", demo.daemon.instance, pin.display());
        println!(
            "  for ns in $(ip netns list | grep -o '^{prefix}[^ ]*'); do ip netns pids $ns | xargs -r kill; ip netns del $ns; done"
        );
        std::mem::forget(demo);
    } else {
        let bar = spinner("removing the daemon, its data plane and the network");
        drop(demo);
        bar.finish_and_clear();
        println!("Removed the daemon, its data plane and every namespace.");
    }
    ensure!(!INTERRUPTED.load(Ordering::Relaxed), "interrupted");
    Ok(problems)
}
