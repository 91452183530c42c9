//! The benchmark's one table: every figure with the limit it is compared with (measured in the
//! same run) and the target where there is one; printed, and written as JSON.

use serde::Serialize;
use std::fmt::Write;
use std::path::Path;
use std::process::Command;

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Stable name for comparing runs, e.g. `https.c32.requests_per_sec`.
    pub key: String,
    pub label: String,
    pub value: f64,
    pub unit: &'static str,
    /// The limit of this run the figure is compared with, and value / limit.
    pub limit: Option<String>,
    pub ratio: Option<f64>,
    pub target: Option<String>,
    pub met: Option<bool>,
}

impl Figure {
    pub fn new(key: impl Into<String>, label: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Figure {
            key: key.into(),
            label: label.into(),
            value,
            unit,
            limit: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    pub fn against(mut self, limit_name: &str, limit: f64) -> Self {
        self.ratio = (limit > 0.0).then(|| self.value / limit);
        self.limit = Some(limit_name.to_owned());
        self
    }

    pub fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub memory: String,
    pub kernel: String,
    pub nginx: String,
    pub postgresql: String,
    pub rabbitmq: String,
    pub wrk: String,
}

impl Machine {
    pub fn describe(rabbitmq: &str) -> Machine {
        let proc_line = |file: &str, key: &str| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| "unknown".into())
        };
        // The first line a command prints on stdout or stderr (nginx -v uses stderr).
        let first_line = |program: &str, arg: &str| {
            Command::new(program)
                .arg(arg)
                .output()
                .map(|o| {
                    let text = [o.stdout, o.stderr].concat();
                    String::from_utf8_lossy(&text)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_else(|_| "unknown".into())
        };
        let postgres = pageviews_testbed::process::find_program(
            "postgres",
            pageviews_testbed::postgres::DEBIAN_DIRS,
            "postgresql",
        );
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu: proc_line("/proc/cpuinfo", "model name"),
            memory: proc_line("/proc/meminfo", "MemTotal"),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            nginx: first_line("nginx", "-v"),
            postgresql: postgres.map_or_else(|_| "unknown".into(), |p| first_line(&p.to_string_lossy(), "--version")),
            rabbitmq: format!("RabbitMQ {rabbitmq}"),
            wrk: first_line("wrk", "-v")
                .split(" Copyright")
                .next()
                .unwrap_or("")
                .to_owned(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: &'static str,
    pub finished_at: String,
    pub secs_per_step: u64,
    pub machine: Machine,
    pub figures: Vec<Figure>,
}

impl Report {
    /// A markdown table (readable on a terminal too).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| figure | value | vs limit of this run | target |\n|---|---:|---|---|"
        );
        for f in &self.figures {
            let value = if f.value.fract() == 0.0 || f.value.abs() >= 100.0 {
                format!("{:.0} {}", f.value, f.unit)
            } else {
                format!("{:.2} {}", f.value, f.unit)
            };
            let vs = match (&f.ratio, &f.limit) {
                (Some(r), Some(l)) => format!("{r:.2} × {l}"),
                _ => String::new(),
            };
            let target = match (&f.target, f.met) {
                (Some(t), Some(true)) => format!("{t}: met"),
                (Some(t), _) => format!("{t}: **missed**"),
                _ => String::new(),
            };
            let _ = writeln!(out, "| {} | {} | {} | {} |", f.label, value.trim_end(), vs, target);
        }
        let m = &self.machine;
        let _ = writeln!(
            out,
            "\nMachine: {} × {}, {} RAM, kernel {}; {}, {}, {}; load from {} on the same machine. {} s per step.",
            m.nproc, m.cpu, m.memory, m.kernel, m.nginx, m.postgresql, m.rabbitmq, m.wrk, self.secs_per_step
        );
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }
}
