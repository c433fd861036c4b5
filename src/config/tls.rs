//! `[route.client.tls]` and `[route.upstream.tls]`: the raw tables, their
//! inheritance from `[defaults]` (field by field), and resolution. Every file
//! named is loaded and checked here (PEM parse, key matches certificate), so a
//! bad file is a configuration error naming the file, line and field.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::{Merge, SStr};
use super::source::{positive_duration, Ctx};
use super::ConfigError;
use crate::certs as files;

/// Handshake timeout of either side when the config names none.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[route.client.tls]`: terminate TLS from clients.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawClientTls {
    /// `false` turns off TLS inherited from `[defaults]`.
    pub enabled: Option<Spanned<bool>>,
    /// Certificate and key pairs; the first is the default.
    pub certificates: Option<Spanned<Vec<Spanned<RawCertificate>>>>,
    /// CA file client certificates must chain to; required when set.
    pub client_ca: Option<SStr>,
    /// "1.2" or "1.3".
    pub min_version: Option<SStr>,
    /// Protocols offered by ALPN.
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    /// Bound on the handshake.
    pub handshake_timeout: Option<SStr>,
}

/// One `{ cert = "...", key = "..." }` entry.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM certificate chain, end-entity first.
    pub cert: Option<SStr>,
    /// PEM private key.
    pub key: Option<SStr>,
}

/// `[route.upstream.tls]`: originate TLS to the servers.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// `false` turns off TLS inherited from `[defaults]`.
    pub enabled: Option<Spanned<bool>>,
    /// "system" or a PEM file of trusted CAs.
    pub ca: Option<SStr>,
    /// SNI and the name verified.
    pub server_name: Option<SStr>,
    /// Client certificate presented to the servers.
    pub client_cert: Option<SStr>,
    /// Its key.
    pub client_key: Option<SStr>,
    /// Accept any server certificate.
    pub insecure_skip_verify: Option<Spanned<bool>>,
    /// Bound on the handshake.
    pub handshake_timeout: Option<SStr>,
}

impl Merge for RawClientTls {
    fn merge(self, over: Self) -> Self {
        RawClientTls {
            enabled: over.enabled.or(self.enabled),
            certificates: over.certificates.or(self.certificates),
            client_ca: over.client_ca.or(self.client_ca),
            min_version: over.min_version.or(self.min_version),
            alpn: over.alpn.or(self.alpn),
            handshake_timeout: over.handshake_timeout.or(self.handshake_timeout),
        }
    }
}

impl Merge for RawUpstreamTls {
    fn merge(self, over: Self) -> Self {
        RawUpstreamTls {
            enabled: over.enabled.or(self.enabled),
            ca: over.ca.or(self.ca),
            server_name: over.server_name.or(self.server_name),
            client_cert: over.client_cert.or(self.client_cert),
            client_key: over.client_key.or(self.client_key),
            insecure_skip_verify: over.insecure_skip_verify.or(self.insecure_skip_verify),
            handshake_timeout: over.handshake_timeout.or(self.handshake_timeout),
        }
    }
}

/// A certificate chain file and its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Lowest TLS version accepted from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl TlsVersion {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

/// Resolved `[route.client.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// At least one; the first is the default, the others chosen by SNI.
    pub certificates: Vec<CertFiles>,
    /// Require client certificates signed by these CAs.
    pub client_ca: Option<PathBuf>,
    /// Lowest version accepted.
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in order of preference.
    pub alpn: Vec<String>,
    /// Bound on the handshake.
    pub handshake_timeout: Duration,
}

/// Where the upstream side's trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// The operating system's trust store.
    System,
    /// A PEM file.
    File(PathBuf),
}

/// Resolved `[route.upstream.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Trusted CAs.
    pub ca: CaSource,
    /// SNI and the verified name; `None` = each server's host.
    pub server_name: Option<String>,
    /// Client certificate for mutual TLS.
    pub client_cert: Option<CertFiles>,
    /// Accept any server certificate (warned about loudly).
    pub insecure_skip_verify: bool,
    /// Bound on the handshake.
    pub handshake_timeout: Duration,
}

