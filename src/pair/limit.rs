//! `max_connections`: a route's slots for live pairs, shared by the route's
//! accept loops on every worker. A pair holds its slot for its whole life.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;

/// The slots of one route.
#[derive(Debug)]
pub struct Limit {
    slots: Semaphore,
    max: u32,
    /// Whether every slot was taken at the last look, under a lock so that the
    /// gauge always ends at what the semaphore says after the last change (a
    /// look and its write cannot interleave with another's).
    full: Mutex<bool>,
    at_limit: Gauge,
    reached: Counter,
}

/// A slot taken by an accept loop, given back when dropped unless
/// [`Slot::keep`] hands it to a pair.
#[derive(Debug)]
pub struct Slot(Arc<Limit>);

impl Slot {
    /// Hands the slot to the pair just accepted, which gives it back with
    /// [`Limit::release`] when it closes. The pair task holds no handle of its
    /// own: eight more bytes would push every idle pair's task into a larger
    /// allocation size class (about 280 bytes of RSS per pair, measured).
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Limit {
    /// `max` slots, recording into the route's gauge and counter.
    pub fn new(max: u32, at_limit: Gauge, reached: Counter) -> Limit {
        Limit {
            slots: Semaphore::new(max as usize),
            max,
            full: Mutex::new(false),
            at_limit,
            reached,
        }
    }

    /// The configured number of slots.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Slots taken now.
    pub fn taken(&self) -> u32 {
        self.max
            .saturating_sub(self.slots.available_permits().min(u32::MAX as usize) as u32)
    }

    /// Waits for a free slot and takes it.
    pub async fn acquire(self: &Arc<Limit>) -> Slot {
        // The semaphore is never closed, so acquire cannot fail; the permit is
        // forgotten and given back by the Slot, which also updates the gauge.
        if let Ok(permit) = self.slots.acquire().await {
            permit.forget();
        }
        self.look();
        Slot(self.clone())
    }

    /// Gives back a slot that a pair kept (see [`Slot::keep`]).
    pub fn release(&self) {
        self.slots.add_permits(1);
        self.look();
    }

    fn look(&self) {
        let mut full = self.full.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.slots.available_permits() == 0;
        if now && !*full {
            self.reached.inc();
        }
        *full = now;
        self.at_limit.set(i64::from(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_last_slot_sets_the_gauge_and_a_freed_one_clears_it() {
        let limit = Arc::new(Limit::new(2, Gauge::default(), Counter::default()));
        let a = limit.acquire().await;
        assert_eq!((limit.taken(), limit.at_limit.get()), (1, 0));
        let b = limit.acquire().await;
        assert_eq!((limit.taken(), limit.at_limit.get()), (2, 1));
        assert_eq!(limit.reached.get(), 1);
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no third slot");
        a.keep();
        limit.release();
        let c = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the freed slot goes to the waiter")
            .unwrap();
        assert_eq!((limit.taken(), limit.at_limit.get()), (2, 1));
        assert_eq!(
            limit.reached.get(),
            1,
            "handed straight over: never below the limit"
        );
        drop(b);
        assert_eq!((limit.taken(), limit.at_limit.get()), (1, 0));
        let d = limit.acquire().await;
        assert_eq!(limit.reached.get(), 2, "reached again");
        drop((c, d));
        assert_eq!((limit.taken(), limit.at_limit.get()), (0, 0));
    }
}
