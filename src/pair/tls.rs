//! Pairs of a route with TLS on either side: the handshakes (client first,
//! then connect, then upstream), each under its timeout and the shutdown
//! token, and the TLS flows the relay drives.
//!
//! Only the bytes go through rustls. Keepalive, TCP_USER_TIMEOUT, the error
//! watches and the watchdog act on the raw sockets exactly as for a plain pair
//! (the relay is the same code, see [`relay::relay_flows`]), so a dead peer is
//! found, and the survivor reset, just the same.
//!
//! Plain pairs never come here: a route without TLS keeps splice and its small task.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, Connection, ServerConfig};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::close::{blame, CloseReason, Side, SideError};
use super::direction::{RelayBuf, RELAY_BUFFER};
use super::registry::Registration;
use super::relay::{self, Flow, Flows, Io, RelayEnd, RelayStats};
use super::{
    catch_up_upstream, connect_upstream, log_failed_attempts, Close, LiveRoute, PairId, RouteState,
};
use crate::config::Route;
use crate::net::sockopt;
use crate::telemetry::metrics::Metrics;
use crate::tls::{self, HandshakeFailure, Raw, TlsError};

/// A route's TLS state, built once at start (and again by a reload, which
/// swaps the whole route state): the rustls configs, the server names to
/// verify, and the handshake failure counters.
#[derive(Debug)]
pub struct RouteTls {
    server: Option<(Arc<ServerConfig>, Duration)>,
    client: Option<(Arc<ClientConfig>, Duration)>,
    /// Per server of the pool: the name sent as SNI and verified.
    names: Vec<Option<ServerName<'static>>>,
    /// Per side, one counter per [`HandshakeFailure::ALL`].
    failures: [Box<[Counter]>; 2],
}

impl RouteTls {
    /// The TLS state of `route`; `None` for a plain route.
    pub fn build(route: &Route, metrics: &Metrics) -> Result<Option<Box<RouteTls>>, TlsError> {
        let (c, u) = (&route.client.tls, &route.upstream.tls);
        if c.is_none() && u.is_none() {
            return Ok(None);
        }
        let server = match c {
            Some(t) => Some((tls::server_config(t)?, t.handshake_timeout)),
            None => None,
        };
        let client = match u {
            Some(t) => {
                if t.insecure_skip_verify {
                    tracing::warn!(
                        route = %route.name,
                        "INSECURE: upstream.tls.insecure_skip_verify = true: server certificates are NOT verified; anyone on the path can impersonate the servers"
                    );
                }
                Some((tls::client_config(t)?, t.handshake_timeout))
            }
            None => None,
        };
        let configured = u.as_ref().and_then(|t| t.server_name.as_deref());
        let names = route
            .upstream
            .servers
            .iter()
            .map(|s| tls::server_name(configured, &s.addr.host))
            .collect();
        let reasons = HandshakeFailure::ALL.map(HandshakeFailure::as_str);
        let failures = [Side::Client, Side::Upstream].map(|side| {
            let has = match side {
                Side::Client => c.is_some(),
                Side::Upstream => u.is_some(),
            };
            if has {
                metrics.tls_handshake_failures(&route.name, side.as_str(), &reasons)
            } else {
                Box::default()
            }
        });
        Ok(Some(Box::new(RouteTls {
            server,
            client,
            names,
            failures,
        })))
    }

    /// What the health checks of server `index` do for TLS: the upstream
    /// config and the name verified; `None` without upstream TLS.
    pub fn health_check(&self, index: usize) -> Option<crate::health::TlsCheck> {
        let (config, _) = self.client.as_ref()?;
        let name = self.names.get(index)?.clone()?;
        Some((config.clone(), name))
    }

    fn count_failure(&self, side: Side, why: HandshakeFailure) {
        let i = HandshakeFailure::ALL
            .iter()
            .position(|f| *f == why)
            .unwrap_or(0);
        if let Some(c) = self.failures[side as usize].get(i) {
            c.inc();
        }
    }
}

