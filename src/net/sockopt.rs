//! The only module that sets socket options. Everything goes through socket2,
//! and an option we promise that the kernel refuses is an error, never a warning.
//!
//! Linux semantics relied on (tcp(7)):
//! - TCP_KEEPIDLE / TCP_KEEPINTVL are whole seconds, TCP_KEEPCNT a count; the
//!   config layer has already refused values the kernel would round or reject.
//! - The keepalive timer does not run while sent data is unacknowledged or
//!   queued, so a peer that vanishes with data in flight is found from TCP_INFO
//!   instead (see `pair::watchdog`). TCP_USER_TIMEOUT is left at 0: since Linux
//!   5.11 it also ends connections whose peer answers zero-window probes but
//!   does not read, and with keepalive it replaces the probe count.
//! - SO_LINGER with a zero timeout makes close() send RST instead of FIN.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::KeepaliveSpec;

/// Listen backlog: enough for bursts of new connections; the kernel caps it at somaxconn.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Keepalive values read back from a socket with getsockopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedKeepalive {
    /// SO_KEEPALIVE.
    pub enabled: bool,
    /// TCP_KEEPIDLE.
    pub idle: Duration,
    /// TCP_KEEPINTVL.
    pub interval: Duration,
    /// TCP_KEEPCNT.
    pub probes: u32,
    /// TCP_USER_TIMEOUT, `None` when 0.
    pub user_timeout: Option<Duration>,
}

/// Sets one side's keepalive spec and TCP_NODELAY on a fresh socket: only what
/// differs from a new socket's defaults (keepalive off, Nagle on), without
/// reading back. setsockopt either takes these exact values or fails, and the
/// values were range-checked by the config layer, so a read-back per
/// connection would only cost syscalls; [`apply_and_verify`] does it once per
/// route at start-up instead.
///
/// TCP_USER_TIMEOUT is not set: kaproxy enforces `user_timeout` itself so that
/// a live peer that is slow to read is not taken for dead.
pub fn set_side<S>(socket: &S, spec: &KeepaliveSpec) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    let sock = SockRef::from(socket);
    sock.set_tcp_nodelay(true)?;
    if spec.enabled {
        // set_tcp_keepalive turns SO_KEEPALIVE on itself.
        let params = TcpKeepalive::new()
            .with_time(spec.idle)
            .with_interval(spec.interval)
            .with_retries(spec.probes);
        sock.set_tcp_keepalive(&params)?;
    }
    Ok(())
}

/// [`set_side`], then reads every value back: a kernel that silently holds
/// something else than the config promised is an error, caught at start-up.
pub fn apply_and_verify<S>(socket: &S, spec: &KeepaliveSpec) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    set_side(socket, spec)?;
    let got = read_keepalive(socket)?;
    let nodelay = SockRef::from(socket).tcp_nodelay()?;
    let user_timeout_ok = got.user_timeout.is_none();
    let keepalive_ok = got.enabled == spec.enabled
        && (!spec.enabled
            || (got.idle == spec.idle
                && got.interval == spec.interval
                && got.probes == spec.probes));
    if !(nodelay && user_timeout_ok && keepalive_ok) {
        return Err(io::Error::other(format!(
            "socket options did not stick: asked for {spec:?} with TCP_NODELAY, kernel holds {got:?}, TCP_NODELAY {nodelay}"
        )));
    }
    Ok(())
}

