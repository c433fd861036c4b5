//! Inheritance (route > `[defaults]` > built-in) and every range check, in one place.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toml::Spanned;

use super::raw::{Merge, RawConfig, RawEjection, RawHealthCheck, RawKeepalive, RawOverlay, SStr};
use super::{
    Balance, ClientSpec, Config, ConfigError, Ejection, HealthCheck, HealthKind, KeepaliveSpec,
    Location, OnPeerFailure, Route, Server, ServerAddr, StatusMatch, UpstreamSpec, UserTimeout,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_EJECTION, DEFAULT_HALF_CLOSE_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
    MAX_USER_TIMEOUT,
};

/// Largest TCP_KEEPIDLE / TCP_KEEPINTVL Linux accepts (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL).
const MAX_KEEPALIVE_SECS: u64 = 32767;
/// Largest TCP_KEEPCNT Linux accepts (MAX_TCP_KEEPCNT).
const MAX_KEEPALIVE_PROBES: i64 = 127;

/// Longest duration any setting takes. Every timer is added to the current
/// time, and a year is far beyond any sensible timeout while keeping that sum
/// far from overflowing.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

const DURATION_HINT: &str = "write a duration such as \"90s\", \"1m30s\" or \"500ms\"";

/// Source text plus its name, to turn byte spans into line numbers.
struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    /// The environment overrides as parsed (the file's length in spaces, a
    /// newline, then one line per variable), and the variable of each line.
    env_text: String,
    env_vars: Vec<String>,
}

impl Ctx<'_> {
    fn location(&self, offset: usize) -> Location {
        if offset > self.text.len() && !self.env_vars.is_empty() {
            let start = self.text.len() + 1;
            let end = offset.clamp(start, self.env_text.len());
            let index = self.env_text.as_bytes()[start..end]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            return Location {
                file: self.file.to_string(),
                line: 0,
                env: self.env_vars.get(index).map(|v| v.as_str().into()),
            };
        }
        Location {
            file: self.file.to_string(),
            line: self.line_of(offset),
            env: None,
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        field: &str,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            location: self.location(span.start),
            field: field.to_string(),
            problem: problem.into(),
            hint: hint.into(),
        })
    }
}

/// Keepalive fields as found at one level, each already valid on its own.
#[derive(Default, Clone, Copy)]
struct KeepaliveLayer {
    enabled: Option<bool>,
    idle: Option<Duration>,
    interval: Option<Duration>,
    probes: Option<u32>,
    user_timeout: Option<UserTimeout>,
    stall_timeout: Option<Option<Duration>>,
}

impl KeepaliveLayer {
    /// Field-by-field: `self` wins over `lower`.
    fn over(self, lower: KeepaliveLayer) -> KeepaliveLayer {
        KeepaliveLayer {
            enabled: self.enabled.or(lower.enabled),
            idle: self.idle.or(lower.idle),
            interval: self.interval.or(lower.interval),
            probes: self.probes.or(lower.probes),
            user_timeout: self.user_timeout.or(lower.user_timeout),
            stall_timeout: self.stall_timeout.or(lower.stall_timeout),
        }
    }

    fn finish(self) -> KeepaliveSpec {
        let d = KeepaliveSpec::default();
        KeepaliveSpec {
            enabled: self.enabled.unwrap_or(d.enabled),
            idle: self.idle.unwrap_or(d.idle),
            interval: self.interval.unwrap_or(d.interval),
            probes: self.probes.unwrap_or(d.probes),
            user_timeout: self.user_timeout.unwrap_or(d.user_timeout),
            stall_timeout: self.stall_timeout.unwrap_or(d.stall_timeout),
        }
    }
}

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

fn toml_error(ctx: &Ctx<'_>, e: &toml::de::Error) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let in_env = span.start > ctx.text.len() && !ctx.env_vars.is_empty();
    let source = if in_env {
        ctx.env_text.as_str()
    } else {
        ctx.text
    };
    let snippet = source.get(span.clone()).unwrap_or("").trim().to_string();
    let field = field_at(source, span.start, &snippet);
    let message = e.message().trim().to_string();
    let hint = if message.starts_with("unknown field") {
        if in_env {
            "no such setting: the variable names the setting's path in the file, levels separated by __ (see README.md, Configuration from the environment)".to_string()
        } else {
            "remove or correct this key; see the configuration reference in README.md".to_string()
        }
    } else if message.contains("invalid type") {
        "check the value's type: durations and addresses are quoted strings, probes is an integer, enabled is true or false".to_string()
    } else {
        "fix the TOML syntax on this line".to_string()
    };
    ConfigError::Invalid {
        location: ctx.location(span.start),
        field,
        problem: message,
        hint,
    }
}