/// A path from the config, relative to the config file's directory.
fn path_in(base: &Path, s: &SStr) -> PathBuf {
    let p = Path::new(s.get_ref().trim());
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn file_err<T>(
    ctx: &Ctx<'_>,
    s: &SStr,
    field: &str,
    e: files::FileError,
    hint: &str,
) -> Result<T, ConfigError> {
    ctx.err(s.span(), field, e.to_string(), hint)
}

/// Directory relative paths in `file` resolve against.
pub(super) fn base_dir(file: &str) -> PathBuf {
    Path::new(file)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn enabled(t: &Option<Spanned<bool>>) -> bool {
    t.as_ref().is_none_or(|e| *e.get_ref())
}

/// `[route.client.tls]` over `[defaults.client.tls]`; `None` when neither asks for TLS.
pub(super) fn client_tls(
    ctx: &Ctx<'_>,
    defaults: Option<&RawClientTls>,
    route: Option<&RawClientTls>,
    field: &str,
    table_span: Range<usize>,
    base: &Path,
) -> Result<Option<ClientTls>, ConfigError> {
    let raw = match (defaults.cloned(), route.cloned()) {
        (None, None) => return Ok(None),
        (Some(d), Some(r)) => d.merge(r),
        (Some(t), None) | (None, Some(t)) => t,
    };
    if !enabled(&raw.enabled) {
        return Ok(None);
    }
    let at = |f: &str| format!("{field}.{f}");
    let Some(list) = raw
        .certificates
        .as_ref()
        .filter(|l| !l.get_ref().is_empty())
    else {
        // Point at the table: at one of its fields, else at the route.
        let span = raw
            .certificates
            .as_ref()
            .map(|l| l.span())
            .or_else(|| raw.client_ca.as_ref().map(|v| v.span()))
            .or_else(|| raw.min_version.as_ref().map(|v| v.span()))
            .or_else(|| raw.alpn.as_ref().map(|v| v.span()))
            .or_else(|| raw.handshake_timeout.as_ref().map(|v| v.span()))
            .or_else(|| raw.enabled.as_ref().map(|v| v.span()))
            .unwrap_or(table_span);
        return ctx.err(
            span,
            &at("certificates"),
            "TLS towards clients needs at least one certificate",
            "certificates = [{ cert = \"site.pem\", key = \"site.key\" }]",
        );
    };
    let mut certificates = Vec::new();
    for (i, entry) in list.get_ref().iter().enumerate() {
        let f = at(&format!("certificates[{i}]"));
        let e = entry.get_ref();
        let (Some(cert), Some(key)) = (&e.cert, &e.key) else {
            return ctx.err(
                entry.span(),
                &f,
                "each certificate needs both cert and key",
                "{ cert = \"site.pem\", key = \"site.key\" }",
            );
        };
        let files = CertFiles {
            cert: path_in(base, cert),
            key: path_in(base, key),
        };
        if let Err(err) = files::load_certified_key(&files.cert, &files.key) {
            let s = if err.path == files.cert { cert } else { key };
            return file_err(
                ctx,
                s,
                &f,
                err,
                "give a PEM certificate chain (end-entity first) and its PEM private key",
            );
        }
        certificates.push(files);
    }
    let client_ca = match &raw.client_ca {
        Some(s) => {
            let path = path_in(base, s);
            if let Err(e) = files::load_certs(&path) {
                return file_err(
                    ctx,
                    s,
                    &at("client_ca"),
                    e,
                    "give a PEM file of CA certificates",
                );
            }
            Some(path)
        }
        None => None,
    };
    let min_version = match &raw.min_version {
        None => TlsVersion::V1_2,
        Some(s) => match s.get_ref().trim() {
            "1.2" => TlsVersion::V1_2,
            "1.3" => TlsVersion::V1_3,
            other => {
                return ctx.err(
                    s.span(),
                    &at("min_version"),
                    format!("{other:?} is not a TLS version kaproxy accepts"),
                    "use \"1.2\" (the default) or \"1.3\"",
                )
            }
        },
    };
    let mut alpn = Vec::new();
    for p in raw.alpn.iter().flat_map(|l| l.get_ref()) {
        let v = p.get_ref();
        if v.is_empty() || v.len() > 255 {
            return ctx.err(
                p.span(),
                &at("alpn"),
                format!("{v:?} is not a protocol name ALPN can carry (1 to 255 bytes)"),
                "e.g. alpn = [\"h2\", \"http/1.1\"]",
            );
        }
        alpn.push(v.clone());
    }
    Ok(Some(ClientTls {
        certificates,
        client_ca,
        min_version,
        alpn,
        handshake_timeout: handshake_timeout(
            ctx,
            &raw.handshake_timeout,
            &at("handshake_timeout"),
        )?,
    }))
}

fn handshake_timeout(
    ctx: &Ctx<'_>,
    s: &Option<SStr>,
    field: &str,
) -> Result<Duration, ConfigError> {
    match s {
        Some(s) => positive_duration(ctx, s, field),
        None => Ok(DEFAULT_HANDSHAKE_TIMEOUT),
    }
}

/// `[route.upstream.tls]` over `[defaults.upstream.tls]`; `None` when neither asks for TLS.
pub(super) fn upstream_tls(
    ctx: &Ctx<'_>,
    defaults: Option<&RawUpstreamTls>,
    route: Option<&RawUpstreamTls>,
    field: &str,
    base: &Path,
) -> Result<Option<UpstreamTls>, ConfigError> {
    let raw = match (defaults.cloned(), route.cloned()) {
        (None, None) => return Ok(None),
        (Some(d), Some(r)) => d.merge(r),
        (Some(t), None) | (None, Some(t)) => t,
    };
    if !enabled(&raw.enabled) {
        return Ok(None);
    }
    let at = |f: &str| format!("{field}.{f}");
    let ca = match &raw.ca {
        None => CaSource::System,
        Some(s) if s.get_ref().trim() == "system" => CaSource::System,
        Some(s) => {
            let path = path_in(base, s);
            if let Err(e) = files::load_certs(&path) {
                return file_err(
                    ctx,
                    s,
                    &at("ca"),
                    e,
                    "use \"system\" (the OS trust store) or a PEM file of CA certificates",
                );
            }
            CaSource::File(path)
        }
    };
    let server_name = match &raw.server_name {
        None => None,
        Some(s) => {
            let name = s.get_ref().trim().to_string();
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                return ctx.err(
                    s.span(),
                    &at("server_name"),
                    format!("{name:?} is not a DNS name or IP address"),
                    "e.g. server_name = \"tomcat.internal\"",
                );
            }
            Some(name)
        }
    };
    let client_cert = match (&raw.client_cert, &raw.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let files = CertFiles {
                cert: path_in(base, cert),
                key: path_in(base, key),
            };
            if let Err(err) = files::load_certified_key(&files.cert, &files.key) {
                let (s, f) = if err.path == files.cert {
                    (cert, "client_cert")
                } else {
                    (key, "client_key")
                };
                return file_err(
                    ctx,
                    s,
                    &at(f),
                    err,
                    "give a PEM certificate chain and its PEM private key",
                );
            }
            Some(files)
        }
        (Some(s), None) | (None, Some(s)) => {
            return ctx.err(
                s.span(),
                &at("client_cert"),
                "client_cert and client_key go together",
                "set both, or neither",
            )
        }
    };
    Ok(Some(UpstreamTls {
        ca,
        server_name,
        client_cert,
        insecure_skip_verify: raw
            .insecure_skip_verify
            .as_ref()
            .is_some_and(|b| *b.get_ref()),
        handshake_timeout: handshake_timeout(
            ctx,
            &raw.handshake_timeout,
            &at("handshake_timeout"),
        )?,
    }))
}

