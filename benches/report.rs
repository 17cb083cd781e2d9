//! The benchmark report: reads the figures the benchmarks recorded
//! (`common::record`, one JSON line each) and writes BENCHMARKS.md with a
//! table and a plot (SVG, plotters) per benchmark. `scripts/bench` runs the
//! benchmarks and then this.
//!
//! Usage: cargo bench --bench report -- RESULTS.jsonl BENCHMARKS.md PLOT_DIR

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Figure {
    bench: String,
    figure: String,
    unit: String,
    higher_is_better: bool,
    tenantry: f64,
    baseline_name: String,
    baseline: f64,
}

impl Figure {
    /// Tenantry's figure over the baseline's.
    fn ratio(&self) -> f64 {
        self.tenantry / self.baseline
    }

    /// How much of the baseline's speed Tenantry reaches (1.0: as fast).
    fn speed(&self) -> f64 {
        if self.higher_is_better {
            self.ratio()
        } else {
            self.baseline / self.tenantry
        }
    }
}

/// The benchmarks in report order, with their titles and how to run one.
const BENCHES: [(&str, &str, &str); 7] = [
    (
        "provision",
        "Provisioning: signup against the same template SQL sent raw",
        "scripts/bench-provision [N]",
    ),
    (
        "fleet",
        "Fleet migrations: `fleet migrate` against the same SQL applied raw",
        "scripts/bench-fleet [N] [NOOP_N]",
    ),
    (
        "routing",
        "Routing: tenant reads over HTTP against pgbench",
        "scripts/bench-routing [N] [SECONDS]",
    ),
    (
        "gdpr",
        "GDPR: export and erasure against raw COPY and DROP",
        "scripts/bench-gdpr [ROWS]",
    ),
    (
        "usage",
        "Usage: every tenant's bytes in one pass against one query per schema",
        "scripts/bench-usage [N] [SIGNUPS]",
    ),
    (
        "scale",
        "Scale-out: routing on a Citus coordinator + 2 workers against plain PostgreSQL",
        "scripts/bench-scale [N] [SECONDS]",
    ),
    (
        "scale-node",
        "One node at scale: signups, routed reads and SET ROLE as the fleet grows",
        "scripts/bench-scale-node [N] [SECONDS]",
    ),
];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [results, out, plots] = &args[..] else {
        eprintln!("usage: report RESULTS.jsonl BENCHMARKS.md PLOT_DIR");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(results).expect("read the results");
    let mut figures: BTreeMap<String, Vec<Figure>> = BTreeMap::new();
    let mut facts: BTreeMap<(String, String), String> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(key) = value.get("fact").and_then(|f| f.as_str()) {
            facts.insert(
                (value["bench"].as_str().unwrap_or("").into(), key.into()),
                value["value"].as_str().unwrap_or("").into(),
            );
        } else {
            let figure: Figure = serde_json::from_value(value).expect("a figure");
            figures
                .entry(figure.bench.clone())
                .or_default()
                .push(figure);
        }
    }
    std::fs::create_dir_all(plots).expect("create the plot directory");

    let postgres: Vec<&String> = {
        let mut v: Vec<&String> = facts
            .iter()
            .filter(|((_, k), _)| k == "postgres")
            .map(|(_, v)| v)
            .collect();
        v.dedup();
        v
    };
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n").unwrap();
    writeln!(
        md,
        "Written by `scripts/bench` on {}. Every figure is measured in the same run as its \
         raw-PostgreSQL baseline, on the same private cluster (default settings, durable).\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
    .unwrap();
    writeln!(md, "- Machine: {}", machine()).unwrap();
    writeln!(
        md,
        "- PostgreSQL: {}",
        postgres
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    writeln!(
        md,
        "- Rerun: `scripts/bench` (full sizes, about half an hour) or `scripts/bench --quick` \
         (a few minutes); each benchmark also runs alone (below) and prints more detail.\n"
    )
    .unwrap();
    writeln!(
        md,
        "**ratio** is Tenantry's figure over the baseline's (for a time, above 1 is slower; \
         for a rate, below 1 is slower); **share of raw speed** turns both into one scale: \
         1.00 is as fast as the baseline, 0.50 half as fast. The plots show the share.\n"
    )
    .unwrap();

    for (bench, title, rerun) in BENCHES {
        let Some(list) = figures.get(bench) else {
            continue;
        };
        writeln!(md, "## {title}\n").unwrap();
        if let Some(size) = facts.get(&(bench.to_string(), "size".to_string())) {
            writeln!(md, "Size: {size}. Alone: `{rerun}`.\n").unwrap();
        }
        writeln!(
            md,
            "| figure | Tenantry | baseline | baseline figure | ratio | share of raw speed |"
        )
        .unwrap();
        writeln!(md, "|---|---:|---|---:|---:|---:|").unwrap();
        for f in list {
            writeln!(
                md,
                "| {} | {} {} | {} | {} {} | {:.2}× | {:.2} |",
                f.figure,
                number(f.tenantry),
                f.unit,
                f.baseline_name,
                number(f.baseline),
                f.unit,
                f.ratio(),
                f.speed()
            )
            .unwrap();
        }
        let file = format!("{bench}.svg");
        plot(&Path::new(plots).join(&file), title, list).expect("draw the plot");
        let relative = relative_path(Path::new(out), &Path::new(plots).join(&file));
        writeln!(md, "\n![{title}]({relative})\n").unwrap();
    }
    std::fs::write(out, md).expect("write the report");
    println!("wrote {out} and the plots in {plots}");
}

fn number(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `plot` as seen from the directory of `report`.
fn relative_path(report: &Path, plot: &Path) -> String {
    let base = report.parent().unwrap_or(Path::new(""));
    plot.strip_prefix(base)
        .unwrap_or(plot)
        .to_string_lossy()
        .into_owned()
}

/// CPU model, cores, memory, kernel.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// One horizontal bar per figure: Tenantry's share of the baseline's speed,
/// with a line at 1.0 (as fast as raw).
fn plot(path: &Path, title: &str, figures: &[Figure]) -> Result<(), Box<dyn std::error::Error>> {
    let n = figures.len();
    let height = 100 + 60 * n as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let widest = figures.iter().map(Figure::speed).fold(1.0, f64::max);
    let x_max = (widest * 1.15).max(1.2);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .build_cartesian_2d(0f64..x_max, 0f64..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("share of the raw-PostgreSQL baseline's speed (1.0 = as fast)")
        .x_label_formatter(&|x| format!("{x:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (i, f) in figures.iter().enumerate() {
        // The first figure at the top.
        let y = (n - 1 - i) as f64;
        let color = if f.speed() >= 0.8 {
            RGBColor(46, 125, 50)
        } else {
            RGBColor(230, 120, 20)
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.1), (f.speed(), y + 0.5)],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!(
                "{} vs {}: {:.2} ({} vs {} {})",
                f.figure,
                f.baseline_name,
                f.speed(),
                number(f.tenantry),
                number(f.baseline),
                f.unit
            ),
            // The label above its bar.
            (x_max * 0.005, y + 0.92),
            ("sans-serif", 16).into_font(),
        )))?;
    }
    chart.draw_series(LineSeries::new(
        [(1.0, 0.0), (1.0, n as f64)],
        BLACK.stroke_width(1),
    ))?;
    root.present()?;
    Ok(())
}
