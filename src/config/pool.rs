//! The upstream pool settings: servers (with weights), balance, retries,
//! active health checks and passive ejection, each checked on its own, then
//! merged route over `[defaults]` over the built-in values.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawEjection, RawHealthCheck, SStr};
use super::source::{positive_duration, Ctx};
use super::{
    Balance, ConfigError, Ejection, HealthCheck, HealthKind, Server, ServerAddr, StatusMatch,
    DEFAULT_EJECTION,
};

/// Pool settings as found at one level.
#[derive(Default, Clone)]
pub(super) struct PoolLayer {
    balance: Option<Balance>,
    retries: Option<u32>,
    health: HealthLayer,
    ejection: EjectionLayer,
}

/// Health check fields as found at one level. `kind`: `Some(None)` is an
/// explicit `tcp = false` without `http`, i.e. checks turned off.
#[derive(Default, Clone)]
pub(super) struct HealthLayer {
    kind: Option<Option<KindLayer>>,
    expect: Option<StatusMatch>,
    host: Option<String>,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
}

#[derive(Clone)]
pub(super) enum KindLayer {
    Tcp,
    Http(String),
}

#[derive(Default, Clone, Copy)]
pub(super) struct EjectionLayer {
    failures: Option<u32>,
    backoff: Option<Duration>,
    max_backoff: Option<Duration>,
    /// Line of the table, for the one cross-field check made after merging.
    line_span: Option<usize>,
}

/// Built-in health check timing: every 5 s, 1 s timeout, up after 2, down after 3.
pub(super) const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);

pub(super) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) const DEFAULT_RISE: u32 = 2;

pub(super) const DEFAULT_FALL: u32 = 3;

pub(super) const MAX_WEIGHT: i64 = 1000;

pub(super) const MAX_RETRIES: i64 = 100;

pub(super) const MAX_RISE_FALL: i64 = 1000;

/// One `servers` entry: `"host:port"` or `{ address = "host:port", weight = N }`.
pub(super) fn server_entry(
    ctx: &Ctx<'_>,
    v: &Spanned<toml::Value>,
    field: &str,
) -> Result<Server, ConfigError> {
    const HINT: &str = "write each server as \"host:port\" (e.g. \"tomcat-1:8080\", \"[::1]:8080\") or { address = \"host:port\", weight = 3 }";
    let span = v.span();
    let (address, weight) = match v.get_ref() {
        toml::Value::String(a) => (a.clone(), 1),
        toml::Value::Table(t) => {
            if let Some(k) = t
                .keys()
                .find(|k| !matches!(k.as_str(), "address" | "weight"))
            {
                return ctx.err(
                    span,
                    field,
                    format!("unknown key `{k}` in a server entry"),
                    HINT,
                );
            }
            let address = match t.get("address") {
                Some(toml::Value::String(a)) => a.clone(),
                Some(_) => return ctx.err(span, field, "address must be a string", HINT),
                None => return ctx.err(span, field, "a server table needs an address", HINT),
            };
            let weight = match t.get("weight") {
                None => 1,
                Some(toml::Value::Integer(w)) if (1..=MAX_WEIGHT).contains(w) => *w as u32,
                Some(w) => return ctx.err(span, &format!("{field}.weight"), format!("weight {w} is out of range"), format!("use a whole number from 1 to {MAX_WEIGHT}; a server with weight 3 gets three times the connections of one with weight 1")),
            };
            (address, weight)
        }
        other => {
            return ctx.err(
                span,
                field,
                format!("{} is not a server", other.type_str()),
                HINT,
            )
        }
    };
    match parse_server(&address) {
        Ok(addr) => Ok(Server { addr, weight }),
        Err(problem) => ctx.err(span, field, problem, HINT),
    }
}

pub(super) fn count(
    ctx: &Ctx<'_>,
    v: &Spanned<i64>,
    field: &str,
    range: std::ops::RangeInclusive<i64>,
    hint: &str,
) -> Result<u32, ConfigError> {
    let n = *v.get_ref();
    if range.contains(&n) {
        Ok(n as u32)
    } else {
        ctx.err(
            v.span(),
            field,
            format!("{n} is out of range"),
            format!(
                "use a whole number from {} to {}; {hint}",
                range.start(),
                range.end()
            ),
        )
    }
}

