//! A live pair's sockets, reached by descriptor number from the pair
//! registry: TCP_INFO and the options in force for `/connections`, and the
//! keepalive a reload sets on them. Every function here relies on the
//! registry's contract (see [`snapshot`]).

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;

use super::{raw, read_keepalive, retune};
use crate::config::KeepaliveSpec;

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
pub(super) fn tcp_state_name(state: u8) -> &'static str {
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
