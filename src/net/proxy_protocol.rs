//! The PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy's
//! doc/proxy-protocol.txt specifies them: a pure parser and encoder, bytes in
//! and bytes out, no I/O.
//!
//! [`parse`] looks only at the bytes it is given and says how long the header
//! is, so the caller can peek at a socket, parse, and then read exactly that
//! many bytes: nothing after the header is ever consumed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The start of every v1 header.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 header the spec allows, CRLF included ("PROXY UNKNOWN" with two
/// full IPv6 addresses and ports is 104; the spec rounds up to 107).
pub const V1_MAX_LEN: usize = 107;
/// v2 fixed part: signature, version/command, family, length.
const V2_FIXED_LEN: usize = 16;
/// Largest v2 address and TLV block accepted. The spec allows 65,535 bytes;
/// what load balancers send is far smaller (AWS NLB: addresses plus a VPC
/// endpoint id TLV of about 30 bytes; HAProxy's SSL TLVs a few hundred). 4 KiB
/// leaves room for client certificate names and the like while bounding what a
/// pair buffers before it is anything but a socket.
pub const V2_MAX_PAYLOAD: usize = 4096;
/// Longest header [`parse`] accepts, of either version.
pub const MAX_LEN: usize = V2_FIXED_LEN + V2_MAX_PAYLOAD;

/// Which version a header was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Text.
    V1,
    /// Binary.
    V2,
}

impl Version {
    /// "v1" or "v2", as the configuration spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Its version.
    pub version: Version,
    /// The original client (source) and the address it connected to
    /// (destination). `None` for a v2 LOCAL command (a balancer's own health
    /// check), v1 UNKNOWN, and v2 families without TCP/UDP addresses: the
    /// connection's own endpoints apply then, as the spec says.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Number of v2 TLVs that were skipped (0 for v1).
    pub tlvs: usize,
}

/// What [`parse`] made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning of a header; more bytes are needed. `total` is the
    /// header's full length once it is known (v2 after 16 bytes).
    Incomplete {
        /// The full header length, when known.
        total: Option<usize>,
    },
    /// A whole header of `len` bytes, the first `len` bytes of the input.
    Complete {
        /// The header.
        header: Header,
        /// Its length in bytes; the stream's own data starts right after.
        len: usize,
    },
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The bytes start with neither signature.
    #[error("no PROXY protocol header: the connection starts with {0}")]
    NotProxy(String),
    /// A header longer than the spec (v1) or kaproxy (v2) accepts.
    #[error("PROXY header too long: {0}")]
    Oversized(String),
    /// The signature is there but the rest is wrong.
    #[error("malformed PROXY {version} header: {problem}")]
    Malformed {
        /// "v1" or "v2".
        version: &'static str,
        /// What is wrong.
        problem: String,
    },
}

fn v1_err(problem: impl Into<String>) -> ParseError {
    ParseError::Malformed {
        version: "v1",
        problem: problem.into(),
    }
}

fn v2_err(problem: impl Into<String>) -> ParseError {
    ParseError::Malformed {
        version: "v2",
        problem: problem.into(),
    }
}

/// Parses the header at the start of `buf`, detecting the version.
///
/// Reads nothing past the header: the returned length never exceeds the
/// header, whatever follows it in `buf`. An incomplete input that can no
/// longer become a valid header is an error at once (a wrong first byte, a
/// bad character), so a client that speaks another protocol fails fast.
pub fn parse(buf: &[u8]) -> Result<Parsed, ParseError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        if buf.len() < V2_SIGNATURE.len() {
            return Ok(Parsed::Incomplete { total: None });
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        if buf.len() < V1_PREFIX.len() {
            return Ok(Parsed::Incomplete { total: None });
        }
        return parse_v1(buf);
    }
    Err(ParseError::NotProxy(describe_start(buf)))
}

