//! Command line. No I/O here: arguments become config types.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{
    self, Balance, ClientSpec, Config, KeepaliveSpec, OnPeerFailure, Route, SendProxy, Server,
    UpstreamSpec, DEFAULT_ADMIN_LISTEN, DEFAULT_CONNECT_TIMEOUT, DEFAULT_EJECTION,
    DEFAULT_HALF_CLOSE_TIMEOUT, DEFAULT_SHUTDOWN_GRACE,
};
use crate::telemetry::LogFormat;

pub mod generate;

/// Where `run` and `check` look when neither -c nor KAPROXY_CONFIG is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kaproxy/kaproxy.toml";

/// `kaproxy --version`: the package version and the git commit it was built
/// from (build.rs; "unknown" when built without git or a crate's vcs info).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KAPROXY_GIT_COMMIT"),
    ")"
);

/// kaproxy: TCP forwarding with per-side keepalive that closes half-dead connection pairs.
#[derive(Debug, Parser)]
#[command(name = "kaproxy", version = VERSION, about, propagate_version = true)]
pub struct Cli {
    /// Log output format (the filter comes from KAPROXY_LOG, default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Worker threads that accept and relay; each route listens once per worker
    /// (SO_REUSEPORT). 0 = one per CPU the process may use.
    #[arg(long, env = "KAPROXY_WORKERS", default_value_t = 0, global = true, value_parser = parse_workers)]
    pub workers: usize,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy on a configuration file, in the foreground, until SIGTERM or SIGINT.
    ///
    /// SIGHUP reloads the configuration file; see also --watch.
    Run {
        /// Configuration file.
        #[arg(short = 'c', long = "config", env = "KAPROXY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Also reload when the configuration file changes (editors that
        /// replace the file and the symlink swap of a Kubernetes ConfigMap
        /// included). Changes within half a second make one reload.
        #[arg(long, env = "KAPROXY_WATCH")]
        watch: bool,
    },
    /// Validate a configuration file and print each route's effective settings.
    Check {
        /// Configuration file.
        #[arg(short = 'c', long = "config", env = "KAPROXY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Forward one listen address to one or more servers, without a file.
    Forward(Box<ForwardArgs>),
    /// Show routes, pairs, servers and close reasons from a running kaproxy's admin endpoint.
    Status {
        /// The admin endpoint.
        #[arg(long, value_parser = parse_listen_arg, default_value = DEFAULT_ADMIN_LISTEN)]
        admin: std::net::SocketAddr,
    },
    /// Measure after how much idle time the network path to a TCP server drops a
    /// connection, and print the keepalive to set (and the path_idle_limit line).
    Probe(ProbeArgs),
    /// Exit 0 when the kaproxy running on this configuration is healthy (for container
    /// HEALTHCHECKs): its admin /healthz answers 200, or, with the admin endpoint off,
    /// every route accepts connections.
    Healthcheck {
        /// Configuration file of the kaproxy to check.
        #[arg(short = 'c', long = "config", env = "KAPROXY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

/// `kaproxy forward` arguments.
#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Address to listen on, IP:PORT (port 0 picks a free port).
    #[arg(value_parser = parse_listen_arg)]
    pub listen: std::net::SocketAddr,
    /// Upstream servers, host:port, spread as --balance says.
    #[arg(required = true, value_parser = parse_server_arg)]
    pub servers: Vec<config::ServerAddr>,
    /// Client-side keepalive as IDLE/INTERVAL/PROBES[/USER_TIMEOUT[/STALL_TIMEOUT]], or "off".
    #[arg(long, default_value = "60s/10s/3", value_parser = config::parse_keepalive_shorthand)]
    pub client_keepalive: KeepaliveSpec,
    /// Upstream-side keepalive as IDLE/INTERVAL/PROBES[/USER_TIMEOUT[/STALL_TIMEOUT]], or "off".
    #[arg(long, default_value = "60s/10s/3", value_parser = config::parse_keepalive_shorthand)]
    pub upstream_keepalive: KeepaliveSpec,
    /// How new connections are spread: round-robin, least-connections, random or first.
    #[arg(long, value_parser = parse_balance, default_value = "round-robin")]
    pub balance: Balance,
    /// Bound on resolving an upstream server's name, and on the connect to each address.
    #[arg(long, value_parser = parse_positive_duration, default_value = "3s")]
    pub connect_timeout: Duration,
    /// Close a pair after this long with no byte either way ("0s" = off).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub idle_timeout: Duration,
    /// Close a pair after this long half-closed ("0s" = off).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub half_close_timeout: Duration,
    /// How the survivor is told when the other side fails: reset or close.
    #[arg(long, value_parser = parse_on_peer_failure, default_value = "reset")]
    pub on_peer_failure: OnPeerFailure,
    /// Time live pairs get to finish after SIGTERM/SIGINT.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,
    /// Live pairs at most; further clients wait in the listen backlog (0 = unlimited).
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: u32,
    /// Expect a PROXY header (v1 or v2) at the start of every client connection.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Bound on receiving a whole PROXY header.
    #[arg(long, value_parser = parse_positive_duration, default_value = "3s")]
    pub proxy_protocol_timeout: Duration,
    /// PROXY header sent first to the upstream: off, v1 or v2.
    #[arg(long, value_parser = parse_send_proxy, default_value = "off")]
    pub send_proxy: SendProxy,
    /// Admin endpoint address, or "off".
    #[arg(long, value_parser = parse_admin, default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin: AdminListen,
    /// Terminate TLS from clients with this PEM certificate chain (needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Originate TLS to the servers.
    #[arg(long)]
    pub upstream_tls: bool,
    /// PEM file of the CAs the servers' certificates must chain to (default: the system's).
    #[arg(long, value_name = "FILE", requires = "upstream_tls")]
    pub upstream_ca: Option<PathBuf>,
    /// SNI name sent to the servers and verified (default: each server's host).
    #[arg(long, value_name = "NAME", requires = "upstream_tls")]
    pub upstream_server_name: Option<String>,
}

/// `kaproxy probe` arguments.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The server to probe: any TCP service that leaves an idle connection
    /// open and sends no keepalives of its own (a web server's keep-alive port,
    /// a database, a `kaproxy forward --client-keepalive off`).
    #[arg(value_name = "HOST:PORT", value_parser = parse_server_arg)]
    pub server: config::ServerAddr,
    /// Longest idle time tested; every wait is bounded by it.
    #[arg(long, value_parser = parse_probe_max, default_value = "30m")]
    pub max: Duration,
    /// Stop once the bound is this narrow.
    #[arg(long, value_parser = parse_probe_resolution, default_value = "5s")]
    pub resolution: Duration,
    /// Connections open at once, each idle for a different time (1 to 256).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub connections: u16,
    /// Print the result as JSON on stdout (progress on stderr only on a terminal).
    #[arg(long)]
    pub json: bool,
}

// Keep the clap range in step with the probe's own bound.
const _: () = assert!(crate::probe::MAX_CONNECTIONS == 256);

impl ProbeArgs {
    /// The probe's settings, or why these arguments do not go together.
    pub fn settings(&self) -> Result<crate::probe::plan::Settings, String> {
        if self.resolution >= self.max {
            return Err(format!(
                "--resolution {} must be shorter than --max {}",
                config::fmt_duration(self.resolution),
                config::fmt_duration(self.max)
            ));
        }
        Ok(crate::probe::plan::Settings {
            max: self.max,
            resolution: self.resolution,
            connections: usize::from(self.connections),
        })
    }
}

/// Longest `--max`: a day, far beyond any middlebox default (the longest
/// common one is 20 minutes) while a probe still ends on its own.
const PROBE_MAX_LIMIT: Duration = Duration::from_secs(24 * 3600);

fn parse_probe_max(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d < Duration::from_secs(2) || d > PROBE_MAX_LIMIT {
        return Err(format!(
            "{s:?} is out of range: --max takes 2s to 24h, e.g. \"30m\""
        ));
    }
    Ok(d)
}

fn parse_probe_resolution(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is finer than the probe can tell: --resolution takes 1s or more, e.g. \"5s\""
        ));
    }
    Ok(d)
}

