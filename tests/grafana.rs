//! The Grafana dashboard conf/grafana/kaproxy.json asks only for series that
//! kaproxy really exports: every PromQL expression in it is taken apart, and
//! each metric name it uses is looked up in the live /metrics of the real
//! binary, with the metric type behind it (a `_bucket` is a histogram's, a
//! `rate()` is over a counter, never a gauge).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/grafana/kaproxy.json");

/// PromQL functions and aggregations the dashboard may call, and keywords.
const FUNCTIONS: &[&str] = &[
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "histogram_quantile",
    "label_values",
];
const GROUPING: &[&str] = &["by", "without", "on", "ignoring"];

/// One metric name used in an expression, and whether it is the argument of
/// rate() or increase().
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Use {
    name: String,
    in_rate: bool,
}

/// Every `expr` of a panel target and every query of a template variable.
fn expressions(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::Object(q)) => {
                            if let Some(Value::String(s)) = q.get("query") {
                                out.push(s.clone());
                            }
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The metric names in one PromQL expression (or Grafana `label_values(...)`
/// query): identifiers that are neither calls, keywords, label names in a
/// grouping clause, nor anything inside `{...}` matchers, `[...]` ranges or strings.
fn metric_names(expr: &str) -> Vec<Use> {
    // Blank out strings, matchers and ranges, keeping the rest in place.
    let mut plain = String::new();
    let (mut depth_brace, mut depth_bracket, mut in_str, mut escaped) = (0, 0, false, false);
    for c in expr.chars() {
        if in_str {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => escaped = false,
            }
            plain.push(' ');
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => {
                plain.push(c);
                continue;
            }
        }
        plain.push(' ');
    }
    assert!(
        !in_str && depth_brace == 0 && depth_bracket == 0,
        "unbalanced expression: {expr}"
    );

    let chars: Vec<char> = plain.chars().collect();
    let mut uses = Vec::new();
    let mut i = 0;
    let mut rate_pending = false;
    let mut label_values_pending = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':' | '$'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j] == ' ' {
                j += 1;
            }
            let rest: String = chars[j..].iter().collect();
            // `sum by (route) (...)`: an aggregation with its grouping first.
            let grouped = ["by ", "by(", "without ", "without("]
                .iter()
                .any(|g| rest.starts_with(g));
            let is_call = chars.get(j) == Some(&'(') || grouped;
            if word.starts_with('$') {
                // A Grafana variable outside matchers.
            } else if GROUPING.contains(&word.as_str()) {
                // Skip the label list that follows.
                assert!(is_call, "{word} without a label list in: {expr}");
                let close = chars[j..]
                    .iter()
                    .position(|&c| c == ')')
                    .expect("grouping list closes");
                i = j + close + 1;
            } else if is_call {
                assert!(
                    FUNCTIONS.contains(&word.as_str()),
                    "unexpected function {word}( in: {expr}"
                );
                rate_pending = matches!(word.as_str(), "rate" | "increase");
                label_values_pending = word == "label_values";
            } else {
                uses.push(Use {
                    name: word,
                    in_rate: rate_pending,
                });
                rate_pending = false;
                if label_values_pending {
                    // label_values(metric, label): the rest is a label name.
                    break;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    uses
}

/// Sample name → (family, type) from the exposition's `# TYPE` lines and samples.
fn exported(text: &str) -> BTreeMap<String, (String, String)> {
    let types: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((parts.next()?, parts.next()?))
        })
        .collect();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        // The family is the sample name less the suffix its type adds.
        let family = ["_bucket", "_sum", "_count", "_total", "_info", ""]
            .iter()
            .find_map(|suffix| {
                let f = name.strip_suffix(suffix)?;
                let t = *types.get(f)?;
                let fits = match *suffix {
                    "_bucket" | "_sum" | "_count" => t == "histogram",
                    "_total" => t == "counter",
                    "_info" => t == "info",
                    _ => t == "gauge",
                };
                fits.then(|| (f.to_string(), t.to_string()))
            });
        let family = family.unwrap_or_else(|| panic!("sample {name} has no matching # TYPE"));
        out.insert(name.to_string(), family);
    }
    out
}

