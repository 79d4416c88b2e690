//! `cargo xtask bench`: runs every benchmark binary in turn, shows their output as it comes,
//! and keeps the whole run as `<dir>/<date>-<kernel>.md` (target/bench, or bench/results with
//! `--record`) plus the same figures as JSON
//! (each Markdown table becomes a list of records keyed by its header).

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Step {
    name: &'static str,
    binary: &'static str,
    args: Vec<String>,
}

fn steps(quick: bool) -> Vec<Step> {
    let pick = |quick_value: &str, full: &str| if quick { quick_value.to_string() } else { full.to_string() };
    let mut steps = vec![
        Step {
            name: "per-packet cost (BPF_PROG_TEST_RUN)",
            binary: "dataplane-cost",
            args: vec![pick("20000", "1000000"), pick("3", "5")],
        },
        Step {
            name: "control plane: Maglev build and publish",
            binary: "control-plane-cost",
            args: vec![pick("3", "5")],
        },
        Step { name: "end-to-end pps vs nftables", binary: "e2e-pps", args: vec![pick("200000", "1000000")] },
        Step {
            name: "bulk TCP through a tunnelled VIP",
            binary: "tunnel-throughput",
            args: vec![pick("128", "1024"), pick("1", "3")],
        },
        Step {
            name: "TCP connections per second vs HAProxy",
            binary: "tcp-cps",
            args: vec![pick("2", "5"), "4".into()],
        },
        Step {
            name: "TCP connections during a SYN flood",
            binary: "syn-flood",
            args: vec![pick("2", "10"), pick("100", "200")],
        },
    ];
    for kind in ["tcp", "http", "icmp"] {
        steps.push(Step {
            name: match kind {
                "tcp" => "health-check CPU: tcp",
                "http" => "health-check CPU: http",
                _ => "health-check CPU: icmp",
            },
            binary: "health-cost",
            args: vec![pick("1000", "5000"), pick("4", "20"), kind.into()],
        });
    }
    steps
}

/// Runs the benchmarks; returns the Markdown file written.
pub fn run(root: &Path, dir: &Path, quick: bool, print_json: bool) -> Result<PathBuf> {
    let started = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("[build] release benchmark binaries");
    let status = Command::new(cargo)
        // The `lb` daemon too: the benchmarks that run it take the one beside them.
        .args(["build", "--release", "--quiet", "-p", "lb-tests", "-p", "lb-userspace", "--bins"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the benchmark binaries failed ({status})");
    }
    let steps = steps(quick);
    let mut markdown = header(root, quick);
    let mut records = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        println!("\n[{}/{}] {} ({:.0} s so far)", i + 1, steps.len(), step.name, started.elapsed().as_secs_f64());
        let output = run_step(root, step)?;
        markdown.push_str(&format!("\n## {}\n\n", step.name));
        markdown.push_str(&output);
        records.push(json!({ "step": step.name, "tables": tables(&output), "notes": notes(&output) }));
    }
    let seconds = started.elapsed().as_secs_f64();
    markdown.push_str(&format!("\n---\nThe whole run took {seconds:.0} s.\n"));
    std::fs::create_dir_all(dir)?;
    let stem = format!(
        "{}-{}{}",
        shell(&["date", "-u", "+%Y-%m-%d-%H%M"]),
        shell(&["uname", "-r"]),
        if quick { "-quick" } else { "" }
    );
    let md = dir.join(format!("{stem}.md"));
    std::fs::write(&md, &markdown).with_context(|| format!("writing {}", md.display()))?;
    let document = json!({ "machine": machine(root, quick), "seconds": seconds, "steps": records });
    let json_path = dir.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&document)?)?;
    match chart(&document, &dir.join(format!("{stem}.svg"))) {
        Ok(png) => println!("chart: {}", png.display()),
        Err(error) => println!("chart not drawn: {error:#}"),
    }
    if print_json {
        println!("{}", serde_json::to_string_pretty(&document)?);
    }
    println!("\nbench: {seconds:.0} s; results in {} and {}", md.display(), json_path.display());
    Ok(md)
}

/// Runs one binary, echoing its output line by line (the progress), and returns the output.
fn run_step(root: &Path, step: &Step) -> Result<String> {
    let binary = root.join("target/release").join(step.binary);
    let mut child = Command::new(&binary)
        .args(&step.args)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", binary.display()))?;
    let mut output = String::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        println!("{line}");
        output.push_str(&line);
        output.push('\n');
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} {} failed ({status})", step.binary, step.args.join(" "));
    }
    Ok(output)
}

