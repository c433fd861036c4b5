//! Live pairs, for `/connections`: which sockets each pair owns, so a request
//! can read TCP_INFO from them at that moment.
//!
//! Pairs register and unregister on the runtime workers, so nothing here may
//! make them wait behind a `/connections` request:
//! - the map is split into shards by pair id, and a shard is only locked to
//!   insert, remove or clone entry handles, never while a socket is read;
//! - each entry has its own lock over its descriptor numbers. A pair clears
//!   them under that lock before it closes its sockets, and a reader uses them
//!   only under that lock and only while they are still set. A number is thus
//!   never used once the pair could have closed it, when the kernel may already
//!   have given it to another socket. A closing pair waits at most for the read
//!   of its own two sockets.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use serde::Serialize;
use tokio::net::TcpStream;

use super::close::Side;
use super::relay::RelayStats;
use crate::net::sockopt::{self, SocketSnapshot};
use crate::tls::SessionInfo;

/// Shards of the pair map: enough that pairs opening and closing on a few
/// workers rarely meet on one lock.
const SHARDS: usize = 32;

/// A descriptor number, or none (-1): half the size of an `Option<RawFd>`,
/// and an entry's size is paid by every idle pair.
#[derive(Debug, Clone, Copy)]
struct FdSlot(RawFd);

impl FdSlot {
    const NONE: FdSlot = FdSlot(-1);

    fn get(self) -> Option<RawFd> {
        (self.0 >= 0).then_some(self.0)
    }
}

impl Default for FdSlot {
    fn default() -> FdSlot {
        FdSlot::NONE
    }
}

/// The descriptor numbers of a pair's sockets, none once the pair may close them.
#[derive(Debug, Default)]
struct Fds {
    client: FdSlot,
    upstream: FdSlot,
    /// What only some pairs have; boxed, so an entry without it pays a null pointer.
    extra: Option<Box<Extra>>,
    /// Wakes the pair's task, so that it looks at a reload's new timers.
    /// Here rather than a wait in the task: the task's size is what every
    /// idle pair costs.
    waker: Option<Waker>,
}

/// The rarer facts of a pair.
#[derive(Debug, Default)]
struct Extra {
    /// The client a PROXY header named, shown instead of the socket's peer,
    /// and that peer (`via`).
    proxied: Option<(SocketAddr, SocketAddr)>,
    /// The TLS session of each side that has one.
    tls: [Option<SessionInfo>; 2],
}

#[derive(Debug)]
struct Entry {
    id: u64,
    route: Arc<str>,
    /// The pair's counters live here rather than in an allocation of their own:
    /// the pair reads and writes them through [`PairStats`].
    stats: RelayStats,
    fds: Mutex<Fds>,
}

/// A pair's own handle to its counters, which the registry shares.
#[derive(Debug, Clone)]
pub struct PairStats(Arc<Entry>);

impl std::ops::Deref for PairStats {
    type Target = RelayStats;

    fn deref(&self) -> &RelayStats {
        &self.0.stats
    }
}

/// Every live pair of the process.
#[derive(Debug)]
pub struct Registry {
    shards: [Mutex<HashMap<u64, Arc<Entry>>>; SHARDS],
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

/// Entries and descriptor numbers are plain data that no panic can leave
/// half-written, so a poisoned lock is still good to use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes the pair from the registry when dropped; dropped before the sockets.
#[derive(Debug)]
pub struct Registration<'a> {
    registry: &'a Registry,
    entry: Arc<Entry>,
}

