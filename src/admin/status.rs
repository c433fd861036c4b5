//! `kaproxy status`: the admin endpoint's picture in a terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(5);
/// The admin endpoint's largest `/connections?limit=`.
const MAX_PAIRS: usize = 10_000;
/// `/connections` answers 503 while another request for it is being answered;
/// it is asked this many times, a second apart, before pair states are left out.
const BUSY_ATTEMPTS: usize = 3;

/// Fetches `path` from the admin endpoint; returns status and body.
fn get(admin: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let fail = |e: std::io::Error| {
        format!("cannot reach the admin endpoint at {admin}: {e} (is kaproxy running with [admin] listen = \"{admin}\"?)")
    };
    let mut s = TcpStream::connect_timeout(&admin, TIMEOUT).map_err(fail)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(fail)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(fail)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{admin}{path}: not an HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{admin}{path}: no status line"))?;
    // kaproxy's admin endpoint always sends a Content-Length body, never chunked.
    let body = body.to_string();
    Ok((status, body))
}

fn json(admin: SocketAddr, path: &str) -> Result<Value, String> {
    let (status, body) = get(admin, path)?;
    serde_json::from_str(&body)
        .map_err(|e| format!("{admin}{path} answered {status} with unreadable JSON: {e}"))
}

/// The `/connections` answer, or null if it stayed busy.
fn connections(admin: SocketAddr) -> Result<Value, String> {
    let path = format!("/connections?limit={MAX_PAIRS}");
    for attempt in 1..=BUSY_ATTEMPTS {
        let (status, body) = get(admin, &path)?;
        if status != 503 {
            return serde_json::from_str(&body)
                .map_err(|e| format!("{admin}{path} answered {status} with unreadable JSON: {e}"));
        }
        if attempt < BUSY_ATTEMPTS {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(Value::Null)
}

/// Renders the status view, or says why the endpoint could not be read.
pub fn render(admin: SocketAddr) -> Result<String, String> {
    let upstreams = json(admin, "/upstreams")?;
    let conns = connections(admin)?;
    let (ready_status, ready_body) = get(admin, "/readyz")?;
    let (_, metrics) = get(admin, "/metrics")?;

    let mut out = String::new();
    let ready = if ready_status == 200 {
        "ready".to_string()
    } else {
        format!("NOT READY ({})", ready_body.trim().replace('\n', " "))
    };
    let _ = writeln!(out, "kaproxy admin {admin}: {ready}");

    let mut by_route: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for p in conns["pairs"].as_array().into_iter().flatten() {
        let route = p["route"].as_str().unwrap_or("?").to_string();
        let state = p["client"]["state"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        *by_route.entry(route).or_default().entry(state).or_default() += 1;
    }
    for r in upstreams["routes"].as_array().into_iter().flatten() {
        let name = r["route"].as_str().unwrap_or("?");
        let states = by_route.get(name).cloned().unwrap_or_default();
        let total: usize = states.values().sum();
        let detail: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let limit = match r["max_connections"].as_u64() {
            Some(max) => {
                let taken = r["slots_taken"].as_u64().unwrap_or(0);
                let full = if taken >= max {
                    ", AT LIMIT: new clients wait"
                } else {
                    ""
                };
                format!("limit {max} ({taken} taken{full})")
            }
            None => "limit none".to_string(),
        };
        let _ = writeln!(
            out,
            "\nroute {name}  listen {}  balance {}  {limit}  pairs {total}{}",
            r["listen"].as_str().unwrap_or("?"),
            r["balance"].as_str().unwrap_or("?"),
            if detail.is_empty() {
                String::new()
            } else {
                format!(" (client side: {})", detail.join(", "))
            }
        );
        for s in r["servers"].as_array().into_iter().flatten() {
            let check = match s.get("last_check") {
                Some(c) => format!("  last check: {}", c["detail"].as_str().unwrap_or("")),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:<28} {:<8} active {:<5}{check}",
                s["address"].as_str().unwrap_or("?"),
                s["state"].as_str().unwrap_or("?"),
                s["active_pairs"].as_u64().unwrap_or(0),
            );
        }
    }
    if conns.is_null() {
        let _ = writeln!(
            out,
            "\n(pair states unavailable: /connections stayed busy with other requests)"
        );
    } else if conns["more"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "\n(pair states cover the first {MAX_PAIRS} pairs only)"
        );
    }

    let mut reasons: BTreeMap<String, f64> = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("kaproxy_pairs_closed_total{"))
    {
        let reason = line
            .split("reason=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *reasons.entry(reason.to_string()).or_default() += value;
    }
    // Every reason's series exists from the start; the ones still at zero say nothing.
    let list: Vec<String> = reasons
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "\nclosed so far: {}",
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        }
    );
    Ok(out)
}

/// Where to reach an address this process's kaproxy listens on, from the same
/// host (or container): an unspecified IP means loopback.
fn local_target(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// `kaproxy healthcheck`: asks the admin endpoint's `/healthz` when the admin
/// endpoint is on, else checks that every route's listener accepts a connection.
/// Needs no shell tools, so a container image can use it as its HEALTHCHECK.
pub fn healthcheck(config: &crate::config::Config) -> Result<String, String> {
    if let Some(admin) = config.admin {
        if admin.port() == 0 {
            return Err("the admin endpoint listens on port 0, whose real port only its log tells; give it a fixed port to health-check it".to_string());
        }
        let target = local_target(admin);
        let (status, body) = get(target, "/healthz")?;
        return if status == 200 {
            Ok(format!("healthy: {target}/healthz answered {status}"))
        } else {
            Err(format!(
                "unhealthy: {target}/healthz answered {status}: {}",
                body.trim()
            ))
        };
    }
    let mut checked = Vec::new();
    for route in &config.routes {
        if route.listen.port() == 0 {
            return Err(format!("route \"{}\" listens on port 0, which cannot be checked without the admin endpoint", route.name));
        }
        let target = local_target(route.listen);
        TcpStream::connect_timeout(&target, TIMEOUT).map_err(|e| {
            format!(
                "unhealthy: route \"{}\" does not accept connections on {target}: {e}",
                route.name
            )
        })?;
        checked.push(format!("{} on {target}", route.name));
    }
    Ok(format!("healthy: accepting on {}", checked.join(", ")))
}
