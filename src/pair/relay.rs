//! Both directions of a pair, in one task, with half-close, timers and side-tagged errors.
//!
//! Buffers are allocated when a socket turns readable and dropped as soon as a
//! read would block, so an idle pair holds no relay buffer at all: the cost of
//! an idle pair is its task and its two sockets.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::close::{classify, CloseReason, Side, SideError};
use crate::net::sockopt;
use crate::net::splice::{self, Pipe};

/// Size of a relay buffer while data flows. 64 KiB keeps syscalls per byte low
/// on bulk transfers; it is only held while a socket has data to read.
const RELAY_BUFFER: usize = 64 * 1024;

/// Timers of one pair.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Close after this long with no byte either way.
    pub idle_timeout: Option<Duration>,
    /// Close after this long half-closed.
    pub half_close_timeout: Option<Duration>,
}

/// Counters a pair updates while relaying; read at close time.
#[derive(Debug)]
pub struct RelayStats {
    /// Bytes written to the upstream.
    pub client_to_upstream: AtomicU64,
    /// Bytes written to the client.
    pub upstream_to_client: AtomicU64,
    started: Instant,
    /// Milliseconds after `started` of the last byte relayed.
    last_activity_ms: AtomicU64,
    /// Milliseconds after `started` of the last data read from each side.
    last_from_client_ms: AtomicU64,
    last_from_upstream_ms: AtomicU64,
}

impl RelayStats {
    /// Fresh counters, with activity "now".
    pub fn new() -> RelayStats {
        RelayStats {
            client_to_upstream: AtomicU64::new(0),
            upstream_to_client: AtomicU64::new(0),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            last_from_client_ms: AtomicU64::new(0),
            last_from_upstream_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self, from: Side) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
        let side = match from {
            Side::Client => &self.last_from_client_ms,
            Side::Upstream => &self.last_from_upstream_ms,
        };
        side.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// How long the pair has existed.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time since the last byte relayed in either direction.
    pub fn idle(&self) -> Duration {
        self.last_activity().elapsed()
    }

    /// Time since data last came from `side` (since the pair began if it never sent any).
    pub fn since_data_from(&self, side: Side) -> Duration {
        let ms = match side {
            Side::Client => &self.last_from_client_ms,
            Side::Upstream => &self.last_from_upstream_ms,
        };
        (self.started + Duration::from_millis(ms.load(Ordering::Relaxed))).elapsed()
    }
}

impl Default for RelayStats {
    fn default() -> Self {
        RelayStats::new()
    }
}

/// How a relay ended.
#[derive(Debug)]
pub struct RelayEnd {
    /// The one reason.
    pub reason: CloseReason,
    /// The error behind a failure reason.
    pub error: Option<SideError>,
}

impl RelayEnd {
    /// An end that is not a side's failure.
    pub fn plain(reason: CloseReason) -> RelayEnd {
        RelayEnd {
            reason,
            error: None,
        }
    }

    /// A side's failure, classified.
    pub fn from_error(error: SideError) -> RelayEnd {
        RelayEnd {
            reason: classify(&error),
            error: Some(error),
        }
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    }
}

/// Relays until both directions end, one side fails, a timer fires or `cancel` is triggered.
///
/// A hand-written future rather than nested async blocks: waiting on socket
/// readiness through `poll_read_ready`/`poll_write_ready` stores nothing in the
/// future, so an idle pair's task stays small. Timers and the half-close error
/// watch are boxed and exist only while they are needed.
pub fn relay<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    limits: &'a RelayLimits,
    stats: &'a RelayStats,
    cancel: &'a CancellationToken,
) -> Relay<'a> {
    Relay {
        client,
        upstream,
        limits,
        stats,
        c2u: Direction::default(),
        u2c: Direction::default(),
        idle_timer: limits
            .idle_timeout
            .map(|d| Box::pin(sleep_until(Instant::now() + d))),
        half_close_timer: None,
        error_watch: None,
        cancelled: cancel.cancelled(),
    }
}

