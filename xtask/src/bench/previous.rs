//! The previous run a benchmark report compares with: which run it is, which of its table rows
//! match this run's, and the "previous" and "change" columns written beside this run's figures.

use super::Table;
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};

/// The run this one is compared with, or why there is none.
pub enum Previous {
    Run { file: PathBuf, document: Value },
    None(String),
}

impl Previous {
    /// The run in `given` (`--previous PATH`), or else the newest run recorded in `results`.
    /// Never an error: without a previous run the report says so and shows this run alone.
    pub fn find(given: Option<&Path>, results: &Path) -> Previous {
        if let Some(file) = given {
            return match read_run(file) {
                Ok(document) => Previous::Run { file: file.to_path_buf(), document },
                Err(why) => Previous::None(why),
            };
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(results)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .collect();
        // The names start with the date and time (UTC), so the greatest name is the newest run.
        files.sort();
        files
            .into_iter()
            .rev()
            .find_map(|file| read_run(&file).ok().map(|document| Previous::Run { file, document }))
            .unwrap_or_else(|| Previous::None(format!("{} holds no recorded run (*.json)", results.display())))
    }

    pub fn document(&self) -> Option<&Value> {
        match self {
            Previous::Run { document, .. } => Some(document),
            Previous::None(_) => None,
        }
    }

    /// What the JSON results say about it: file, date, kernel, commit and mode, or why there is none.
    pub fn describe(&self) -> Value {
        match self {
            Previous::Run { file, document } => {
                let machine = &document["machine"];
                json!({
                    "file": file_name(file),
                    "date": machine["date"],
                    "kernel": machine["kernel"],
                    "commit": machine["commit"],
                    "quick": machine["quick"],
                })
            }
            Previous::None(why) => json!({ "none": why }),
        }
    }

    /// The paragraph at the top of the report: which run the figures are compared with, and how
    /// far to trust the comparison.
    pub fn note(&self, quick: bool) -> String {
        let (file, document) = match self {
            Previous::Run { file, document } => (file, document),
            Previous::None(why) => return format!("No previous run to compare with: {why}.\n"),
        };
        let machine = &document["machine"];
        let text = |key: &str| machine[key].as_str().unwrap_or("unknown").to_string();
        let mut note = format!(
            "Compared with the previous run `{}` ({} UTC, kernel {}, commit {}): beside each table's main \
             figure and its ratios, \"previous\" is that run's figure and \"change\" the difference from \
             it; \"new\" marks a row that run did not have. Absolute times and rates drift with this VM \
             (the host's load and clock decide them as much as the code does), so a change in them alone \
             proves little: the ratios within one run (x XDP_TX floor, lb / nftables, lb / HAProxy) are \
             what compare across runs.",
            file_name(file),
            text("date"),
            text("kernel"),
            text("commit"),
        );
        if let Some(previous_quick) = machine["quick"].as_bool().filter(|&q| q != quick) {
            let mode = |q: bool| if q { "quick" } else { "full" };
            note.push_str(&format!(
                " That was a {} run and this is a {} one: the quick runs' figures are noisier.",
                mode(previous_quick),
                mode(quick)
            ));
        }
        note.push('\n');
        note
    }

    /// How every table of `step` lines up with the previous run's; `None` without a previous run.
    pub fn align(&self, step: &str, tables: &[Table]) -> Option<Vec<Alignment<'_>>> {
        let document = self.document()?;
        let previous_tables: Vec<&[Value]> = document["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["step"] == step)
            .and_then(|s| s["tables"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_array().map(Vec::as_slice))
            .collect();
        Some(tables.iter().map(|table| Alignment::new(table, counterpart(table, &previous_tables))).collect())
    }
}

fn read_run(file: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(file).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => format!("{} does not exist", file.display()),
        _ => format!("{} cannot be read ({error})", file.display()),
    })?;
    let document: Value =
        serde_json::from_str(&text).map_err(|error| format!("{} is not JSON ({error})", file.display()))?;
    if !document["steps"].is_array() {
        return Err(format!("{} holds no benchmark run (no \"steps\")", file.display()));
    }
    Ok(document)
}

fn file_name(file: &Path) -> String {
    file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// The previous run's table for `table`: the one of the same step that has its first column and
/// most of its other columns (a step may print several tables, and a column may have been added).
fn counterpart<'a>(table: &Table, previous: &[&'a [Value]]) -> &'a [Value] {
    let shared =
        |rows: &[Value]| rows.first().map_or(0, |row| table.columns.iter().filter(|c| row.get(c).is_some()).count());
    previous
        .iter()
        .filter(|rows| rows.first().is_some_and(|row| row.get(&table.columns[0]).is_some()))
        .rev() // the first of equals: max_by_key keeps the last
        .max_by_key(|rows| shared(rows))
        .copied()
        .unwrap_or_default()
}

