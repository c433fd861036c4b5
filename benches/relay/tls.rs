//! TLS termination side by side with HAProxy's `ssl`, with the same ECDSA P-256
//! certificate (made here with rcgen): full handshakes per second, bulk
//! throughput, and resident memory per idle TLS pair. The client is rustls in
//! this process, without session resumption, so every handshake is a full one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::inproc;
use crate::procs::{Running, Spec, TlsFiles};
use crate::report::{Measure, Report};

const DEADLINE: Duration = Duration::from_secs(120);
const CHUNK: usize = 128 * 1024;

/// What the TLS part needs from the run's options.
pub struct TlsOpts {
    pub runs: usize,
    pub secs: u64,
    pub bytes: usize,
    pub pairs: usize,
}

struct Pki {
    _dir: tempfile::TempDir,
    files: TlsFiles,
    client: Arc<ClientConfig>,
}

fn pki() -> Result<Pki, String> {
    let e = |e: &dyn std::fmt::Display| format!("certificate: {e}");
    let dir = tempfile::tempdir().map_err(|x| e(&x))?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|x| e(&x))?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    // KeyPair::generate makes ECDSA P-256 keys.
    let ca_key = rcgen::KeyPair::generate().map_err(|x| e(&x))?;
    let ca_cert = ca.self_signed(&ca_key).map_err(|x| e(&x))?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf = rcgen::CertificateParams::new(vec!["bench.test".to_string()]).map_err(|x| e(&x))?;
    let key = rcgen::KeyPair::generate().map_err(|x| e(&x))?;
    let cert = leaf.signed_by(&key, &issuer).map_err(|x| e(&x))?;
    let files = TlsFiles {
        cert: dir.path().join("bench.pem"),
        key: dir.path().join("bench.key"),
        combined: dir.path().join("bench-combined.pem"),
    };
    let write = |p: &std::path::Path, s: &str| std::fs::write(p, s).map_err(|x| e(&x));
    write(&files.cert, &cert.pem())?;
    write(&files.key, &key.serialize_pem())?;
    write(
        &files.combined,
        &format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_cert.pem().as_bytes()) {
        roots.add(c.map_err(|x| e(&x))?).map_err(|x| e(&x))?;
    }
    let mut client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|x| e(&x))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    client.resumption = Resumption::disabled();
    Ok(Pki {
        _dir: dir,
        files,
        client: Arc::new(client),
    })
}

fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> Result<StreamOwned<ClientConnection, TcpStream>, String> {
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("bench.test").map_err(|e| e.to_string())?;
    let mut conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(StreamOwned::new(conn, sock))
}

fn round_trip(s: &mut StreamOwned<ClientConnection, TcpStream>) -> Result<(), String> {
    s.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).map_err(|e| e.to_string())
}

/// Full handshakes per second from `threads` client threads for `secs`, each
/// connection doing one 4-byte round trip and a close_notify; and the proxy's
/// CPU microseconds per handshake.
fn handshakes(
    t: &Running,
    config: &Arc<ClientConfig>,
    threads: usize,
    secs: u64,
) -> Result<Vec<f64>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let cpu0 = t.proc.cpu_seconds();
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, count, config, addr) = (stop.clone(), count.clone(), config.clone(), t.addr);
            thread::spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::Relaxed) {
                    let mut s = tls_connect(addr, &config)?;
                    round_trip(&mut s)?;
                    s.conn.send_close_notify();
                    let _ = s.conn.complete_io(&mut s.sock);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| "client thread panicked".to_string())??;
    }
    let n = count.load(Ordering::Relaxed) as f64;
    let used = t.proc.cpu_seconds() - cpu0;
    Ok(vec![
        n / start.elapsed().as_secs_f64(),
        used * 1e6 / n.max(1.0),
    ])
}

/// One TLS stream of `bytes` into the sink behind `t`; bytes per second.
fn bulk(
    t: &Running,
    config: &Arc<ClientConfig>,
    done: &mpsc::Receiver<(u64, Instant)>,
    bytes: usize,
) -> Result<f64, String> {
    let chunk = vec![0x5au8; CHUNK];
    let mut s = tls_connect(t.addr, config)?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).map_err(|e| e.to_string())?;
        sent += chunk.len();
    }
    s.conn.send_close_notify();
    s.flush().map_err(|e| e.to_string())?;
    s.sock
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let (got, at) = done
        .recv_timeout(DEADLINE)
        .map_err(|_| "sink did not finish".to_string())?;
    if got as usize != sent {
        return Err(format!("sink received {got} of {sent} bytes"));
    }
    Ok(sent as f64 / (at - start).as_secs_f64())
}

