//! One running route: its listeners (one per worker), accept loops and
//! health checks, started at launch or by a reload.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Weak};

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::StartError;
use crate::config::Route;
use crate::health;
use crate::net::sockopt;
use crate::pair::{accept, LiveRoute, RouteState};
use crate::workers::Workers;

type Listener = AsyncFd<std::net::TcpListener>;

/// A route's listening sockets, one per worker in worker order, bound and
/// registered, not yet accepting.
pub(super) struct Bound {
    copies: Vec<Arc<Listener>>,
    /// The address they got (port 0 resolved).
    pub(super) addr: SocketAddr,
    /// Taken over from a route that leaves the address in the same reload:
    /// they still carry that route's client options.
    adopted: bool,
}

/// Binds `route.listen` once per worker with the client options on each copy,
/// and checks the upstream options, so that a bad address or option fails
/// here, before anything changes.
///
/// `shared_with_self`: see [`sockopt::bind_listeners`].
pub(super) fn bind(
    route: &Route,
    workers: &Workers,
    shared_with_self: bool,
) -> Result<Bound, StartError> {
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
        shared_with_self,
    )
    .map_err(fail(listening()))?;
    let addr = std_listeners[0].local_addr().map_err(fail(listening()))?;
    // Each copy is registered with the reactor of the worker that will accept on it.
    let mut copies = Vec::with_capacity(std_listeners.len());
    for (std_listener, worker) in std_listeners.into_iter().zip(workers.handles()) {
        let _on_worker = worker.enter();
        copies.push(Arc::new(
            sockopt::watch_listener(std_listener).map_err(fail(listening()))?,
        ));
    }
    verify_upstream(route)?;
    Ok(Bound {
        copies,
        addr,
        adopted: false,
    })
}

/// Sets and reads back the route's upstream options on throw-away sockets.
pub(super) fn verify_upstream(route: &Route) -> Result<(), StartError> {
    sockopt::verify_upstream_options(&route.upstream.keepalive).map_err(|source| StartError {
        route: format!("route \"{}\"", route.name),
        what: "cannot set the upstream socket options".to_string(),
        source,
    })
}

/// What a route's tasks are spawned with.
pub(super) struct Spawner<'a> {
    pub(super) workers: &'a Workers,
    pub(super) services: &'a TaskTracker,
    pub(super) pairs: &'a TaskTracker,
    pub(super) stop_accepting: &'a CancellationToken,
}

/// A route that accepts.
#[derive(Debug)]
pub(super) struct RunningRoute {
    pub(super) state: Arc<RouteState>,
    /// Where its listeners are bound.
    pub(super) bound: SocketAddr,
    /// Stops its accept loops.
    stop: CancellationToken,
    /// Stops the health checks of its current pool.
    health: CancellationToken,
    /// Its listeners, owned by the accept loops; reached here only to retune
    /// the client options a new client inherits.
    listeners: Vec<Weak<Listener>>,
}

impl RunningRoute {
    /// Starts accepting on `bound` and checking the route's servers.
    pub(super) fn start(state: Arc<RouteState>, bound: Bound, with: &Spawner<'_>) -> RunningRoute {
        let mut running = RunningRoute {
            state,
            bound: bound.addr,
            stop: with.stop_accepting.child_token(),
            health: with.stop_accepting.child_token(),
            listeners: Vec::new(),
        };
        running.accept_on(bound, with);
        running.check_health(with);
        running
    }

    /// Accepts on `bound` from now on; the listeners it accepted on before
    /// (a changed `listen`) close once their loops have stopped.
    pub(super) fn accept_on(&mut self, bound: Bound, with: &Spawner<'_>) {
        let live = self.state.live();
        if bound.adopted {
            for listener in &bound.copies {
                if let Err(e) = sockopt::retune(listener.get_ref(), &live.route.client.keepalive) {
                    tracing::error!(route = %self.state.name, error = %e, "cannot set the client keepalive on the listening sockets taken over; new clients keep the settings of the route that had them");
                }
            }
            // Clients in the backlog were queued under the old route's options.
            self.state
                .client_options_epoch
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        let servers: Vec<String> = live
            .route
            .upstream
            .servers
            .iter()
            .map(|s| s.addr.to_string())
            .collect();
        tracing::info!(route = %self.state.name, address = %bound.addr, servers = %servers.join(","), "route listening");
        let old = std::mem::replace(&mut self.stop, with.stop_accepting.child_token());
        self.bound = bound.addr;
        self.listeners.clear();
        let open = Arc::new(AtomicUsize::new(bound.copies.len()));
        for (listener, worker) in bound.copies.into_iter().zip(with.workers.handles()) {
            self.listeners.push(Arc::downgrade(&listener));
            worker.spawn(with.services.track_future(accept::accept_loop(
                listener,
                open.clone(),
                self.state.clone(),
                self.stop.clone(),
                with.pairs.clone(),
            )));
        }
        old.cancel();
    }

    /// Starts the health checks of the route's current pool, after stopping
    /// those of the pool before it.
    pub(super) fn check_health(&mut self, with: &Spawner<'_>) {
        let old = std::mem::replace(&mut self.health, with.stop_accepting.child_token());
        old.cancel();
        let live: Arc<LiveRoute> = self.state.live_full();
        let Some(check) = live.route.upstream.health_check.clone() else {
            return;
        };
        for index in 0..live.pool.servers.len() {
            with.services.spawn(health::run(
                live.pool.clone(),
                index,
                check.clone(),
                live.route.upstream.keepalive,
                live.route.upstream.send_proxy,
                live.tls.as_ref().and_then(|t| t.health_check(index)),
                self.health.clone(),
            ));
        }
    }

    /// Sets the client keepalive on the route's listeners, which pass it on
    /// to every client accepted from now on. Returns the first failure.
    pub(super) fn retune_listeners(&self, route: &Route) -> std::io::Result<()> {
        for listener in self.listeners.iter().filter_map(Weak::upgrade) {
            sockopt::retune(listener.get_ref(), &route.client.keepalive)?;
        }
        Ok(())
    }

    /// The route's listeners, for a route that takes over its address in the
    /// same reload (a rename, or two routes trading addresses): binding anew
    /// would fail while these are open. `None` if one has closed already.
    pub(super) fn hand_over(&self) -> Option<Bound> {
        let copies: Option<Vec<Arc<Listener>>> = self.listeners.iter().map(Weak::upgrade).collect();
        copies.filter(|c| !c.is_empty()).map(|copies| Bound {
            copies,
            addr: self.bound,
            adopted: true,
        })
    }

    /// Stops the accept loops only (their listeners were handed over).
    pub(super) fn stop_accepting(&self) {
        self.stop.cancel();
    }

    /// Stops accepting and checking; live pairs are left alone.
    pub(super) fn stop(&self) {
        self.stop.cancel();
        self.health.cancel();
    }
}
