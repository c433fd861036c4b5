//! One direction of a pair: read from one socket, write to the other, pass the
//! end of stream on as a half-close.
//!
//! Buffers are taken when a socket turns readable and given back (to the
//! thread's few spares) as soon as a read would block, so an idle direction
//! holds no buffer and no pipe.

use std::cell::RefCell;
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
pub(super) const RELAY_BUFFER: usize = 64 * 1024;

/// Relay buffers a thread keeps for its next bursts. A burst of a few bytes
/// (one request, one small response) would otherwise cost a 64 KiB malloc and
/// free each, which were a sixth of kaproxy's user time on new connections.
/// Bounded per thread, not per pair: idle pairs still hold none.
const SPARE_BUFFERS: usize = 8;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A relay buffer that goes back to its thread's spares when dropped.
pub(super) struct RelayBuf(pub(super) Vec<u8>);

impl RelayBuf {
    pub(super) fn take() -> RelayBuf {
        let spare = SPARE.with(|s| s.borrow_mut().pop());
        RelayBuf(spare.unwrap_or_else(|| Vec::with_capacity(RELAY_BUFFER)))
    }
}

impl Drop for RelayBuf {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        // try_with: a buffer dropped while the thread exits is simply freed.
        let _ = SPARE.try_with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARE_BUFFERS {
                spare.push(buf);
            }
        });
    }
}

/// Data read from one side and not yet fully written to the other.
enum Pending {
    /// Copy path: a user-space buffer and how much of it has been written.
    Buffer(RelayBuf, usize),
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
    /// The other direction has ended: this one's end of stream ends the pair.
    pub last: bool,
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Half-closes towards `to`. The FIN is data the peer must acknowledge, and
/// keepalive does not run until it does, so the watchdog covers it like a write.
///
/// When it ends the pair (`last`), the close that follows sends the FIN: `to`
/// has nothing left to read, since its own end of stream was read before, so
/// Linux closes it with FIN and the shutdown(2) would be a wasted call.
fn pass_on_eof(
    to: &TcpStream,
    to_side: Side,
    wrote_to: &mut bool,
    last: bool,
) -> Result<(), SideError> {
    if last {
        return Ok(());
    }
    sockopt::shutdown_write(to).map_err(|e| blame(to_side, to, e))?;
    *wrote_to = true;
    Ok(())
}

impl Direction {
    /// Whether data read from the source is still waiting to be written.
    pub fn undelivered(&self) -> bool {
        match self.pending.as_deref() {
            Some(Pending::Buffer(buf, written)) => *written < buf.0.len(),
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
            last,
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
                Some(Pending::Buffer(buf, written)) if *written < buf.0.len() => {
                    if let Err(e) = ready!(to.poll_write_ready(cx)) {
                        return Poll::Ready(Err(to_err(e)));
                    }
                    match to.try_write(&buf.0[*written..]) {
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
                    // Some(..) when splice would block though data is queued:
                    // it stops at an urgent mark, which only a read gets past.
                    let mut stuck_at_mark = false;
                    let filled = from.try_io(Interest::READABLE, || match pipe.fill_from(from) {
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                && sockopt::has_unread(from) =>
                        {
                            stuck_at_mark = true;
                            Ok(1)
                        }
                        r => r,
                    });
                    if stuck_at_mark {
                        // Readiness stays set: the copy path reads at once.
                        self.pending = None;
                        self.bulk = false;
                        continue;
                    }
                    match filled {
                        Ok(0) => {
                            // A finished direction is not polled again: give the pipe back now.
                            self.pending = None;
                            return Poll::Ready(pass_on_eof(to, to_side, wrote_to, last));
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
                    Box::new(Pending::Buffer(RelayBuf::take(), 0))
                }
            };
            let Pending::Buffer(buf, written) = &mut *pending else {
                unreachable!("only a buffer is kept for the next read");
            };
            let buf = &mut buf.0;
            buf.clear();
            *written = 0;
            // A short read does not prove the queue empty: a read also stops at the
            // urgent mark with data behind it, so only WouldBlock ends a burst.
            match from.try_read_buf(buf) {
                Ok(0) => return Poll::Ready(pass_on_eof(to, to_side, wrote_to, last)),
                Ok(n) => {
                    self.bulk = n == buf.capacity();
                    self.pending = Some(pending);
                }
                // Drained for now: the buffer goes back to the spares here, before waiting again.
                Err(e) if transient(&e) => {}
                Err(e) => return Poll::Ready(Err(from_err(e))),
            }
        }
    }
}
