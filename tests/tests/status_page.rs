//! The status page at `/` on the metrics address, as a browser shows it: headless Chromium
//! loads it from inside the load balancer's namespace while the daemon serves traffic, and the
//! rendered page must name every VIP and backend with its state, health, table share and rates.
//! A screenshot of it is saved as target/status-page.png.

use lb_tests::daemon::{LbDaemon, unique_instance};
use lb_tests::privilege::require_root;
use lb_tests::service::{nat_config, tcp_request, tcp_vip};
use lb_tests::topology::Topology;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const PORT: u16 = 9977;

fn chromium(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, "chromium", "--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--disable-dev-shm-usage", "--no-first-run", "--user-data-dir=/tmp/lb-status-page-chromium"])
        .args(args)
        .output()
        .expect("running chromium (installed by `cargo xtask setup`)")
}

#[test]
fn the_status_page_shows_every_vip_and_backend_in_a_browser() {
    if !require_root("the_status_page_shows_every_vip_and_backend_in_a_browser") {
        return;
    }
    let topology = Topology::new(2, false).unwrap();
    let config = nat_config(
        &topology,
        2,
        Some("{ kind = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 1, fall = 1 }"),
    )
    .replace("max_conns = 262144\n", &format!("max_conns = 262144\nmetrics = \"127.0.0.1:{PORT}\"\n"));
    let daemon = LbDaemon::start(&topology.lb, &unique_instance(), &config).unwrap();
    daemon.wait_none_down(Duration::from_secs(10)).unwrap();
    daemon
        .ok(&["backend", "drain", "--vip", "web", "--address", &format!("{}:8080", topology.backends[1].v4)])
        .unwrap();
    // Traffic for the rates: a steady trickle while the page is taken.
    let vip = tcp_vip();
    let url = format!("http://127.0.0.1:{PORT}/");
    let screenshot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/status-page.png");
    let done = AtomicBool::new(false);
    let (dom, shot) = std::thread::scope(|scope| {
        scope.spawn(|| {
            topology.client.enter(|| {
                // Until the browser is done, at most a minute.
                for _ in 0..1200 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = tcp_request(vip, Duration::from_millis(900));
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        });
        std::thread::sleep(Duration::from_secs(2));
        let dom = chromium(topology.lb.name(), &["--dump-dom", &url]);
        let shot = chromium(
            topology.lb.name(),
            &["--window-size=1100,700", &format!("--screenshot={}", screenshot.display()), &url],
        );
        done.store(true, Ordering::Relaxed);
        (dom, shot)
    });
    let page = String::from_utf8_lossy(&dom.stdout).to_string();
    let _ = std::fs::remove_dir_all("/tmp/lb-status-page-chromium");
    assert!(dom.status.success(), "chromium --dump-dom: {}", String::from_utf8_lossy(&dom.stderr));
    let (be1, be2) = (format!("{}:8080", topology.backends[0].v4), format!("{}:8080", topology.backends[1].v4));
    for expected in [
        "web: 10.0.0.100:80 tcp (nat",
        "dns: 10.0.0.100:53 udp (nat",
        "1 of 2 backends serving",
        &format!("<td>{be1}</td><td>serving</td><td>up</td>"),
        &format!("<td>{be2}</td><td>drained</td><td>up</td>"),
        "100.0 %",
        "packets/s",
        "http-equiv=\"refresh\"",
    ] {
        assert!(page.contains(expected), "the rendered page lacks {expected:?}:\n{page}");
    }
    // The web VIP's rate line shows the trickle (several packets per request, ~20 requests/s).
    let web = page.split("web: ").nth(1).unwrap();
    let rate: f64 =
        web.split("serving; ").nth(1).unwrap().split(' ').next().unwrap().trim_end_matches('k').parse().unwrap();
    assert!(rate > 0.0, "no packets/s for web while traffic ran:\n{page}");
    assert!(shot.status.success() && screenshot.exists(), "screenshot: {}", String::from_utf8_lossy(&shot.stderr));
    println!("status page screenshot: {}", screenshot.display());
}