/// Best-effort dotted name of the key at `offset`: the enclosing `[table]`
/// header, the key on that line, and the span's own key inside an inline table.
fn field_at(text: &str, offset: usize, snippet: &str) -> String {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let header = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let mut parts: Vec<String> = Vec::new();
    if let Some(h) = header {
        parts.push(h);
    }
    if let Some(k) = key {
        parts.push(k);
        // Inside an inline table the span is at an inner key (unknown field) or
        // at an inner value (wrong type): name the inner key too.
        let prefix = &line[..(offset - line_start).min(line.len())];
        if let Some(brace) = prefix.find('{') {
            let segment = prefix[brace..].rsplit(['{', ',']).next().unwrap_or("");
            let inner = match segment.split_once('=') {
                Some((k, _)) => k.trim().to_string(),
                None => snippet.to_string(),
            };
            if !inner.is_empty() && !inner.contains([' ', '"', '=']) {
                parts.push(inner);
            }
        }
    } else if !snippet.is_empty() && !snippet.contains(['=', '{', ' ', '\n']) {
        parts.push(snippet.to_string());
    }
    if parts.is_empty() {
        "(top level)".to_string()
    } else {
        parts.join(".")
    }
}

fn parse_duration(ctx: &Ctx<'_>, s: &SStr, field: &str) -> Result<Duration, ConfigError> {
    let v = s.get_ref().trim();
    let d = humantime::parse_duration(v).or_else(|e| {
        ctx.err(
            s.span(),
            field,
            format!("{v:?} is not a duration ({e})"),
            DURATION_HINT,
        )
    })?;
    if d > MAX_DURATION {
        return ctx.err(
            s.span(),
            field,
            format!("{v:?} is longer than the longest supported duration, 365 days"),
            "write at most \"365d\"; where a timer can be turned off, \"off\" means no limit",
        );
    }
    Ok(d)
}

/// `"0s"` or `"off"` turn the timer off.
fn off_or_duration(ctx: &Ctx<'_>, s: &SStr, field: &str) -> Result<Option<Duration>, ConfigError> {
    if s.get_ref().trim() == "off" {
        return Ok(None);
    }
    let d = parse_duration(ctx, s, field)?;
    Ok((!d.is_zero()).then_some(d))
}