#[test]
fn expression_parser_finds_metric_names_and_rate_arguments() {
    let uses = metric_names(
        r#"histogram_quantile(0.9, sum by (side, le) (rate(kaproxy_x_bucket{route=~"$route", a="}"}[$__rate_interval]))) / on (side) kaproxy_y"#,
    );
    assert_eq!(
        uses,
        vec![
            Use {
                name: "kaproxy_x_bucket".into(),
                in_rate: true
            },
            Use {
                name: "kaproxy_y".into(),
                in_rate: false
            }
        ]
    );
    assert_eq!(
        metric_names(r#"label_values(kaproxy_z{instance=~"$instance"}, route)"#),
        vec![Use {
            name: "kaproxy_z".into(),
            in_rate: false
        }]
    );
}

#[test]
fn dashboard_uses_only_metrics_kaproxy_exports() {
    let text = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 10, "only {} expressions found", exprs.len());
    let mut uses = BTreeSet::new();
    for e in &exprs {
        let found = metric_names(e);
        assert!(!found.is_empty(), "no metric in expression: {e}");
        uses.extend(found);
    }
    let names: BTreeSet<&str> = uses.iter().map(|u| u.name.as_str()).collect();
    // What the issue asks the dashboard to show.
    for needed in [
        "kaproxy_pairs_active",
        "kaproxy_pairs_accepted_total",
        "kaproxy_pairs_closed_total",
        "kaproxy_dead_peer_detection_seconds_bucket",
        "kaproxy_upstream_up",
        "kaproxy_bytes_total",
    ] {
        assert!(
            names.contains(needed),
            "the dashboard does not use {needed}"
        );
    }
    // The *_dead reasons stand out: an override for them.
    assert!(
        text.contains(r#""options": ".*_dead""#),
        "no field override for the *_dead close reasons"
    );

    // A config under which every series exists: a healthy server behind a
    // health check, a route whose only server refuses (a connect failure).
    let up = echo_server();
    let config = format!(
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{up}\"]\nhealth_check = {{ tcp = true, interval = \"1s\", timeout = \"1s\", rise = 1, fall = 1 }}\n[[route]]\nname = \"down\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{}\"]\nconnect_timeout = \"1s\"\n",
        dead_port()
    );
    let proxy = Proxy::start(&config);
    let mut c = connect(proxy.addr("web"));
    assert_eq!(round_trip(&mut c, b"dashboard").unwrap(), b"dashboard");
    drop(c);
    if let Ok(mut c) = std::net::TcpStream::connect(proxy.addr("down")) {
        use std::io::Read;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.read(&mut [0u8; 1]);
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    let (samples, scrape) = loop {
        let (status, scrape) = admin_get(proxy.admin(), "/metrics");
        assert_eq!(status, 200);
        let samples = exported(&scrape);
        let missing: Vec<&&str> = names
            .iter()
            .filter(|n| !samples.contains_key(**n))
            .collect();
        if missing.is_empty() {
            break (samples, scrape);
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard uses {missing:?}, not in /metrics:\n{scrape}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for u in &uses {
        let (family, kind) = &samples[&u.name];
        if u.in_rate {
            assert!(
                kind == "counter" || kind == "histogram",
                "rate()/increase() over {} ({family} is a {kind})",
                u.name
            );
        }
    }
    // histogram_quantile is fed buckets only.
    for e in exprs.iter().filter(|e| e.contains("histogram_quantile")) {
        assert!(
            metric_names(e).iter().all(|u| u.name.ends_with("_bucket")) && e.contains(" le)"),
            "histogram_quantile over something other than buckets by le: {e}"
        );
    }
    assert!(
        scrape.contains("kaproxy_upstream_up{route=\"web\""),
        "{scrape}"
    );
}
