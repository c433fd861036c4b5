//! Certificate and key files: PEM parsing, key/certificate matching, and what
//! `kaproxy check` prints about each certificate (names, expiry).
//!
//! Pure functions over paths; every error names the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Certificates expiring sooner than this get a warning in `check`.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// A certificate or key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

fn file_error(path: &Path, problem: impl Into<String>) -> FileError {
    FileError {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

/// Every certificate of a PEM file, in order; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let pem = read(path)?;
    let mut certs = Vec::new();
    for c in CertificateDer::pem_slice_iter(&pem) {
        certs.push(c.map_err(|e| file_error(path, format!("bad PEM: {e}")))?);
    }
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block in this PEM file"));
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c.as_ref())
            .map_err(|e| file_error(path, format!("not a valid X.509 certificate: {e}")))?;
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            file_error(path, "no PRIVATE KEY block in this PEM file")
        }
        e => file_error(path, format!("bad PEM: {e}")),
    })
}

/// A certificate chain and its key, loaded and checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, FileError> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| file_error(key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(e) => Err(file_error(
            key,
            format!("this key does not belong to {}: {e}", cert.display()),
        )),
    }
}

/// What `check` says about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// DNS names and IP addresses of its subjectAltName.
    pub names: Vec<String>,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
    /// End of validity as text (RFC 2822).
    pub not_after_text: String,
}

impl CertInfo {
    /// Expired, or expiring within [`EXPIRY_WARNING`], at `now`; `None` when fine.
    pub fn expiry_warning(&self, now: SystemTime) -> Option<String> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let left = self.not_after - now;
        if left <= 0 {
            Some(format!("expired on {}", self.not_after_text))
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            Some(format!(
                "expires in {} days, on {}",
                left / 86_400,
                self.not_after_text
            ))
        } else {
            None
        }
    }
}

/// Subject, names and expiry of a DER certificate.
pub fn inspect(der: &CertificateDer<'_>) -> Option<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n) => names.push(n.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        names.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        names.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after;
    Some(CertInfo {
        subject: cert.subject().to_string(),
        names,
        not_after: not_after.timestamp(),
        not_after_text: not_after
            .to_rfc2822()
            .unwrap_or_else(|_| not_after.timestamp().to_string()),
    })
}

/// The DNS names a certificate is valid for (subjectAltName), lower case.
pub fn dns_names(der: &CertificateDer<'_>) -> Vec<String> {
    inspect(der)
        .map(|i| {
            i.names
                .into_iter()
                .filter(|n| n.parse::<std::net::IpAddr>().is_err())
                .map(|n| n.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default()
}

/// The subject of a peer's end-entity certificate, for /connections.
pub fn subject(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.subject().to_string())
}
