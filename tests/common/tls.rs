//! TLS test peers: a throwaway CA (rcgen) and what it issues, rustls
//! clients and servers over std sockets, and routes that terminate or
//! originate TLS. Shared by `tls.rs` and `tls_edges.rs`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::*;

pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A throwaway CA and the files of what it issued, in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub name: String,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = cert.pem();
        std::fs::write(dir.path().join(format!("{name}.pem")), &ca_pem).unwrap();
        Pki {
            dir,
            ca: Issuer::new(params, key),
            ca_pem,
            name: name.to_string(),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.pem", self.name))
    }

    /// Issues an end-entity certificate for `names` (DNS names or IPs); its
    /// subject CN is `stem`. Returns the cert and key paths.
    pub fn issue(&self, stem: &str, names: &[&str], client: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_path = self.dir.path().join(format!("{stem}.pem"));
        let key_path = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }
}

pub fn load(cert: &Path, key: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    (certs, PrivateKeyDer::from_pem_file(key).unwrap())
}

pub fn client_config(roots: RootCertStore, auth: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match auth {
        Some((c, k)) => {
            let (certs, key) = load(c, k);
            b.with_client_auth_cert(certs, key).unwrap()
        }
        None => b.with_no_client_auth(),
    })
}

pub fn server_config(cert: &Path, key: &Path) -> Arc<ServerConfig> {
    let (certs, key) = load(cert, key);
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

pub type ClientStream = rustls::StreamOwned<ClientConnection, TcpStream>;
pub type ServerStream = rustls::StreamOwned<ServerConnection, TcpStream>;

/// A TLS client over `sock`, handshake completed (or its error).
pub fn tls_over(
    mut sock: TcpStream,
    config: Arc<ClientConfig>,
    sni: &str,
) -> std::io::Result<ClientStream> {
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = ClientConnection::new(config, name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

pub fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sni: &str,
) -> std::io::Result<ClientStream> {
    tls_over(TcpStream::connect(addr)?, config, sni)
}

/// The server side of a TLS connection accepted on `listener`.
pub fn tls_accept(listener: &TcpListener, config: Arc<ServerConfig>) -> ServerStream {
    let mut sock = accept(listener);
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut conn = ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("upstream handshake");
    }
    rustls::StreamOwned::new(conn, sock)
}

/// Sends close_notify and flushes it, keeping the TCP connection open both ways.
pub fn close_notify<C, S>(s: &mut rustls::StreamOwned<C, TcpStream>)
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    s.conn.send_close_notify();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut s.sock).unwrap();
    }
}

pub fn toml_path(p: &Path) -> String {
    p.display().to_string()
}

/// A route "t" to `up`, with TOML tables appended for the TLS sides.
pub fn route(up: SocketAddr, tables: &str) -> String {
    route_with(up, "", tables)
}

/// As [`route`], with route-level settings (`top`) before the tables.
pub fn route_with(up: SocketAddr, top: &str, tables: &str) -> String {
    format!(
        "shutdown_grace = \"1s\"\n[[route]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\n{top}[route.upstream]\nservers = [\"{up}\"]\n{tables}"
    )
}

pub fn terminate(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "[route.client.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n{extra}",
        toml_path(cert),
        toml_path(key)
    )
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs a tokio runtime for an async test body with a deadline.
pub fn block_on<F: std::future::Future>(within: Duration, f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            tokio::time::timeout(within, f)
                .await
                .unwrap_or_else(|_| panic!("test body took more than {within:?}"))
        })
}

/// kaproxy terminating and originating; the upstream is a rustls server here.
pub fn both_sides(
    pki: &Pki,
    extra_route: &str,
) -> (Proxy, TcpListener, Arc<ServerConfig>, Arc<ClientConfig>) {
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let (ucert, ukey) = pki.issue("backend", &["backend.test"], false);
    let (listener, up) = upstream_listener();
    let tables = format!(
        "{}[route.upstream.tls]\nca = \"{}\"\nserver_name = \"backend.test\"\n",
        terminate(&cert, &key, ""),
        toml_path(&pki.ca_path())
    );
    let proxy = Proxy::start(&route_with(up, extra_route, &tables));
    (
        proxy,
        listener,
        server_config(&ucert, &ukey),
        client_config(pki.roots(), None),
    )
}
