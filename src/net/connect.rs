//! Upstream connects: resolve on every attempt, options before connect(), a
//! timeout per server, and the next server from the pool's plan on failure.

use std::net::SocketAddr;
use std::time::Instant;

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

/// Tries the servers the pool plans, each within `connect_timeout`, and tells the
/// pool how each attempt went (passive ejection). A failure a retry recovers
/// from is invisible to the client.
pub async fn connect(spec: &UpstreamSpec, pool: &Pool) -> Result<Connected, ConnectError> {
    let mut attempts = Vec::new();
    for index in pool.plan() {
        let server = &pool.servers[index].spec.addr;
        let started = Instant::now();
        let error = match timeout(spec.connect_timeout, connect_one(server, &spec.keepalive)).await
        {
            Ok(Ok((stream, addr))) => {
                pool.connect_succeeded(index);
                return Ok(Connected {
                    stream,
                    server: index,
                    addr,
                });
            }
            Ok(Err(e)) => e,
            Err(_) => format!("timed out after {}", fmt_duration(spec.connect_timeout)),
        };
        tracing::warn!(server = %server, error = %error, "upstream connect failed");
        pool.connect_failed(index, started, &error);
        attempts.push(format!("{server}: {error}"));
    }
    Err(ConnectError { attempts })
}

/// Resolves the name now (a restarted container may have a new address) and
/// tries each address it resolves to, with `keepalive` set before connect().
pub async fn connect_one(
    server: &ServerAddr,
    keepalive: &KeepaliveSpec,
) -> Result<(TcpStream, SocketAddr), String> {
    let addrs = tokio::net::lookup_host((server.host.as_str(), server.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", server.host))?;
    let mut last = format!("{} resolved to no address", server.host);
    for addr in addrs {
        let socket = sockopt::upstream_socket(addr, keepalive)
            .map_err(|e| format!("cannot set up socket options: {e}"))?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}
