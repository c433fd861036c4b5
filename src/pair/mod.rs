//! The pair task: client options, upstream connect, relay, then one close event.

pub mod accept;
pub mod close;
mod direction;
pub mod limit;
mod proxy_header;
pub mod registry;
pub mod relay;
mod stats;
pub mod tls;
pub mod watchdog;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::field;

use crate::config::{KeepaliveSpec, OnPeerFailure, Route, SendProxy};
use crate::net::{connect, sockopt};
use crate::pool::Pool;
use crate::telemetry::metrics::{Metrics, RouteMetrics};
use close::{CloseReason, Side};
use registry::Registry;
use relay::{RelayEnd, RelayLimits};
use watchdog::WatchSpec;

/// How much unread input a FIN close throws away first: Linux answers close()
/// with RST while unread data is queued, which would defeat the FIN.
const DRAIN_BEFORE_FIN: usize = 1024 * 1024;

/// Shared per-route state the pair tasks read. One per route name for the
/// life of the route: a reload changes what [`RouteState::live`] returns, and
/// live pairs see the change at their next look.
#[derive(Debug)]
pub struct RouteState {
    /// The route name, shared with registry entries.
    pub name: Arc<str>,
    live: ArcSwap<LiveRoute>,
    /// Pair ids, unique within the process.
    pub ids: Arc<AtomicU64>,
    /// Live pairs of every route.
    pub registry: Arc<Registry>,
    /// This route's metric series, resolved once.
    pub metrics: RouteMetrics,
    /// The route's `max_connections` slots, resized by a reload.
    pub max_connections: Arc<limit::Limit>,
    /// Cancelled to close the route's pairs: at shutdown (a child of the
    /// process-wide token), or when a reload removed the route.
    pub kill: CancellationToken,
    removed: AtomicBool,
    /// Counts reloads that changed the client options on the route's
    /// listeners. Clients already waiting in the backlog then got the old
    /// ones at their SYN: the accept loops set the new ones on what they
    /// accept until their backlog has been empty once (see accept.rs).
    pub client_options_epoch: AtomicU32,
}

/// What a reload can change in a running route.
#[derive(Debug)]
pub struct LiveRoute {
    /// The validated route.
    pub route: Route,
    /// Timers and watchdog settings every pair of the route shares, counted
    /// from `since` for pairs older than that.
    pub limits: RelayLimits,
    /// Its servers' live state.
    pub pool: Arc<Pool>,
    /// The route's TLS configs, built from the files at start and at every
    /// reload; `None` for a plain route. Live TLS sessions keep theirs.
    pub tls: Option<Box<tls::RouteTls>>,
}

impl RouteState {
    /// A route as it starts; `kill` closes its pairs.
    pub fn new(
        route: Route,
        pool: Arc<Pool>,
        tls: Option<Box<tls::RouteTls>>,
        metrics: &Metrics,
        ids: Arc<AtomicU64>,
        registry: Arc<Registry>,
        kill: CancellationToken,
    ) -> RouteState {
        let route_metrics = route_metrics(metrics, &route.name);
        RouteState {
            name: Arc::from(route.name.as_str()),
            max_connections: Arc::new(limit::Limit::new(
                route.max_connections,
                route_metrics.at_limit.clone(),
                route_metrics.limit_reached.clone(),
            )),
            live: ArcSwap::from_pointee(LiveRoute {
                limits: RelayLimits::of(&route, None, 0),
                route,
                pool,
                tls,
            }),
            ids,
            registry,
            metrics: route_metrics,
            kill,
            removed: AtomicBool::new(false),
            client_options_epoch: AtomicU32::new(0),
        }
    }

    /// The route's settings now, held for as long as the caller needs them
    /// (a connect), while a reload may already have stored newer ones.
    pub fn live_full(&self) -> Arc<LiveRoute> {
        self.live.load_full()
    }

    /// The route's settings now.
    pub fn live(&self) -> arc_swap::Guard<Arc<LiveRoute>> {
        self.live.load()
    }

