//! Validated, typed configuration.
//!
//! Loading goes file → [`raw`] (serde mirror, spans) → [`resolve`] (inheritance,
//! kernel range checks) → [`Config`]. Nothing past this module sees an `Option`
//! for a value that is required, or a duration the kernel cannot take.

mod env;
mod error;
mod keepalive;
mod path_limit;
mod pool;
mod raw;
mod resolve;
mod route;
mod source;
mod tls;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use env::route_key;
pub use error::{ConfigError, Location};
pub use keepalive::parse_keepalive_shorthand;
pub use path_limit::{
    check_against_limit, parse_path_idle_limit, recommend, safe_budget, PathIdleLimit, PRESETS,
    SAFE_PERCENT,
};
pub use pool::parse_server;
pub use resolve::parse_listen;
pub use tls::{CaSource, CertFiles, ClientTls, TlsVersion, UpstreamTls, DEFAULT_HANDSHAKE_TIMEOUT};

/// Built-in keepalive idle time for both sides.
pub const DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Built-in keepalive probe interval for both sides.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Built-in number of unanswered probes before a side is dead.
pub const DEFAULT_KEEPALIVE_PROBES: u32 = 3;
/// Built-in upstream connect timeout, per server attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Built-in bound on how long a pair may stay half-closed.
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Built-in admin endpoint address: loopback only, since it shows every connection.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// [`DEFAULT_ADMIN_LISTEN`] as an address.
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9901,
));
/// Built-in bound on receiving a whole PROXY header.
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(3);
/// Built-in limit of live pairs per route. A bound rather than none, so that a
/// flood on one route cannot take every descriptor from the others; 10,000
/// pairs (20,000 descriptors) is beyond what most single backends serve, and
/// fits the hard descriptor limit of systemd (524,288) and Docker (1,048,576)
/// many times over. kaproxy warns at start when the limit cannot hold it.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Largest `max_connections`: far above any descriptor limit a kernel allows
/// (fs.nr_open is at most 1,073,741,816, two per pair).
pub const MAX_MAX_CONNECTIONS: u32 = 500_000_000;
/// Built-in time live pairs get to finish after SIGTERM/SIGINT.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (file path or `<command line>`), for messages.
    pub source: String,
    /// Time live pairs get to finish after the first SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Where the admin endpoint listens; `None` = off.
    pub admin: Option<SocketAddr>,
    /// At least one route, names and listen addresses unique.
    pub routes: Vec<Route>,
    /// The environment variables that overrode settings of the file.
    pub overrides: Vec<String>,
}

/// One listener and where its connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Unique name, used in logs.
    pub name: String,
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Client-side socket settings.
    pub client: ClientSpec,
    /// Upstream servers and upstream-side socket settings.
    pub upstream: UpstreamSpec,
    /// No byte in either direction for this long closes the pair; `None` = off.
    pub idle_timeout: Option<Duration>,
    /// A pair half-closed for this long is closed; `None` = off.
    pub half_close_timeout: Option<Duration>,
    /// How the survivor is told when the other side fails.
    pub on_peer_failure: OnPeerFailure,
    /// Live pairs at most; `None` = unlimited. At the limit the route stops
    /// accepting and new clients wait in the listen backlog.
    pub max_connections: Option<u32>,
}

/// Client side of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// Keepalive applied to every accepted socket.
    pub keepalive: KeepaliveSpec,
    /// Idle timeout of the path between clients and kaproxy, when known;
    /// the keepalive has been checked to stay safely below it.
    pub path_idle_limit: Option<PathIdleLimit>,
    /// Every connection must start with a PROXY header (v1 or v2), received
    /// within this time; `None` = no header expected.
    pub proxy_protocol: Option<Duration>,
    /// Terminate TLS from clients; `None` = plain TCP.
    pub tls: Option<ClientTls>,
}

/// Upstream side of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// One or more servers.
    pub servers: Vec<Server>,
    /// How new connections are spread over the servers.
    pub balance: Balance,
    /// Further servers tried after a failed connect; `None` = every server once.
    pub retries: Option<u32>,
    /// Active health checks, if configured.
    pub health_check: Option<HealthCheck>,
    /// Passive ejection on consecutive connect failures.
    pub ejection: Ejection,
    /// Bound on resolving a server's name, and on the connect to each address.
    pub connect_timeout: Duration,
    /// Keepalive applied to every upstream socket before connect().
    pub keepalive: KeepaliveSpec,
    /// Idle timeout of the path between kaproxy and the servers, when known;
    /// the keepalive has been checked to stay safely below it.
    pub path_idle_limit: Option<PathIdleLimit>,
    /// The PROXY header sent first on every upstream connection.
    pub send_proxy: SendProxy,
    /// Originate TLS to the servers; `None` = plain TCP.
    pub tls: Option<UpstreamTls>,
}