/// What `kaproxy check` prints about a route's TLS: the settings, and for
/// every certificate its subject, names and expiry, with a warning for one
/// expired or expiring within 30 days and for `insecure_skip_verify`.
pub(super) fn describe(client: Option<&ClientTls>, upstream: Option<&UpstreamTls>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let now = std::time::SystemTime::now();
    let certs = |out: &mut String, what: &str, path: &Path| match files::load_certs(path) {
        Ok(chain) => {
            for (i, der) in chain.iter().enumerate() {
                let Some(info) = files::inspect(der) else {
                    continue;
                };
                let role = if i == 0 { what } else { "  chain" };
                let names = if info.names.is_empty() {
                    "no subjectAltName".to_string()
                } else {
                    info.names.join(", ")
                };
                let _ = writeln!(
                    out,
                    "    {role} {}: {} [{names}], valid until {}",
                    path.display(),
                    info.subject,
                    info.not_after_text
                );
                if let Some(w) = info.expiry_warning(now) {
                    let _ = writeln!(out, "    WARNING: {} {w}", path.display());
                }
            }
        }
        Err(e) => {
            let _ = writeln!(out, "    ERROR: {e}");
        }
    };
    match client {
        None => out.push_str("  client tls         = off\n"),
        Some(t) => {
            let _ = writeln!(
                out,
                "  client tls         = terminate, TLS {}+, {} certificate(s) chosen by SNI{}{}, handshake within {}",
                t.min_version.as_str(),
                t.certificates.len(),
                match &t.client_ca {
                    Some(p) => format!(", client certificate required (CA {})", p.display()),
                    None => String::new(),
                },
                if t.alpn.is_empty() {
                    String::new()
                } else {
                    format!(", ALPN {}", t.alpn.join(","))
                },
                super::fmt_duration(t.handshake_timeout)
            );
            for c in &t.certificates {
                certs(&mut out, "certificate", &c.cert);
            }
            if let Some(p) = &t.client_ca {
                certs(&mut out, "client CA", p);
            }
        }
    }
    match upstream {
        None => out.push_str("  upstream tls       = off\n"),
        Some(t) => {
            let _ = writeln!(
                out,
                "  upstream tls       = originate, CA {}, server name {}{}, handshake within {}",
                match &t.ca {
                    CaSource::System => "system".to_string(),
                    CaSource::File(p) => p.display().to_string(),
                },
                t.server_name.as_deref().unwrap_or("(each server's host)"),
                if t.client_cert.is_some() {
                    ", client certificate presented"
                } else {
                    ""
                },
                super::fmt_duration(t.handshake_timeout)
            );
            if t.insecure_skip_verify {
                out.push_str("    WARNING: insecure_skip_verify = true: server certificates are NOT verified\n");
            }
            if let CaSource::File(p) = &t.ca {
                certs(&mut out, "CA", p);
            }
            if let Some(c) = &t.client_cert {
                certs(&mut out, "client certificate", &c.cert);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::config::Config;

    /// A self-signed certificate and its key, written into `dir` as `stem`.pem/.key.
    fn self_signed(dir: &Path, stem: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![format!("{stem}.test")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }

    #[test]
    fn tls_fields_inherit_one_by_one_and_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        self_signed(dir.path(), "site");
        self_signed(dir.path(), "ca");
        let file = dir.path().join("k.toml");
        let text = "[defaults.client.tls]\ncertificates = [{ cert = \"site.pem\", key = \"site.key\" }]\nhandshake_timeout = \"3s\"\n[defaults.upstream.tls]\nserver_name = \"backend.test\"\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n[route.client.tls]\nmin_version = \"1.3\"\n[route.upstream]\nservers = [\"b:1\"]\n[route.upstream.tls]\nca = \"ca.pem\"\n[[route]]\nname = \"s\"\nlisten = \"127.0.0.1:0\"\n[route.client.tls]\nenabled = false\n[route.upstream]\nservers = [\"b:1\"]\n";
        let cfg = Config::from_toml(&file.display().to_string(), text).unwrap();
        let r = &cfg.routes[0];
        let c = r.client.tls.as_ref().unwrap();
        assert_eq!(c.certificates[0].cert, dir.path().join("site.pem"));
        assert_eq!(c.handshake_timeout, Duration::from_secs(3), "from defaults");
        assert_eq!(c.min_version, TlsVersion::V1_3, "from the route");
        let u = r.upstream.tls.as_ref().unwrap();
        assert_eq!(u.ca, CaSource::File(dir.path().join("ca.pem")));
        assert_eq!(u.server_name.as_deref(), Some("backend.test"));
        assert_eq!(u.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        let s = &cfg.routes[1];
        assert_eq!(s.client.tls, None, "enabled = false");
        assert!(s.upstream.tls.is_some(), "inherited");
        assert_eq!(s.upstream.tls.as_ref().unwrap().ca, CaSource::System);
    }

    #[test]
    fn bad_tls_values_name_the_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        self_signed(dir.path(), "site");
        let file = dir.path().join("k.toml").display().to_string();
        let route = "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"b:1\"]\n";
        for (tail, line, field) in [
            ("[route.client.tls]\nmin_version = \"1.1\"\ncertificates = [{ cert = \"site.pem\", key = \"site.key\" }]\n", 7, "route \"r\".client.tls.min_version"),
            ("[route.client.tls]\nclient_ca = \"site.pem\"\n", 7, "route \"r\".client.tls.certificates"),
            ("[route.upstream.tls]\nserver_name = \"not a name\"\n", 7, "route \"r\".upstream.tls.server_name"),
            ("[route.upstream.tls]\nclient_cert = \"site.pem\"\n", 7, "route \"r\".upstream.tls.client_cert"),
            ("[route.upstream.tls]\nhandshake_timeout = \"0s\"\n", 7, "route \"r\".upstream.tls.handshake_timeout"),
            ("[route.client.tls]\ncertificates = [{ cert = \"site.pem\" }]\n", 7, "route \"r\".client.tls.certificates[0]"),
        ] {
            let err = Config::from_toml(&file, &format!("{route}{tail}")).unwrap_err();
            assert_eq!(err.line(), Some(line), "{tail}: {err}");
            assert!(err.to_string().contains(&format!(": {field}:")), "{tail}: {err}");
        }
    }

    #[test]
    fn expiry_warnings_start_30_days_ahead() {
        let info = |days: i64| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            files::CertInfo {
                subject: "CN=x".into(),
                names: vec![],
                not_after: now + days * 86_400 + 60,
                not_after_text: "then".into(),
            }
        };
        let now = SystemTime::now();
        assert_eq!(info(31).expiry_warning(now), None);
        assert!(info(29)
            .expiry_warning(now)
            .unwrap()
            .starts_with("expires in 29 days"));
        assert!(info(-1)
            .expiry_warning(now)
            .unwrap()
            .starts_with("expired on"));
    }
}
