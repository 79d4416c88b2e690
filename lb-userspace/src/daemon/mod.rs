//! The daemon's state and the one way it changes: a whole desired state is validated and
//! planned without side effects, then written to the data plane, then persisted.

mod diff;
mod replicate;
mod requests;
pub mod run;

use crate::config::DaemonSettings;
use crate::dataplane::{Attachment, Dataplane, PinDir, VipForwarding};
use crate::health::{Health, HealthEngine, Transition, Via, effective_check};
use crate::model::{DesiredState, Mode, VipSpec};
use crate::neighbor::resolve_next_hop_mac;
use crate::planner::{Slots, addr16, backend_entry, backend_id, table_members, vip_id, vip_key};
use crate::store::{SavedState, StateStore};
use anyhow::{Context, Result, bail};
use lb_common::maglev::{build_table, slots_changed};
use lb_common::maps::{BACKEND_USABLE, Traffic};
use lb_common::tunnel::{CheckPath, check_mark};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

/// Counters at one moment, for rates.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    vips: HashMap<String, Traffic>,
    backends: HashMap<String, Traffic>,
    /// The driver's count of frames it failed to send back out, when it keeps one.
    xdp_tx_errors: Option<u64>,
}

pub struct Daemon {
    settings: DaemonSettings,
    /// The tunnel modes' outer sources, and the interface MTU the data plane was given.
    tunnel: crate::tunnel::TunnelSources,
    mtu: u16,
    /// The interface's own IPv4 and IPv6 addresses: checks via a VIP are sent from them.
    check_sources: (Option<IpAddr>, Option<IpAddr>),
    /// Whether `accept_local` was set on the interface (see `accept_local_sources`).
    accepts_local: bool,
    config_file: PathBuf,
    config_digest: String,
    dataplane: Dataplane,
    pins: PinDir,
    store: StateStore,
    state: DesiredState,
    slots: Slots,
    macs: HashMap<IpAddr, [u8; 6]>,
    /// The table each VIP was last published with (to publish only what changed, and log how
    /// many slots moved).
    published: HashMap<String, Vec<u32>>,
    /// The table members each table was built from: a VIP whose members did not change keeps
    /// its table without a rebuild.
    built_from: HashMap<String, Vec<lb_common::maglev::MaglevBackend>>,
    /// The source ports each NAT VIP's flows take (see [`crate::planner::nat_source_ports`]).
    nat_ports: HashMap<String, (u16, u16)>,
    /// The backends the published tables treat as down. The checks' own view (`health`) runs
    /// ahead of it until the daemon has handled a transition: reports show what the data plane
    /// does, so they use this.
    published_down: HashSet<String>,
    attachment: Option<Attachment>,
    /// What keeps this node from working as it should and holds for its lifetime (pins that
    /// will not outlive the daemon): logged, and shown by `lb status`.
    warnings: Vec<String>,
    /// Why frames sent back out of the interface may not arrive (a veth peer without XDP),
    /// checked again every few seconds: logged when it changes, shown by `lb status`.
    xdp_tx_problem: Option<String>,
    health: HealthEngine,
    started: Instant,
    samples: (Option<Sample>, Option<Sample>),
    /// Announces the servable VIPs over BGP, when configured.
    pub(crate) bgp: Option<crate::ha::bgp::Announcer>,
    /// This node's half of an active/standby pair, when configured.
    pub(crate) pair: Option<crate::ha::pair::Pair>,
    pub(crate) sync: crate::ha::pair::SyncView,
    /// Wakes the replication to the standby after a change.
    pub(crate) replicate_now: std::sync::Arc<tokio::sync::Notify>,
    /// Set by a shutdown request: `Some(true)` also detaches the data plane.
    pub stop: Option<bool>,
    /// Watches the new-flow rates for floods (see [`Self::watch_floods`]).
    flood: crate::flood::FloodDetector,
    /// Watches how backends of `observe` VIPs answer new flows (see [`Self::observe`]).
    observer: crate::observe::Observer,
    /// The connection tables as the sweep thread last found them (`run::sweep_tables`).
    pub(crate) tables: std::sync::Arc<std::sync::Mutex<crate::report::TablesState>>,
}

