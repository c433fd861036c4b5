//! Active health checks: one task per server, TCP connect or HTTP GET through
//! hyper's client, on sockets that carry the route's upstream keepalive settings.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::config::{fmt_duration, HealthCheck, HealthKind, KeepaliveSpec, ServerAddr};
use crate::net::connect;
use crate::pool::Pool;

/// Checks server `index` of `pool` every interval until `stop` is cancelled,
/// connecting with the route's upstream `keepalive`.
/// The first check runs at once, so a server starts in the state it is really in.
pub async fn run(
    pool: Arc<Pool>,
    index: usize,
    check: HealthCheck,
    keepalive: KeepaliveSpec,
    stop: CancellationToken,
) {
    let server = pool.servers[index].spec.addr.clone();
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(check.timeout, probe(&server, &check, &keepalive)) => match r {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {}", fmt_duration(check.timeout))),
            },
        };
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        tracing::debug!(route = pool.route(), server = %server, ok, detail, "health check");
        pool.health_result(index, ok, &detail, check.rise, check.fall);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(check.interval) => {}
        }
    }
}

/// One check. Ok carries a short description of the success, Err of the failure.
async fn probe(
    server: &ServerAddr,
    check: &HealthCheck,
    keepalive: &KeepaliveSpec,
) -> Result<String, String> {
    let (stream, addr) = connect::connect_one(server, keepalive, check.timeout).await?;
    match &check.kind {
        HealthKind::Tcp => Ok(format!("connected to {addr}")),
        HealthKind::Http { path, expect, host } => {
            let host = host.clone().unwrap_or_else(|| server.to_string());
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
            let request = Request::get(path.as_str())
                .header(HOST, host)
                .header(
                    USER_AGENT,
                    concat!("kaproxy-health/", env!("CARGO_PKG_VERSION")),
                )
                .header(CONNECTION, "close")
                .body(Empty::new())
                .map_err(|e| format!("cannot build the request for {path}: {e}"))?;
            // The connection future does the I/O; it may finish (Connection: close)
            // in the same poll that delivers the response, so the response is
            // looked at first and is still collected after the connection ends.
            let mut conn = std::pin::pin!(conn);
            let mut send = std::pin::pin!(sender.send_request(request));
            let response = tokio::select! {
                biased;
                r = &mut send => r,
                r = &mut conn => match r {
                    Ok(()) => send.await,
                    Err(e) => return Err(format!("GET {path} on {addr}: {e}")),
                },
            }
            .map_err(|e| format!("GET {path} on {addr}: {e}"))?;
            let status = response.status().as_u16();
            if expect.accepts(status) {
                Ok(format!("GET {path} answered {status}"))
            } else {
                Err(format!(
                    "GET {path} answered {status}, expected {}",
                    expect.text
                ))
            }
        }
    }
}