/// Sets and reads back the upstream options on a throw-away socket of each
/// address family, so a kernel that differs fails the start, not the first pair.
pub fn verify_upstream_options(spec: &KeepaliveSpec) -> io::Result<()> {
    for domain in [Domain::IPV4, Domain::IPV6] {
        match Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) {
            Ok(socket) => apply_and_verify(&socket, spec)?,
            // A host without IPv6 cannot have IPv6 upstreams either.
            Err(e) if domain == Domain::IPV6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the keepalive settings actually in force on a socket.
pub fn read_keepalive<S>(socket: &S) -> io::Result<AppliedKeepalive>
where
    S: std::os::fd::AsFd,
{
    let sock = SockRef::from(socket);
    Ok(AppliedKeepalive {
        enabled: sock.keepalive()?,
        idle: sock.tcp_keepalive_time()?,
        interval: sock.tcp_keepalive_interval()?,
        probes: sock.tcp_keepalive_retries()?,
        user_timeout: sock.tcp_user_timeout()?,
    })
}

/// What TCP_INFO says about the data a socket is sending: enough to tell a
/// peer that is silent from one that is alive but not reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendState {
    /// Segments sent and not yet acknowledged (tcpi_unacked).
    pub unacked: u32,
    /// Bytes written by kaproxy and not yet sent (tcpi_notsent_bytes).
    pub notsent: u32,
    /// Bytes the peer has acknowledged over the connection's life (tcpi_bytes_acked).
    pub bytes_acked: u64,
    /// Time since the peer last sent an ACK of any kind, window-probe answers included.
    pub since_last_ack: Duration,
    /// Time since kaproxy last sent a segment carrying data, retransmissions
    /// included (tcpi_last_data_sent).
    pub since_last_send: Duration,
    /// Keepalive or window probes sent and not answered since the last ACK (tcpi_probes).
    pub unanswered_probes: u8,
}

impl SendState {
    /// Whether the socket holds data the peer has not acknowledged yet.
    pub fn outstanding(&self) -> bool {
        self.unacked > 0 || self.notsent > 0
    }
}

/// Reads the sending state of `socket` from TCP_INFO.
pub fn send_state<S>(socket: &S) -> io::Result<SendState>
where
    S: std::os::fd::AsFd,
{
    use std::os::fd::AsRawFd;
    // The borrow of `socket` keeps the descriptor open for the call.
    let (info, _) = raw::tcp_info(socket.as_fd().as_raw_fd())?;
    Ok(SendState {
        since_last_send: Duration::from_millis(u64::from(info.tcpi_last_data_sent)),
        unacked: info.tcpi_unacked,
        notsent: info.tcpi_notsent_bytes,
        bytes_acked: info.tcpi_bytes_acked,
        since_last_ack: Duration::from_millis(u64::from(info.tcpi_last_ack_recv)),
        unanswered_probes: info.tcpi_probes,
    })
}

/// When the peer of a socket was last heard from, per TCP_INFO: what
/// `kaproxy probe` reads to tell an answered keepalive probe from silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerActivity {
    /// Time since the peer last sent an ACK of any kind (tcpi_last_ack_recv).
    pub since_last_ack: Duration,
    /// Time since the peer last sent data (tcpi_last_data_recv).
    pub since_last_data: Duration,
    /// Keepalive probes sent and not answered since the last ACK (tcpi_probes).
    pub unanswered_probes: u8,
    /// The peer has sent its FIN (CLOSE_WAIT), whether or not it was read yet.
    pub peer_closed: bool,
}

impl PeerActivity {
    /// How long nothing has come from the peer: the flow's idle time as a
    /// middlebox sees it, since our side only sends ACKs in answer.
    pub fn idle(&self) -> Duration {
        self.since_last_ack.min(self.since_last_data)
    }
}

/// Reads [`PeerActivity`] from TCP_INFO.
pub fn peer_activity<S>(socket: &S) -> io::Result<PeerActivity>
where
    S: std::os::fd::AsFd,
{
    use std::os::fd::AsRawFd;
    let (info, _) = raw::tcp_info(socket.as_fd().as_raw_fd())?;
    Ok(PeerActivity {
        since_last_ack: Duration::from_millis(u64::from(info.tcpi_last_ack_recv)),
        since_last_data: Duration::from_millis(u64::from(info.tcpi_last_data_recv)),
        unanswered_probes: info.tcpi_probes,
        // CLOSE_WAIT: the peer's FIN arrived (include/net/tcp_states.h).
        peer_closed: tcp_state_name(info.tcpi_state) == "close_wait",
    })
}

