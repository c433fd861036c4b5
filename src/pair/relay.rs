//! Both directions of a pair, in one task, with half-close, timers and side-tagged errors.
//!
//! Buffers are allocated when a socket turns readable and dropped as soon as a
//! read would block, so an idle pair holds no relay buffer at all: the cost of
//! an idle pair is its task and its two sockets.

use std::future::pending;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::close::{classify, CloseReason, Side, SideError};
use crate::net::sockopt;

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
}

impl RelayStats {
    /// Fresh counters, with activity "now".
    pub fn new() -> RelayStats {
        RelayStats {
            client_to_upstream: AtomicU64::new(0),
            upstream_to_client: AtomicU64::new(0),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
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
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    limits: RelayLimits,
    stats: &RelayStats,
    cancel: &CancellationToken,
) -> RelayEnd {
    let mut c2u = std::pin::pin!(pump(
        client,
        upstream,
        Side::Client,
        &stats.client_to_upstream,
        stats
    ));
    let mut u2c = std::pin::pin!(pump(
        upstream,
        client,
        Side::Upstream,
        &stats.upstream_to_client,
        stats
    ));
    let mut c2u_done = false;
    let mut u2c_done = false;
    let mut half_close_deadline: Option<Instant> = None;

    loop {
        if c2u_done && u2c_done {
            return RelayEnd::plain(CloseReason::Completed);
        }
        let idle_deadline = limits.idle_timeout.map(|d| stats.last_activity() + d);
        tokio::select! {
            r = &mut c2u, if !c2u_done => match r {
                Ok(()) => {
                    c2u_done = true;
                    half_close_deadline = limits.half_close_timeout.map(|d| Instant::now() + d);
                }
                Err(e) => return RelayEnd::from_error(e),
            },
            r = &mut u2c, if !u2c_done => match r {
                Ok(()) => {
                    u2c_done = true;
                    half_close_deadline = limits.half_close_timeout.map(|d| Instant::now() + d);
                }
                Err(e) => return RelayEnd::from_error(e),
            },
            // A side that has sent its FIN is no longer read, so its death would go
            // unnoticed until something is written to it; wait for its socket error instead.
            e = socket_error(client, Side::Client), if c2u_done && !u2c_done => return RelayEnd::from_error(e),
            e = socket_error(upstream, Side::Upstream), if u2c_done && !c2u_done => return RelayEnd::from_error(e),
            _ = maybe_sleep_until(idle_deadline) => {
                if let Some(d) = limits.idle_timeout {
                    if stats.last_activity() + d <= Instant::now() {
                        return RelayEnd::plain(CloseReason::IdleTimeout);
                    }
                }
            }
            _ = maybe_sleep_until(half_close_deadline) => return RelayEnd::plain(CloseReason::HalfCloseTimeout),
            _ = cancel.cancelled() => return RelayEnd::plain(CloseReason::Shutdown),
        }
    }
}

async fn maybe_sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => pending().await,
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

/// Copies `from` → `to` until EOF, then half-closes `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    counter: &AtomicU64,
    stats: &RelayStats,
) -> Result<(), SideError> {
    let to_side = other(from_side);
    loop {
        from.readable().await.map_err(|error| SideError {
            side: from_side,
            error,
        })?;
        let mut buf: Vec<u8> = Vec::with_capacity(RELAY_BUFFER);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    sockopt::shutdown_write(to).map_err(|error| SideError {
                        side: to_side,
                        error,
                    })?;
                    return Ok(());
                }
                Ok(n) => {
                    write_all(to, &buf[..n]).await.map_err(|error| SideError {
                        side: to_side,
                        error,
                    })?;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    stats.touch();
                }
                // Drained for now: give the buffer back before waiting again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(SideError {
                        side: from_side,
                        error,
                    })
                }
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