pub(super) fn pool_layer(
    ctx: &Ctx<'_>,
    balance: Option<&SStr>,
    retries: Option<&Spanned<i64>>,
    health: Option<&RawHealthCheck>,
    ejection: Option<&RawEjection>,
    prefix: &str,
) -> Result<PoolLayer, ConfigError> {
    let balance =
        match balance {
            Some(b) => Some(match b.get_ref().trim() {
                "round-robin" => Balance::RoundRobin,
                "least-connections" => Balance::LeastConnections,
                "random" => Balance::Random,
                "first" => Balance::First,
                other => return ctx.err(
                    b.span(),
                    &format!("{prefix}.balance"),
                    format!("{other:?} is not a balance mode"),
                    "use \"round-robin\" (default), \"least-connections\", \"random\" or \"first\"",
                ),
            }),
            None => None,
        };
    let retries = retries
        .map(|r| {
            count(
                ctx,
                r,
                &format!("{prefix}.retries"),
                0..=MAX_RETRIES,
                "leave it out to try every server once",
            )
        })
        .transpose()?;
    let health = match health {
        Some(h) => health_layer(ctx, h, &format!("{prefix}.health_check"))?,
        None => HealthLayer::default(),
    };
    let ejection = match ejection {
        Some(e) => {
            let f = format!("{prefix}.passive_ejection");
            EjectionLayer {
                failures: e
                    .failures
                    .as_ref()
                    .map(|n| {
                        count(
                            ctx,
                            n,
                            &format!("{f}.failures"),
                            0..=MAX_RISE_FALL,
                            "0 turns passive ejection off",
                        )
                    })
                    .transpose()?,
                backoff: e
                    .backoff
                    .as_ref()
                    .map(|d| positive_duration(ctx, d, &format!("{f}.backoff")))
                    .transpose()?,
                max_backoff: e
                    .max_backoff
                    .as_ref()
                    .map(|d| positive_duration(ctx, d, &format!("{f}.max_backoff")))
                    .transpose()?,
                line_span: e
                    .max_backoff
                    .as_ref()
                    .or(e.backoff.as_ref())
                    .map(|d| d.span().start),
            }
        }
        None => EjectionLayer::default(),
    };
    if let (Some(b), Some(m), Some(at)) =
        (ejection.backoff, ejection.max_backoff, ejection.line_span)
    {
        if m < b {
            return ejection_order_error(ctx, at, prefix, b, m);
        }
    }
    Ok(PoolLayer {
        balance,
        retries,
        health,
        ejection,
    })
}

pub(super) fn health_layer(
    ctx: &Ctx<'_>,
    h: &RawHealthCheck,
    f: &str,
) -> Result<HealthLayer, ConfigError> {
    let kind = match (&h.tcp, &h.http) {
        (Some(t), Some(_)) if *t.get_ref() => {
            return ctx.err(
                t.span(),
                &format!("{f}.tcp"),
                "a health check is either tcp or http, not both",
                "keep tcp = true (connect only) or http = \"/path\"",
            )
        }
        (_, Some(p)) => {
            let path = p.get_ref().trim();
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return ctx.err(
                    p.span(),
                    &format!("{f}.http"),
                    format!("{path:?} is not a request path"),
                    "write a path starting with '/', e.g. \"/health\"",
                );
            }
            Some(Some(KindLayer::Http(path.to_string())))
        }
        (Some(t), None) => Some(t.get_ref().then_some(KindLayer::Tcp)),
        (None, None) => None,
    };
    let expect = match &h.expect {
        Some(e) => match parse_status_match(e.get_ref()) {
            Ok(m) => Some(m),
            Err(problem) => return ctx.err(
                e.span(),
                &format!("{f}.expect"),
                problem,
                "use status classes or codes, e.g. \"2xx\", \"200\", \"200-399\" or \"2xx,301\"",
            ),
        },
        None => None,
    };
    let host = match &h.host {
        Some(v) => {
            let host = v.get_ref().trim();
            if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return ctx.err(v.span(), &format!("{f}.host"), format!("{host:?} is not a usable Host header"), "write a host name, e.g. \"app.example.com\", or leave it out to send the server's own host:port");
            }
            Some(host.to_string())
        }
        None => None,
    };
    Ok(HealthLayer {
        kind,
        expect,
        host,
        interval: h
            .interval
            .as_ref()
            .map(|d| positive_duration(ctx, d, &format!("{f}.interval")))
            .transpose()?,
        timeout: h
            .timeout
            .as_ref()
            .map(|d| positive_duration(ctx, d, &format!("{f}.timeout")))
            .transpose()?,
        rise: h
            .rise
            .as_ref()
            .map(|n| {
                count(
                    ctx,
                    n,
                    &format!("{f}.rise"),
                    1..=MAX_RISE_FALL,
                    "consecutive passes that bring a server up",
                )
            })
            .transpose()?,
        fall: h
            .fall
            .as_ref()
            .map(|n| {
                count(
                    ctx,
                    n,
                    &format!("{f}.fall"),
                    1..=MAX_RISE_FALL,
                    "consecutive failures that take a server down",
                )
            })
            .transpose()?,
    })
}