/// Sends a keepalive probe now on a connected socket that has been idle for at
/// least a second, and lets the kernel repeat it `count - 1` times `interval`
/// apart while it goes unanswered; after `count` unanswered probes the socket
/// fails with ETIMEDOUT. No application data is sent.
///
/// The order matters. TCP_KEEPINTVL and TCP_KEEPCNT go first, while the timer
/// set by SO_KEEPALIVE is still the long default idle away: a probe sent before
/// they are in place would schedule its repeat on the old interval. Then
/// TCP_KEEPIDLE = 1 s on a socket idle for longer re-arms the timer to fire
/// at once (tcp(7); `tcp_sock_set_keepidle_locked` in the kernel).
pub fn arm_keepalive_probe<S>(socket: &S, interval: Duration, count: u32) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    let sock = SockRef::from(socket);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_interval(interval)
            .with_retries(count),
    )?;
    sock.set_tcp_keepalive(&TcpKeepalive::new().with_time(Duration::from_secs(1)))
}

/// Makes the next close() send RST (SO_LINGER 0), so the peer sees a broken
/// connection instead of a clean end of stream it might take for a full response.
pub fn reset_on_close<S>(socket: &S) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    SockRef::from(socket).set_linger(Some(Duration::ZERO))
}

/// Throws away up to `limit` bytes already received on `socket`, without
/// blocking and without copying them (MSG_TRUNC). Linux answers close() with
/// RST instead of FIN while unread data is queued, so a close meant to be a
/// FIN drains first. Returns whether nothing is left to read.
pub fn discard_unread<S>(socket: &S, limit: usize) -> bool
where
    S: std::os::fd::AsFd,
{
    const CHUNK: usize = 64 * 1024;
    let sock = SockRef::from(socket);
    let mut scratch = vec![std::mem::MaybeUninit::<u8>::uninit(); CHUNK.min(limit.max(1))];
    let mut left = limit;
    loop {
        match sock.recv_with_flags(&mut scratch, libc::MSG_DONTWAIT | libc::MSG_TRUNC) {
            Ok(0) => return true,
            Ok(n) => left = left.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return e.kind() == io::ErrorKind::WouldBlock,
        }
        if left == 0 {
            return false;
        }
    }
}

/// Whether bytes wait in the socket's receive queue (a one-byte MSG_PEEK).
/// splice(2) stops at the urgent mark and answers EAGAIN with data still
/// queued behind it; a read moves past the mark, splice never does.
pub fn has_unread<S>(socket: &S) -> bool
where
    S: std::os::fd::AsFd,
{
    let mut one = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(
        SockRef::from(socket).recv_with_flags(&mut one, libc::MSG_DONTWAIT | libc::MSG_PEEK),
        Ok(1)
    )
}

/// Sends FIN on the write half while the read half stays open (half-close).
pub fn shutdown_write<S>(socket: &S) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    SockRef::from(socket).shutdown(Shutdown::Write)
}

/// Binds a non-blocking listening socket with SO_REUSEADDR, so a restart does not
/// wait for TIME_WAIT sockets of the previous process.
///
/// `client`: the keepalive spec of the route's clients, set (and read back) on
/// the listening socket itself. Linux copies SO_KEEPALIVE, TCP_KEEPIDLE,
/// TCP_KEEPINTVL, TCP_KEEPCNT and TCP_NODELAY into every socket accept()
/// returns, and arms the keepalive timer from the SYN on, so an accepted
/// client costs no setsockopt at all.
pub fn bind_listener(
    addr: SocketAddr,
    client: Option<&KeepaliveSpec>,
) -> io::Result<std::net::TcpListener> {
    listener(addr, client, false)
}

/// `copies` listening sockets on one address, one per worker, with SO_REUSEPORT:
/// the kernel spreads new connections over them by a hash of the addresses.
/// The first binds `addr` (port 0 picks a port); the others bind the port it got.
/// Options as [`bind_listener`], set and read back on each.
///
/// Another process of the same user that also sets SO_REUSEPORT could bind the
/// same port and take a share of the connections, as with HAProxy and nginx
/// `reuseport`; any other holder of the port still makes this fail.
///
/// `shared_with_self`: the only listener on the port is known to be this
/// process's own, leaving it in the same reload (0.0.0.0:P narrowed to
/// 127.0.0.1:P, say): the plain test-bind would fail on it, and SO_REUSEPORT
/// lets both exist until the old one closes.
pub fn bind_listeners(
    addr: SocketAddr,
    client: Option<&KeepaliveSpec>,
    copies: usize,
    shared_with_self: bool,
) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 && !shared_with_self {
        ensure_not_listened_on(addr)?;
    }
    let first = listener(addr, client, true)?;
    let bound = first.local_addr()?;
    let mut all = Vec::with_capacity(copies.max(1));
    all.push(first);
    for _ in 1..copies {
        all.push(listener(bound, client, true)?);
    }
    Ok(all)
}