    /// Makes `route`, `pool` and `tls` the route's settings. New pairs follow them at
    /// once; live pairs take the timers and watchdog settings, counted from
    /// now, once woken (see [`Registry::wake_route`]).
    ///
    /// Only a changed `idle_timeout` or `half_close_timeout` restarts the
    /// live pairs' count: a reload for anything else must not keep idle
    /// pairs open by restarting their timers.
    pub fn set_live(&self, route: Route, pool: Arc<Pool>, tls: Option<Box<tls::RouteTls>>) {
        self.max_connections.set_max(route.max_connections);
        let old = self.live.load();
        let since = if old.route.idle_timeout != route.idle_timeout
            || old.route.half_close_timeout != route.half_close_timeout
        {
            Some(tokio::time::Instant::now())
        } else {
            old.limits.since
        };
        let watches = |r: &Route| {
            (
                WatchSpec::of(&r.client.keepalive),
                WatchSpec::of(&r.upstream.keepalive),
            )
        };
        let generation = old
            .limits
            .watch_generation
            .wrapping_add(u32::from(watches(&old.route) != watches(&route)));
        self.live.store(Arc::new(LiveRoute {
            limits: RelayLimits::of(&route, since, generation),
            route,
            pool,
            tls,
        }));
    }

    /// Marks the route removed by a reload, so that its pairs, when killed,
    /// close as `route_removed` rather than `shutdown`.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Relaxed);
    }

    /// The reason a pair of this route closes with when killed.
    pub fn kill_reason(&self) -> CloseReason {
        if self.removed.load(Ordering::Relaxed) {
            CloseReason::RouteRemoved
        } else {
            CloseReason::Shutdown
        }
    }
}

/// The metric series of route `name`, with every close reason and both sides.
pub fn route_metrics(metrics: &Metrics, name: &str) -> RouteMetrics {
    metrics.route(
        name,
        &CloseReason::ALL.map(CloseReason::as_str),
        [Side::Client.as_str(), Side::Upstream.as_str()],
    )
}

