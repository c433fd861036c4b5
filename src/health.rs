//! Active health checks: one task per server, TCP connect or HTTP GET through
//! hyper's client, on sockets that carry the route's upstream keepalive settings.
//! On a route with upstream TLS every check does the TLS handshake too (and the
//! HTTP check runs over it), as HAProxy's `check-ssl`: a server whose
//! certificate kaproxy would refuse is not healthy.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::config::{fmt_duration, HealthCheck, HealthKind, KeepaliveSpec, SendProxy, ServerAddr};
use crate::net::connect;
use crate::net::proxy_protocol::{self, Version};
use crate::pool::Pool;

/// Checks server `index` of `pool` every interval until `stop` is cancelled,
/// connecting with the route's upstream `keepalive`. A server that expects a
/// PROXY header (`send_proxy`) gets one first on every check, carrying no
/// client: v2 LOCAL or v1 UNKNOWN, as HAProxy's `check-send-proxy` sends.
/// The first check runs at once, so a server starts in the state it is really in.
pub async fn run(
    pool: Arc<Pool>,
    index: usize,
    check: HealthCheck,
    keepalive: KeepaliveSpec,
    send_proxy: SendProxy,
    tls: Option<TlsCheck>,
    stop: CancellationToken,
) {
    let server = pool.servers[index].spec.addr.clone();
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(check.timeout, probe(&server, &check, &keepalive, send_proxy, tls.as_ref())) => match r {
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

/// The TLS a route's checks do: its upstream client config and the name to verify.
pub type TlsCheck = (
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

/// One check. Ok carries a short description of the success, Err of the failure.
async fn probe(
    server: &ServerAddr,
    check: &HealthCheck,
    keepalive: &KeepaliveSpec,
    send_proxy: SendProxy,
    tls: Option<&TlsCheck>,
) -> Result<String, String> {
    let (mut stream, addr) = connect::connect_one(server, keepalive, check.timeout).await?;
    let version = match send_proxy {
        SendProxy::Off => None,
        SendProxy::V1 => Some(Version::V1),
        SendProxy::V2 => Some(Version::V2),
    };
    if let Some(version) = version {
        use tokio::io::AsyncWriteExt;
        stream
            .write_all(&proxy_protocol::encode(version, None))
            .await
            .map_err(|e| format!("sending the PROXY header to {addr}: {e}"))?;
    }
    let Some((config, name)) = tls else {
        return match &check.kind {
            HealthKind::Tcp => Ok(format!("connected to {addr}")),
            HealthKind::Http { .. } => http_get(stream, addr, server, check).await,
        };
    };
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name.clone(), stream)
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    match &check.kind {
        HealthKind::Tcp => Ok(format!("TLS handshake with {addr} done")),
        HealthKind::Http { .. } => http_get(stream, addr, server, check).await,
    }
}

/// The HTTP check's GET over `stream` (plain TCP or TLS).
async fn http_get<S>(
    stream: S,
    addr: std::net::SocketAddr,
    server: &ServerAddr,
    check: &HealthCheck,
) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
