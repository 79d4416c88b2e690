//! `lb daemon`: load or take over the data plane, apply the state, serve the API and metrics, and
//! leave the data plane running on exit.

use super::Daemon;
use crate::api;
use crate::config::{self, Config};
use crate::dataplane::{Dataplane, PinDir, SWEEP_EVERY, Sweeper, next_sweep};
use crate::planner::{Slots, vip_id, vip_key};
use crate::store::{StateStore, digest};
use anyhow::{Context, Result, anyhow};
use sd_notify::NotifyState;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};

pub async fn run(config_file: &Path) -> Result<()> {
    let Config { daemon: settings, state: config_state } = config::load(config_file).map_err(|e| anyhow!("{e}"))?;
    let instance = settings.instance.clone();
    let listener = api::bind(&instance).await?;
    let pins = PinDir::for_instance(&instance);
    let store = StateStore::for_instance(&instance);

    let (mut dataplane, opened) = Dataplane::open_pinned(settings.sizes, &pins)?;
    let reused = opened.carried_state;
    let map_set = dataplane.map_set().map(ToString::to_string).unwrap_or_default();
    tracing::info!(pins = %map_set, reused, "data plane loaded");

    // The saved state carries runtime edits; it wins unless the configuration file changed.
    let config_digest = digest(&config_state);
    let saved = store.load()?;
    let (state, slots) = match saved {
        Some(saved) if saved.config_digest == config_digest => {
            tracing::info!(file = %store.path().display(), "resuming the saved state (with its runtime edits)");
            (saved.state, saved.slots)
        }
        Some(saved) => {
            tracing::warn!(file = %config_file.display(), "the configuration file changed since the last run: applying it (runtime edits are replaced)");
            (config_state, if reused { saved.slots } else { Slots::default() })
        }
        None => (config_state, Slots::default()),
    };

    // Before the first table: tunnel VIPs are planned against these.
    let tunnel = crate::tunnel::TunnelSources::resolve(&settings.tunnel_source, &settings.interface)?;
    let mtu = crate::tunnel::interface_mtu(&settings.interface)?;
    dataplane.set_tunnel(&tunnel, settings.gue_port, mtu)?;
    tracing::info!(sources = %tunnel.describe(), gue_port = settings.gue_port, mtu, "tunnel settings");

    let (transitions, mut transition_events) = tokio::sync::mpsc::unbounded_channel();
    let addresses = crate::tunnel::global_addresses(&settings.interface)?;
    let check_sources = (
        addresses.iter().copied().find(std::net::IpAddr::is_ipv4),
        addresses.iter().copied().find(std::net::IpAddr::is_ipv6),
    );
    let mut daemon = Daemon {
        tunnel,
        mtu,
        check_sources,
        accepts_local: false,
        settings: settings.clone(),
        config_file: config_file.to_path_buf(),
        config_digest,
        dataplane,
        pins: pins.clone(),
        store,
        state: Default::default(),
        // Slots name entries of the pinned maps: only meaningful when those maps were reused.
        slots: if reused { slots } else { Slots::default() },
        macs: HashMap::new(),
        published: HashMap::new(),
        built_from: HashMap::new(),
        published_down: Default::default(),
        nat_ports: HashMap::new(),
        attachment: None,
        warnings: opened.warnings,
        xdp_tx_problem: None,
        health: crate::health::HealthEngine::new(transitions).context("starting the health-check thread")?,
        started: Instant::now(),
        samples: (None, None),
        bgp: None,
        pair: None,
        sync: Default::default(),
        replicate_now: Arc::new(tokio::sync::Notify::new()),
        stop: None,
        flood: crate::flood::FloodDetector::new(settings.flood_new_flows),
        observer: crate::observe::Observer::default(),
        tables: Arc::new(Mutex::new(crate::report::TablesState {
            capacity: settings.sizes.max_conns,
            ..Default::default()
        })),
    };
    if reused {
        // Start from what the running data plane holds, so unchanged tables are not rewritten
        // and the diff logged is the real one.
        for vip in &state.vips {
            if let Some(table) = daemon.dataplane.active_table(&vip_key(vip))? {
                daemon.published.insert(vip_id(vip), table);
            }
        }
    }
    let changes = daemon.apply(state, "startup")?;
    // VIPs a previous run published that the state no longer has.
    let wanted: Vec<_> = daemon.state.vips.iter().map(vip_key).collect();
    for (key, _) in daemon.dataplane.vips()? {
        if !wanted.contains(&key) {
            daemon.dataplane.remove_vip(&key)?;
            tracing::info!(?key, "stale VIP removed from the data plane");
        }
    }
    // The standby gets every NAT flow, so that it continues them after a takeover.
    let nat_flows = if settings.vrrp.is_some() { Some(daemon.dataplane.report_nat_flows()?) } else { None };
    let own_mac = crate::neighbor::interface_mac(&settings.interface)?;
    let ifindex = crate::netdev::interface(&settings.interface)?.ifindex;
    daemon.dataplane.set_interface(ifindex, own_mac)?;
    if settings.check_destination_mac {
        daemon.dataplane.set_own_mac(own_mac)?;
    } else {
        tracing::warn!(interface = %settings.interface, "destination MAC not checked: frames flooded here for other hosts are forwarded too");
    }
    let attachment = daemon.dataplane.attach_pinned(&pins, &settings.interface, settings.xdp_mode)?;
    tracing::info!(interface = %settings.interface, attachment = %attachment.describe(), changes = changes.len(), "data plane attached; serving");
    daemon.attachment = Some(attachment);
    if let Err(error) = daemon.dataplane.attach_check_path(&settings.interface) {
        // Checks with `via_vip` then fail, each saying why; nothing else depends on it.
        let warning = format!("health checks via a VIP cannot be sent: {error:#}");
        tracing::error!("{warning}");
        daemon.warnings.push(warning);
    }
    daemon.set_xdp_tx_problem(interface_problem(&settings.interface));

    if let Some(bgp) = &settings.bgp {
        let run_dir = api::run_dir(&instance).join("bgp");
        daemon.bgp = Some(crate::ha::bgp::Announcer::start(bgp, &run_dir)?);
        daemon.announce();
    }
    let replication = match (&settings.vrrp, nat_flows) {
        (Some(vrrp), Some(nat_flows)) => {
            let listener = tokio::net::TcpListener::bind(vrrp.listen)
                .await
                .with_context(|| format!("vrrp.listen: cannot listen on {}", vrrp.listen))?;
            daemon.pair = Some(crate::ha::pair::Pair::start(vrrp, &settings.interface, Default::default())?);
            daemon.announce();
            Some((vrrp.clone(), listener, nat_flows))
        }
        _ => None,
    };
    let daemon = Arc::new(Mutex::new(daemon));
    if let Some((vrrp, listener, nat_flows)) = replication {
        let receiver = daemon.clone();
        tokio::spawn(crate::ha::replication::serve(listener, vrrp.key.clone(), move |push| {
            receiver.lock().map_err(|_| anyhow!("daemon state poisoned"))?.accept_replica(push)
        }));
        let (view, wake) = {
            let d = daemon.lock().map_err(|_| anyhow!("daemon state poisoned"))?;
            (d.pair.as_ref().map(|p| p.view.clone()).context("the pair has started")?, d.replicate_now.clone())
        };
        tokio::spawn(super::replicate::replicate(daemon.clone(), vrrp, nat_flows, view, wake));
    }
    if let Some(address) = settings.metrics {
        tokio::spawn(serve_metrics(address, daemon.clone(), instance.clone()));
    }
    tokio::spawn(sample_counters(daemon.clone(), settings.interface.clone()));
    {
        let (sweeper, tables) = {
            let d = daemon.lock().map_err(|_| anyhow!("daemon state poisoned"))?;
            (d.dataplane.sweeper()?, d.tables.clone())
        };
        std::thread::Builder::new()
            .name("sweep".into())
            .spawn(move || sweep_tables(&sweeper, &tables))
            .context("starting the connection-table sweep")?;
    }
    if settings.flood_new_flows > 0 {
        // A flood is met within a tenth of a second.
        tokio::spawn(every(crate::flood::SAMPLE_EVERY, daemon.clone(), Daemon::watch_floods));
    }
    // The backends' answers (`observe`), every few tens of milliseconds.
    tokio::spawn(every(crate::observe::READ_EVERY, daemon.clone(), |daemon| {
        if daemon.state.vips.iter().any(|vip| vip.observe.is_some()) {
            daemon.observe();
        }
    }));
    {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            while let Some(transition) = transition_events.recv().await {
                let daemon = daemon.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Ok(mut daemon) = daemon.lock() {
                        daemon.on_transition(transition);
                    }
                })
                .await;
            }
        });
    }
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let stopped = Arc::new(tokio::sync::Notify::new());
    // Under systemd (`Type=notify`): ready only now, with the program attached, the tables
    // published and the API answering; a start that failed above never says so.
    let status = daemon.lock().map(|d| d.systemd_status()).unwrap_or_default();
    notify_systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = stopped.notified() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(serve_connection(stream, daemon.clone(), stopped.clone()));
            }
        }
    }
    notify_systemd(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    // No more requests; the socket's file goes last, as the sign that the daemon is done.
    drop(listener);
    let pair = daemon.lock().ok().and_then(|mut d| d.pair.take());
    if let Some(mut pair) = pair {
        // Going down: the standby takes over now (priority 0) rather than after a timeout.
        pair.stop();
    }
    if let Ok(mut daemon) = daemon.lock()
        && let Some(bgp) = &mut daemon.bgp
    {
        // Going down: routers must stop sending us traffic before we stop supervising it.
        match bgp.stop() {
            Ok(()) => tracing::info!("BGP announcements withdrawn, BIRD stopped"),
            Err(error) => tracing::error!("stopping BIRD failed: {error:#}"),
        }
    }
    // BIRD's configuration and socket: nothing of this run is left in /run.
    let run_dir = api::run_dir(&instance);
    if run_dir.exists()
        && let Err(error) = std::fs::remove_dir_all(&run_dir)
    {
        tracing::warn!("removing {}: {error}", run_dir.display());
    }
    let detach = daemon.lock().map(|d| d.stop == Some(true)).unwrap_or(false);
    if detach {
        let interface = {
            let daemon = daemon.lock().map_err(|_| anyhow!("daemon state poisoned"))?;
            daemon.store.remove()?;
            daemon.pins.remove()?;
            daemon.settings.interface.clone()
        };
        wait_until_detached(&interface).await;
        tracing::info!("data plane detached: program, pins and saved state removed");
    } else {
        tracing::info!("exiting; the data plane keeps forwarding (`lb detach` removes it)");
    }
    let _ = std::fs::remove_file(api::socket_path(&instance));
    Ok(())
}