/// Everything a desired state needs, computed before anything is written.
struct Plan {
    state: DesiredState,
    slots: Slots,
    macs: HashMap<IpAddr, [u8; 6]>,
    /// The source ports of each NAT VIP's flows (by VIP identity), clear of the host's own.
    nat_ports: HashMap<String, (u16, u16)>,
}

impl Daemon {
    /// The line `systemctl status` shows.
    pub fn systemd_status(&self) -> String {
        let attachment = self.attachment.as_ref().map_or("not attached".to_string(), |a| a.describe());
        let mut status =
            format!("serving {} VIPs on {} ({attachment})", self.state.vips.len(), self.settings.interface);
        if let Some(problem) = self.warnings.first().or(self.xdp_tx_problem.as_ref()) {
            status.push_str(&format!("; warning: {problem}"));
        }
        status
    }

    /// Applies `state` whole, or changes nothing and says why. Returns the changes made.
    pub fn apply(&mut self, state: DesiredState, cause: &str) -> Result<Vec<String>> {
        let plan = self.plan(state)?;
        let changes = diff::changes(&self.state, &plan.state);
        let previous = self.current_plan();
        self.sync_health(&plan.state, &plan.slots);
        if let Err(error) = self.write(&plan) {
            tracing::error!(%error, "writing the data plane failed; restoring the previous state");
            self.sync_health(&previous.state, &previous.slots);
            if let Err(rollback) = self.write(&previous) {
                tracing::error!(%rollback, "restoring the previous state failed too");
            }
            return Err(error.context("the data plane refused the change; the previous state was restored"));
        }
        self.state = plan.state;
        self.slots = plan.slots;
        self.macs = plan.macs;
        self.nat_ports = plan.nat_ports;
        for change in &changes {
            tracing::info!(cause, "{change}");
        }
        self.persist().context("the change is live but could not be saved; it will be lost on restart")?;
        self.announce();
        if self.attachment.is_some() {
            // Serving already: the line `systemctl status` shows follows the change.
            run::notify_systemd(&[sd_notify::NotifyState::Status(&self.systemd_status())]);
        }
        Ok(changes)
    }

    fn plan(&self, state: DesiredState) -> Result<Plan> {
        let sizes = self.settings.sizes;
        let problems = state.problems(sizes.max_vips, sizes.ring_size);
        if !problems.is_empty() {
            let lines: Vec<String> = problems
                .iter()
                .map(|p| {
                    let vip = p.vip.and_then(|i| state.vips.get(i)).map(|v| format!("vip {:?}", v.name));
                    let backend = p.backend.map(|j| format!("backend #{}", j + 1));
                    let at: Vec<String> = [vip, backend].into_iter().flatten().collect();
                    format!("{}: {}: {}", at.join(" "), p.field, p.message)
                })
                .collect();
            bail!("{}", lines.join("\n"));
        }
        let mut slots = self.slots.clone();
        slots.assign(&state, sizes.max_vips)?;
        for vip in state.vips.iter().filter(|v| v.mode.is_tunnel()) {
            for backend in &vip.backends {
                let ip = backend.address.ip();
                if self.tunnel.for_backend(ip).is_none() {
                    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                    bail!(
                        "vip {:?}: backend {ip}: no {family} tunnel source: give {} an {family} address or set [daemon] tunnel_source",
                        vip.name,
                        self.settings.interface
                    );
                }
            }
        }
        let mut macs = self.macs.clone();
        for backend in state.vips.iter().flat_map(|v| &v.backends) {
            let ip = backend.address.ip();
            let mac = match backend.mac {
                Some(mac) => mac,
                None => match macs.get(&ip) {
                    Some(mac) => *mac,
                    None => resolve_next_hop_mac(ip)?,
                },
            };
            macs.insert(ip, mac);
        }
        let local_ports = local_port_range()?;
        let mut nat_ports = HashMap::new();
        for vip in state.vips.iter().filter(|v| v.mode == Mode::Nat) {
            nat_ports.insert(vip_id(vip), crate::planner::nat_source_ports(&vip.name, vip.snat_ports, local_ports)?);
        }
        Ok(Plan { state, slots, macs, nat_ports })
    }

    /// What is applied now, as a plan (to restore it, or to write it again with new health).
    fn current_plan(&self) -> Plan {
        Plan {
            state: self.state.clone(),
            slots: self.slots.clone(),
            macs: self.macs.clone(),
            nat_ports: self.nat_ports.clone(),
        }
    }

