//! The only module that sets socket options. Everything goes through socket2,
//! and an option we promise that the kernel refuses is an error, never a warning.
//!
//! Linux semantics relied on (tcp(7)):
//! - TCP_KEEPIDLE / TCP_KEEPINTVL are whole seconds, TCP_KEEPCNT a count; the
//!   config layer has already refused values the kernel would round or reject.
//! - TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged; it is the
//!   only thing that notices a dead peer while data is in flight, because the
//!   keepalive timer does not run while retransmissions are pending.
//! - SO_LINGER with a zero timeout makes close() send RST instead of FIN.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::KeepaliveSpec;

/// Listen backlog: enough for bursts of new connections; the kernel caps it at somaxconn.
const LISTEN_BACKLOG: i32 = 4096;

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

/// Applies one side's keepalive spec and TCP_NODELAY, then reads the values back:
/// a socket that does not hold what the config promised is an error.
pub fn apply_side<S>(socket: &S, spec: &KeepaliveSpec) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    let sock = SockRef::from(socket);
    sock.set_tcp_nodelay(true)?;
    sock.set_keepalive(spec.enabled)?;
    if spec.enabled {
        let params = TcpKeepalive::new()
            .with_time(spec.idle)
            .with_interval(spec.interval)
            .with_retries(spec.probes);
        sock.set_tcp_keepalive(&params)?;
    }
    sock.set_tcp_user_timeout(spec.effective_user_timeout())?;

    let got = read_keepalive(socket)?;
    let user_timeout_ok = got.user_timeout == spec.effective_user_timeout();
    let keepalive_ok = got.enabled == spec.enabled
        && (!spec.enabled
            || (got.idle == spec.idle
                && got.interval == spec.interval
                && got.probes == spec.probes));
    if !(user_timeout_ok && keepalive_ok) {
        return Err(io::Error::other(format!(
            "socket options did not stick: asked for {spec:?}, kernel holds {got:?}"
        )));
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

/// Makes the next close() send RST (SO_LINGER 0), so the peer sees a broken
/// connection instead of a clean end of stream it might take for a full response.
pub fn reset_on_close<S>(socket: &S) -> io::Result<()>
where
    S: std::os::fd::AsFd,
{
    SockRef::from(socket).set_linger(Some(Duration::ZERO))
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
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // "[::]:port" means IPv6 only here, so "0.0.0.0:port" can be a separate route.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A non-blocking socket for `addr` with the upstream options already applied,
/// so that keepalive and TCP_USER_TIMEOUT cover the connection from its SYN on.
pub fn upstream_socket(
    addr: SocketAddr,
    spec: &KeepaliveSpec,
) -> io::Result<tokio::net::TcpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    apply_side(&socket, spec)?;
    let std_stream: std::net::TcpStream = socket.into();
    Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
}
