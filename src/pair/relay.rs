//! Both directions of a pair, in one task: half-close, an error watch on each
//! socket for the whole life of the pair, the dead/stalled watchdog, and the
//! idle and half-close timers.
//!
//! Rules every path keeps:
//! - A socket's error is noticed whatever the other direction is doing: each
//!   socket has its own error watch, not only the direction reading from it.
//! - Timers measure silence. A direction with data still waiting for its
//!   receiver is not silent, so neither `idle_timeout` nor `half_close_timeout`
//!   ever cuts it; a slow reader is bounded by `stall_timeout` only.
//! - An idle pair holds no relay buffer, no error-watch and no timer state
//!   beyond what its configured timers need: both are boxed and exist only
//!   while something is due or a direction is not simply waiting to read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::close::{classify, CloseReason, Side, SideError};
use super::direction::Direction;
pub(super) use super::direction::Io;
pub use super::stats::RelayStats;
use super::watchdog::{SideWatch, Verdict, WatchSpec};
use super::RouteState;
use crate::net::sockopt;

/// Timers and watchdogs of one pair.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Close after this long with no byte either way and nothing waiting.
    pub idle_timeout: Option<Duration>,
    /// Close a half-closed pair whose open direction carries nothing for this long.
    pub half_close_timeout: Option<Duration>,
    /// Dead/stalled judgement of the client side.
    pub client_watch: WatchSpec,
    /// Dead/stalled judgement of the upstream side.
    pub upstream_watch: WatchSpec,
    /// When a reload set these: the timers of pairs older than that count
    /// from then, not from their last byte.
    pub since: Option<Instant>,
    /// Changes when a reload changes the watchdog settings, so that a live
    /// pair arms a newly enabled watchdog on data already in flight.
    pub watch_generation: u32,
}

impl RelayLimits {
    /// The limits a route's pairs share, set at `since` by a reload.
    pub fn of(
        route: &crate::config::Route,
        since: Option<Instant>,
        watch_generation: u32,
    ) -> RelayLimits {
        RelayLimits {
            since,
            watch_generation,
            idle_timeout: route.idle_timeout,
            half_close_timeout: route.half_close_timeout,
            client_watch: WatchSpec::of(&route.client.keepalive),
            upstream_watch: WatchSpec::of(&route.upstream.keepalive),
        }
    }

    fn watch(&self, side: Side) -> &WatchSpec {
        match side {
            Side::Client => &self.client_watch,
            Side::Upstream => &self.upstream_watch,
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub struct RelayEnd {
    /// The one reason.
    pub reason: CloseReason,
    /// The error behind a failure reason.
    pub error: Option<SideError>,
    /// kaproxy still held data it had read and not delivered: the receiver
    /// must not be told the stream ended cleanly.
    pub undelivered: bool,
}

impl RelayEnd {
    /// An end that is not a side's failure.
    pub fn plain(reason: CloseReason) -> RelayEnd {
        RelayEnd {
            reason,
            error: None,
            undelivered: false,
        }
    }

    /// A side's failure, classified.
    pub fn from_error(error: SideError) -> RelayEnd {
        RelayEnd {
            reason: classify(&error),
            error: Some(error),
            undelivered: false,
        }
    }

    fn with_undelivered(mut self, undelivered: bool) -> RelayEnd {
        self.undelivered = undelivered;
        self
    }
}

/// One of the two directions of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Client to upstream.
    C2u,
    /// Upstream to client.
    U2c,
}

/// The two directions of a pair, as the relay drives them.
pub(super) trait Flows {
    /// Moves what can be moved in `dir`; Ready(Ok) once its end of stream was passed on.
    fn poll(&mut self, dir: Flow, cx: &mut Context<'_>, io: Io<'_>) -> Poll<Result<(), SideError>>;
    /// Whether `dir` has ended.
    fn done(&self, dir: Flow) -> bool;
    /// Marks `dir` ended.
    fn set_done(&mut self, dir: Flow);
    /// Whether `dir` holds data read and not yet delivered.
    fn undelivered(&self, dir: Flow) -> bool;
    /// The end a direction's error makes.
    fn end_with(&self, e: SideError) -> RelayEnd {
        RelayEnd::from_error(e)
    }
}

/// Plain TCP on both sides: splice and copy (direction.rs).
#[derive(Default)]
pub(super) struct Plain {
    c2u: Direction,
    u2c: Direction,
}

impl Plain {
    fn dir(&mut self, dir: Flow) -> &mut Direction {
        match dir {
            Flow::C2u => &mut self.c2u,
            Flow::U2c => &mut self.u2c,
        }
    }

    fn dir_ref(&self, dir: Flow) -> &Direction {
        match dir {
            Flow::C2u => &self.c2u,
            Flow::U2c => &self.u2c,
        }
    }
}

impl Flows for Plain {
    fn poll(&mut self, dir: Flow, cx: &mut Context<'_>, io: Io<'_>) -> Poll<Result<(), SideError>> {
        self.dir(dir).poll(cx, io)
    }

    fn done(&self, dir: Flow) -> bool {
        self.dir_ref(dir).done
    }

    fn set_done(&mut self, dir: Flow) {
        self.dir(dir).done = true;
    }

    fn undelivered(&self, dir: Flow) -> bool {
        self.dir_ref(dir).undelivered()
    }
}

/// `t + d`, or a time too far to matter where that would overflow.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Relays until both directions end, one side fails, a timer fires or `cancel` is triggered.
///
/// A hand-written future rather than nested async blocks: waiting on socket
/// readiness through `poll_read_ready`/`poll_write_ready` stores nothing in the
/// future, so an idle pair's task stays small.
pub fn relay<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    route: &'a RouteState,
    stats: &'a RelayStats,
    cancel: &'a CancellationToken,
) -> impl Future<Output = RelayEnd> + Send + 'a {
    relay_flows(client, upstream, route, stats, cancel, Plain::default())
}

