//! Reloading the configuration of a running kaproxy: the new file is checked
//! and every new listen address bound before anything changes, so that a
//! reload is applied whole or not at all. Then it is applied route by route,
//! matched by name, without touching a live pair's sockets beyond their
//! keepalive options.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::route::{self, Bound, RunningRoute};
use super::{bind_admin, build_tls, App, StartError};
use crate::config::{fmt_duration, Config, ConfigError, Route};
use crate::pair::close::{CloseReason, Side};
use crate::pair::tls::RouteTls;
use crate::pair::RouteState;
use crate::pool::Pool;

/// Why a reload was rejected; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file does not parse or validate.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A new listen address cannot be bound, or a TLS file cannot be used.
    #[error("{0}")]
    Start(#[from] StartError),
    /// kaproxy runs on command-line settings (`forward`): there is no file.
    #[error("nothing to reload: kaproxy was started without a configuration file")]
    NoFile,
}

/// What a reload changes in one route that stays.
#[derive(Debug, Default)]
struct RouteChange {
    listen: bool,
    client_keepalive: bool,
    upstream_keepalive: bool,
    pool: bool,
    timers: bool,
    any: bool,
}

impl RouteChange {
    /// `bound`: where the route listens now. A file that now names that
    /// address (where it said port 0 before) does not move the route.
    fn between(old: &Route, new: &Route, bound: SocketAddr) -> RouteChange {
        let (ou, nu) = (&old.upstream, &new.upstream);
        RouteChange {
            listen: moves(old, new, bound),
            client_keepalive: old.client.keepalive != new.client.keepalive,
            upstream_keepalive: ou.keepalive != nu.keepalive,
            pool: ou.servers != nu.servers
                || ou.balance != nu.balance
                || ou.retries != nu.retries
                || ou.health_check != nu.health_check
                || ou.ejection != nu.ejection
                || ou.keepalive != nu.keepalive
                || ou.send_proxy != nu.send_proxy,
            timers: old.idle_timeout != new.idle_timeout
                || old.half_close_timeout != new.half_close_timeout
                || old.client.keepalive != new.client.keepalive
                || ou.keepalive != nu.keepalive,
            any: old != new,
        }
    }

    /// Names of what changed, for the log.
    fn describe(&self, old: &Route, new: &Route) -> String {
        let mut what = Vec::new();
        if self.listen {
            what.push(format!("listen {} -> {}", old.listen, new.listen));
        }
        if self.client_keepalive {
            what.push("client keepalive".to_string());
        }
        if self.upstream_keepalive {
            what.push("upstream keepalive".to_string());
        }
        if self.pool {
            what.push("servers or pool".to_string());
        }
        if old.idle_timeout != new.idle_timeout || old.half_close_timeout != new.half_close_timeout
        {
            what.push("timeouts".to_string());
        }
        if what.is_empty() {
            what.push("other settings".to_string());
        }
        what.join(", ")
    }
}

/// Two addresses whose binds conflict: the same port, and the same IP or a
/// wildcard on either side (of one family).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Whether `new` listens elsewhere than the running `old`, bound at `bound`.
///
/// A file that names the address the route is bound to, or port 0 on its
/// IP (any port will do, and it has one), does not move it.
fn moves(old: &Route, new: &Route, bound: SocketAddr) -> bool {
    let any_port_here = new.listen.port() == 0 && new.listen.ip() == bound.ip();
    old.listen != new.listen && new.listen != bound && !any_port_here
}

impl App {
    /// Reads the configuration file again and applies it (see [`App::apply`]).
    /// Counted in `kaproxy_config_reloads_total`; a rejection is logged at
    /// error level with the same text as `kaproxy check`.
    pub async fn reload(&mut self, trigger: &str) -> Result<(), ReloadError> {
        let result = match self.config_path() {
            None => Err(ReloadError::NoFile),
            Some(path) => match Config::load(&path) {
                Ok(config) => self.apply(config).await,
                Err(e) => Err(e.into()),
            },
        };
        match &result {
            Ok(()) => tracing::info!(trigger, "configuration reloaded"),
            Err(e) => tracing::error!(
                trigger,
                error = %e,
                "configuration reload rejected; the running configuration keeps serving"
            ),
        }
        self.metrics.reload_done(result.is_ok());
        result
    }

    fn config_path(&self) -> Option<std::path::PathBuf> {
        let source = &self.config.source;
        (!source.starts_with('<')).then(|| source.into())
    }

