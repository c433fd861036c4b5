//! Upstream connects: resolve on every attempt, options before connect(), a
//! timeout per address, and the next server from the pool's plan on failure.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::{fmt_duration, KeepaliveSpec, ServerAddr, UpstreamSpec};
use crate::net::sockopt;
use crate::pool::Pool;

/// Every attempt failed; one entry per attempt, in order.
#[derive(Debug, thiserror::Error)]
#[error("no upstream server accepted the connection: {}", .attempts.join("; "))]
pub struct ConnectError {
    /// `server: what went wrong`.
    pub attempts: Vec<String>,
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
}

/// Tries the servers the pool plans, each address within `connect_timeout`, and
/// tells the pool how each attempt went (passive ejection). A failure a retry
/// recovers from is invisible to the client.
pub async fn connect(spec: &UpstreamSpec, pool: &Pool) -> Result<Connected, ConnectError> {
    let mut attempts = Vec::new();
    for index in pool.plan() {
        let server = &pool.servers[index].spec.addr;
        let started = Instant::now();
        match connect_one(server, &spec.keepalive, spec.connect_timeout).await {
            Ok((stream, addr)) => {
                pool.connect_succeeded(index);
                return Ok(Connected {
                    stream,
                    server: index,
                    addr,
                });
            }
            Err(error) => {
                tracing::warn!(server = %server, error = %error, "upstream connect failed");
                pool.connect_failed(index, started, &error);
                attempts.push(format!("{server}: {error}"));
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
        let error = match sockopt::upstream_socket(addr, keepalive) {
            Err(e) => format!("cannot set up socket options: {e}"),
            Ok(socket) => match timeout(timeout_each, socket.connect(addr)).await {
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
