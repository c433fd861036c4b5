//! The sockets kaproxy opens: listeners (one per worker, client options set
//! on them for every accepted socket to inherit), accepted sockets, and
//! upstream sockets with their options set before connect.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use super::{apply_and_verify, raw, set_side};
use crate::config::KeepaliveSpec;

/// Listen backlog: enough for bursts of new connections; the kernel caps it at somaxconn.
pub const LISTEN_BACKLOG: i32 = 4096;

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