/// `n` idle TLS pairs through `spec`, each after one round trip; RSS growth per pair.
fn idle_pairs(
    spec: &Spec,
    files: &TlsFiles,
    config: &Arc<ClientConfig>,
    n: usize,
) -> Result<f64, String> {
    let echo = inproc::EchoProcess::start()?;
    let proxy = spec.start_tls(echo.addr, n, files)?;
    for _ in 0..50 {
        let mut s = tls_connect(proxy.addr, config)?;
        round_trip(&mut s)?;
    }
    thread::sleep(Duration::from_millis(300));
    let before = proxy.proc.rss_bytes();
    let deadline = Instant::now() + DEADLINE;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() > deadline {
            return Err(format!("only {i} pairs open after {DEADLINE:?}"));
        }
        let mut s = tls_connect(proxy.addr, config).map_err(|e| format!("pair {i}: {e}"))?;
        round_trip(&mut s).map_err(|e| format!("pair {i}: {e}"))?;
        conns.push(s);
    }
    thread::sleep(Duration::from_millis(500));
    let after = proxy.proc.rss_bytes();
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// The TLS rows: kaproxy and HAProxy only (nginx stream and an older kaproxy are left out).
pub fn run(opts: &TlsOpts, specs: &[Spec], report: &mut Report) {
    let specs: Vec<&Spec> = specs
        .iter()
        .filter(|s| matches!(s.name(), "kaproxy" | "haproxy"))
        .collect();
    let pki = match pki() {
        Ok(p) => p,
        Err(e) => return report.skip("tls", &e),
    };
    let start = |upstream: SocketAddr| -> Vec<Running> {
        specs
            .iter()
            .filter_map(|s| s.start_tls(upstream, 0, &pki.files).ok())
            .collect()
    };
    let alternate = |proxies: &[Running],
                     f: &mut dyn FnMut(&Running) -> Result<Vec<f64>, String>| {
        let mut samples: Vec<Result<Vec<Vec<f64>>, String>> =
            proxies.iter().map(|_| Ok(Vec::new())).collect();
        for _ in 0..opts.runs {
            for (p, s) in proxies.iter().zip(samples.iter_mut()) {
                if let Ok(runs) = s {
                    match f(p) {
                        Ok(v) => runs.push(v),
                        Err(e) => *s = Err(e),
                    }
                }
            }
        }
        proxies
            .iter()
            .zip(samples)
            .map(|(p, s)| {
                (
                    p.name,
                    s.map(|runs| {
                        let width = runs.first().map_or(0, Vec::len);
                        (0..width)
                            .map(|i| {
                                let mut v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
                                v.sort_by(|a, b| a.total_cmp(b));
                                v[v.len() / 2]
                            })
                            .collect()
                    }),
                )
            })
            .collect::<Vec<_>>()
    };

    let echo = inproc::echo();
    let proxies = start(echo);
    let results = alternate(&proxies, &mut |p| handshakes(p, &pki.client, 2, opts.secs));
    report.row(
        Measure::new(
            "TLS full handshakes/s (2 client threads, P-256)",
            "k/s",
            1e3,
            2,
        )
        .values(&results, 0),
    );
    report.row(Measure::new("proxy CPU per TLS handshake", "µs", 1.0, 0).values(&results, 1));
    drop(proxies);

    let (sink, done) = inproc::sink();
    let proxies = start(sink);
    let results = alternate(&proxies, &mut |p| {
        Ok(vec![bulk(p, &pki.client, &done, opts.bytes)?])
    });
    let what = format!("TLS single-stream throughput ({} MiB)", opts.bytes >> 20);
    report.row(Measure::new(&what, "MiB/s", 1024.0 * 1024.0, 0).values(&results, 0));
    drop(proxies);

    let results: Vec<_> = specs
        .iter()
        .map(|s| {
            (
                s.name(),
                idle_pairs(s, &pki.files, &pki.client, opts.pairs).map(|per| vec![per]),
            )
        })
        .collect();
    let what = format!("RSS per idle TLS pair, {} pairs, one run", opts.pairs);
    report.row(Measure::new(&what, "bytes", 1.0, 0).values(&results, 0));
}
