//! The whole document: the file and its environment overlay, the top-level
//! tables, and the checks across routes (unique names, listen addresses that
//! do not overlap). Each route's own fields are in `route.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::pool::server_entry;
use super::raw::{Merge, RawConfig, RawOverlay};
use super::route::{finish, RouteIdentity, RouteLayer};
use super::source::{off_or_duration, toml_error, Ctx};
use super::{Config, ConfigError, Location, DEFAULT_SHUTDOWN_GRACE};

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
        Some(d) => RouteLayer::read(&ctx, d.into(), "defaults")?,
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

        let layer = RouteLayer::read(&ctx, r.into(), &format!("route \"{name}\""))?;
        // TLS of both sides, inherited from [defaults] field by field (config/tls.rs).
        let base = super::tls::base_dir(file);
        let d = raw.defaults.as_ref();
        let client_tls = super::tls::client_tls(
            &ctx,
            d.and_then(|d| d.client.as_ref())
                .and_then(|c| c.tls.as_ref()),
            r.client.as_ref().and_then(|c| c.tls.as_ref()),
            &at("client.tls"),
            route_span.clone(),
            &base,
        )?;
        let upstream_tls = super::tls::upstream_tls(
            &ctx,
            d.and_then(|d| d.upstream.as_ref())
                .and_then(|u| u.tls.as_ref()),
            upstream_raw.and_then(|u| u.tls.as_ref()),
            &at("upstream.tls"),
            &base,
        )?;
        let id = RouteIdentity {
            name,
            listen,
            servers,
            span: route_span,
            client_tls,
            upstream_tls,
        };
        routes.push(finish(&ctx, id, layer, &defaults)?);
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

/// Parses a listen address: an IP literal and a port (0 allowed).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP:PORT address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OnPeerFailure, SendProxy};
    use std::time::Duration;

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
        assert_eq!(r.max_connections, Some(10_000), "built-in");
        assert_eq!(r.client.proxy_protocol, None);
        assert_eq!(r.upstream.send_proxy, SendProxy::Off);
    }

    #[test]
    fn proxy_protocol_and_limits_inherit() {
        let text = format!(
            "[defaults]\nmax_connections = 50\n[defaults.client]\nproxy_protocol_timeout = \"500ms\"\n[defaults.upstream]\nsend_proxy = \"v1\"\n{ROUTE}send_proxy = \"v2\"\n[route.client]\nproxy_protocol = true\n[[route]]\nname = \"s\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 0\n[route.upstream]\nservers = [\"b:1\"]\n"
        );
        let cfg = resolve("t", &text, &[]).unwrap();
        let (r, s) = (&cfg.routes[0], &cfg.routes[1]);
        assert_eq!(r.client.proxy_protocol, Some(Duration::from_millis(500)));
        assert_eq!(r.upstream.send_proxy, SendProxy::V2, "route wins");
        assert_eq!(r.max_connections, Some(50), "from defaults");
        assert_eq!(s.client.proxy_protocol, None, "off unless asked for");
        assert_eq!(s.upstream.send_proxy, SendProxy::V1, "from defaults");
        assert_eq!(s.max_connections, None, "0 = unlimited");
    }

    #[test]
    fn bad_proxy_and_limit_values_say_what_to_write() {
        for (extra, field, hint) in [
            (
                "max_connections = -1\n",
                "max_connections",
                "0 for no limit",
            ),
            ("send_proxy = \"v3\"\n", "send_proxy", "\"v1\""),
        ] {
            let text = if field == "send_proxy" {
                format!("{ROUTE}{extra}")
            } else {
                format!("[defaults]\n{extra}{ROUTE}")
            };
            let e = resolve("t", &text, &[]).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(hint), "{e}");
        }
    }

    #[test]
    fn builtin_defaults_detect_within_ninety_seconds() {
        let cfg = resolve("t", ROUTE, &[]).unwrap();
        let ka = cfg.routes[0].client.keepalive;
        assert_eq!(ka.detection_bound(), Some(Duration::from_secs(90)));
        assert_eq!(ka.effective_user_timeout(), Some(Duration::from_secs(90)));
    }

    #[test]
    fn path_idle_limit_inherits_and_bounds_keepalive() {
        let text = format!(
            "[defaults.client]\npath_idle_limit = \"azure-lb\"\n{ROUTE}path_idle_limit = \"100s\"\n"
        );
        let cfg = resolve("t", &text, &[]).unwrap();
        let r = &cfg.routes[0];
        assert_eq!(
            r.client.path_idle_limit.unwrap().preset,
            Some("azure-lb"),
            "from defaults"
        );
        assert_eq!(
            r.upstream.path_idle_limit.unwrap().limit,
            Duration::from_secs(100)
        );
        // Built-in 60 s + 10 s fits 90 % of 240 s, not 90 % of 70 s.
        let text = format!("{ROUTE}path_idle_limit = \"70s\"\n");
        let err = resolve("t", &text, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("t:1: route \"r\".upstream.keepalive: keepalive idle 1m + interval 10s = 1m 10s is not safely below path_idle_limit 1m 10s"),
            "{err}"
        );
        assert!(
            err.contains("help: set upstream.keepalive.idle to at most 53s with interval 10s"),
            "{err}"
        );
        let text = format!("{ROUTE}path_idle_limit = \"nat\"\n");
        let err = resolve("t", &text, &[]).unwrap_err();
        assert_eq!(err.line(), Some(6), "{err}");
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