/// How one table of this run lines up with the previous run's.
pub struct Alignment<'a> {
    /// The columns (indices into `Table::columns`) shown beside their previous figure.
    pub compared: Vec<usize>,
    /// For each row of this run, the previous run's row with the same name, if it had one.
    pub previous: Vec<Option<&'a Value>>,
}

impl<'a> Alignment<'a> {
    fn new(table: &Table, previous: &'a [Value]) -> Alignment<'a> {
        let key = key_columns(&table.columns, &table.rows, previous);
        let key_names = &table.columns[..key];
        let name = |row: &Value| key_names.iter().map(|c| cell_text(&row[c.as_str()])).collect::<Vec<_>>();
        // A name that still repeats (identical rows) is told apart by its order among its equals.
        let previous_names: Vec<Vec<String>> = previous.iter().map(name).collect();
        let mut seen: Vec<Vec<String>> = Vec::new();
        let previous = table
            .rows
            .iter()
            .map(|row| {
                let name = name(row);
                let nth = seen.iter().filter(|n| **n == name).count();
                seen.push(name.clone());
                previous_names.iter().zip(previous).filter(|(n, _)| **n == name).nth(nth).map(|(_, row)| row)
            })
            .collect();
        Alignment { compared: compared_columns(table, key), previous }
    }

    /// The comparison as JSON, one entry per row: "new", or for each compared column the previous
    /// figure and the change in percent.
    pub fn to_json(&self, table: &Table) -> Value {
        let rows = table.rows.iter().zip(&self.previous).map(|(row, previous)| {
            let Some(previous) = previous else { return json!("new") };
            let columns: Map<String, Value> = self
                .compared
                .iter()
                .filter_map(|&c| {
                    let column = &table.columns[c];
                    let before = previous.get(column)?;
                    let change = change_percent(&row[column.as_str()], before).map(|p| (p * 10.0).round() / 10.0);
                    Some((column.clone(), json!({ "previous": before, "change %": change })))
                })
                .collect();
            Value::Object(columns)
        });
        Value::Array(rows.collect())
    }
}

/// How many leading columns name a row: the first column, and the next ones as long as rows
/// repeat without them, in either run (the end-to-end table names a row by balancer and frame
/// size, the scale table by VIPs and prefilled connections). The benchmarks print what they
/// varied before what they measured, so this stops before the figures.
fn key_columns(columns: &[String], rows: &[Value], previous: &[Value]) -> usize {
    let unique = |rows: &[Value], n: usize| {
        let names: Vec<Vec<String>> =
            rows.iter().map(|row| columns[..n].iter().map(|c| cell_text(&row[c.as_str()])).collect()).collect();
        names.iter().enumerate().all(|(i, name)| !names[..i].contains(name))
    };
    (1..columns.len()).find(|&n| unique(rows, n) && unique(previous, n)).unwrap_or(1)
}

/// Headers of columns that say what a benchmark was given, not what it measured.
const GIVEN: [&str; 2] = ["offered", "max entries"];

/// The figures that get a "previous" and a "change" column. All of them would double a table's
/// width (the per-packet table has four, the end-to-end one four), and min, max or loss say little
/// across runs. So: the table's main figure, which is its first figure column that is measured
/// rather than given (the benchmarks print their headline first: ns/packet, forwarded pps,
/// connections/s, the Maglev build time), and every ratio ("x XDP_TX floor", "1.60x"), because
/// ratios within one run are what compare across runs on a VM whose absolute speed drifts.
fn compared_columns(table: &Table, key: usize) -> Vec<usize> {
    let is_figure = |c: usize| {
        let cells = || table.rows.iter().map(|row| &row[table.columns[c].as_str()]);
        cells().all(|v| figure(v).is_some() || is_blank(v)) && cells().any(|v| figure(v).is_some())
    };
    let is_ratio = |c: usize| {
        let header = table.columns[c].to_lowercase();
        header.starts_with("x ")
            || header.contains("ratio")
            || table
                .rows
                .iter()
                .map(|row| &row[table.columns[c].as_str()])
                .all(|v| is_blank(v) || v.as_str().is_some_and(|s| s.ends_with('x') && figure(v).is_some()))
    };
    let figures: Vec<usize> = (key..table.columns.len()).filter(|&c| is_figure(c)).collect();
    let main = figures.iter().copied().find(|&c| !GIVEN.iter().any(|g| table.columns[c].starts_with(g)));
    figures.into_iter().filter(|&c| Some(c) == main || is_ratio(c)).collect()
}

/// A cell as a number: a JSON number, or text that is a number with a unit ("2.29 ms", "0.0%",
/// "1.60x").
pub fn figure(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let number = s.trim_end_matches(|c: char| c.is_alphabetic() || c == '%' || c == '/').trim_end();
            number.parse().ok().filter(|n: &f64| n.is_finite())
        }
        _ => None,
    }
}