    /// Writes a plan to the data plane: backends first, then whole tables, then VIP removals, so
    /// no packet is ever sent to a slot that is not written yet.
    ///
    /// A removed backend leaves every table, but its entry stays usable: connections established
    /// to it finish there (as with IPVS), new ones go elsewhere. Its slot's connection entries
    /// are purged only if the slot is later given to another backend.
    fn write(&mut self, plan: &Plan) -> Result<()> {
        let ring_size = self.settings.sizes.ring_size;
        let held_before: HashSet<u32> = self.slots.backends.values().copied().collect();
        let down = self.down_backends(&plan.state);
        for vip in &plan.state.vips {
            for backend in &vip.backends {
                let index = plan.slots.backend(vip, backend.address).context("backend without a slot")?;
                let healthy = !down.contains(&backend_id(vip, backend.address));
                let entry = backend_entry(backend, plan.macs[&backend.address.ip()], healthy);
                let old = self.dataplane.backend(index)?;
                if old == entry {
                    continue;
                }
                if !held_before.contains(&index) && old != Default::default() {
                    let forgotten = self.dataplane.forget_backend_connections(index)?;
                    tracing::info!(index, forgotten, "slot reused: connection entries of its former backend dropped");
                }
                self.dataplane.set_backend(index, &entry)?;
            }
        }
        for vip in &plan.state.vips {
            let members = table_members(vip, &plan.slots, &|b| !down.contains(&backend_id(vip, b.address)));
            let id = vip_id(vip);
            let table = match (self.built_from.get(&id), self.published.get(&id)) {
                (Some(before), Some(table)) if *before == members => table.clone(),
                _ => build_table(&members, ring_size)?,
            };
            let key = vip_key(vip);
            let ports = plan.nat_ports.get(&id).copied().unwrap_or(vip.snat_ports);
            let forwarding = forwarding(vip, plan.slots.vip(vip).context("VIP without a slot")?, ports);
            let meta = self.dataplane.vip(&key)?;
            let same_forwarding = meta.is_some_and(|m| forwarding.meta(m.ring_offset, m.ring_size) == m);
            if same_forwarding && self.published.get(&id) == Some(&table) {
                self.built_from.insert(id, members);
                continue;
            }
            let started = Instant::now();
            self.dataplane.publish_vip(&key, &forwarding, &table)?;
            let moved = self.published.get(&id).map_or(table.len(), |old| slots_changed(old, &table));
            tracing::info!(
                vip = %vip.name,
                backends = members.len(),
                moved,
                ring_size,
                micros = started.elapsed().as_micros() as u64,
                "table published"
            );
            self.published.insert(id.clone(), table);
            self.built_from.insert(id, members);
        }
        self.dataplane.set_vip_addresses(&crate::planner::vip_addresses(&plan.state))?;
        // Entries made under another mode would be misused (a DSR entry carries no NAT port).
        for vip in &plan.state.vips {
            let Some(before) = self.state.vips.iter().find(|o| vip_id(o) == vip_id(vip)) else { continue };
            if before.mode == vip.mode {
                continue;
            }
            for backend in &vip.backends {
                if let Some(index) = plan.slots.backend(vip, backend.address) {
                    self.dataplane.forget_backend_connections(index)?;
                }
            }
        }
        let wanted: Vec<String> = plan.state.vips.iter().map(vip_id).collect();
        for vip in self.state.vips.iter().filter(|v| !wanted.contains(&vip_id(v))) {
            self.dataplane.remove_vip(&vip_key(vip))?;
            self.published.remove(&vip_id(vip));
            self.built_from.remove(&vip_id(vip));
        }
        self.published_down = down;
        Ok(())
    }

