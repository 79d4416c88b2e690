//! The daemon's API and CLI: who may use it, edits that survive restarts, and invalid
//! configurations that leave a running daemon exactly as it was.

use lb_tests::daemon::{LbDaemon, lb_binary, unique_instance};
use lb_tests::invalid_configs::{cases, expected_for, good};
use lb_tests::privilege::require_root;
use lb_tests::topology::Topology;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn backends(topology: &Topology) -> (String, String) {
    (format!("{}:8080", topology.backends[0].v4), format!("{}:8080", topology.backends[1].v4))
}

fn start(topology: &Topology) -> LbDaemon {
    let instance = unique_instance();
    let (b1, b2) = backends(topology);
    LbDaemon::start(&topology.lb, &instance, &good(&instance, &b1, &b2)).unwrap()
}

#[test]
fn the_api_socket_is_root_only_and_refuses_other_users() {
    if !require_root("the_api_socket_is_root_only_and_refuses_other_users") {
        return;
    }
    let topology = Topology::new(2, false).unwrap();
    let daemon = start(&topology);
    let socket = lb::api::socket_path(&daemon.instance);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), 0, "socket owner");

    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(lb_binary())
            .args(["--instance", &daemon.instance])
            .args(args)
            .output()
            .unwrap()
    };
    // The file mode alone keeps other users out...
    let refused = as_nobody(&["status"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Permission denied"), "{refused:?}");
    // ...and with the mode opened up, the daemon still refuses them by their credentials.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = as_nobody(&["vip", "del", "web"]);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("permission denied: the lb API serves root only (you are uid 65534)"), "{stderr}");
    assert!(daemon.ok(&["vip", "list"]).unwrap().contains("web"), "the refused request changed nothing");
    assert!(daemon.log().contains("API request from a non-root user refused"));
}

#[test]
fn cli_edits_are_applied_and_survive_a_restart() {
    if !require_root("cli_edits_are_applied_and_survive_a_restart") {
        return;
    }
    let mut topology = Topology::new(3, false).unwrap();
    let mut daemon = start(&topology);
    let b3 = format!("{}:8080", topology.backends[2].v4);
    let added = daemon.ok(&["backend", "add", "--vip", "web", "--address", &b3, "--weight", "2"]).unwrap();
    assert!(added.contains(&format!("+ vip web: backend {b3} weight 2")), "{added}");
    let drained = daemon.ok(&["backend", "drain", "--vip", "web", "--address", &b3]).unwrap();
    assert!(drained.contains("drained"), "{drained}");
    daemon
        .ok(&[
            "vip",
            "add",
            "--name",
            "dns",
            "--address",
            "10.0.0.53:53",
            "--protocol",
            "udp",
            "--mode",
            "nat",
            "--snat",
            "10.0.0.3",
        ])
        .unwrap();
    let duplicate = daemon.cli(&["vip", "add", "--name", "dns", "--address", "10.0.0.54:53", "--mode", "dsr"]).unwrap();
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("VIP \"dns\" exists already"));

    let listed = daemon.ok(&["--json", "backend", "list"]).unwrap();
    assert!(listed.contains("\"drained\": true"), "{listed}");
    let before = daemon.configuration().unwrap();
    let table = daemon.ok(&["backend", "list", "--vip", "web"]).unwrap();
    assert!(table.lines().next().unwrap().contains("BACKEND"), "human output is a table: {table}");

    // SIGTERM: the daemon exits, the data plane stays; the new daemon comes back with the edits.
    daemon.terminate().unwrap();
    assert!(lb::dataplane::PinDir::for_instance(&daemon.instance).link().exists(), "the data plane stays pinned");
    daemon.restart().unwrap();
    assert_eq!(daemon.configuration().unwrap(), before, "edits survive the restart");
    assert!(daemon.ok(&["--json", "backend", "list"]).unwrap().contains("\"drained\": true"));
    assert!(daemon.ok(&["vip", "list"]).unwrap().contains("dns"));
    let status = daemon.ok(&["status"]).unwrap();
    assert!(status.contains("took over the running data plane"), "{status}");
    assert!(daemon.log().contains("resuming the saved state"));
    drop(topology.backends.pop());

    // `lb detach` stops the daemon and removes everything: program, pins, saved state.
    let detached = daemon.ok(&["detach"]).unwrap();
    assert!(detached.contains("daemon stopped, data plane removed"), "{detached}");
    let link = topology.lb.ip(&["link", "show", "eth0"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"), "program still attached: {link:?}");
    assert!(!lb::dataplane::PinDir::for_instance(&daemon.instance).path().exists());
    assert!(!lb::store::StateStore::for_instance(&daemon.instance).path().exists());
    let again = daemon.ok(&["detach"]).unwrap();
    assert!(again.contains("nothing to remove"), "{again}");
}

#[test]
fn invalid_configs_leave_the_running_daemon_unchanged() {
    if !require_root("invalid_configs_leave_the_running_daemon_unchanged") {
        return;
    }
    let topology = Topology::new(2, false).unwrap();
    let daemon = start(&topology);
    let (b1, b2) = backends(&topology);
    let snapshot = || {
        (
            daemon.configuration().unwrap(),
            std::fs::read_to_string(lb::store::StateStore::for_instance(&daemon.instance).path()).unwrap(),
        )
    };
    let before = snapshot();
    let dir = daemon.config.parent().unwrap().to_path_buf();
    let cases = cases(&daemon.instance, &b1, &b2);
    let mut wrong = Vec::new();
    for (i, (name, source, expected)) in cases.iter().enumerate() {
        let file = dir.join(format!("bad{i}.toml"));
        std::fs::write(&file, source).unwrap();
        let output = daemon.cli(&["apply", "-f", file.to_str().unwrap()]).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let expected = expected_for(expected, file.to_str().unwrap());
        if output.status.success() || !stderr.contains(&expected) {
            wrong.push(format!("{name}: expected {expected:?}, got {stderr:?}"));
        }
        assert_eq!(snapshot(), before, "{name}: the running state changed");
    }
    assert!(wrong.is_empty(), "{} of {} cases wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    // A valid file whose daemon settings differ from the running daemon's is refused whole,
    // naming each setting (they need a restart).
    let file = dir.join("settings.toml");
    let changed = good(&daemon.instance, &b1, &b2)
        .replace("[daemon]\n", "[daemon]\ncheck_destination_mac = false\nmax_conns = 4096\n")
        .replace("weight = 1", "weight = 3");
    std::fs::write(&file, changed).unwrap();
    let output = daemon.cli(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "settings changes must be refused: {stderr}");
    assert!(stderr.contains("check_destination_mac, max_conns") && stderr.contains("nothing was applied"), "{stderr}");
    assert_eq!(snapshot(), before, "a refused settings change leaves everything as it was");
    // A valid file applies, and says what it changed.
    let file = dir.join("good.toml");
    std::fs::write(&file, good(&daemon.instance, &b1, &b2).replace("weight = 1", "weight = 3")).unwrap();
    let dry = daemon.ok(&["apply", "-f", file.to_str().unwrap(), "--dry-run"]).unwrap();
    assert!(dry.contains(&format!("~ vip web: backend {b1} weight 1 -> 3")) && dry.contains("dry run"), "{dry}");
    assert_eq!(snapshot(), before, "a dry run changes nothing");
    let applied = daemon.ok(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    assert!(applied.contains(&format!("~ vip web: backend {b1} weight 1 -> 3")), "{applied}");
    assert!(daemon.ok(&["--json", "backend", "list"]).unwrap().contains("\"weight\": 3"));
}