impl Registration<'_> {
    /// The pair's counters, fresh at registration.
    pub fn stats(&self) -> PairStats {
        PairStats(self.entry.clone())
    }

    /// Records the original client a PROXY header named, and the directly
    /// connected peer, then shown as `via`.
    pub fn set_proxied_client(&self, client: SocketAddr, via: SocketAddr) {
        lock(&self.entry.fds)
            .extra
            .get_or_insert_with(Box::default)
            .proxied = Some((client, via));
    }

    /// The directly connected peer, when a PROXY header named another client.
    pub fn via(&self) -> Option<SocketAddr> {
        lock(&self.entry.fds)
            .extra
            .as_ref()
            .and_then(|e| e.proxied)
            .map(|p| p.1)
    }

    /// Records the TLS session of `side` once its handshake is done.
    pub fn set_tls(&self, side: Side, info: SessionInfo) {
        lock(&self.entry.fds)
            .extra
            .get_or_insert_with(Box::default)
            .tls[side as usize] = Some(info);
    }

    /// Records the task to wake when a reload changes the pair's timers: the
    /// task that calls this, which runs the pair to its end.
    pub fn set_waker(&self, waker: &Waker) {
        lock(&self.entry.fds).waker = Some(waker.clone());
    }

    /// Records the upstream socket once connected.
    pub fn set_upstream(&self, upstream: &TcpStream) {
        lock(&self.entry.fds).upstream = FdSlot(upstream.as_raw_fd());
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // First, and under the entry's lock: once this returns, no reader holds or
        // can take the numbers, so the pair may close its sockets.
        *lock(&self.entry.fds) = Fds::default();
        lock(self.registry.shard(self.entry.id)).remove(&self.entry.id);
    }
}

/// What [`Registry::retune_route`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retuned {
    /// Sockets that now hold the new settings, read back.
    pub updated: usize,
    /// Sockets that had died (or closed) meanwhile.
    pub skipped: usize,
    /// Sockets that refused the settings or read back something else.
    pub failed: usize,
    /// The last such failure.
    pub last_error: Option<String>,
}

/// One side of a live pair as `/connections` shows it.
#[derive(Debug, Serialize)]
pub struct SideView {
    /// The peer's address: for a client, the one its PROXY header named.
    pub address: Option<String>,
    /// The directly connected peer, when a PROXY header named another client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// kaproxy's local address on this socket.
    pub local_address: Option<String>,
    /// TCP_INFO and keepalive settings now.
    #[serde(flatten)]
    pub tcp: Option<SocketSnapshot>,
    /// Why they could not be read, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The TLS session on this side: version, cipher suite, SNI, ALPN and,
    /// with mutual TLS, the client certificate's subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<SessionInfo>,
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

/// Only called with a number read under its entry's lock, which is still held.
fn side_view(fd: RawFd) -> SideView {
    let (peer, local) = sockopt::addresses(fd).unwrap_or((None, None));
    let snap = sockopt::snapshot(fd);
    SideView {
        address: peer.map(|a| a.to_string()),
        via: None,
        local_address: local.map(|a| a.to_string()),
        tcp: snap.as_ref().ok().cloned(),
        error: snap.err().map(|e| e.to_string()),
        tls: None,
    }
}

impl Entry {
    /// Reads the pair's sockets now; `None` if it has unregistered since it was listed.
    fn view(&self) -> Option<PairView> {
        let fds = lock(&self.fds);
        let mut client = side_view(fds.client.get()?);
        if let Some(proxied) = fds.extra.as_ref().and_then(|e| e.proxied) {
            client.via = client.address.replace(proxied.0.to_string());
        }
        let mut upstream = fds.upstream.get().map(side_view);
        if let Some(tls) = fds.extra.as_ref().map(|e| &e.tls) {
            client.tls = tls[Side::Client as usize].clone();
            if let Some(u) = upstream.as_mut() {
                u.tls = tls[Side::Upstream as usize].clone();
            }
        }
        drop(fds);
        let stats = &self.stats;
        Some(PairView {
            id: self.id,
            route: self.route.to_string(),
            age_ms: stats.age().as_millis() as u64,
            idle_ms: stats.idle().as_millis() as u64,
            bytes_client_to_upstream: stats.client_to_upstream.load(Ordering::Relaxed),
            bytes_upstream_to_client: stats.upstream_to_client.load(Ordering::Relaxed),
            client,
            upstream,
        })
    }
}

/// Orders entries by id, for picking the oldest pairs.
struct ById(Arc<Entry>);

impl PartialEq for ById {
    fn eq(&self, other: &ById) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl PartialOrd for ById {
    fn partial_cmp(&self, other: &ById) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById {
    fn cmp(&self, other: &ById) -> CmpOrdering {
        self.0.id.cmp(&other.0.id)
    }
}

/// Pairs picked for one `/connections` answer; their sockets are read by [`Listing::read`].
#[derive(Debug)]
pub struct Listing {
    entries: Vec<Arc<Entry>>,
    more: usize,
}

impl Listing {
    /// How many more pairs matched than were picked.
    pub fn more(&self) -> usize {
        self.more
    }

    /// Reads the picked pairs' sockets one pair at a time, oldest first, leaving out
    /// pairs that have closed since they were picked. Makes blocking system calls
    /// (two sockets per pair): run it off the runtime workers.
    pub fn read(self) -> impl Iterator<Item = PairView> {
        self.entries.into_iter().filter_map(|e| e.view())
    }
}

impl Registry {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Entry>>> {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// Registers a pair by its client socket.
    pub fn register<'a>(
        &'a self,
        id: u64,
        route: Arc<str>,
        client: &TcpStream,
    ) -> Registration<'a> {
        let entry = Arc::new(Entry {
            id,
            route,
            stats: RelayStats::new(),
            fds: Mutex::new(Fds {
                client: FdSlot(client.as_raw_fd()),
                upstream: FdSlot::NONE,
                extra: None,
                waker: None,
            }),
        });
        lock(self.shard(id)).insert(id, entry.clone());
        Registration {
            registry: self,
            entry,
        }
    }

    /// The live pairs of `route`, for a reload to act on. Locks each shard
    /// only to clone the handles.
    ///
    /// A route is known by its name's allocation, not its text: a route that
    /// a reload removed and another that took its name are different routes.
    fn of_route(&self, route: &Arc<str>) -> Vec<Arc<Entry>> {
        let mut found = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            found.extend(
                shard
                    .values()
                    .filter(|e| Arc::ptr_eq(&e.route, route))
                    .cloned(),
            );
        }
        found
    }

