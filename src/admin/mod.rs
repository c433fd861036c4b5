//! The admin endpoint (hyper 1.x): `/metrics`, `/healthz`, `/readyz`,
//! `/connections`, `/upstreams`. Read-only: it looks at shared state and never
//! touches a pair, and it is bounded so that it cannot be used to stall the proxy.

pub mod status;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pair::registry::{Listing, Registry};
use crate::pair::watchdog::WatchSpec;
use crate::pair::RouteState;
use crate::telemetry::metrics::Metrics;

/// Admin connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No admin connection lives longer than this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Default and largest `/connections?limit=`. The largest bounds one answer to
/// about 10 MB of JSON and one request to reading 20,000 sockets.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;
/// `/connections` requests answered at once; more get 503. One keeps a CPU busy
/// reading sockets and encoding; with 3,000 pairs on 2 cores, two at once took
/// both and raised the worst relay round trip from ~10 ms to ~60 ms.
const MAX_CONNECTIONS_REQUESTS: usize = 1;
/// What a refused `/connections` request is told to wait, in seconds.
const BUSY_RETRY_AFTER: &str = "1";

/// What the endpoint reads.
#[derive(Debug)]
pub struct AdminState {
    /// Cancelled once shutdown has begun: not ready any more, still observable.
    pub draining: CancellationToken,
    /// Every route with its bound address; a reload stores a new list.
    pub routes: ArcSwap<Vec<(Arc<RouteState>, SocketAddr)>>,
    /// Live pairs.
    pub registry: Arc<Registry>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
}

/// Serves admin requests on `listener` until `stop` is cancelled (after the
/// drain, so that a draining kaproxy can still be watched).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let listings = Arc::new(Semaphore::new(MAX_CONNECTIONS_REQUESTS));
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, limit = MAX_CONNECTIONS, "admin connection refused: too many at once");
            continue;
        };
        let state = state.clone();
        let listings = listings.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let listings = listings.clone();
                async move { Ok::<_, Infallible>(route(&state, &listings, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_string());
    text.push('\n');
    respond(status, "application/json", text)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}

const PATHS: &[&str] = &[
    "/metrics",
    "/healthz",
    "/readyz",
    "/connections",
    "/upstreams",
];

async fn route(
    state: &Arc<AdminState>,
    listings: &Arc<Semaphore>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    if !PATHS.contains(&path) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no such endpoint {path:?}; try one of {}", PATHS.join(", ")),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is read-only: use GET", path),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let query = match parse_query(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let allowed: &[&str] = if path == "/connections" {
        &["route", "limit"]
    } else {
        &[]
    };
    if let Some(k) = query.keys().find(|k| !allowed.contains(&k.as_str())) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("unknown query parameter {k:?} for {path}"),
        );
    }
    match path {
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => readyz(state),
        "/metrics" => metrics(state),
        "/connections" => connections(state, listings, &query).await,
        _ => upstreams(state),
    }
}

fn parse_query(query: Option<&str>) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| -> Result<String, String> {
            let bytes = s.as_bytes();
            let mut buf = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'%' => {
                        let hex = s
                            .get(i + 1..i + 3)
                            .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                        buf.push(
                            u8::from_str_radix(hex, 16)
                                .map_err(|_| format!("bad percent escape in {s:?}"))?,
                        );
                        i += 3;
                    }
                    b'+' => {
                        buf.push(b' ');
                        i += 1;
                    }
                    b => {
                        buf.push(b);
                        i += 1;
                    }
                }
            }
            String::from_utf8(buf).map_err(|_| format!("{s:?} is not UTF-8"))
        };
        if out.insert(decode(k)?, decode(v)?).is_some() {
            return Err(format!("query parameter {k:?} given twice"));
        }
    }
    Ok(out)
}

/// Servers that may get connections now, per route; the reasons a route is not ready.
fn not_ready(state: &AdminState) -> Vec<serde_json::Value> {
    let routes = state.routes.load();
    let mut problems = Vec::new();
    for (r, _) in routes.iter() {
        let live = r.live();
        let pool = &live.pool;
        if pool.any_up() {
            continue;
        }
        let servers: Vec<String> = (0..pool.servers.len())
            .map(|i| {
                let v = pool.view(i);
                format!("{} {}", v.address, v.state)
            })
            .collect();
        problems.push(json!({ "route": &*r.name, "problem": format!("no server is up: {}", servers.join(", ")) }));
    }
    problems
}

