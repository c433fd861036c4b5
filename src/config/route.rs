//! The settings of one route: what `[defaults]` and a `[[route]]` table each
//! say (one builder for both, so the two cannot drift apart), and the
//! finished route, route over defaults over built-in.

use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::keepalive::{check_auto_user_timeout, keepalive_layer, KeepaliveLayer};
use super::path_limit::{check_against_limit, parse_path_idle_limit, PathIdleLimit};
use super::pool::{finish_pool, pool_layer, PoolLayer};
use super::raw::{
    RawClient, RawDefaults, RawEjection, RawHealthCheck, RawKeepalive, RawRoute, SStr,
};
use super::source::{off_or_duration, positive_duration, Ctx};
use super::{
    ClientSpec, ConfigError, OnPeerFailure, Route, SendProxy, Server, UpstreamSpec,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HALF_CLOSE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PROXY_PROTOCOL_TIMEOUT, MAX_MAX_CONNECTIONS,
};

/// The fields a route can inherit, as written in one table (`[defaults]` or
/// one `[[route]]`).
pub(super) struct Inheritable<'a> {
    idle_timeout: Option<&'a SStr>,
    half_close_timeout: Option<&'a SStr>,
    on_peer_failure: Option<&'a SStr>,
    max_connections: Option<&'a Spanned<i64>>,
    client: Option<&'a RawClient>,
    connect_timeout: Option<&'a SStr>,
    upstream_path_idle_limit: Option<&'a SStr>,
    upstream_keepalive: Option<&'a RawKeepalive>,
    send_proxy: Option<&'a SStr>,
    balance: Option<&'a SStr>,
    retries: Option<&'a Spanned<i64>>,
    health_check: Option<&'a RawHealthCheck>,
    passive_ejection: Option<&'a RawEjection>,
}

/// `[defaults]` and a `[[route]]` name the inheritable fields alike; only
/// the type of their upstream table differs.
macro_rules! inheritable_from {
    ($raw:ty) => {
        impl<'a> From<&'a $raw> for Inheritable<'a> {
            fn from(t: &'a $raw) -> Self {
                let u = t.upstream.as_ref();
                Inheritable {
                    idle_timeout: t.idle_timeout.as_ref(),
                    half_close_timeout: t.half_close_timeout.as_ref(),
                    on_peer_failure: t.on_peer_failure.as_ref(),
                    max_connections: t.max_connections.as_ref(),
                    client: t.client.as_ref(),
                    connect_timeout: u.and_then(|u| u.connect_timeout.as_ref()),
                    upstream_path_idle_limit: u.and_then(|u| u.path_idle_limit.as_ref()),
                    upstream_keepalive: u.and_then(|u| u.keepalive.as_ref()),
                    send_proxy: u.and_then(|u| u.send_proxy.as_ref()),
                    balance: u.and_then(|u| u.balance.as_ref()),
                    retries: u.and_then(|u| u.retries.as_ref()),
                    health_check: u.and_then(|u| u.health_check.as_ref()),
                    passive_ejection: u.and_then(|u| u.passive_ejection.as_ref()),
                }
            }
        }
    };
}

inheritable_from!(RawDefaults);
inheritable_from!(RawRoute);

/// Route-level settings as found at one level, checked.
#[derive(Default)]
pub(super) struct RouteLayer {
    idle_timeout: Option<Option<Duration>>,
    half_close_timeout: Option<Option<Duration>>,
    on_peer_failure: Option<OnPeerFailure>,
    connect_timeout: Option<Duration>,
    max_connections: Option<Option<u32>>,
    proxy_protocol: Option<bool>,
    proxy_protocol_timeout: Option<Duration>,
    send_proxy: Option<SendProxy>,
    client: KeepaliveLayer,
    upstream: KeepaliveLayer,
    client_limit: Option<PathIdleLimit>,
    upstream_limit: Option<PathIdleLimit>,
    pool: PoolLayer,
}

impl RouteLayer {
    /// Checks every field of one table; `prefix` names the table in errors
    /// (`defaults` or `route "web"`).
    pub(super) fn read(
        ctx: &Ctx<'_>,
        t: Inheritable<'_>,
        prefix: &str,
    ) -> Result<RouteLayer, ConfigError> {
        let at = |field: &str| format!("{prefix}.{field}");
        let client = t.client;
        Ok(RouteLayer {
            idle_timeout: t
                .idle_timeout
                .map(|s| off_or_duration(ctx, s, &at("idle_timeout")))
                .transpose()?,
            half_close_timeout: t
                .half_close_timeout
                .map(|s| off_or_duration(ctx, s, &at("half_close_timeout")))
                .transpose()?,
            on_peer_failure: t
                .on_peer_failure
                .map(|s| on_peer_failure(ctx, s, &at("on_peer_failure")))
                .transpose()?,
            connect_timeout: t
                .connect_timeout
                .map(|s| positive_duration(ctx, s, &at("upstream.connect_timeout")))
                .transpose()?,
            max_connections: t
                .max_connections
                .map(|n| max_connections(ctx, n, &at("max_connections")))
                .transpose()?,
            proxy_protocol: client
                .and_then(|c| c.proxy_protocol.as_ref())
                .map(|b| *b.get_ref()),
            proxy_protocol_timeout: client
                .and_then(|c| c.proxy_protocol_timeout.as_ref())
                .map(|s| positive_duration(ctx, s, &at("client.proxy_protocol_timeout")))
                .transpose()?,
            send_proxy: t
                .send_proxy
                .map(|s| send_proxy(ctx, s, &at("upstream.send_proxy")))
                .transpose()?,
            client: keepalive_layer(
                ctx,
                client.and_then(|c| c.keepalive.as_ref()),
                &at("client.keepalive"),
            )?,
            upstream: keepalive_layer(ctx, t.upstream_keepalive, &at("upstream.keepalive"))?,
            client_limit: client
                .and_then(|c| c.path_idle_limit.as_ref())
                .map(|s| path_limit(ctx, s, &at("client.path_idle_limit")))
                .transpose()?,
            upstream_limit: t
                .upstream_path_idle_limit
                .map(|s| path_limit(ctx, s, &at("upstream.path_idle_limit")))
                .transpose()?,
            pool: pool_layer(
                ctx,
                t.balance,
                t.retries,
                t.health_check,
                t.passive_ejection,
                &at("upstream"),
            )?,
        })
    }
}