/// Waits (at most 2 s) until the interface runs no XDP program: the kernel releases a link
/// whose pin was removed on a work queue, a moment later, and `lb detach` reports the program
/// gone once this daemon's socket is.
async fn wait_until_detached(interface: &str) {
    for _ in 0..200 {
        match crate::netdev::interface(interface) {
            Ok(iface) if iface.xdp_program().is_some() => tokio::time::sleep(Duration::from_millis(10)).await,
            _ => return,
        }
    }
    tracing::warn!(interface, "the XDP program is still attached 2 s after its link was unpinned");
}

async fn serve_connection(
    mut stream: tokio::net::UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    stopped: Arc<tokio::sync::Notify>,
) {
    let Some(request) = api::read_request(&mut stream).await else { return };
    // Requests may resolve MAC addresses (a subprocess): keep them off the async threads.
    let handled = tokio::task::spawn_blocking({
        let daemon = daemon.clone();
        move || {
            let mut daemon = daemon.lock().expect("daemon state poisoned by a panic");
            let response = daemon.handle(request);
            (response, daemon.stop.is_some())
        }
    })
    .await;
    let (response, stop) = handled.unwrap_or_else(|e| (api::Response::failure(format!("internal error: {e}")), false));
    let _ = api::reply(&mut stream, &response).await;
    if stop {
        stopped.notify_one();
    }
}

