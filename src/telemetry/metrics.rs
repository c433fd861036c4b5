//! `kaproxy_*` Prometheus metrics, labelled by route (and server, reason, side,
//! direction where they apply). Encoded by prometheus-client, never by hand.
//!
//! This sits at the bottom of the house: pairs and pools record into it, the
//! admin endpoint only renders it. It knows label values, not what they mean:
//! the close reasons and sides are handed in by name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    route: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    route: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    route: String,
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsFailureLabels {
    route: String,
    side: &'static str,
    reason: &'static str,
}

#[derive(Clone)]
struct Buckets(fn() -> Histogram);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        (self.0)()
    }
}

/// Pair lifetimes: 10 ms to about 11 hours.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// Dead-peer detection: 0.5 s to about 2.3 hours (the sysctl defaults' 2 h 11 min fit).
fn detection_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.5, 2.0, 15))
}

/// `kaproxy_bytes_total` of one route, counted as bytes are relayed so that
/// long-lived pairs show their traffic while it flows.
#[derive(Debug, Clone, Default)]
pub struct RouteBytes {
    /// Written to the upstream.
    pub client_to_upstream: Counter,
    /// Written to the client.
    pub upstream_to_client: Counter,
}

/// The series of one route, resolved once when the route starts.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    active: Gauge,
    accepted: Counter,
    /// One counter per close reason, in the order the reasons were given.
    closed: Box<[Counter]>,
    duration: Histogram,
    detection: [Histogram; 2],
    /// Byte counters, which the relay adds to as it writes.
    pub bytes: RouteBytes,
    /// 1 while every slot of the route's `max_connections` is taken.
    pub at_limit: Gauge,
    /// Times the route took its last free slot.
    pub limit_reached: Counter,
}

impl RouteMetrics {
    /// A client connection was accepted.
    pub fn pair_opened(&self) {
        self.accepted.inc();
        self.active.inc();
    }

    /// A pair ended with the reason at `reason` (an index into the names given
    /// to [`Metrics::route`]); `detection`: the dead side's index and the time
    /// since it last sent data.
    pub fn pair_closed(&self, reason: usize, seconds: f64, detection: Option<(usize, f64)>) {
        self.active.dec();
        if let Some(c) = self.closed.get(reason) {
            c.inc();
        }
        self.duration.observe(seconds);
        if let Some(h) = detection.and_then(|(side, secs)| Some((self.detection.get(side)?, secs)))
        {
            h.0.observe(h.1);
        }
    }
}