/// An empty cell, or one that says there is no figure ("-").
fn is_blank(value: &Value) -> bool {
    value.is_null() || value.as_str().is_some_and(|s| ["", "-", "–", "—", "n/a"].contains(&s.trim()))
}

/// A cell as the benchmark printed it (the JSON keeps numbers as numbers: 60.7, 462572).
fn cell_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), |f| f.to_string()),
        Value::Null => "–".to_string(),
        other => other.to_string(),
    }
}

/// The previous figure printed with as many decimals as this run's `printed` figure (the JSON
/// keeps 65.0 as 65).
fn printed_like(previous: &Value, printed: &str) -> String {
    match (previous.as_f64(), printed.parse::<f64>()) {
        (Some(number), Ok(_)) => {
            let decimals = printed.split_once('.').map_or(0, |(_, fraction)| fraction.len());
            format!("{number:.decimals$}")
        }
        _ => cell_text(previous),
    }
}

fn change_percent(new: &Value, previous: &Value) -> Option<f64> {
    let (new, previous) = (figure(new)?, figure(previous)?);
    match previous {
        0.0 if new == 0.0 => Some(0.0),
        0.0 => None,
        _ => Some((new - previous) / previous.abs() * 100.0),
    }
}

/// The change from `previous` to `new` as "+5 %", "−12 %", "±0 %"; empty when either cell is not
/// a figure.
fn change_text(new: &Value, previous: &Value) -> String {
    change_percent(new, previous).map_or_else(String::new, signed_percent)
}

/// A change in percent as "+5 %", "−12 %" (a minus sign, as in print), "±0 %".
pub fn signed_percent(percent: f64) -> String {
    match percent.round() {
        p if !p.is_finite() => String::new(),
        0.0 => "±0 %".to_string(),
        p if p > 0.0 => format!("+{p:.0} %"),
        p => format!("−{:.0} %", -p),
    }
}

/// `output` (one step's) with a "previous" and a "change" column beside each compared figure of
/// each table; `alignments` follow `tables`.
pub fn annotate(output: &str, tables: &[Table], alignments: &[Alignment]) -> String {
    let mut lines: Vec<String> = output.lines().map(String::from).collect();
    for (table, alignment) in tables.iter().zip(alignments) {
        if alignment.compared.is_empty() {
            continue;
        }
        // `extra` gets the column and its cell in this line, and gives the two cells to insert.
        let rewrite = |line: &str, extra: &dyn Fn(usize, &str) -> [String; 2]| {
            let mut cells = super::cells(line);
            cells.resize(cells.len().max(table.columns.len()), String::new());
            for &c in alignment.compared.iter().rev() {
                let inserted = extra(c, &cells[c]);
                cells.splice(c + 1..c + 1, inserted);
            }
            cells
        };
        let header = rewrite(&lines[table.header_line], &|_, _| ["previous".into(), "change".into()]);
        lines[table.header_line] = format!("| {} |", header.join(" | "));
        for &separator in &table.separator_lines {
            let cells = rewrite(&lines[separator], &|_, _| ["---:".into(), "---:".into()]);
            lines[separator] = format!("|{}|", cells.join("|"));
        }
        for ((row, &line), previous) in table.rows.iter().zip(&table.row_lines).zip(&alignment.previous) {
            let cells = rewrite(&lines[line], &|c, printed| {
                let column = table.columns[c].as_str();
                match previous.map(|p| &p[column]) {
                    None => ["new".into(), String::new()],
                    Some(Value::Null) => ["–".into(), String::new()],
                    Some(before) => [printed_like(before, printed), change_text(&row[column], before)],
                }
            });
            lines[line] = format!("| {} |", cells.join(" | "));
        }
    }
    let mut annotated = lines.join("\n");
    if output.ends_with('\n') {
        annotated.push('\n');
    }
    annotated
}

#[cfg(test)]
mod tests {
    use super::super::markdown_tables;
    use super::*;