/// Sweeps the connection tables for the daemon's lifetime (when: [`next_sweep`]), on a thread
/// of its own: a pass over a million flows takes most of a second here, which the daemon's
/// loop must not wait for. Says when a table nears full: new NAT flows are then dropped, and
/// DSR flows go unrecorded.
fn sweep_tables(sweeper: &Sweeper, tables: &Mutex<crate::report::TablesState>) {
    const NEARLY_FULL: u64 = 90;
    let mut failing = false;
    let mut nearly_full = false;
    let mut wait = SWEEP_EVERY;
    loop {
        std::thread::sleep(wait);
        wait = SWEEP_EVERY;
        let swept = match sweeper.sweep(crate::dataplane::clock_ticks()) {
            Ok(swept) => swept,
            Err(error) => {
                if !failing {
                    tracing::error!("sweeping the connection tables failed: {error:#}");
                }
                failing = true;
                // `lb status` warns while it lasts.
                if let Ok(mut state) = tables.lock() {
                    state.sweep_error = Some(format!("{error:#}"));
                }
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            tracing::info!("sweeping the connection tables works again");
        }
        let Ok(mut state) = tables.lock() else { return };
        state.record(&swept);
        let percent = state.fullest_percent();
        wait = next_sweep(Duration::from_micros(swept.micros), percent);
        if percent >= NEARLY_FULL && !nearly_full {
            tracing::warn!(
                connections = state.connections,
                nat_entries = state.nat_entries,
                capacity = state.capacity,
                "the connection tables are {percent}% full: new NAT flows are dropped and DSR flows go unrecorded once full (daemon.max_conns)"
            );
        } else if percent < NEARLY_FULL - 10 && nearly_full {
            tracing::info!(
                connections = state.connections,
                nat_entries = state.nat_entries,
                "the connection tables have room again"
            );
        }
        nearly_full = if nearly_full { percent >= NEARLY_FULL - 10 } else { percent >= NEARLY_FULL };
        tracing::debug!(?swept, "swept the connection tables");
    }
}

/// Runs `work` on the daemon every `period`, off the async threads: it reads maps, a system call
/// each. A late tick waits rather than bunching up.
async fn every(period: Duration, daemon: Arc<Mutex<Daemon>>, work: fn(&mut Daemon)) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let daemon = daemon.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut daemon) = daemon.lock() {
                work(&mut daemon);
            }
        })
        .await;
    }
}