fn positive_duration(ctx: &Ctx<'_>, s: &SStr, field: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(ctx, s, field)?;
    if d.is_zero() {
        return ctx.err(s.span(), field, "must be greater than zero", DURATION_HINT);
    }
    Ok(d)
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

fn keepalive_layer(
    ctx: &Ctx<'_>,
    raw: Option<&RawKeepalive>,
    field: &str,
) -> Result<KeepaliveLayer, ConfigError> {
    let Some(raw) = raw else {
        return Ok(KeepaliveLayer::default());
    };
    let secs = |s: &Option<SStr>, name: &str, opt: &str| -> Result<Option<Duration>, ConfigError> {
        let Some(s) = s else { return Ok(None) };
        let f = format!("{field}.{name}");
        let d = parse_duration(ctx, s, &f)?;
        match check_keepalive_secs(d, opt) {
            Ok(()) => Ok(Some(d)),
            Err((problem, hint)) => ctx.err(s.span(), &f, problem, hint),
        }
    };
    let idle = secs(&raw.idle, "idle", "TCP_KEEPIDLE")?;
    let interval = secs(&raw.interval, "interval", "TCP_KEEPINTVL")?;
    let probes = match &raw.probes {
        Some(p) => match check_probes(*p.get_ref()) {
            Ok(n) => Some(n),
            Err((problem, hint)) => {
                return ctx.err(p.span(), &format!("{field}.probes"), problem, hint)
            }
        },
        None => None,
    };
    let user_timeout = match &raw.user_timeout {
        Some(s) => match parse_user_timeout(s.get_ref()) {
            Ok(u) => Some(u),
            Err((problem, hint)) => {
                return ctx.err(s.span(), &format!("{field}.user_timeout"), problem, hint)
            }
        },
        None => None,
    };
    let stall_timeout = match &raw.stall_timeout {
        Some(s) => {
            let f = format!("{field}.stall_timeout");
            let d = off_or_duration(ctx, s, &f)?;
            if let Some(d) = d.filter(|d| d.subsec_nanos() % 1_000_000 != 0) {
                return ctx.err(
                    s.span(),
                    &f,
                    format!("{} is finer than a millisecond", super::fmt_duration(d)),
                    "write \"off\" or a duration in whole milliseconds, e.g. \"5m\" or \"2500ms\"",
                );
            }
            Some(d)
        }
        None => None,
    };
    Ok(KeepaliveLayer {
        enabled: raw.enabled.as_ref().map(|b| *b.get_ref()),
        idle,
        interval,
        probes,
        user_timeout,
        stall_timeout,
    })
}

type Problem = (String, String);

/// TCP_KEEPIDLE and TCP_KEEPINTVL take whole seconds 1..=32767; anything else
/// would be rounded or refused by the kernel, so it is refused here with a reason.
fn check_keepalive_secs(d: Duration, opt: &str) -> Result<(), Problem> {
    let hint =
        || format!("{opt} takes whole seconds from 1s to {MAX_KEEPALIVE_SECS}s, e.g. \"30s\"");
    if d.subsec_nanos() != 0 {
        return Err((
            format!(
                "{} is not a whole number of seconds",
                super::fmt_duration(d)
            ),
            hint(),
        ));
    }
    if d.as_secs() == 0 || d.as_secs() > MAX_KEEPALIVE_SECS {
        return Err((
            format!("{} is out of range", super::fmt_duration(d)),
            hint(),
        ));
    }
    Ok(())
}

fn check_probes(n: i64) -> Result<u32, Problem> {
    if (1..=MAX_KEEPALIVE_PROBES).contains(&n) {
        Ok(n as u32)
    } else {
        Err((
            format!("{n} probes is out of range"),
            format!("TCP_KEEPCNT takes 1 to {MAX_KEEPALIVE_PROBES} probes, e.g. 3"),
        ))
    }
}

fn user_timeout_range_hint() -> String {
    format!(
        "user_timeout takes at most {}ms (about 24.8 days), the range of TCP_USER_TIMEOUT",
        MAX_USER_TIMEOUT.as_millis()
    )
}

/// `auto` is computed after inheritance, so its range is checked on the finished spec.
fn check_auto_user_timeout(spec: &KeepaliveSpec) -> Result<(), Problem> {
    match (spec.user_timeout, spec.effective_user_timeout()) {
        (UserTimeout::Auto, Some(d)) if d > MAX_USER_TIMEOUT => Err((
            format!(
                "user_timeout auto = idle + interval × probes = {}s (about {:.1} days) is out of range",
                d.as_secs(),
                d.as_secs_f64() / 86400.0
            ),
            format!(
                "{}; shorten idle, interval or probes, or set user_timeout explicitly",
                user_timeout_range_hint()
            ),
        )),
        _ => Ok(()),
    }
}

fn parse_user_timeout(s: &str) -> Result<UserTimeout, Problem> {
    let hint = || {
        "use \"auto\" (idle + interval × probes), \"off\", or a duration in whole milliseconds such as \"30s\" or \"2500ms\"".to_string()
    };
    match s.trim() {
        "auto" => return Ok(UserTimeout::Auto),
        "off" => return Ok(UserTimeout::Off),
        _ => {}
    }
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        (
            format!("{s:?} is neither auto, off nor a duration ({e})"),
            hint(),
        )
    })?;
    if d.is_zero() {
        return Err((
            "0 would mean off".to_string(),
            "write \"off\" to turn TCP_USER_TIMEOUT off, or a duration of at least 1ms".to_string(),
        ));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err((
            format!("{} is finer than a millisecond", super::fmt_duration(d)),
            hint(),
        ));
    }
    if d > MAX_USER_TIMEOUT {
        return Err((
            format!("{} is out of range", super::fmt_duration(d)),
            user_timeout_range_hint(),
        ));
    }
    Ok(UserTimeout::Fixed(d))
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

