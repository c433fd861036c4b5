//! Why a pair ended, and the one function that maps an I/O error to that reason.

use std::fmt;
use std::io;

/// Which side of a pair something happened on. The discriminants index
/// per-side arrays (metrics, watchdogs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The connection accepted from a client.
    Client = 0,
    /// The connection kaproxy opened to a server.
    Upstream = 1,
}

impl Side {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }

    /// The opposite side.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// An I/O error together with the side whose socket produced it.
#[derive(Debug)]
pub struct SideError {
    /// The failing side.
    pub side: Side,
    /// What the socket reported.
    pub error: io::Error,
}

impl fmt::Display for SideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} side: {}", self.side.as_str(), self.error)
    }
}

/// Exactly one of these ends every pair. The snake_case names are stable: they
/// appear in logs and will label metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Both directions reached end of stream.
    Completed,
    /// The client failed keepalive probes or TCP_USER_TIMEOUT (ETIMEDOUT), or became unreachable.
    ClientDead,
    /// The upstream failed keepalive probes or TCP_USER_TIMEOUT, or became unreachable.
    UpstreamDead,
    /// The client reset the connection (ECONNRESET, EPIPE, or ENOTCONN once reset).
    ClientReset,
    /// The upstream reset the connection.
    UpstreamReset,
    /// Any other error on the client socket.
    ClientError,
    /// Any other error on the upstream socket.
    UpstreamError,
    /// No byte in either direction for `idle_timeout`.
    IdleTimeout,
    /// One direction ended and the other did not within `half_close_timeout`.
    HalfCloseTimeout,
    /// No upstream server accepted a connection.
    ConnectFailed,
    /// The client was alive but accepted no data for its `stall_timeout`.
    ClientStalled,
    /// The upstream was alive but accepted no data for its `stall_timeout`.
    UpstreamStalled,
    /// The client's PROXY header was missing, malformed, too long or late.
    ClientProtocolError,
    /// kaproxy shut down before the pair finished.
    Shutdown,
    /// A configuration reload removed the pair's route, and the pair had not
    /// finished within `shutdown_grace`.
    RouteRemoved,
    /// The TLS handshake with the client failed or timed out.
    ClientTlsError,
    /// The TLS handshake with the upstream failed or timed out.
    UpstreamTlsError,
}

impl CloseReason {
    /// Every reason, in a fixed order ([`CloseReason::index`]).
    pub const ALL: [CloseReason; 17] = [
        CloseReason::Completed,
        CloseReason::ClientDead,
        CloseReason::UpstreamDead,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::ClientError,
        CloseReason::UpstreamError,
        CloseReason::IdleTimeout,
        CloseReason::HalfCloseTimeout,
        CloseReason::ConnectFailed,
        CloseReason::ClientStalled,
        CloseReason::UpstreamStalled,
        CloseReason::ClientProtocolError,
        CloseReason::Shutdown,
        CloseReason::RouteRemoved,
        CloseReason::ClientTlsError,
        CloseReason::UpstreamTlsError,
    ];

