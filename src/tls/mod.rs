//! TLS with rustls (ring crypto provider): server and client configs built
//! once per route from the resolved config, handshakes on a borrowed raw TCP
//! socket, failure classification, and what `/connections` shows of a session.
//!
//! Knows nothing of routes or pairs. Keepalive and TCP_USER_TIMEOUT stay on
//! the raw socket below; this module only ever reads and writes bytes on it.

use crate::certs as files;
mod raw;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::config::{CaSource, ClientTls, TlsVersion, UpstreamTls};
pub use raw::Raw;

/// A TLS config that cannot be built; names the file where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file.
    #[error(transparent)]
    File(#[from] files::FileError),
    /// rustls refused the settings.
    #[error("{0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        TlsVersion::V1_2 => rustls::ALL_VERSIONS,
        TlsVersion::V1_3 => TLS13_ONLY,
    }
}

fn roots_from(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in files::load_certs(path)? {
        roots.add(cert).map_err(|e| {
            TlsError::File(files::FileError {
                path: path.to_path_buf(),
                problem: format!("not a usable CA certificate: {e}"),
            })
        })?;
    }
    Ok(roots)
}

/// The certificate for a client hello: the first whose subjectAltName matches
/// the SNI name (exact, or a `*.` wildcard for one label), else the first.
#[derive(Debug)]
struct BySni {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let default = self.certs.first().map(|(_, k)| k.clone());
        let Some(sni) = hello.server_name() else {
            return default;
        };
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        self.certs
            .iter()
            .find(|(names, _)| names.iter().any(|n| name_matches(n, &sni)))
            .map(|(_, k)| k.clone())
            .or(default)
    }
}

/// The server config of a route's client side, built once.
pub fn server_config(t: &ClientTls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(t.min_version))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &t.client_ca {
        Some(path) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from(path)?), provider)
                    .build()
                    .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut certs = Vec::with_capacity(t.certificates.len());
    for pair in &t.certificates {
        let key = files::load_certified_key(&pair.cert, &pair.key)?;
        let names = key.cert.first().map(files::dns_names).unwrap_or_default();
        certs.push((names, key));
    }
    let mut config = builder.with_cert_resolver(Arc::new(BySni { certs }));
    config.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// Accepts any server certificate: `insecure_skip_verify = true`. Signatures
/// are still checked, so the session is encrypted, just not authenticated.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The operating system's trust store (rustls-native-certs: SSL_CERT_FILE,
/// SSL_CERT_DIR, else the distribution's bundle).
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(String::new, |e| format!(" ({e})"));
        return Err(TlsError::Config(format!(
            "ca = \"system\": the system trust store has no usable certificate{why}; install ca-certificates or give ca = \"FILE\""
        )));
    }
    Ok(roots)
}

/// The client config of a route's upstream side, built once.
pub fn client_config(t: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if t.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    } else {
        let roots = match &t.ca {
            CaSource::System => system_roots()?,
            CaSource::File(path) => roots_from(path)?,
        };
        builder.with_root_certificates(roots)
    };
    let config = match &t.client_cert {
        Some(pair) => {
            let chain = files::load_certs(&pair.cert)?;
            let key = files::load_key(&pair.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("{}: {e}", pair.key.display())))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name sent as SNI and verified: `server_name` if set, else the server's host.
pub fn server_name(configured: Option<&str>, host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(configured.unwrap_or(host).to_string()).ok()
}

/// Which way a handshake failed, as the `reason` label of
/// `kaproxy_tls_handshake_failures_total`: a small, stable set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The handshake did not finish within `handshake_timeout`.
    Timeout,
    /// The peer closed or reset the connection during the handshake.
    Closed,
    /// A certificate was refused: unknown CA, wrong name, expired, missing.
    Certificate,
    /// No protocol version, cipher suite or ALPN protocol in common.
    Negotiation,
    /// The peer sent an alert (it refused us).
    Alert,
    /// Anything else: not TLS at all, a malformed message, an I/O error.
    Protocol,
}

