//! The probe's reasoning, without sockets or clocks: which idle times the next
//! round tests, what each connection's verdict tells, when to stop, and what
//! the result is. Everything here is a pure function of the verdicts so far.
//!
//! The model: the path drops a flow once it has been idle longer than some
//! limit L. A flow that answered a probe after idle `a` proves L ≥ a; one
//! that was dropped after idle `b` proves L < b. Each round opens several
//! connections at once and tests idle times spread evenly over what is still
//! unknown, so the interval shrinks by the number of connections plus one per
//! round, until it is no wider than the resolution.

use std::time::Duration;

/// Shortest idle time tested: the answer check compares TCP_INFO ages against
/// the idle time (see `conn`), which needs a flow idle for a second at least.
pub const MIN_IDLE: Duration = Duration::from_secs(1);

/// Upper bound on rounds, whatever the verdicts: each round normally narrows
/// the interval by a factor of two or more, so 40 is never reached by a
/// consistent path, and an inconsistent one cannot keep the probe running.
pub const MAX_ROUNDS: usize = 40;

/// What the user asked for, already checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Longest idle time tested.
    pub max: Duration,
    /// The probe stops once the bound is no wider than this.
    pub resolution: Duration,
    /// Connections open at once, one idle time each.
    pub connections: usize,
}

/// How a dropped flow showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropSign {
    /// The keepalive probe and its repeats went unanswered.
    Silence,
    /// A reset answered the probe.
    Reset,
    /// A reset arrived on its own while the flow was idle (some middleboxes
    /// reset both ends when they expire a flow).
    ResetWhileIdle,
}

impl DropSign {
    /// Stable name for JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DropSign::Silence => "silence",
            DropSign::Reset => "reset",
            DropSign::ResetWhileIdle => "reset_while_idle",
        }
    }
}

/// What one connection found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The probe sent after `idle` was answered: the path still carried the flow.
    Alive {
        /// Idle time of the flow when the probe went out (from TCP_INFO).
        idle: Duration,
    },
    /// The flow was gone after `idle`.
    Dropped {
        /// Idle time of the flow when the probe went out, or when the reset came.
        idle: Duration,
        /// How it showed.
        sign: DropSign,
    },
    /// The server itself closed the connection (FIN) after it had been idle
    /// this long: the server's own idle timeout, not the path's.
    ServerClosed {
        /// Idle time when the FIN arrived.
        idle: Duration,
    },
}

/// Everything learnt so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Knowledge {
    /// Idle times that were answered.
    pub alive: Vec<Duration>,
    /// Shortest idle time after which a flow was dropped.
    pub dropped: Option<(Duration, DropSign)>,
    /// Shortest idle time after which the server closed a connection itself.
    pub server_closes: Option<Duration>,
    /// Whether the longest idle time, `--max`, was tested and answered.
    pub max_answered: bool,
}

/// The measured answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Flows idle `survived` were carried; flows idle `dropped` were not.
    Dropped {
        /// Longest idle time answered (0 when none was).
        survived: Duration,
        /// Shortest idle time dropped.
        dropped: Duration,
        /// How the shortest drop showed.
        sign: DropSign,
    },
    /// Every idle time up to `--max` was answered.
    NoDrop {
        /// Longest idle time answered, `--max` itself.
        survived: Duration,
    },
    /// The server closes idle connections itself before the path drops them,
    /// so the path's limit is above `survived`, and unknown beyond the server's.
    ServerCloses {
        /// Longest idle time answered by the path.
        survived: Duration,
        /// The server's own idle timeout, as first seen.
        after: Duration,
    },
    /// The server closed connections before any idle time could be tested.
    Unmeasurable {
        /// The server's own idle timeout, as first seen.
        after: Duration,
    },
}

impl Knowledge {
    /// Records one verdict. `target` is the idle time the connection was
    /// planned for (`--max` for the last one of the first round).
    pub fn record(&mut self, settings: &Settings, target: Duration, verdict: Verdict) {
        match verdict {
            Verdict::Alive { idle } => {
                self.alive.push(idle);
                if target >= settings.max {
                    self.max_answered = true;
                }
            }
            Verdict::Dropped { idle, sign } => {
                if self.dropped.is_none_or(|(d, _)| idle < d) {
                    self.dropped = Some((idle, sign));
                }
            }
            Verdict::ServerClosed { idle } => {
                if self.server_closes.is_none_or(|d| idle < d) {
                    self.server_closes = Some(idle);
                }
            }
        }
    }