impl ForwardArgs {
    /// The single-route configuration these arguments describe.
    pub fn into_config(self) -> Config {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Config {
            source: "<command line>".to_string(),
            shutdown_grace: self.shutdown_grace,
            admin: self.admin.0,
            overrides: Vec::new(),
            routes: vec![Route {
                name: "forward".to_string(),
                listen: self.listen,
                client: ClientSpec {
                    keepalive: self.client_keepalive,
                    path_idle_limit: None,
                    proxy_protocol: self.proxy_protocol.then_some(self.proxy_protocol_timeout),
                    tls: match (self.tls_cert, self.tls_key) {
                        (Some(cert), Some(key)) => Some(config::ClientTls {
                            certificates: vec![config::CertFiles { cert, key }],
                            client_ca: None,
                            min_version: config::TlsVersion::V1_2,
                            alpn: Vec::new(),
                            handshake_timeout: config::DEFAULT_HANDSHAKE_TIMEOUT,
                        }),
                        _ => None,
                    },
                },
                upstream: UpstreamSpec {
                    servers: self
                        .servers
                        .into_iter()
                        .map(|addr| Server { addr, weight: 1 })
                        .collect(),
                    balance: self.balance,
                    retries: None,
                    health_check: None,
                    ejection: DEFAULT_EJECTION,
                    connect_timeout: self.connect_timeout,
                    keepalive: self.upstream_keepalive,
                    path_idle_limit: None,
                    send_proxy: self.send_proxy,
                    tls: self.upstream_tls.then(|| config::UpstreamTls {
                        ca: self
                            .upstream_ca
                            .map_or(config::CaSource::System, config::CaSource::File),
                        server_name: self.upstream_server_name,
                        client_cert: None,
                        insecure_skip_verify: false,
                        handshake_timeout: config::DEFAULT_HANDSHAKE_TIMEOUT,
                    }),
                },
                idle_timeout: nonzero(self.idle_timeout),
                half_close_timeout: nonzero(self.half_close_timeout),
                on_peer_failure: self.on_peer_failure,
                max_connections: (self.max_connections > 0).then_some(self.max_connections),
            }],
        }
    }
}