impl HandshakeFailure {
    /// Every reason, for pre-resolved metric series.
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::Certificate,
        HandshakeFailure::Negotiation,
        HandshakeFailure::Alert,
        HandshakeFailure::Protocol,
    ];

    /// Stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Certificate => "certificate",
            HandshakeFailure::Negotiation => "negotiation",
            HandshakeFailure::Alert => "alert",
            HandshakeFailure::Protocol => "protocol",
        }
    }

    /// Classifies a handshake error from tokio-rustls.
    pub fn of(e: &io::Error) -> HandshakeFailure {
        use rustls::{AlertDescription as A, Error as E, PeerIncompatible as P};
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(E::InvalidCertificate(_) | E::NoCertificatesPresented) => {
                HandshakeFailure::Certificate
            }
            Some(E::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateExpired
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::AccessDenied,
            )) => HandshakeFailure::Certificate,
            Some(E::AlertReceived(
                A::HandshakeFailure | A::ProtocolVersion | A::NoApplicationProtocol,
            ))
            | Some(E::PeerIncompatible(
                P::NoCipherSuitesInCommon
                | P::NoKxGroupsInCommon
                | P::NoSignatureSchemesInCommon
                | P::Tls12NotOffered
                | P::Tls12NotOfferedOrEnabled
                | P::Tls13RequiredForQuic
                | P::SupportedVersionsExtensionRequired
                | P::ServerDoesNotSupportTls12Or13,
            ))
            | Some(E::NoApplicationProtocol) => HandshakeFailure::Negotiation,
            Some(E::AlertReceived(_)) => HandshakeFailure::Alert,
            Some(_) => HandshakeFailure::Protocol,
            None => match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => HandshakeFailure::Closed,
                io::ErrorKind::TimedOut => HandshakeFailure::Timeout,
                _ => HandshakeFailure::Protocol,
            },
        }
    }
}

/// The session as `/connections` shows it, taken once after the handshake.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionInfo {
    /// "TLSv1.3" or "TLSv1.2".
    pub version: String,
    /// IANA name of the suite, e.g. "TLS13_AES_128_GCM_SHA256".
    pub cipher_suite: String,
    /// The SNI name: as sent by the client (client side) or as sent by kaproxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The ALPN protocol agreed, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    /// Subject of the peer's certificate: the client's with mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_subject: Option<String>,
}

impl fmt::Display for SessionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.version, self.cipher_suite)
    }
}

fn describe(common: &rustls::CommonState, sni: Option<&str>, peer: bool) -> SessionInfo {
    let version = match common.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_string(),
    };
    let cipher_suite = common
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_string(), |s| format!("{:?}", s.suite()));
    SessionInfo {
        version,
        cipher_suite,
        sni: sni.map(str::to_string),
        alpn: common
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        peer_subject: peer
            .then(|| {
                common
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(files::subject)
            })
            .flatten(),
    }
}

/// Completes the server handshake on the client socket. The caller bounds it in time.
pub async fn accept(
    config: Arc<ServerConfig>,
    socket: &TcpStream,
) -> io::Result<(rustls::ServerConnection, SessionInfo)> {
    let stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(Raw(socket))
        .await?;
    let (_, conn) = stream.into_inner();
    let info = describe(&conn, conn.server_name(), true);
    Ok((conn, info))
}

/// Completes the client handshake on an upstream socket. The caller bounds it in time.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    socket: &TcpStream,
) -> io::Result<(rustls::ClientConnection, SessionInfo)> {
    // rustls sends no SNI for an IP address: show only a name that was sent.
    let sni = matches!(name, ServerName::DnsName(_)).then(|| name.to_str().into_owned());
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, Raw(socket))
        .await?;
    let (_, conn) = stream.into_inner();
    let info = describe(&conn, sni.as_deref(), false);
    Ok((conn, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_match_exactly_or_by_one_wildcard_label() {
        assert!(name_matches("api.test", "api.test"));
        assert!(!name_matches("api.test", "v2.api.test"));
        assert!(name_matches("*.api.test", "v2.api.test"));
        assert!(!name_matches("*.api.test", "a.b.api.test"));
        assert!(!name_matches("*.api.test", "api.test"));
        assert!(!name_matches("*.api.test", ".api.test"));
    }

    #[test]
    fn handshake_failures_fall_into_the_stable_reasons() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            HandshakeFailure::of(&tls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))),
            HandshakeFailure::Certificate
        );
        assert_eq!(
            HandshakeFailure::of(&tls(rustls::Error::NoCertificatesPresented)),
            HandshakeFailure::Certificate
        );
        assert_eq!(
            HandshakeFailure::of(&tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))),
            HandshakeFailure::Certificate
        );
        assert_eq!(
            HandshakeFailure::of(&tls(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoCipherSuitesInCommon
            ))),
            HandshakeFailure::Negotiation
        );
        assert_eq!(
            HandshakeFailure::of(&tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::DecodeError
            ))),
            HandshakeFailure::Alert
        );
        assert_eq!(
            HandshakeFailure::of(&tls(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            HandshakeFailure::Protocol
        );
        assert_eq!(
            HandshakeFailure::of(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            HandshakeFailure::Closed
        );
        assert_eq!(
            HandshakeFailure::of(&io::Error::from(io::ErrorKind::ConnectionReset)),
            HandshakeFailure::Closed
        );
        let names: Vec<&str> = HandshakeFailure::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "timeout",
                "closed",
                "certificate",
                "negotiation",
                "alert",
                "protocol"
            ]
        );
    }
}
