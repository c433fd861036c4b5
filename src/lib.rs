//! kaproxy: a TCP forwarding proxy that applies its own keepalive settings to the
//! client side and the upstream side of every connection, and tears down the
//! whole pair as soon as either side fails its probes.
//!
//! Layout:
//! - [`certs`]: certificate and key files: PEM loading, key matches certificate, names and expiry.
//! - [`config`]: TOML → validated [`config::Config`] (raw serde layer, inheritance, kernel range checks).
//! - [`telemetry`]: log output and the Prometheus series (the ground floor: everything records into it).
//! - [`net`]: socket options (the only socket2 user), upstream connects, splice.
//! - [`pool`], [`balance`], [`health`]: a route's servers, how they are chosen, active checks.
//! - [`pair`]: accept loops and one task per connection pair: relay with half-close, watchdog, close reasons.
//! - [`admin`]: the hyper admin endpoint (renders metrics, lists pairs), `kaproxy status`.
//! - [`probe`]: `kaproxy probe`, which measures the idle timeout of the path to a server.
//! - [`workers`]: the worker threads, one single-threaded runtime each, where pairs live.
//! - [`fdlimit`]: RLIMIT_NOFILE against what the routes' max_connections need.
//! - [`app`]: wires routes to listeners, applies reloads and owns the shutdown path.
//! - [`watch`]: notices that the configuration file changed (`run --watch`).
//! - [`tls`]: rustls configs built once per route, handshakes on the raw sockets, session info.
//! - [`cli`]: the command line, used by the binary.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod certs;
pub mod cli;
pub mod config;
pub mod fdlimit;
pub mod health;
pub mod net;
pub mod pair;
pub mod pool;
pub mod probe;
pub mod telemetry;
pub mod tls;
pub mod watch;
pub mod workers;
