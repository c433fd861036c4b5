//! Wires a [`Config`] into listeners and pair tasks, and owns the one shutdown path.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::{fmt_duration, Config};
use crate::health;
use crate::net::sockopt;
use crate::pair::registry::Registry;
use crate::pair::{self, accept, RouteState};
use crate::pool::Pool;
use crate::telemetry::metrics::Metrics;
use crate::workers::Workers;

/// After the grace period, pairs are told to close; this bounds how long that takes.
const KILL_WAIT: Duration = Duration::from_secs(1);

/// A route that could not start.
#[derive(Debug, thiserror::Error)]
#[error("{route}: {what}: {source}")]
pub struct StartError {
    /// What was to start: `route "name"` or `admin endpoint`.
    pub route: String,
    /// What failed, e.g. `cannot listen on 0.0.0.0:8080`.
    pub what: String,
    /// The underlying error.
    pub source: std::io::Error,
}

/// Raises the soft descriptor limit to what the routes need and warns when
/// the hard limit is short; a failure here is only logged, since the limit
/// in force may well be enough.
fn check_descriptors(config: &Config, workers: usize) {
    let budget = match crate::fdlimit::budget(config, workers) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the descriptor limit (RLIMIT_NOFILE)");
            return;
        }
    };
    match crate::fdlimit::raise(&budget) {
        Ok(now) if now > budget.soft => {
            tracing::info!(
                from = budget.soft,
                to = now,
                "raised the descriptor limit (RLIMIT_NOFILE)"
            )
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, to = budget.target(), "cannot raise the descriptor limit (RLIMIT_NOFILE)")
        }
    }
    if let Some(warning) = budget.warning() {
        tracing::warn!(
            needed = budget.needed,
            hard_limit = budget.hard,
            "{warning}"
        );
    }
}

/// The running proxy.
#[derive(Debug)]
pub struct App {
    shutdown_grace: Duration,
    stop_accepting: CancellationToken,
    /// The admin endpoint outlives the drain, so it can be watched.
    stop_admin: CancellationToken,
    admin: TaskTracker,
    kill_pairs: CancellationToken,
    services: TaskTracker,
    pairs: TaskTracker,
    /// Last, so that it is dropped last: this stops the worker threads.
    workers: Workers,
}

impl App {
    /// Binds every route first (so a bad address fails the start, not half of it),
    /// then starts accepting on all of them. Logs one "route listening" line per route.
    pub async fn start(config: Config, workers: usize) -> Result<App, StartError> {
        let workers = Workers::start(workers).map_err(|source| StartError {
            route: "kaproxy".to_string(),
            what: "cannot start the worker threads".to_string(),
            source,
        })?;
        check_descriptors(&config, workers.handles().len());
        let mut listeners = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let fail = |what: String| {
                let name = format!("route \"{}\"", route.name);
                move |source| StartError {
                    route: name,
                    what,
                    source,
                }
            };
            let listening = || format!("cannot listen on {}", route.listen);
            // Client options go on the listeners, which every accepted socket inherits.
            let std_listeners = sockopt::bind_listeners(
                route.listen,
                Some(&route.client.keepalive),
                workers.handles().len(),
            )
            .map_err(fail(listening()))?;
            let addr = std_listeners[0].local_addr().map_err(fail(listening()))?;
            // Each copy is registered with the reactor of the worker that will accept on it.
            let mut copies = Vec::with_capacity(std_listeners.len());
            for (std_listener, worker) in std_listeners.into_iter().zip(workers.handles()) {
                let _on_worker = worker.enter();
                copies.push(sockopt::watch_listener(std_listener).map_err(fail(listening()))?);
            }
            sockopt::verify_upstream_options(&route.upstream.keepalive)
                .map_err(fail("cannot set the upstream socket options".to_string()))?;
            listeners.push((copies, addr));
        }