/// Parses "2xx", "200", "200-399", or a comma-separated list of those.
pub(super) fn parse_status_match(text: &str) -> Result<StatusMatch, String> {
    let mut ranges = Vec::new();
    for part in text.split(',').map(str::trim) {
        let range = if let Some(class) = part.strip_suffix("xx") {
            match class.parse::<u16>() {
                Ok(c) if (1..=5).contains(&c) => (c * 100, c * 100 + 99),
                _ => return Err(format!("{part:?} is not a status class (1xx to 5xx)")),
            }
        } else if let Some((lo, hi)) = part.split_once('-') {
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) if (100..=599).contains(&lo) && (lo..=599).contains(&hi) => {
                    (lo, hi)
                }
                _ => return Err(format!("{part:?} is not a status range such as 200-399")),
            }
        } else {
            match part.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => (c, c),
                _ => return Err(format!("{part:?} is not an HTTP status")),
            }
        };
        ranges.push(range);
    }
    Ok(StatusMatch {
        ranges,
        text: text.trim().to_string(),
    })
}

pub(super) fn ejection_order_error<T>(
    ctx: &Ctx<'_>,
    at: usize,
    prefix: &str,
    backoff: Duration,
    max: Duration,
) -> Result<T, ConfigError> {
    ctx.err(
        at..at,
        &format!("{prefix}.passive_ejection.max_backoff"),
        format!(
            "max_backoff {} is shorter than backoff {}",
            super::fmt_duration(max),
            super::fmt_duration(backoff)
        ),
        "max_backoff must be at least backoff",
    )
}

/// Resolved pool settings of one route.
pub(super) struct PoolSpec {
    pub(super) balance: Balance,
    pub(super) retries: Option<u32>,
    pub(super) health_check: Option<HealthCheck>,
    pub(super) ejection: Ejection,
}

/// Route over defaults over built-in, field by field, then the cross-field checks.
pub(super) fn finish_pool(
    ctx: &Ctx<'_>,
    route: PoolLayer,
    defaults: PoolLayer,
    prefix: &str,
) -> Result<PoolSpec, ConfigError> {
    let (r, d) = (route.health, defaults.health);
    let health_check = match r.kind.or(d.kind).flatten() {
        None => None,
        Some(kind) => Some(HealthCheck {
            kind: match kind {
                KindLayer::Tcp => HealthKind::Tcp,
                KindLayer::Http(path) => HealthKind::Http {
                    path,
                    expect: r.expect.or(d.expect).unwrap_or_else(|| StatusMatch {
                        ranges: vec![(200, 299)],
                        text: "2xx".to_string(),
                    }),
                    host: r.host.or(d.host),
                },
            },
            interval: r.interval.or(d.interval).unwrap_or(DEFAULT_HEALTH_INTERVAL),
            timeout: r.timeout.or(d.timeout).unwrap_or(DEFAULT_HEALTH_TIMEOUT),
            rise: r.rise.or(d.rise).unwrap_or(DEFAULT_RISE),
            fall: r.fall.or(d.fall).unwrap_or(DEFAULT_FALL),
        }),
    };
    let (re, de) = (route.ejection, defaults.ejection);
    let ejection = Ejection {
        failures: re
            .failures
            .or(de.failures)
            .unwrap_or(DEFAULT_EJECTION.failures),
        backoff: re
            .backoff
            .or(de.backoff)
            .unwrap_or(DEFAULT_EJECTION.backoff),
        max_backoff: re
            .max_backoff
            .or(de.max_backoff)
            .unwrap_or(DEFAULT_EJECTION.max_backoff),
    };
    if ejection.max_backoff < ejection.backoff {
        let at = re.line_span.or(de.line_span).unwrap_or(0);
        return ejection_order_error(ctx, at, prefix, ejection.backoff, ejection.max_backoff);
    }
    Ok(PoolSpec {
        balance: route
            .balance
            .or(defaults.balance)
            .unwrap_or(Balance::RoundRobin),
        retries: route.retries.or(defaults.retries),
        health_check,
        ejection,
    })
}

/// Parses an upstream server `host:port` (IPv6 in brackets).
pub fn parse_server(s: &str) -> Result<ServerAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!("{s:?} has port 0, which cannot be connected to"));
        }
        return Ok(ServerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        });
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port"));
    };
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("{s:?} has an invalid port {port:?} (1 to 65535)")),
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if host.parse::<IpAddr>().is_ok() || host.contains(':') {
        return Err(format!(
            "{s:?}: an IPv6 address must be in brackets, e.g. \"[::1]:8080\""
        ));
    }
    let valid = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(format!("{s:?} has an invalid host name {host:?}"));
    }
    Ok(ServerAddr {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::super::resolve::parse_listen;
    use super::*;

    #[test]
    fn server_addresses() {
        assert_eq!(
            parse_server("tomcat-1:8080").unwrap().to_string(),
            "tomcat-1:8080"
        );
        assert_eq!(parse_server("[::1]:9").unwrap().host, "::1");
        assert!(parse_server("::1:9").is_err());
        assert!(parse_server("host:0").is_err());
        assert!(parse_server(":80").is_err());
        assert!(parse_server("bad host:80").is_err());
        assert!(parse_listen("0.0.0.0:8080").is_ok());
        assert!(parse_listen("[::]:0").is_ok());
        assert!(parse_listen("example.com:80").is_err());
    }
}