/// How a handshake did not complete.
enum Failed {
    /// kaproxy is shutting down.
    Cancelled,
    /// The handshake failed or timed out: why, and rustls's words.
    Tls(HandshakeFailure, String),
}

/// A handshake under its timeout and the shutdown token. Boxed by the
/// callers: tokio-rustls' handshake state is large and must not stay in the
/// pair's future for the life of the pair.
async fn handshake<T>(
    timeout: Duration,
    cancel: &CancellationToken,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, Failed> {
    tokio::select! {
        r = tokio::time::timeout(timeout, fut) => match r {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(Failed::Tls(HandshakeFailure::of(&e), e.to_string())),
            Err(_) => Err(Failed::Tls(
                HandshakeFailure::Timeout,
                format!("timed out after {}", crate::config::fmt_duration(timeout)),
            )),
        },
        _ = cancel.cancelled() => Err(Failed::Cancelled),
    }
}

/// The end of a pair whose handshake on `side` did not complete.
fn failed_end(
    tls: &RouteTls,
    route: &RouteState,
    side: Side,
    failed: Failed,
) -> (RelayEnd, Option<String>) {
    match failed {
        Failed::Cancelled => (RelayEnd::plain(route.kill_reason()), None),
        Failed::Tls(why, text) => {
            tls.count_failure(side, why);
            let detail = format!("TLS handshake failed ({}): {text}", why.as_str());
            let end = RelayEnd {
                reason: CloseReason::tls_error(side),
                error: Some(SideError {
                    side,
                    error: io::Error::other(text),
                }),
                undelivered: false,
            };
            (end, Some(detail))
        }
    }
}

/// The rest of a TLS route's pair after the PROXY header: client handshake,
/// connect, upstream handshake, relay, close.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    first: Arc<LiveRoute>,
    route: &RouteState,
    client: &TcpStream,
    who: &PairId,
    registration: Registration<'_>,
    stats: &RelayStats,
    destination: Option<SocketAddr>,
    cancel: &CancellationToken,
    close: Close<'_>,
) {
    // The client handshake runs on the settings the pair was accepted under.
    let Some(tls) = first.tls.as_deref() else {
        return;
    };
    let client_conn = match &tls.server {
        None => None,
        Some((config, timeout)) => {
            match Box::pin(handshake(
                *timeout,
                cancel,
                tls::accept(config.clone(), client),
            ))
            .await
            {
                Ok((conn, info)) => {
                    registration.set_tls(Side::Client, info);
                    Some(Box::new(Connection::Server(conn)))
                }
                Err(failed) => {
                    let (end, detail) = failed_end(tls, route, Side::Client, failed);
                    close.finish(registration, client, None, &end, detail);
                    return;
                }
            }
        }
    };

    // The connect and the upstream side follow the settings in force now: a
    // reload during the client handshake (up to handshake_timeout) must not
    // send the pair to a server the file no longer lists. The server index
    // and the TLS names come from this one load.
    let live = route.live_full();
    let up_tls = live.tls.as_deref();
    let connecting = Box::pin(connect_upstream(&live, client, who, cancel, destination)).await;
    let (c, failed_send) = match connecting {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            log_failed_attempts(who, &route.name, &registration, &e.attempts);
            let end = RelayEnd::plain(CloseReason::ConnectFailed);
            close.finish(registration, client, None, &end, Some(e.to_string()));
            return;
        }
        None => {
            let end = RelayEnd::plain(route.kill_reason());
            close.finish(registration, client, None, &end, None);
            return;
        }
    };
    log_failed_attempts(who, &route.name, &registration, &c.failed);
    registration.set_upstream(&c.stream);
    catch_up_upstream(route, &c.stream, &live.route.upstream.keepalive);
    let (upstream, up_addr, _active) = (c.stream, c.addr, c.active);
    if let Some(e) = failed_send {
        let detail = format!("sending the PROXY header: {e}");
        let end = RelayEnd::from_error(e);
        close.finish(
            registration,
            client,
            Some((&upstream, up_addr)),
            &end,
            Some(detail),
        );
        return;
    }

    let upstream_conn = match up_tls.and_then(|t| t.client.as_ref().map(|c| (t, c))) {
        None => None,
        Some((up_tls, (config, timeout))) => {
            let result = match up_tls.names.get(c.server).cloned().flatten() {
                Some(name) => {
                    let connect = tls::connect(config.clone(), name, &upstream);
                    Box::pin(handshake(*timeout, cancel, connect)).await
                }
                None => Err(Failed::Tls(
                    HandshakeFailure::Protocol,
                    "the server's host is no usable TLS server name; set upstream.tls.server_name"
                        .to_string(),
                )),
            };
            match result {
                Ok((conn, info)) => {
                    registration.set_tls(Side::Upstream, info);
                    Some(Box::new(Connection::Client(conn)))
                }
                Err(failed) => {
                    let (end, detail) = failed_end(up_tls, route, Side::Upstream, failed);
                    let up = Some((&upstream, up_addr));
                    close.finish(registration, client, up, &end, detail);
                    return;
                }
            }
        }
    };

    let flows = TlsFlows {
        client: client_conn,
        upstream: upstream_conn,
        c2u: TlsDir::default(),
        u2c: TlsDir::default(),
    };
    let end = relay::relay_flows(client, &upstream, route, stats, cancel, flows).await;
    close.finish(registration, client, Some((&upstream, up_addr)), &end, None);
}

