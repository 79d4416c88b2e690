//! Active/active: the VIPs this node can serve are announced over BGP by a BIRD the daemon runs.

use crate::config::BgpSettings;
use crate::report::BgpStatus;
use anyhow::Result;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

pub struct Announcer {}

impl Announcer {
    /// Writes a BIRD configuration announcing nothing yet, starts BIRD and waits for its socket.
    pub fn start(_settings: &BgpSettings, _run_dir: &Path) -> Result<Self> {
        todo!()
    }

    /// Announces exactly `vips` (as /32 and /128), withdrawing the others. No-op when unchanged.
    pub fn announce(&mut self, _vips: &BTreeSet<IpAddr>) -> Result<()> {
        todo!()
    }

    /// Withdraws everything and stops BIRD (the session closes: peers drop our routes at once).
    pub fn stop(&mut self) -> Result<()> {
        todo!()
    }

    pub fn status(&self) -> BgpStatus {
        todo!()
    }
}