    /// Starts or stops health checks to match `state`. A backend seen for the first time starts
    /// as its check says, except one the running data plane already serves (a restarted daemon
    /// taking over), which starts up: a restart must not take healthy backends out.
    fn sync_health(&mut self, state: &DesiredState, slots: &Slots) {
        let mut initial: HashMap<String, Health> = HashMap::new();
        for vip in &state.vips {
            for backend in &vip.backends {
                let Some(check) = effective_check(vip, backend) else { continue };
                let serving = self
                    .slots
                    .backend(vip, backend.address)
                    .and_then(|index| self.dataplane.backend(index).ok())
                    .is_some_and(|entry| {
                        entry.flags & BACKEND_USABLE != 0 && entry.addr == addr16(backend.address.ip())
                    });
                let up = check.initial_up || serving;
                initial.insert(backend_id(vip, backend.address), if up { Health::Up } else { Health::Down });
            }
        }
        let via = |vip: &VipSpec, backend: &crate::model::BackendSpec| {
            let path = match vip.mode {
                Mode::Dsr => CheckPath::Direct,
                Mode::Ipip => CheckPath::Ipip,
                Mode::Gue => CheckPath::Gue,
                Mode::Nat => return None, // refused by validation
            };
            let index = slots.backend(vip, backend.address)?;
            let source = if vip.address.is_ipv4() { self.check_sources.0 } else { self.check_sources.1 };
            Some(Via { mark: check_mark(index, path), source })
        };
        self.health.sync(
            state,
            &|vip, backend| initial.get(&backend_id(vip, backend.address)).copied().unwrap_or(Health::Down),
            &via,
        );
        let via_vip_v4 = state.vips.iter().any(|vip| {
            vip.address.is_ipv4() && vip.backends.iter().any(|b| effective_check(vip, b).is_some_and(|c| c.via_vip))
        });
        if via_vip_v4 && !self.accepts_local {
            self.accept_local_sources();
        }
    }

    /// The VIP addresses this node can serve now: those with at least one usable backend.
    pub fn servable_addresses(&self) -> BTreeSet<IpAddr> {
        self.state
            .vips
            .iter()
            .filter(|vip| {
                !table_members(vip, &self.slots, &|b| !self.published_down.contains(&backend_id(vip, b.address)))
                    .is_empty()
            })
            .map(|vip| vip.address.ip())
            .collect()
    }

    /// Tells the redundancy mechanisms what this node can serve: BGP announces exactly that;
    /// VRRP learns the addresses the pair owns and whether this node is fit to be master.
    pub(crate) fn announce(&mut self) {
        let servable = self.servable_addresses();
        if let Some(bgp) = &mut self.bgp
            && let Err(error) = bgp.announce(&servable)
        {
            tracing::error!("updating the BGP announcements failed: {error:#}");
        }
        if let Some(pair) = &self.pair {
            let mut addresses: Vec<IpAddr> =
                self.state.vips.iter().flat_map(|v| [Some(v.address.ip()), v.snat]).flatten().collect();
            addresses.sort();
            addresses.dedup();
            let fault = if self.attachment.is_none() {
                Some("the data plane is not attached".to_string())
            } else {
                self.state
                    .vips
                    .iter()
                    .find(|v| !servable.contains(&v.address.ip()))
                    .map(|v| format!("VIP {:?} has no usable backend", v.name))
            };
            let mut view = pair.view.lock().expect("pair view poisoned");
            view.addresses = addresses;
            view.fault = fault;
        }
        self.replicate_now.notify_one();
    }

    /// Edits are made on the active node only: a standby takes its state from the active one.
    fn ensure_active(&self) -> Result<()> {
        let Some(pair) = &self.pair else { return Ok(()) };
        let view = pair.view.lock().expect("pair view poisoned");
        if view.is_master() {
            return Ok(());
        }
        match view.master() {
            Some(master) => {
                bail!("this node is the standby ({}); make changes on the active node {master}", view.role())
            }
            None => bail!("this node is the standby ({}); make changes on the active node", view.role()),
        }
    }