        let app = App {
            shutdown_grace: config.shutdown_grace,
            stop_accepting: CancellationToken::new(),
            stop_admin: CancellationToken::new(),
            admin: TaskTracker::new(),
            kill_pairs: CancellationToken::new(),
            services: TaskTracker::new(),
            pairs: TaskTracker::new(),
            workers,
        };
        let admin_listener = match config.admin {
            Some(addr) => {
                let fail = |source| StartError {
                    route: "admin endpoint".to_string(),
                    what: format!("cannot listen on {addr}"),
                    source,
                };
                let listener =
                    TcpListener::from_std(sockopt::bind_listener(addr, None).map_err(fail)?)
                        .map_err(fail)?;
                let bound = listener.local_addr().map_err(fail)?;
                // Logged before the routes' lines, so whoever waits for those has this one too.
                tracing::info!(address = %bound, "admin listening");
                Some(listener)
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::default());
        let mut admin_routes = Vec::new();
        let ids = Arc::new(AtomicU64::new(1));
        for (route, (listeners, addr)) in config.routes.into_iter().zip(listeners) {
            let servers: Vec<String> = route
                .upstream
                .servers
                .iter()
                .map(|s| s.addr.to_string())
                .collect();
            tracing::info!(route = %route.name, address = %addr, servers = %servers.join(","), "route listening");
            let health_check = route.upstream.health_check.clone();
            let route_metrics = pair::route_metrics(&metrics, &route.name);
            let limits = pair::relay::RelayLimits::of(&route);
            let max_connections = pair::route_limit(&route, &route_metrics);
            // Built once per route; a failure (a file changed since the
            // config was checked) fails the start, naming the file.
            let tls = pair::tls::RouteTls::build(&route, &metrics).map_err(|e| StartError {
                route: format!("route \"{}\"", route.name),
                what: "cannot set up TLS".to_string(),
                source: std::io::Error::other(e),
            })?;
            let state = Arc::new(RouteState {
                max_connections,
                pool: Arc::new(Pool::new(&route.name, &route.upstream, metrics.clone())),
                name: Arc::from(route.name.as_str()),
                route,
                ids: ids.clone(),
                registry: registry.clone(),
                metrics: route_metrics,
                limits,
                tls,
            });
            admin_routes.push((state.clone(), addr));
            if let Some(check) = health_check {
                for index in 0..state.pool.servers.len() {
                    app.services.spawn(health::run(
                        state.pool.clone(),
                        index,
                        check.clone(),
                        state.route.upstream.keepalive,
                        state.route.upstream.send_proxy,
                        state.tls.as_ref().and_then(|t| t.health_check(index)),
                        app.stop_accepting.clone(),
                    ));
                }
            }
            let open = Arc::new(AtomicUsize::new(listeners.len()));
            for (listener, worker) in listeners.into_iter().zip(app.workers.handles()) {
                worker.spawn(app.services.track_future(accept::accept_loop(
                    listener,
                    open.clone(),
                    state.clone(),
                    app.stop_accepting.clone(),
                    app.pairs.clone(),
                    app.kill_pairs.clone(),
                )));
            }
        }
        if let Some(listener) = admin_listener {
            let state = Arc::new(AdminState {
                draining: app.stop_accepting.clone(),
                routes: admin_routes,
                registry,
                metrics,
            });
            app.admin
                .spawn(admin::serve(listener, state, app.stop_admin.clone()));
        }
        Ok(app)
    }

    /// Closes every live pair at once with reason `shutdown` (each still logs
    /// its close event), waiting at most a second. Returns whether all closed.
    pub async fn close_now(&self) -> bool {
        self.stop_accepting.cancel();
        self.pairs.close();
        self.kill_pairs.cancel();
        tokio::time::timeout(KILL_WAIT, self.pairs.wait())
            .await
            .is_ok()
    }

    /// Stops accepting on every route at once, lets live pairs finish for the
    /// grace period, then closes the rest with reason `shutdown`. Returns whether
    /// every pair finished within the grace period.
    pub async fn shutdown(&self) -> bool {
        self.stop_accepting.cancel();
        self.services.close();
        self.services.wait().await;
        self.pairs.close();
        let live = self.pairs.len();
        tracing::info!(live_pairs = live, grace = %fmt_duration(self.shutdown_grace), "draining");
        let drained = tokio::time::timeout(self.shutdown_grace, self.pairs.wait())
            .await
            .is_ok();
        if drained {
            tracing::info!("drain completed");
        } else {
            let left = self.pairs.len();
            self.kill_pairs.cancel();
            let closed = tokio::time::timeout(KILL_WAIT, self.pairs.wait())
                .await
                .is_ok();
            tracing::warn!(
                closed_pairs = left,
                all_closed = closed,
                "drain incomplete: grace period over, remaining pairs closed"
            );
        }
        self.stop_admin.cancel();
        self.admin.close();
        self.admin.wait().await;
        drained
    }
}