/// Runs one pair from accept to close. Never panics on peer behaviour; every
/// path ends in exactly one "pair closed" event.
///
/// The pair's span (route, pair.id, client.addr, upstream.addr) is not kept
/// for the pair's whole life: a live span costs its formatted fields in the
/// subscriber, which would be most of an idle pair's memory. It is entered
/// while connecting, and made again for the close event, with the same fields.
///
/// The accept loop took one of the route's `max_connections` slots for the
/// pair; the pair's [`Close`] gives it back.
///
/// `accepted_epoch`: the route's `client_options_epoch` the accept loop had
/// seen when it accepted the client.
pub fn run(
    route: Arc<RouteState>,
    client: TcpStream,
    client_addr: SocketAddr,
    cancel: CancellationToken,
    accepted_epoch: u32,
) -> impl Future<Output = ()> + Send {
    let id = route.ids.fetch_add(1, Ordering::Relaxed);
    let mut who = PairId { id, client_addr };
    // An async block rather than an async fn: an async fn moves its arguments
    // into locals and keeps both copies in the task, which would cost every
    // pair a second copy of its client socket and addresses.
    async move {
        route.metrics.pair_opened();
        // Declared before the registration so that it is dropped after it: a
        // socket is never closed while the registry still lists it.
        let upstream: TcpStream;
        let registration = route.registry.register(who.id, route.name.clone(), &client);
        let stats = registration.stats();
        // A reload that retuned the route's clients between the accept and
        // this registration did not see this socket: set the options here.
        if route.client_options_epoch.load(Ordering::Acquire) != accepted_epoch {
            let spec = route.live().route.client.keepalive;
            if let Err(e) = sockopt::retune(&client, &spec) {
                tracing::debug!(route = %route.name, error = %e, "cannot set the reloaded client keepalive");
            }
        }

        // The PROXY header comes first on the socket, before anything else
        // (TLS included) looks at it. Boxed: its state lives only until then.
        // The header's destination (the address the client connected to) is
        // not declared before this await, where it would hold a slot in the task.
        let proxy_protocol = route.live().route.client.proxy_protocol;
        let destination = match proxy_protocol {
            None => None,
            Some(timeout) => {
                let received = Box::pin(async {
                    tokio::select! {
                        r = proxy_header::receive(&client, timeout) => Some(r),
                        _ = cancel.cancelled() => None,
                    }
                })
                .await;
                let header = match received {
                    Some(Ok(header)) => header,
                    failed => {
                        let (reason, detail) = match failed {
                            Some(Err(e)) => (CloseReason::ClientProtocolError, Some(e.to_string())),
                            _ => (route.kill_reason(), None),
                        };
                        let close = Close {
                            route: &route,
                            who: &who,
                        };
                        let end = RelayEnd::plain(reason);
                        close.finish(registration, &client, None, &end, detail);
                        return;
                    }
                };
                // LOCAL, UNKNOWN and address-less families: the real peer applies.
                header.addresses.map(|(source, dest)| {
                    registration.set_proxied_client(source, who.client_addr);
                    who.client_addr = source;
                    dest
                })
            }
        };
        let close = Close {
            route: &route,
            who: &who,
        };

        // TLS on either side: its own path (pair/tls.rs), boxed, so that a
        // plain pair's task does not grow by a byte.
        // In the condition, so that no handle on the settings stays in the
        // task of a plain pair.
        if let Some(live) = {
            let live = route.live_full();
            live.tls.is_some().then_some(live)
        } {
            let (client, who, stats, cancel) = (&client, &who, &stats, &cancel);
            Box::pin(tls::serve(
                live,
                &route,
                client,
                who,
                registration,
                stats,
                destination,
                cancel,
                close,
            ))
            .await;
            return;
        }

        // The client socket already carries its keepalive options: it
        // inherited them from the listening socket (see sockopt::bind_listener).

        // Boxed, select! and all: the connect state (resolver, timeouts,
        // socket, the cancellation wait) is large and only lives until the
        // pair is established, so it must not size the pair's task for its
        // whole life. The block keeps the connect result itself out of the
        // task's state during the relay.
        let (up_addr, _active) = {
            // `destination` moves into the boxed future (the rest is borrowed),
            // so the task keeps no slot for it.
            let connected = {
                let (route, client, who, cancel) = (&route, &client, &who, &cancel);
                Box::pin(async move {
                    // Held through the connect: a reload may store new
                    // settings meanwhile, and this attempt keeps its own.
                    let live = route.live_full();
                    let c = connect_upstream(&live, client, who, cancel, destination).await;
                    (c, live.route.upstream.keepalive)
                })
            }
            .await;
            let (connected, used) = connected;
            match connected {
                Some(Ok((c, failed_send))) => {
                    log_failed_attempts(&who, &route.name, &registration, &c.failed);
                    registration.set_upstream(&c.stream);
                    catch_up_upstream(&route, &c.stream, &used);
                    upstream = c.stream;
                    if let Some(e) = failed_send {
                        let detail = format!("sending the PROXY header: {e}");
                        let end = RelayEnd::from_error(e);
                        let up = Some((&upstream, c.addr));
                        close.finish(registration, &client, up, &end, Some(detail));
                        return;
                    }
                    (c.addr, c.active)
                }
                Some(Err(e)) => {
                    log_failed_attempts(&who, &route.name, &registration, &e.attempts);
                    let end = RelayEnd::plain(CloseReason::ConnectFailed);
                    close.finish(registration, &client, None, &end, Some(e.to_string()));
                    return;
                }
                None => {
                    let end = RelayEnd::plain(route.kill_reason());
                    close.finish(registration, &client, None, &end, None);
                    return;
                }
            }
        };
        // A reload that changes the route's timers wakes the pair through
        // this, so that they count from then; nothing is stored in the task.
        std::future::poll_fn(|cx| {
            registration.set_waker(cx.waker());
            std::task::Poll::Ready(())
        })
        .await;
        let end = relay::relay(&client, &upstream, &route, &stats, &cancel).await;
        close.finish(
            registration,
            &client,
            Some((&upstream, up_addr)),
            &end,
            None,
        );
    }
}