    /// A push from the peer. A state is applied whole, unless this node is the active one
    /// itself (two masters: refuse rather than overwrite). NAT flows are installed; a master
    /// (the peer's last flows as it hands over) keeps its own entries for the same tuples.
    /// Returns our digest after.
    pub(crate) fn accept_replica(&mut self, push: crate::ha::replication::Push) -> Result<String> {
        let Some(view) = self.pair.as_ref().map(|p| p.view.clone()) else {
            bail!("{} is not part of a pair", self.settings.instance);
        };
        let master = view.lock().expect("pair view poisoned").is_master();
        // Flows first: while both nodes are master of one address family each (a returning
        // node preempts family by family), the flows still count, the state does not.
        let flows = crate::ha::replication::decode_flows(&push.nat_flows)?;
        if !flows.is_empty() {
            let adopted = self.adopt_nat_flows(&flows, master);
            self.sync.nat_flows_adopted += adopted as u64;
            tracing::debug!(received = flows.len(), adopted, "NAT flows of the peer installed");
        }
        if push.flows_complete {
            view.lock().expect("pair view poisoned").flows_complete_at = Some(Instant::now());
        }
        if push.wants_flows && master {
            tracing::debug!(peer = %push.from, "the peer asks for our NAT flows before it preempts");
            self.replicate_now.notify_one();
        }
        if let Some(state) = push.state {
            if master {
                bail!("{} is master itself: not taking the state of {}", self.settings.instance, push.from);
            }
            if push.digest != crate::store::digest(&self.state) {
                self.apply(state, "replicated from the active node")?;
            }
        }
        let digest = crate::store::digest(&self.state);
        if !master {
            self.sync.last_received = Some((Instant::now(), push.from, digest.clone()));
        }
        Ok(digest)
    }

    /// NAT flows the peer opened, installed with our own slot for their backend so that they
    /// continue through this node after a takeover; with `keep_existing`, never over an entry
    /// of ours. Returns how many were installed.
    fn adopt_nat_flows(&mut self, flows: &[lb_common::maps::NatFlowRecord], keep_existing: bool) -> usize {
        let now = crate::dataplane::clock_ticks();
        let mut adopted = 0;
        for record in flows {
            let Some(index) = self.own_backend_slot(record) else { continue };
            match self.dataplane.adopt_nat_flow(record, index, now, keep_existing) {
                Ok(installed) => adopted += usize::from(installed),
                Err(error) => tracing::warn!("installing a NAT flow of the peer failed: {error:#}"),
            }
        }
        adopted
    }

    /// Our slot for the backend of a flow the active node opened (slots are per node).
    fn own_backend_slot(&self, record: &lb_common::maps::NatFlowRecord) -> Option<u32> {
        let flow = &record.flow;
        let serves = |vip: &&crate::model::VipSpec| {
            let key = crate::planner::vip_key(vip);
            (key.addr, key.proto, key.family) == (flow.dst, flow.proto, flow.family)
                && (key.port == flow.dport || key.port == 0)
        };
        // The exact port wins over the VIP's any-port entry, as in the data plane.
        let vip = self.state.vips.iter().filter(serves).max_by_key(|vip| vip.address.port())?;
        let backend = vip.backends.iter().find(|b| {
            crate::planner::addr16(b.address.ip()) == record.reply.src
                && (b.address.port().to_be() == record.reply.sport || b.address.port() == 0)
        })?;
        self.slots.backend(vip, backend.address)
    }

    /// Backends whose health check says down.
    fn down_backends(&self, state: &DesiredState) -> HashSet<String> {
        state
            .vips
            .iter()
            .flat_map(|vip| vip.backends.iter().map(move |b| backend_id(vip, b.address)))
            .filter(|id| self.health.is_up(id) == Some(false))
            .collect()
    }

    /// A health check changed a backend's state: republish its VIP. The connection-table
    /// entries of a backend that went down stay: the program does not use them while the
    /// backend is down (a flow's next packet is placed anew), and a flow that was quiet meanwhile
    /// continues on its backend, with its NAT source port, if the backend comes back (a node
    /// whose own link failed sees every backend go down and come back).
    pub fn on_transition(&mut self, transition: Transition) {
        let Transition { vip, backend, health, reason } = transition;
        match health {
            Health::Down => tracing::warn!(%vip, %backend, %reason, "backend down"),
            Health::Up => tracing::info!(%vip, %backend, %reason, "backend up"),
        }
        let plan = self.current_plan();
        if let Err(error) = self.write(&plan) {
            tracing::error!(%vip, %backend, "publishing after a health transition failed: {error:#}");
            return;
        }
        self.announce();
    }

    fn persist(&self) -> Result<()> {
        self.store.save(&SavedState::new(self.config_digest.clone(), self.state.clone(), self.slots.clone()))
    }

    /// Takes counters for rates (called every second), and watches the driver's XDP_TX failures.
    pub fn sample(&mut self) {
        let sample = self.read_counters();
        if let (Some(before), Some(now)) = (self.samples.1.as_ref().and_then(|s| s.xdp_tx_errors), sample.xdp_tx_errors)
            && now > before
        {
            tracing::warn!(
                interface = %self.settings.interface,
                dropped = now - before,
                "the driver failed to send frames the data plane forwarded (XDP_TX errors)"
            );
        }
        self.samples = (self.samples.1.take(), Some(sample));
    }