// The clap defaults above spell out the built-in constants; keep them in step.
const _: () = {
    assert!(DEFAULT_CONNECT_TIMEOUT.as_secs() == 3);
    assert!(DEFAULT_HALF_CLOSE_TIMEOUT.as_secs() == 60);
    assert!(DEFAULT_SHUTDOWN_GRACE.as_secs() == 30);
};

fn parse_listen_arg(s: &str) -> Result<std::net::SocketAddr, String> {
    config::parse_listen(s)
        .map(Ok)
        .unwrap_or_else(|e| Err(format!("{e}; use IP:PORT such as 0.0.0.0:8080")))
}

fn parse_server_arg(s: &str) -> Result<config::ServerAddr, String> {
    config::parse_server(s)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be greater than zero".to_string()),
        Err(e) => Err(format!(
            "{s:?} is not a duration ({e}); write e.g. \"3s\" or \"500ms\""
        )),
    }
}

/// `--admin` value: an address, or `None` for "off". (A newtype because clap
/// reads a bare `Option` as "the flag may be absent".)
#[derive(Debug, Clone, Copy)]
pub struct AdminListen(pub Option<std::net::SocketAddr>);

fn parse_admin(s: &str) -> Result<AdminListen, String> {
    if s == "off" || s.is_empty() {
        return Ok(AdminListen(None));
    }
    parse_listen_arg(s).map(|a| AdminListen(Some(a)))
}

