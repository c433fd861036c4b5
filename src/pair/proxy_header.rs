//! Receiving a PROXY header on an accepted socket, and sending one upstream.
//!
//! The header is read without ever taking a byte after it: the socket is
//! peeked (MSG_PEEK) until the parser sees a whole header, and then exactly
//! the header's length is read. Whatever the client sent after it stays in the
//! socket for the relay (or, later, the TLS handshake).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::SendProxy;
use crate::net::proxy_protocol::{self, Header, ParseError, Parsed, Version};
use crate::net::sockopt;

/// Peek buffer to start with: a v1 header of any length and a v2 header with
/// IPv6 addresses and 200 bytes of TLVs fit; a longer v2 header grows it to
/// its announced length (at most [`proxy_protocol::MAX_LEN`]).
const FIRST_PEEK: usize = 256;

/// Why no header was received.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The bytes were not a valid header.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The client ended the connection before a whole header.
    #[error("the client closed the connection after {0} bytes, before a whole PROXY header")]
    Closed(usize),
    /// The header did not arrive in time.
    #[error("no whole PROXY header within {} ({received} bytes received)", humantime::format_duration(*.within))]
    Timeout {
        /// proxy_protocol_timeout.
        within: Duration,
        /// Bytes that had arrived.
        received: usize,
    },
    /// The socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Receives the PROXY header at the start of `client`, within `timeout`.
pub async fn receive(client: &TcpStream, timeout: Duration) -> Result<Header, HeaderError> {
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut seen = 0usize;
    let read = async {
        let (header, len) = loop {
            let ready = client.ready(Interest::READABLE).await?;
            // A peek that sees no more than the last one leaves the socket
            // readable in tokio's eyes (its readiness is edge-triggered and
            // only cleared by WouldBlock), so it answers WouldBlock itself:
            // that clears readiness, and the next wait is for new bytes. The
            // same bytes after the client's FIN mean no more will come.
            let peeked = client.try_io(Interest::READABLE, || {
                let n = sockopt::peek(client, &mut buf)?;
                if n == seen && n != 0 {
                    if ready.is_read_closed() {
                        return Ok(0);
                    }
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            let n = match peeked {
                Ok(0) => return Err(HeaderError::Closed(seen)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            };
            seen = n;
            match proxy_protocol::parse(&buf[..n])? {
                Parsed::Complete { header, len } => break (header, len),
                Parsed::Incomplete { total: Some(total) } if total > buf.len() => {
                    buf.resize(total, 0)
                }
                Parsed::Incomplete { .. } => {}
            }
        };
        // The header's bytes are in the socket (just peeked): take exactly those.
        let mut taken = 0;
        while taken < len {
            match client.try_read(&mut buf[taken..len]) {
                Ok(0) => return Err(HeaderError::Closed(taken)),
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => client.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(header)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(HeaderError::Timeout {
            within: timeout,
            received: seen,
        }),
    }
}

/// The header to send for a pair from `source` whose client connected to `destination`.
pub fn encode(version: SendProxy, source: SocketAddr, destination: SocketAddr) -> Option<Vec<u8>> {
    let version = match version {
        SendProxy::Off => return None,
        SendProxy::V1 => Version::V1,
        SendProxy::V2 => Version::V2,
    };
    Some(proxy_protocol::encode(version, Some((source, destination))))
}

/// Writes `header` to a freshly connected upstream socket. Its send buffer is
/// empty and far larger than any header, so this is one write(2).
pub async fn send(upstream: &TcpStream, header: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < header.len() {
        upstream.writable().await?;
        match upstream.try_write(&header[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
