//! Live state of a route's servers: health (active checks), passive ejection,
//! active pairs, and the plan of which servers a new connection tries.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::balance::{self, BalanceState, Candidate};
use crate::config::{fmt_duration, Balance, Ejection, Server, UpstreamSpec};
use crate::telemetry::metrics::Metrics;

/// At most one "every server is down" warning per route per this period.
const FAIL_OPEN_LOG_PERIOD: Duration = Duration::from_secs(10);

/// One server and what is known about it.
#[derive(Debug)]
pub struct ServerState {
    /// As configured at first; a reload may change the weight (below).
    pub spec: Server,
    /// The weight in force: a reload that changes it keeps the server's
    /// state and its count of live pairs.
    weight: AtomicU32,
    /// Pairs open to it now, plus connects to it in flight.
    pub active: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    /// The last health check's outcome, as logged.
    last_check: Option<(bool, String)>,
    /// Result of active checks: `None` before the first check (or without checks).
    checked_up: Option<bool>,
    passes: u32,
    failures: u32,
    connect_failures: u32,
    ejected_until: Option<Instant>,
    /// When the current or last ejection began. Kept when the ejection ends, so
    /// that attempts started before it are still recognised when they fail late.
    ejected_at: Option<Instant>,
    ejections: u32,
}

impl Health {
    fn forget_checks(&mut self) {
        self.checked_up = None;
        self.passes = 0;
        self.failures = 0;
        self.last_check = None;
    }
}

/// What `/upstreams` shows about a server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerView {
    /// As configured.
    pub address: String,
    /// Configured weight.
    pub weight: u32,
    /// "up", "down" (failed health checks) or "ejected" (connect failures).
    pub state: &'static str,
    /// Pairs open to it, plus connects to it in flight.
    pub active_pairs: usize,
    /// Connect failures in a row.
    pub connect_failures: u32,
    /// Milliseconds of ejection left, when ejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    /// Last health check: passed or not, and what happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckView>,
}

/// Outcome of the last health check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckView {
    /// Whether it passed.
    pub ok: bool,
    /// What happened.
    pub detail: String,
}

/// The servers of one route.
#[derive(Debug)]
pub struct Pool {
    route: String,
    /// Servers in configuration order. Shared: a reload's new pool keeps the
    /// state of a server it still lists, and live pairs count against theirs.
    pub servers: Vec<Arc<ServerState>>,
    balance: Balance,
    retries: Option<u32>,
    ejection: Ejection,
    state: Mutex<BalanceState>,
    last_fail_open_log: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

/// Keeps a server's active count up from the start of a connect attempt to it
/// until the pair it becomes ends (or the attempt fails).
#[derive(Debug)]
pub struct ActiveGuard {
    server: Arc<ServerState>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain
    // counters), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// A pool where every server starts eligible.
    pub fn new(route: &str, spec: &UpstreamSpec, metrics: Arc<Metrics>) -> Pool {
        Pool::carrying_over(route, spec, metrics, None)
    }

    /// A pool for a reloaded route: a server that `old` also lists (same
    /// address) keeps its health, ejection and active pairs, with its new
    /// weight; the others start eligible. Without health checks in the new
    /// route, what the old checks found is forgotten.
    pub fn carrying_over(
        route: &str,
        spec: &UpstreamSpec,
        metrics: Arc<Metrics>,
        old: Option<&Pool>,
    ) -> Pool {
        let known = |s: &Server| old.and_then(|p| p.servers.iter().find(|o| o.spec.addr == s.addr));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            ^ (std::process::id() as u64) << 32;
        Pool {
            route: route.to_string(),
            servers: spec
                .servers
                .iter()
                .map(|s| match known(s) {
                    Some(o) => {
                        o.weight.store(s.weight, Ordering::Relaxed);
                        if spec.health_check.is_none() {
                            // Nothing will check it again: a "down" from
                            // checks that are gone must not last forever.
                            lock(&o.health).forget_checks();
                        }
                        o.clone()
                    }
                    None => Arc::new(ServerState {
                        spec: s.clone(),
                        weight: AtomicU32::new(s.weight),
                        active: AtomicUsize::new(0),
                        health: Mutex::new(Health::default()),
                    }),
                })
                .collect(),
            balance: spec.balance,
            retries: spec.retries,
            ejection: spec.ejection,
            state: Mutex::new(BalanceState::new(spec.servers.len(), seed)),
            last_fail_open_log: Mutex::new(None),
            metrics,
        }
    }

    /// The route these servers belong to.
    pub fn route(&self) -> &str {
        &self.route
    }