/// Parses the command-line keepalive shorthand `IDLE/INTERVAL/PROBES[/USER_TIMEOUT[/STALL_TIMEOUT]]`
/// (e.g. `60s/10s/3`, `30s/5s/3/off`, `30s/5s/3/auto/5m`) or `off`, with the same checks as the file.
pub fn parse_keepalive_shorthand(s: &str) -> Result<KeepaliveSpec, String> {
    let s = s.trim();
    if s == "off" {
        return Ok(KeepaliveSpec {
            enabled: false,
            ..KeepaliveSpec::default()
        });
    }
    let parts: Vec<&str> = s.split('/').collect();
    if !(3..=5).contains(&parts.len()) {
        return Err(format!("{s:?} is not IDLE/INTERVAL/PROBES[/USER_TIMEOUT[/STALL_TIMEOUT]], e.g. 60s/10s/3, 30s/5s/3/auto or 30s/5s/3/auto/5m, or off"));
    }
    let dur = |v: &str, name: &str, opt: &str| -> Result<Duration, String> {
        let d = humantime::parse_duration(v)
            .map_err(|e| format!("{name} {v:?} is not a duration ({e})"))?;
        check_keepalive_secs(d, opt).map_err(|(p, h)| format!("{name} {p}; {h}"))?;
        Ok(d)
    };
    let idle = dur(parts[0], "idle", "TCP_KEEPIDLE")?;
    let interval = dur(parts[1], "interval", "TCP_KEEPINTVL")?;
    let probes: i64 = parts[2]
        .parse()
        .map_err(|_| format!("probes {:?} is not a whole number", parts[2]))?;
    let probes = check_probes(probes).map_err(|(p, h)| format!("{p}; {h}"))?;
    let user_timeout = match parts.get(3) {
        Some(u) => parse_user_timeout(u).map_err(|(p, h)| format!("user_timeout {p}; {h}"))?,
        None => UserTimeout::Auto,
    };
    let stall_timeout = match parts.get(4).map(|v| v.trim()) {
        None | Some("off") => None,
        Some(v) => {
            let d = humantime::parse_duration(v)
                .map_err(|e| format!("stall_timeout {v:?} is not a duration ({e})"))?;
            if d > MAX_DURATION {
                return Err(format!("stall_timeout {v:?} is longer than 365 days"));
            }
            if d.subsec_nanos() % 1_000_000 != 0 {
                return Err(format!(
                    "stall_timeout {v:?} is finer than a millisecond; use whole milliseconds"
                ));
            }
            (!d.is_zero()).then_some(d)
        }
    };
    let spec = KeepaliveSpec {
        enabled: true,
        idle,
        interval,
        probes,
        user_timeout,
        stall_timeout,
    };
    check_auto_user_timeout(&spec).map_err(|(p, h)| format!("{p}; {h}"))?;
    Ok(spec)
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
    fn user_timeout_forms() {
        assert_eq!(parse_user_timeout("auto").unwrap(), UserTimeout::Auto);
        assert_eq!(parse_user_timeout("off").unwrap(), UserTimeout::Off);
        assert_eq!(
            parse_user_timeout("2500ms").unwrap(),
            UserTimeout::Fixed(Duration::from_millis(2500))
        );
        assert!(parse_user_timeout("0s").is_err());
        assert!(parse_user_timeout("1500us").is_err());
        assert!(parse_user_timeout("60d").is_err());
    }

    #[test]
    fn keepalive_seconds_edges() {
        assert!(check_keepalive_secs(Duration::from_secs(1), "X").is_ok());
        assert!(check_keepalive_secs(Duration::from_secs(32767), "X").is_ok());
        assert!(check_keepalive_secs(Duration::from_secs(32768), "X").is_err());
        assert!(check_keepalive_secs(Duration::from_millis(999), "X").is_err());
        assert!(check_probes(127).is_ok());
        assert!(check_probes(-1).is_err());
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
    fn shorthand_matches_file_rules() {
        let ka = parse_keepalive_shorthand("30s/5s/3/off").unwrap();
        assert_eq!(
            (ka.idle.as_secs(), ka.interval.as_secs(), ka.probes),
            (30, 5, 3)
        );
        assert_eq!(ka.user_timeout, UserTimeout::Off);
        assert!(!parse_keepalive_shorthand("off").unwrap().enabled);
        assert!(parse_keepalive_shorthand("30s/5s").is_err());
        assert!(parse_keepalive_shorthand("30s/5s/200").is_err());
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