/// What [`connect_upstream`] gives: `None` when cancelled; else the connect
/// result, with the error of sending the PROXY header if that failed.
type Connecting =
    Option<Result<(connect::Connected, Option<close::SideError>), connect::ConnectError>>;

/// Connects to a server of the route as `live` has it and sends the PROXY
/// header first when the route says so. Boxed by callers: its state only
/// lives until then.
async fn connect_upstream(
    live: &LiveRoute,
    client: &TcpStream,
    who: &PairId,
    cancel: &CancellationToken,
    destination: Option<SocketAddr>,
) -> Connecting {
    let c = tokio::select! {
        c = connect::connect(&live.route.upstream, &live.pool) => c,
        _ = cancel.cancelled() => return None,
    };
    // The PROXY header goes before any relayed byte (and before a TLS
    // handshake): the original client, and the address it connected to (the
    // received header's, else kaproxy's own).
    let Ok(c) = c else {
        return Some(c.map(|c| (c, None)));
    };
    // Only then: getsockname would cost every pair a syscall.
    let header = match live.route.upstream.send_proxy {
        SendProxy::Off => None,
        version => destination
            .or_else(|| client.local_addr().ok())
            .and_then(|d| proxy_header::encode(version, who.client_addr, d)),
    };
    let sent = match header {
        Some(h) => proxy_header::send(&c.stream, &h)
            .await
            .err()
            .map(|e| close::blame(Side::Upstream, &c.stream, e)),
        None => None,
    };
    Some(Ok((c, sent)))
}

/// A pair that connected with the upstream options `used` registered its
/// socket just before this: a reload that stored other options after the
/// connect began may have retuned the live sockets before it was listed, so
/// it sets them itself.
fn catch_up_upstream(route: &RouteState, upstream: &TcpStream, used: &KeepaliveSpec) {
    let spec = route.live().route.upstream.keepalive;
    if spec != *used {
        if let Err(e) = sockopt::retune(upstream, &spec) {
            tracing::debug!(route = %route.name, error = %e, "cannot set the reloaded upstream keepalive");
        }
    }
}

/// One warning per failed connect attempt, in the pair's span, made only when
/// there is something to say.
fn log_failed_attempts(
    who: &PairId,
    route: &str,
    registration: &registry::Registration<'_>,
    failed: &[connect::FailedAttempt],
) {
    if failed.is_empty() {
        return;
    }
    let _span = who.span(route, None, registration.via()).entered();
    for a in failed {
        tracing::warn!(server = %a.server, error = %a.error, "upstream connect failed");
    }
}

/// Who a pair is, for its span.
#[derive(Debug)]
struct PairId {
    id: u64,
    /// The original client: a received PROXY header's source, else the peer.
    /// The directly connected peer is then kept by the registry (as `via`),
    /// not here: the pair task's size is what an idle pair costs.
    client_addr: SocketAddr,
}

impl PairId {
    fn span(
        &self,
        route: &str,
        upstream_addr: Option<SocketAddr>,
        via: Option<SocketAddr>,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            "pair",
            route,
            pair.id = self.id,
            client.addr = %self.client_addr,
            via = field::Empty,
            upstream.addr = field::Empty,
        );
        if let Some(via) = via {
            span.record("via", field::display(via));
        }
        if let Some(addr) = upstream_addr {
            span.record("upstream.addr", field::display(addr));
        }
        span
    }
}

/// What closing a pair needs besides the sockets. Exactly one is made per
/// pair, on every path, so its drop gives back the pair's `max_connections`
/// slot (see [`limit::Slot::keep`]), a panic in the relay included.
///
/// It holds no more than it must: it lives in the pair's task for the pair's
/// whole life, and every byte there is paid by every idle pair. The counters
/// come from the registration at the end.
struct Close<'a> {
    route: &'a RouteState,
    who: &'a PairId,
}