    /// Records what the interface check found (see [`crate::netdev::xdp_tx_problem`]): said
    /// loudly when it appears, and when it is gone.
    pub fn set_xdp_tx_problem(&mut self, problem: Option<String>) {
        if problem == self.xdp_tx_problem {
            return;
        }
        match &problem {
            Some(problem) => tracing::error!("{problem}"),
            None => {
                tracing::info!(interface = %self.settings.interface, "frames sent back out of the interface arrive again (XDP_TX)")
            }
        }
        self.xdp_tx_problem = problem;
    }

    /// Backends whose next-hop MAC comes from the kernel's routing and neighbour tables (no
    /// `mac` configured): [`Self::update_next_hops`] refreshes them.
    pub fn resolved_next_hops(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .state
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .filter(|b| b.mac.is_none())
            .map(|b| b.address.ip())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// Next-hop MACs found again (a router replaced, a route moved): the backends whose next hop
    /// changed get the new one.
    pub fn update_next_hops(&mut self, found: &HashMap<IpAddr, [u8; 6]>) {
        let mut changed = false;
        for (ip, mac) in found {
            match self.macs.get(ip) {
                Some(old) if old != mac => {
                    tracing::info!(backend = %ip, from = %format_mac(old), to = %format_mac(mac), "next hop moved");
                }
                Some(_) => continue,
                None => continue, // not applied (yet, or any more)
            }
            self.macs.insert(*ip, *mac);
            changed = true;
        }
        if changed {
            let plan = self.current_plan();
            if let Err(error) = self.write(&plan) {
                tracing::error!(%error, "writing the new next hops failed");
            }
        }
    }

    /// The interface's MTU read again: the data plane's "too big" limit follows it.
    pub fn update_mtu(&mut self, mtu: u16) {
        if mtu == self.mtu {
            return;
        }
        match self.dataplane.set_tunnel(&self.tunnel, self.settings.gue_port, mtu) {
            Ok(()) => {
                tracing::info!(interface = %self.settings.interface, from = self.mtu, to = mtu, "MTU changed");
                self.mtu = mtu;
            }
            Err(error) => tracing::error!(%error, "giving the data plane the new MTU failed"),
        }
    }

    /// A backend answers a check via an IPv4 VIP from the VIP's address. When this host holds
    /// that address itself (a VRRP master, a VIP on `lo`), Linux drops such answers as coming
    /// from one of its own addresses unless `accept_local` is set on the interface (and
    /// `rp_filter` is not strict): set the first, warn about the second.
    fn accept_local_sources(&mut self) {
        let interface = &self.settings.interface;
        let conf = |name: &str, key: &str| format!("/proc/sys/net/ipv4/conf/{name}/{key}");
        match std::fs::write(conf(interface, "accept_local"), "1") {
            Ok(()) => {
                tracing::info!(%interface, "accept_local set: answers to checks via a VIP this host holds are accepted");
                self.accepts_local = true;
            }
            Err(error) => {
                let warning = format!(
                    "cannot set accept_local on {interface} ({error}): checks via an IPv4 VIP that this host holds itself will fail"
                );
                tracing::warn!("{warning}");
                self.warnings.push(warning);
            }
        }
        let strict = ["all", interface.as_str()]
            .iter()
            .filter_map(|name| std::fs::read_to_string(conf(name, "rp_filter")).ok())
            .filter_map(|value| value.trim().parse::<u8>().ok())
            .max()
            == Some(1);
        if strict {
            let warning = format!(
                "rp_filter is strict on {interface}: checks via an IPv4 VIP that this host holds itself (a VRRP master) fail; set net.ipv4.conf.all.rp_filter and net.ipv4.conf.{interface}.rp_filter to 2 (loose) or 0"
            );
            tracing::warn!("{warning}");
            self.warnings.push(warning);
        }
    }

    /// Everything `lb status` warns about now.
    pub fn warnings(&self) -> Vec<String> {
        let unswept = self.tables.lock().ok().and_then(|t| t.sweep_error.clone()).map(|error| {
            format!("the connection tables are not swept (they fill up, then refuse new NAT flows): {error}")
        });
        self.warnings.iter().chain(&self.xdp_tx_problem).cloned().chain(unswept).collect()
    }

    /// Reads how the backends of `observe` VIPs answered new flows: one that refuses them, or
    /// leaves them unanswered, is taken out at once (one publish), and its check brings it back.
    pub fn observe(&mut self) {
        let now = Instant::now();
        let mut observed = HashSet::new();
        let mut failing_backends = Vec::new();
        for vip in &self.state.vips {
            let Some(spec) = vip.observe else { continue };
            for backend in &vip.backends {
                let id = backend_id(vip, backend.address);
                let Some(index) = self.slots.backend(vip, backend.address) else { continue };
                let Ok(totals) = self.dataplane.backend_attempts(index) else { continue };
                observed.insert(id.clone());
                if let Some(failing) = self.observer.record(&id, now, totals, &spec) {
                    failing_backends.push((vip.name.clone(), backend.address, id, failing));
                }
            }
        }
        self.observer.retain(&observed);
        for (vip, backend, id, failing) in failing_backends {
            let reason = failing.reason();
            if self.health.mark_observed_down(&id, &reason) {
                self.observer.forget(&id);
                self.on_transition(Transition { vip, backend, health: Health::Down, reason });
            }
        }
    }

    /// Samples the new-flow counters; tells the data plane when a flood starts or ends.
    pub fn watch_floods(&mut self) {
        let sample = self
            .state
            .vips
            .iter()
            .filter_map(|vip| self.slots.vip(vip))
            .filter_map(|slot| Some((slot, self.dataplane.vip_new_flows_per_cpu(slot).ok()?)))
            .collect();
        let change = self.flood.observe(Instant::now(), sample);
        let threshold = self.settings.flood_new_flows;
        let flooded = match change {
            None => return,
            Some(crate::flood::Change::Started { cpu, rate }) => {
                tracing::warn!(
                    cpu,
                    rate,
                    threshold,
                    "flood of new flows: DSR and tunnel VIPs stop recording new flows, NAT flows opened now give their ports up after {} ms of silence",
                    (lb_common::nat::HALF_OPEN_WAIT_FLOODED as u64 * (1 << lb_common::nat::TICK_SHIFT))
                        .div_ceil(1_000_000)
                );
                true
            }
            Some(crate::flood::Change::Ended { lasted }) => {
                tracing::info!(lasted = ?lasted, "flood over: new flows are recorded again");
                false
            }
        };
        if let Err(error) = self.dataplane.set_flood(flooded) {
            tracing::error!("telling the data plane about the flood failed: {error:#}");
        }
    }

    pub fn flood_state(&self) -> crate::flood::FloodState {
        self.flood.state()
    }

    /// The counters of every VIP and backend, now.
    fn read_counters(&self) -> Sample {
        let mut vips = HashMap::new();
        let mut backends = HashMap::new();
        for vip in &self.state.vips {
            if let Some(slot) = self.slots.vip(vip)
                && let Ok(traffic) = self.dataplane.vip_traffic(slot)
            {
                vips.insert(vip.name.clone(), traffic);
            }
            for backend in &vip.backends {
                if let Some(index) = self.slots.backend(vip, backend.address)
                    && let Ok(traffic) = self.dataplane.backend_traffic(index)
                {
                    backends.insert(backend_id(vip, backend.address), traffic);
                }
            }
        }
        let xdp_tx_errors = crate::netdev::xdp_tx_errors(&self.settings.interface).ok().flatten();
        Sample { at: Instant::now(), vips, backends, xdp_tx_errors }
    }
}

fn forwarding(vip: &VipSpec, vip_index: u32, (snat_port_min, snat_port_max): (u16, u16)) -> VipForwarding {
    VipForwarding {
        vip_index,
        mode: vip.mode.number(),
        snat_addr: vip.snat.map(addr16).unwrap_or([0; 16]),
        snat_port_min,
        snat_port_max,
        client_affinity: vip.client_affinity_prefix(),
        observe: vip.observe.is_some(),
    }
}

/// The kernel's local port range in this network namespace (`net.ipv4.ip_local_port_range`,
/// which IPv6 sockets use too).
fn local_port_range() -> Result<(u16, u16)> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Ok((first, last)),
        _ => bail!("{PATH} holds {text:?}, not two ports"),
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
