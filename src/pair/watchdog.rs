//! Tells a dead peer from a stalled one while a socket has data to deliver.
//!
//! The kernel's keepalive timer only runs on a socket with nothing to send,
//! and TCP_USER_TIMEOUT cannot tell a peer that vanished from one that is alive
//! but not reading (since Linux 5.11 it ends both). So while a socket holds
//! data its peer has not acknowledged, the relay looks at TCP_INFO now and then:
//!
//! - Window open, data unacknowledged: a live peer ACKs within a round trip.
//!   No ACK of any kind for `user_timeout` (counted from when the data was
//!   sent, or from the last ACK if later) means the peer is **dead**.
//! - Nothing in flight but data waiting (the peer's window is closed, or too
//!   small for a segment): the kernel sends window probes, which a live peer
//!   answers even when it reads nothing. A probe left
//!   unanswered for `user_timeout` means the peer is **dead**. Answered probes
//!   mean it is alive: **stalled** once it has accepted no byte for
//!   `stall_timeout`, when one is set, and never dead.
//!
//! Window probes back off exponentially up to TCP_RTO_MAX (2 minutes), so a
//! peer that vanishes after reading nothing for a long while is found within
//! `user_timeout` of the first probe it leaves unanswered, which may come up to
//! 2 minutes after it vanished.

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
    /// First look that saw a window probe unanswered, since the last ACK.
    unanswered_since: Option<Instant>,
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
                unanswered_since: None,
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
        if self.bytes_acked != Some(s.bytes_acked) {
            self.progress_at = Some(now);
            self.bytes_acked = Some(s.bytes_acked);
        }
        let last_ack = now.checked_sub(s.since_last_ack).unwrap_or(armed_at);
        let mut next = now + spec.period();

        // Nothing is in flight but data waits: the peer's window is closed (or
        // too small for a segment), and the kernel sends window probes, which
        // a live peer answers and a dead one leaves unanswered.
        let window_closed = s.unacked == 0;
        if window_closed && s.unanswered_probes > 0 {
            let since = match self.unanswered_since {
                Some(t) if t >= last_ack => t,
                _ => now,
            };
            self.unanswered_since = Some(since);
        } else {
            self.unanswered_since = None;
        }

        if let Some(limit) = spec.dead_after {
            if window_closed {
                if let Some(since) = self.unanswered_since {
                    let silent = now - since;
                    if silent >= limit {
                        return Verdict::Dead(format!(
                            "the peer stopped answering window probes: none answered for {} (user_timeout {})",
                            fmt_duration(round_ms(silent)),
                            fmt_duration(limit)
                        ));
                    }
                    next = next.min(since + limit);
                }
            } else if s.unacked > 0 {
                let since = last_ack.max(armed_at);
                let silent = now - since;
                if silent >= limit {
                    return Verdict::Dead(format!(
                        "no acknowledgement for {} with {} segment(s) in flight (user_timeout {})",
                        fmt_duration(round_ms(silent)),
                        s.unacked,
                        fmt_duration(limit)
                    ));
                }
                next = next.min(since + limit);
            }
        }
        if let Some(limit) = spec.stall_after {
            let since = self.progress_at.unwrap_or(armed_at).max(armed_at);
            let stalled = now - since;
            if stalled >= limit {
                return Verdict::Stalled(format!(
                    "the peer is alive but accepted no data for {} with {} byte(s) waiting (stall_timeout {})",
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
        // The peer's last ACK predates the write: silence counts from the write.
        let v = w.check(&SPEC, t0 + secs(1.0), &sample(5, 0, 100, 60_000, 0));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(1.75)));
        let v = w.check(&SPEC, t0 + secs(2.9), &sample(5, 0, 100, 62_900, 0));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(3.0)));
        let v = w.check(&SPEC, t0 + secs(3.0), &sample(5, 0, 100, 63_000, 0));
        assert!(
            matches!(v, Verdict::Dead(ref m) if m.contains("no acknowledgement")),
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
    fn an_unanswered_window_probe_is_death_after_the_bound() {
        let t0 = Instant::now();
        let mut w = SideWatch::default();
        w.arm(&SPEC, t0);
        let v = w.check(&SPEC, t0 + secs(0.75), &sample(0, 4096, 7, 100, 0));
        assert!(matches!(v, Verdict::RecheckAt(_)));
        // A probe goes out at 40 s and is never answered.
        let v = w.check(&SPEC, t0 + secs(40.0), &sample(0, 4096, 7, 39_000, 1));
        assert_eq!(v, Verdict::RecheckAt(t0 + secs(40.75)));
        let v = w.check(&SPEC, t0 + secs(42.0), &sample(0, 4096, 7, 41_000, 2));
        assert!(matches!(v, Verdict::RecheckAt(_)));
        let v = w.check(&SPEC, t0 + secs(43.0), &sample(0, 4096, 7, 42_000, 2));
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

    #[test]
    fn nothing_to_enforce_never_arms() {
        let mut w = SideWatch::default();
        w.arm(&WatchSpec::default(), Instant::now());
        assert!(w.due().is_none());
    }
}