impl Drop for Close<'_> {
    fn drop(&mut self) {
        self.route.max_connections.release();
    }
}

impl Close<'_> {
    /// Unregisters the pair, prepares both sockets for the close the reason calls
    /// for, records metrics and emits the one close event. The sockets themselves
    /// are closed when the caller drops them, right after.
    fn finish(
        &self,
        registration: registry::Registration<'_>,
        client: &TcpStream,
        upstream: Option<(&TcpStream, SocketAddr)>,
        end: &RelayEnd,
        detail: Option<String>,
    ) {
        let via = registration.via();
        let stats = registration.stats();
        drop(registration);
        // A stream cut short must never look complete to a survivor. Completed
        // and idle pairs have nothing waiting (idle never fires while data
        // waits) and close with FIN. Cuts by kaproxy itself (half-close
        // timeout, stall, shutdown) always RST. After a peer failure the
        // survivor gets what on_peer_failure says, except that data kaproxy
        // could not deliver forces a RST.
        let abrupt = match end.reason {
            CloseReason::Completed | CloseReason::IdleTimeout => false,
            reason if reason.is_cut() => true,
            _ => self.route.live().route.on_peer_failure == OnPeerFailure::Reset || end.undelivered,
        };
        let failed = end.reason.failed_side();
        let upstream_addr = upstream.map(|(_, a)| a);
        let upstream = upstream.map(|(s, _)| s);
        for (side, sock) in [(Side::Client, Some(client)), (Side::Upstream, upstream)] {
            let Some(sock) = sock else { continue };
            // A failed TLS handshake: FIN, so the alert kaproxy queued gets there.
            if end.reason.tls_failed_side() == Some(side) {
                let _ = sockopt::discard_unread(sock, DRAIN_BEFORE_FIN);
                continue;
            }
            // The failed side is broken anyway: RST it so no FIN_WAIT state lingers.
            if abrupt || failed == Some(side) {
                if let Err(e) = sockopt::reset_on_close(sock) {
                    tracing::debug!(side = side.as_str(), error = %e, "could not set SO_LINGER 0");
                }
            // A completed or idle pair has read all there was; only a survivor
            // closed with FIN after its peer failed may hold unread input.
            } else if failed.is_some() && !sockopt::discard_unread(sock, DRAIN_BEFORE_FIN) {
                tracing::debug!(
                    side = side.as_str(),
                    "more unread input than the drain limit: Linux will send RST, not FIN"
                );
            }
        }
        let c2u = stats.client_to_upstream.load(Ordering::Relaxed);
        let u2c = stats.upstream_to_client.load(Ordering::Relaxed);
        let age = stats.age();
        // Detection time: from the last thing heard from the dead side (any
        // ACK, which TCP_INFO still tells after the connection ended), not
        // from the last data it sent, which for a download is the request.
        let detection = end.reason.dead_side().map(|side| {
            let sock = match side {
                Side::Client => Some(client),
                Side::Upstream => upstream,
            };
            let silent = sock
                .and_then(|s| sockopt::send_state(s).ok())
                .map(|st| st.since_last_ack)
                .unwrap_or_else(|| stats.since_data_from(side));
            (side as usize, silent.as_secs_f64())
        });
        self.route
            .metrics
            .pair_closed(end.reason.index(), age.as_secs_f64(), detection);
        let error = detail.or_else(|| end.error.as_ref().map(|e| e.to_string()));
        let _span = self
            .who
            .span(&self.route.name, upstream_addr, via)
            .entered();
        tracing::info!(
            reason = end.reason.as_str(),
            duration_ms = age.as_millis() as u64,
            bytes.client_to_upstream = c2u,
            bytes.upstream_to_client = u2c,
            error = error.as_deref(),
            "pair closed"
        );
    }
}