    /// One step of a run document, as `run` writes it.
    fn run_with(step: &str, output: &str) -> Value {
        let rows: Vec<Value> = markdown_tables(output).into_iter().map(|t| Value::Array(t.rows)).collect();
        json!({
            "machine": { "date": "2026-11-25 09:45", "kernel": "6.18.44-fc-v509", "commit": "338a162", "quick": false },
            "steps": [{ "step": step, "tables": rows }],
        })
    }

    fn previous_run(document: Value) -> Previous {
        Previous::Run { file: PathBuf::from("bench/results/2026-11-25-0945-6.18.44-fc-v509.json"), document }
    }

    fn annotated(previous: &Previous, step: &str, output: &str) -> String {
        let tables = markdown_tables(output);
        match previous.align(step, &tables) {
            Some(alignments) => annotate(output, &tables, &alignments),
            None => output.to_string(),
        }
    }

    const PER_PACKET: &str = "per-packet cost (BPF_PROG_TEST_RUN)";

    #[test]
    fn main_figure_and_ratio_show_the_previous_figure_and_the_change() {
        // The recorded run predates the ratio column and the tunnel row.
        let before = "| case | median ns/packet | min | max |\n|---|---:|---:|---:|\n\
                      | floor: MAC swap + XDP_TX | 65.0 | 63.0 | 66.5 |\n\
                      | nat  IPv4 TCP, established | 238.3 | 235.9 | 241.5 |\n";
        let now = "load average before: 0.95\n\n\
                   | case | median ns/packet | min | max | x XDP_TX floor |\n|---|---:|---:|---:|---:|\n\
                   | floor: MAC swap + XDP_TX | 65.0 | 63.0 | 66.5 | - |\n\
                   | nat  IPv4 TCP, established | 209.7 | 205.0 | 230.0 | 3.2 |\n\
                   | nat  IPv4 in IPIP, established | 250.0 | 240.0 | 260.0 | 3.8 |\n\nload average after: 0.99\n";
        let previous = previous_run(run_with(PER_PACKET, before));
        assert_eq!(
            annotated(&previous, PER_PACKET, now),
            "load average before: 0.95\n\n\
             | case | median ns/packet | previous | change | min | max | x XDP_TX floor | previous | change |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | floor: MAC swap + XDP_TX | 65.0 | 65.0 | ±0 % | 63.0 | 66.5 | - | – |  |\n\
             | nat  IPv4 TCP, established | 209.7 | 238.3 | −12 % | 205.0 | 230.0 | 3.2 | – |  |\n\
             | nat  IPv4 in IPIP, established | 250.0 | new |  | 240.0 | 260.0 | 3.8 | new |  |\n\
             \nload average after: 0.99\n"
        );
        let tables = markdown_tables(now);
        let alignments = previous.align(PER_PACKET, &tables).unwrap();
        assert_eq!(
            alignments[0].to_json(&tables[0]),
            json!([
                { "median ns/packet": { "previous": 65.0, "change %": 0.0 } },
                { "median ns/packet": { "previous": 238.3, "change %": -12.0 } },
                "new",
            ])
        );
    }

    #[test]
    fn rows_whose_first_cell_repeats_are_named_by_the_next_cells_too() {
        let step = "end-to-end pps vs nftables";
        let before = "| balancer | frame | offered pps | forwarded pps | loss |\n|---|---:|---:|---:|---:|\n\
                      | lb (XDP, nat) | 64 B | 400000 | 400000 | 0.0% |\n| lb (XDP, nat) | 512 B | 380000 | 380000 | 0.0% |\n\n\
                      | VIPs | prefilled connections | forwarded pps | loss |\n|---:|---:|---:|---:|\n\
                      | 1 | 0 | 378537 | 0.0% |\n| 1 | 1000000 | 376217 | 0.0% |\n";
        let now = "| balancer | frame | offered pps | forwarded pps | loss |\n|---|---:|---:|---:|---:|\n\
                   | lb (XDP, nat) | 512 B | 418000 | 418000 | 0.0% |\n| lb (XDP, nat) | 64 B | 440000 | 440000 | 0.0% |\n\n\
                   | VIPs | prefilled connections | forwarded pps | loss |\n|---:|---:|---:|---:|\n\
                   | 1 | 1000000 | 300974 | 0.0% |\n";
        let previous = previous_run(run_with(step, before));
        // The offered load is what the benchmark was given: forwarded pps is the main figure.
        assert_eq!(
            annotated(&previous, step, now),
            "| balancer | frame | offered pps | forwarded pps | previous | change | loss |\n\
             |---|---:|---:|---:|---:|---:|---:|\n\
             | lb (XDP, nat) | 512 B | 418000 | 418000 | 380000 | +10 % | 0.0% |\n\
             | lb (XDP, nat) | 64 B | 440000 | 440000 | 400000 | +10 % | 0.0% |\n\n\
             | VIPs | prefilled connections | forwarded pps | previous | change | loss |\n\
             |---:|---:|---:|---:|---:|---:|\n\
             | 1 | 1000000 | 300974 | 376217 | −20 % | 0.0% |\n"
        );
    }

