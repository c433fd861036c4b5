//! Upstream connects: resolve on every attempt, options before connect(), a
//! timeout per address, and the next server from the pool's plan on failure.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::{fmt_duration, KeepaliveSpec, ServerAddr, UpstreamSpec};
use crate::net::sockopt;
use crate::pool::{ActiveGuard, Pool};

/// One failed connect attempt: the server as configured and what went wrong.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    /// The server, as configured.
    pub server: String,
    /// What went wrong, address by address.
    pub error: String,
}

/// Every attempt failed; one entry per attempt, in order.
#[derive(Debug, thiserror::Error)]
#[error("no upstream server accepted the connection: {}", describe(.attempts))]
pub struct ConnectError {
    /// The attempts, in order.
    pub attempts: Vec<FailedAttempt>,
}

fn describe(attempts: &[FailedAttempt]) -> String {
    let each: Vec<String> = attempts
        .iter()
        .map(|a| format!("{}: {}", a.server, a.error))
        .collect();
    each.join("; ")
}

/// A connected upstream socket and where it goes.
#[derive(Debug)]
pub struct Connected {
    /// The connected socket, upstream options already in force.
    pub stream: TcpStream,
    /// Index of the server in the route's list.
    pub server: usize,
    /// The address it resolved to.
    pub addr: SocketAddr,
    /// Counts the pair against its server; the pair holds it while it lives.
    pub active: ActiveGuard,
    /// Attempts that failed before this one, for the caller to log: logging
    /// them here would need the pair's span for every pair, failing or not.
    pub failed: Vec<FailedAttempt>,
}

/// Tries the servers the pool plans, each address within `connect_timeout`, and
/// tells the pool how each attempt went (passive ejection). A failure a retry
/// recovers from is invisible to the client.
pub async fn connect(spec: &UpstreamSpec, pool: &Pool) -> Result<Connected, ConnectError> {
    let mut attempts = Vec::new();
    let (plan, mut first) = pool.plan_counting_first();
    for index in plan {
        let server = &pool.servers[index].spec.addr;
        let started = Instant::now();
        // Counted from the start, not once connected: otherwise a server that
        // accepts slowly looks idle to least-connections and draws every new
        // connection until its own connects finish.
        let active = first.take().unwrap_or_else(|| pool.acquire(index));
        match connect_one(server, &spec.keepalive, spec.connect_timeout).await {
            Ok((stream, addr)) => {
                pool.connect_succeeded(index);
                return Ok(Connected {
                    stream,
                    server: index,
                    addr,
                    active,
                    failed: attempts,
                });
            }
            Err(error) => {
                drop(active);
                pool.connect_failed(index, started, &error);
                attempts.push(FailedAttempt {
                    server: server.to_string(),
                    error,
                });
            }
        }
    }
    Err(ConnectError { attempts })
}

/// Resolves the name now (a restarted container may have a new address) and
/// tries each address it resolves to in turn, with `keepalive` set before
/// connect(). Resolving and each address's connect are bounded by `timeout_each`
/// on their own, so an address that drops SYNs does not use up the time of the
/// next one. The error names every address tried and what happened to it.
pub async fn connect_one(
    server: &ServerAddr,
    keepalive: &KeepaliveSpec,
    timeout_each: Duration,
) -> Result<(TcpStream, SocketAddr), String> {
    let lookup = tokio::net::lookup_host((server.host.as_str(), server.port));
    let addrs = match timeout(timeout_each, lookup).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => return Err(format!("cannot resolve {}: {e}", server.host)),
        Err(_) => {
            return Err(format!(
                "cannot resolve {}: no answer within {}",
                server.host,
                fmt_duration(timeout_each)
            ))
        }
    };
    let mut failures = Vec::new();
    for addr in addrs {
        let error = match sockopt::start_upstream_connect(addr, keepalive) {
            Err(e) => e.to_string(),
            Ok(socket) => match timeout(timeout_each, finish_connect(socket)).await {
                Ok(Ok(stream)) => return Ok((stream, addr)),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {}", fmt_duration(timeout_each)),
            },
        };
        tracing::debug!(server = %server, address = %addr, error, "upstream address failed");
        failures.push(format!("{addr}: {error}"));
    }
    if failures.is_empty() {
        return Err(format!("{} resolved to no address", server.host));
    }
    Err(failures.join(", "))
}

/// Waits for a started connect to finish. Writable without an error or
/// hang-up means established, so SO_ERROR is only read on failure: one
/// getsockopt(2) less per pair than tokio's own connect.
async fn finish_connect(socket: std::net::TcpStream) -> std::io::Result<TcpStream> {
    let stream = TcpStream::from_std(socket)?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(sockopt::connect_error(&stream));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::config::{Balance, Server, DEFAULT_EJECTION};
    use crate::telemetry::metrics::Metrics;

    /// A listener whose accept queue is full, so the kernel drops further SYNs and
    /// connects to it hang: a server that accepts slowly. Returns what must stay
    /// alive for that.
    async fn slow_server() -> (
        tokio::net::TcpListener,
        Vec<std::net::TcpStream>,
        SocketAddr,
    ) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => queued.push(s),
                Err(_) => return (listener, queued, addr),
            }
        }
        panic!("the accept queue of {addr} never filled");
    }

    fn spec(servers: &[SocketAddr], balance: Balance) -> UpstreamSpec {
        UpstreamSpec {
            servers: servers
                .iter()
                .map(|a| Server {
                    addr: ServerAddr {
                        host: a.ip().to_string(),
                        port: a.port(),
                    },
                    weight: 1,
                })
                .collect(),
            balance,
            send_proxy: crate::config::SendProxy::Off,
            tls: None,
            retries: None,
            health_check: None,
            ejection: DEFAULT_EJECTION,
            connect_timeout: Duration::from_secs(5),
            keepalive: KeepaliveSpec::default(),
            path_idle_limit: None,
        }
    }

    #[tokio::test]
    async fn a_connect_in_flight_counts_for_least_connections() {
        let (_slow, _queued, slow) = slow_server().await;
        let fast_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fast = fast_listener.local_addr().unwrap();
        let spec = spec(&[slow, fast], Balance::LeastConnections);
        let pool = Pool::new("t", &spec, Arc::new(Metrics::new()));

        // Both idle: least-connections breaks the tie towards the first, the slow one.
        let mut hanging = Box::pin(connect(&spec, &pool));
        assert!(
            timeout(Duration::from_millis(300), &mut hanging)
                .await
                .is_err(),
            "the connect to the slow server is still in flight"
        );
        assert_eq!(pool.view(0).active_pairs, 1, "the attempt in flight counts");
        for k in 0..4 {
            let c = timeout(Duration::from_secs(2), connect(&spec, &pool))
                .await
                .unwrap_or_else(|_| panic!("connection {k} went to the slow server"))
                .expect("connected");
            assert_eq!(c.server, 1, "connection {k} goes to the idle fast server");
            assert_eq!(pool.view(1).active_pairs, 1, "the pair holds its count");
            drop(c);
            assert_eq!(pool.view(1).active_pairs, 0);
        }
        drop(hanging);
        assert_eq!(
            pool.view(0).active_pairs,
            0,
            "an abandoned attempt gives its count back"
        );
    }

    #[tokio::test]
    async fn a_failed_attempt_gives_its_count_back() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let spec = spec(&[dead], Balance::LeastConnections);
        let pool = Pool::new("t", &spec, Arc::new(Metrics::new()));
        let e = connect(&spec, &pool).await.expect_err("refused");
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(pool.view(0).active_pairs, 0);
    }
}