/// Both directions of a pair with TLS on one side or both. A side without
/// TLS (`None`) is copied as plain TCP.
pub(super) struct TlsFlows {
    client: Option<Box<Connection>>,
    upstream: Option<Box<Connection>>,
    c2u: TlsDir,
    u2c: TlsDir,
}

/// One direction. `buf` is held only while a burst is under way: an idle
/// direction holds none (rustls keeps its own, small, per-connection state).
#[derive(Default)]
struct TlsDir {
    buf: Option<RelayBuf>,
    /// TLS bytes read from a TLS source and not yet handed to rustls: `[start..end]`.
    staged: Option<(RelayBuf, usize, usize)>,
    /// `buf[written..filled]` is read and not yet handed on.
    written: usize,
    filled: usize,
    /// End of stream read (close_notify, or FIN on a plain source); passed on
    /// once everything before it is delivered.
    eof: bool,
    /// The source's TCP stream ended (read_tls gave 0).
    tcp_eof: bool,
    done: bool,
}

/// Socket reads of one direction per poll: one of 64 KiB, well under a
/// millisecond of crypto. The worker polls its I/O driver only between
/// batches of task polls (tokio's event interval, 61), so the work of one
/// poll, times 61, is how long a flood can hold up the worker's other pairs.
const READS_PER_POLL: u32 = 1;

/// A reader with nothing to give yet: lets rustls tidy its receive buffer
/// without reading.
struct NothingYet;

impl Read for NothingYet {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// A fresh full-size scratch buffer (the spares are kept cleared).
fn scratch() -> RelayBuf {
    let mut buf = RelayBuf::take();
    buf.0.resize(RELAY_BUFFER, 0);
    buf
}

impl TlsDir {
    fn undelivered(&self, to: Option<&Connection>) -> bool {
        self.written < self.filled || to.is_some_and(|c| c.wants_write())
    }

