//! `cargo xtask bench`: runs every benchmark binary in turn, shows their output as it comes,
//! and keeps the whole run as `<dir>/<date>-<kernel>.md` (target/bench, or bench/results with
//! `--record`) plus the same figures as JSON
//! (each Markdown table becomes a list of records keyed by its header), each figure beside the
//! previous recorded run's.

mod previous;

use anyhow::{Context, Result, bail};
use previous::Previous;
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

/// Runs the benchmarks and compares them with `previous` (a run's JSON), or else with the newest
/// run in bench/results; returns the Markdown file written.
pub fn run(root: &Path, dir: &Path, quick: bool, print_json: bool, previous: Option<&Path>) -> Result<PathBuf> {
    let started = Instant::now();
    // Found before this run writes its own results, which may land in bench/results too.
    let previous = Previous::find(previous, &root.join("bench/results"));
    print!("{}", previous.note(quick));
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
    markdown.push_str(&format!("\n{}", previous.note(quick)));
    let mut records = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        println!("\n[{}/{}] {} ({:.0} s so far)", i + 1, steps.len(), step.name, started.elapsed().as_secs_f64());
        let output = run_step(root, step)?;
        markdown.push_str(&format!("\n## {}\n\n", step.name));
        records.push(report_step(step.name, &output, &previous, &mut markdown));
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
    let document = json!({
        "machine": machine(root, quick),
        "seconds": seconds,
        "steps": records,
        "previous": previous.describe(),
    });
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

/// Appends one step's output to the report, its tables with the previous run's figures beside
/// this run's, and returns the step's JSON record: its tables as this run printed them (the next
/// run compares with those), and with a previous run, "compared": per table, per row, "new" or
/// the previous figure and the change of each compared column.
fn report_step(name: &str, output: &str, previous: &Previous, markdown: &mut String) -> Value {
    let parsed = markdown_tables(output);
    let mut record = json!({ "step": name, "tables": tables(output), "notes": notes(output) });
    match previous.align(name, &parsed) {
        Some(alignments) => {
            markdown.push_str(&previous::annotate(output, &parsed, &alignments));
            record["compared"] = parsed.iter().zip(&alignments).map(|(t, a)| a.to_json(t)).collect();
        }
        None => markdown.push_str(output),
    }
    record
}

/// Runs one binary, echoing its output line by line (the progress), and returns the output.
fn run_step(root: &Path, step: &Step) -> Result<String> {
    let binary = crate::target_dir(root).join("release").join(step.binary);
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
    markdown_tables(text).into_iter().map(|table| table.rows).collect()
}

/// One Markdown table of a benchmark's output.
struct Table {
    /// The records' keys in column order (the JSON records do not keep the order).
    columns: Vec<String>,
    rows: Vec<Value>,
    /// Where it stands in the output (line numbers): the header, the separator, each row.
    header_line: usize,
    separator_lines: Vec<usize>,
    row_lines: Vec<usize>,
}

fn markdown_tables(text: &str) -> Vec<Table> {
    let mut tables = Vec::new();
    let mut current: Option<Table> = None;
    for (number, line) in text.lines().map(str::trim).enumerate() {
        if !line.starts_with('|') {
            tables.extend(current.take());
            continue;
        }
        let cells = cells(line);
        match &mut current {
            None => {
                current = Some(Table {
                    columns: cells.into_iter().map(|k| if k.is_empty() { "name".to_string() } else { k }).collect(),
                    rows: Vec::new(),
                    header_line: number,
                    separator_lines: Vec::new(),
                    row_lines: Vec::new(),
                })
            }
            Some(table) if cells.iter().all(|c| c.chars().all(|ch| "-: ".contains(ch))) => {
                table.separator_lines.push(number)
            }
            Some(table) => {
                let record: serde_json::Map<String, Value> = table
                    .columns
                    .iter()
                    .zip(&cells)
                    .map(|(k, v)| (k.clone(), v.parse::<f64>().map_or_else(|_| Value::from(v.clone()), Value::from)))
                    .collect();
                table.rows.push(Value::Object(record));
                table.row_lines.push(number);
            }
        }
    }
    tables.extend(current);
    tables
}

/// The trimmed cells of one Markdown table line.
fn cells(line: &str) -> Vec<String> {
    line.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect()
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
    /// The same figure in the previous run, when the report compared it.
    previous: Option<f64>,
}

/// The comparison bars from the results: forwarded pps per balancer and frame size, and TCP
/// connections per second, each group relative to the first bar of its kind drawn in its unit;
/// with the previous run's figure where the report compared it ("compared" in the results).
fn comparison(document: &Value) -> Vec<(String, Vec<Bar>)> {
    let mut groups = Vec::new();
    for step in document["steps"].as_array().into_iter().flatten() {
        let Some(first) = step["tables"].as_array().and_then(|t| t.first()).and_then(|t| t.as_array()) else {
            continue;
        };
        let compared = &step["compared"][0];
        let bars = |value_key: &str, label: &dyn Fn(&Value) -> String| -> Vec<Bar> {
            first
                .iter()
                .enumerate()
                .filter_map(|(i, row)| {
                    Some(Bar {
                        label: label(row),
                        value: row[value_key].as_f64()?,
                        previous: previous::figure(&compared[i][value_key]["previous"]),
                    })
                })
                .collect()
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
            Some("TCP connections per second vs HAProxy") => groups.push((
                "new TCP connections per second (higher is better)".to_string(),
                bars("connections/s", &|row| short_name(row["balancer"].as_str().unwrap_or_default())),
            )),
            _ => {}
        }
    }
    // A step that did not run (or printed no such table) draws no empty panel.
    groups.retain(|(_, bars)| !bars.is_empty());
    groups
}

/// Draws a recorded run's chart again from its JSON, beside it; returns the PNG's path.
pub fn redraw(json: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let document: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    chart(&document, &json.with_extension("svg"))
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
        let previous_date = document["previous"]["date"].as_str().unwrap_or("the previous run");
        for ((title, bars), area) in groups.iter().zip(root.split_evenly((groups.len(), 1))) {
            // With the previous run, each slot holds its previous figure (light, left) beside the new.
            let with_previous = bars.iter().any(|b| b.previous.is_some());
            let tallest = |b: &Bar| b.previous.map_or(b.value, |p| p.max(b.value));
            let top = bars.iter().map(tallest).fold(0.0, f64::max) * if with_previous { 1.25 } else { 1.15 };
            let caption = if with_previous {
                format!("{title}; light bars: previous run ({previous_date})")
            } else {
                title.clone()
            };
            let mut chart = ChartBuilder::on(&area)
                .caption(caption, ("sans-serif", 22))
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
            let color = |bar: &Bar| {
                if bar.label.starts_with("lb") {
                    RGBColor(31, 119, 180) // ours
                } else if bar.label.starts_with("XDP_TX floor") {
                    RGBColor(200, 220, 235) // the topology's ceiling, not a competitor
                } else {
                    RGBColor(150, 150, 150) // what a user would run instead
                }
            };
            let lighter = |RGBColor(r, g, b): RGBColor| {
                let towards_white = |c: u8| c + ((255 - c) as f64 * 0.6) as u8;
                RGBColor(towards_white(r), towards_white(g), towards_white(b))
            };
            let new_left = if with_previous { 0.5 } else { 0.1 };
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                Rectangle::new([(i as f64 + new_left, 0.0), (i as f64 + 0.9, bar.value)], color(bar).filled())
            }))?;
            let before = |(i, bar): (usize, &Bar)| Some((i as f64, bar.previous?, color(bar)));
            chart.draw_series(bars.iter().enumerate().filter_map(before).map(|(i, previous, color)| {
                Rectangle::new([(i + 0.1, 0.0), (i + 0.5, previous)], lighter(color).filled())
            }))?;
            // Outlined a shade darker, so that even the light floor's previous bar stands out from the white.
            let darker = |RGBColor(r, g, b): RGBColor| RGBColor(r / 5 * 4, g / 5 * 4, b / 5 * 4);
            chart.draw_series(bars.iter().enumerate().filter_map(before).map(|(i, previous, color)| {
                Rectangle::new([(i + 0.1, 0.0), (i + 0.5, previous)], darker(color).stroke_width(1))
            }))?;
            chart.draw_series(bars.iter().enumerate().map(|(i, bar)| {
                Text::new(
                    format!("{}: {:.0}", bar.label, bar.value),
                    (i as f64 + 0.12, tallest(bar) + top * if with_previous { 0.1 } else { 0.05 }),
                    ("sans-serif", 14),
                )
            }))?;
            chart.draw_series(bars.iter().enumerate().filter_map(|(i, bar)| {
                let previous = bar.previous?;
                let change = (bar.value - previous) / previous * 100.0;
                Some(Text::new(
                    format!("was {previous:.0} ({})", previous::signed_percent(change)),
                    (i as f64 + 0.12, tallest(bar) + top * 0.05),
                    ("sans-serif", 13),
                ))
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
        let flood = "| run | flood pps offered | client attempts | succeeded |\n|---|---:|---:|---:|\n| dsr, SYN flood | 199810 | 2000 | 840 |\n";
        let document = json!({ "steps": [
            { "step": "end-to-end pps vs nftables", "tables": tables(e2e) },
            { "step": "TCP connections per second vs HAProxy", "tables": tables(cps) },
            // Its name starts as the one above does; it has no bars, and draws no panel.
            { "step": "TCP connections during a SYN flood", "tables": tables(flood) },
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
    fn the_chart_sets_each_figure_beside_the_previous_runs() {
        let step = "TCP connections per second vs HAProxy";
        let cps = |nat: u32| {
            format!(
                "| balancer | connections/s | failed |\n|---|---:|---:|\n| lb (XDP, nat) | {nat} | 0 |\n\
                     | HAProxy 2.6, mode tcp, roundrobin | 7344 | 0 |\n"
            )
        };
        let before = cps(11570).replace("| HAProxy 2.6, mode tcp, roundrobin | 7344 | 0 |\n", "");
        let previous = Previous::Run {
            file: PathBuf::from("2026-11-25-0945-6.18.44-fc-v509.json"),
            document: json!({ "machine": { "date": "2026-11-25 09:45" }, "steps": [{ "step": step, "tables": tables(&before) }] }),
        };
        let mut markdown = String::new();
        let document = json!({ "steps": [report_step(step, &cps(12251), &previous, &mut markdown)], "previous": previous.describe() });
        assert!(markdown.contains("| lb (XDP, nat) | 12251 | 11570 | +6 % | 0 |"), "{markdown}");
        assert!(markdown.contains("| HAProxy 2.6, mode tcp, roundrobin | 7344 | new |  | 0 |"), "{markdown}");
        let bars: Vec<(f64, Option<f64>)> = comparison(&document)[0].1.iter().map(|b| (b.value, b.previous)).collect();
        assert_eq!(bars, vec![(12251.0, Some(11570.0)), (7344.0, None)]);
        let svg = std::env::temp_dir().join(format!("lb-chart-previous-test-{}.svg", std::process::id()));
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
