//! Worker threads, one per core by default, each driving its own
//! single-threaded tokio runtime.
//!
//! Every route listens once per worker (SO_REUSEPORT; the kernel spreads new
//! connections over the sockets), and a pair lives its whole life on the
//! worker that accepted it: no task moves between threads, and no thread is
//! woken for another's work. With tokio's work-stealing scheduler each new
//! pair woke a second worker (a futex and an eventfd write per connection);
//! this is the model of HAProxy's and nginx's per-thread event loops.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Period of each worker's tick. tokio wakes its timer driver through an
/// eventfd whenever a new timer is due before every timer already set, and
/// between connections the wheel is often empty: every connect timeout and
/// every first watchdog look then cost a write(2) and a spurious epoll round.
/// A tick that is always pending, due sooner than those timers, keeps the
/// driver's next wake early enough that they are simply inserted.
pub const TICK: Duration = Duration::from_millis(200);

/// How many workers `count` means: itself, or one per CPU this process may
/// use (cgroup quotas included) when 0.
pub fn resolve_count(count: usize) -> usize {
    match count {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The worker threads; dropping this stops them, ending any task still on them.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers, or one per CPU this process may use (cgroup
    /// quotas included) when `count` is 0.
    pub fn start(count: usize) -> io::Result<Workers> {
        let count = resolve_count(count);
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            stop: CancellationToken::new(),
            threads: Vec::with_capacity(count),
        };
        for i in 0..count {
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("kaproxy-worker-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    // Tasks spawned through the handle run while this thread is in block_on.
                    runtime.block_on(async move {
                        let mut tick = tokio::time::interval(TICK);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                _ = tick.tick() => {}
                            }
                        }
                    });
                })?;
            workers.threads.push(thread);
            let handle = rx.recv().map_err(|_| {
                io::Error::other("a worker thread ended before its runtime started")
            })??;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// One handle per worker, to spawn on it or to register sockets with its reactor.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_tasks_run_on_the_worker_threads_and_stop_with_them() {
        let workers = Workers::start(2).expect("workers");
        assert_eq!(workers.handles().len(), 2);
        for (i, handle) in workers.handles().iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            handle.spawn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send(name);
            });
            let name = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the task ran within 5 s");
            assert_eq!(
                name.as_deref(),
                Some(format!("kaproxy-worker-{i}").as_str())
            );
        }
        drop(workers);
    }

    #[test]
    fn zero_means_one_worker_per_cpu() {
        let workers = Workers::start(0).expect("workers");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(workers.handles().len(), cpus);
    }
}
