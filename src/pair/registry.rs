//! Live pairs, for `/connections`: which sockets each pair owns, so a request
//! can read TCP_INFO from them at that moment.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::net::TcpStream;

use super::relay::RelayStats;
use crate::net::sockopt::{self, SocketSnapshot};

#[derive(Debug)]
struct Entry {
    route: Arc<str>,
    client: RawFd,
    upstream: Option<RawFd>,
    stats: Arc<RelayStats>,
}

/// Every live pair of the process.
///
/// Descriptor numbers are only used while the lock is held, and a pair
/// unregisters (taking the lock) before its sockets are closed, so a number
/// read here always names the pair's own, still open socket.
#[derive(Debug, Default)]
pub struct Registry {
    pairs: Mutex<HashMap<u64, Entry>>,
}

/// Removes the pair from the registry when dropped; dropped before the sockets.
#[derive(Debug)]
pub struct Registration<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Registration<'_> {
    /// Records the upstream socket once connected.
    pub fn set_upstream(&self, upstream: &TcpStream) {
        if let Some(e) = self.registry.lock().get_mut(&self.id) {
            e.upstream = Some(upstream.as_raw_fd());
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// One side of a live pair as `/connections` shows it.
#[derive(Debug, Serialize)]
pub struct SideView {
    /// The peer's address.
    pub address: Option<String>,
    /// kaproxy's local address on this socket.
    pub local_address: Option<String>,
    /// TCP_INFO and keepalive settings now.
    #[serde(flatten)]
    pub tcp: Option<SocketSnapshot>,
    /// Why they could not be read, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A live pair as `/connections` shows it.
#[derive(Debug, Serialize)]
pub struct PairView {
    /// Pair id, as in the logs.
    pub id: u64,
    /// Route name.
    pub route: String,
    /// Milliseconds since accept.
    pub age_ms: u64,
    /// Milliseconds since the last byte relayed either way.
    pub idle_ms: u64,
    /// Bytes written to the upstream.
    pub bytes_client_to_upstream: u64,
    /// Bytes written to the client.
    pub bytes_upstream_to_client: u64,
    /// The client side.
    pub client: SideView,
    /// The upstream side; absent while connecting.
    pub upstream: Option<SideView>,
}

fn side_view(fd: RawFd) -> SideView {
    let (peer, local) = sockopt::addresses(fd).unwrap_or((None, None));
    let snap = sockopt::snapshot(fd);
    SideView {
        address: peer.map(|a| a.to_string()),
        local_address: local.map(|a| a.to_string()),
        tcp: snap.as_ref().ok().cloned(),
        error: snap.err().map(|e| e.to_string()),
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // Entries are plain data; a panic elsewhere cannot leave one half-written.
        self.pairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a pair by its client socket.
    pub fn register<'a>(
        &'a self,
        id: u64,
        route: Arc<str>,
        client: &TcpStream,
        stats: Arc<RelayStats>,
    ) -> Registration<'a> {
        self.lock().insert(
            id,
            Entry {
                route,
                client: client.as_raw_fd(),
                upstream: None,
                stats,
            },
        );
        Registration { registry: self, id }
    }

    /// Up to `limit` live pairs (of `route` if given), oldest first, with TCP_INFO
    /// read now; and how many more matched.
    pub fn snapshot(&self, route: Option<&str>, limit: usize) -> (Vec<PairView>, usize) {
        let pairs = self.lock();
        let mut ids: Vec<u64> = pairs
            .iter()
            .filter(|(_, e)| route.is_none_or(|r| &*e.route == r))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let more = ids.len().saturating_sub(limit);
        let views = ids
            .into_iter()
            .take(limit)
            .filter_map(|id| {
                let e = pairs.get(&id)?;
                Some(PairView {
                    id,
                    route: e.route.to_string(),
                    age_ms: e.stats.age().as_millis() as u64,
                    idle_ms: e.stats.idle().as_millis() as u64,
                    bytes_client_to_upstream: e
                        .stats
                        .client_to_upstream
                        .load(std::sync::atomic::Ordering::Relaxed),
                    bytes_upstream_to_client: e
                        .stats
                        .upstream_to_client
                        .load(std::sync::atomic::Ordering::Relaxed),
                    client: side_view(e.client),
                    upstream: e.upstream.map(side_view),
                })
            })
            .collect();
        (views, more)
    }
}