    /// Longest answered idle time below the shortest drop. An answer above a
    /// drop contradicts the model (a lost probe, or a limit that is not a fixed
    /// idle time); the drop is trusted, since it errs on the safe side.
    pub fn survived(&self) -> Duration {
        self.alive
            .iter()
            .copied()
            .filter(|a| self.dropped.is_none_or(|(d, _)| *a < d))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Answered idle times at or above the shortest drop, for a warning.
    pub fn contradictions(&self) -> Vec<Duration> {
        match self.dropped {
            Some((d, _)) => self.alive.iter().copied().filter(|a| *a >= d).collect(),
            None => Vec::new(),
        }
    }

    /// The longest idle time still worth testing: below the shortest drop, the
    /// server's own timeout and `--max`. The flag says whether the ceiling
    /// itself is already known (dropped or closed by the server) rather than
    /// still to be tested (`--max`).
    pub fn ceiling(&self, settings: &Settings) -> (Duration, bool) {
        let mut ceiling = (settings.max, false);
        for known in [self.dropped.map(|(d, _)| d), self.server_closes]
            .into_iter()
            .flatten()
        {
            if known <= ceiling.0 {
                ceiling = (known, true);
            }
        }
        ceiling
    }

    /// The answer, once there is nothing left to test at `settings.resolution`.
    pub fn outcome(&self, settings: &Settings) -> Option<Outcome> {
        if self.next_targets(settings).is_some() {
            return None;
        }
        Some(self.final_outcome())
    }

    /// The answer from what is known now, finished or not (after the last
    /// round allowed, or as a partial answer).
    pub fn final_outcome(&self) -> Outcome {
        let survived = self.survived();
        if let Some((dropped, sign)) = self.dropped {
            if self.server_closes.is_none_or(|s| dropped <= s) {
                return Outcome::Dropped {
                    survived,
                    dropped,
                    sign,
                };
            }
        }
        match self.server_closes {
            Some(after) if survived.is_zero() => Outcome::Unmeasurable { after },
            Some(after) => Outcome::ServerCloses { survived, after },
            None => Outcome::NoDrop { survived },
        }
    }

    /// Idle times for the next round, shortest first, or `None` when the
    /// bound is as narrow as the resolution (or `--max` was answered).
    pub fn next_targets(&self, settings: &Settings) -> Option<Vec<Duration>> {
        let lo = self.survived();
        let (hi, hi_known) = self.ceiling(settings);
        if !hi_known && self.max_answered {
            return None;
        }
        let width = hi.checked_sub(lo).filter(|w| !w.is_zero())?;
        let res = settings.resolution.max(Duration::from_millis(1));
        let res_ms = res.as_millis();
        let steps = width.as_millis().div_ceil(res_ms);
        // A known ceiling is not tested again: the points go strictly inside,
        // and the bound is done once it is no wider than the resolution. An
        // untested ceiling (--max) is the last point of the round.
        let needed = if hi_known { steps - 1 } else { steps };
        let n = (settings.connections as u128).min(needed);
        if n == 0 {
            return None;
        }
        let parts = if hi_known { n + 1 } else { n };
        let mut targets: Vec<Duration> = (1..=n)
            .map(|k| lo + mul_div(width, k, parts))
            .map(|t| round_ms(t).max(MIN_IDLE))
            .filter(|t| *t > lo && (*t < hi || (!hi_known && *t <= hi)))
            .collect();
        targets.dedup();
        (!targets.is_empty()).then_some(targets)
    }
}

fn mul_div(d: Duration, k: u128, parts: u128) -> Duration {
    Duration::from_millis((d.as_millis() * k / parts) as u64)
}

/// Whole tenths of a second: easier to read in progress lines, far finer
/// than any useful resolution.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().div_ceil(100) as u64 * 100)
}