/// The relay of [`relay`] over any pair of flows: plain TCP (splice and
/// copy), or TLS on either side (see `pair/tls.rs`). Everything else, error
/// watches, watchdogs, timers, is the same code on the same raw sockets.
pub(super) fn relay_flows<'a, T: Flows + Send + 'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    route: &'a RouteState,
    stats: &'a RelayStats,
    cancel: &'a CancellationToken,
    flows: T,
) -> impl Future<Output = RelayEnd> + Send + 'a {
    Relay {
        client,
        upstream,
        route,
        stats,
        watch_generation: route.live().limits.watch_generation,
        flows,
        half_closed_at: None,
        timers: None,
        errors: None,
        watch_errors: socket_error,
        cancelled: cancel.cancelled(),
    }
}

/// Error watches on both sockets, for while a direction is not waiting to read
/// from its own source (blocked writing, or done): then nothing else would see
/// that socket's error.
struct ErrorWatches<W> {
    client: Pin<Box<W>>,
    upstream: Pin<Box<W>>,
}

pin_project_lite::pin_project! {
    /// Timer state, boxed (one allocation) and present only while something is due.
    struct TimerState {
        // The earliest deadline of the parts below. It may fire early (a later
        // deadline is not pushed on every byte); each part then checks whether it
        // is really due.
        #[pin]
        sleep: Sleep,
        watch: [SideWatch; 2],
        holds: Holds,
    }
}

/// Deadline of a timer state made before anything is due. Later than any real
/// deadline, so the first one resets it: a placeholder of "now" would have been
/// registered as it stood, and fired (and woken the pair) a millisecond later.
const NOT_YET_DUE: Duration = Duration::from_secs(365 * 24 * 3600);

impl TimerState {
    fn new(at: Instant) -> Pin<Box<TimerState>> {
        Box::pin(TimerState {
            sleep: sleep_until(at),
            watch: [SideWatch::default(), SideWatch::default()],
            holds: Holds::default(),
        })
    }
}

pin_project_lite::pin_project! {
    /// The relay future of one pair; see [`relay`].
    struct Relay<'a, W, F, T> {
        client: &'a TcpStream,
        upstream: &'a TcpStream,
        // The route's shared limits and byte counters.
        route: &'a RouteState,
        stats: &'a RelayStats,
        // The watchdog settings this pair has armed by.
        watch_generation: u32,
        // Both directions.
        flows: T,
        half_closed_at: Option<Instant>,
        timers: Option<Pin<Box<TimerState>>>,
        errors: Option<ErrorWatches<W>>,
        // Makes an error watch; a function item, so it costs nothing to hold.
        watch_errors: F,
        #[pin]
        cancelled: WaitForCancellationFuture<'a>,
    }
}

/// Times before which a timer that found data waiting (instead of silence)
/// will not fire again.
#[derive(Default)]
struct Holds {
    idle: Option<Instant>,
    half_close: Option<Instant>,
}

/// What the timer checks need, borrowed from the projected future.
struct Timers<'r, 'a> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    limits: &'a RelayLimits,
    stats: &'a RelayStats,
    done: [bool; 2],
    undelivered: bool,
    half_closed_at: Option<Instant>,
    _flows: std::marker::PhantomData<&'r ()>,
}

