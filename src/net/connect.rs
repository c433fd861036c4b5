//! Upstream connects: resolve on every attempt, options before connect(), a
//! timeout per server, and the next server on failure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::{ServerAddr, UpstreamSpec};
use crate::net::sockopt;

/// Every server failed; one entry per server tried, in order.
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
    /// The server as configured.
    pub server: ServerAddr,
    /// The address it resolved to.
    pub addr: SocketAddr,
}

/// Picks servers round-robin from `next`, trying each server once.
pub async fn connect(spec: &UpstreamSpec, next: &AtomicUsize) -> Result<Connected, ConnectError> {
    let n = spec.servers.len();
    let start = next.fetch_add(1, Ordering::Relaxed);
    let mut attempts = Vec::new();
    for i in 0..n {
        let server = &spec.servers[(start + i) % n];
        match timeout(spec.connect_timeout, connect_one(server, spec)).await {
            Ok(Ok((stream, addr))) => {
                return Ok(Connected {
                    stream,
                    server: server.clone(),
                    addr,
                })
            }
            Ok(Err(e)) => {
                tracing::warn!(server = %server, error = %e, "upstream connect failed");
                attempts.push(format!("{server}: {e}"));
            }
            Err(_) => {
                let e = format!(
                    "timed out after {}",
                    crate::config::fmt_duration(spec.connect_timeout)
                );
                tracing::warn!(server = %server, error = %e, "upstream connect failed");
                attempts.push(format!("{server}: {e}"));
            }
        }
    }
    Err(ConnectError { attempts })
}

/// Resolves the name now (a restarted container may have a new address) and
/// tries each address it resolves to.
async fn connect_one(
    server: &ServerAddr,
    spec: &UpstreamSpec,
) -> Result<(TcpStream, SocketAddr), String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((server.host.as_str(), server.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", server.host))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{} resolved to no address", server.host));
    }
    let mut last = String::new();
    for addr in addrs {
        let socket = sockopt::upstream_socket(addr, &spec.keepalive)
            .map_err(|e| format!("cannot set up socket options: {e}"))?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}
