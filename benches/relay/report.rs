//! The table: one row per measure, a column per target, each proxy's figure followed by its
//! ratio to HAProxy's, then kaproxy's ratios to direct and to the baseline.

use crate::procs::Spec;

pub struct Measure {
    title: String,
    unit: &'static str,
    scale: f64,
    decimals: usize,
    values: Vec<(&'static str, Result<f64, String>)>,
}

impl Measure {
    /// Figures are divided by `scale` for display.
    pub fn new(title: &str, unit: &'static str, scale: f64, decimals: usize) -> Measure {
        Measure {
            title: title.to_string(),
            unit,
            scale,
            decimals,
            values: Vec::new(),
        }
    }

    /// Takes figure `i` of every target's medians; NaN (no figure for that target) is left out.
    pub fn values(
        mut self,
        results: &[(&'static str, Result<Vec<f64>, String>)],
        i: usize,
    ) -> Self {
        for (name, r) in results {
            let v = r.as_ref().map(|v| v[i]).map_err(Clone::clone);
            if !matches!(v, Ok(x) if x.is_nan()) {
                self.values.push((name, v));
            }
        }
        self
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_ref().ok().copied())
    }
}

pub struct Report {
    columns: Vec<&'static str>,
    rows: Vec<Measure>,
}

const TITLE: usize = 54;
const CELL: usize = 17;

impl Report {
    pub fn new(specs: &[Spec]) -> Report {
        let columns = std::iter::once("direct")
            .chain(specs.iter().map(Spec::name))
            .collect();
        Report {
            columns,
            rows: Vec::new(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.columns.contains(&name)
    }

    pub fn header(&self) {
        if self.has("haproxy") {
            println!("(x.xx) after a proxy's figure: its ratio to HAProxy's");
        }
        let mut line = format!("{:<TITLE$} {:<6}", "measure", "unit");
        for c in &self.columns {
            line += &format!("{c:>CELL$}");
        }
        line += &format!("{:>CELL$}", "kaproxy÷direct");
        if self.has("baseline") {
            line += &format!("{:>CELL$}", "kaproxy÷baseline");
        }
        println!("{line}");
    }

    pub fn row(&mut self, m: Measure) {
        let haproxy = m.get("haproxy");
        let mut line = format!("{:<TITLE$} {:<6}", m.title, m.unit);
        for c in &self.columns {
            let cell = match m.values.iter().find(|(n, _)| n == c) {
                None => "-".to_string(),
                Some((_, Err(_))) => "failed".to_string(),
                Some((_, Ok(v))) => {
                    let mut s = format!("{:.*}", m.decimals, v / m.scale);
                    if let (Some(h), true) = (haproxy, *c != "direct") {
                        s += &format!(" ({:.2})", v / h);
                    }
                    s
                }
            };
            line += &format!("{cell:>CELL$}");
        }
        let ratio = |other: &str| match (m.get("kaproxy"), m.get(other)) {
            (Some(k), Some(o)) => format!("{:.2}", k / o),
            _ => "-".to_string(),
        };
        line += &format!("{:>CELL$}", ratio("direct"));
        if self.has("baseline") {
            line += &format!("{:>CELL$}", ratio("baseline"));
        }
        println!("{line}");
        for (name, v) in &m.values {
            if let Err(e) = v {
                println!("    {name} failed: {e}");
            }
        }
        self.rows.push(m);
    }

    pub fn note(&mut self, text: String) {
        println!("    note: {text}");
    }

    pub fn skip(&mut self, part: &str, why: &str) {
        println!("    skipped {part}: {why}");
    }

    fn ratio(&self, title: &str, a: &str, b: &str) -> Option<f64> {
        let m = self.rows.iter().find(|m| m.title.starts_with(title))?;
        Some(m.get(a)? / m.get(b)?)
    }

    /// The goals of issue 9 (and the earlier ones still open), from this run's figures.
    pub fn targets(&self, idle_pair: Option<f64>) {
        let check = |goal: &str, r: Option<f64>, ok: fn(f64) -> bool| match r {
            Some(r) => println!(
                "target: {goal}: {} ({r:.2})",
                if ok(r) { "met" } else { "MISSED" }
            ),
            None => println!("target: {goal}: not measured"),
        };
        check(
            "new connections/s >= 1.1 x HAProxy",
            self.ratio("new connections/s", "kaproxy", "haproxy"),
            |r| r >= 1.1,
        );
        check(
            "CPU per connection <= HAProxy",
            self.ratio("proxy CPU per connection", "kaproxy", "haproxy"),
            |r| r <= 1.0,
        );
        check(
            "keep-alive requests/s >= 1.17 x HAProxy (issue 9's starting point)",
            self.ratio("keep-alive requests/s", "kaproxy", "haproxy"),
            |r| r >= 1.17,
        );
        check(
            "iperf3 single-stream throughput >= 0.99 x HAProxy (issue 9's starting point)",
            self.ratio("single-stream throughput (iperf3", "kaproxy", "haproxy"),
            |r| r >= 0.99,
        );
        check(
            "iperf3 single-stream throughput >= 80% of direct",
            self.ratio("single-stream throughput (iperf3", "kaproxy", "direct"),
            |r| r >= 0.8,
        );
        check(
            "idle pair < 2 KiB (bytes / 2048)",
            idle_pair.map(|b| b / 2048.0),
            |r| r < 1.0,
        );
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
