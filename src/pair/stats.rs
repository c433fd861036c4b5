//! A pair's counters and activity times: written by the relay, read by the
//! timers, the close event and `/connections`. They live in the pair's
//! registry entry, so their size is paid by every idle pair.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::close::Side;

/// Counters a pair updates while relaying; read at close time.
#[derive(Debug)]
pub struct RelayStats {
    /// Bytes written to the upstream.
    pub client_to_upstream: AtomicU64,
    /// Bytes written to the client.
    pub upstream_to_client: AtomicU64,
    /// When the pair began, as nanoseconds after [`epoch`]: half the size of
    /// an `Instant`, in a struct every idle pair pays for.
    started: u64,
    /// Milliseconds after `started` of the last byte relayed.
    last_activity_ms: AtomicU64,
    /// Milliseconds after `started` of the last data read from each side.
    last_from_client_ms: AtomicU64,
    last_from_upstream_ms: AtomicU64,
}

/// The moment pair start times count from: the first time anyone asks.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl RelayStats {
    fn started(&self) -> Instant {
        epoch() + Duration::from_nanos(self.started)
    }

    /// Fresh counters, with activity "now".
    pub fn new() -> RelayStats {
        RelayStats {
            client_to_upstream: AtomicU64::new(0),
            upstream_to_client: AtomicU64::new(0),
            started: Instant::now()
                .saturating_duration_since(epoch())
                .as_nanos()
                .min(u128::from(u64::MAX)) as u64,
            last_activity_ms: AtomicU64::new(0),
            last_from_client_ms: AtomicU64::new(0),
            last_from_upstream_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn touch(&self, from: Side) {
        let ms = self.started().elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
        let side = match from {
            Side::Client => &self.last_from_client_ms,
            Side::Upstream => &self.last_from_upstream_ms,
        };
        side.store(ms, Ordering::Relaxed);
    }

    pub(super) fn last_activity(&self) -> Instant {
        self.started() + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// When data from `side` was last relayed (the pair's start if never).
    pub(super) fn last_from(&self, side: Side) -> Instant {
        let ms = match side {
            Side::Client => &self.last_from_client_ms,
            Side::Upstream => &self.last_from_upstream_ms,
        };
        self.started() + Duration::from_millis(ms.load(Ordering::Relaxed))
    }

    /// How long the pair has existed.
    pub fn age(&self) -> Duration {
        self.started().elapsed()
    }

    /// Time since the last byte relayed in either direction.
    pub fn idle(&self) -> Duration {
        self.last_activity().elapsed()
    }

    /// Time since data last came from `side` (since the pair began if it never sent any).
    pub fn since_data_from(&self, side: Side) -> Duration {
        self.last_from(side).elapsed()
    }
}

impl Default for RelayStats {
    fn default() -> Self {
        RelayStats::new()
    }
}
