//! Wires a [`Config`] into listeners and pair tasks, and owns the one shutdown path.

mod reload;
mod route;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::{fmt_duration, Config, Route};
use crate::net::sockopt;
use crate::pair::registry::Registry;
use crate::pair::tls::RouteTls;
use crate::pair::RouteState;
use crate::pool::Pool;
use crate::telemetry::metrics::Metrics;
use crate::workers::Workers;
use route::RunningRoute;

pub use reload::ReloadError;

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

/// The route's TLS configs, read from its files now: at start, and at every
/// reload (so that renewed certificates are picked up). A file that changed
/// since the configuration was checked fails here, naming the file.
fn build_tls(route: &Route, metrics: &Metrics) -> Result<Option<Box<RouteTls>>, StartError> {
    RouteTls::build(route, metrics).map_err(|e| StartError {
        route: format!("route \"{}\"", route.name),
        what: "cannot set up TLS".to_string(),
        source: std::io::Error::other(e),
    })
}

/// Binds the admin endpoint's listener; logs where it listens.
fn bind_admin(addr: SocketAddr) -> Result<(SocketAddr, TcpListener), StartError> {
    let fail = |source| StartError {
        route: "admin endpoint".to_string(),
        what: format!("cannot listen on {addr}"),
        source,
    };
    let listener =
        TcpListener::from_std(sockopt::bind_listener(addr, None).map_err(fail)?).map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    // Logged before the routes' lines, so whoever waits for those has this one too.
    tracing::info!(address = %bound, "admin listening");
    Ok((addr, listener))
}

/// Raises the soft descriptor limit to what the routes need and warns when
/// the hard limit is short; a failure here is only logged, since the limit
/// in force may well be enough.
pub(crate) fn check_descriptors(config: &Config, workers: usize) {
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
    /// Where the configuration came from: a file can be reloaded.
    config: Config,
    stop_accepting: CancellationToken,
    /// The admin endpoint outlives the drain, so it can be watched.
    stop_admin: CancellationToken,
    admin: TaskTracker,
    /// Stops the admin listener in use now (a reload may move it).
    admin_listener: Option<(SocketAddr, CancellationToken)>,
    admin_state: Arc<AdminState>,
    kill_pairs: CancellationToken,
    services: TaskTracker,
    pairs: TaskTracker,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    ids: Arc<AtomicU64>,
    /// In configuration order.
    routes: Vec<RunningRoute>,
    /// Routes a reload removed, until their pairs are gone.
    removed: TaskTracker,
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
        let metrics = Arc::new(Metrics::new());
        let mut bound = Vec::with_capacity(config.routes.len());
        let mut tls = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            bound.push(route::bind(route, &workers, false)?);
            tls.push(build_tls(route, &metrics)?);
        }
        let admin_listener = config.admin.map(bind_admin).transpose()?;
        metrics.config_loaded(true);
        let registry = Arc::new(Registry::default());
        let stop_accepting = CancellationToken::new();
        let mut app = App {
            admin_state: Arc::new(AdminState {
                draining: stop_accepting.clone(),
                routes: ArcSwap::from_pointee(Vec::new()),
                registry: registry.clone(),
                metrics: metrics.clone(),
            }),
            stop_accepting,
            stop_admin: CancellationToken::new(),
            admin: TaskTracker::new(),
            admin_listener: None,
            kill_pairs: CancellationToken::new(),
            services: TaskTracker::new(),
            pairs: TaskTracker::new(),
            metrics,
            registry,
            ids: Arc::new(AtomicU64::new(1)),
            routes: Vec::new(),
            removed: TaskTracker::new(),
            workers,
            config: config.clone(),
        };
        if let Some(listener) = admin_listener {
            app.serve_admin(listener);
        }
        for ((route, bound), tls) in config.routes.into_iter().zip(bound).zip(tls) {
            let state = app.route_state(route, tls);
            let running = RunningRoute::start(state, bound, &app.spawner());
            app.routes.push(running);
        }
        app.publish_routes();
        Ok(app)
    }

    fn spawner(&self) -> route::Spawner<'_> {
        route::Spawner {
            workers: &self.workers,
            services: &self.services,
            pairs: &self.pairs,
            stop_accepting: &self.stop_accepting,
        }
    }

    fn route_state(&self, route: Route, tls: Option<Box<RouteTls>>) -> Arc<RouteState> {
        let pool = Arc::new(Pool::new(
            &route.name,
            &route.upstream,
            self.metrics.clone(),
        ));
        Arc::new(RouteState::new(
            route,
            pool,
            tls,
            &self.metrics,
            self.ids.clone(),
            self.registry.clone(),
            self.kill_pairs.child_token(),
        ))
    }

    /// Shows the running routes on the admin endpoint.
    fn publish_routes(&self) {
        let routes = self
            .routes
            .iter()
            .map(|r| (r.state.clone(), r.bound))
            .collect();
        self.admin_state.routes.store(Arc::new(routes));
    }

    /// Serves the admin endpoint on `listener`, after stopping the one before.
    fn serve_admin(&mut self, (configured, listener): (SocketAddr, TcpListener)) {
        if let Some((_, old)) = self.admin_listener.take() {
            old.cancel();
        }
        let stop = self.stop_admin.child_token();
        self.admin.spawn(admin::serve(
            listener,
            self.admin_state.clone(),
            stop.clone(),
        ));
        self.admin_listener = Some((configured, stop));
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
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
        // A removed route's pairs already count down their grace; they are
        // pairs like any other from here on.
        self.removed.close();
        self.services.close();
        self.services.wait().await;
        self.pairs.close();
        let live = self.pairs.len();
        let grace = self.config.shutdown_grace;
        tracing::info!(live_pairs = live, grace = %fmt_duration(grace), "draining");
        let drained = tokio::time::timeout(grace, self.pairs.wait()).await.is_ok();
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
