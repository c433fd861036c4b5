//! Side-by-side benchmark, one run, ratios: the same traffic direct, through kaproxy (release
//! build), through an older kaproxy when asked, and through HAProxy and nginx `stream` when
//! installed, alternating target by target, medians of 3 runs.
//!
//! - new connections/s and proxy CPU per connection: wrk, `Connection: close`, to nginx;
//! - keep-alive requests/s (and CPU per request): wrk to the same nginx;
//! - single-stream throughput: iperf3 client to iperf3 server, and this process's own
//!   sender and sink;
//! - 64-byte round trips against an echo server, 1 and 16 connections;
//! - resident memory per idle pair;
//! - TLS termination against HAProxy's `ssl` (same ECDSA P-256 certificate): full handshakes
//!   per second, bulk throughput, memory per idle TLS pair (tls.rs).
//!
//! Run with `cargo bench --bench relay`; `cargo test --benches` runs it as a smoke with tiny
//! sizes. Missing tools (wrk, iperf3, nginx, haproxy) skip what needs them, with the reason.
//! Every loop is bounded in count and in time; every child is killed when its part ends.
//!
//! Environment knobs (all optional):
//! - KAPROXY_BENCH_ONLY: comma-separated parts among connrate, keepalive, throughput, rt, idle, tls;
//! - KAPROXY_BENCH_BASELINE: path of another kaproxy binary, run side by side as "baseline";
//! - KAPROXY_BENCH_SECS: seconds per wrk and iperf3 run (default 5);
//! - KAPROXY_BENCH_CONNS: wrk connections (default 64);
//! - KAPROXY_BENCH_BYTES: bytes per in-process bulk run (default 1 GiB);
//! - KAPROXY_BENCH_ROUNDS: round trips per run (default 20000);
//! - KAPROXY_BENCH_IDLE_PAIRS: idle pairs (default 7500; fewer when RLIMIT_NOFILE is lower);
//! - KAPROXY_BENCH_TLS_PAIRS: idle TLS pairs (default 2000).

mod inproc;
mod procs;
mod report;
mod tls;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;

use procs::{Proc, Running, Spec, Traffic};
use report::{Measure, Report};

const PARTS: [&str; 6] = ["connrate", "keepalive", "throughput", "rt", "idle", "tls"];

/// The body nginx serves for the HTTP parts: small, so that the proxy's per-connection and
/// per-request work dominates, not the copying.
const SMALL_FILE: &[u8] = &[b'k'; 128];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Opts {
    full: bool,
    runs: usize,
    only: Vec<String>,
    secs: u64,
    conns: usize,
    bytes: usize,
    rounds: usize,
    pairs: usize,
}

impl Opts {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// What one measurement connects to: the server itself, or a proxy in front of it.
struct Target<'a> {
    name: &'static str,
    addr: SocketAddr,
    proc: Option<&'a Proc>,
}