/// All metrics of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pairs_active: Family<RouteLabel, Gauge>,
    pairs_accepted: Family<RouteLabel, Counter>,
    pairs_closed: Family<ReasonLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    connect_failures: Family<ServerLabels, Counter>,
    upstream_up: Family<ServerLabels, Gauge>,
    pair_duration: Family<RouteLabel, Histogram, Buckets>,
    detection: Family<SideLabels, Histogram, Buckets>,
    at_limit: Family<RouteLabel, Gauge>,
    limit_reached: Family<RouteLabel, Counter>,
    tls_failures: Family<TlsFailureLabels, Counter>,
    log_dropped: Counter,
    reloads: Family<ResultLabel, Counter>,
    last_reload_success: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Buckets")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under the `kaproxy` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kaproxy");
        let m = Metrics {
            pairs_active: Family::default(),
            pairs_accepted: Family::default(),
            pairs_closed: Family::default(),
            bytes: Family::default(),
            connect_failures: Family::default(),
            upstream_up: Family::default(),
            pair_duration: Family::new_with_constructor(Buckets(duration_buckets)),
            detection: Family::new_with_constructor(Buckets(detection_buckets)),
            at_limit: Family::default(),
            limit_reached: Family::default(),
            tls_failures: Family::default(),
            log_dropped: Counter::default(),
            reloads: Family::default(),
            last_reload_success: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "pairs_active",
            "Connection pairs open now",
            m.pairs_active.clone(),
        );
        registry.register(
            "pairs_accepted",
            "Client connections accepted",
            m.pairs_accepted.clone(),
        );
        registry.register(
            "pairs_closed",
            "Pairs closed, by close reason",
            m.pairs_closed.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed, by direction, counted as they are written",
            m.bytes.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed connect attempts to an upstream server",
            m.connect_failures.clone(),
        );
        registry.register(
            "upstream_up",
            "1 when the server may get new connections (healthy and not ejected), else 0",
            m.upstream_up.clone(),
        );
        registry.register(
            "pair_duration_seconds",
            "Lifetime of closed pairs",
            m.pair_duration.clone(),
        );
        registry.register(
            "dead_peer_detection_seconds",
            "Time from the last thing heard from a side (its last ACK) to the moment its death was declared",
            m.detection.clone(),
        );
        registry.register(
            "route_at_limit",
            "1 while the route holds max_connections live pairs and accepts no more (clients wait in the listen backlog), else 0",
            m.at_limit.clone(),
        );
        registry.register(
            "route_limit_reached",
            "Times the route reached max_connections (took its last free slot)",
            m.limit_reached.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out, by side and a small stable reason (timeout, closed, certificate, negotiation, alert, protocol)",
            m.tls_failures.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stdout could not keep up (the queue was full)",
            m.log_dropped.clone(),
        );
        for result in ["ok", "rejected"] {
            let _ = m.reloads.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP or --watch), by result: ok, or rejected whole (the running configuration kept serving)",
            m.reloads.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (Unix time): at start, then at each successful reload",
            m.last_reload_success.clone(),
        );
        registry.register(
            "build",
            "kaproxy build information",
            Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        let dropped = super::dropped_log_lines();
        let seen = self.log_dropped.get();
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn route_label(route: &str) -> RouteLabel {
        RouteLabel {
            route: route.to_string(),
        }
    }

    /// The TLS handshake failure counters of one route and side, one per
    /// reason in the order given; made only for a side that has TLS.
    pub fn tls_handshake_failures(
        &self,
        route: &str,
        side: &'static str,
        reasons: &[&'static str],
    ) -> Box<[Counter]> {
        reasons
            .iter()
            .map(|&reason| {
                self.tls_failures
                    .get_or_create(&TlsFailureLabels {
                        route: route.to_string(),
                        side,
                        reason,
                    })
                    .clone()
            })
            .collect()
    }

    /// Every series of one route, created now (at zero, so that alert rules
    /// and `rate()` see them before the first event) and resolved once, so
    /// that a pair records without hashing labels or allocating.
    ///
    /// `reasons` are the close reasons' label values and `sides` the two
    /// sides', in the order [`RouteMetrics::pair_closed`] refers to them.
    pub fn route(
        &self,
        route: &str,
        reasons: &[&'static str],
        sides: [&'static str; 2],
    ) -> RouteMetrics {
        let name = || route.to_string();
        let closed = reasons
            .iter()
            .map(|&reason| {
                self.pairs_closed
                    .get_or_create(&ReasonLabels {
                        route: name(),
                        reason,
                    })
                    .clone()
            })
            .collect();
        let detection = sides.map(|side| {
            self.detection
                .get_or_create(&SideLabels {
                    route: name(),
                    side,
                })
                .clone()
        });
        let bytes = |direction| {
            self.bytes
                .get_or_create(&DirectionLabels {
                    route: name(),
                    direction,
                })
                .clone()
        };
        RouteMetrics {
            active: self
                .pairs_active
                .get_or_create(&Self::route_label(route))
                .clone(),
            accepted: self
                .pairs_accepted
                .get_or_create(&Self::route_label(route))
                .clone(),
            closed,
            duration: self
                .pair_duration
                .get_or_create(&Self::route_label(route))
                .clone(),
            detection,
            bytes: RouteBytes {
                client_to_upstream: bytes("client_to_upstream"),
                upstream_to_client: bytes("upstream_to_client"),
            },
            at_limit: self
                .at_limit
                .get_or_create(&Self::route_label(route))
                .clone(),
            limit_reached: self
                .limit_reached
                .get_or_create(&Self::route_label(route))
                .clone(),
        }
    }

    /// A reload was applied (`ok`) or rejected, now.
    pub fn config_loaded(&self, ok: bool) {
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_reload_success.set(now);
        }
    }

    /// Counts a reload by its result.
    pub fn reload_done(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
        self.config_loaded(ok);
    }

    /// A reload removed `server` from `route`: its series go.
    pub fn forget_server(&self, route: &str, server: &str) {
        let labels = ServerLabels {
            route: route.to_string(),
            server: server.to_string(),
        };
        self.upstream_up.remove(&labels);
        self.connect_failures.remove(&labels);
    }

    /// A route a reload removed has no pair left, and no route has its name:
    /// every series of it goes, so that renamed routes do not pile up in
    /// /metrics. `reasons` and `sides` as for [`Metrics::route`].
    /// `tls_reasons`: the TLS handshake failure reasons' label values.
    pub fn forget_route(
        &self,
        route: &str,
        reasons: &[&'static str],
        sides: [&'static str; 2],
        tls_reasons: &[&'static str],
    ) {
        let label = Self::route_label(route);
        self.pairs_active.remove(&label);
        self.pairs_accepted.remove(&label);
        self.pair_duration.remove(&label);
        self.at_limit.remove(&label);
        self.limit_reached.remove(&label);
        for &reason in reasons {
            self.pairs_closed.remove(&ReasonLabels {
                route: route.to_string(),
                reason,
            });
        }
        for side in sides {
            self.detection.remove(&SideLabels {
                route: route.to_string(),
                side,
            });
            for &reason in tls_reasons {
                self.tls_failures.remove(&TlsFailureLabels {
                    route: route.to_string(),
                    side,
                    reason,
                });
            }
        }
        for direction in ["client_to_upstream", "upstream_to_client"] {
            self.bytes.remove(&DirectionLabels {
                route: route.to_string(),
                direction,
            });
        }
    }

    /// A connect attempt to `server` failed.
    pub fn connect_failed(&self, route: &str, server: &str) {
        self.connect_failures
            .get_or_create(&ServerLabels {
                route: route.to_string(),
                server: server.to_string(),
            })
            .inc();
    }

    /// Sets whether `server` may get new connections.
    pub fn set_upstream_up(&self, route: &str, server: &str, up: bool) {
        self.upstream_up
            .get_or_create(&ServerLabels {
                route: route.to_string(),
                server: server.to_string(),
            })
            .set(i64::from(up));
    }
}