/// Which PROXY header kaproxy sends to the upstream, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxy {
    /// None.
    Off,
    /// Version 1, text.
    V1,
    /// Version 2, binary.
    V2,
}

impl SendProxy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SendProxy::Off => "off",
            SendProxy::V1 => "v1",
            SendProxy::V2 => "v2",
        }
    }
}

/// One upstream server of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Where it is.
    pub addr: ServerAddr,
    /// Relative share of new connections, 1..=1000.
    pub weight: u32,
}

/// Load-balancing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round-robin.
    RoundRobin,
    /// Fewest active pairs per unit of weight.
    LeastConnections,
    /// Weighted random.
    Random,
    /// The first healthy server in list order gets everything (active/passive).
    First,
}

impl Balance {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
            Balance::Random => "random",
            Balance::First => "first",
        }
    }
}

/// Active health checking of every server of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What a check does.
    pub kind: HealthKind,
    /// Time between checks of one server.
    pub interval: Duration,
    /// Bound on one check.
    pub timeout: Duration,
    /// Consecutive successes that bring a down server up.
    pub rise: u32,
    /// Consecutive failures that take an up server down.
    pub fall: u32,
}

/// The kind of health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connect succeeds.
    Tcp,
    /// An HTTP/1.1 GET of `path` answers with a status `expect` accepts.
    Http {
        /// Request path, starting with '/'.
        path: String,
        /// Accepted statuses.
        expect: StatusMatch,
        /// Host header; the server's own host:port when `None`.
        host: Option<String>,
    },
}

/// Accepted HTTP statuses: inclusive ranges, e.g. "2xx" = 200..=299.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMatch {
    /// The ranges.
    pub ranges: Vec<(u16, u16)>,
    /// As written, for messages.
    pub text: String,
}

impl StatusMatch {
    /// Whether `status` is accepted.
    pub fn accepts(&self, status: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

/// Passive ejection: a server that fails `failures` connects in a row is left
/// out for `backoff`, doubling each time a connect started after the last
/// ejection ended fails too, up to `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive connect failures before ejection; 0 = off.
    pub failures: u32,
    /// First ejection period.
    pub backoff: Duration,
    /// Longest ejection period.
    pub max_backoff: Duration,
}

/// Built-in passive ejection: 3 failures, 10 s doubling up to 5 min.
pub const DEFAULT_EJECTION: Ejection = Ejection {
    failures: 3,
    backoff: Duration::from_secs(10),
    max_backoff: Duration::from_secs(300),
};

/// What to do to the surviving side when the other one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPeerFailure {
    /// SO_LINGER 0 then close: the survivor's peer sees a reset, never a clean EOF.
    Reset,
    /// Plain close: the survivor's peer sees a FIN.
    Close,
}

impl OnPeerFailure {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnPeerFailure::Reset => "reset",
            OnPeerFailure::Close => "close",
        }
    }
}

/// How long a side may leave sent data unacknowledged before it is declared dead.
///
/// kaproxy enforces it itself, from TCP_INFO, instead of handing it to the
/// kernel as TCP_USER_TIMEOUT: since Linux 5.11 that option also ends a
/// connection whose peer is alive and answers zero-window probes but does not
/// read, which would call a slow reader dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserTimeout {
    /// idle + interval × probes when keepalive is on, off otherwise.
    Auto,
    /// Not enforced (kernel retransmission limits apply, about 15 minutes).
    Off,
    /// This value.
    Fixed(Duration),
}

/// Largest `user_timeout`: what TCP_USER_TIMEOUT itself could hold (2³¹−1 ms, about 24.8 days).
pub const MAX_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// Keepalive settings of one side, already checked against what the kernel accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveSpec {
    /// SO_KEEPALIVE.
    pub enabled: bool,
    /// TCP_KEEPIDLE, whole seconds 1..=32767.
    pub idle: Duration,
    /// TCP_KEEPINTVL, whole seconds 1..=32767.
    pub interval: Duration,
    /// TCP_KEEPCNT, 1..=127.
    pub probes: u32,
    /// Bound on unacknowledged data from a silent peer (see [`UserTimeout`]).
    pub user_timeout: UserTimeout,
    /// A peer that is alive but accepts no data for this long is closed as
    /// stalled; `None` (the default) leaves slow readers alone.
    pub stall_timeout: Option<Duration>,
}

