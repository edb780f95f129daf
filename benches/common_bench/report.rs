//! Figures, their statistics (median with min–max over the runs), the table
//! printed at the end, its JSON twin, and what the machine was.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub use crate::common::num;

/// Which way a figure is better, for reading ratios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Throughput, requests/s.
    Higher,
    /// Latency, time, memory, upstream requests.
    Lower,
}

impl Better {
    fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// One measured figure: its samples (one per run) and what it compares to.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Unique key, `group/case/system`.
    pub id: String,
    /// Table section heading.
    pub group: String,
    /// Row label.
    pub name: String,
    /// Unit of the samples.
    pub unit: &'static str,
    /// Which way is better.
    pub better: Better,
    /// One value per run.
    pub samples: Vec<f64>,
    /// The id of the group's direct baseline, if any.
    pub base: Option<String>,
}

/// Median, min and max of some samples.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// The median (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

/// The statistics of `samples` (NaN for none).
pub fn stats(samples: &[f64]) -> Stats {
    if samples.is_empty() {
        return Stats {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Stats {
        median,
        min: sorted[0],
        max: sorted[n - 1],
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A performance target, checked against the figures.
#[derive(Clone, Debug)]
pub struct Target {
    /// What is asked.
    pub name: String,
    /// The goal, as text (`>= 0.9`).
    pub goal: String,
    /// The measured value (ratio or figure), if measured in this run.
    pub value: Option<f64>,
    /// Whether the goal is met.
    pub met: Option<bool>,
}

/// Every figure of the run, in the order measured.
#[derive(Default)]
pub struct Report {
    figures: Vec<Figure>,
    notes: Vec<String>,
}

impl Report {
    /// Adds a figure.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        id: impl Into<String>,
        group: impl Into<String>,
        name: impl Into<String>,
        unit: &'static str,
        better: Better,
        samples: Vec<f64>,
        base: Option<String>,
    ) {
        self.figures.push(Figure {
            id: id.into(),
            group: group.into(),
            name: name.into(),
            unit,
            better,
            samples,
            base,
        });
    }

    /// Adds a group of figures that share a unit: each row is `(key, name,
    /// samples)`, its id `{prefix}/{key}`, and its ratio is taken to the
    /// row whose key is `base`, when given.
    pub fn add_group<'a>(
        &mut self,
        group: &str,
        prefix: &str,
        unit: &'static str,
        better: Better,
        base: Option<&str>,
        rows: impl IntoIterator<Item = (&'a str, &'a str, Vec<f64>)>,
    ) {
        let base = base.map(|key| format!("{prefix}/{key}"));
        for (key, name, samples) in rows {
            self.add(
                format!("{prefix}/{key}"),
                group,
                name,
                unit,
                better,
                samples,
                base.clone(),
            );
        }
    }

    /// Adds a line to the notes printed under the table.
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    /// The figure with this id.
    pub fn get(&self, id: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.id == id)
    }

    /// Median of the figure with this id.
    pub fn median(&self, id: &str) -> Option<f64> {
        self.get(id).map(|f| stats(&f.samples).median)
    }

    /// `median(a) / median(b)`.
    pub fn ratio_of(&self, a: &str, b: &str) -> Option<f64> {
        Some(self.median(a)? / self.median(b)?)
    }

    fn ratio(&self, figure: &Figure) -> Option<f64> {
        let base = self.get(figure.base.as_deref()?)?;
        Some(stats(&figure.samples).median / stats(&base.samples).median)
    }

    /// Prints the table: median (min–max) and the ratio to the group's direct
    /// baseline.
    pub fn print_table(&self) {
        println!();
        println!(
            "{:<58} {:>10} {:>23} {:>9}",
            "figure", "median", "(min–max)", "× direct"
        );
        let mut group = "";
        for figure in &self.figures {
            if figure.group != group {
                group = &figure.group;
                println!("{group}");
            }
            let s = stats(&figure.samples);
            let ratio = self
                .ratio(figure)
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into());
            let label = format!("  {} [{}]", figure.name, figure.unit);
            println!(
                "{label:<58} {:>10} {:>23} {ratio:>9}",
                num(s.median),
                format!("({}–{})", num(s.min), num(s.max)),
            );
        }
        if !self.notes.is_empty() {
            println!();
            for note in &self.notes {
                println!("note: {note}");
            }
        }
    }

    /// The same as JSON.
    pub fn to_json(&self) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                let s = stats(&f.samples);
                json!({
                    "id": f.id,
                    "group": f.group,
                    "name": f.name,
                    "unit": f.unit,
                    "better": f.better.as_str(),
                    "median": finite(s.median),
                    "min": finite(s.min),
                    "max": finite(s.max),
                    "runs": f.samples.iter().map(|v| finite(*v)).collect::<Vec<_>>(),
                    "baseline": f.base,
                    "ratio_to_baseline": self.ratio(f).and_then(finite),
                })
            })
            .collect();
        json!({ "figures": figures, "notes": self.notes })
    }
}

/// Prints the targets and returns them as JSON.
pub fn print_targets(targets: &[Target]) -> Value {
    println!();
    println!("targets, from this run:");
    for t in targets {
        let value = t.value.map(num).unwrap_or_else(|| "not measured".into());
        let met = match t.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "-",
        };
        println!("  {:<66} {:>10}  goal {:<10} {met}", t.name, value, t.goal);
    }
    Value::Array(
        targets
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "goal": t.goal,
                    "value": t.value.and_then(finite),
                    "met": t.met,
                })
            })
            .collect(),
    )
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// What the machine was: CPU count and model, memory, kernel, peer versions.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let sha_ni = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "sha_ni"));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let run = |cmd: &str, args: &[&str]| -> String {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    json!({
        "loadavg_at_start": loadavg(),
        "nproc": nproc,
        "cpu_model": model,
        "sha_ni": sha_ni,
        "mem_total_kib": mem_kib("MemTotal:"),
        "mem_available_kib": mem_kib("MemAvailable:"),
        "kernel": kernel,
        "distribution": run("docker-registry", &["--version"]),
        "rustc": run(&std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()), &["--version"]),
        "git": run("git", &["-C", manifest_dir, "describe", "--always", "--dirty"]),
    })
}

/// `/proc/loadavg` (1, 5 and 15 minute load averages, then task counts):
/// other work on the machine skews every figure.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `target/FILE` next to the running benchmark (`target/release/deps/`), so
/// `CARGO_TARGET_DIR` is respected; `target/` of the crate otherwise.
pub fn default_out(file: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join(file)
}

/// Prints the machine description.
pub fn print_machine(machine: &Value) {
    let gib = |kib: &Value| {
        kib.as_u64()
            .map(|k| format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "machine: {} CPUs ({}{}), {} memory ({} available), kernel {}; {}; {}; oci-upstream {}",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        if machine["sha_ni"].as_bool() == Some(true) {
            ", SHA-NI"
        } else {
            ""
        },
        gib(&machine["mem_total_kib"]),
        gib(&machine["mem_available_kib"]),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["distribution"].as_str().unwrap_or("?"),
        machine["rustc"].as_str().unwrap_or("?"),
        machine["git"].as_str().unwrap_or("?"),
    );
    println!(
        "load average at start: {}",
        machine["loadavg_at_start"].as_str().unwrap_or("?")
    );
}