    #[test]
    fn figures_with_units_compare_and_a_new_step_has_only_new_rows() {
        let step = "control plane: Maglev build and publish";
        let table = |build: &str| {
            format!("| backends | Maglev table build | publish |\n|---:|---:|---:|\n| 10 | {build} | 0.031 ms |\n")
        };
        let previous = previous_run(run_with(step, &table("2.29 ms")));
        assert_eq!(
            annotated(&previous, step, &table("2.52 ms")),
            "| backends | Maglev table build | previous | change | publish |\n|---:|---:|---:|---:|---:|\n\
             | 10 | 2.52 ms | 2.29 ms | +10 % | 0.031 ms |\n"
        );
        assert_eq!(
            annotated(&previous, "a step added since", &table("2.52 ms")),
            "| backends | Maglev table build | previous | change | publish |\n|---:|---:|---:|---:|---:|\n\
             | 10 | 2.52 ms | new |  | 0.031 ms |\n"
        );
    }

    #[test]
    fn a_previous_file_that_does_not_exist_leaves_the_report_as_it_was_and_says_so() {
        let missing = std::env::temp_dir().join(format!("lb-no-such-run-{}.json", std::process::id()));
        let previous = Previous::find(Some(&missing), Path::new("bench/results"));
        assert!(previous.document().is_none());
        assert_eq!(
            previous.note(false),
            format!("No previous run to compare with: {} does not exist.\n", missing.display())
        );
        assert_eq!(previous.describe()["none"], json!(format!("{} does not exist", missing.display())));
        let output = "| case | median ns/packet |\n|---|---:|\n| floor: XDP_DROP | 60.7 |\n";
        assert_eq!(annotated(&previous, PER_PACKET, output), output);
    }

    #[test]
    fn the_newest_recorded_run_is_the_previous_one() {
        let results = std::env::temp_dir().join(format!("lb-bench-results-{}", std::process::id()));
        std::fs::create_dir_all(&results).unwrap();
        let run = |date: &str| json!({ "machine": { "date": date, "quick": true }, "steps": [] }).to_string();
        std::fs::write(results.join("2026-11-25-0945-6.18.44.json"), run("2026-11-25 09:45")).unwrap();
        std::fs::write(results.join("2026-12-02-1010-6.18.44.json"), run("2026-12-02 10:10")).unwrap();
        // Newer by name, but not a run: passed over.
        std::fs::write(results.join("2026-12-03-0000-notes.json"), "{ \"no\": \"steps\" }").unwrap();
        std::fs::write(results.join("2026-12-04-0000-soak.md"), "# soak").unwrap();
        let previous = Previous::find(None, &results);
        assert_eq!(previous.describe()["file"], json!("2026-12-02-1010-6.18.44.json"));
        let note = previous.note(false);
        assert!(
            note.starts_with("Compared with the previous run `2026-12-02-1010-6.18.44.json` (2026-12-02 10:10 UTC")
        );
        assert!(note.contains("That was a quick run and this is a full one"));
        let _ = std::fs::remove_dir_all(&results);

        let empty = Previous::find(None, &results);
        assert_eq!(
            empty.note(false),
            format!("No previous run to compare with: {} holds no recorded run (*.json).\n", results.display())
        );
    }

    #[test]
    fn changes_read_as_signed_percentages() {
        assert_eq!(change_text(&json!(88.0), &json!(100.0)), "−12 %");
        assert_eq!(change_text(&json!("3.3x"), &json!("3.0x")), "+10 %");
        assert_eq!(change_text(&json!(100.2), &json!(100.0)), "±0 %");
        assert_eq!(change_text(&json!("-"), &json!(1.0)), "");
        assert_eq!(figure(&json!("0.0%")), Some(0.0));
        assert_eq!(figure(&json!("dsr  IPv4 TCP SYN, new flow")), None);
        assert_eq!(figure(&json!("1 (1 connection reset)")), None);
    }
}