impl Default for KeepaliveSpec {
    fn default() -> Self {
        KeepaliveSpec {
            enabled: true,
            idle: DEFAULT_KEEPALIVE_IDLE,
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            probes: DEFAULT_KEEPALIVE_PROBES,
            user_timeout: UserTimeout::Auto,
            stall_timeout: None,
        }
    }
}

impl KeepaliveSpec {
    /// Worst-case time to declare an idle peer dead: idle + interval × probes.
    /// `None` when keepalive is off.
    pub fn detection_bound(&self) -> Option<Duration> {
        self.enabled
            .then(|| self.idle + self.interval * self.probes)
    }

    /// How long a peer with data in flight may stay silent (no ACK at all)
    /// before it is declared dead; `None` for off.
    pub fn effective_user_timeout(&self) -> Option<Duration> {
        match self.user_timeout {
            UserTimeout::Auto => self.detection_bound(),
            UserTimeout::Off => None,
            UserTimeout::Fixed(d) => Some(d),
        }
    }
}

/// An upstream server as written: host name or IP, and port. Names are
/// resolved on every connect so that a restarted container is found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port, 1..=65535.
    pub port: u16,
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Config {
    /// Reads and validates a configuration file, with `KAPROXY_*` overrides
    /// from this process's environment applied.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Config::load_with_env(path, &env)
    }

    /// Reads and validates a configuration file with these environment variables.
    pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        resolve::resolve(&path.display().to_string(), &text, env)
    }

    /// Validates configuration text without environment overrides; `source` names it in messages.
    pub fn from_toml(source: &str, text: &str) -> Result<Config, ConfigError> {
        resolve::resolve(source, text, &[])
    }

    /// A human-readable summary of every route's effective settings, as `kaproxy check` prints it.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "{}: ok, {} route(s)", self.source, self.routes.len());
        for var in &self.overrides {
            let _ = writeln!(out, "overridden by the environment: {var}");
        }
        let _ = writeln!(
            out,
            "shutdown_grace = {}",
            fmt_duration(self.shutdown_grace)
        );
        let admin = self
            .admin
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".to_string());
        let _ = writeln!(out, "admin          = {admin}");
        for route in &self.routes {
            let _ = writeln!(out, "\nroute \"{}\"", route.name);
            let _ = writeln!(out, "  listen             = {}", route.listen);
            let u = &route.upstream;
            let servers: Vec<String> = u
                .servers
                .iter()
                .map(|s| {
                    if s.weight == 1 {
                        s.addr.to_string()
                    } else {
                        format!("{} (weight {})", s.addr, s.weight)
                    }
                })
                .collect();
            let _ = writeln!(out, "  servers            = {}", servers.join(", "));
            let _ = writeln!(out, "  balance            = {}", u.balance.as_str());
            let _ = writeln!(
                out,
                "  retries            = {}",
                match u.retries {
                    Some(n) => n.to_string(),
                    None => format!("{} (every server once)", u.servers.len() - 1),
                }
            );
            let _ = writeln!(
                out,
                "  health_check       = {}",
                describe_health(u.health_check.as_ref())
            );
            let _ = writeln!(
                out,
                "  passive_ejection   = {}",
                describe_ejection(&u.ejection)
            );
            let _ = writeln!(
                out,
                "  connect_timeout    = {}",
                fmt_duration(route.upstream.connect_timeout)
            );
            let _ = writeln!(
                out,
                "  idle_timeout       = {}",
                fmt_opt(route.idle_timeout)
            );
            let _ = writeln!(
                out,
                "  half_close_timeout = {}",
                fmt_opt(route.half_close_timeout)
            );
            let _ = writeln!(
                out,
                "  on_peer_failure    = {}",
                route.on_peer_failure.as_str()
            );
            let _ = writeln!(
                out,
                "  max_connections    = {}",
                describe_limit(route.max_connections)
            );
            let _ = writeln!(
                out,
                "  proxy_protocol     = {}",
                match route.client.proxy_protocol {
                    Some(t) => format!(
                        "expected from clients (v1 or v2), within {}",
                        fmt_duration(t)
                    ),
                    None => "off".to_string(),
                }
            );
            let _ = writeln!(out, "  send_proxy         = {}", u.send_proxy.as_str());
            out.push_str(&tls::describe(
                route.client.tls.as_ref(),
                route.upstream.tls.as_ref(),
            ));
            for (side, ka, limit) in [
                (
                    "client",
                    &route.client.keepalive,
                    &route.client.path_idle_limit,
                ),
                (
                    "upstream",
                    &route.upstream.keepalive,
                    &route.upstream.path_idle_limit,
                ),
            ] {
                let _ = writeln!(out, "  {side:<8} keepalive  = {}", describe_keepalive(ka));
                let _ = writeln!(out, "  {side:<8} dead peer  = {}", describe_detection(ka));
                let _ = writeln!(out, "  {side:<8} slow peer  = {}", describe_stall(ka));
                if let Some(limit) = limit {
                    let _ = writeln!(
                        out,
                        "  {side:<8} path limit = {}",
                        describe_path_limit(ka, limit)
                    );
                }
            }
        }
        out
    }
}

