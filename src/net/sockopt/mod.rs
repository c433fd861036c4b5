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
use std::net::Shutdown;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::KeepaliveSpec;

mod live;
mod open;
mod raw;

pub use live::*;
pub use open::*;

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
        peer_closed: live::tcp_state_name(info.tcpi_state) == "close_wait",
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

/// Why a connect that became ready with an error or hang-up failed (SO_ERROR).
pub fn connect_error(socket: &impl std::os::fd::AsFd) -> io::Error {
    match SockRef::from(socket).take_error() {
        Ok(Some(e)) => e,
        Ok(None) => io::ErrorKind::ConnectionRefused.into(),
        Err(e) => e,
    }
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
