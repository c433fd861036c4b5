//! One direction of a pair: read from one socket, write to the other, pass the
//! end of stream on as a half-close.
//!
//! Buffers are allocated when a socket turns readable and dropped as soon as a
//! read would block, so an idle direction holds no buffer and no pipe.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::close::{blame, Side, SideError};
use super::relay::RelayStats;
use crate::net::sockopt;
use crate::net::splice::{self, Pipe};

/// Size of a relay buffer while data flows. 64 KiB keeps syscalls per byte low
/// on bulk transfers; it is only held while a socket has data to read.
const RELAY_BUFFER: usize = 64 * 1024;

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
pub(super) struct Direction {
    /// `None` while waiting to read: that is where an idle pair sits, holding
    /// neither buffer nor pipe. Boxed so that the idle pair's task holds a
    /// pointer, not room for either.
    pending: Option<Box<Pending>>,
    /// The last read filled a whole buffer: move to splice for the rest of the burst.
    bulk: bool,
    /// splice is not available for these sockets; copy only.
    copy_only: bool,
    /// End of stream was read and passed on.
    pub done: bool,
}

/// What one poll of a direction works with.
pub(super) struct Io<'a> {
    pub from: &'a TcpStream,
    pub to: &'a TcpStream,
    pub from_side: Side,
    /// This pair's count of bytes written in this direction.
    pub pair_bytes: &'a AtomicU64,
    /// The route's count, which /metrics shows while the pair lives.
    pub route_bytes: &'a Counter,
    pub stats: &'a RelayStats,
    /// Set when data or a FIN was written to `to`: the receiving side's
    /// watchdog then arms.
    pub wrote: &'a mut bool,
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Half-closes towards `to`. The FIN is data the peer must acknowledge, and
/// keepalive does not run until it does, so the watchdog covers it like a write.
fn pass_on_eof(to: &TcpStream, to_side: Side, wrote_to: &mut bool) -> Result<(), SideError> {
    sockopt::shutdown_write(to).map_err(|e| blame(to_side, to, e))?;
    *wrote_to = true;
    Ok(())
}

impl Direction {
    /// Whether data read from the source is still waiting to be written.
    pub fn undelivered(&self) -> bool {
        match self.pending.as_deref() {
            Some(Pending::Buffer(buf, written)) => *written < buf.len(),
            Some(Pending::Pipe(pipe)) => pipe.queued > 0,
            None => false,
        }
    }

    /// Ready(Ok) once EOF has been read from `from` and passed on to `to` as a half-close.
    pub fn poll(&mut self, cx: &mut Context<'_>, io: Io<'_>) -> Poll<Result<(), SideError>> {
        let Io {
            from,
            to,
            from_side,
            pair_bytes,
            route_bytes,
            stats,
            wrote: wrote_to,
        } = io;
        let to_side = from_side.other();
        let from_err = |e| blame(from_side, from, e);
        let to_err = |e| blame(to_side, to, e);
        let mut wrote = |n: usize| {
            pair_bytes.fetch_add(n as u64, Ordering::Relaxed);
            route_bytes.inc_by(n as u64);
            stats.touch(from_side);
            *wrote_to = true;
        };
        loop {
            match self.pending.as_deref_mut() {
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
                        Ok(0) => {
                            // A finished direction is not polled again: give the pipe back now.
                            self.pending = None;
                            return Poll::Ready(pass_on_eof(to, to_side, wrote_to));
                        }
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
                        self.pending = Some(Box::new(Pending::Pipe(pipe)));
                        continue;
                    }
                    // Out of descriptors, say: copying still works.
                    Err(_) => self.bulk = false,
                }
            }
            // Everything read has been written. Straight after a write, try the
            // next read with the same buffer; after a pause, wait for readiness
            // first and only then allocate.
            let mut pending = match self.pending.take() {
                Some(p) if matches!(*p, Pending::Buffer(..)) => p,
                _ => {
                    if let Err(e) = ready!(from.poll_read_ready(cx)) {
                        return Poll::Ready(Err(from_err(e)));
                    }
                    Box::new(Pending::Buffer(Vec::with_capacity(RELAY_BUFFER), 0))
                }
            };
            let Pending::Buffer(buf, written) = &mut *pending else {
                unreachable!("only a buffer is kept for the next read");
            };
            buf.clear();
            *written = 0;
            match from.try_read_buf(buf) {
                Ok(0) => return Poll::Ready(pass_on_eof(to, to_side, wrote_to)),
                Ok(n) => {
                    self.bulk = n == buf.capacity();
                    self.pending = Some(pending);
                }
                // Drained for now: the buffer is dropped here, before waiting again.
                Err(e) if transient(&e) => {}
                Err(e) => return Poll::Ready(Err(from_err(e))),
            }
        }
    }
}