fn describe_limit(limit: Option<u32>) -> String {
    match limit {
        Some(n) => format!("{n} live pairs, then clients wait in the listen backlog"),
        None => "unlimited".to_string(),
    }
}

fn describe_health(h: Option<&HealthCheck>) -> String {
    let Some(h) = h else {
        return "off (servers are only ejected passively)".to_string();
    };
    let kind = match &h.kind {
        HealthKind::Tcp => "tcp connect".to_string(),
        HealthKind::Http { path, expect, host } => match host {
            Some(host) => format!("http GET {path} (Host {host}) expecting {}", expect.text),
            None => format!("http GET {path} expecting {}", expect.text),
        },
    };
    format!(
        "{kind} every {} (timeout {}), up after {} passes, down after {} failures",
        fmt_duration(h.interval),
        fmt_duration(h.timeout),
        h.rise,
        h.fall
    )
}

fn describe_ejection(e: &Ejection) -> String {
    if e.failures == 0 {
        return "off".to_string();
    }
    format!(
        "after {} connect failures in a row, for {} doubling up to {}",
        e.failures,
        fmt_duration(e.backoff),
        fmt_duration(e.max_backoff)
    )
}

fn describe_keepalive(ka: &KeepaliveSpec) -> String {
    let ut = match ka.user_timeout {
        UserTimeout::Auto => match ka.effective_user_timeout() {
            Some(d) => format!("{} (auto)", fmt_duration(d)),
            None => "off (auto, keepalive off)".to_string(),
        },
        UserTimeout::Off => "off".to_string(),
        UserTimeout::Fixed(d) => fmt_duration(d),
    };
    let stall = fmt_opt(ka.stall_timeout);
    if ka.enabled {
        format!(
            "idle {} interval {} probes {} user_timeout {} stall_timeout {}",
            fmt_duration(ka.idle),
            fmt_duration(ka.interval),
            ka.probes,
            ut,
            stall
        )
    } else {
        format!("off, user_timeout {ut} stall_timeout {stall}")
    }
}

fn describe_detection(ka: &KeepaliveSpec) -> String {
    let idle = match ka.detection_bound() {
        Some(d) => format!("idle peer within {} (keepalive probes)", fmt_duration(d)),
        None => "idle peer never (keepalive off)".to_string(),
    };
    let in_flight = match ka.effective_user_timeout() {
        Some(d) => format!(
            "peer with data in flight within {} of its last ACK (user_timeout, checked by kaproxy in TCP_INFO)",
            fmt_duration(d)
        ),
        None => "peer with data in flight only by kernel retransmission limits (~15 min; user_timeout off)".to_string(),
    };
    format!("{idle}; {in_flight}")
}

fn describe_path_limit(ka: &KeepaliveSpec, limit: &PathIdleLimit) -> String {
    // The config was validated against this limit, so keepalive is on and fits.
    let used = ka.idle + ka.interval;
    format!(
        "{limit}: idle + interval = {}, margin {} below the limit (at most {} allowed, {SAFE_PERCENT}%)",
        fmt_duration(used),
        fmt_duration(limit.limit.saturating_sub(used)),
        fmt_duration(safe_budget(limit.limit)),
    )
}

fn describe_stall(ka: &KeepaliveSpec) -> String {
    match ka.stall_timeout {
        Some(d) => format!(
            "a live peer that accepts no data is closed after {} (stall_timeout), never called dead",
            fmt_duration(d)
        ),
        None => "a live peer that accepts no data is left alone (stall_timeout off), never called dead".to_string(),
    }
}

/// Formats a duration the way the config accepts it back ("1m 30s", "500ms").
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn fmt_opt(d: Option<Duration>) -> String {
    d.map(fmt_duration).unwrap_or_else(|| "off".to_string())
}