fn header(root: &Path, quick: bool) -> String {
    let m = machine(root, quick);
    format!(
        "# lb benchmark results\n\n| | |\n|---|---|\n| date (UTC) | {} |\n| kernel | {} |\n| CPU | {} |\n| cores | {} |\n| commit | {} |\n| mode | {} |\n",
        m["date"].as_str().unwrap_or_default(),
        m["kernel"].as_str().unwrap_or_default(),
        m["cpu"].as_str().unwrap_or_default(),
        m["cores"],
        m["commit"].as_str().unwrap_or_default(),
        if quick { "quick" } else { "full" }
    )
}

fn machine(root: &Path, quick: bool) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find(|l| l.starts_with("model name"))?.split(':').nth(1).map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let dirty = !shell_in(root, &["git", "status", "--porcelain"]).is_empty();
    json!({
        "date": shell(&["date", "-u", "+%Y-%m-%d %H:%M"]),
        "kernel": shell(&["uname", "-r"]),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "commit": format!("{}{}", shell_in(root, &["git", "rev-parse", "--short", "HEAD"]), if dirty { " (with uncommitted changes)" } else { "" }),
        "quick": quick,
    })
}

fn shell(args: &[&str]) -> String {
    shell_in(Path::new("."), args)
}

fn shell_in(dir: &Path, args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Every Markdown table of `text` as records keyed by its header cells; numbers become numbers.
fn tables(text: &str) -> Vec<Vec<Value>> {
    let mut tables = Vec::new();
    let mut current: Option<(Vec<String>, Vec<Value>)> = None;
    for line in text.lines().map(str::trim) {
        if !line.starts_with('|') {
            if let Some((_, rows)) = current.take() {
                tables.push(rows);
            }
            continue;
        }
        let cells: Vec<String> = line.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
        match &mut current {
            None => current = Some((cells, Vec::new())),
            Some(_) if cells.iter().all(|c| c.chars().all(|ch| "-: ".contains(ch))) => {}
            Some((header, rows)) => {
                let record: serde_json::Map<String, Value> = header
                    .iter()
                    .zip(&cells)
                    .map(|(k, v)| {
                        let key = if k.is_empty() { "name".to_string() } else { k.clone() };
                        (key, v.parse::<f64>().map_or_else(|_| Value::from(v.clone()), Value::from))
                    })
                    .collect();
                rows.push(Value::Object(record));
            }
        }
    }
    if let Some((_, rows)) = current {
        tables.push(rows);
    }
    tables
}

/// The prose lines (ratios, explanations), without headings and tables.
fn notes(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// One bar of the comparison chart.
struct Bar {
    label: String,
    value: f64,
}

/// The comparison bars from the results: forwarded pps per balancer and frame size, and TCP
/// connections per second, each group relative to the first bar of its kind drawn in its unit.
fn comparison(document: &Value) -> Vec<(String, Vec<Bar>)> {
    let mut groups = Vec::new();
    for step in document["steps"].as_array().into_iter().flatten() {
        let Some(first) = step["tables"].as_array().and_then(|t| t.first()).and_then(|t| t.as_array()) else {
            continue;
        };
        let bars = |value_key: &str, label: &dyn Fn(&Value) -> String| -> Vec<Bar> {
            first.iter().filter_map(|row| Some(Bar { label: label(row), value: row[value_key].as_f64()? })).collect()
        };
        match step["step"].as_str() {
            Some(name) if name.starts_with("end-to-end") => groups.push((
                "forwarded packets per second (higher is better)".to_string(),
                bars("forwarded pps", &|row| {
                    format!(
                        "{} {}",
                        short_name(row["balancer"].as_str().unwrap_or_default()),
                        row["frame"].as_str().unwrap_or_default()
                    )
                }),
            )),
            Some(name) if name.starts_with("TCP connections") => groups.push((
                "new TCP connections per second (higher is better)".to_string(),
                bars("connections/s", &|row| short_name(row["balancer"].as_str().unwrap_or_default())),
            )),
            _ => {}
        }
    }
    groups
}

/// "lb (XDP, nat)" → "lb nat", "nftables jhash DNAT+SNAT, conntrack" → "nftables", "HAProxy 2.6, …" → "HAProxy 2.6".
fn short_name(balancer: &str) -> String {
    if let Some(mode) = balancer.strip_prefix("lb (XDP, ") {
        return format!("lb {}", mode.trim_end_matches(')'));
    }
    let first = balancer.split(',').next().unwrap_or(balancer);
    first.split(" jhash").next().unwrap_or(first).to_string()
}

/// Draws the comparison as SVG (plotters) and converts it to PNG with rsvg-convert (Debian
/// librsvg2-bin); returns the PNG's path.
fn chart(document: &Value, svg: &Path) -> Result<PathBuf> {
    use plotters::prelude::*;
    let groups = comparison(document);
    if groups.is_empty() {
        bail!("no comparison figures in the results");
    }
    {
        // Wide enough that every bar's label fits above it.
        let most_bars = groups.iter().map(|(_, bars)| bars.len() as u32).max().unwrap_or(1);
        let width = 1100.max(190 * most_bars);
        let root = SVGBackend::new(svg, (width, 420 * groups.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        for ((title, bars), area) in groups.iter().zip(root.split_evenly((groups.len(), 1))) {
            let top = bars.iter().map(|b| b.value).fold(0.0, f64::max) * 1.15;
            let mut chart = ChartBuilder::on(&area)
                .caption(title, ("sans-serif", 22))
                .margin(15)
                .x_label_area_size(40)
                .y_label_area_size(90)
                .build_cartesian_2d(0.0..bars.len() as f64, 0.0..top.max(1.0))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
                .label_style(("sans-serif", 14))
                .draw()?;
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                let color = if bar.label.starts_with("lb") {
                    RGBColor(31, 119, 180) // ours
                } else if bar.label.starts_with("XDP_TX floor") {
                    RGBColor(200, 220, 235) // the topology's ceiling, not a competitor
                } else {
                    RGBColor(150, 150, 150) // what a user would run instead
                };
                Rectangle::new([(i as f64 + 0.1, 0.0), (i as f64 + 0.9, bar.value)], color.filled())
            }))?;
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                Text::new(
                    format!("{}: {:.0}", bar.label, bar.value),
                    (i as f64 + 0.12, bar.value + top * 0.05),
                    ("sans-serif", 14),
                )
            }))?;
        }
        root.present()?;
    }
    let png = svg.with_extension("png");
    let status = Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png)
        .arg(svg)
        .status()
        .context("running rsvg-convert (Debian package librsvg2-bin)")?;
    if !status.success() {
        bail!("rsvg-convert failed ({status})");
    }
    // The SVG is only the drawing step; the PNG is the result the README links.
    let _ = std::fs::remove_file(svg);
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_comparison_chart_is_drawn_from_the_results() {
        let e2e = "| balancer | frame | offered pps | forwarded pps | loss |\n|---|---:|---:|---:|---:|\n\
                   | XDP_TX floor, no balancing (MAC swap) | 64 B | 1 | 412000 | 0.0% |\n\
                   | lb (XDP, nat) | 64 B | 1 | 358518 | 0.0% |\n| lb (XDP, dsr) | 64 B | 1 | 385971 | 0.0% |\n\
                   | nftables jhash DNAT+SNAT, conntrack | 64 B | 1 | 222970 | 0.0% |\n";
        let cps = "| balancer | connections/s | failed |\n|---|---:|---:|\n| lb (XDP, nat) | 11570 | 0 |\n\
                   | HAProxy 2.6, mode tcp, roundrobin | 7344 | 0 |\n";
        let document = json!({ "steps": [
            { "step": "end-to-end pps vs nftables", "tables": tables(e2e) },
            { "step": "TCP connections per second vs HAProxy", "tables": tables(cps) },
        ]});
        let groups = comparison(&document);
        let labels: Vec<Vec<&str>> =
            groups.iter().map(|(_, bars)| bars.iter().map(|b| b.label.as_str()).collect()).collect();
        assert_eq!(
            labels,
            vec![
                vec!["XDP_TX floor 64 B", "lb nat 64 B", "lb dsr 64 B", "nftables 64 B"],
                vec!["lb nat", "HAProxy 2.6"]
            ]
        );
        let svg = std::env::temp_dir().join(format!("lb-chart-test-{}.svg", std::process::id()));
        let png = chart(&document, &svg).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
        let _ = (std::fs::remove_file(&svg), std::fs::remove_file(&png));
    }

    #[test]
    fn markdown_tables_become_records_with_numbers() {
        let text = "# Title\n\n| balancer | pps | loss |\n|---|---:|---:|\n| lb | 348412 | 0.0% |\n| nft | 214314 | 0.0% |\n\nratio 1.63x\n";
        let parsed = tables(text);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0][0], json!({ "balancer": "lb", "pps": 348412.0, "loss": "0.0%" }));
        assert_eq!(parsed[0][1]["pps"], json!(214314.0));
        assert_eq!(notes(text), vec!["ratio 1.63x".to_string()]);
    }
}