fn parse_balance(s: &str) -> Result<Balance, String> {
    match s {
        "round-robin" => Ok(Balance::RoundRobin),
        "least-connections" => Ok(Balance::LeastConnections),
        "random" => Ok(Balance::Random),
        "first" => Ok(Balance::First),
        _ => Err(format!(
            "{s:?}: use round-robin, least-connections, random or first"
        )),
    }
}

fn parse_send_proxy(s: &str) -> Result<SendProxy, String> {
    match s {
        "off" => Ok(SendProxy::Off),
        "v1" => Ok(SendProxy::V1),
        "v2" => Ok(SendProxy::V2),
        _ => Err(format!("{s:?}: use \"off\", \"v1\" or \"v2\"")),
    }
}

fn parse_on_peer_failure(s: &str) -> Result<OnPeerFailure, String> {
    match s {
        "reset" => Ok(OnPeerFailure::Reset),
        "close" => Ok(OnPeerFailure::Close),
        _ => Err(format!("{s:?}: use \"reset\" or \"close\"")),
    }
}

/// Most worker threads accepted: each costs a thread, an epoll and an eventfd
/// descriptor, a listener per route and about a megabyte, so a mistyped count
/// would start threads until descriptors or memory run out.
pub const MAX_WORKERS: usize = 1024;

fn parse_workers(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of worker threads (0 = one per CPU)"))?;
    if n > MAX_WORKERS {
        return Err(format!(
            "{n} worker threads is more than the {MAX_WORKERS} allowed; one per CPU (0, the default) is what a proxy needs"
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_builds_one_route_with_shorthand_keepalive() {
        let cli = Cli::try_parse_from([
            "kaproxy",
            "forward",
            "127.0.0.1:0",
            "a:1",
            "[::1]:2",
            "--client-keepalive",
            "20s/5s/4",
            "--upstream-keepalive",
            "off",
        ])
        .unwrap();
        let Command::Forward(args) = cli.command else {
            panic!("not forward")
        };
        let cfg = (*args).into_config();
        let r = &cfg.routes[0];
        assert_eq!(r.client.keepalive.idle, Duration::from_secs(20));
        assert_eq!(r.client.keepalive.probes, 4);
        assert_eq!(
            r.client.keepalive.effective_user_timeout(),
            Some(Duration::from_secs(40))
        );
        assert!(!r.upstream.keepalive.enabled);
        assert_eq!(r.upstream.servers.len(), 2);
        assert_eq!(r.upstream.servers[1].addr.to_string(), "[::1]:2");
    }

    #[test]
    fn probe_arguments_are_bounded() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["kaproxy", "probe"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv)
        };
        let Command::Probe(p) = parse(&["db:5432"]).unwrap().command else {
            panic!("not probe")
        };
        let st = p.settings().unwrap();
        assert_eq!(
            (st.max.as_secs(), st.resolution.as_secs(), st.connections),
            (1800, 5, 16)
        );
        for (args, message) in [
            (
                &["db:5432", "--connections", "0"][..],
                "0 is not in 1..=256",
            ),
            (
                &["db:5432", "--connections", "257"],
                "257 is not in 1..=256",
            ),
            (&["db:5432", "--max", "1s"], "--max takes 2s to 24h"),
            (&["db:5432", "--max", "2d"], "--max takes 2s to 24h"),
            (&["db:5432", "--resolution", "500ms"], "1s or more"),
            (&["db"], "port"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(message), "{args:?}: {err}");
        }
        let Command::Probe(p) = parse(&["db:5432", "--max", "10s", "--resolution", "10s"])
            .unwrap()
            .command
        else {
            panic!("not probe")
        };
        assert_eq!(
            p.settings().unwrap_err(),
            "--resolution 10s must be shorter than --max 10s"
        );
    }

    #[test]
    fn forward_rejects_subsecond_keepalive() {
        let err = Cli::try_parse_from([
            "kaproxy",
            "forward",
            "127.0.0.1:0",
            "a:1",
            "--client-keepalive",
            "1500ms/1s/3",
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("not a whole number of seconds"),
            "{err}"
        );
    }
}