    /// Applies `config`, route by route, matched by name. Every new listen
    /// address (and the admin endpoint's) is bound first: if one fails,
    /// nothing is applied.
    pub async fn apply(&mut self, config: Config) -> Result<(), ReloadError> {
        // Phase 1, which may fail: bind what is new. An address that a
        // running route leaves in this reload is taken over with its
        // listeners instead: it could not be bound while they are open.
        let mut bound: HashMap<String, Bound> = HashMap::new();
        let mut handed_over: Vec<Arc<str>> = Vec::new();
        for route in &config.routes {
            let running = self.find(&route.name);
            let needs_bind = running.is_none_or(|r| moves(&r.state.live().route, route, r.bound));
            if needs_bind {
                let leaving = self.routes.iter().find(|r| {
                    let current = r.state.live();
                    let leaves = match config.routes.iter().find(|n| *n.name == *r.state.name) {
                        None => true,
                        Some(next) => moves(&current.route, next, r.bound),
                    };
                    let here = route.listen == r.bound
                        || (route.listen.port() != 0 && route.listen == current.route.listen);
                    leaves && here
                });
                let taken = leaving.and_then(|r| Some((r.state.name.clone(), r.hand_over()?)));
                // The same port on an overlapping address (0.0.0.0:P and
                // 127.0.0.1:P) held by a route that leaves it now.
                let overlaps_own = self.routes.iter().any(|r| {
                    let leaves = config
                        .routes
                        .iter()
                        .find(|n| *n.name == *r.state.name)
                        .is_none_or(|next| moves(&r.state.live().route, next, r.bound));
                    leaves && overlap(r.bound, route.listen)
                });
                let b = match taken {
                    Some((from, b)) => {
                        route::verify_upstream(route)?;
                        handed_over.push(from);
                        b
                    }
                    None => route::bind(route, &self.workers, overlaps_own)?,
                };
                bound.insert(route.name.clone(), b);
            } else if running.is_some_and(|r| {
                r.state.live().route.upstream.keepalive != route.upstream.keepalive
            }) {
                route::verify_upstream(route)?;
            }
        }
        let admin: Option<(SocketAddr, TcpListener)> = match config.admin {
            Some(addr) if self.admin_listener.as_ref().map(|a| a.0) != Some(addr) => {
                Some(bind_admin(addr)?)
            }
            _ => None,
        };

        // TLS files are read again for every route that has TLS, changed
        // or not: a renewed certificate is a reload's most common reason.
        let mut tls: HashMap<String, Option<Box<RouteTls>>> = HashMap::new();
        for route in &config.routes {
            tls.insert(route.name.clone(), build_tls(route, &self.metrics)?);
        }

        // Phase 2: apply. Nothing below fails the reload.
        // First, routes that gave their listeners away stop accepting on
        // them, so that no client meant for the new owner reaches them.
        for r in &self.routes {
            if handed_over.iter().any(|n| Arc::ptr_eq(n, &r.state.name)) {
                r.stop_accepting();
            }
        }
        let grace = config.shutdown_grace;
        let mut old_routes: Vec<RunningRoute> = std::mem::take(&mut self.routes);
        for gone in extract(&mut old_routes, |r| {
            !config.routes.iter().any(|n| *n.name == *r.state.name)
        }) {
            self.remove(gone, grace);
        }
        for route in config.routes.clone() {
            let running = match old_routes.iter().position(|r| *r.state.name == *route.name) {
                Some(i) => {
                    let mut running = old_routes.swap_remove(i);
                    let b = bound.remove(&route.name);
                    let t = tls.remove(&route.name).flatten();
                    self.change(&mut running, route, b, t).await;
                    running
                }
                None => {
                    let t = tls.remove(&route.name).flatten();
                    let state = self.route_state(route.clone(), t);
                    match bound.remove(&route.name) {
                        Some(b) => {
                            tracing::info!(route = %route.name, "route added");
                            RunningRoute::start(state, b, &self.spawner())
                        }
                        // Bound in phase 1 for every route not running before.
                        None => continue,
                    }
                }
            };
            self.routes.push(running);
        }
        match (config.admin, admin) {
            (_, Some(listener)) => self.serve_admin(listener),
            (None, None) => {
                if let Some((addr, stop)) = self.admin_listener.take() {
                    tracing::info!(address = %addr, "admin endpoint turned off");
                    stop.cancel();
                }
            }
            (Some(_), None) => {}
        }
        self.publish_routes();
        crate::app::check_descriptors(&config, self.workers.handles().len());
        self.config = config;
        Ok(())
    }

    fn find(&self, name: &str) -> Option<&RunningRoute> {
        self.routes.iter().find(|r| *r.state.name == *name)
    }