/// What only a route itself can say.
pub(super) struct RouteIdentity {
    pub(super) name: String,
    pub(super) listen: SocketAddr,
    pub(super) servers: Vec<Server>,
    /// Where errors about the finished route point: the route's table.
    pub(super) span: std::ops::Range<usize>,
    /// TLS of each side, already inherited and checked (config/tls.rs).
    pub(super) client_tls: Option<super::ClientTls>,
    pub(super) upstream_tls: Option<super::UpstreamTls>,
}

/// The finished route: each field from the route, else `[defaults]`, else
/// built in, then the checks that need the finished values.
pub(super) fn finish(
    ctx: &Ctx<'_>,
    id: RouteIdentity,
    layer: RouteLayer,
    defaults: &RouteLayer,
) -> Result<Route, ConfigError> {
    let at = |field: &str| format!("route \"{}\".{field}", id.name);
    let pool = finish_pool(ctx, layer.pool, defaults.pool.clone(), &at("upstream"))?;
    let client_keepalive = layer.client.over(defaults.client).finish();
    let upstream_keepalive = layer.upstream.over(defaults.upstream).finish();
    let client_limit = layer.client_limit.or(defaults.client_limit);
    let upstream_limit = layer.upstream_limit.or(defaults.upstream_limit);
    for (side, spec, limit) in [
        ("client", &client_keepalive, &client_limit),
        ("upstream", &upstream_keepalive, &upstream_limit),
    ] {
        if let Err((problem, hint)) = check_auto_user_timeout(spec) {
            return ctx.err(
                id.span.clone(),
                &at(&format!("{side}.keepalive.user_timeout")),
                problem,
                hint,
            );
        }
        // Checked on the finished spec: the limit and the keepalive may each
        // come from the route or from [defaults].
        if let Some(limit) = limit {
            let table = format!("{side}.keepalive");
            if let Err((problem, hint)) = check_against_limit(spec, limit, &table) {
                return ctx.err(id.span.clone(), &at(&table), problem, hint);
            }
        }
    }
    let proxy_protocol = layer
        .proxy_protocol
        .or(defaults.proxy_protocol)
        .unwrap_or(false)
        .then(|| {
            layer
                .proxy_protocol_timeout
                .or(defaults.proxy_protocol_timeout)
                .unwrap_or(DEFAULT_PROXY_PROTOCOL_TIMEOUT)
        });
    Ok(Route {
        name: id.name,
        listen: id.listen,
        client: ClientSpec {
            keepalive: client_keepalive,
            path_idle_limit: client_limit,
            proxy_protocol,
            tls: id.client_tls,
        },
        upstream: UpstreamSpec {
            servers: id.servers,
            balance: pool.balance,
            retries: pool.retries,
            health_check: pool.health_check,
            ejection: pool.ejection,
            connect_timeout: layer
                .connect_timeout
                .or(defaults.connect_timeout)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            keepalive: upstream_keepalive,
            path_idle_limit: upstream_limit,
            send_proxy: layer
                .send_proxy
                .or(defaults.send_proxy)
                .unwrap_or(SendProxy::Off),
            tls: id.upstream_tls,
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
        max_connections: layer
            .max_connections
            .or(defaults.max_connections)
            .unwrap_or(Some(DEFAULT_MAX_CONNECTIONS)),
    })
}

fn path_limit(ctx: &Ctx<'_>, s: &SStr, field: &str) -> Result<PathIdleLimit, ConfigError> {
    parse_path_idle_limit(s.get_ref())
        .or_else(|(problem, hint)| ctx.err(s.span(), field, problem, hint))
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

fn send_proxy(ctx: &Ctx<'_>, s: &SStr, field: &str) -> Result<SendProxy, ConfigError> {
    match s.get_ref().trim() {
        "off" => Ok(SendProxy::Off),
        "v1" => Ok(SendProxy::V1),
        "v2" => Ok(SendProxy::V2),
        other => ctx.err(
            s.span(),
            field,
            format!("{other:?} is not a PROXY protocol version"),
            "use \"v1\" (text), \"v2\" (binary) or \"off\" (the default); the upstream must expect that header",
        ),
    }
}

/// `max_connections`: a whole number, 0 for unlimited.
fn max_connections(
    ctx: &Ctx<'_>,
    n: &Spanned<i64>,
    field: &str,
) -> Result<Option<u32>, ConfigError> {
    match *n.get_ref() {
        0 => Ok(None),
        v if v > 0 && v <= i64::from(MAX_MAX_CONNECTIONS) => Ok(Some(v as u32)),
        v => ctx.err(
            n.span(),
            field,
            format!("{v} is not a usable number of live pairs"),
            format!("use a whole number from 1 to {MAX_MAX_CONNECTIONS}, or 0 for no limit"),
        ),
    }
}