/// Fails with EADDRINUSE when a socket already listens on `addr`. Binding with
/// SO_REUSEPORT alone would succeed next to another listener that also set it
/// (a second kaproxy started by mistake, say) and silently split the
/// connections between the two processes. A plain bind (SO_REUSEADDR, so
/// TIME_WAIT leftovers of a restart do not count) conflicts with any listener.
fn ensure_not_listened_on(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())
}

fn listener(
    addr: SocketAddr,
    client: Option<&KeepaliveSpec>,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Accepted sockets inherit it: see `start_upstream_connect`.
    socket.set_out_of_band_inline(true)?;
    if addr.is_ipv6() {
        // "[::]:port" means IPv6 only here, so "0.0.0.0:port" can be a separate route.
        socket.set_only_v6(true)?;
    }
    if let Some(spec) = client {
        apply_and_verify(&socket, spec)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A non-blocking, close-on-exec socket for `addr` (one socket() call) with the
/// upstream options already set, so that keepalive covers the connection from
/// its SYN on, and its connect(2) started. The caller waits for writability:
/// Linux reports it once the handshake is done or has failed.
///
/// SO_OOBINLINE here and on the listeners: an urgent byte (MSG_OOB) is then
/// read in its place in the stream and relayed like any other, as RFC 6093
/// advises, instead of being left out of the relayed bytes.
pub fn start_upstream_connect(
    addr: SocketAddr,
    spec: &KeepaliveSpec,
) -> io::Result<std::net::TcpStream> {
    // socket2 adds SOCK_CLOEXEC itself.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    set_side(&socket, spec)
        .and_then(|()| socket.set_out_of_band_inline(true))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot set up socket options: {e}")))?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// Copies up to `buf.len()` bytes that wait on `socket` into `buf` without
/// taking them from the socket (MSG_PEEK), never blocking: WouldBlock when
/// nothing waits, 0 at end of stream. Used to look at a PROXY header before
/// reading exactly its length, so no byte after it is consumed.
pub fn peek<S>(socket: &S, buf: &mut [u8]) -> io::Result<usize>
where
    S: std::os::fd::AsFd,
{
    use std::os::fd::AsRawFd;
    // The borrow of `socket` keeps the descriptor open for the call.
    loop {
        match raw::recv(
            socket.as_fd().as_raw_fd(),
            buf,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        ) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// One accept4(2) on a listening socket, the new socket non-blocking and
/// close-on-exec as it is created (the same single call tokio makes), so that
/// an accept loop can wait for readability itself.
pub fn accept<S>(listener: &S) -> io::Result<(std::net::TcpStream, SocketAddr)>
where
    S: std::os::fd::AsFd,
{
    use std::os::fd::AsRawFd;
    let (socket, addr) = raw::accept4(listener.as_fd().as_raw_fd())?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accept returned a non-IP peer address"))?;
    Ok((socket.into(), addr))
}

/// Registers a listening socket with the current runtime's reactor, so that
/// an accept loop can wait for it to be readable without accepting.
pub fn watch_listener(
    listener: std::net::TcpListener,
) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    raw::register(listener)
}

/// Why a connect that became ready with an error or hang-up failed (SO_ERROR).
pub fn connect_error(socket: &impl std::os::fd::AsFd) -> io::Error {
    match SockRef::from(socket).take_error() {
        Ok(Some(e)) => e,
        Ok(None) => io::ErrorKind::ConnectionRefused.into(),
        Err(e) => e,
    }
}

/// What TCP_INFO and the keepalive options say about one socket right now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SocketSnapshot {
    /// Kernel TCP state, e.g. "established", "close_wait".
    pub state: &'static str,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
    /// Round-trip time variance, microseconds.
    pub rttvar_us: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Retransmissions of the current segment (timeouts in a row).
    pub retransmits: u8,
    /// Retransmitted segments over the connection's life.
    pub total_retrans: u32,
    /// Keepalive (or zero-window) probes sent and unanswered so far.
    pub keepalive_probes_sent: u8,
    /// Milliseconds since data was last received.
    pub last_data_recv_ms: u32,
    /// Milliseconds since an ACK was last received.
    pub last_ack_recv_ms: u32,
    /// Keepalive settings in force, read back from the socket.
    pub keepalive: KeepaliveInForce,
}

/// Keepalive settings in force on a socket: the kernel's, read back, and the
/// two that kaproxy enforces itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeepaliveInForce {
    /// SO_KEEPALIVE.
    pub enabled: bool,
    /// TCP_NODELAY.
    pub nodelay: bool,
    /// TCP_KEEPIDLE in seconds.
    pub idle_s: u64,
    /// TCP_KEEPINTVL in seconds.
    pub interval_s: u64,
    /// TCP_KEEPCNT.
    pub probes: u32,
    /// `user_timeout` as kaproxy enforces it from TCP_INFO, 0 = off. Not read
    /// from the socket: the kernel's TCP_USER_TIMEOUT stays 0 (see the module
    /// docs); the caller fills this in from the route.
    pub user_timeout_ms: u64,
    /// `stall_timeout`, 0 = off; filled in from the route like `user_timeout_ms`.
    pub stall_timeout_ms: u64,
}

/// Reads TCP_INFO and the keepalive options of a socket a live pair owns.
///
/// `fd` must name the pair's socket for the whole call. The pair registry
/// guarantees it: it calls this only while it holds that pair's entry lock and
/// finds the number still set there, and a pair clears the number under that
/// lock before it closes its sockets.
pub fn snapshot(fd: std::os::fd::RawFd) -> io::Result<SocketSnapshot> {
    let (info, _) = raw::tcp_info(fd)?;
    let ka = read_keepalive(&raw::Borrowed(fd))?;
    Ok(SocketSnapshot {
        state: tcp_state_name(info.tcpi_state),
        rtt_us: info.tcpi_rtt,
        rttvar_us: info.tcpi_rttvar,
        unacked: info.tcpi_unacked,
        retransmits: info.tcpi_retransmits,
        total_retrans: info.tcpi_total_retrans,
        keepalive_probes_sent: info.tcpi_probes,
        last_data_recv_ms: info.tcpi_last_data_recv,
        last_ack_recv_ms: info.tcpi_last_ack_recv,
        keepalive: KeepaliveInForce {
            enabled: ka.enabled,
            nodelay: SockRef::from(&raw::Borrowed(fd)).tcp_nodelay()?,
            idle_s: ka.idle.as_secs(),
            interval_s: ka.interval.as_secs(),
            probes: ka.probes,
            user_timeout_ms: 0,
            stall_timeout_ms: 0,
        },
    })
}

/// Sets `spec` on a socket that is already open (a live pair's, or a
/// listener's) and reads it back: unlike [`set_side`], keepalive may have to
/// be turned off, and the values it had before are replaced. Linux applies
/// TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT to an established connection
/// from its next keepalive timer on; a listener passes them on to the
/// sockets it accepts from then on.
pub fn retune<S>(socket: &S, spec: &KeepaliveSpec) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    let sock = SockRef::from(socket);
    if spec.enabled {
        let params = TcpKeepalive::new()
            .with_time(spec.idle)
            .with_interval(spec.interval)
            .with_retries(spec.probes);
        sock.set_tcp_keepalive(&params)?;
    } else {
        sock.set_keepalive(false)?;
    }
    let got = read_keepalive(socket)?;
    let held = got.enabled == spec.enabled
        && (!spec.enabled
            || (got.idle == spec.idle
                && got.interval == spec.interval
                && got.probes == spec.probes));
    if !held {
        return Err(io::Error::other(format!(
            "keepalive did not stick: asked for {spec:?}, the socket holds {got:?}"
        )));
    }
    Ok(())
}

/// [`retune`] on a live pair's socket; same contract on `fd` as [`snapshot`].
pub fn retune_fd(fd: std::os::fd::RawFd, spec: &KeepaliveSpec) -> io::Result<()> {
    retune(&raw::Borrowed(fd), spec)
}

/// Whether a live pair's socket still has a connection (any state but
/// CLOSE, which a reset or a timeout leaves); same contract as [`snapshot`].
pub fn is_connected_fd(fd: std::os::fd::RawFd) -> bool {
    // 7: TCP_CLOSE in the kernel's numbering (see tcp_state_name).
    raw::tcp_info(fd).is_ok_and(|(info, _)| info.tcpi_state != 7)
}

/// Whether a setsockopt failed only because the socket's connection is gone
/// (reset, or closed by the pair meanwhile): nothing to update there.
pub fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::ENOTCONN | libc::ECONNRESET | libc::EINVAL)
    )
}