/// The first bytes, for an error message, escaped.
fn describe_start(buf: &[u8]) -> String {
    let shown: String = buf[..buf.len().min(16)]
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    format!("\"{shown}\"")
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    // Every byte up to the CRLF must be one a valid line can hold, so that
    // garbage fails now rather than when the timeout runs out.
    let mut end = None;
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => {
                match window.get(i + 1) {
                    Some(b'\n') => {
                        end = Some(i);
                        break;
                    }
                    Some(_) => return Err(v1_err("a CR not followed by LF")),
                    None => {} // the LF may still come
                }
            }
            b'\n' => return Err(v1_err("a line feed without a carriage return before it")),
            b' ' | b'.' | b':' | b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'Z' => {}
            other => {
                return Err(v1_err(format!(
                    "byte 0x{other:02x} at offset {i} cannot be part of a header line"
                )))
            }
        }
    }
    let Some(end) = end else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ParseError::Oversized(format!(
                "no CRLF within the first {V1_MAX_LEN} bytes of a v1 header"
            )));
        }
        return Ok(Parsed::Incomplete { total: None });
    };
    let len = end + 2;
    // Only the ASCII bytes checked above are in here.
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end]).map_err(|_| v1_err("not ASCII"))?;
    let header = |addresses| Parsed::Complete {
        header: Header {
            version: Version::V1,
            addresses,
            tlvs: 0,
        },
        len,
    };
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.first().copied() {
        // "PROXY UNKNOWN" may be followed by anything up to the CRLF; the
        // receiver ignores it and uses the connection's own addresses.
        Some("UNKNOWN") => return Ok(header(None)),
        Some("TCP4") | Some("TCP6") => {}
        Some(other) => {
            return Err(v1_err(format!(
                "protocol {other:?} is none of TCP4, TCP6, UNKNOWN"
            )))
        }
        None => return Err(v1_err("empty")),
    }
    if fields.len() != 5 {
        return Err(v1_err(format!(
            "{} fields after PROXY where the protocol, two addresses and two ports make 5 (single spaces only)",
            fields.len()
        )));
    }
    let v6 = fields[0] == "TCP6";
    let ip = |s: &str, what: &str| -> Result<IpAddr, ParseError> {
        if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        }
        .map_err(|_| v1_err(format!("{what} {s:?} is not an {} address", fields[0])))
    };
    let port = |s: &str, what: &str| -> Result<u16, ParseError> {
        // Decimal without leading zeros, as the spec writes them.
        let ok = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        let leading_zero = s.len() > 1 && s.starts_with('0');
        match s.parse::<u16>() {
            Ok(p) if ok && !leading_zero => Ok(p),
            _ => Err(v1_err(format!(
                "{what} {s:?} is not a port (0 to 65535, no leading zeros)"
            ))),
        }
    };
    let src = SocketAddr::new(
        ip(fields[1], "source address")?,
        port(fields[3], "source port")?,
    );
    let dst = SocketAddr::new(
        ip(fields[2], "destination address")?,
        port(fields[4], "destination port")?,
    );
    Ok(header(Some((src, dst))))
}

/// v2 commands (low nibble of byte 12).
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;