    /// A route the new file no longer has: it stops accepting now; its pairs
    /// get `grace` to finish, then close as `route_removed`. Once the last
    /// one has closed, the route's metric series go too, unless a route of
    /// the same name runs by then.
    fn remove(&self, gone: RunningRoute, grace: std::time::Duration) {
        gone.stop();
        let state = gone.state.clone();
        // Off the admin endpoint at once: a scrape while the rest of the
        // reload runs would otherwise write its servers' series again.
        self.admin_state.routes.rcu(|routes| {
            routes
                .iter()
                .filter(|(r, _)| !Arc::ptr_eq(r, &state))
                .cloned()
                .collect::<Vec<_>>()
        });
        state.max_connections.detach();
        let live = state.live();
        for server in &live.route.upstream.servers {
            self.metrics
                .forget_server(&state.name, &server.addr.to_string());
        }
        let pairs = self.registry.count_route(&state.name);
        tracing::info!(route = %state.name, live_pairs = pairs, grace = %fmt_duration(grace), "route removed: stopped accepting; its live pairs may finish within the grace period");
        let kill = state.kill.clone();
        let registry = self.registry.clone();
        let metrics = self.metrics.clone();
        let admin = self.admin_state.clone();
        self.removed.spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            let poll = std::time::Duration::from_millis(100);
            // Polled rather than awaited per pair: pairs of a route have no
            // tracker of their own, and their tasks must not grow one.
            while registry.count_route(&state.name) > 0 && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = kill.cancelled() => return,
                    _ = tokio::time::sleep(poll.min(grace)) => {}
                }
            }
            state.mark_removed();
            kill.cancel();
            // Killed pairs close within a moment; bounded all the same.
            let closing = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while registry.count_route(&state.name) > 0 && tokio::time::Instant::now() < closing {
                tokio::time::sleep(poll).await;
            }
            // On this thread, as reloads are: no reload runs between the
            // look and the removal.
            let taken = admin
                .routes
                .load()
                .iter()
                .any(|(r, _)| r.name == state.name);
            if !taken {
                metrics.forget_route(
                    &state.name,
                    &CloseReason::ALL.map(CloseReason::as_str),
                    [Side::Client.as_str(), Side::Upstream.as_str()],
                    &crate::tls::HandshakeFailure::ALL.map(crate::tls::HandshakeFailure::as_str),
                );
            }
        });
    }

    /// Applies a new version of a running route.
    async fn change(
        &self,
        running: &mut RunningRoute,
        new: Route,
        bound: Option<Bound>,
        tls: Option<Box<RouteTls>>,
    ) {
        let state: Arc<RouteState> = running.state.clone();
        let old: Route = state.live().route.clone();
        let change = RouteChange::between(&old, &new, running.bound);
        if !change.any {
            if tls.is_some() {
                // The same settings with the TLS files read again: new
                // handshakes use them, live sessions keep theirs.
                let pool = state.live().pool.clone();
                let upstream_tls = new.upstream.tls.is_some();
                state.set_live(new, pool, tls);
                if upstream_tls {
                    running.check_health(&self.spawner());
                }
                tracing::info!(route = %state.name, "TLS certificates and keys read again");
            }
            return;
        }
        tracing::info!(route = %new.name, changed = %change.describe(&old, &new), "route changed");
        let pool = if change.pool {
            Arc::new(Pool::carrying_over(
                &new.name,
                &new.upstream,
                self.metrics.clone(),
                Some(&state.live().pool),
            ))
        } else {
            state.live().pool.clone()
        };
        for server in &old.upstream.servers {
            if !new.upstream.servers.iter().any(|s| s.addr == server.addr) {
                self.metrics
                    .forget_server(&new.name, &server.addr.to_string());
            }
        }
        let upstream_tls = new.upstream.tls.is_some();
        state.set_live(new.clone(), pool, tls);
        if change.pool || upstream_tls {
            running.check_health(&self.spawner());
        }
        if let Some(bound) = bound {
            running.accept_on(bound, &self.spawner());
        } else if change.client_keepalive {
            if let Err(e) = running.retune_listeners(&new) {
                tracing::error!(route = %new.name, error = %e, "cannot set the new client keepalive on the listening sockets; new clients keep the old settings");
            }
            state
                .client_options_epoch
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        for (side, changed, spec) in [
            (Side::Client, change.client_keepalive, new.client.keepalive),
            (
                Side::Upstream,
                change.upstream_keepalive,
                new.upstream.keepalive,
            ),
        ] {
            if !changed {
                continue;
            }
            let registry = self.registry.clone();
            let name = state.name.clone();
            // System calls on every live socket of the side: off this thread's
            // runtime, which also serves signals and the admin endpoint.
            let done =
                tokio::task::spawn_blocking(move || registry.retune_route(&name, side, &spec))
                    .await;
            match done {
                Ok(done) => {
                    let sockets = format!("{} sockets", side.as_str());
                    tracing::info!(
                        route = %new.name,
                        side = side.as_str(),
                        updated = done.updated,
                        skipped_dead = done.skipped,
                        failed = done.failed,
                        error = done.last_error.as_deref(),
                        "keepalive updated on {} live {sockets}",
                        done.updated
                    );
                }
                Err(e) => {
                    tracing::error!(route = %new.name, error = %e, "updating the live sockets' keepalive failed")
                }
            }
        }
        if change.timers {
            self.registry.wake_route(&state.name);
        }
    }
}

/// Takes the elements matching `pred` out of `v`.
fn extract<T>(v: &mut Vec<T>, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if pred(&v[i]) {
            out.push(v.remove(i));
        } else {
            i += 1;
        }
    }
    out
}