    fn eligible(&self, i: usize, now: Instant) -> bool {
        let h = lock(&self.servers[i].health);
        h.checked_up != Some(false) && h.ejected_until.is_none_or(|t| now >= t)
    }

    /// The servers a new connection tries, in order: the balance mode's choice
    /// among eligible servers, then fallbacks, `retries + 1` attempts in all.
    /// When no server is eligible, all of them are tried anyway (fail-open):
    /// refusing every client would turn a health-check problem into an outage.
    pub fn plan(&self) -> Vec<usize> {
        self.plan_with(&mut lock(&self.state))
    }

    /// As [`Pool::plan`], and the first attempt is counted before the balance
    /// state's lock is released: pairs planned at the same moment on two
    /// workers would otherwise both see the same idle server, and
    /// least-connections would send both there.
    pub fn plan_counting_first(&self) -> (Vec<usize>, Option<ActiveGuard>) {
        let mut state = lock(&self.state);
        let plan = self.plan_with(&mut state);
        let first = plan.first().map(|&i| self.acquire(i));
        drop(state);
        (plan, first)
    }

    fn plan_with(&self, state: &mut BalanceState) -> Vec<usize> {
        let now = Instant::now();
        let snapshot = |i: usize, s: &ServerState| Candidate {
            index: i,
            weight: s.weight.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
        };
        let mut candidates: Vec<Candidate> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(i, _)| self.eligible(*i, now))
            .map(|(i, s)| snapshot(i, s))
            .collect();
        if candidates.is_empty() {
            self.log_fail_open(now);
            candidates = self
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| snapshot(i, s))
                .collect();
        }
        let order = balance::order(self.balance, &candidates, state);
        let attempts = match self.retries {
            Some(r) => r as usize + 1,
            None => self.servers.len(),
        };
        order
            .iter()
            .copied()
            .cycle()
            .take(attempts.max(1))
            .collect()
    }

    fn log_fail_open(&self, now: Instant) {
        let mut last = lock(&self.last_fail_open_log);
        if last.is_none_or(|t| now.duration_since(t) >= FAIL_OPEN_LOG_PERIOD) {
            *last = Some(now);
            tracing::warn!(route = %self.route, "every server of the route is down; trying them anyway (fail-open)");
        }
    }

    /// Counts a connect attempt to server `i`, and then its pair, until the guard
    /// is dropped.
    pub fn acquire(&self, i: usize) -> ActiveGuard {
        let server = self.servers[i].clone();
        server.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard { server }
    }

    /// A connect to server `i` succeeded: it is no longer ejected.
    pub fn connect_succeeded(&self, i: usize) {
        let mut h = lock(&self.servers[i].health);
        h.connect_failures = 0;
        h.ejections = 0;
        if h.ejected_until.take().is_some() {
            self.log_change(i, "up", "connect succeeded");
        }
    }

    /// A connect to server `i`, attempted from `started`, failed: after
    /// `ejection.failures` in a row it is ejected, for twice as long each time a
    /// connect attempted after an ejection ended fails again.
    ///
    /// A failure that arrives while the server is ejected, or of an attempt that
    /// began before the current or last ejection did, is the outage that ejection
    /// already answered: a burst of concurrent attempts must not multiply the
    /// backoff, so such failures neither count nor escalate.
    pub fn connect_failed(&self, i: usize, started: Instant, error: &str) {
        self.metrics
            .connect_failed(&self.route, &self.servers[i].spec.addr.to_string());
        if self.ejection.failures == 0 {
            return;
        }
        let now = Instant::now();
        let mut h = lock(&self.servers[i].health);
        let ejected = h.ejected_until.is_some_and(|t| now < t);
        if ejected || h.ejected_at.is_some_and(|at| started < at) {
            return;
        }
        h.connect_failures += 1;
        if h.connect_failures < self.ejection.failures {
            return;
        }
        let factor = 1u32.checked_shl(h.ejections.min(31)).unwrap_or(u32::MAX);
        let backoff = self
            .ejection
            .backoff
            .saturating_mul(factor)
            .min(self.ejection.max_backoff);
        h.ejections = h.ejections.saturating_add(1);
        h.ejected_at = Some(now);
        h.ejected_until = Some(now + backoff);
        let reason = format!(
            "{} connect failures in a row (last: {error}); ejected for {}",
            h.connect_failures,
            fmt_duration(backoff)
        );
        drop(h);
        self.log_change(i, "ejected", &reason);
    }

    /// Result of one active health check of server `i`. The first result sets
    /// the state directly; later ones need `rise` passes or `fall` failures in a row.
    pub fn health_result(&self, i: usize, ok: bool, detail: &str, rise: u32, fall: u32) {
        let mut h = lock(&self.servers[i].health);
        h.last_check = Some((ok, detail.to_string()));
        let mut change = None;
        if ok {
            h.passes += 1;
            h.failures = 0;
            // A passing check also ends a passive ejection.
            let was_ejected = h.ejected_until.take().is_some();
            if was_ejected {
                h.connect_failures = 0;
                h.ejections = 0;
            }
            match h.checked_up {
                None => change = Some(("up", format!("first health check passed: {detail}"))),
                Some(false) if h.passes >= rise => {
                    change = Some(("up", format!("{} health checks passed: {detail}", h.passes)))
                }
                Some(true) if was_ejected => {
                    change = Some(("up", format!("health check passed: {detail}")))
                }
                _ => {}
            }
            if change.is_some() {
                h.checked_up = Some(true);
            }
        } else {
            h.failures += 1;
            h.passes = 0;
            match h.checked_up {
                None => change = Some(("down", format!("first health check failed: {detail}"))),
                Some(true) if h.failures >= fall => {
                    change = Some((
                        "down",
                        format!("{} health checks failed: {detail}", h.failures),
                    ))
                }
                _ => {}
            }
            if change.is_some() {
                h.checked_up = Some(false);
            }
        }
        drop(h);
        if let Some((state, reason)) = change {
            self.log_change(i, state, &reason);
        }
    }

    fn log_change(&self, i: usize, state: &str, reason: &str) {
        tracing::info!(route = %self.route, server = %self.servers[i].spec.addr, state, reason, "server state changed");
    }

    /// Whether any server may get new connections now.
    pub fn any_up(&self) -> bool {
        (0..self.servers.len()).any(|i| self.view(i).state == "up")
    }

    /// A snapshot of server `i`.
    pub fn view(&self, i: usize) -> ServerView {
        let now = Instant::now();
        let h = lock(&self.servers[i].health);
        let state = if h.checked_up == Some(false) {
            "down"
        } else if h.ejected_until.is_some_and(|t| now < t) {
            "ejected"
        } else {
            "up"
        };
        ServerView {
            address: self.servers[i].spec.addr.to_string(),
            weight: self.servers[i].weight.load(Ordering::Relaxed),
            state,
            active_pairs: self.servers[i].active.load(Ordering::Relaxed),
            connect_failures: h.connect_failures,
            ejected_for_ms: h
                .ejected_until
                .filter(|t| now < *t)
                .map(|t| (t - now).as_millis() as u64),
            last_check: h.last_check.as_ref().map(|(ok, detail)| CheckView {
                ok: *ok,
                detail: detail.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeepaliveSpec, ServerAddr};

    fn pool(n: usize, balance: Balance, ejection: Ejection) -> Pool {
        let spec = UpstreamSpec {
            send_proxy: crate::config::SendProxy::Off,
            tls: None,
            servers: (0..n)
                .map(|i| Server {
                    addr: ServerAddr {
                        host: format!("s{i}"),
                        port: 80,
                    },
                    weight: 1,
                })
                .collect(),
            balance,
            retries: None,
            health_check: None,
            ejection,
            connect_timeout: Duration::from_secs(1),
            keepalive: KeepaliveSpec::default(),
            path_idle_limit: None,
        };
        Pool::new("t", &spec, Arc::new(Metrics::new()))
    }

    const EJECT: Ejection = Ejection {
        failures: 2,
        backoff: Duration::from_millis(40),
        max_backoff: Duration::from_millis(100),
    };

    #[test]
    fn first_state_comes_from_the_first_check_then_rise_and_fall() {
        let p = pool(2, Balance::First, EJECT);
        p.health_result(0, false, "refused", 2, 3);
        assert_eq!(p.view(0).state, "down", "first check decides at once");
        assert_eq!(
            p.plan(),
            vec![1, 1],
            "down server not planned; retries cycle the rest"
        );
        p.health_result(0, true, "200", 2, 3);
        assert_eq!(p.view(0).state, "down", "one pass of rise 2");
        p.health_result(0, true, "200", 2, 3);
        assert_eq!(p.view(0).state, "up");
        for k in 0..2 {
            p.health_result(0, false, "refused", 2, 3);
            assert_eq!(p.view(0).state, "up", "failure {k} of fall 3");
        }
        p.health_result(0, true, "200", 2, 3);
        p.health_result(0, false, "refused", 2, 3);
        p.health_result(0, false, "refused", 2, 3);
        assert_eq!(
            p.view(0).state,
            "up",
            "a pass in between resets the fall count"
        );
        p.health_result(0, false, "refused", 2, 3);
        assert_eq!(p.view(0).state, "down");
    }

    /// Time left of server `i`'s ejection.
    fn ejected_for(p: &Pool, i: usize) -> Duration {
        let until = lock(&p.servers[i].health)
            .ejected_until
            .expect("server ejected");
        until.saturating_duration_since(Instant::now())
    }

    #[test]
    fn passive_ejection_backs_off_longer_while_failing_and_ends_on_success() {
        let p = pool(2, Balance::First, EJECT);
        p.connect_failed(0, Instant::now(), "refused");
        assert_eq!(p.view(0).state, "up", "one failure of two");
        p.connect_failed(0, Instant::now(), "refused");
        assert_eq!(p.view(0).state, "ejected");
        assert_eq!(p.plan()[0], 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(p.view(0).state, "up", "first backoff 40 ms over");
        p.connect_failed(0, Instant::now(), "refused");
        let period = ejected_for(&p, 0);
        assert!(
            period > Duration::from_millis(60) && period <= Duration::from_millis(80),
            "second backoff doubled: {period:?}"
        );
        std::thread::sleep(Duration::from_millis(90));
        assert_eq!(p.view(0).state, "up", "second backoff 80 ms over");
        p.connect_failed(0, Instant::now(), "refused");
        let period = ejected_for(&p, 0);
        assert!(
            period > Duration::from_millis(90),
            "capped at max_backoff: {period:?}"
        );
        p.connect_succeeded(0);
        assert_eq!(p.view(0).state, "up");
        assert_eq!(p.plan()[0], 0);
    }

    #[test]
    fn a_burst_of_concurrent_failures_ejects_for_the_base_backoff_only() {
        let p = pool(2, Balance::First, EJECT);
        // Ten attempts in flight together, all refused: the third ejects.
        let burst = Instant::now();
        for _ in 0..10 {
            p.connect_failed(0, burst, "refused");
        }
        assert_eq!(p.view(0).state, "ejected");
        let period = ejected_for(&p, 0);
        assert!(
            period <= EJECT.backoff,
            "one ejection for the base backoff: {period:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(p.view(0).state, "up", "base backoff over");
        p.connect_failed(0, burst, "refused");
        assert_eq!(
            p.view(0).state,
            "up",
            "a late failure of an attempt from before the ejection does not eject again"
        );
        p.connect_failed(0, Instant::now(), "refused");
        let period = ejected_for(&p, 0);
        assert!(
            period > Duration::from_millis(60) && period <= Duration::from_millis(80),
            "an attempt started after the ejection ended fails: backoff doubled, {period:?}"
        );
    }

    #[test]
    fn a_passing_health_check_ends_an_ejection() {
        let p = pool(1, Balance::RoundRobin, EJECT);
        p.health_result(0, true, "200", 2, 3);
        p.connect_failed(0, Instant::now(), "refused");
        p.connect_failed(0, Instant::now(), "refused");
        assert_eq!(p.view(0).state, "ejected");
        p.health_result(0, true, "200", 2, 3);
        assert_eq!(p.view(0).state, "up");
    }

    #[test]
    fn all_down_fails_open() {
        let p = pool(3, Balance::RoundRobin, EJECT);
        for i in 0..3 {
            p.health_result(i, false, "refused", 2, 3);
        }
        let mut plan = p.plan();
        plan.sort_unstable();
        assert_eq!(plan, vec![0, 1, 2], "every server still tried");
    }

    #[test]
    fn plans_made_together_count_their_first_attempt_before_the_next_is_made() {
        let p = pool(2, Balance::LeastConnections, EJECT);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let p = &p;
                move || {
                    let (plan, guard) = p.plan_counting_first();
                    assert!(guard.is_some());
                    (plan[0], guard)
                }
            })
            .collect();
        let firsts: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = threads.into_iter().map(|t| s.spawn(t)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_ne!(
            firsts[0].0, firsts[1].0,
            "two planners never share the idle server"
        );
    }

    #[test]
    fn active_guard_counts_pairs() {
        let p = pool(2, Balance::LeastConnections, EJECT);
        let g = p.acquire(0);
        assert_eq!(p.view(0).active_pairs, 1);
        assert_eq!(p.plan()[0], 1, "least connections avoids the busy server");
        drop(g);
        assert_eq!(p.view(0).active_pairs, 0);
    }

    #[test]
    fn retries_bound_the_attempts() {
        let mut p = pool(4, Balance::RoundRobin, EJECT);
        p.retries = Some(1);
        assert_eq!(p.plan().len(), 2);
        p.retries = Some(0);
        assert_eq!(p.plan().len(), 1);
        p.retries = None;
        assert_eq!(p.plan().len(), 4);
    }
}
