//! `max_connections`: a route's slots for live pairs, shared by the route's
//! accept loops on every worker. A pair holds its slot for its whole life.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;

/// The slots of one route.
#[derive(Debug)]
pub struct Limit {
    /// Taken by an accept loop before it accepts, so that nobody is accepted
    /// without a slot. With several workers a loop can take one and then find
    /// that another worker took the client; such a slot goes straight back.
    slots: Semaphore,
    max: u32,
    /// Slots held by live pairs. The gauge and the counter follow this, not
    /// the semaphore: a slot taken for a client another worker got must not
    /// make the route look full, then free, then full again.
    live: Mutex<u32>,
    at_limit: Gauge,
    reached: Counter,
}

/// A slot taken by an accept loop, given back when dropped unless
/// [`Slot::keep`] hands it to a pair.
#[derive(Debug)]
pub struct Slot(Option<Arc<Limit>>);

impl Slot {
    /// Hands the slot to the pair just accepted, which gives it back with
    /// [`Limit::release`] when it closes. The pair task holds no handle of its
    /// own: eight more bytes would push every idle pair's task into a larger
    /// allocation size class (about 280 bytes of RSS per pair, measured).
    pub fn keep(mut self) {
        if let Some(limit) = self.0.take() {
            limit.change_live(|n| n.saturating_add(1));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(limit) = self.0.take() {
            limit.slots.add_permits(1);
        }
    }
}

impl Limit {
    /// `max` slots, recording into the route's gauge and counter.
    pub fn new(max: u32, at_limit: Gauge, reached: Counter) -> Limit {
        Limit {
            slots: Semaphore::new(max as usize),
            max,
            live: Mutex::new(0),
            at_limit,
            reached,
        }
    }

    /// The configured number of slots.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Slots held by live pairs now.
    pub fn taken(&self) -> u32 {
        *self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a free slot and takes it.
    pub async fn acquire(self: &Arc<Limit>) -> Slot {
        // The semaphore is never closed, so acquire cannot fail; the permit is
        // forgotten and given back by the Slot or by release.
        if let Ok(permit) = self.slots.acquire().await {
            permit.forget();
        }
        Slot(Some(self.clone()))
    }

    /// Gives back a slot that a pair kept (see [`Slot::keep`]).
    pub fn release(&self) {
        // Counted down before the permit returns, so that a waiting accept
        // loop that takes it and keeps it counts the route full again.
        self.change_live(|n| n.saturating_sub(1));
        self.slots.add_permits(1);
    }

    /// Changes the live count, and the gauge and counter with it, under one
    /// lock so that the gauge always ends at the last count.
    fn change_live(&self, f: impl FnOnce(u32) -> u32) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let was_full = *live >= self.max;
        *live = f(*live);
        let full = *live >= self.max;
        if full && !was_full {
            self.reached.inc();
        }
        self.at_limit.set(i64::from(full));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_last_kept_slot_sets_the_gauge_and_a_released_one_clears_it() {
        let limit = Arc::new(Limit::new(2, Gauge::default(), Counter::default()));
        limit.acquire().await.keep();
        assert_eq!((limit.taken(), limit.at_limit.get()), (1, 0));
        let b = limit.acquire().await;
        assert_eq!(
            (limit.taken(), limit.at_limit.get()),
            (1, 0),
            "a slot not yet handed to a pair does not count"
        );
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no third slot");
        b.keep();
        assert_eq!((limit.taken(), limit.at_limit.get()), (2, 1));
        assert_eq!(limit.reached.get(), 1);
        limit.release();
        let c = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the freed slot goes to the waiter")
            .unwrap();
        assert_eq!((limit.taken(), limit.at_limit.get()), (1, 0));
        c.keep();
        assert_eq!((limit.taken(), limit.at_limit.get()), (2, 1));
        assert_eq!(limit.reached.get(), 2, "reached again");
        limit.release();
        limit.release();
        assert_eq!((limit.taken(), limit.at_limit.get()), (0, 0));
    }

    #[tokio::test]
    async fn a_slot_taken_for_a_client_another_worker_got_does_not_count() {
        let limit = Arc::new(Limit::new(2, Gauge::default(), Counter::default()));
        limit.acquire().await.keep();
        for _ in 0..3 {
            drop(limit.acquire().await);
        }
        assert_eq!((limit.taken(), limit.at_limit.get()), (1, 0));
        assert_eq!(limit.reached.get(), 0);
        limit.acquire().await.keep();
        assert_eq!(limit.reached.get(), 1);
        let a = tokio::time::timeout(Duration::from_millis(50), limit.acquire()).await;
        assert!(a.is_err(), "no slot beyond the limit");
    }
}