pin_project_lite::pin_project! {
    /// The relay future of one pair; see [`relay`].
    pub struct Relay<'a> {
        client: &'a TcpStream,
        upstream: &'a TcpStream,
        limits: &'a RelayLimits,
        stats: &'a RelayStats,
        c2u: Direction,
        u2c: Direction,
        idle_timer: Option<Pin<Box<Sleep>>>,
        half_close_timer: Option<Pin<Box<Sleep>>>,
        error_watch: Option<Pin<Box<dyn Future<Output = SideError> + Send + 'a>>>,
        #[pin]
        cancelled: WaitForCancellationFuture<'a>,
    }
}

impl Future for Relay<'_> {
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self.project();
        let (client, upstream, stats, limits) =
            (*this.client, *this.upstream, *this.stats, *this.limits);
        let directions = [
            (
                &mut *this.c2u,
                client,
                upstream,
                Side::Client,
                &stats.client_to_upstream,
            ),
            (
                &mut *this.u2c,
                upstream,
                client,
                Side::Upstream,
                &stats.upstream_to_client,
            ),
        ];
        for (dir, from, to, side, counter) in directions {
            if dir.done {
                continue;
            }
            match dir.poll(cx, from, to, side, counter, stats) {
                Poll::Ready(Ok(())) => {
                    dir.done = true;
                    *this.half_close_timer = limits
                        .half_close_timeout
                        .map(|d| Box::pin(sleep_until(Instant::now() + d)));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::from_error(e)),
                Poll::Pending => {}
            }
        }
        match (this.c2u.done, this.u2c.done) {
            (true, true) => return Poll::Ready(RelayEnd::plain(CloseReason::Completed)),
            // A side that has sent its FIN is no longer read, so its death would go
            // unnoticed until something is written to it; wait for its socket error.
            (true, false) if this.error_watch.is_none() => {
                *this.error_watch = Some(Box::pin(socket_error(client, Side::Client)))
            }
            (false, true) if this.error_watch.is_none() => {
                *this.error_watch = Some(Box::pin(socket_error(upstream, Side::Upstream)))
            }
            _ => {}
        }
        if let Some(w) = this.error_watch.as_mut() {
            if let Poll::Ready(e) = w.as_mut().poll(cx) {
                return Poll::Ready(RelayEnd::from_error(e));
            }
        }
        if let (Some(timer), Some(d)) = (this.idle_timer.as_mut(), limits.idle_timeout) {
            let deadline = stats.last_activity() + d;
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(RelayEnd::plain(CloseReason::IdleTimeout));
            }
        }
        if let Some(timer) = this.half_close_timer.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(RelayEnd::plain(CloseReason::HalfCloseTimeout));
            }
        }
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(RelayEnd::plain(CloseReason::Shutdown));
        }
        Poll::Pending
    }
}

/// Data read from one side and not yet fully written to the other.
enum Pending {
    /// Copy path: a user-space buffer and how much of it has been written.
    Buffer(Vec<u8>, usize),
    /// Zero-copy path for bulk transfers.
    Pipe(Pipe),
}

