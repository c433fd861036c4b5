//! Inheritance (route > `[defaults]` > built-in) and every range check, in one place.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::raw::{RawConfig, RawKeepalive, SStr};
use super::{
    ClientSpec, Config, ConfigError, KeepaliveSpec, Location, OnPeerFailure, Route, ServerAddr,
    UpstreamSpec, UserTimeout, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HALF_CLOSE_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
};

/// Largest TCP_KEEPIDLE / TCP_KEEPINTVL Linux accepts (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL).
const MAX_KEEPALIVE_SECS: u64 = 32767;
/// Largest TCP_KEEPCNT Linux accepts (MAX_TCP_KEEPCNT).
const MAX_KEEPALIVE_PROBES: i64 = 127;

const DURATION_HINT: &str = "write a duration such as \"90s\", \"1m30s\" or \"500ms\"";

/// Source text plus its name, to turn byte spans into line numbers.
struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
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
            location: Location {
                file: self.file.to_string(),
                line: self.line_of(span.start),
            },
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
}

pub(super) fn resolve(file: &str, text: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&ctx, &e))?;

    let shutdown_grace = match &raw.shutdown_grace {
        Some(s) => off_or_duration(&ctx, s, "shutdown_grace")?.unwrap_or(Duration::ZERO),
        None => DEFAULT_SHUTDOWN_GRACE,
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
                for s in list.get_ref() {
                    match parse_server(s.get_ref()) {
                        Ok(a) => out.push(a),
                        Err(problem) => return ctx.err(s.span(), &at("upstream.servers"), problem, "write each server as \"host:port\", e.g. \"tomcat-1:8080\", \"127.0.0.1:8080\" or \"[::1]:8080\""),
                    }
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
        };

        routes.push(Route {
            name,
            listen,
            client: ClientSpec {
                keepalive: layer.client.over(defaults.client).finish(),
            },
            upstream: UpstreamSpec {
                servers,
                connect_timeout: layer
                    .connect_timeout
                    .or(defaults.connect_timeout)
                    .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                keepalive: layer.upstream.over(defaults.upstream).finish(),
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

    Ok(Config {
        source: file.to_string(),
        shutdown_grace,
        routes,
    })
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
    let line_no = ctx.line_of(span.start);
    let snippet = ctx.text.get(span.clone()).unwrap_or("").trim().to_string();
    let field = field_at(ctx.text, span.start, &snippet);
    let message = e.message().trim().to_string();
    let hint = if message.starts_with("unknown field") {
        "remove or correct this key; see the configuration reference in README.md".to_string()
    } else if message.contains("invalid type") {
        "check the value's type: durations and addresses are quoted strings, probes is an integer, enabled is true or false".to_string()
    } else {
        "fix the TOML syntax on this line".to_string()
    };
    ConfigError::Invalid {
        location: Location {
            file: ctx.file.to_string(),
            line: line_no,
        },
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
    humantime::parse_duration(v).or_else(|e| {
        ctx.err(
            s.span(),
            field,
            format!("{v:?} is not a duration ({e})"),
            DURATION_HINT,
        )
    })
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
    Ok(KeepaliveLayer {
        enabled: raw.enabled.as_ref().map(|b| *b.get_ref()),
        idle,
        interval,
        probes,
        user_timeout,
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
    if d.as_millis() > u128::from(u32::MAX) {
        return Err((
            format!("{} is out of range", super::fmt_duration(d)),
            "TCP_USER_TIMEOUT takes at most 4294967295ms (about 49 days)".to_string(),
        ));
    }
    Ok(UserTimeout::Fixed(d))
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

/// Parses the command-line keepalive shorthand `IDLE/INTERVAL/PROBES[/USER_TIMEOUT]`
/// (e.g. `60s/10s/3`, `30s/5s/3/off`) or `off`, with the same checks as the file.
pub fn parse_keepalive_shorthand(s: &str) -> Result<KeepaliveSpec, String> {
    let s = s.trim();
    if s == "off" {
        return Ok(KeepaliveSpec {
            enabled: false,
            ..KeepaliveSpec::default()
        });
    }
    let parts: Vec<&str> = s.split('/').collect();
    if !(3..=4).contains(&parts.len()) {
        return Err(format!("{s:?} is not IDLE/INTERVAL/PROBES[/USER_TIMEOUT], e.g. 60s/10s/3 or 30s/5s/3/auto, or off"));
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
    Ok(KeepaliveSpec {
        enabled: true,
        idle,
        interval,
        probes,
        user_timeout,
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
        let cfg = resolve("t", &text).unwrap();
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
        let cfg = resolve("t", ROUTE).unwrap();
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
    }
}
