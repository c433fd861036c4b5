//! The neutral senders and sinks: wrk for HTTP connections and requests, iperf3 for one bulk
//! stream. Each run is a child process bounded in time and killed when it overstays.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Runs `cmd` to completion within `limit`; returns (stdout, stderr) when it exits with 0.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(String, String), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    // Read on threads: a child blocked on a full pipe would never exit.
    let read = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped stdout")));
    let err = read(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{:?} did not finish within {limit:?}",
                    cmd.get_program()
                ));
            }
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if status.success() {
        Ok((out, err))
    } else {
        Err(format!(
            "{:?} failed ({status}): {}",
            cmd.get_program(),
            err.trim()
        ))
    }
}

/// What one wrk run did.
pub struct WrkRun {
    /// Complete responses received.
    pub requests: u64,
    /// wrk's own measured duration.
    pub secs: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx responses.
    pub errors: u64,
}

impl WrkRun {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }
}

/// `conns` connections for `secs` seconds on two threads; with `close`, every request carries
/// `Connection: close`, so each one is a new TCP connection through the proxy.
pub fn wrk(bin: &Path, url: &str, conns: usize, secs: u64, close: bool) -> Result<WrkRun, String> {
    let mut cmd = Command::new(bin);
    cmd.arg(format!("-t{}", conns.min(2)))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .args(["--timeout", "5s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url);
    let (out, _) = run_bounded(&mut cmd, Duration::from_secs(secs + 30))?;
    parse_wrk(&out).ok_or_else(|| format!("unreadable wrk output: {out}"))
}

fn parse_wrk(out: &str) -> Option<WrkRun> {
    // "  140310 requests in 5.00s, 40.01MB read"
    let line = out.lines().find(|l| l.contains(" requests in "))?;
    let mut words = line.split_whitespace();
    let requests = words.next()?.parse().ok()?;
    let secs = parse_duration(words.nth(2)?.trim_end_matches(','))?;
    let mut errors = 0;
    for l in out.lines().map(str::trim) {
        // "Socket errors: connect 0, read 3, write 0, timeout 0"
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(n) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += n.trim().parse::<u64>().ok()?;
        }
    }
    Some(WrkRun {
        requests,
        secs,
        errors,
    })
}

/// wrk's durations: "812.50us", "5.00s", "1.00m".
fn parse_duration(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(n * scale)
}

/// One iperf3 stream of `secs` seconds to `target` (the iperf3 server, or a proxy in front
/// of it); returns the bytes per second the server received.
pub fn iperf3(bin: &Path, target: SocketAddr, secs: u64) -> Result<f64, String> {
    let (out, _) = run_bounded(
        Command::new(bin)
            .args([
                "-c",
                &target.ip().to_string(),
                "-p",
                &target.port().to_string(),
            ])
            .args(["-t", &secs.to_string(), "-J", "--connect-timeout", "5000"]),
        Duration::from_secs(secs + 30),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("unreadable iperf3 output: {e}"))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bits| bits / 8.0)
        .ok_or_else(|| "iperf3 output has no end.sum_received".into())
}

/// Checked in the smoke run, where wrk may be missing: the parser must not depend on it.
pub fn self_check() {
    let out = "Running 5s test @ http://127.0.0.1:1/small\n  2 threads and 64 connections\n  \
               140310 requests in 5.00s, 40.01MB read\n  Socket errors: connect 0, read 3, write 1, timeout 0\n\
               Non-2xx or 3xx responses: 2\nRequests/sec:  28062.00\n";
    let r = parse_wrk(out).expect("wrk output parsed");
    assert_eq!(
        (r.requests, r.secs, r.errors),
        (140_310, 5.0, 6),
        "wrk parser"
    );
    assert_eq!(parse_duration("812.50us"), Some(812.5e-6));
}