/// Runs `f` `runs` times on every target, one target after the other within each round, and
/// returns per target the median of each figure `f` returns, or the first error it met.
fn alternate(
    targets: &[Target],
    runs: usize,
    mut f: impl FnMut(&Target) -> Result<Vec<f64>, String>,
) -> Vec<(&'static str, Result<Vec<f64>, String>)> {
    let mut samples: Vec<Result<Vec<Vec<f64>>, String>> =
        targets.iter().map(|_| Ok(Vec::new())).collect();
    for _ in 0..runs {
        for (t, s) in targets.iter().zip(samples.iter_mut()) {
            if let Ok(runs) = s {
                match f(t) {
                    Ok(v) => runs.push(v),
                    Err(e) => *s = Err(e),
                }
            }
        }
    }
    targets
        .iter()
        .zip(samples)
        .map(|(t, s)| {
            let medians = s.map(|runs| {
                let width = runs.first().map_or(0, Vec::len);
                (0..width)
                    .map(|i| median(runs.iter().map(|r| r[i]).collect()))
                    .collect()
            });
            (t.name, medians)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Starts every proxy in front of `upstream`; the ones that fail are reported and left out.
fn start_all(
    specs: &[Spec],
    upstream: SocketAddr,
    traffic: Traffic,
    report: &mut Report,
) -> Vec<Running> {
    specs
        .iter()
        .filter_map(|s| match s.start(upstream, 0, traffic) {
            Ok(r) => Some(r),
            Err(e) => {
                report.note(format!("{} did not start: {e}", s.name()));
                None
            }
        })
        .collect()
}

fn targets<'a>(direct: Option<SocketAddr>, proxies: &'a [Running]) -> Vec<Target<'a>> {
    direct
        .map(|addr| Target {
            name: "direct",
            addr,
            proc: None,
        })
        .into_iter()
        .chain(proxies.iter().map(|p| Target {
            name: p.name,
            addr: p.addr,
            proc: Some(&p.proc),
        }))
        .collect()
}

fn cpu(t: &Target) -> f64 {
    t.proc.map_or(f64::NAN, Proc::cpu_seconds)
}

/// wrk through every target to nginx: rate, proxy CPU µs per request, errors.
fn http(opts: &Opts, specs: &[Spec], report: &mut Report) {
    let (Some(wrk), nginx) = (procs::which("wrk"), procs::Nginx::find()) else {
        report.skip(
            "connrate, keepalive",
            "wrk not installed (apt-get install wrk)",
        );
        return;
    };
    let nginx = match nginx.and_then(|n| n.start_http(SMALL_FILE)) {
        Ok(n) => n,
        Err(e) => {
            report.skip("connrate, keepalive", &format!("nginx HTTP server: {e}"));
            return;
        }
    };
    let proxies = start_all(specs, nginx.addr, Traffic::Messages, report);
    let targets = targets(Some(nginx.addr), &proxies);
    let conns = opts.conns;
    for (part, close) in [("connrate", true), ("keepalive", false)] {
        if !opts.wants(part) {
            continue;
        }
        let mut errors = Vec::new();
        let results = alternate(&targets, opts.runs, |t| {
            let url = format!("http://{}/small", t.addr);
            let before = cpu(t);
            let run = tools::wrk(&wrk, &url, conns, opts.secs, close)?;
            let used = cpu(t) - before;
            if run.errors > 0 {
                errors.push(format!("{}: {} wrk errors", t.name, run.errors));
            }
            Ok(vec![run.rate(), used * 1e6 / run.requests.max(1) as f64])
        });
        let (what, per) = if close {
            (
                format!("new connections/s (wrk -c{conns}, Connection: close)"),
                "CPU per connection",
            )
        } else {
            (
                format!("keep-alive requests/s (wrk -c{conns})"),
                "CPU per request",
            )
        };
        report.row(Measure::new(&what, "k/s", 1e3, 1).values(&results, 0));
        report.row(Measure::new(&format!("proxy {per}"), "µs", 1.0, 1).values(&results, 1));
        for e in errors {
            report.note(e);
        }
    }
}

/// iperf3, one stream, through every target; then this process's own sender and sink.
fn throughput(opts: &Opts, specs: &[Spec], report: &mut Report) {
    const MIB: f64 = 1024.0 * 1024.0;
    match procs::which("iperf3") {
        None => report.skip(
            "throughput (iperf3)",
            "iperf3 not installed (apt-get install iperf3)",
        ),
        Some(bin) => match procs::start_iperf3_server(&bin) {
            Err(e) => report.skip("throughput (iperf3)", &e),
            Ok(server) => {
                let proxies = start_all(specs, server.addr, Traffic::Bulk, report);
                let targets = targets(Some(server.addr), &proxies);
                let results = alternate(&targets, opts.runs, |t| {
                    Ok(vec![tools::iperf3(&bin, t.addr, opts.secs)?])
                });
                let what = format!("single-stream throughput (iperf3 -t {})", opts.secs);
                report.row(Measure::new(&what, "MiB/s", MIB, 0).values(&results, 0));
            }
        },
    }
    let (sink, done) = inproc::sink();
    let proxies = start_all(specs, sink, Traffic::Bulk, report);
    let targets = targets(Some(sink), &proxies);
    let results = alternate(&targets, opts.runs, |t| {
        Ok(vec![inproc::bulk(t.addr, &done, opts.bytes)?])
    });
    let what = format!(
        "single-stream throughput (in-process, {} MiB)",
        opts.bytes >> 20
    );
    report.row(Measure::new(&what, "MiB/s", MIB, 0).values(&results, 0));
}

fn round_trips(opts: &Opts, specs: &[Spec], report: &mut Report) {
    let echo = inproc::echo();
    let proxies = start_all(specs, echo, Traffic::Messages, report);
    let targets = targets(Some(echo), &proxies);
    for conns in [1usize, 16] {
        let results = alternate(&targets, opts.runs, |t| {
            Ok(vec![inproc::round_trips(t.addr, conns, opts.rounds)?])
        });
        let what = format!("64 B round trips/s, {conns} conn(s)");
        report.row(Measure::new(&what, "k/s", 1e3, 1).values(&results, 0));
    }
}

fn idle(opts: &Opts, specs: &[Spec], report: &mut Report) -> Option<f64> {
    // The proxy holds two descriptors per pair, this process one and the echo process one.
    let limit = inproc::raise_nofile(2 * opts.pairs as u64 + 256);
    let n = opts
        .pairs
        .min((limit as usize).saturating_sub(256) / 2 / 100 * 100);
    if n < opts.pairs {
        report.note(format!(
            "the hard RLIMIT_NOFILE here is {limit} and cannot be raised (no CAP_SYS_RESOURCE): {n} idle pairs instead of {}",
            opts.pairs
        ));
    }
    // One after the other, not alternating: each holds every descriptor the limit allows.
    let results: Vec<_> = specs
        .iter()
        .map(|s| (s.name(), inproc::idle_pairs(s, n).map(|(per, _)| vec![per])))
        .collect();
    let kaproxy = results.iter().find(|(name, _)| *name == "kaproxy");
    let per_pair = kaproxy.and_then(|(_, r)| r.as_ref().ok().map(|v| v[0]));
    let what = format!("RSS per idle pair, {n} pairs, one run");
    report.row(Measure::new(&what, "bytes", 1.0, 0).values(&results, 0));
    per_pair
}

fn main() {
    if std::env::var_os(inproc::ECHO_ROLE).is_some() {
        return inproc::echo_process_main();
    }
    // `cargo bench` passes --bench. Without it (`cargo test --benches`) this is a smoke run
    // with small sizes that only shows the benchmark still works.
    let full = std::env::args().any(|a| a == "--bench");
    let only: Vec<String> = std::env::var("KAPROXY_BENCH_ONLY")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = only.iter().find(|p| !PARTS.contains(&p.as_str())) {
        eprintln!("KAPROXY_BENCH_ONLY: unknown part {bad:?}; the parts are {PARTS:?}");
        std::process::exit(2);
    }
    let opts = Opts {
        full,
        runs: if full { 3 } else { 1 },
        only,
        secs: env_usize("KAPROXY_BENCH_SECS", if full { 5 } else { 1 }) as u64,
        conns: env_usize("KAPROXY_BENCH_CONNS", 64),
        bytes: env_usize("KAPROXY_BENCH_BYTES", if full { 1 << 30 } else { 8 << 20 }),
        rounds: env_usize("KAPROXY_BENCH_ROUNDS", if full { 20_000 } else { 320 }),
        pairs: env_usize("KAPROXY_BENCH_IDLE_PAIRS", if full { 7_500 } else { 200 }),
    };
    tools::self_check();
    let baseline = std::env::var_os("KAPROXY_BENCH_BASELINE").map(PathBuf::from);
    let (specs, skipped) = procs::specs(baseline);
    println!(
        "kaproxy relay benchmark: {} alternating run(s) per target, medians; {} s per wrk/iperf3 run",
        opts.runs, opts.secs
    );
    println!("load average at start: {}", report::loadavg());
    let mut report = Report::new(&specs);
    for s in skipped {
        report.note(format!("left out: {s}"));
    }
    report.header();

    if opts.wants("connrate") || opts.wants("keepalive") {
        http(&opts, &specs, &mut report);
    }
    if opts.wants("throughput") {
        throughput(&opts, &specs, &mut report);
    }
    if opts.wants("rt") {
        round_trips(&opts, &specs, &mut report);
    }
    let per_pair = if opts.wants("idle") {
        idle(&opts, &specs, &mut report)
    } else {
        None
    };
    if opts.wants("tls") {
        let tls_opts = tls::TlsOpts {
            runs: opts.runs,
            secs: opts.secs,
            bytes: opts.bytes.min(if opts.full { 512 << 20 } else { 8 << 20 }),
            pairs: env_usize(
                "KAPROXY_BENCH_TLS_PAIRS",
                if opts.full { 2_000 } else { 50 },
            ),
        };
        tls::run(&tls_opts, &specs, &mut report);
    }
    println!("load average at end: {}", report::loadavg());

    println!();
    if !opts.full {
        println!("smoke run (no --bench): sizes too small for the figures to mean anything; use cargo bench --bench relay");
        return;
    }
    report.targets(per_pair);
}
