//! Invalid configurations and the error each must produce, shared by the parser test and the
//! running-daemon test (`lb apply` of each must change nothing).

/// A valid configuration. `{instance}`, `{b1}` and `{b2}` are filled in by [`good`]; the line
/// layout is fixed, the expected errors below name lines of it.
const TEMPLATE: &str = r#"
[daemon]
interface = "eth0"
xdp_mode = "native"
instance = "{instance}"
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
address = "{b1}"
weight = 1
backup = false

[[vip.backend]]
address = "{b2}"
"#;

/// The valid rest of a `[vrrp]` section after its `vrid` line (listen, peer, key: 3 lines).
const VRRP_REST: &str = "listen = \"10.0.0.2:7946\"\npeer = \"10.0.0.4:7946\"\nkey = \"0123456789abcdef\"";

/// Placeholder for the file name in expected errors.
pub const FILE: &str = "{file}";

/// The expected error of a case for a file called `file`.
pub fn expected_for(expected: &str, file: &str) -> String {
    expected.replace(FILE, file)
}

pub fn good(instance: &str, b1: &str, b2: &str) -> String {
    TEMPLATE.replace("{instance}", instance).replace("{b1}", b1).replace("{b2}", b2)
}

fn edit(good: &str, from: &str, to: &str) -> String {
    assert_eq!(good.matches(from).count(), 1, "edit target {from:?} must occur once");
    good.replace(from, to)
}