fn readyz(state: &AdminState) -> Response<Body> {
    let mut problems = not_ready(state);
    if state.draining.is_cancelled() {
        problems.insert(0, json!({ "problem": "shutting down: not accepting new connections, draining live pairs" }));
    }
    if problems.is_empty() {
        json_response(StatusCode::OK, &json!({ "ready": true }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "ready": false, "not_ready": problems }),
        )
    }
}

fn metrics(state: &AdminState) -> Response<Body> {
    // Up/down is a function of time as well (ejections expire), so it is read at scrape time.
    for (r, _) in state.routes.load().iter() {
        let live = r.live();
        for i in 0..live.pool.servers.len() {
            let v = live.pool.view(i);
            state
                .metrics
                .set_upstream_up(&r.name, &v.address, v.state == "up");
        }
    }
    respond(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        state.metrics.encode(),
    )
}

async fn connections(
    state: &Arc<AdminState>,
    listings: &Arc<Semaphore>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n <= MAX_LIMIT => n,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("limit={v:?}: use a whole number from 0 to {MAX_LIMIT}"),
                )
            }
        },
    };
    let route = query.get("route").cloned();
    if let Some(name) = &route {
        if !state.routes.load().iter().any(|(r, _)| &*r.name == name) {
            return error(StatusCode::NOT_FOUND, &format!("no route named {name:?}"));
        }
    }
    // Refused rather than queued: a queue would let requests pile up behind a slow one.
    let Ok(permit) = listings.clone().try_acquire_owned() else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "busy: another /connections request is being answered; retry in {BUSY_RETRY_AFTER} s"
            ),
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(BUSY_RETRY_AFTER));
        return r;
    };
    // What each route's watchdogs enforce, for the sides' `user_timeout_ms` and
    // `stall_timeout_ms`: those live in kaproxy, not in the socket.
    let watches: HashMap<String, [WatchSpec; 2]> = state
        .routes
        .load()
        .iter()
        .map(|(r, _)| {
            let live = r.live();
            let route = &live.route;
            (
                route.name.clone(),
                [
                    WatchSpec::of(&route.client.keepalive),
                    WatchSpec::of(&route.upstream.keepalive),
                ],
            )
        })
        .collect();
    let registry = state.registry.clone();
    // Listing walks every pair and reading makes system calls on two sockets per
    // pair: neither belongs on a runtime worker that relays bytes.
    let read = tokio::task::spawn_blocking(move || {
        // Held until the sockets are read, even if the client has gone away.
        let _permit = permit;
        connections_json(registry.list(route.as_deref(), limit), &watches)
    });
    match read.await {
        Ok(Ok(body)) => respond(StatusCode::OK, "application/json", body),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the connections: {e}"),
        ),
        Err(e) => {
            tracing::error!(error = %e, "reading the connections failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reading the connections failed",
            )
        }
    }
}

/// `{"more": .., "pairs": [..], "returned": ..}`, written pair by pair as the
/// sockets are read, so memory follows the size of the answer and never holds a
/// second copy of it. `returned` comes last: a pair that closes before its
/// sockets are read is left out.
fn connections_json(
    listing: Listing,
    watches: &HashMap<String, [WatchSpec; 2]>,
) -> serde_json::Result<Vec<u8>> {
    let ms = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_millis() as u64);
    let mut out = format!("{{\"more\":{},\"pairs\":[", listing.more()).into_bytes();
    let mut returned = 0usize;
    for mut pair in listing.read() {
        if let Some([client, upstream]) = watches.get(&pair.route) {
            let sides = [
                (Some(&mut pair.client), client),
                (pair.upstream.as_mut(), upstream),
            ];
            for (side, watch) in sides {
                if let Some(tcp) = side.and_then(|s| s.tcp.as_mut()) {
                    tcp.keepalive.user_timeout_ms = ms(watch.dead_after);
                    tcp.keepalive.stall_timeout_ms = ms(watch.stall_after);
                }
            }
        }
        if returned > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &pair)?;
        returned += 1;
    }
    out.extend_from_slice(format!("],\"returned\":{returned}}}\n").as_bytes());
    Ok(out)
}

fn upstreams(state: &AdminState) -> Response<Body> {
    let routes: Vec<serde_json::Value> = state
        .routes
        .load()
        .iter()
        .map(|(r, addr)| {
            let live = r.live();
            let pool = &live.pool;
            let servers: Vec<_> = (0..pool.servers.len()).map(|i| pool.view(i)).collect();
            json!({
                "route": &*r.name,
                "listen": addr.to_string(),
                "balance": live.route.upstream.balance.as_str(),
                "health_check": live.route.upstream.health_check.is_some(),
                // null when unlimited.
                "max_connections": r.max_connections.max(),
                "slots_taken": r.max_connections.taken(),
                "servers": servers,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "routes": routes }))
}
