//! Inheritance (route > `[defaults]` > built-in) and every range check, in one place.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toml::Spanned;

use super::keepalive::{check_auto_user_timeout, keepalive_layer, KeepaliveLayer};
use super::raw::{Merge, RawConfig, RawEjection, RawHealthCheck, RawOverlay, SStr};
use super::source::{off_or_duration, positive_duration, toml_error, Ctx};
use super::{
    Balance, ClientSpec, Config, ConfigError, Ejection, HealthCheck, HealthKind, Location,
    OnPeerFailure, Route, Server, ServerAddr, StatusMatch, UpstreamSpec, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EJECTION, DEFAULT_HALF_CLOSE_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
};

/// Route-level scalar settings as found at one level.
#[derive(Default)]
struct RouteLayer {
    idle_timeout: Option<Option<Duration>>,
    half_close_timeout: Option<Option<Duration>>,
    on_peer_failure: Option<OnPeerFailure>,
    connect_timeout: Option<Duration>,
    client: KeepaliveLayer,
    upstream: KeepaliveLayer,
    pool: PoolLayer,
}

/// Pool settings as found at one level.
#[derive(Default, Clone)]
struct PoolLayer {
    balance: Option<Balance>,
    retries: Option<u32>,
    health: HealthLayer,
    ejection: EjectionLayer,
}

/// Health check fields as found at one level. `kind`: `Some(None)` is an
/// explicit `tcp = false` without `http`, i.e. checks turned off.
#[derive(Default, Clone)]
struct HealthLayer {
    kind: Option<Option<KindLayer>>,
    expect: Option<StatusMatch>,
    host: Option<String>,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
}

#[derive(Clone)]
enum KindLayer {
    Tcp,
    Http(String),
}

#[derive(Default, Clone, Copy)]
struct EjectionLayer {
    failures: Option<u32>,
    backoff: Option<Duration>,
    max_backoff: Option<Duration>,
    /// Line of the table, for the one cross-field check made after merging.
    line_span: Option<usize>,
}

/// Built-in health check timing: every 5 s, 1 s timeout, up after 2, down after 3.
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const MAX_WEIGHT: i64 = 1000;
const MAX_RETRIES: i64 = 100;
const MAX_RISE_FALL: i64 = 1000;

