//! Serde mirror of the TOML file. Everything is optional and spanned so that
//! the resolve step can apply inheritance and point at the exact line.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// Spanned string, the form every duration and address arrives in.
pub type SStr = Spanned<String>;

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub shutdown_grace: Option<SStr>,
    pub admin: Option<RawAdmin>,
    pub defaults: Option<RawDefaults>,
    pub route: Option<Spanned<Vec<Spanned<RawRoute>>>>,
}

/// `[admin]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<SStr>,
    pub enabled: Option<Spanned<bool>>,
}

/// `[defaults]`: everything a route can set except its name, listen address and servers.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub idle_timeout: Option<SStr>,
    pub half_close_timeout: Option<SStr>,
    pub on_peer_failure: Option<SStr>,
    pub max_connections: Option<Spanned<i64>>,
    pub client: Option<RawClient>,
    pub upstream: Option<RawUpstreamDefaults>,
}

/// One `[[route]]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<SStr>,
    pub listen: Option<SStr>,
    pub idle_timeout: Option<SStr>,
    pub half_close_timeout: Option<SStr>,
    pub on_peer_failure: Option<SStr>,
    pub max_connections: Option<Spanned<i64>>,
    pub client: Option<RawClient>,
    pub upstream: Option<RawUpstream>,
}

/// `client` table of a route or of the defaults.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub keepalive: Option<RawKeepalive>,
    pub path_idle_limit: Option<SStr>,
    pub proxy_protocol: Option<Spanned<bool>>,
    pub proxy_protocol_timeout: Option<SStr>,
    /// `[client.tls]`: terminate TLS (see config/tls.rs).
    pub tls: Option<super::tls::RawClientTls>,
}

/// `[defaults.upstream]`: servers are per route only.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamDefaults {
    pub connect_timeout: Option<SStr>,
    pub path_idle_limit: Option<SStr>,
    pub keepalive: Option<RawKeepalive>,
    pub send_proxy: Option<SStr>,
    pub balance: Option<SStr>,
    pub retries: Option<Spanned<i64>>,
    pub health_check: Option<RawHealthCheck>,
    pub passive_ejection: Option<RawEjection>,
    /// `[upstream.tls]`: originate TLS (see config/tls.rs).
    pub tls: Option<super::tls::RawUpstreamTls>,
}

/// `[route.upstream]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Each entry is `"host:port"` or `{ address = "host:port", weight = N }`;
    /// kept as values so both forms keep their line numbers.
    pub servers: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    pub connect_timeout: Option<SStr>,
    pub path_idle_limit: Option<SStr>,
    pub keepalive: Option<RawKeepalive>,
    pub send_proxy: Option<SStr>,
    pub balance: Option<SStr>,
    pub retries: Option<Spanned<i64>>,
    pub health_check: Option<RawHealthCheck>,
    pub passive_ejection: Option<RawEjection>,
    /// `[upstream.tls]`: originate TLS (see config/tls.rs).
    pub tls: Option<super::tls::RawUpstreamTls>,
}

/// `health_check = { http = "/health", expect = "2xx", interval = "5s", ... }` or `{ tcp = true, ... }`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub tcp: Option<Spanned<bool>>,
    pub http: Option<SStr>,
    pub expect: Option<SStr>,
    pub host: Option<SStr>,
    pub interval: Option<SStr>,
    pub timeout: Option<SStr>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
}

/// `passive_ejection = { failures = 3, backoff = "10s", max_backoff = "5m" }`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawEjection {
    pub failures: Option<Spanned<i64>>,
    pub backoff: Option<SStr>,
    pub max_backoff: Option<SStr>,
}

/// A keepalive table; probes is signed so that `-1` gets our message, not serde's.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawKeepalive {
    pub enabled: Option<Spanned<bool>>,
    pub idle: Option<SStr>,
    pub interval: Option<SStr>,
    pub probes: Option<Spanned<i64>>,
    pub user_timeout: Option<SStr>,
    pub stall_timeout: Option<SStr>,
}

/// Settings from the environment (see `env.rs`), routes keyed by name.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawOverlay {
    pub shutdown_grace: Option<SStr>,
    pub admin: Option<RawAdmin>,
    pub defaults: Option<RawDefaults>,
    pub route: Option<BTreeMap<String, RawRoute>>,
}

/// Field-by-field overlay: a value in `over` replaces the one in `self`.
pub trait Merge {
    fn merge(self, over: Self) -> Self;
}

fn merge_opt<T: Merge>(base: Option<T>, over: Option<T>) -> Option<T> {
    match (base, over) {
        (Some(b), Some(o)) => Some(b.merge(o)),
        (b, None) => b,
        (None, o) => o,
    }
}

macro_rules! merge_struct {
    ($ty:ident { values: [$($v:ident),*], tables: [$($t:ident),*] }) => {
        impl Merge for $ty {
            fn merge(self, over: Self) -> Self {
                $ty {
                    $($v: over.$v.or(self.$v),)*
                    $($t: merge_opt(self.$t, over.$t),)*
                }
            }
        }
    };
}

merge_struct!(RawAdmin {
    values: [listen, enabled],
    tables: []
});
merge_struct!(RawDefaults {
    values: [
        idle_timeout,
        half_close_timeout,
        on_peer_failure,
        max_connections
    ],
    tables: [client, upstream]
});
merge_struct!(RawRoute {
    values: [
        name,
        listen,
        idle_timeout,
        half_close_timeout,
        on_peer_failure,
        max_connections
    ],
    tables: [client, upstream]
});
merge_struct!(RawClient {
    values: [path_idle_limit, proxy_protocol, proxy_protocol_timeout],
    tables: [keepalive, tls]
});
merge_struct!(RawUpstreamDefaults {
    values: [
        connect_timeout,
        path_idle_limit,
        send_proxy,
        balance,
        retries
    ],
    tables: [keepalive, health_check, passive_ejection, tls]
});
merge_struct!(RawUpstream {
    values: [
        servers,
        connect_timeout,
        path_idle_limit,
        send_proxy,
        balance,
        retries
    ],
    tables: [keepalive, health_check, passive_ejection, tls]
});
merge_struct!(RawKeepalive {
    values: [enabled, idle, interval, probes, user_timeout, stall_timeout],
    tables: []
});
merge_struct!(RawHealthCheck {
    values: [tcp, http, expect, host, interval, timeout, rise, fall],
    tables: []
});
merge_struct!(RawEjection {
    values: [failures, backoff, max_backoff],
    tables: []
});
