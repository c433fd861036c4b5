//! Tells a dead peer from a stalled one while a socket has data to deliver.
//!
//! The kernel's keepalive timer only runs on a socket with nothing to send,
//! and TCP_USER_TIMEOUT cannot tell a peer that vanished from one that is alive
//! but not reading (since Linux 5.11 it ends both). So while a socket holds
//! data its peer has not acknowledged, the relay looks at TCP_INFO now and then:
//!
//! - Window open, data unacknowledged: a live peer ACKs within a round trip.
//!   No ACK of any kind for `user_timeout` means the peer is **dead**. The
//!   silence counts from the write, or from the peer's last ACK when it had
//!   already left keepalive probes unanswered before the write.
//! - Window closed (zero, or shrunk under data already in flight), or too
//!   small for a segment: the kernel probes the window, with window probes or
//!   with retransmissions that act as probes, and a live peer answers each one
//!   even when it reads nothing. At least two probes in a row unanswered (one
//!   lost answer is not death) and nothing from the peer for `user_timeout`
//!   mean **dead**.
//! - The peer answers what it is sent (probes, or segments with an ACK) but
//!   has accepted no byte for `stall_timeout` (when set): **stalled**. A peer
//!   that answers nothing is never called stalled.
//!
//! Probes back off exponentially up to TCP_RTO_MAX (2 minutes), so a peer
//! that vanishes after reading nothing for a long while is found at its second
//! unanswered probe at the earliest, which can come a few minutes after it
//! vanished.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::fmt_duration;
use crate::config::KeepaliveSpec;
use crate::net::sockopt::SendState;

/// Shortest and longest pause between two looks at a socket with data in flight.
const MIN_PERIOD: Duration = Duration::from_millis(100);
const MAX_PERIOD: Duration = Duration::from_secs(5);
/// The first look after a write: by then a live peer has acknowledged most
/// writes (delayed ACKs wait 40 ms to 200 ms), so the watch, and the timer
/// state it keeps, goes away again soon after a pair falls quiet.
const FIRST_LOOK: Duration = Duration::from_millis(250);

/// What the watchdog of one side enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WatchSpec {
    /// A peer that acknowledges nothing for this long while it owes an ACK is dead.
    pub dead_after: Option<Duration>,
    /// A live peer that accepts no byte for this long is stalled.
    pub stall_after: Option<Duration>,
}

impl WatchSpec {
    /// The watchdog settings of a side's keepalive spec.
    pub fn of(spec: &KeepaliveSpec) -> WatchSpec {
        WatchSpec {
            dead_after: spec.effective_user_timeout(),
            stall_after: spec.stall_timeout,
        }
    }

    /// Whether there is anything to watch for.
    pub fn enabled(&self) -> bool {
        self.dead_after.is_some() || self.stall_after.is_some()
    }

    /// How often a socket with data in flight is looked at: often enough to see
    /// an unanswered window probe well within the bounds, rarely enough to cost
    /// nothing (one getsockopt per period while data waits).
    fn period(&self) -> Duration {
        let shortest = match (self.dead_after, self.stall_after) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => MAX_PERIOD,
        };
        (shortest / 4).clamp(MIN_PERIOD, MAX_PERIOD)
    }
}

/// The outcome of one look at a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing is waiting for the peer any more: stop watching until the next write.
    Disarm,
    /// The peer answers nothing: the message says what was seen.
    Dead(String),
    /// The peer is alive but has accepted nothing for `stall_timeout`.
    Stalled(String),
    /// Look again at this time.
    RecheckAt(Instant),
}

/// Watch state of one side, armed by a write and disarmed once the peer has
/// acknowledged everything.
#[derive(Debug, Default)]
pub struct SideWatch {
    /// When data started waiting for this peer; `None` while disarmed.
    armed_at: Option<Instant>,
    /// When the next look is due.
    next: Option<Instant>,
    /// Bytes acknowledged at the last look, and when that number last grew.
    bytes_acked: Option<u64>,
    progress_at: Option<Instant>,
    /// When the first retransmission seen unanswered since the last ACK was sent.
    unanswered_send: Option<Instant>,
}

impl SideWatch {
    /// When the next look is due, if armed.
    pub fn due(&self) -> Option<Instant> {
        self.next
    }

    /// Starts watching after a write, unless already watching.
    pub fn arm(&mut self, spec: &WatchSpec, now: Instant) {
        if self.armed_at.is_none() && spec.enabled() {
            *self = SideWatch {
                armed_at: Some(now),
                next: Some(now + spec.period().min(FIRST_LOOK)),
                bytes_acked: None,
                progress_at: Some(now),
                unanswered_send: None,
            };
        }
    }