/// Peer and local address of a socket a live pair owns (same contract as [`snapshot`]).
pub fn addresses(fd: std::os::fd::RawFd) -> io::Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let fd = raw::Borrowed(fd);
    let sock = SockRef::from(&fd);
    Ok((
        sock.peer_addr()?.as_socket(),
        sock.local_addr()?.as_socket(),
    ))
}

/// Names from include/net/tcp_states.h.
fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "established",
        2 => "syn_sent",
        3 => "syn_recv",
        4 => "fin_wait1",
        5 => "fin_wait2",
        6 => "time_wait",
        7 => "close",
        8 => "close_wait",
        9 => "last_ack",
        10 => "listen",
        11 => "closing",
        _ => "unknown",
    }
}

/// The only unsafe code in kaproxy: TCP_INFO has no safe wrapper in socket2,
/// the registry refers to live sockets by descriptor number (a pair owns its
/// sockets and lends the registry nothing it could keep open), socket2 peeks
/// only into uninitialized buffers, and has no accept4 with SOCK_NONBLOCK;
/// tokio's AsyncFd registration.
#[allow(unsafe_code)]
mod raw {
    use std::io;
    use std::os::fd::{AsFd, BorrowedFd, RawFd};

    /// A descriptor number the caller keeps open while this value is in use.
    pub struct Borrowed(pub RawFd);