    /// Position in [`CloseReason::ALL`].
    pub fn index(self) -> usize {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(0)
    }

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Completed => "completed",
            CloseReason::ClientDead => "client_dead",
            CloseReason::UpstreamDead => "upstream_dead",
            CloseReason::ClientReset => "client_reset",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::ClientError => "client_error",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HalfCloseTimeout => "half_close_timeout",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::ClientStalled => "client_stalled",
            CloseReason::UpstreamStalled => "upstream_stalled",
            CloseReason::ClientProtocolError => "client_protocol_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::RouteRemoved => "route_removed",
            CloseReason::ClientTlsError => "client_tls_error",
            CloseReason::UpstreamTlsError => "upstream_tls_error",
        }
    }

    /// `*_dead` for `side`.
    pub fn dead(side: Side) -> CloseReason {
        match side {
            Side::Client => CloseReason::ClientDead,
            Side::Upstream => CloseReason::UpstreamDead,
        }
    }

    /// `*_tls_error` for `side`.
    pub fn tls_error(side: Side) -> CloseReason {
        match side {
            Side::Client => CloseReason::ClientTlsError,
            Side::Upstream => CloseReason::UpstreamTlsError,
        }
    }

    /// The side whose TLS handshake failed. That socket is closed with FIN,
    /// not RST, so that the alert kaproxy sent (unknown CA, ...) reaches the
    /// peer instead of being thrown away with the send queue.
    pub fn tls_failed_side(self) -> Option<Side> {
        match self {
            CloseReason::ClientTlsError => Some(Side::Client),
            CloseReason::UpstreamTlsError => Some(Side::Upstream),
            _ => None,
        }
    }

    /// `*_stalled` for `side`.
    pub fn stalled(side: Side) -> CloseReason {
        match side {
            Side::Client => CloseReason::ClientStalled,
            Side::Upstream => CloseReason::UpstreamStalled,
        }
    }

    /// Whether the pair was cut by kaproxy itself (a timer, shutdown or a
    /// removed route) while a stream may still have been under way: such a
    /// close always resets, so that no peer takes the cut for a complete stream.
    pub fn is_cut(self) -> bool {
        matches!(
            self,
            CloseReason::HalfCloseTimeout
                | CloseReason::Shutdown
                | CloseReason::RouteRemoved
                | CloseReason::ClientStalled
                | CloseReason::UpstreamStalled
        )
    }

    /// The side a `*_dead` reason declares dead, from whose last data the
    /// detection time is measured.
    pub fn dead_side(self) -> Option<Side> {
        match self {
            CloseReason::ClientDead => Some(Side::Client),
            CloseReason::UpstreamDead => Some(Side::Upstream),
            _ => None,
        }
    }

    /// Whether the reason is a failure of one side, after which the other side
    /// is closed per `on_peer_failure`.
    pub fn failed_side(self) -> Option<Side> {
        match self {
            CloseReason::ClientDead
            | CloseReason::ClientReset
            | CloseReason::ClientError
            | CloseReason::ClientProtocolError
            | CloseReason::ClientTlsError => Some(Side::Client),
            CloseReason::UpstreamDead
            | CloseReason::UpstreamReset
            | CloseReason::UpstreamError
            | CloseReason::ConnectFailed
            | CloseReason::UpstreamTlsError => Some(Side::Upstream),
            _ => None,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error to blame on `side` after an operation on `socket` failed with
/// `error`: the socket's pending error (SO_ERROR) when it has one, since that is
/// the cause (ECONNRESET, ETIMEDOUT) where the call's own error is only a
/// consequence (EPIPE, ENOTCONN).
pub fn blame(side: Side, socket: &tokio::net::TcpStream, error: io::Error) -> SideError {
    let error = match socket.take_error() {
        Ok(Some(pending)) => pending,
        _ => error,
    };
    SideError { side, error }
}

/// Maps a side's I/O error to a close reason.
///
/// ETIMEDOUT is what the kernel reports when keepalive probes go unanswered or
/// TCP_USER_TIMEOUT expires; unreachable errors come from ICMP while probing.
/// Both mean the peer is gone without a word: `*_dead`.
pub fn classify(err: &SideError) -> CloseReason {
    let dead = matches!(
        err.error.raw_os_error(),
        Some(
            libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
        )
    );
    // ENOTCONN: the connection is already gone (a reset whose SO_ERROR was
    // consumed elsewhere); a FIN never causes it.
    let reset = matches!(
        err.error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    );
    match (err.side, dead, reset) {
        (Side::Client, true, _) => CloseReason::ClientDead,
        (Side::Upstream, true, _) => CloseReason::UpstreamDead,
        (Side::Client, false, true) => CloseReason::ClientReset,
        (Side::Upstream, false, true) => CloseReason::UpstreamReset,
        (Side::Client, false, false) => CloseReason::ClientError,
        (Side::Upstream, false, false) => CloseReason::UpstreamError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(side: Side, errno: i32) -> CloseReason {
        classify(&SideError {
            side,
            error: io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn errno_maps_to_reason_per_side() {
        assert_eq!(os(Side::Client, libc::ETIMEDOUT), CloseReason::ClientDead);
        assert_eq!(
            os(Side::Upstream, libc::ETIMEDOUT),
            CloseReason::UpstreamDead
        );
        assert_eq!(
            os(Side::Upstream, libc::EHOSTUNREACH),
            CloseReason::UpstreamDead
        );
        assert_eq!(os(Side::Client, libc::ECONNRESET), CloseReason::ClientReset);
        assert_eq!(os(Side::Upstream, libc::EPIPE), CloseReason::UpstreamReset);
        assert_eq!(
            os(Side::Upstream, libc::ENOTCONN),
            CloseReason::UpstreamReset
        );
        assert_eq!(os(Side::Client, libc::EINVAL), CloseReason::ClientError);
        assert_eq!(
            os(Side::Upstream, libc::ENOBUFS),
            CloseReason::UpstreamError
        );
    }

    #[test]
    fn every_reason_has_its_own_index() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
    }

    #[test]
    fn names_are_stable_snake_case() {
        assert_eq!(CloseReason::HalfCloseTimeout.as_str(), "half_close_timeout");
        assert_eq!(CloseReason::ConnectFailed.to_string(), "connect_failed");
        assert_eq!(
            CloseReason::ClientProtocolError.as_str(),
            "client_protocol_error"
        );
        assert_eq!(
            CloseReason::ClientProtocolError.failed_side(),
            Some(Side::Client)
        );
        assert_eq!(CloseReason::ClientDead.failed_side(), Some(Side::Client));
        assert_eq!(CloseReason::Completed.failed_side(), None);
        assert_eq!(CloseReason::ClientTlsError.as_str(), "client_tls_error");
        assert_eq!(CloseReason::UpstreamTlsError.as_str(), "upstream_tls_error");
        assert_eq!(
            CloseReason::UpstreamTlsError.failed_side(),
            Some(Side::Upstream)
        );
        assert_eq!(
            CloseReason::tls_error(Side::Client).tls_failed_side(),
            Some(Side::Client)
        );
    }
}