    /// Judges the peer from a TCP_INFO sample taken at `now`.
    pub fn check(&mut self, spec: &WatchSpec, now: Instant, sample: &SendState) -> Verdict {
        let verdict = self.judge(spec, now, sample);
        match verdict {
            Verdict::RecheckAt(t) => self.next = Some(t),
            _ => *self = SideWatch::default(),
        }
        verdict
    }

    fn judge(&mut self, spec: &WatchSpec, now: Instant, s: &SendState) -> Verdict {
        let Some(armed_at) = self.armed_at else {
            return Verdict::Disarm;
        };
        if !s.outstanding() {
            return Verdict::Disarm;
        }
        // The first look has no earlier count to compare with: the peer may
        // have accepted data until just now, so count that as progress. A stall
        // is then declared up to one period late, never early.
        let progressed = self.bytes_acked != Some(s.bytes_acked);
        if progressed {
            self.progress_at = Some(now);
            self.bytes_acked = Some(s.bytes_acked);
        }
        let last_ack = now.checked_sub(s.since_last_ack).unwrap_or(armed_at);
        // While the peer is taking data, look again soon: once it has taken
        // everything, the watch is dropped and the next write re-arms it, so
        // a later silence is counted from that write, not from this arming.
        // A peer that takes nothing is looked at once a period.
        let mut next = now
            + if progressed {
                spec.period().min(FIRST_LOOK)
            } else {
                spec.period()
            };

        // Probing: nothing can be sent, so the kernel probes the window (with
        // window probes when nothing is in flight, with retransmissions when
        // the peer shrank its window under data already sent).
        // With nothing in flight, data waits on a closed (or too small)
        // window and the kernel sends window probes: a live peer answers them
        // even when it reads nothing. With segments in flight, each
        // retransmission is a probe too: a peer whose window is shut, or whose
        // buffer is too small to take a segment, answers it with a duplicate
        // ACK, only further and further apart as the kernel backs off.
        // Whether the newest probe is unanswered, and whether two in a row are:
        let window_probes = s.unacked == 0;
        let (unanswered, repeated) = if window_probes {
            (s.unanswered_probes > 0, s.unanswered_probes >= 2)
        } else {
            let last_send = now.checked_sub(s.since_last_send).unwrap_or(armed_at);
            let unanswered = last_send > last_ack;
            let first = self.unanswered_send.filter(|t| *t > last_ack);
            // Keepalive probes left unanswered before the write count too.
            let repeated = first.is_some_and(|t| last_send > t) || s.unanswered_probes >= 2;
            (unanswered, repeated)
        };
        // Remember the first transmission seen unanswered: a later one also
        // unanswered makes two in a row.
        if unanswered {
            if self.unanswered_send.is_none_or(|t| t < last_ack) {
                self.unanswered_send = now.checked_sub(s.since_last_send);
            }
        } else {
            self.unanswered_send = None;
        }

        // One unanswered probe may be a lost answer; two in a row, and nothing
        // from the peer for user_timeout, is death.
        if let (Some(limit), true) = (spec.dead_after, repeated) {
            // Silence counts from the peer's last ACK when nothing was in
            // flight (only probes were), or when keepalive probes had already
            // gone unanswered before the write; otherwise from the write, since
            // an idle peer owed no ACK before it.
            let since = if window_probes || s.unanswered_probes > 0 {
                last_ack
            } else {
                last_ack.max(armed_at)
            };
            let silent = now - since;
            if silent >= limit {
                let what = if window_probes {
                    "window probes".to_string()
                } else {
                    format!("{} segment(s) in flight", s.unacked)
                };
                return Verdict::Dead(format!(
                    "nothing from the peer for {} despite {what} (user_timeout {})",
                    fmt_duration(round_ms(silent)),
                    fmt_duration(limit)
                ));
            }
            next = next.min(since + limit);
        }
        // Stalled needs evidence of life: the peer answered the last thing sent
        // to it (a window probe, or a segment that it acknowledged or
        // answered with a duplicate ACK).
        let answered = if s.unacked == 0 {
            s.unanswered_probes == 0
        } else {
            now.checked_sub(s.since_last_send)
                .is_some_and(|last_send| last_ack >= last_send)
        };
        if let Some(limit) = spec.stall_after.filter(|_| answered) {
            let since = self.progress_at.unwrap_or(armed_at).max(armed_at);
            let stalled = now - since;
            if stalled >= limit {
                return Verdict::Stalled(format!(
                    "the peer is alive (it answers window probes) but accepted no data for {} with {} byte(s) waiting (stall_timeout {})",
                    fmt_duration(round_ms(stalled)),
                    s.notsent,
                    fmt_duration(limit)
                ));
            }
            next = next.min(since + limit);
        }
        Verdict::RecheckAt(next.max(now + MIN_PERIOD / 10))
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: WatchSpec = WatchSpec {
        dead_after: Some(Duration::from_secs(3)),
        stall_after: None,
    };

    fn sample(unacked: u32, notsent: u32, acked: u64, last_ack_ms: u64, probes: u8) -> SendState {
        SendState {
            unacked,
            notsent,
            bytes_acked: acked,
            since_last_ack: Duration::from_millis(last_ack_ms),
            since_last_send: Duration::from_millis(last_ack_ms + 1),
            unanswered_probes: probes,
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn acknowledged_data_disarms() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        assert_eq!(w.due(), Some(t0 + FIRST_LOOK));
        let v = w.check(&SPEC, t0 + secs(0.25), &sample(0, 0, 100, 10, 0));
        assert_eq!(v, Verdict::Disarm);
        assert!(w.due().is_none());
    }

    #[test]
    fn silence_with_data_in_flight_is_death_at_the_bound() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        // The peer's last ACK (60 s ago) predates the write: silence counts
        // from the write. Retransmissions at 0.2 s, 0.6 s, 1.4 s go unanswered.
        // The first look has no count to compare with (taken as progress): the
        // next comes soon.
        let v = w.check(&SPEC, t0 + secs(0.25), &state(5, 65535, 60_250, 50, 0));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(0.5)));
        let v = w.check(&SPEC, t0 + secs(1.0), &state(5, 65535, 61_000, 400, 0));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(1.75)));
        let v = w.check(&SPEC, t0 + secs(2.9), &state(5, 65535, 62_900, 1_500, 0));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(3.0)));
        let v = w.check(&SPEC, t0 + secs(3.0), &state(5, 65535, 63_000, 1_600, 0));
        assert!(
            matches!(v, Verdict::Dead(ref m) if m.contains("in flight")),
            "{v:?}"
        );
    }

    #[test]
    fn acks_keep_a_flowing_stream_alive_for_ever() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        for i in 1..100u64 {
            let v = w.check(
                &SPEC,
                t0 + secs(i as f64),
                &sample(40, 1 << 20, i * 1000, 5, 0),
            );
            assert!(matches!(v, Verdict::RecheckAt(_)), "{v:?}");
        }
    }

    #[test]
    fn a_peer_answering_window_probes_is_never_dead() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        // Window closed, probes a minute apart (backed off), every one answered
        // within a millisecond: sampled just after a probe leaves, it is
        // unanswered and the last ACK is a minute old; a moment later it is answered.
        for i in 1..600u64 {
            let just_probed = i % 60 == 0;
            let (since_ack, probes) = if just_probed {
                (60_000, 1)
            } else {
                ((i % 60) * 1000, 0)
            };
            let v = w.check(
                &SPEC,
                t0 + secs(i as f64),
                &sample(0, 4096, 7, since_ack, probes),
            );
            assert!(matches!(v, Verdict::RecheckAt(_)), "second {i}: {v:?}");
        }
    }

    #[test]
    fn two_unanswered_window_probes_after_the_bound_are_death() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        let v = w.check(&SPEC, t0 + secs(0.75), &sample(0, 4096, 7, 100, 0));
        assert!(matches!(v, Verdict::RecheckAt(_)));
        // The last answer came at 39 s; a probe goes out at 40 s and is never
        // answered: one unanswered probe is not enough.
        let v = w.check(&SPEC, t0 + secs(40.0), &sample(0, 4096, 7, 1_000, 1));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(40.75)));
        // The next probe is not answered either: silent since 39 s, so dead at
        // 42 s; the next look comes one period on.
        let v = w.check(&SPEC, t0 + secs(41.0), &sample(0, 4096, 7, 2_000, 2));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(41.75)));
        let v = w.check(&SPEC, t0 + secs(42.0), &sample(0, 4096, 7, 3_000, 2));
        assert!(
            matches!(v, Verdict::Dead(ref m) if m.contains("window probes")),
            "{v:?}"
        );
    }

    #[test]
    fn stall_timeout_closes_a_live_peer_that_accepts_nothing() {
        let spec = WatchSpec {
            dead_after: Some(Duration::from_secs(3)),
            stall_after: Some(Duration::from_secs(10)),
        };
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&spec, t0);
        // Accepting slowly is progress.
        for i in 1..=20u64 {
            let v = w.check(&spec, t0 + secs(i as f64), &sample(0, 4096, i, 10, 0));
            assert!(matches!(v, Verdict::RecheckAt(_)), "{v:?}");
        }
        // Then nothing more for 10 s, while every probe is answered.
        let mut last = None;
        for i in 21..=31u64 {
            last = Some(w.check(&spec, t0 + secs(i as f64), &sample(0, 4096, 20, 10, 0)));
            if !matches!(last, Some(Verdict::RecheckAt(_))) {
                assert_eq!(i, 30, "stalled exactly 10 s after the last progress");
                break;
            }
        }
        assert!(matches!(last, Some(Verdict::Stalled(_))), "{last:?}");
    }

    fn state(
        unacked: u32,
        _window: u32,
        since_ack_ms: u64,
        since_send_ms: u64,
        probes: u8,
    ) -> SendState {
        SendState {
            unacked,
            notsent: 4096,
            bytes_acked: 7,
            since_last_ack: Duration::from_millis(since_ack_ms),
            since_last_send: Duration::from_millis(since_send_ms),
            unanswered_probes: probes,
        }
    }

    #[test]
    fn one_lost_answer_to_a_window_probe_is_not_death() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        // A probe whose answer was lost stays unanswered until the next probe,
        // up to two minutes later: long past the bound, but only one.
        for i in 1..=100u64 {
            let v = w.check(
                &SPEC,
                t0 + secs(i as f64),
                &state(0, 0, i * 1000, i * 1000, 1),
            );
            assert!(matches!(v, Verdict::RecheckAt(_)), "second {i}: {v:?}");
        }
        // The next probe is answered.
        let v = w.check(&SPEC, t0 + secs(101.0), &state(0, 0, 5, 60_000, 0));
        assert!(matches!(v, Verdict::RecheckAt(_)), "{v:?}");
    }

    #[test]
    fn a_shrunk_window_whose_retransmissions_are_answered_is_not_death() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        // One segment in flight into a window the peer shrank to zero: each
        // retransmission (backing off) is answered a millisecond later.
        for i in 1..=60u64 {
            let since_send = (i * 1000) % 16_000 + 1;
            let since_ack = since_send - 1;
            let v = w.check(
                &SPEC,
                t0 + secs(i as f64),
                &state(1, 0, since_ack, since_send, 0),
            );
            assert!(matches!(v, Verdict::RecheckAt(_)), "second {i}: {v:?}");
        }
    }

    #[test]
    fn retransmissions_into_a_shrunk_window_left_unanswered_are_death() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        // Last ACK at 10 s; retransmissions at 12 s and 16 s go unanswered.
        let v = w.check(&SPEC, t0 + secs(13.0), &state(1, 0, 3000, 1000, 0));
        assert!(matches!(v, Verdict::RecheckAt(_)), "{v:?}");
        let v = w.check(&SPEC, t0 + secs(15.0), &state(1, 0, 5000, 3000, 0));
        assert!(
            matches!(v, Verdict::RecheckAt(_)),
            "one unanswered is not enough: {v:?}"
        );
        let v = w.check(&SPEC, t0 + secs(16.5), &state(1, 0, 6500, 500, 0));
        assert!(
            matches!(v, Verdict::Dead(_)),
            "two unanswered for 3.5 s: {v:?}"
        );
    }

    #[test]
    fn silence_after_unanswered_keepalive_probes_counts_from_the_last_ack() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        // The peer vanished 2.9 s before the write and had left two keepalive
        // probes unanswered: it is dead 3 s after its last ACK, not after the write.
        let v = w.check(&SPEC, t0 + secs(0.1), &state(1, 65535, 3000, 100, 2));
        assert!(matches!(v, Verdict::Dead(_)), "{v:?}");
    }

    #[test]
    fn a_silent_peer_is_never_called_stalled() {
        let spec = WatchSpec {
            dead_after: None,
            stall_after: Some(Duration::from_secs(3)),
        };
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&spec, t0);
        for i in 1..=20u64 {
            // Window open, data in flight, no ACK at all: silent, not alive.
            let v = w.check(
                &spec,
                t0 + secs(i as f64),
                &state(10, 65535, i * 1000, 1, 0),
            );
            assert!(matches!(v, Verdict::RecheckAt(_)), "second {i}: {v:?}");
            // Window closed, probes unanswered: silent too.
        }
        let mut w = SideWatch::default();
        w.arm(&spec, t0);
        for i in 1..=20u64 {
            let v = w.check(
                &spec,
                t0 + secs(i as f64),
                &state(0, 0, i * 1000, i * 1000, 3),
            );
            assert!(matches!(v, Verdict::RecheckAt(_)), "second {i}: {v:?}");
        }
    }

    #[test]
    fn nothing_to_enforce_never_arms() {
        let mut w = SideWatch::default();
        w.arm(&WatchSpec::default(), Instant::now());
        assert!(w.due().is_none());
    }
}