    fn poll(
        &mut self,
        mut from_tls: Option<&mut Connection>,
        mut to_tls: Option<&mut Connection>,
        cx: &mut Context<'_>,
        io: Io<'_>,
    ) -> Poll<Result<(), SideError>> {
        let Io {
            from,
            to,
            from_side,
            pair_bytes,
            route_bytes,
            stats,
            wrote: wrote_to,
            last,
        } = io;
        let to_side = from_side.other();
        let from_err = |e| blame(from_side, from, e);
        let to_err = |e| blame(to_side, to, e);
        let count = |n: usize| {
            pair_bytes.fetch_add(n as u64, Ordering::Relaxed);
            route_bytes.inc_by(n as u64);
            stats.touch(from_side);
        };
        // Socket reads before this direction lets the rest of the pair (and
        // every other pair of the worker) run: rustls' writes and reads do not
        // go through tokio's readiness, so nothing else would make a stream
        // that never pauses give way.
        let mut reads_left = READS_PER_POLL;
        loop {
            // 1. Deliver what was read, then anything rustls holds for `to`.
            match to_tls.as_deref_mut() {
                Some(tc) => {
                    if let Some(buf) = &self.buf {
                        if self.written < self.filled {
                            let n = tc
                                .writer()
                                .write(&buf.0[self.written..self.filled])
                                .map_err(to_err)?;
                            if n == 0 && !tc.wants_write() {
                                return Poll::Ready(Err(to_err(io::ErrorKind::WriteZero.into())));
                            }
                            self.written += n;
                            count(n);
                        }
                    }
                    while tc.wants_write() {
                        match tc.write_tls(&mut Raw(to)) {
                            Ok(_) => *wrote_to = true,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                if let Err(e) = ready!(to.poll_write_ready(cx)) {
                                    return Poll::Ready(Err(to_err(e)));
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Poll::Ready(Err(to_err(e))),
                        }
                    }
                    // rustls took part of it (its send buffer was full): more to go.
                    if self.written < self.filled {
                        continue;
                    }
                }
                None => {
                    while let Some(buf) = self.buf.as_ref().filter(|_| self.written < self.filled) {
                        match to.try_write(&buf.0[self.written..self.filled]) {
                            Ok(0) => {
                                return Poll::Ready(Err(to_err(io::ErrorKind::WriteZero.into())))
                            }
                            Ok(n) => {
                                self.written += n;
                                count(n);
                                *wrote_to = true;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                if let Err(e) = ready!(to.poll_write_ready(cx)) {
                                    return Poll::Ready(Err(to_err(e)));
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Poll::Ready(Err(to_err(e))),
                        }
                    }
                }
            }
            self.written = 0;
            self.filled = 0;

            // 2. End of stream, after everything before it: close_notify went
            // out with the data above (TLS), then the FIN. When this ends the
            // pair (`last`), the close right after sends the FIN.
            if self.eof {
                self.buf = None;
                if !last {
                    sockopt::shutdown_write(to).map_err(to_err)?;
                }
                *wrote_to = true;
                return Poll::Ready(Ok(()));
            }

            // 3. Read more.
            match from_tls.as_deref_mut() {
                Some(fc) => {
                    let state = match fc.process_new_packets() {
                        Ok(state) => state,
                        Err(e) => {
                            // The alert rustls queued for the peer, if it can go now.
                            let _ = fc.write_tls(&mut Raw(from));
                            let e = io::Error::new(io::ErrorKind::InvalidData, e);
                            return Poll::Ready(Err(SideError {
                                side: from_side,
                                error: e,
                            }));
                        }
                    };
                    // What the source's session has to send itself (a key
                    // update's answer, an alert): sent when it can go, else
                    // the socket's write readiness wakes the pair to try again.
                    while fc.wants_write() {
                        match fc.write_tls(&mut Raw(from)) {
                            Ok(_) => {}
                            Err(e) if transient(&e) => {
                                let _ = from.poll_write_ready(cx);
                                break;
                            }
                            Err(e) => return Poll::Ready(Err(from_err(e))),
                        }
                    }
                    if state.plaintext_bytes_to_read() > 0 {
                        let buf = self.buf.get_or_insert_with(scratch);
                        match fc.reader().read(&mut buf.0) {
                            Ok(n) => self.filled = n,
                            Err(e) if transient(&e) => {}
                            Err(e) => return Poll::Ready(Err(from_err(e))),
                        }
                        continue;
                    }
                    if state.peer_has_closed() {
                        self.eof = true;
                        if let Some(tc) = to_tls.as_deref_mut() {
                            tc.send_close_notify();
                        }
                        continue;
                    }
                    if self.tcp_eof {
                        // A FIN without close_notify: the stream may have
                        // been cut. Never passed on as a clean end.
                        return Poll::Ready(Err(SideError {
                            side: from_side,
                            error: io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "peer closed the connection without a TLS close_notify (truncated stream)",
                            ),
                        }));
                    }
                    // rustls takes at most about 4 KiB per read_tls: it is fed
                    // from a staging buffer filled by one large read, not
                    // straight from the socket (a quarter of the syscalls).
                    if let Some((staged, start, end)) = self.staged.as_mut() {
                        let n = fc
                            .read_tls(&mut &staged.0[*start..*end])
                            .map_err(from_err)?;
                        if n == 0 {
                            // rustls has no room: a message it cannot complete.
                            return Poll::Ready(Err(from_err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "TLS record larger than rustls accepts",
                            ))));
                        }
                        *start += n;
                        if *start == *end {
                            self.staged = None;
                        }
                        continue;
                    }
                    if reads_left == 0 {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    reads_left -= 1;
                    let mut staged = scratch();
                    match from.try_read(&mut staged.0) {
                        Ok(0) => {
                            // rustls learns of the end of stream itself.
                            let _ = fc.read_tls(&mut io::empty());
                            self.tcp_eof = true;
                        }
                        Ok(n) => self.staged = Some((staged, 0, n)),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // Burst over: the buffers go back before waiting,
                            // rustls' own included (it shrinks its receive
                            // buffer only when asked to read again).
                            drop(staged);
                            self.buf = None;
                            let _ = fc.read_tls(&mut NothingYet);
                            if let Err(e) = ready!(from.poll_read_ready(cx)) {
                                return Poll::Ready(Err(from_err(e)));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Poll::Ready(Err(from_err(e))),
                    }
                }
                None => {
                    if reads_left == 0 {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    reads_left -= 1;
                    let buf = self.buf.get_or_insert_with(scratch);
                    match from.try_read(&mut buf.0) {
                        Ok(0) => {
                            self.eof = true;
                            if let Some(tc) = to_tls.as_deref_mut() {
                                tc.send_close_notify();
                            }
                        }
                        Ok(n) => self.filled = n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.buf = None;
                            if let Err(e) = ready!(from.poll_read_ready(cx)) {
                                return Poll::Ready(Err(from_err(e)));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Poll::Ready(Err(from_err(e))),
                    }
                }
            }
        }
    }
}

impl Flows for TlsFlows {
    fn poll(&mut self, dir: Flow, cx: &mut Context<'_>, io: Io<'_>) -> Poll<Result<(), SideError>> {
        let (client, upstream) = (self.client.as_deref_mut(), self.upstream.as_deref_mut());
        match dir {
            Flow::C2u => self.c2u.poll(client, upstream, cx, io),
            Flow::U2c => self.u2c.poll(upstream, client, cx, io),
        }
    }

    fn done(&self, dir: Flow) -> bool {
        match dir {
            Flow::C2u => self.c2u.done,
            Flow::U2c => self.u2c.done,
        }
    }

    fn set_done(&mut self, dir: Flow) {
        match dir {
            Flow::C2u => self.c2u.done = true,
            Flow::U2c => self.u2c.done = true,
        }
    }

    fn undelivered(&self, dir: Flow) -> bool {
        match dir {
            Flow::C2u => self.c2u.undelivered(self.upstream.as_deref()),
            Flow::U2c => self.u2c.undelivered(self.client.as_deref()),
        }
    }
}