/// State of one direction. The sockets are passed in on each poll rather than
/// stored, to keep the per-pair state small.
#[derive(Default)]
struct Direction {
    /// `None` while waiting to read: that is where an idle pair sits, holding
    /// neither buffer nor pipe.
    pending: Option<Pending>,
    /// The last read filled a whole buffer: move to splice for the rest of the burst.
    bulk: bool,
    /// splice is not available for these sockets; copy only.
    copy_only: bool,
    done: bool,
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Direction {
    /// Ready(Ok) once EOF has been read from `from` and passed on to `to` as a half-close.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        from_side: Side,
        counter: &AtomicU64,
        stats: &RelayStats,
    ) -> Poll<Result<(), SideError>> {
        let from_err = |error| SideError {
            side: from_side,
            error,
        };
        let to_err = |error| SideError {
            side: other(from_side),
            error,
        };
        let wrote = |n: usize| {
            counter.fetch_add(n as u64, Ordering::Relaxed);
            stats.touch(from_side);
        };
        loop {
            match self.pending.as_mut() {
                Some(Pending::Buffer(buf, written)) if *written < buf.len() => {
                    if let Err(e) = ready!(to.poll_write_ready(cx)) {
                        return Poll::Ready(Err(to_err(e)));
                    }
                    match to.try_write(&buf[*written..]) {
                        Ok(0) => return Poll::Ready(Err(to_err(io::ErrorKind::WriteZero.into()))),
                        Ok(n) => {
                            *written += n;
                            wrote(n);
                        }
                        Err(e) if transient(&e) => {}
                        Err(e) => return Poll::Ready(Err(to_err(e))),
                    }
                    continue;
                }
                Some(Pending::Pipe(pipe)) if pipe.queued > 0 => {
                    if let Err(e) = ready!(to.poll_write_ready(cx)) {
                        return Poll::Ready(Err(to_err(e)));
                    }
                    match to.try_io(Interest::WRITABLE, || pipe.drain_to(to)) {
                        Ok(n) => wrote(n),
                        Err(e) if transient(&e) => {}
                        Err(e) => return Poll::Ready(Err(to_err(e))),
                    }
                    continue;
                }
                Some(Pending::Pipe(pipe)) => {
                    match from.try_io(Interest::READABLE, || pipe.fill_from(from)) {
                        Ok(0) => return Poll::Ready(sockopt::shutdown_write(to).map_err(to_err)),
                        Ok(_) => {}
                        // Burst over: close the pipe before waiting again.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.pending = None;
                            self.bulk = false;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // EINVAL: these descriptors cannot splice; fall back to copying.
                        Err(e) if splice::unsupported(&e) => {
                            self.pending = None;
                            self.copy_only = true;
                        }
                        Err(e) => return Poll::Ready(Err(from_err(e))),
                    }
                    continue;
                }
                _ => {}
            }
            if self.bulk && !self.copy_only {
                match Pipe::new() {
                    Ok(pipe) => {
                        self.pending = Some(Pending::Pipe(pipe));
                        continue;
                    }
                    // Out of descriptors, say: copying still works.
                    Err(_) => self.bulk = false,
                }
            }
            // Everything read has been written. Straight after a write, try the
            // next read with the same buffer; after a pause, wait for readiness
            // first and only then allocate.
            let mut buf = match self.pending.take() {
                Some(Pending::Buffer(buf, _)) => buf,
                _ => {
                    if let Err(e) = ready!(from.poll_read_ready(cx)) {
                        return Poll::Ready(Err(from_err(e)));
                    }
                    Vec::with_capacity(RELAY_BUFFER)
                }
            };
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => return Poll::Ready(sockopt::shutdown_write(to).map_err(to_err)),
                Ok(n) => {
                    self.bulk = n == buf.capacity();
                    self.pending = Some(Pending::Buffer(buf, 0));
                }
                // Drained for now: the buffer is dropped here, before waiting again.
                Err(e) if transient(&e) => {}
                Err(e) => return Poll::Ready(Err(from_err(e))),
            }
        }
    }
}

/// Resolves when the socket reports an error (SO_ERROR), e.g. ETIMEDOUT from keepalive.
async fn socket_error(stream: &TcpStream, side: Side) -> SideError {
    loop {
        let tag = |error| SideError { side, error };
        if let Err(e) = stream.ready(Interest::ERROR).await {
            return tag(e);
        }
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => return tag(e),
            // Error readiness without a pending SO_ERROR (already consumed by a
            // read): clear it so the next wait blocks instead of spinning.
            Ok(None) => {
                let _ = stream.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                });
            }
        }
    }
}