impl Timers<'_, '_> {
    fn idle_due(&self, holds: &Holds) -> Option<Instant> {
        let d = self.limits.idle_timeout?;
        let due = after(self.counted_from(self.stats.last_activity()), d);
        Some(holds.idle.map_or(due, |h| due.max(h)))
    }

    /// Where a timer that last saw `activity` counts from: a reload that set
    /// the limits since then restarts the count.
    fn counted_from(&self, activity: Instant) -> Instant {
        self.limits.since.map_or(activity, |s| s.max(activity))
    }

    /// The source side of the direction still open while half-closed.
    fn open_source(&self) -> Option<Side> {
        match (self.done[0], self.done[1]) {
            (true, false) => Some(Side::Upstream),
            (false, true) => Some(Side::Client),
            _ => None,
        }
    }

    fn half_close_due(&self, holds: &Holds) -> Option<Instant> {
        let d = self.limits.half_close_timeout?;
        let since = self.half_closed_at?;
        let from = self.open_source()?;
        let due = after(self.counted_from(since.max(self.stats.last_from(from))), d);
        Some(holds.half_close.map_or(due, |h| due.max(h)))
    }

    fn next_due(&self, t: Option<&TimerState>) -> Option<Instant> {
        let none = Holds::default();
        let holds = t.map_or(&none, |t| &t.holds);
        let watches = t.map_or([None, None], |t| [t.watch[0].due(), t.watch[1].due()]);
        [
            watches[0],
            watches[1],
            self.idle_due(holds),
            self.half_close_due(holds),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn undelivered(&self) -> bool {
        self.undelivered
    }

    /// Data still on its way to either receiver, in kaproxy or in a socket's
    /// send queue: a stream still flowing (or waiting on a slow reader), not
    /// a silent pair.
    fn data_waiting(&self) -> bool {
        self.undelivered() || outstanding(self.client) || outstanding(self.upstream)
    }

    fn socket(&self, side: Side) -> &TcpStream {
        match side {
            Side::Client => self.client,
            Side::Upstream => self.upstream,
        }
    }

    /// Runs whatever is due at `now`; an end when one of them closes the pair.
    fn fire(
        &self,
        watches: &mut [SideWatch; 2],
        holds: &mut Holds,
        now: Instant,
    ) -> Option<RelayEnd> {
        for side in [Side::Client, Side::Upstream] {
            let watch = &mut watches[side as usize];
            if watch.due().is_none_or(|due| due > now) {
                continue;
            }
            let verdict = match sockopt::send_state(self.socket(side)) {
                Ok(sample) => watch.check(self.limits.watch(side), now, &sample),
                // TCP_INFO fails only on a socket that is gone; its error watch reports why.
                Err(_) => {
                    *watch = SideWatch::default();
                    Verdict::Disarm
                }
            };
            let (reason, error) = match verdict {
                Verdict::Dead(why) => (
                    CloseReason::dead(side),
                    io::Error::new(io::ErrorKind::TimedOut, why),
                ),
                Verdict::Stalled(why) => (CloseReason::stalled(side), io::Error::other(why)),
                Verdict::Disarm | Verdict::RecheckAt(_) => continue,
            };
            return Some(RelayEnd {
                reason,
                error: Some(SideError { side, error }),
                undelivered: self.undelivered(),
            });
        }
        if let (Some(due), Some(d)) = (self.idle_due(holds), self.limits.idle_timeout) {
            if due <= now {
                if self.data_waiting() {
                    holds.idle = Some(after(now, d));
                } else {
                    return Some(RelayEnd::plain(CloseReason::IdleTimeout));
                }
            }
        }
        if let (Some(due), Some(d)) = (self.half_close_due(holds), self.limits.half_close_timeout) {
            if due <= now {
                // The finished direction's receiver counts too: its FIN waits
                // behind that data.
                if self.data_waiting() {
                    holds.half_close = Some(after(now, d));
                } else {
                    return Some(RelayEnd::plain(CloseReason::HalfCloseTimeout));
                }
            }
        }
        None
    }
}

/// Whether `socket` still holds sent data its peer has not acknowledged.
fn outstanding(socket: &TcpStream) -> bool {
    sockopt::send_state(socket).is_ok_and(|s| s.outstanding())
}

impl<'a, W, F, T> Future for Relay<'a, W, F, T>
where
    W: Future<Output = SideError>,
    F: Fn(&'a TcpStream, Side) -> W,
    T: Flows,
{
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self.project();
        let (client, upstream, stats, route) =
            (*this.client, *this.upstream, *this.stats, *this.route);
        // Loaded on every poll: a reload's new limits apply to live pairs.
        let live = route.live();
        let (limits, bytes) = (&live.limits, &route.metrics.bytes);
        // Which sides were written to (data or FIN) in this poll: their watchdogs arm.
        let mut wrote = [false; 2];
        let [wrote_client, wrote_upstream] = &mut wrote;
        let flows = &mut *this.flows;
        let (c2u_done, u2c_done) = (flows.done(Flow::C2u), flows.done(Flow::U2c));
        let directions = [
            (
                Flow::C2u,
                Io {
                    from: client,
                    to: upstream,
                    from_side: Side::Client,
                    pair_bytes: &stats.client_to_upstream,
                    route_bytes: &bytes.client_to_upstream,
                    stats,
                    wrote: wrote_upstream,
                    last: u2c_done,
                },
            ),
            (
                Flow::U2c,
                Io {
                    from: upstream,
                    to: client,
                    from_side: Side::Upstream,
                    pair_bytes: &stats.upstream_to_client,
                    route_bytes: &bytes.upstream_to_client,
                    stats,
                    wrote: wrote_client,
                    last: c2u_done,
                },
            ),
        ];
        let mut failed = None;
        for (dir, io) in directions {
            if flows.done(dir) {
                continue;
            }
            match flows.poll(dir, cx, io) {
                Poll::Ready(Ok(())) => {
                    flows.set_done(dir);
                    this.half_closed_at.get_or_insert_with(Instant::now);
                }
                Poll::Ready(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Poll::Pending => {}
            }
        }
        let undelivered = flows.undelivered(Flow::C2u) || flows.undelivered(Flow::U2c);
        let done = [flows.done(Flow::C2u), flows.done(Flow::U2c)];
        if let Some(e) = failed {
            return Poll::Ready(flows.end_with(e).with_undelivered(undelivered));
        }
        if done[0] && done[1] {
            return Poll::Ready(RelayEnd::plain(CloseReason::Completed));
        }

        // While both directions wait to read, each socket's error wakes its own
        // reader. Otherwise a socket may have nobody reading it: watch its error.
        let unwatched = undelivered || done[0] || done[1];
        match (unwatched, this.errors.is_some()) {
            (true, false) => {
                let make = &*this.watch_errors;
                *this.errors = Some(ErrorWatches {
                    client: Box::pin(make(client, Side::Client)),
                    upstream: Box::pin(make(upstream, Side::Upstream)),
                });
            }
            (false, true) => *this.errors = None,
            _ => {}
        }
        if let Some(errors) = this.errors.as_mut() {
            for watch in [&mut errors.client, &mut errors.upstream] {
                if let Poll::Ready(e) = watch.as_mut().poll(cx) {
                    return Poll::Ready(RelayEnd::from_error(e).with_undelivered(undelivered));
                }
            }
        }
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(RelayEnd::plain(route.kill_reason()).with_undelivered(undelivered));
        }

        let timers = Timers {
            client,
            upstream,
            limits,
            stats,
            done,
            undelivered,
            half_closed_at: *this.half_closed_at,
            _flows: std::marker::PhantomData,
        };
        // A reload changed the watchdog settings: a side with data already in
        // flight is watched from now on, as if it had just been written to.
        if *this.watch_generation != limits.watch_generation {
            *this.watch_generation = limits.watch_generation;
            for side in [Side::Client, Side::Upstream] {
                if limits.watch(side).enabled() && outstanding(timers.socket(side)) {
                    wrote[side as usize] = true;
                }
            }
        }
        let now_if_wrote = wrote.iter().any(|w| *w).then(Instant::now);
        for side in [Side::Client, Side::Upstream] {
            let spec = limits.watch(side);
            let Some(now) = now_if_wrote.filter(|_| wrote[side as usize] && spec.enabled()) else {
                continue;
            };
            let state = this
                .timers
                .get_or_insert_with(|| TimerState::new(now + NOT_YET_DUE));
            // A no-op while already armed: silence counts from the first write.
            state.as_mut().project().watch[side as usize].arm(spec, now);
        }
        loop {
            let Some(due) = timers.next_due(this.timers.as_deref()) else {
                // Nothing due: the timer state, watchdogs included, goes.
                *this.timers = None;
                return Poll::Pending;
            };
            let state = this.timers.get_or_insert_with(|| TimerState::new(due));
            let mut t = state.as_mut().project();
            if due < t.sleep.deadline() || t.sleep.is_elapsed() {
                t.sleep.as_mut().reset(due);
            }
            if t.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some(end) = timers.fire(t.watch, t.holds, Instant::now()) {
                return Poll::Ready(end);
            }
        }
    }
}

/// Resolves when the socket reports an error (SO_ERROR): a reset, or ETIMEDOUT
/// from keepalive. Waits on error readiness, which tokio tracks apart from the
/// reader and writer wakers that the directions use.
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
