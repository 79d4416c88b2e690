//! Invalid configurations: each is refused as a whole with an error naming file, line and field.

use lb::config::parse;
use lb_tests::invalid_configs::{cases, expected_for, good};

const B1: &str = "10.0.1.1:8080";
const B2: &str = "10.0.1.2:8080";

#[test]
fn the_reference_config_is_valid() {
    let config = parse("lb.toml", &good("lb", B1, B2)).unwrap();
    assert_eq!(config.daemon.interface, "eth0");
    assert!(config.daemon.check_destination_mac, "on unless switched off");
    let off = good("lb", B1, B2).replace("[daemon]\n", "[daemon]\ncheck_destination_mac = false\n");
    assert!(!parse("lb.toml", &off).unwrap().daemon.check_destination_mac);
    assert_eq!(config.state.vips.len(), 1);
    assert_eq!(config.state.vips[0].backends.len(), 2);
}

#[test]
fn observe_takes_true_false_or_thresholds_with_defaults_for_the_rest() {
    use lb::model::ObserveSpec;
    use std::time::Duration;
    let with = |observe: &str| {
        let source = good("lb", B1, B2).replace("mode = \"nat\"\n", &format!("mode = \"nat\"\nobserve = {observe}\n"));
        parse("lb.toml", &source).unwrap().state.vips[0].observe
    };
    assert_eq!(parse("lb.toml", &good("lb", B1, B2)).unwrap().state.vips[0].observe, None, "off unless asked for");
    assert_eq!(with("false"), None);
    assert_eq!(with("true"), Some(ObserveSpec { refused: 3, percent: 50, window: Duration::from_secs(1) }));
    assert_eq!(
        with("{ refused = 5, window = \"2s\" }"),
        Some(ObserveSpec { refused: 5, percent: 50, window: Duration::from_secs(2) })
    );
    assert_eq!(with("{ percent = 100 }"), Some(ObserveSpec { percent: 100, ..ObserveSpec::default() }));
    // `false` says nothing about the mode: a dsr VIP may carry it.
    let dsr = good("lb", B1, B2)
        .replace("mode = \"nat\"\n", "mode = \"dsr\"\nobserve = false\n")
        .replace("snat = \"10.0.0.2\"\n", "")
        .replace(":8080", ":80");
    assert_eq!(parse("lb.toml", &dsr).unwrap().state.vips[0].observe, None);
}

#[test]
fn invalid_configs_are_refused_with_file_line_and_field() {
    let cases = cases("lb", B1, B2);
    assert!(cases.len() >= 20);
    let mut wrong = Vec::new();
    for (name, source, expected) in &cases {
        let expected = expected_for(expected, "lb.toml");
        match parse("lb.toml", source) {
            Ok(_) => wrong.push(format!("{name}: accepted")),
            Err(error) if !error.to_string().contains(&expected) => {
                wrong.push(format!("{name}:\n  expected to contain: {expected}\n  got: {error}"))
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let source = good("lb", B1, B2).replace(r#"protocol = "tcp""#, r#"protocol = "sctp""#).replace(B2, "nonsense");
    let error = parse("lb.toml", &source).unwrap_err().to_string();
    assert_eq!(error.lines().count(), 2, "{error}");
}