    impl AsFd for Borrowed {
        fn as_fd(&self) -> BorrowedFd<'_> {
            // SAFETY: `Borrowed` is only made by `snapshot`, `addresses` and
            // `retune_fd`, whose caller (the pair registry) holds the pair's entry lock for the whole
            // call with the number still set; the pair clears it under that lock
            // before closing the socket, so the descriptor stays open and the
            // pair's own while this borrow lives.
            unsafe { BorrowedFd::borrow_raw(self.0) }
        }
    }

    /// recv(2) into `buf` with `flags`.
    pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`, which is initialized
        // and outlives the call; the kernel writes at most `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// AsyncFd::register of a listener (tokio made it unsafe: the descriptor
    /// must stay the registered one until the AsyncFd is dropped).
    pub fn register(
        listener: std::net::TcpListener,
    ) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
        // SAFETY: the AsyncFd takes ownership of the listener, which owns its
        // descriptor; nothing replaces or closes it while registered (the
        // accept loop only borrows it, and dropping the AsyncFd deregisters
        // before the listener closes).
        unsafe { tokio::io::unix::AsyncFd::register(listener) }.map_err(|e| e.into())
    }

    /// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC.
    pub fn accept4(fd: RawFd) -> io::Result<(socket2::Socket, socket2::SockAddr)> {
        use std::os::fd::FromRawFd;
        // SAFETY: try_init hands accept4 storage and a length that describe a
        // sockaddr_storage; accept4 writes at most that length and updates it.
        let (new_fd, addr) = unsafe {
            socket2::SockAddr::try_init(|storage, len| {
                let new_fd = libc::accept4(
                    fd,
                    storage.cast(),
                    len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                );
                if new_fd < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(new_fd)
                }
            })?
        };
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        Ok((unsafe { socket2::Socket::from_raw_fd(new_fd) }, addr))
    }

    /// TCP_INFO and how many bytes of it the kernel filled in (older kernels fill less).
    pub fn tcp_info(fd: RawFd) -> io::Result<(libc::tcp_info, usize)> {
        // SAFETY: tcp_info is plain old data; zeroes are a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the pointer and length describe `info`, which outlives the call;
        // the kernel writes at most `len` bytes. `fd` is open and the pair's own
        // (see `Borrowed`); a wrong number could only fail or read another
        // socket's counters, never write memory.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((info, len as usize))
    }
}