/// When a round can end: every connection planned below the ceiling has its
/// verdict. Connections planned at or above a known ceiling have nothing left
/// to tell and are closed.
pub fn round_finished(knowledge: &Knowledge, settings: &Settings, pending: &[Duration]) -> bool {
    let (hi, hi_known) = knowledge.ceiling(settings);
    pending.iter().all(|t| hi_known && *t >= hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn settings(max: u64, res: u64, n: usize) -> Settings {
        Settings {
            max: s(max),
            resolution: s(res),
            connections: n,
        }
    }

    /// Runs the plan against a path that drops flows idle longer than
    /// `limit`, and a server that closes after `server` if given; every
    /// verdict comes back with exactly the planned idle time.
    fn simulate(st: &Settings, limit: Option<u64>, server: Option<u64>) -> (Outcome, usize) {
        let mut k = Knowledge::default();
        for round in 1..=MAX_ROUNDS {
            let Some(targets) = k.next_targets(st) else {
                return (k.outcome(st).unwrap(), round - 1);
            };
            assert!(targets.len() <= st.connections);
            for t in targets {
                let v = match (server, limit) {
                    (Some(sv), _) if t >= s(sv) => Verdict::ServerClosed { idle: s(sv) },
                    (_, Some(l)) if t > s(l) => Verdict::Dropped {
                        idle: t,
                        sign: DropSign::Silence,
                    },
                    _ => Verdict::Alive { idle: t },
                };
                k.record(st, t, v);
            }
        }
        panic!("no outcome within {MAX_ROUNDS} rounds: {k:?}");
    }

    #[test]
    fn bisects_a_nat_timeout_down_to_the_resolution() {
        let st = settings(30 * 60, 5, 16);
        let (out, rounds) = simulate(&st, Some(350), None);
        let Outcome::Dropped {
            survived, dropped, ..
        } = out
        else {
            panic!("{out:?}")
        };
        assert!(survived <= s(350) && dropped > s(350), "{out:?}");
        assert!(dropped - survived <= s(5), "{out:?}");
        assert!(rounds <= 3, "{rounds} rounds");
    }

    #[test]
    fn small_test_settings_find_eight_seconds_in_two_rounds() {
        let st = settings(24, 1, 8);
        let (out, rounds) = simulate(&st, Some(8), None);
        let Outcome::Dropped {
            survived, dropped, ..
        } = out
        else {
            panic!("{out:?}")
        };
        assert!(survived <= s(8) && dropped > s(8), "{out:?}");
        assert!(dropped - survived <= s(1), "{out:?}");
        assert_eq!(rounds, 2);
    }

    #[test]
    fn no_drop_within_max_takes_one_round() {
        let st = settings(10, 2, 8);
        assert_eq!(
            simulate(&st, None, None),
            (Outcome::NoDrop { survived: s(10) }, 1)
        );
        let first = Knowledge::default().next_targets(&st).unwrap();
        assert_eq!(
            first,
            [2, 4, 6, 8, 10].map(s),
            "resolution-spaced, max last"
        );
    }

    #[test]
    fn a_server_timeout_is_reported_as_the_servers() {
        let st = settings(20, 1, 8);
        let (out, _) = simulate(&st, None, Some(5));
        let Outcome::ServerCloses { survived, after } = out else {
            panic!("{out:?}")
        };
        assert_eq!(after, s(5));
        assert!(survived >= s(4) && survived < s(5), "{out:?}");
        // A path limit below the server's timeout is still the path's.
        let (out, _) = simulate(&st, Some(3), Some(5));
        assert!(matches!(out, Outcome::Dropped { .. }), "{out:?}");
    }

    #[test]
    fn a_server_that_closes_before_the_first_idle_time_is_unmeasurable() {
        let st = settings(20, 5, 8);
        let mut k = Knowledge::default();
        let first = k.next_targets(&st).unwrap();
        assert_eq!(first[0], s(5));
        for t in first {
            k.record(&st, t, Verdict::ServerClosed { idle: s(3) });
        }
        assert_eq!(k.outcome(&st), Some(Outcome::Unmeasurable { after: s(3) }));
    }

    #[test]
    fn an_answer_above_a_drop_is_a_contradiction_and_the_drop_wins() {
        let st = settings(20, 1, 4);
        let mut k = Knowledge::default();
        k.record(&st, s(5), Verdict::Alive { idle: s(5) });
        k.record(
            &st,
            s(10),
            Verdict::Dropped {
                idle: s(10),
                sign: DropSign::Silence,
            },
        );
        k.record(&st, s(15), Verdict::Alive { idle: s(15) });
        assert_eq!(k.survived(), s(5));
        assert_eq!(k.contradictions(), vec![s(15)]);
        let next = k.next_targets(&st).unwrap();
        assert_eq!(next, [6, 7, 8, 9].map(s));
    }

    #[test]
    fn a_round_ends_once_everything_below_the_ceiling_has_answered() {
        let st = settings(20, 1, 4);
        let mut k = Knowledge::default();
        assert!(!round_finished(&k, &st, &[s(15), s(20)]));
        k.record(
            &st,
            s(10),
            Verdict::Dropped {
                idle: s(10),
                sign: DropSign::Reset,
            },
        );
        assert!(round_finished(&k, &st, &[s(15), s(20)]));
        assert!(!round_finished(&k, &st, &[s(5), s(15)]));
        assert!(round_finished(&k, &st, &[]));
    }

    #[test]
    fn measured_idle_times_slightly_off_target_still_converge() {
        // Verdicts come back with the idle time TCP_INFO measured, a little
        // short of the plan; the plan must still end.
        let st = settings(24, 1, 8);
        let mut k = Knowledge::default();
        let mut rounds = 0;
        while let Some(targets) = k.next_targets(&st) {
            rounds += 1;
            assert!(rounds <= 5, "{k:?}");
            for t in targets {
                let idle = t - Duration::from_millis(37);
                let v = if idle > s(8) {
                    Verdict::Dropped {
                        idle,
                        sign: DropSign::Silence,
                    }
                } else {
                    Verdict::Alive { idle }
                };
                k.record(&st, t, v);
            }
        }
        assert!(matches!(k.outcome(&st), Some(Outcome::Dropped { .. })));
    }
}
