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

/// Fails, naming each, when the tests left anything that was not there before. What belongs to
/// a test process that still runs is another test run's, going on beside this one (this run's
/// test processes have all exited by now).
pub fn check(before: &BTreeSet<String>) -> Result<()> {
    let running_elsewhere = |item: &String| owner_of(item).is_some_and(|pid| Path::new("/proc").join(pid).exists());
    let left: Vec<String> = snapshot().difference(before).filter(|item| !running_elsewhere(item)).cloned().collect();
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

/// The pid that starts the owning test process's tag in a snapshot item (see [`snapshot`]): in
/// an instance (`t<pid>x<n>`), a namespace or temporary name (`lbt<pid>-…`, `lb-test-t<pid>x…`),
/// or for a process, in the name of the test namespace it runs in. None when it has none.
fn owner_of(item: &str) -> Option<String> {
    let tagged = match item.strip_prefix("process ") {
        Some(rest) => netns_of(rest.split(' ').next()?)?,
        None => item.rsplit(['/', ' ']).next()?.to_string(),
    };
    let tag =
        tagged.strip_prefix("lb-test-t").or_else(|| tagged.strip_prefix("lbt")).or_else(|| tagged.strip_prefix('t'))?;
    let pid: String = tag.chars().take_while(char::is_ascii_digit).collect();
    (!pid.is_empty()).then_some(pid)
}

/// The name of the named network namespace process `pid` runs in.
fn netns_of(pid: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(Path::new("/proc").join(pid).join("ns/net")).ok()?.ino();
    entries(Path::new("/run/netns"))
        .into_iter()
        .find(|name| std::fs::metadata(Path::new("/run/netns").join(name)).is_ok_and(|m| m.ino() == inode))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leftover_names_its_test_process_when_it_has_one() {
        assert_eq!(owner_of("/sys/fs/bpf/t123x1").as_deref(), Some("123"));
        assert_eq!(owner_of("/run/lb/t123x1.sock").as_deref(), Some("123"));
        assert_eq!(owner_of("network namespace lbt55-3-lb").as_deref(), Some("55"));
        assert_eq!(owner_of("/tmp/lb-test-t77x2.toml").as_deref(), Some("77"));
        assert_eq!(owner_of("/sys/fs/bpf/tc"), None, "not a test's");
        assert_eq!(owner_of("/run/lb/bird"), None);
    }
}
