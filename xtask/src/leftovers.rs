//! What the tests may leave on the machine, and the check that they leave nothing: network
//! namespaces, pins, runtime and state files, test directories and the processes tests start.
//!
//! Test resources carry the test process's pid in their names (`lbt<pid>-…` namespaces,
//! `t<pid>x<n>` instances), so what a killed earlier run left can be told apart and removed.

use anyhow::{Result, bail};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// Directories whose entries tests create (one per daemon instance, plus BIRD's files, and one
/// per namespace and interface that `lb decap attach` pinned).
const DIRS: [&str; 4] = ["/run/lb", "/sys/fs/bpf", DECAP_PINS, "/var/lib/lb"];
/// `lb decap`'s pins: `netns<inode>-<interface>` directories.
const DECAP_PINS: &str = "/sys/fs/bpf/lb-decap";
/// Programs tests start that must be gone afterwards.
const PROGRAMS: [&str; 4] = ["name-server", "bird", "keepalived", "haproxy"];

/// Everything test-made that exists now.
pub fn snapshot() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for dir in DIRS {
        for name in entries(Path::new(dir)) {
            if !matches!(name.as_str(), "maps.debug" | "progs.debug") {
                found.insert(format!("{dir}/{name}"));
            }
        }
    }
    for name in entries(&std::env::temp_dir()) {
        if name.starts_with("lb-test-") || name.starts_with("lbt") {
            found.insert(format!("{}/{name}", std::env::temp_dir().display()));
        }
    }
    for name in namespaces() {
        found.insert(format!("network namespace {name}"));
    }
    for (pid, program) in processes() {
        found.insert(format!("process {pid} ({program})"));
    }
    found
}

/// Fails, naming each, when the tests left anything that was not there before.
pub fn check(before: &BTreeSet<String>) -> Result<()> {
    let left: Vec<String> = snapshot().difference(before).cloned().collect();
    if !left.is_empty() {
        bail!("the tests left {} things behind:\n  {}", left.len(), left.join("\n  "));
    }
    Ok(())
}

/// Removes what test processes that no longer run left behind (a killed earlier run).
pub fn remove_stale() {
    let mut removed = Vec::new();
    for name in namespaces() {
        if owner_gone(name.strip_prefix("lbt")) {
            // Servers and daemons still running inside would keep the namespace alive.
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            removed.push(format!("network namespace {name}"));
        }
    }
    for dir in DIRS {
        for name in entries(Path::new(dir)) {
            let instance = name.strip_suffix(".sock").unwrap_or(&name);
            if owner_gone(instance.strip_prefix('t')) && instance.contains('x') {
                let path = Path::new(dir).join(&name);
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.push(path.display().to_string());
            }
        }
    }
    // Decapsulation pinned in a namespace that is gone: its interface went with it.
    let live = live_netns_inodes();
    for name in entries(Path::new(DECAP_PINS)) {
        let inode = name.strip_prefix("netns").and_then(|rest| rest.split('-').next()).and_then(|n| n.parse().ok());
        if inode.is_some_and(|inode: u64| !live.contains(&inode)) {
            let path = Path::new(DECAP_PINS).join(&name);
            let _ = std::fs::remove_dir_all(&path);
            removed.push(path.display().to_string());
        }
    }
    let _ = std::fs::remove_dir(DECAP_PINS); // only when empty
    let tmp = std::env::temp_dir();
    for name in entries(&tmp) {
        let owner = name.strip_prefix("lb-test-t").or_else(|| name.strip_prefix("lbt"));
        if owner_gone(owner) {
            let path = tmp.join(&name);
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.push(path.display().to_string());
        }
    }
    if !removed.is_empty() {
        println!("xtask test: removed what killed earlier test runs left: {}", removed.join(", "));
    }
}

/// The inodes of every network namespace that still exists: named ones and processes' own.
fn live_netns_inodes() -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let named = entries(Path::new("/run/netns")).into_iter().map(|n| Path::new("/run/netns").join(n));
    let of_processes = entries(Path::new("/proc"))
        .into_iter()
        .filter(|p| p.parse::<u32>().is_ok())
        .map(|pid| Path::new("/proc").join(pid).join("ns/net"));
    named.chain(of_processes).filter_map(|path| std::fs::metadata(path).ok()).map(|m| m.ino()).collect()
}

/// Whether the process whose pid starts `tail` (up to the first non-digit) has exited.
fn owner_gone(tail: Option<&str>) -> bool {
    let Some(tail) = tail else { return false };
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    !digits.is_empty() && !Path::new("/proc").join(&digits).exists()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn namespaces() -> Vec<String> {
    entries(Path::new("/run/netns")).into_iter().filter(|n| n.starts_with("lbt")).collect()
}

/// (pid, program) of the running processes tests start.
fn processes() -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for pid in entries(Path::new("/proc")).iter().filter_map(|p| p.parse::<u32>().ok()) {
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else { continue };
        let comm = comm.trim();
        // A zombie holds nothing but its pid, until whoever inherited it reaps it.
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')));
        if PROGRAMS.contains(&comm) && !zombie {
            found.push((pid, comm.to_string()));
        }
    }
    found
}
