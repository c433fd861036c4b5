//! `max_connections`: a route's slots for live pairs, shared by the route's
//! accept loops on every worker. A pair holds its slot for its whole life.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;

/// Permits of a route without a limit: more than any `max_connections` and
/// far below the semaphore's maximum, so a route can switch between limited
/// and unlimited on a reload with the same arithmetic.
const UNLIMITED: usize = 1 << 33;

/// The slots of one route.
#[derive(Debug)]
pub struct Limit {
    /// Taken by an accept loop before it accepts, so that nobody is accepted
    /// without a slot. With several workers a loop can take one and then find
    /// that another worker took the client; such a slot goes straight back.
    slots: Semaphore,
    counts: Mutex<Counts>,
    at_limit: Gauge,
    reached: Counter,
}

#[derive(Debug)]
struct Counts {
    /// The route was removed by a reload: its gauge and counter now belong to
    /// whatever route takes its name, and this one no longer writes them.
    detached: bool,
    /// `None`: unlimited.
    max: Option<u32>,
    /// Slots held by live pairs. The gauge and the counter follow this, not
    /// the semaphore: a slot taken for a client another worker got must not
    /// make the route look full, then free, then full again.
    live: u32,
    /// Slots a lowered limit still has to take back: taken ones cannot be
    /// forgotten, so slots given back pay this first.
    debt: usize,
}

impl Counts {
    fn full(&self) -> bool {
        self.max.is_some_and(|m| self.live >= m)
    }
}

fn permits(max: Option<u32>) -> usize {
    max.map_or(UNLIMITED, |m| m as usize)
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
            limit.change(|c| c.live = c.live.saturating_add(1));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(limit) = self.0.take() {
            limit.change(|c| limit.give_back(c));
        }
    }
}

impl Limit {
    /// `max` slots (`None`: unlimited), recording into the route's gauge and counter.
    pub fn new(max: Option<u32>, at_limit: Gauge, reached: Counter) -> Limit {
        Limit {
            slots: Semaphore::new(permits(max)),
            counts: Mutex::new(Counts {
                detached: false,
                max,
                live: 0,
                debt: 0,
            }),
            at_limit,
            reached,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configured number of slots; `None`: unlimited.
    pub fn max(&self) -> Option<u32> {
        self.lock().max
    }

    /// Slots held by live pairs now.
    pub fn taken(&self) -> u32 {
        self.lock().live
    }

    /// A reload changed `max_connections`. Live pairs keep their slots; a
    /// lower limit takes free slots back at once and the rest as pairs close.
    pub fn set_max(&self, max: Option<u32>) {
        self.change(|c| {
            let (old, new) = (permits(c.max), permits(max));
            if new >= old {
                let mut add = new - old;
                let paid = add.min(c.debt);
                c.debt -= paid;
                add -= paid;
                self.slots.add_permits(add);
            } else {
                let cut = old - new;
                let forgotten = self.slots.forget_permits(cut);
                c.debt += cut - forgotten;
            }
            c.max = max;
        });
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
        self.change(|c| {
            c.live = c.live.saturating_sub(1);
            self.give_back(c);
        });
    }

    fn give_back(&self, c: &mut Counts) {
        if c.debt > 0 {
            c.debt -= 1;
        } else {
            self.slots.add_permits(1);
        }
    }

    /// Changes the counts, and the gauge and counter with them, under one
    /// lock so that the gauge always ends at the last count.
    fn change(&self, f: impl FnOnce(&mut Counts)) {
        let mut c = self.lock();
        let was_full = c.full();
        f(&mut c);
        let full = c.full();
        if c.detached {
            return;
        }
        if full && !was_full {
            self.reached.inc();
        }
        self.at_limit.set(i64::from(full));
    }

    /// Stops writing the route's gauge and counter (see `Counts::detached`),
    /// leaving the gauge at 0.
    pub fn detach(&self) {
        self.lock().detached = true;
        self.at_limit.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_last_kept_slot_sets_the_gauge_and_a_released_one_clears_it() {
        let limit = Arc::new(Limit::new(Some(2), Gauge::default(), Counter::default()));
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
        let limit = Arc::new(Limit::new(Some(2), Gauge::default(), Counter::default()));
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

    #[tokio::test]
    async fn a_reload_can_lower_raise_and_lift_the_limit_while_pairs_live() {
        let limit = Arc::new(Limit::new(Some(3), Gauge::default(), Counter::default()));
        for _ in 0..3 {
            limit.acquire().await.keep();
        }
        limit.set_max(Some(1));
        assert_eq!((limit.taken(), limit.at_limit.get()), (3, 1));
        let wait = |limit: &Arc<Limit>| {
            let limit = limit.clone();
            async move { tokio::time::timeout(Duration::from_millis(50), limit.acquire()).await }
        };
        limit.release();
        limit.release();
        assert!(
            wait(&limit).await.is_err(),
            "one live pair is the new limit"
        );
        limit.release();
        let slot = wait(&limit)
            .await
            .expect("the last close frees the one slot");
        slot.keep();
        assert!(wait(&limit).await.is_err());
        limit.set_max(Some(2));
        wait(&limit).await.expect("raised: a slot").keep();
        assert_eq!((limit.taken(), limit.at_limit.get()), (2, 1));
        limit.set_max(None);
        assert_eq!(limit.at_limit.get(), 0, "unlimited is never at the limit");
        for _ in 0..100 {
            wait(&limit).await.expect("unlimited").keep();
        }
        limit.set_max(Some(5));
        assert_eq!((limit.taken(), limit.at_limit.get()), (102, 1));
        for _ in 0..97 {
            limit.release();
        }
        assert!(
            wait(&limit).await.is_err(),
            "5 live of 5: the closes paid the debt"
        );
        limit.release();
        wait(&limit).await.expect("4 live of 5: a slot").keep();
        assert_eq!((limit.taken(), limit.at_limit.get()), (5, 1));
    }
}
