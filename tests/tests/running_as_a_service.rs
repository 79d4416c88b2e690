//! Running under systemd: the shipped unit passes `systemd-analyze verify`; the daemon reports
//! ready on systemd's notify socket only once its program is attached (and never when it cannot
//! start); shell completions and the manual page come from the command-line definitions.

use lb_tests::daemon::{LbDaemon, lb_binary, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::nat_config;
use lb_tests::topology::Topology;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/lb.service")
}

/// Writes `unit` as `name` (naming the binary cargo built, as verify needs one that exists) and
/// demands a clean `systemd-analyze verify`.
fn assert_unit_verifies(unit: &str, name: &str) {
    let dir = tempdir(name);
    let path = dir.join(name);
    std::fs::write(&path, unit.replace("/usr/local/sbin/lb", lb_binary().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify {name}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    assert!(unit.contains("Type=notify"), "the daemon tells systemd when it is ready");
    assert_unit_verifies(&unit, "lb.service");
}

/// The backends' decapsulation unit, checked as the instance `lb-decap@eth0` (a template is
/// only ever run as an instance).
#[test]
fn the_decap_unit_passes_systemd_analyze_verify() {
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/lb-decap@.service");
    let unit = std::fs::read_to_string(template).unwrap();
    assert!(unit.contains("lb decap attach --interface %i") && unit.contains("lb decap detach --interface %i"));
    assert_unit_verifies(&unit, "lb-decap@eth0.service");
}

#[test]
fn completions_and_the_manual_page_cover_every_command() {
    let run = |args: &[&str]| -> String {
        let out = Command::new(lb_binary()).args(args).output().unwrap();
        assert!(out.status.success(), "lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let commands = ["daemon", "vip", "backend", "apply", "status", "stats", "explain", "failover", "detach"];
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for command in commands {
            assert!(script.contains(command), "{shell} completions lack {command}");
        }
    }
    let man = run(&["man"]);
    assert!(man.starts_with(".ie") || man.contains(".TH lb 8"), "not a section 8 roff page: {}", &man[..80]);
    for command in commands {
        assert!(man.contains(command), "the manual page lacks {command}");
    }
    let refused = Command::new(lb_binary()).args(["completions", "tcsh"]).output().unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("tcsh"));
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-{tag}-{}", unique_instance()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What arrived on the notify socket: each message, and whether the program was attached to
/// the interface at the moment READY=1 came in.
struct Notifications {
    messages: Vec<String>,
    attached_at_ready: Option<bool>,
}

/// Collects notifications on `socket` for up to `limit` (until STOPPING=1 or `limit`), checking
/// the interface's XDP attachment in namespace `ns` the moment READY=1 arrives.
fn listen(socket: UnixDatagram, ns: String, limit: Duration) -> std::thread::JoinHandle<Notifications> {
    std::thread::spawn(move || {
        let mut notes = Notifications { messages: Vec::new(), attached_at_ready: None };
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        while Instant::now() < deadline {
            let Ok(n) = socket.recv(&mut buf) else { continue };
            let message = String::from_utf8_lossy(&buf[..n]).to_string();
            if message.lines().any(|l| l == "READY=1") && notes.attached_at_ready.is_none() {
                let link = Command::new("ip").args(["-n", &ns, "-d", "link", "show", "eth0"]).output().unwrap();
                notes.attached_at_ready = Some(String::from_utf8_lossy(&link.stdout).contains("prog/xdp"));
            }
            let stopping = message.lines().any(|l| l == "STOPPING=1");
            notes.messages.push(message);
            if stopping {
                break;
            }
        }
        notes
    })
}

#[test]
fn readiness_is_reported_once_the_program_is_attached_and_never_by_a_failed_start() {
    if !require_root("readiness_is_reported_once_the_program_is_attached_and_never_by_a_failed_start") {
        return;
    }
    let topology = Topology::new(1, false).unwrap();
    let dir = tempdir("notify");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let notes = listen(socket, topology.lb.name().to_string(), Duration::from_secs(30));
    let env = [("NOTIFY_SOCKET", path.to_str().unwrap())];
    let mut daemon =
        LbDaemon::start_with_env(&topology.lb, &unique_instance(), &nat_config(&topology, 1, None), &env).unwrap();
    // A change keeps the status line current.
    daemon.ok(&["vip", "del", "dns"]).unwrap();
    daemon.terminate().unwrap();
    let notes = notes.join().unwrap();
    let all = notes.messages.join("|");
    assert_eq!(notes.attached_at_ready, Some(true), "READY=1 must come once XDP is attached: {all}");
    let ready = notes.messages.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=serving 2 VIPs on eth0 (attached"), "status line: {ready}");
    assert!(all.contains("STATUS=serving 1 VIPs on eth0"), "the status follows a change: {all}");
    assert!(all.contains("STOPPING=1"), "a stop is announced: {all}");

    // A daemon that cannot attach (no such interface) says why and never reports ready.
    let socket = UnixDatagram::bind(dir.join("failed.sock")).unwrap();
    let failed_path = dir.join("failed.sock");
    let notes = listen(socket, topology.lb.name().to_string(), Duration::from_secs(3));
    let config = nat_config(&topology, 1, None).replace("interface = \"eth0\"", "interface = \"missing0\"");
    let env = [("NOTIFY_SOCKET", failed_path.to_str().unwrap())];
    let error = LbDaemon::start_with_env(&topology.lb, &unique_instance(), &config, &env).err().expect("must fail");
    assert!(format!("{error:#}").contains("missing0"), "the error names the interface: {error:#}");
    let notes = notes.join().unwrap();
    assert!(
        notes.messages.iter().all(|m| !m.contains("READY=1")),
        "a failed start reported ready: {:?}",
        notes.messages
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn install_puts_every_piece_in_place_and_keeps_an_existing_configuration() {
    let root = tempdir("install");
    let install = || {
        let out = Command::new(lb_tests::sibling_binary("xtask"))
            .args(["install", "--prefix", "/opt/lb", "--destdir"])
            .arg(&root)
            .arg("--binary")
            .arg(lb_binary())
            .output()
            .unwrap();
        assert!(out.status.success(), "xtask install: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let said = install();
    assert!(said.contains("Nothing was started"), "{said}");
    for path in [
        "opt/lb/sbin/lb",
        "etc/systemd/system/lb.service",
        "etc/systemd/system/lb-decap@.service",
        "etc/lb/lb.toml",
        "opt/lb/share/bash-completion/completions/lb",
        "opt/lb/share/zsh/site-functions/_lb",
        "opt/lb/share/fish/vendor_completions.d/lb.fish",
        "opt/lb/share/man/man8/lb.8",
    ] {
        assert!(root.join(path).is_file(), "{path} missing after install:\n{said}");
    }
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/lb.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/lb/sbin/lb daemon --config /etc/lb/lb.toml"), "{unit}");
    let decap = std::fs::read_to_string(root.join("etc/systemd/system/lb-decap@.service")).unwrap();
    assert!(decap.contains("ExecStart=/opt/lb/sbin/lb decap attach --interface %i"), "{decap}");
    // The example configuration is valid as shipped.
    let example = root.join("etc/lb/lb.toml");
    lb::config::load(&example).unwrap_or_else(|e| panic!("the example configuration: {e}"));
    // A second install keeps the operator's configuration.
    std::fs::write(&example, "# mine\n").unwrap();
    let said = install();
    assert!(said.contains("kept"), "{said}");
    assert_eq!(std::fs::read_to_string(&example).unwrap(), "# mine\n");
    let _ = std::fs::remove_dir_all(&root);
}

/// Purges the package however the test ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "lb"]).output();
    }
}

fn dpkg(args: &[&str]) -> String {
    let out = Command::new("dpkg").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dpkg {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_debian_package_installs_starts_nothing_and_removes_cleanly() {
    if !require_root("the_debian_package_installs_starts_nothing_and_removes_cleanly") {
        return;
    }
    // This machine's own installation is not the test's to replace.
    let installed = Command::new("dpkg-query").args(["-W", "-f=${Status}", "lb"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&installed.stdout).contains("installed") && !Path::new("/etc/lb/lb.toml").exists(),
        "a package lb or /etc/lb/lb.toml is already on this machine: this test installs and purges its own"
    );
    let out = Command::new(lb_tests::sibling_binary("xtask"))
        .args(["package", "--binary"])
        .arg(lb_binary())
        .output()
        .unwrap();
    assert!(out.status.success(), "xtask package: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8(out.stdout).unwrap();
    let deb = said.lines().find_map(|l| l.strip_prefix("package: ")).expect("the package's path").to_string();

    let _purge = Purge;
    dpkg(&["-i", &deb]);
    let version = Command::new("/usr/sbin/lb").arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("lb "), "{version:?}");
    let unit = std::fs::read_to_string("/lib/systemd/system/lb.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/lb daemon --config /etc/lb/lb.toml"), "{unit}");
    assert!(Path::new("/etc/lb/lb.toml").is_file() && Path::new("/usr/share/man/man8/lb.8").is_file());
    // Installing starts nothing.
    let running = Command::new("pgrep").args(["-f", "/usr/sbin/lb daemon"]).output().unwrap();
    assert!(!running.status.success(), "a daemon runs after install: {}", String::from_utf8_lossy(&running.stdout));
    assert!(!Path::new("/run/lb/lb.sock").exists());

    // Removing keeps the configuration (a conffile); purging takes it too.
    dpkg(&["-r", "lb"]);
    assert!(!Path::new("/usr/sbin/lb").exists() && !Path::new("/lib/systemd/system/lb.service").exists());
    assert!(Path::new("/etc/lb/lb.toml").exists(), "remove keeps the configuration");
    dpkg(&["--purge", "lb"]);
    assert!(!Path::new("/etc/lb").exists(), "purge leaves nothing in /etc");
    let listed = Command::new("dpkg-query").args(["-W", "-f=${Status}", "lb"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("installed"), "{listed:?}");
}
