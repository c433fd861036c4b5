//! Accept loops. One pair task is spawned per accepted socket and the loop never
//! waits on per-connection work, so one slow client cannot stall accepts.
//!
//! A route with `max_connections` takes a slot before each accept. The order
//! is: this worker's listener is readable, then a slot, then accept(2). A slot
//! taken before knowing that a client waits here could sit with a worker whose
//! backlog is empty while another worker's client waits for it. At the limit,
//! clients wait in the listen backlog: nothing is accepted and then dropped.
//! tokio's TcpListener cannot wait for readability without accepting, so the
//! loop waits on the listening socket itself; an accept costs the same one
//! accept4(2) and one registration as tokio's, with or without a limit.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::RouteState;
use crate::net::sockopt;

/// First pause after running out of descriptors or memory; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this period while accept keeps failing.
const ERROR_LOG_PERIOD: Duration = Duration::from_secs(5);

/// Accepts until `stop` is cancelled; the listener is dropped on return so new
/// connects are refused from then on. A route has one listener per worker, and
/// `open` counts the route's listeners still open: the last one to close says
/// that the route stopped accepting.
///
/// The listener is shared with the route's owner, which may retune its
/// options (a reload) while the loop runs; it closes once both let go.
pub async fn accept_loop(
    listener: Arc<AsyncFd<std::net::TcpListener>>,
    open: Arc<AtomicUsize>,
    route: Arc<RouteState>,
    stop: CancellationToken,
    pairs: TaskTracker,
) {
    // Each pair waits on this token; a child of the route's per accept loop
    // keeps those waits on this worker's own lock instead of one shared by
    // every worker.
    let kill_pairs = route.kill.child_token();
    // After a reload retuned the listener, clients that were already in its
    // backlog carry the old client options: set the new ones on each socket
    // accepted until the backlog has been empty once. Bounded by the
    // backlog's size, in case it never empties. Starting from 0, a loop
    // started on listeners taken over from another route checks too.
    let mut epoch = 0u32;
    let mut stale_left = 0usize;
    let mut backoff = MIN_BACKOFF;
    let mut last_log: Option<Instant> = None;
    let mut suppressed = 0u64;
    loop {
        let ready = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.readable() => r,
        };
        let now_epoch = route.client_options_epoch.load(Ordering::Acquire);
        if now_epoch != epoch {
            epoch = now_epoch;
            stale_left = sockopt::LISTEN_BACKLOG as usize;
        }
        let mut slot = None;
        if ready.is_ok() {
            slot = tokio::select! {
                _ = stop.cancelled() => break,
                s = route.max_connections.acquire() => Some(s),
            };
        }
        let accepted = match ready {
            // A WouldBlock clears this worker's readiness (another took the
            // client); the slot goes back as the loop comes round.
            Ok(mut guard) => match guard.try_io(|l| sockopt::accept(l.get_ref())) {
                Ok(r) => r.and_then(|(s, addr)| Ok((TcpStream::from_std(s)?, addr))),
                Err(_would_block) => {
                    stale_left = 0;
                    continue;
                }
            },
            Err(e) => Err(e),
        };
        match accepted {
            Ok((stream, addr)) => {
                backoff = MIN_BACKOFF;
                if stale_left > 0 {
                    stale_left -= 1;
                    let spec = route.live().route.client.keepalive;
                    if let Err(e) = sockopt::retune(&stream, &spec) {
                        tracing::debug!(route = %route.name, error = %e, "cannot set the reloaded client keepalive on a client from the backlog");
                    }
                }
                // The pair gives it back when it closes.
                if let Some(slot) = slot {
                    slot.keep();
                }
                pairs.spawn(super::run(
                    route.clone(),
                    stream,
                    addr,
                    kill_pairs.clone(),
                    epoch,
                ));
            }
            Err(e) => {
                // Not held through a backoff: another worker may have a client.
                drop(slot);
                let errno = e.raw_os_error();
                // The peer gave up between SYN and accept: nothing to do.
                if matches!(errno, Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO))
                    || e.kind() == io::ErrorKind::WouldBlock
                {
                    continue;
                }
                let exhausted = matches!(
                    errno,
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                let now = Instant::now();
                if last_log.is_none_or(|t| now.duration_since(t) >= ERROR_LOG_PERIOD) {
                    tracing::error!(
                        route = %route.name,
                        error = %e,
                        suppressed,
                        retry_in_ms = backoff.as_millis() as u64,
                        "accept failed{}",
                        if exhausted { "; out of file descriptors or memory, raise the nofile limit" } else { "" }
                    );
                    last_log = Some(now);
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    // Closed before the log line, so anyone who sees it can rely on refusals.
    // (A reload that moved the route logs this for the old address.)
    let address = listener.get_ref().local_addr().ok();
    drop(listener);
    if open.fetch_sub(1, Ordering::AcqRel) == 1 {
        match address {
            Some(address) => tracing::info!(route = %route.name, %address, "stopped accepting"),
            None => tracing::info!(route = %route.name, "stopped accepting"),
        }
    }
}