pub(super) fn resolve(
    file: &str,
    text: &str,
    env: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut ctx = Ctx {
        file,
        text,
        env_text: String::new(),
        env_vars: Vec::new(),
    };
    let mut raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&ctx, &e))?;

    // Environment overrides, merged field by field over the file.
    let route_names: Vec<String> = raw
        .route
        .as_ref()
        .map(|r| {
            r.get_ref()
                .iter()
                .filter_map(|r| {
                    r.get_ref()
                        .name
                        .as_ref()
                        .map(|n| n.get_ref().trim().to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let doc = super::env::document(env, &route_names).map_err(|problem| ConfigError::Invalid {
        location: Location {
            file: file.to_string(),
            line: 0,
            env: Some(problem.split(':').next().unwrap_or("").into()),
        },
        field: "(environment)".to_string(),
        problem: problem
            .split_once(": ")
            .map(|(_, p)| p.to_string())
            .unwrap_or_else(|| problem.clone()),
        hint: "see README.md, Configuration from the environment".to_string(),
    })?;
    let overrides = doc.vars.clone();
    if !doc.vars.is_empty() {
        ctx.env_text = format!("{}\n{}", " ".repeat(text.len()), doc.text);
        ctx.env_vars = doc.vars.clone();
        let overlay = super::env::parse(&doc, text.len()).map_err(|e| toml_error(&ctx, &e))?;
        raw = apply_overlay(raw, overlay);
    }

    let shutdown_grace = match &raw.shutdown_grace {
        Some(s) => off_or_duration(&ctx, s, "shutdown_grace")?.unwrap_or(Duration::ZERO),
        None => DEFAULT_SHUTDOWN_GRACE,
    };

    let admin = match &raw.admin {
        Some(a) if a.enabled.as_ref().is_some_and(|e| !*e.get_ref()) => None,
        Some(a) => match &a.listen {
            Some(l) if l.get_ref().trim().is_empty() => None,
            Some(l) => match parse_listen(l.get_ref()) {
                Ok(addr) => Some(addr),
                Err(problem) => return ctx.err(
                    l.span(),
                    "admin.listen",
                    problem,
                    "use IP:PORT, e.g. \"127.0.0.1:9901\", or \"\" to turn the admin endpoint off",
                ),
            },
            None => Some(default_admin()),
        },
        None => Some(default_admin()),
    };

    let defaults = match &raw.defaults {
        Some(d) => RouteLayer {
            idle_timeout: d
                .idle_timeout
                .as_ref()
                .map(|s| off_or_duration(&ctx, s, "defaults.idle_timeout"))
                .transpose()?,
            half_close_timeout: d
                .half_close_timeout
                .as_ref()
                .map(|s| off_or_duration(&ctx, s, "defaults.half_close_timeout"))
                .transpose()?,
            on_peer_failure: d
                .on_peer_failure
                .as_ref()
                .map(|s| on_peer_failure(&ctx, s, "defaults.on_peer_failure"))
                .transpose()?,
            connect_timeout: d
                .upstream
                .as_ref()
                .and_then(|u| u.connect_timeout.as_ref())
                .map(|s| positive_duration(&ctx, s, "defaults.upstream.connect_timeout"))
                .transpose()?,
            client: keepalive_layer(
                &ctx,
                d.client.as_ref().and_then(|c| c.keepalive.as_ref()),
                "defaults.client.keepalive",
            )?,
            upstream: keepalive_layer(
                &ctx,
                d.upstream.as_ref().and_then(|u| u.keepalive.as_ref()),
                "defaults.upstream.keepalive",
            )?,
            pool: match d.upstream.as_ref() {
                Some(u) => pool_layer(
                    &ctx,
                    u.balance.as_ref(),
                    u.retries.as_ref(),
                    u.health_check.as_ref(),
                    u.passive_ejection.as_ref(),
                    "defaults.upstream",
                )?,
                None => PoolLayer::default(),
            },
        },
        None => RouteLayer::default(),
    };

    let raw_routes = match &raw.route {
        Some(r) if !r.get_ref().is_empty() => r.get_ref(),
        _ => {
            return ctx.err(
                text.len()..text.len(),
                "route",
                "no [[route]] is defined, so kaproxy would forward nothing",
                "add at least one [[route]] with name, listen and upstream.servers (see conf/kaproxy.toml)",
            )
        }
    };

    let mut routes = Vec::with_capacity(raw_routes.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut listens: Vec<(SocketAddr, String, usize)> = Vec::new();
    for (index, spanned_route) in raw_routes.iter().enumerate() {
        let r = spanned_route.get_ref();
        let route_span = spanned_route.span();
        let name = match &r.name {
            Some(n) => {
                let v = n.get_ref().trim();
                if v.is_empty() || v.chars().any(|c| c.is_control() || c == '"') {
                    return ctx.err(
                        n.span(),
                        &format!("route[{index}].name"),
                        format!("{:?} is not a usable route name", n.get_ref()),
                        "use a short non-empty name such as \"tomcat-http\"",
                    );
                }
                if let Some(first) = names.get(v) {
                    return ctx.err(
                        n.span(),
                        &format!("route[{index}].name"),
                        format!("route name \"{v}\" is already used by the route at line {first}"),
                        "give every [[route]] its own name",
                    );
                }
                names.insert(v.to_string(), ctx.line_of(n.span().start));
                v.to_string()
            }
            None => {
                return ctx.err(
                    route_span,
                    &format!("route[{index}].name"),
                    "this [[route]] has no name",
                    "add name = \"...\"; names appear in logs and must be unique",
                )
            }
        };
        let at = |field: &str| format!("route \"{name}\".{field}");

        let listen = match &r.listen {
            Some(l) => match parse_listen(l.get_ref()) {
                Ok(a) => a,
                Err(problem) => {
                    return ctx.err(
                        l.span(),
                        &at("listen"),
                        problem,
                        "use IP:PORT, e.g. \"0.0.0.0:8080\", \"127.0.0.1:0\" or \"[::]:8080\"",
                    )
                }
            },
            None => {
                return ctx.err(
                    route_span,
                    &at("listen"),
                    "this route has no listen address",
                    "add listen = \"0.0.0.0:8080\" (port 0 picks a free port)",
                )
            }
        };
        if listen.port() != 0 {
            if let Some((_, other, line)) =
                listens.iter().find(|(a, _, _)| listen_conflict(*a, listen))
            {
                let span = r
                    .listen
                    .as_ref()
                    .map(|l| l.span())
                    .unwrap_or(route_span.clone());
                return ctx.err(
                    span,
                    &at("listen"),
                    format!(
                        "{listen} overlaps the listen address of route \"{other}\" (line {line})"
                    ),
                    "give each route its own port; two routes cannot share a listen address",
                );
            }
            let line = ctx.line_of(
                r.listen
                    .as_ref()
                    .map(|l| l.span().start)
                    .unwrap_or(route_span.start),
            );
            listens.push((listen, name.clone(), line));
        }

        let upstream_raw = r.upstream.as_ref();
        let servers = match upstream_raw.and_then(|u| u.servers.as_ref()) {
            Some(list) if !list.get_ref().is_empty() => {
                let mut out = Vec::new();
                for v in list.get_ref() {
                    out.push(server_entry(&ctx, v, &at("upstream.servers"))?);
                }
                out
            }
            Some(list) => {
                return ctx.err(
                    list.span(),
                    &at("upstream.servers"),
                    "the server list is empty",
                    "list at least one \"host:port\"",
                )
            }
            None => {
                return ctx.err(
                    route_span,
                    &at("upstream.servers"),
                    "this route has no upstream servers",
                    "add [route.upstream] servers = [\"host:port\", ...]",
                )
            }
        };

        let layer = RouteLayer {
            idle_timeout: r
                .idle_timeout
                .as_ref()
                .map(|s| off_or_duration(&ctx, s, &at("idle_timeout")))
                .transpose()?,
            half_close_timeout: r
                .half_close_timeout
                .as_ref()
                .map(|s| off_or_duration(&ctx, s, &at("half_close_timeout")))
                .transpose()?,
            on_peer_failure: r
                .on_peer_failure
                .as_ref()
                .map(|s| on_peer_failure(&ctx, s, &at("on_peer_failure")))
                .transpose()?,
            connect_timeout: upstream_raw
                .and_then(|u| u.connect_timeout.as_ref())
                .map(|s| positive_duration(&ctx, s, &at("upstream.connect_timeout")))
                .transpose()?,
            client: keepalive_layer(
                &ctx,
                r.client.as_ref().and_then(|c| c.keepalive.as_ref()),
                &at("client.keepalive"),
            )?,
            upstream: keepalive_layer(
                &ctx,
                upstream_raw.and_then(|u| u.keepalive.as_ref()),
                &at("upstream.keepalive"),
            )?,
            pool: match upstream_raw {
                Some(u) => pool_layer(
                    &ctx,
                    u.balance.as_ref(),
                    u.retries.as_ref(),
                    u.health_check.as_ref(),
                    u.passive_ejection.as_ref(),
                    &at("upstream"),
                )?,
                None => PoolLayer::default(),
            },
        };
        let pool = finish_pool(
            &ctx,
            layer.pool.clone(),
            defaults.pool.clone(),
            &at("upstream"),
        )?;

        let client_keepalive = layer.client.over(defaults.client).finish();
        let upstream_keepalive = layer.upstream.over(defaults.upstream).finish();
        for (side, spec) in [
            ("client", &client_keepalive),
            ("upstream", &upstream_keepalive),
        ] {
            if let Err((problem, hint)) = check_auto_user_timeout(spec) {
                return ctx.err(
                    route_span.clone(),
                    &at(&format!("{side}.keepalive.user_timeout")),
                    problem,
                    hint,
                );
            }
        }
        routes.push(Route {
            name,
            listen,
            client: ClientSpec {
                keepalive: client_keepalive,
            },
            upstream: UpstreamSpec {
                servers,
                balance: pool.balance,
                retries: pool.retries,
                health_check: pool.health_check,
                ejection: pool.ejection,
                connect_timeout: layer
                    .connect_timeout
                    .or(defaults.connect_timeout)
                    .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                keepalive: upstream_keepalive,
            },
            idle_timeout: layer.idle_timeout.or(defaults.idle_timeout).unwrap_or(None),
            half_close_timeout: layer
                .half_close_timeout
                .or(defaults.half_close_timeout)
                .unwrap_or(Some(DEFAULT_HALF_CLOSE_TIMEOUT)),
            on_peer_failure: layer
                .on_peer_failure
                .or(defaults.on_peer_failure)
                .unwrap_or(OnPeerFailure::Reset),
        });
    }

    if let Some(a) = admin {
        if a.port() != 0 {
            if let Some((_, other, line)) = listens.iter().find(|(l, _, _)| listen_conflict(*l, a))
            {
                let span = raw
                    .admin
                    .as_ref()
                    .and_then(|x| x.listen.as_ref())
                    .map(|l| l.span())
                    .unwrap_or(0..0);
                return ctx.err(
                    span,
                    "admin.listen",
                    format!("{a} overlaps the listen address of route \"{other}\" (line {line})"),
                    "give the admin endpoint its own port",
                );
            }
        }
    }

    Ok(Config {
        source: file.to_string(),
        shutdown_grace,
        admin,
        routes,
        overrides,
    })
}

fn apply_overlay(mut raw: RawConfig, overlay: RawOverlay) -> RawConfig {
    raw.shutdown_grace = overlay.shutdown_grace.or(raw.shutdown_grace);
    raw.admin = match (raw.admin, overlay.admin) {
        (Some(b), Some(o)) => Some(b.merge(o)),
        (b, None) => b,
        (None, o) => o,
    };
    raw.defaults = match (raw.defaults, overlay.defaults) {
        (Some(b), Some(o)) => Some(b.merge(o)),
        (b, None) => b,
        (None, o) => o,
    };
    if let (Some(routes), Some(mut over)) = (raw.route.as_mut(), overlay.route) {
        for spanned in routes.get_mut().iter_mut() {
            let span = spanned.span();
            let name = spanned
                .get_ref()
                .name
                .as_ref()
                .map(|n| n.get_ref().trim().to_string());
            if let Some(o) = name.and_then(|n| over.remove(&n)) {
                let base = std::mem::take(spanned.get_mut());
                *spanned = Spanned::new(span, base.merge(o));
            }
        }
    }
    raw
}

fn default_admin() -> SocketAddr {
    super::DEFAULT_ADMIN_ADDR
}

/// Two binds that cannot both succeed: the same port with equal IPs, or with an
/// unspecified IP on either side (0.0.0.0 / :: take the port on every address).
fn listen_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    // "[::]:p" is bound IPv6-only, so it does not take "0.0.0.0:p".
    if a.port() != b.port() || a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

fn on_peer_failure(ctx: &Ctx<'_>, s: &SStr, field: &str) -> Result<OnPeerFailure, ConfigError> {
    match s.get_ref().trim() {
        "reset" => Ok(OnPeerFailure::Reset),
        "close" => Ok(OnPeerFailure::Close),
        other => ctx.err(
            s.span(),
            field,
            format!("{other:?} is not a known action"),
            "use \"reset\" (RST the survivor, the default) or \"close\" (FIN)",
        ),
    }
}

/// One `servers` entry: `"host:port"` or `{ address = "host:port", weight = N }`.
fn server_entry(
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

fn count(
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

fn pool_layer(
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

fn health_layer(ctx: &Ctx<'_>, h: &RawHealthCheck, f: &str) -> Result<HealthLayer, ConfigError> {
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
fn parse_status_match(text: &str) -> Result<StatusMatch, String> {
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

fn ejection_order_error<T>(
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
struct PoolSpec {
    balance: Balance,
    retries: Option<u32>,
    health_check: Option<HealthCheck>,
    ejection: Ejection,
}

/// Route over defaults over built-in, field by field, then the cross-field checks.
fn finish_pool(
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

/// Parses a listen address: an IP literal and a port (0 allowed).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP:PORT address"))
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
    use super::*;

    const ROUTE: &str = "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\n";

    #[test]
    fn inheritance_is_field_by_field() {
        let text = format!(
            "[defaults]\non_peer_failure = \"close\"\n[defaults.client.keepalive]\nidle = \"20s\"\nprobes = 5\n[defaults.upstream]\nconnect_timeout = \"7s\"\n{ROUTE}keepalive = {{ interval = \"2s\" }}\n[route.client]\nkeepalive = {{ probes = 9 }}\n"
        );
        let cfg = resolve("t", &text, &[]).unwrap();
        let r = &cfg.routes[0];
        assert_eq!(
            r.client.keepalive.idle,
            Duration::from_secs(20),
            "from defaults"
        );
        assert_eq!(r.client.keepalive.probes, 9, "route wins");
        assert_eq!(
            r.client.keepalive.interval,
            Duration::from_secs(10),
            "built-in"
        );
        assert_eq!(r.upstream.keepalive.interval, Duration::from_secs(2));
        assert_eq!(r.upstream.keepalive.idle, Duration::from_secs(60));
        assert_eq!(r.upstream.connect_timeout, Duration::from_secs(7));
        assert_eq!(r.on_peer_failure, OnPeerFailure::Close);
        assert_eq!(r.half_close_timeout, Some(Duration::from_secs(60)));
        assert_eq!(r.idle_timeout, None);
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn builtin_defaults_detect_within_ninety_seconds() {
        let cfg = resolve("t", ROUTE, &[]).unwrap();
        let ka = cfg.routes[0].client.keepalive;
        assert_eq!(ka.detection_bound(), Some(Duration::from_secs(90)));
        assert_eq!(ka.effective_user_timeout(), Some(Duration::from_secs(90)));
    }

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

    #[test]
    fn listen_overlap_rules() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listen_conflict(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(listen_conflict(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(!listen_conflict(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!listen_conflict(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(!listen_conflict(a("[::]:80"), a("0.0.0.0:80")));
        assert_eq!(
            a(super::super::DEFAULT_ADMIN_LISTEN),
            super::super::DEFAULT_ADMIN_ADDR
        );
    }
}
