//! Active/active: the VIPs this node can serve are announced over BGP by a BIRD the daemon runs
//! (one per instance, its own configuration and control socket in the run directory). Routers
//! spread flows over the nodes with ECMP; Maglev makes every node pick the same backend.

use crate::config::BgpSettings;
use crate::report::BgpStatus;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The BGP protocol's name in BIRD's configuration (and in `birdc show protocols`).
const SESSION: &str = "upstream";

pub struct Announcer {
    settings: BgpSettings,
    config: PathBuf,
    socket: PathBuf,
    bird: Bird,
    announced: BTreeSet<IpAddr>,
}

/// The BIRD this daemon talks to.
enum Bird {
    Stopped,
    /// Started by this daemon.
    Child(Child),
    /// Started by a previous daemon of the instance that was killed: taken over as it runs.
    Adopted,
}

impl Announcer {
    /// Writes a BIRD configuration announcing nothing yet, starts BIRD and waits for its socket.
    /// A BIRD that a killed daemon of this instance left running is taken over instead, with
    /// its announcements, so that the BGP session (and the traffic it draws) never drops.
    pub fn start(settings: &BgpSettings, run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let config = run_dir.join("bird.conf");
        let socket = run_dir.join("bird.ctl");
        let mut announcer =
            Self { settings: settings.clone(), config, socket, bird: Bird::Stopped, announced: BTreeSet::new() };
        if announcer.socket.exists() && announcer.birdc(&["show", "status"]).is_ok() {
            tracing::warn!(socket = %announcer.socket.display(), "a BIRD of a previous run still runs: taking it over");
            announcer.bird = Bird::Adopted;
            return Ok(announcer);
        }
        announcer.write_config(&BTreeSet::new())?;
        let _ = std::fs::remove_file(&announcer.socket);
        let child = Command::new(&settings.bird)
            .arg("-f")
            .arg("-c")
            .arg(&announcer.config)
            .arg("-s")
            .arg(&announcer.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (bgp.bird; Debian package bird2)", settings.bird))?;
        announcer.bird = Bird::Child(child);
        let started = Instant::now();
        while announcer.birdc(&["show", "status"]).is_err() {
            if let Bird::Child(child) = &mut announcer.bird
                && let Some(status) = child.try_wait().ok().flatten()
            {
                bail!("BIRD exited at start ({status})");
            }
            if started.elapsed() > Duration::from_secs(5) {
                bail!("BIRD did not open its control socket {} within 5 s", announcer.socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(neighbor = %settings.neighbor, local_as = settings.local_as, "BIRD started for BGP announcements");
        Ok(announcer)
    }

    /// Announces exactly `vips` (as /32 and /128), withdrawing the others. No-op when unchanged.
    pub fn announce(&mut self, vips: &BTreeSet<IpAddr>) -> Result<()> {
        if *vips == self.announced {
            return Ok(());
        }
        self.write_config(vips)?;
        self.birdc(&["configure"])?;
        for vip in vips.difference(&self.announced) {
            tracing::info!(%vip, "BGP: announced");
        }
        for vip in self.announced.difference(vips) {
            tracing::warn!(%vip, "BGP: withdrawn (no usable backend)");
        }
        self.announced = vips.clone();
        Ok(())
    }

    /// Withdraws everything and stops BIRD: the session closes with a notification, so peers
    /// drop our routes at once instead of waiting for the hold time.
    pub fn stop(&mut self) -> Result<()> {
        let bird = std::mem::replace(&mut self.bird, Bird::Stopped);
        if matches!(bird, Bird::Stopped) {
            return Ok(());
        }
        let _ = self.birdc(&["down"]);
        let started = Instant::now();
        match bird {
            Bird::Child(mut child) => {
                while child.try_wait()?.is_none() {
                    if started.elapsed() > Duration::from_secs(3) {
                        child.kill()?;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.wait();
            }
            // Not our child: gone once its control socket no longer answers.
            Bird::Adopted => {
                while self.birdc(&["show", "status"]).is_ok() && started.elapsed() < Duration::from_secs(3) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Bird::Stopped => {}
        }
        self.announced.clear();
        Ok(())
    }

    pub fn status(&self) -> BgpStatus {
        let session = self
            .birdc(&["show", "protocols", SESSION])
            .map(|out| session_state(&out).unwrap_or_else(|| "unknown".into()))
            .unwrap_or_else(|e| format!("BIRD unreachable: {e:#}"));
        BgpStatus {
            neighbor: format!("{} (AS {})", self.settings.neighbor, self.settings.neighbor_as),
            session,
            announced: self.announced.iter().map(ToString::to_string).collect(),
        }
    }

    /// Writes the configuration atomically after BIRD has checked it (`bird -p`).
    fn write_config(&self, vips: &BTreeSet<IpAddr>) -> Result<()> {
        let candidate = self.config.with_extension("conf.new");
        std::fs::write(&candidate, render_config(&self.settings, vips))
            .with_context(|| format!("writing {}", candidate.display()))?;
        let check = Command::new(&self.settings.bird)
            .arg("-p")
            .arg("-c")
            .arg(&candidate)
            .output()
            .with_context(|| format!("running {} (bgp.bird; Debian package bird2)", self.settings.bird))?;
        if !check.status.success() {
            bail!("BIRD rejects the generated configuration: {}", String::from_utf8_lossy(&check.stderr).trim());
        }
        std::fs::rename(&candidate, &self.config).with_context(|| format!("replacing {}", self.config.display()))
    }

    fn birdc(&self, args: &[&str]) -> Result<String> {
        let output = Command::new("birdc").arg("-s").arg(&self.socket).args(args).output().context("running birdc")?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() || text.contains("Unable to connect") {
            bail!("birdc {}: {}{}", args.join(" "), text.trim(), String::from_utf8_lossy(&output.stderr).trim());
        }
        if text.lines().any(|l| l.contains("error") || l.starts_with("Reconfiguration failed")) {
            bail!("birdc {}: {}", args.join(" "), text.trim());
        }
        Ok(text)
    }
}

/// Stops a BIRD that a killed daemon left running in `run_dir` (`lb detach` without a daemon).
/// Returns whether one answered.
pub fn stop_orphan(run_dir: &Path) -> bool {
    let socket = run_dir.join("bird.ctl");
    socket.exists()
        && Command::new("birdc")
            .arg("-s")
            .arg(&socket)
            .arg("down")
            .output()
            .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("Unable to connect"))
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// BIRD 2 configuration: the VIPs as blackhole static routes (nothing exports them to the
/// node's own kernel), exported over one BGP session with our address as next hop.
pub fn render_config(settings: &BgpSettings, vips: &BTreeSet<IpAddr>) -> String {
    let routes = |v6: bool| -> String {
        vips.iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| format!("  route {a}/{} blackhole;\n", if v6 { 128 } else { 32 }))
            .collect()
    };
    let hold = if settings.hold_time == 0 {
        "  hold time 0;\n".to_string()
    } else {
        format!("  hold time {};\n  keepalive time {};\n", settings.hold_time, (settings.hold_time / 3).max(1))
    };
    format!(
        "# Generated by lb: the VIPs this node can serve. Rewritten on every change.\n\
         router id {router_id};\n\
         protocol device {{ }}\n\
         protocol static lb_vips4 {{\n  ipv4;\n{routes4}}}\n\
         protocol static lb_vips6 {{\n  ipv6;\n{routes6}}}\n\
         protocol bgp {SESSION} {{\n  local as {local_as};\n  neighbor {neighbor} as {neighbor_as};\n{hold}  \
         ipv4 {{ import none; export where proto = \"lb_vips4\"; next hop self; }};\n  \
         ipv6 {{ import none; export where proto = \"lb_vips6\"; next hop self; }};\n}}\n",
        router_id = settings.router_id,
        routes4 = routes(false),
        routes6 = routes(true),
        local_as = settings.local_as,
        neighbor = settings.neighbor,
        neighbor_as = settings.neighbor_as,
    )
}

/// The state column of `birdc show protocols NAME` ("Established", "Active", "Connect", …).
fn session_state(output: &str) -> Option<String> {
    let line = output.lines().find(|l| l.starts_with(SESSION))?;
    // Name Proto Table State Since Info: Info is the BGP state.
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(fields.get(5..).map(|info| info.join(" ")).filter(|s| !s.is_empty()).unwrap_or_else(|| fields[3].to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BgpSettings {
        BgpSettings {
            local_as: 65001,
            router_id: "10.1.0.2".parse().unwrap(),
            neighbor: "10.1.0.1".parse().unwrap(),
            neighbor_as: 65000,
            hold_time: 3,
            bird: "bird".into(),
        }
    }

    #[test]
    fn the_configuration_announces_each_vip_as_a_host_route_of_its_family() {
        let vips: BTreeSet<IpAddr> = ["10.0.0.100".parse().unwrap(), "fd00::100".parse().unwrap()].into();
        let config = render_config(&settings(), &vips);
        assert!(config.contains("router id 10.1.0.2;"));
        assert!(config.contains("protocol static lb_vips4 {\n  ipv4;\n  route 10.0.0.100/32 blackhole;\n}"));
        assert!(config.contains("protocol static lb_vips6 {\n  ipv6;\n  route fd00::100/128 blackhole;\n}"));
        assert!(config.contains("neighbor 10.1.0.1 as 65000;"));
        assert!(config.contains("hold time 3;\n  keepalive time 1;"));
        assert!(config.contains("export where proto = \"lb_vips4\"; next hop self;"));
    }

    #[test]
    fn nothing_to_announce_leaves_empty_static_protocols() {
        let config = render_config(&settings(), &BTreeSet::new());
        assert!(!config.contains("route "));
    }

    #[test]
    fn the_session_state_is_read_from_show_protocols() {
        let output = "BIRD 2.0.12 ready.\nName       Proto      Table      State  Since         Info\n\
                      upstream   BGP        ---        up     12:00:01.123  Established   \n";
        assert_eq!(session_state(output).as_deref(), Some("Established"));
        let down = "Name Proto Table State Since Info\nupstream BGP --- start 12:00:01.123 Active Socket: Connection refused\n";
        assert_eq!(session_state(down).as_deref(), Some("Active Socket: Connection refused"));
    }
}