    /// How many pairs of `route` are live.
    pub fn count_route(&self, route: &Arc<str>) -> usize {
        self.shards
            .iter()
            .map(|s| {
                lock(s)
                    .values()
                    .filter(|e| Arc::ptr_eq(&e.route, route))
                    .count()
            })
            .sum()
    }

    /// Wakes every live pair of `route`, so that each looks at the route's
    /// settings again (a reload changed its timers).
    pub fn wake_route(&self, route: &Arc<str>) {
        for e in self.of_route(route) {
            let waker = lock(&e.fds).waker.clone();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// Sets `spec` on the `side` socket of every live pair of `route` and
    /// reads it back. A socket that has died meanwhile (or whose pair closed
    /// since it was listed) is skipped. Makes blocking system calls, one
    /// pair at a time under that pair's lock: run it off the runtime workers.
    pub fn retune_route(
        &self,
        route: &Arc<str>,
        side: super::close::Side,
        spec: &crate::config::KeepaliveSpec,
    ) -> Retuned {
        let mut done = Retuned::default();
        for e in self.of_route(route) {
            let fds = lock(&e.fds);
            let fd = match side {
                super::close::Side::Client => fds.client.get(),
                super::close::Side::Upstream => fds.upstream.get(),
            };
            let Some(fd) = fd else { continue };
            // Only under the entry's lock: see the module comment. A reset
            // socket still takes options without an error: look first.
            if !sockopt::is_connected_fd(fd) {
                done.skipped += 1;
                continue;
            }
            match sockopt::retune_fd(fd, spec) {
                Ok(()) => done.updated += 1,
                Err(e) if sockopt::is_gone(&e) => done.skipped += 1,
                Err(e) => {
                    done.failed += 1;
                    done.last_error = Some(e.to_string());
                }
            }
        }
        done
    }

    /// Picks up to `limit` live pairs (of `route` if given), oldest first, and
    /// counts how many more matched. Reads no socket; shards are locked one at a
    /// time, so this is not an instant picture across shards, only of each pair.
    pub fn list(&self, route: Option<&str>, limit: usize) -> Listing {
        // A max-heap of the lowest ids seen: memory follows `limit`, not the number of pairs.
        let mut oldest: BinaryHeap<ById> = BinaryHeap::new();
        let mut matched = 0usize;
        for shard in &self.shards {
            let shard = lock(shard);
            for e in shard.values() {
                if route.is_some_and(|r| *e.route != *r) {
                    continue;
                }
                matched += 1;
                if oldest.len() < limit {
                    oldest.push(ById(e.clone()));
                } else if let Some(mut newest) = oldest.peek_mut() {
                    if e.id < newest.0.id {
                        *newest = ById(e.clone());
                    }
                }
            }
        }
        let entries: Vec<Arc<Entry>> = oldest.into_sorted_vec().into_iter().map(|e| e.0).collect();
        Listing {
            more: matched - entries.len(),
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected loopback pair of tokio streams.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn ids(listing: Listing) -> (Vec<u64>, usize) {
        let more = listing.more();
        (listing.read().map(|p| p.id).collect(), more)
    }

    #[tokio::test]
    async fn lists_the_oldest_pairs_of_a_route_up_to_the_limit() {
        let registry = Registry::default();
        let mut sockets = Vec::new();
        for _ in 0..4 {
            sockets.push(socket_pair().await);
        }
        // Ids out of order and in different shards.
        let pairs = [(70, "web"), (5, "web"), (38, "web"), (6, "db")];
        let regs: Vec<_> = pairs
            .iter()
            .zip(&sockets)
            .map(|(&(id, route), (client, _))| registry.register(id, Arc::from(route), client))
            .collect();
        assert_eq!(ids(registry.list(None, 10)), (vec![5, 6, 38, 70], 0));
        assert_eq!(ids(registry.list(None, 2)), (vec![5, 6], 2));
        assert_eq!(ids(registry.list(Some("web"), 2)), (vec![5, 38], 1));
        assert_eq!(ids(registry.list(Some("db"), 0)), (vec![], 1));
        assert_eq!(ids(registry.list(Some("none"), 10)), (vec![], 0));
        drop(regs);
        assert_eq!(ids(registry.list(None, 10)), (vec![], 0));
    }

    #[tokio::test]
    async fn a_pair_closed_after_being_listed_is_not_read() {
        let registry = Registry::default();
        let (client, _peer) = socket_pair().await;
        let (upstream, _up_peer) = socket_pair().await;
        let reg = registry.register(1, Arc::from("web"), &client);
        reg.set_upstream(&upstream);
        let listing = registry.list(None, 10);
        let still = registry.list(None, 10);
        drop(reg);
        // Closing the sockets frees their numbers for the next socket opened.
        drop((client, upstream));
        let _reuse = socket_pair().await;
        assert_eq!(listing.read().count(), 0);
        assert_eq!(still.more(), 0);

        let (client, _peer) = socket_pair().await;
        let reg = registry.register(2, Arc::from("web"), &client);
        let views: Vec<PairView> = registry.list(None, 10).read().collect();
        assert_eq!(views.len(), 1);
        let v = &views[0];
        assert_eq!(
            v.client.local_address,
            client.local_addr().ok().map(|a| a.to_string())
        );
        assert!(v.client.error.is_none() && v.upstream.is_none());
        drop(reg);
    }

    #[test]
    fn other_pairs_come_and_go_while_a_reader_holds_an_entry() {
        let registry = Arc::new(Registry::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (client, _peer) = rt.block_on(socket_pair());
        let client = Arc::new(client);
        let reg = registry.register(9, Arc::from("web"), &client);
        let listing = registry.list(None, 10);
        let reading = lock(&listing.entries[0].fds);
        let (done, finished) = std::sync::mpsc::channel();
        let (r, c) = (registry.clone(), client.clone());
        std::thread::spawn(move || {
            for id in 10..10 + SHARDS as u64 {
                drop(r.register(id, Arc::from("web"), &c));
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("registering other pairs waited on the entry being read");
        drop(reading);
        drop(reg);
        assert_eq!(listing.read().count(), 0);
        assert_eq!(ids(registry.list(None, 10)), (vec![], 0));
    }
}