fn parse_v2(buf: &[u8]) -> Result<Parsed, ParseError> {
    if let Some(&ver_cmd) = buf.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(v2_err(format!(
                "version {} where 2 is expected",
                ver_cmd >> 4
            )));
        }
        if !matches!(ver_cmd & 0x0f, CMD_LOCAL | CMD_PROXY) {
            return Err(v2_err(format!("unknown command 0x{:x}", ver_cmd & 0x0f)));
        }
    }
    if let Some(&fam) = buf.get(13) {
        // High nibble: UNSPEC, INET, INET6, UNIX; low nibble: UNSPEC, STREAM, DGRAM.
        if fam >> 4 > 3 || fam & 0x0f > 2 {
            return Err(v2_err(format!(
                "unknown address family/protocol 0x{fam:02x}"
            )));
        }
    }
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::Incomplete { total: None });
    }
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(ParseError::Oversized(format!(
            "a v2 header announcing {payload} bytes of addresses and TLVs, more than the {V2_MAX_PAYLOAD} kaproxy accepts"
        )));
    }
    let total = V2_FIXED_LEN + payload;
    if buf.len() < total {
        return Ok(Parsed::Incomplete { total: Some(total) });
    }
    let block = &buf[V2_FIXED_LEN..total];
    let done = |addresses, tlvs| {
        Ok(Parsed::Complete {
            header: Header {
                version: Version::V2,
                addresses,
                tlvs,
            },
            len: total,
        })
    };
    // LOCAL: the connection was made by the sender itself (a health check);
    // the receiver must ignore whatever block follows and use the real endpoints.
    if buf[12] & 0x0f == CMD_LOCAL {
        return done(None, 0);
    }
    let fam = buf[13];
    let (addresses, used) = match fam >> 4 {
        // INET: 4+4 address bytes, 2+2 port bytes.
        1 => {
            need(block, 12, "IPv4")?;
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[o],
                    block[o + 1],
                    block[o + 2],
                    block[o + 3],
                ))
            };
            let src = SocketAddr::new(ip(0), u16::from_be_bytes([block[8], block[9]]));
            let dst = SocketAddr::new(ip(4), u16::from_be_bytes([block[10], block[11]]));
            (Some((src, dst)), 12)
        }
        // INET6: 16+16 address bytes, 2+2 port bytes.
        2 => {
            need(block, 36, "IPv6")?;
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&block[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let src = SocketAddr::new(ip(0), u16::from_be_bytes([block[32], block[33]]));
            let dst = SocketAddr::new(ip(16), u16::from_be_bytes([block[34], block[35]]));
            (Some((src, dst)), 36)
        }
        // UNIX: 108+108 path bytes, which no TCP peer can use.
        3 => {
            need(block, 216, "UNIX")?;
            (None, 216)
        }
        // UNSPEC: no addresses; the real endpoints apply.
        _ => (None, 0),
    };
    let tlvs = skip_tlvs(&block[used..])?;
    done(addresses, tlvs)
}

fn need(block: &[u8], n: usize, family: &str) -> Result<(), ParseError> {
    if block.len() < n {
        return Err(v2_err(format!(
            "{} bytes of addresses where {family} needs {n}",
            block.len()
        )));
    }
    Ok(())
}

/// Walks the TLVs (type, 2-byte length, value) that follow the addresses,
/// checking that each fits; returns how many there were.
fn skip_tlvs(mut rest: &[u8]) -> Result<usize, ParseError> {
    let mut count = 0;
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(v2_err(format!(
                "{} stray bytes after the last TLV, too few for a TLV header",
                rest.len()
            )));
        }
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        if rest.len() < 3 + len {
            return Err(v2_err(format!(
                "TLV of type 0x{:02x} announces {len} bytes, only {} are left in the header",
                rest[0],
                rest.len() - 3
            )));
        }
        rest = &rest[3 + len..];
        count += 1;
    }
    Ok(count)
}

/// Both addresses in one family: IPv4 when both are (or map to) IPv4, else
/// both as IPv6 (an IPv4 address as its IPv4-mapped form).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canon(src), canon(dst));
    if s.is_ipv4() && d.is_ipv4() {
        return (s, d);
    }
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    (v6(s), v6(d))
}

/// A v1 header. `None`: "PROXY UNKNOWN", which tells the receiver to use the
/// connection's own addresses.
pub fn encode_v1(addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let Some((src, dst)) = addresses else {
        return b"PROXY UNKNOWN\r\n".to_vec();
    };
    let (src, dst) = same_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 header without TLVs. `None`: the LOCAL command with no addresses,
/// which is what a sender's own connections (health checks) carry.
pub fn encode_v2(addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    let Some((src, dst)) = addresses else {
        // Version 2, LOCAL; UNSPEC; no address block.
        out.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return out;
    };
    let (src, dst) = same_family(src, dst);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // Version 2, PROXY; INET, STREAM; 12 bytes.
            out.extend_from_slice(&[0x21, 0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(ip) => ip,
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            };
            // Version 2, PROXY; INET6, STREAM; 36 bytes.
            out.extend_from_slice(&[0x21, 0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// A header of `version`.
pub fn encode(version: Version, addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    match version {
        Version::V1 => encode_v1(addresses),
        Version::V2 => encode_v2(addresses),
    }
}

#[cfg(test)]
mod tests;