/// Takes the counters every second, and looks at the interface again every few seconds (its
/// veth peer may gain or lose its XDP program at any time).
async fn sample_counters(daemon: Arc<Mutex<Daemon>>, interface: String) {
    const CHECK_INTERFACE_EVERY: u32 = 5;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for round in 1u32.. {
        tick.tick().await;
        let daemon = daemon.clone();
        let interface = interface.clone();
        let _ = tokio::task::spawn_blocking(move || {
            // Inspecting the interface and the neighbours runs `ip`: not while holding the daemon.
            let check = round % CHECK_INTERFACE_EVERY == 0;
            let problem = check.then(|| interface_problem(&interface));
            let mtu = check.then(|| crate::tunnel::interface_mtu(&interface).ok()).flatten();
            let next_hops = if check {
                let backends = daemon.lock().map(|d| d.resolved_next_hops()).unwrap_or_default();
                crate::neighbor::refresh_next_hops(&backends, 4)
            } else {
                HashMap::new()
            };
            if let Ok(mut daemon) = daemon.lock() {
                daemon.sample();
                if let Some(problem) = problem {
                    daemon.set_xdp_tx_problem(problem);
                }
                if let Some(mtu) = mtu {
                    daemon.update_mtu(mtu);
                }
                daemon.update_next_hops(&next_hops);
            }
        })
        .await;
    }
}

/// Why frames the program sends back out of `interface` may not arrive, if they may not.
fn interface_problem(interface: &str) -> Option<String> {
    match crate::netdev::interface(interface) {
        Ok(iface) => crate::netdev::xdp_tx_problem(&iface),
        Err(error) => Some(format!("cannot inspect {interface}: {error:#}")),
    }
}

async fn serve_metrics(address: std::net::SocketAddr, daemon: Arc<Mutex<Daemon>>, instance: String) {
    let page_daemon = daemon.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let daemon = page_daemon.clone();
            async move {
                let page = tokio::task::spawn_blocking(move || {
                    let daemon = daemon.lock().map_err(|_| anyhow!("daemon state poisoned"))?;
                    let (status, backends) = (daemon.status()?, daemon.backend_rows(None)?);
                    Ok::<_, anyhow::Error>(crate::status_page::render(
                        &status,
                        &daemon.vip_rows(),
                        &backends,
                        &daemon.stats_report(),
                    ))
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|page| page);
                use axum::response::IntoResponse;
                match page {
                    Ok(page) => {
                        ([(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
                    }
                    Err(error) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}")).into_response(),
                }
            }
        }),
    );
    let app = app.route(
        "/metrics",
        axum::routing::get(move || {
            let daemon = daemon.clone();
            let instance = instance.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || {
                    let Ok(daemon) = daemon.lock() else { return String::new() };
                    let status = daemon.status().ok();
                    let (vrrp, bgp) = status.as_ref().map_or((None, None), |s| (s.vrrp.as_ref(), s.bgp.as_ref()));
                    crate::metrics::render(&daemon.stats_report(), vrrp, bgp, &instance)
                })
                .await
                .unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body)
            }
        }),
    );
    match tokio::net::TcpListener::bind(address).await.context("binding the metrics address") {
        Ok(listener) => {
            tracing::info!(%address, "status page served at /, metrics at /metrics");
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("metrics server stopped: {e}");
            }
        }
        Err(e) => tracing::error!("{e:#}"),
    }
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how the daemon stands.
pub(crate) fn notify_systemd(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!("telling systemd {states:?}: {error}");
    }
}