/// (what is wrong, the configuration, the error it must produce with `{file}` for the file name).
/// `b1` and `b2` are the two backends' addresses (IPv4, port 8080).
pub fn cases(instance: &str, b1: &str, b2: &str) -> Vec<(&'static str, String, String)> {
    let good = good(instance, b1, b2);
    let edit = |from: &str, to: &str| edit(&good, from, to);
    let cases: Vec<(&str, String, String)> = vec![
        ("TOML syntax", edit("weight = 1", "weight = "), format!("{FILE}:19: syntax: ")),
        (
            "unknown key in a VIP",
            edit(r#"mode = "nat""#, "mode = \"nat\"\ncolour = \"blue\""),
            format!("{FILE}:14: syntax: unknown field `colour`"),
        ),
        (
            "unknown key in [daemon]",
            edit(r#"ring_size = 65537"#, "ring_size = 65537\nthreads = 4"),
            format!("{FILE}:8: syntax: unknown field `threads`"),
        ),
        (
            "missing [daemon]",
            good.replace("[daemon]\n", "[demon]\n"),
            format!("{FILE}:2: syntax: unknown field `demon`"),
        ),
        ("missing interface", edit("interface = \"eth0\"\n", ""), "missing field `interface`".to_string()),
        (
            "bad VIP address",
            edit("10.0.0.10:80", "10.0.0.300:80"),
            format!("{FILE}:11: vip \"web\": address: \"10.0.0.300:80\" is not an address with a port"),
        ),
        (
            "VIP address without port",
            edit("10.0.0.10:80", "10.0.0.10"),
            format!("{FILE}:11: vip \"web\": address: \"10.0.0.10\" is not an address with a port"),
        ),
        (
            "bad backend address",
            edit(&format!("\"{b2}\""), "\"10.0.1.2:99999\""),
            format!("{FILE}:23: vip \"web\" backend #2: address: \"10.0.1.2:99999\" is not an address with a port"),
        ),
        (
            "unknown protocol",
            edit(r#"protocol = "tcp""#, r#"protocol = "sctp""#),
            format!("{FILE}:12: vip \"web\": protocol: unknown protocol \"sctp\""),
        ),
        (
            "unknown mode",
            edit(r#"mode = "nat""#, r#"mode = "tunnel""#),
            format!("{FILE}:13: vip \"web\": mode: unknown mode \"tunnel\""),
        ),
        (
            "tunnel source not an address",
            edit("ring_size = 65537", "ring_size = 65537\ntunnel_source = \"bogus\""),
            format!("{FILE}:8: daemon.tunnel_source: \"bogus\" is not an address or prefix"),
        ),
        (
            "two tunnel sources of one family",
            edit("ring_size = 65537", "ring_size = 65537\ntunnel_source = [\"10.0.0.2\", \"172.16.0.0/16\"]"),
            format!("{FILE}:8: daemon.tunnel_source: \"172.16.0.0/16\": one source per address family"),
        ),
        (
            "tunnel source prefix with host bits",
            edit("ring_size = 65537", "ring_size = 65537\ntunnel_source = \"172.16.0.1/16\""),
            format!("{FILE}:8: daemon.tunnel_source: \"172.16.0.1/16\" has host bits set; the prefix is 172.16.0.0/16"),
        ),
        (
            "GUE port 0",
            edit("ring_size = 65537", "ring_size = 65537\ngue_port = 0"),
            format!("{FILE}:8: daemon.gue_port: must be 1-65535"),
        ),
        (
            "check via the VIP in nat mode",
            edit("fall = 3 }", "fall = 3, via_vip = true }"),
            format!("{FILE}:15: vip \"web\": check.via_vip: via_vip needs backends that hold the VIP"),
        ),
        (
            "unknown XDP mode",
            edit(r#"xdp_mode = "native""#, r#"xdp_mode = "turbo""#),
            format!("{FILE}:4: daemon.xdp_mode: unknown XDP mode \"turbo\""),
        ),
        (
            "destination MAC check not a boolean",
            edit(r#"xdp_mode = "native""#, "xdp_mode = \"native\"\ncheck_destination_mac = \"yes\""),
            format!("{FILE}:5: syntax: invalid type: string \"yes\", expected a boolean"),
        ),
        (
            "ring size not prime",
            edit("ring_size = 65537", "ring_size = 65536"),
            format!("{FILE}:7: daemon.ring_size: 65536 is not a prime"),
        ),
        (
            "bad instance name",
            edit(&format!("instance = \"{instance}\""), r#"instance = "../etc""#),
            format!("{FILE}:5: daemon.instance: \"../etc\" must be 1-32 letters"),
        ),
        (
            "bad interface name",
            edit(r#"interface = "eth0""#, r#"interface = "a-very-long-interface-name""#),
            format!("{FILE}:3: daemon.interface: "),
        ),
        (
            "bad metrics address",
            edit("127.0.0.1:9900", "localhost"),
            format!("{FILE}:6: daemon.metrics: \"localhost\" is not an address with a port"),
        ),
        (
            "snat missing in nat mode",
            edit("snat = \"10.0.0.2\"\n", ""),
            format!("{FILE}:9: vip \"web\": snat: nat mode needs `snat`"),
        ),
        (
            "snat of the other family",
            edit(r#"snat = "10.0.0.2""#, r#"snat = "fd00::2""#),
            format!("{FILE}:14: vip \"web\": snat: SNAT address fd00::2 is not of the VIP's address family"),
        ),
        (
            "snat in dsr mode",
            edit(r#"mode = "nat""#, r#"mode = "dsr""#).replace(":8080", ":80"),
            format!("{FILE}:14: vip \"web\": snat: `snat` applies to nat mode only"),
        ),
        (
            "IPv4 backend on an IPv6 VIP",
            edit("10.0.0.10:80", "[fd00::10]:80").replace(r#""10.0.0.2""#, r#""fd00::2""#),
            format!("{FILE}:18: vip \"web\" backend #1: address: backend {b1} is not of the VIP's address family"),
        ),
        (
            "duplicate backend",
            edit(&format!("\"{b2}\""), &format!("\"{b1}\"")),
            format!("{FILE}:23: vip \"web\" backend #2: address: backend {b1} is listed twice"),
        ),
        (
            "duplicate VIP address",
            format!(
                "{good}\n[[vip]]\nname = \"web2\"\naddress = \"10.0.0.10:80\"\nprotocol = \"tcp\"\nmode = \"dsr\"\n"
            ),
            format!("{FILE}:27: vip \"web2\": address: tcp 10.0.0.10:80 is already VIP \"web\""),
        ),
        (
            "duplicate VIP name",
            format!(
                "{good}\n[[vip]]\nname = \"web\"\naddress = \"10.0.0.11:80\"\nprotocol = \"tcp\"\nmode = \"dsr\"\n"
            ),
            format!("{FILE}:26: vip \"web\": name: VIP name \"web\" is already used by VIP #1"),
        ),
        (
            "weight 0 with no other backend",
            edit("weight = 1", "weight = 0").replace(&format!("[[vip.backend]]\naddress = \"{b2}\"\n"), ""),
            format!("{FILE}:19: vip \"web\" backend #1: weight: every primary backend has weight 0"),
        ),
        (
            "dsr backend on another port",
            edit(r#"mode = "nat""#, r#"mode = "dsr""#).replace("snat = \"10.0.0.2\"\n", ""),
            format!("{FILE}:17: vip \"web\" backend #1: address: dsr mode cannot change ports"),
        ),
        (
            "bad check kind",
            edit(r#"kind = "http""#, r#"kind = "smtp""#),
            format!("{FILE}:15: vip \"web\": check.kind: unknown check kind \"smtp\""),
        ),
        (
            "bad check interval",
            edit(r#"interval = "1s""#, r#"interval = "1 fortnight""#),
            format!("{FILE}:15: vip \"web\": check.interval: \"1 fortnight\" is not a duration"),
        ),
        (
            "check timeout above interval",
            edit(r#"timeout = "500ms""#, r#"timeout = "2s""#),
            format!("{FILE}:15: vip \"web\": check.timeout: timeout 2s must be above 0 and at most the interval 1s"),
        ),
        (
            "check rise 0",
            edit("rise = 2", "rise = 0"),
            format!("{FILE}:15: vip \"web\": check.rise: rise must be at least 1"),
        ),
        (
            "check status out of range",
            edit("expect_status = 200", "expect_status = 999"),
            format!("{FILE}:15: vip \"web\": check.expect_status: status 999-999 must be within 100-599"),
        ),
        (
            "http option on a tcp check",
            edit(r#"kind = "http""#, r#"kind = "tcp""#),
            format!("{FILE}:15: vip \"web\": check.path: applies to http checks only"),
        ),
        (
            "bad snat port range",
            edit(r#"snat = "10.0.0.2""#, "snat = \"10.0.0.2\"\nsnat_ports = \"2000-1000\""),
            format!("{FILE}:15: vip \"web\": snat_ports: port range 2000-1000 must satisfy"),
        ),
        (
            "unknown affinity",
            edit(r#"mode = "nat""#, "mode = \"nat\"\naffinity = \"sticky\""),
            format!(
                "{FILE}:14: vip \"web\": affinity: unknown affinity \"sticky\": expected \"connection\" or \"client\""
            ),
        ),
        (
            "affinity prefix without client affinity",
            edit(r#"snat = "10.0.0.2""#, "snat = \"10.0.0.2\"\naffinity_prefix = 24"),
            format!("{FILE}:15: vip \"web\": affinity_prefix: affinity_prefix applies to affinity = \"client\" only"),
        ),
        (
            "affinity prefix longer than the address",
            edit(r#"snat = "10.0.0.2""#, "snat = \"10.0.0.2\"\naffinity = \"client\"\naffinity_prefix = 33"),
            format!(
                "{FILE}:16: vip \"web\": affinity_prefix: prefix length 33 must be 1-32 for this VIP's address family"
            ),
        ),
        (
            "bad backend MAC",
            edit("weight = 1", "weight = 1\nmac = \"02:00:00:00:01\""),
            format!("{FILE}:20: vip \"web\" backend #1: mac: \"02:00:00:00:01\" is not a MAC address"),
        ),
        (
            "VRRP router id 0",
            edit("ring_size = 65537", &format!("ring_size = 65537\n\n[vrrp]\nvrid = 0\n{VRRP_REST}")),
            format!("{FILE}:10: vrrp.vrid: 0 is not a virtual router id (1-255)"),
        ),
        (
            "VRRP interval not in centiseconds",
            edit(
                "ring_size = 65537",
                &format!("ring_size = 65537\n\n[vrrp]\nvrid = 7\nadvert_interval = \"15ms\"\n{VRRP_REST}"),
            ),
            format!("{FILE}:11: vrrp.advert_interval: \"15ms\": VRRPv3 intervals are whole centiseconds"),
        ),
        (
            "VRRP key too short",
            edit(
                "ring_size = 65537",
                &format!("ring_size = 65537\n\n[vrrp]\nvrid = 7\n{}", VRRP_REST.replace("0123456789abcdef", "short")),
            ),
            format!("{FILE}:13: vrrp.key: the shared key must be at least 16 characters"),
        ),
        (
            "BGP router id not an address",
            edit(
                "ring_size = 65537",
                "ring_size = 65537\n\n[bgp]\nlocal_as = 65001\nrouter_id = \"node-a\"\nneighbor = \"10.0.1.1\"\nneighbor_as = 65000",
            ),
            format!("{FILE}:11: bgp.router_id: \"node-a\" is not a router id (an IPv4 address)"),
        ),
        (
            "observe neither a boolean nor a table",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = \"yes\""),
            format!("{FILE}:14: vip \"web\": observe: expected true, false or a table {{ refused, percent, window }}"),
        ),
        (
            "observe refused 0",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = { refused = 0 }"),
            format!("{FILE}:14: vip \"web\": observe.refused: expected a whole number from 1 to 1000"),
        ),
        (
            "observe percent above 100",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = { percent = 150 }"),
            format!("{FILE}:14: vip \"web\": observe.percent: expected a whole number from 1 to 100"),
        ),
        (
            "observe percent not a number",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = { percent = \"half\" }"),
            format!("{FILE}:14: vip \"web\": observe.percent: expected a whole number from 1 to 100"),
        ),
        (
            "observe window too short",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = { window = \"10ms\" }"),
            format!("{FILE}:14: vip \"web\": observe.window: must be from 100ms to 60s"),
        ),
        (
            "observe window not a duration",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = { window = \"soon\" }"),
            format!("{FILE}:14: vip \"web\": observe.window: \"soon\" is not a duration"),
        ),
        (
            "observe window a number",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = { window = 1 }"),
            format!("{FILE}:14: vip \"web\": observe.window: expected a duration such as \"1s\""),
        ),
        (
            "observe with an unknown threshold",
            edit(r#"mode = "nat""#, "mode = \"nat\"\nobserve = { refusals = 3 }"),
            format!("{FILE}:14: vip \"web\": observe.refusals: unknown field: expected refused, percent or window"),
        ),
        (
            "observe in dsr mode",
            edit(r#"mode = "nat""#, "mode = \"dsr\"\nobserve = true")
                .replace("snat = \"10.0.0.2\"\n", "")
                .replace(":8080", ":80"),
            format!("{FILE}:14: vip \"web\": observe: only nat VIPs can be observed: in dsr mode"),
        ),
        (
            "observe in ipip mode",
            edit(r#"mode = "nat""#, "mode = \"ipip\"\nobserve = { refused = 5 }").replace("snat = \"10.0.0.2\"\n", ""),
            format!("{FILE}:14: vip \"web\": observe: only nat VIPs can be observed: in ipip mode"),
        ),
        (
            "observe without a health check",
            edit(
                r#"check = { kind = "http", path = "/healthz", expect_status = 200, interval = "1s", timeout = "500ms", rise = 2, fall = 3 }"#,
                "observe = true",
            ),
            format!("{FILE}:15: vip \"web\": observe: needs a health check"),
        ),
        (
            "too many VIPs for max_vips",
            edit("ring_size = 65537", "ring_size = 65537\nmax_vips = 0"),
            format!("{FILE}:8: daemon.max_vips: must be at least 1"),
        ),
    ];
    cases
}
