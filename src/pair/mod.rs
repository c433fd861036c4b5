//! The pair task: client options, upstream connect, relay, then one close event.

pub mod close;
pub mod relay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::config::{OnPeerFailure, Route};
use crate::net::{connect, sockopt};
use crate::pool::Pool;
use close::{CloseReason, Side, SideError};
use relay::{RelayEnd, RelayLimits, RelayStats};

/// Shared per-route state the pair tasks read.
#[derive(Debug)]
pub struct RouteState {
    /// The validated route.
    pub route: Route,
    /// Its servers' live state.
    pub pool: Pool,
    /// Pair ids, unique within the process.
    pub ids: Arc<AtomicU64>,
}

/// Runs one pair from accept to close. Never panics on peer behaviour; every
/// path ends in exactly one "pair closed" event.
pub fn run(
    route: Arc<RouteState>,
    client: TcpStream,
    client_addr: SocketAddr,
    cancel: CancellationToken,
) -> impl Future<Output = ()> + Send {
    let id = route.ids.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "pair",
        route = %route.route.name,
        pair.id = id,
        client.addr = %client_addr,
        upstream.addr = field::Empty,
    );
    run_inner(route, client, cancel).instrument(span)
}

async fn run_inner(route: Arc<RouteState>, client: TcpStream, cancel: CancellationToken) {
    let started = Instant::now();
    let stats = RelayStats::new();
    let r = &route.route;

    // Before any byte is relayed, so a client that dies at once is still covered.
    if let Err(error) = sockopt::apply_side(&client, &r.client.keepalive) {
        let end = RelayEnd::from_error(SideError {
            side: Side::Client,
            error,
        });
        finish(
            r.on_peer_failure,
            &client,
            None,
            &end,
            &stats,
            started,
            None,
        );
        return;
    }

    // Boxed: the connect state (resolver, timeout, socket) is large and only
    // lives until the pair is established, so it must not size the pair's task.
    let connected = tokio::select! {
        c = Box::pin(connect::connect(&r.upstream, &route.pool)) => c,
        _ = cancel.cancelled() => {
            let end = RelayEnd::plain(CloseReason::Shutdown);
            finish(r.on_peer_failure, &client, None, &end, &stats, started, None);
            return;
        }
    };
    let (upstream, _active) = match connected {
        Ok(c) => {
            tracing::Span::current().record("upstream.addr", field::display(c.addr));
            (c.stream, route.pool.acquire(c.server))
        }
        Err(e) => {
            let end = RelayEnd::plain(CloseReason::ConnectFailed);
            finish(
                r.on_peer_failure,
                &client,
                None,
                &end,
                &stats,
                started,
                Some(e.to_string()),
            );
            return;
        }
    };

    let limits = RelayLimits {
        idle_timeout: r.idle_timeout,
        half_close_timeout: r.half_close_timeout,
    };
    let end = relay::relay(&client, &upstream, &limits, &stats, &cancel).await;
    finish(
        r.on_peer_failure,
        &client,
        Some(&upstream),
        &end,
        &stats,
        started,
        None,
    );
}

/// Closes both sockets the way the reason calls for and emits the close event.
/// The sockets themselves are closed when the caller drops them, right after.
fn finish(
    on_peer_failure: OnPeerFailure,
    client: &TcpStream,
    upstream: Option<&TcpStream>,
    end: &RelayEnd,
    stats: &RelayStats,
    started: Instant,
    detail: Option<String>,
) {
    // A stream cut short must not look like a complete one to the survivor, so
    // failures, half-close timeouts and shutdown cuts RST by default; an idle
    // timeout or a completed pair has nothing in flight and closes with FIN.
    let abrupt = match end.reason {
        CloseReason::Completed | CloseReason::IdleTimeout => false,
        _ => on_peer_failure == OnPeerFailure::Reset,
    };
    let failed = end.reason.failed_side();
    for (side, sock) in [(Side::Client, Some(client)), (Side::Upstream, upstream)] {
        let Some(sock) = sock else { continue };
        // The failed side is broken anyway: RST it so no FIN_WAIT state lingers.
        if abrupt || failed == Some(side) {
            if let Err(e) = sockopt::reset_on_close(sock) {
                tracing::debug!(side = side.as_str(), error = %e, "could not set SO_LINGER 0");
            }
        }
    }
    let c2u = stats.client_to_upstream.load(Ordering::Relaxed);
    let u2c = stats.upstream_to_client.load(Ordering::Relaxed);
    let duration_ms = started.elapsed().as_millis() as u64;
    let error = end.error.as_ref().map(|e| e.to_string()).or(detail);
    tracing::info!(
        reason = end.reason.as_str(),
        duration_ms,
        bytes.client_to_upstream = c2u,
        bytes.upstream_to_client = u2c,
        error = error.as_deref(),
        "pair closed"
    );
}
