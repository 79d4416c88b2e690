//! Invalid configurations: each is refused as a whole with an error naming file, line and field.

use lb::config::parse;

const GOOD: &str = r#"
[daemon]
interface = "eth0"
xdp_mode = "native"
instance = "lb"
metrics = "127.0.0.1:9900"
ring_size = 65537

[[vip]]
name = "web"
address = "10.0.0.10:80"
protocol = "tcp"
mode = "nat"
snat = "10.0.0.2"
check = { kind = "http", path = "/healthz", expect_status = 200, interval = "1s", timeout = "500ms", rise = 2, fall = 3 }

[[vip.backend]]
address = "10.0.1.1:8080"
weight = 1
backup = false

[[vip.backend]]
address = "10.0.1.2:8080"
"#;

/// The good config with one line replaced (`from` must occur exactly once) or text appended.
fn edit(from: &str, to: &str) -> String {
    assert_eq!(GOOD.matches(from).count(), 1, "edit target {from:?} must occur once");
    GOOD.replace(from, to)
}

fn error_of(source: &str) -> String {
    match parse("lb.toml", source) {
        Ok(_) => panic!("config was accepted:\n{source}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_reference_config_is_valid() {
    let config = parse("lb.toml", GOOD).unwrap();
    assert_eq!(config.daemon.interface, "eth0");
    assert_eq!(config.state.vips.len(), 1);
    assert_eq!(config.state.vips[0].backends.len(), 2);
}

#[test]
fn invalid_configs_are_refused_with_file_line_and_field() {
    let cases: Vec<(&str, String, &str)> = vec![
        ("TOML syntax", edit("weight = 1", "weight = "), "lb.toml:19: syntax: "),
        (
            "unknown key in a VIP",
            edit(r#"mode = "nat""#, "mode = \"nat\"\ncolour = \"blue\""),
            "lb.toml:14: syntax: unknown field `colour`",
        ),
        (
            "unknown key in [daemon]",
            edit(r#"ring_size = 65537"#, "ring_size = 65537\nthreads = 4"),
            "lb.toml:8: syntax: unknown field `threads`",
        ),
        ("missing [daemon]", GOOD.replace("[daemon]\n", "[demon]\n"), "lb.toml:2: syntax: unknown field `demon`"),
        ("missing interface", edit("interface = \"eth0\"\n", ""), "missing field `interface`"),
        (
            "bad VIP address",
            edit("10.0.0.10:80", "10.0.0.300:80"),
            "lb.toml:11: vip \"web\": address: \"10.0.0.300:80\" is not an address with a port",
        ),
        (
            "VIP address without port",
            edit("10.0.0.10:80", "10.0.0.10"),
            "lb.toml:11: vip \"web\": address: \"10.0.0.10\" is not an address with a port",
        ),
        (
            "bad backend address",
            edit("10.0.1.2:8080", "10.0.1.2:99999"),
            "lb.toml:23: vip \"web\" backend #2: address: \"10.0.1.2:99999\" is not an address with a port",
        ),
        (
            "unknown protocol",
            edit(r#"protocol = "tcp""#, r#"protocol = "sctp""#),
            "lb.toml:12: vip \"web\": protocol: unknown protocol \"sctp\"",
        ),
        (
            "unknown mode",
            edit(r#"mode = "nat""#, r#"mode = "tunnel""#),
            "lb.toml:13: vip \"web\": mode: unknown mode \"tunnel\"",
        ),
        (
            "unknown XDP mode",
            edit(r#"xdp_mode = "native""#, r#"xdp_mode = "turbo""#),
            "lb.toml:4: daemon.xdp_mode: unknown XDP mode \"turbo\"",
        ),
        (
            "ring size not prime",
            edit("ring_size = 65537", "ring_size = 65536"),
            "lb.toml:7: daemon.ring_size: 65536 is not a prime",
        ),
        (
            "bad instance name",
            edit(r#"instance = "lb""#, r#"instance = "../etc""#),
            "lb.toml:5: daemon.instance: \"../etc\" must be 1-32 letters",
        ),
        (
            "bad interface name",
            edit(r#"interface = "eth0""#, r#"interface = "a-very-long-interface-name""#),
            "lb.toml:3: daemon.interface: ",
        ),
        (
            "bad metrics address",
            edit("127.0.0.1:9900", "localhost"),
            "lb.toml:6: daemon.metrics: \"localhost\" is not an address with a port",
        ),
        (
            "snat missing in nat mode",
            edit("snat = \"10.0.0.2\"\n", ""),
            "lb.toml:9: vip \"web\": snat: nat mode needs `snat`",
        ),
        (
            "snat of the other family",
            edit(r#"snat = "10.0.0.2""#, r#"snat = "fd00::2""#),
            "lb.toml:14: vip \"web\": snat: SNAT address fd00::2 is not of the VIP's address family",
        ),
        (
            "snat in dsr mode",
            edit(r#"mode = "nat""#, r#"mode = "dsr""#).replace(":8080", ":80"),
            "lb.toml:14: vip \"web\": snat: `snat` applies to nat mode only",
        ),
        (
            "IPv4 backend on an IPv6 VIP",
            edit("10.0.0.10:80", "[fd00::10]:80").replace(r#""10.0.0.2""#, r#""fd00::2""#),
            "lb.toml:18: vip \"web\" backend #1: address: backend 10.0.1.1:8080 is not of the VIP's address family",
        ),
        (
            "duplicate backend",
            edit("10.0.1.2:8080", "10.0.1.1:8080"),
            "lb.toml:23: vip \"web\" backend #2: address: backend 10.0.1.1:8080 is listed twice",
        ),
        (
            "duplicate VIP address",
            format!(
                "{GOOD}\n[[vip]]\nname = \"web2\"\naddress = \"10.0.0.10:80\"\nprotocol = \"tcp\"\nmode = \"dsr\"\n"
            ),
            "lb.toml:27: vip \"web2\": address: tcp 10.0.0.10:80 is already VIP \"web\"",
        ),
        (
            "duplicate VIP name",
            format!(
                "{GOOD}\n[[vip]]\nname = \"web\"\naddress = \"10.0.0.11:80\"\nprotocol = \"tcp\"\nmode = \"dsr\"\n"
            ),
            "lb.toml:26: vip \"web\": name: VIP name \"web\" is already used by VIP #1",
        ),
        (
            "weight 0 with no other backend",
            edit("weight = 1", "weight = 0").replace("[[vip.backend]]\naddress = \"10.0.1.2:8080\"\n", ""),
            "lb.toml:19: vip \"web\" backend #1: weight: every primary backend has weight 0",
        ),
        (
            "dsr backend on another port",
            edit(r#"mode = "nat""#, r#"mode = "dsr""#).replace("snat = \"10.0.0.2\"\n", ""),
            "lb.toml:17: vip \"web\" backend #1: address: dsr mode cannot change ports",
        ),
        (
            "bad check kind",
            edit(r#"kind = "http""#, r#"kind = "smtp""#),
            "lb.toml:15: vip \"web\": check.kind: unknown check kind \"smtp\"",
        ),
        (
            "bad check interval",
            edit(r#"interval = "1s""#, r#"interval = "1 fortnight""#),
            "lb.toml:15: vip \"web\": check.interval: \"1 fortnight\" is not a duration",
        ),
        (
            "check timeout above interval",
            edit(r#"timeout = "500ms""#, r#"timeout = "2s""#),
            "lb.toml:15: vip \"web\": check.timeout: timeout 2s must be above 0 and at most the interval 1s",
        ),
        ("check rise 0", edit("rise = 2", "rise = 0"), "lb.toml:15: vip \"web\": check.rise: rise must be at least 1"),
        (
            "check status out of range",
            edit("expect_status = 200", "expect_status = 999"),
            "lb.toml:15: vip \"web\": check.expect_status: status 999-999 must be within 100-599",
        ),
        (
            "http option on a tcp check",
            edit(r#"kind = "http""#, r#"kind = "tcp""#),
            "lb.toml:15: vip \"web\": check.path: applies to http checks only",
        ),
        (
            "bad snat port range",
            edit(r#"snat = "10.0.0.2""#, "snat = \"10.0.0.2\"\nsnat_ports = \"2000-1000\""),
            "lb.toml:15: vip \"web\": snat_ports: port range 2000-1000 must satisfy",
        ),
        (
            "bad backend MAC",
            edit("weight = 1", "weight = 1\nmac = \"02:00:00:00:01\""),
            "lb.toml:20: vip \"web\" backend #1: mac: \"02:00:00:00:01\" is not a MAC address",
        ),
        (
            "too many VIPs for max_vips",
            edit("ring_size = 65537", "ring_size = 65537\nmax_vips = 0"),
            "lb.toml:8: daemon.max_vips: must be at least 1",
        ),
    ];
    assert!(cases.len() >= 20);
    let mut wrong = Vec::new();
    for (name, source, expected) in &cases {
        let error = error_of(source);
        if !error.contains(expected) {
            wrong.push(format!("{name}:\n  expected to contain: {expected}\n  got: {error}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let source = edit(r#"protocol = "tcp""#, r#"protocol = "sctp""#).replace("10.0.1.2:8080", "nonsense");
    let error = error_of(&source);
    assert_eq!(error.lines().count(), 2, "{error}");
}
