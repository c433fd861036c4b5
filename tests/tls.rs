//! TLS on either side of a route, with real peers: curl, openssl s_client and
//! s_server, and rustls peers written here. Certificates come from a
//! throwaway CA made with rcgen for each test.
//!
//! Bounds: every wait has a deadline; timing asserts name the configured
//! bound and the tolerance on top of it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use sha2::{Digest, Sha256};

use common::netns::{blackhole_host_port, blackhole_port, connect_from, isolated};
use common::tls::*;
use common::*;

/// A plain HTTP/1.1 server answering every request with `body`.
fn http_upstream(body: &'static str) -> SocketAddr {
    let (listener, addr) = upstream_listener();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            thread::spawn(move || {
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        let msg = format!("{name} is not installed (scripts/test.sh installs it)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        println!("skipped: {msg}");
    }
    found
}

/// Runs a command with a deadline; returns (success, stdout+stderr).
fn run_bounded(cmd: &mut Command, input: &[u8], within: Duration) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    thread::spawn(move || {
        let _ = stdin.write_all(&input);
        // Keep stdin open a moment: openssl s_client quits at its end.
        thread::sleep(Duration::from_millis(1500));
    });
    let deadline = Instant::now() + within;
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn curl_and_openssl_s_client_through_a_terminating_route() {
    if !have_tool("curl") || !have_tool("openssl") {
        return;
    }
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let up = http_upstream("hello through tls");
    let proxy = Proxy::start(&route(up, &terminate(&cert, &key, "")));
    let port = proxy.addr("t").port();

    let (ok, out) = run_bounded(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &toml_path(&pki.ca_path()),
            "--resolve",
            &format!("site.test:{port}:127.0.0.1"),
            &format!("https://site.test:{port}/"),
        ]),
        b"",
        Duration::from_secs(15),
    );
    assert!(ok, "curl failed: {out}");
    assert!(out.contains("hello through tls"), "{out}");

    // openssl verifies the chain against the test CA and the name.
    let (_, out) = run_bounded(
        Command::new("openssl").args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "site.test",
            "-verify_hostname",
            "site.test",
            "-CAfile",
            &toml_path(&pki.ca_path()),
            "-verify_return_error",
        ]),
        b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n",
        Duration::from_secs(15),
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("hello through tls"), "{out}");
    assert!(
        out.contains("CN=site") || out.contains("CN = site"),
        "{out}"
    );

    // curl without the CA refuses kaproxy's certificate: the pair ends as a client TLS error.
    let (ok, out) = run_bounded(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &format!("site.test:{port}:127.0.0.1"),
            &format!("https://site.test:{port}/"),
        ]),
        b"",
        Duration::from_secs(15),
    );
    assert!(!ok, "curl should refuse an unknown CA: {out}");
    let closes = proxy.wait_events(
        |v| message(v) == "pair closed" && reason(v) == "client_tls_error",
        1,
        Duration::from_secs(10),
    );
    let error = closes[0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("alert"),
        "rustls's words in the event: {}",
        closes[0]
    );
    let (_, metrics) = admin_get(proxy.admin(), "/metrics");
    let failures: f64 = ["certificate", "alert"]
        .iter()
        .filter_map(|r| {
            metric(
                &metrics,
                &format!("kaproxy_tls_handshake_failures_total{{route=\"t\",side=\"client\",reason=\"{r}\"}}"),
            )
        })
        .sum();
    assert!(failures >= 1.0, "{metrics}");
}

#[test]
fn forward_terminates_and_originates_tls() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let (ucert, ukey) = pki.issue("backend", &["backend.test"], false);
    let (listener, up) = upstream_listener();
    let proxy = Proxy::forward(&[
        "127.0.0.1:0",
        &up.to_string(),
        "--tls-cert",
        &toml_path(&cert),
        "--tls-key",
        &toml_path(&key),
        "--upstream-tls",
        "--upstream-ca",
        &toml_path(&pki.ca_path()),
        "--upstream-server-name",
        "backend.test",
    ]);
    let scfg = server_config(&ucert, &ukey);
    let server = thread::spawn(move || {
        let mut s = tls_accept(&listener, scfg);
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong").unwrap();
        s.flush().unwrap();
        buf
    });
    let mut c = tls_connect(
        proxy.addr("forward"),
        client_config(pki.roots(), None),
        "site.test",
    )
    .unwrap();
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(&server.join().unwrap(), b"ping");
}

#[test]
fn sni_picks_the_certificate_whose_names_match() {
    let pki = Pki::new("ca");
    let (site, site_key) = pki.issue("site", &["site.test"], false);
    let (api, api_key) = pki.issue("api", &["api.test", "*.api.test"], false);
    let up = echo_server();
    let tables = format!(
        "[route.client.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}, {{ cert = \"{}\", key = \"{}\" }}]\n",
        toml_path(&site),
        toml_path(&site_key),
        toml_path(&api),
        toml_path(&api_key)
    );
    let proxy = Proxy::start(&route(up, &tables));
    let config = client_config(pki.roots(), None);
    // rustls verifies the name: each handshake succeeds only with the right certificate.
    for sni in ["site.test", "api.test", "v2.api.test"] {
        let mut c = tls_connect(proxy.addr("t"), config.clone(), sni)
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        c.write_all(sni.as_bytes()).unwrap();
        let mut buf = vec![0u8; sni.len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, sni.as_bytes());
    }
    // A name neither certificate has gets the first (default) one, which the
    // client then rejects for the name.
    let Err(err) = tls_connect(proxy.addr("t"), config, "other.test") else {
        panic!("a name no certificate has must fail verification");
    };
    assert!(err.to_string().contains("site.test"), "{err}");
}

#[test]
fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let pki = Pki::new("ca");
    let clients = Pki::new("clients");
    let strangers = Pki::new("strangers");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let (good, good_key) = clients.issue("client-1", &["client-1"], true);
    let (bad, bad_key) = strangers.issue("intruder", &["intruder"], true);
    let (listener, up) = upstream_listener();
    let extra = format!("client_ca = \"{}\"\n", toml_path(&clients.ca_path()));
    let proxy = Proxy::start(&route(up, &terminate(&cert, &key, &extra)));
    let addr = proxy.addr("t");

    // With a certificate from the right CA: relayed, and /connections names the client.
    let mut c = tls_connect(
        addr,
        client_config(pki.roots(), Some((&good, &good_key))),
        "site.test",
    )
    .unwrap();
    c.write_all(b"hi").unwrap();
    let mut u = accept(&listener);
    let mut buf = [0u8; 2];
    u.read_exact(&mut buf).unwrap();
    let (_, body) = admin_get(proxy.admin(), "/connections");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tls = &v["pairs"][0]["client"]["tls"];
    assert!(
        tls["peer_subject"]
            .as_str()
            .unwrap_or("")
            .contains("client-1"),
        "{body}"
    );
    assert_eq!(tls["sni"], "site.test", "{body}");
    assert!(
        tls["version"].as_str().unwrap_or("").starts_with("TLSv1."),
        "{body}"
    );
    assert!(
        tls["cipher_suite"].as_str().unwrap_or("").contains("TLS"),
        "{body}"
    );
    drop(c);
    drop(u);

    // No certificate, then one from another CA: refused, and no upstream connection is made.
    for (what, auth) in [
        ("no certificate", None),
        ("another CA", Some((bad.as_path(), bad_key.as_path()))),
    ] {
        let before = proxy
            .closes()
            .iter()
            .filter(|v| reason(v) == "client_tls_error")
            .count();
        // TLS 1.3: the client's side of the handshake ends before the server
        // has checked its certificate; the refusal arrives as an alert.
        let refused = match tls_connect(addr, client_config(pki.roots(), auth), "site.test") {
            Err(_) => true,
            Ok(mut c) => {
                let _ = c.write_all(b"x");
                let mut b = [0u8; 1];
                c.read(&mut b).is_err()
            }
        };
        assert!(refused, "{what}: must be refused");
        let closes = proxy.wait_events(
            |v| message(v) == "pair closed" && reason(v) == "client_tls_error",
            before + 1,
            Duration::from_secs(10),
        );
        let error = closes[before]["error"].as_str().unwrap_or("").to_string();
        println!("{what}: {error}");
        assert!(!error.is_empty(), "{what}: {}", closes[before]);
    }
    listener.set_nonblocking(true).unwrap();
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a refused client must not cost an upstream connection"
    );
}

#[test]
fn originating_to_openssl_s_server_with_a_custom_ca_and_failures() {
    if !have_tool("openssl") {
        return;
    }
    let pki = Pki::new("ca");
    let other = Pki::new("other");
    let (cert, key) = pki.issue("backend", &["backend.test"], false);
    let port = reserved_addr().port();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            &toml_path(&cert),
            "-key",
            &toml_path(&key),
            "-rev",
            "-quiet",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(up).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let tables = |ca: &Path, name: &str| {
        format!(
            "[route.upstream.tls]\nca = \"{}\"\nserver_name = \"{name}\"\nhandshake_timeout = \"5s\"\n",
            toml_path(ca)
        )
    };
    // Right CA and name: s_server -rev answers each line reversed.
    {
        let proxy = Proxy::start(&route(up, &tables(&pki.ca_path(), "backend.test")));
        let mut c = connect(proxy.addr("t"));
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c.write_all(b"kaproxy\n").unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&got).contains("yxorpak") {
            assert!(
                Instant::now() < deadline,
                "no answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            let n = c.read(&mut b).unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        let (_, body) = admin_get(proxy.admin(), "/connections");
        assert!(body.contains("\"sni\":\"backend.test\""), "{body}");
    }
    // Wrong CA, then wrong name: upstream_tls_error with rustls's words.
    for (ca, name, words) in [
        (other.ca_path(), "backend.test", "UnknownIssuer"),
        (pki.ca_path(), "wrong.test", "not valid for name"),
    ] {
        let proxy = Proxy::start(&route(up, &tables(&ca, name)));
        let mut c = connect(proxy.addr("t"));
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut b = [0u8; 16];
        let r = c.read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "the client must see a reset, got {r:?}"
        );
        let closes = proxy.wait_closes(1, Duration::from_secs(10));
        assert_eq!(reason(&closes[0]), "upstream_tls_error", "{}", closes[0]);
        let error = closes[0]["error"].as_str().unwrap_or("");
        assert!(error.contains(words), "{words}: {}", closes[0]);
        let (_, metrics) = admin_get(proxy.admin(), "/metrics");
        assert_eq!(
            metric(
                &metrics,
                "kaproxy_tls_handshake_failures_total{route=\"t\",side=\"upstream\",reason=\"certificate\"}"
            ),
            Some(1.0),
            "{metrics}"
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

#[test]
fn both_sides_tls_carry_64_mib_each_way_at_once() {
    const SIZE: usize = 64 * 1024 * 1024;
    let pki = Pki::new("ca");
    let (proxy, listener, scfg, ccfg) = both_sides(&pki, "");
    let addr = proxy.addr("t");
    listener.set_nonblocking(true).unwrap();
    let (up_digest, client_digest) = block_on(Duration::from_secs(240), async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(scfg)
                .accept(sock)
                .await
                .unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let send = tokio::spawn(async move {
                w.write_all(&pattern(2, SIZE)).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::with_capacity(SIZE);
            r.read_to_end(&mut got).await.unwrap();
            send.await.unwrap();
            sha(&got)
        });
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("site.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(ccfg)
            .connect(name, sock)
            .await
            .unwrap();
        let (mut r, mut w) = tokio::io::split(tls);
        let send = tokio::spawn(async move {
            w.write_all(&pattern(1, SIZE)).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(SIZE);
        r.read_to_end(&mut got).await.unwrap();
        send.await.unwrap();
        (server.await.unwrap(), sha(&got))
    });
    assert_eq!(up_digest, sha(&pattern(1, SIZE)), "client to upstream");
    assert_eq!(client_digest, sha(&pattern(2, SIZE)), "upstream to client");
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
    assert_eq!(closes[0]["bytes.client_to_upstream"], SIZE as u64);
    assert_eq!(closes[0]["bytes.upstream_to_client"], SIZE as u64);
}

#[test]
fn half_close_through_tls_keeps_the_other_direction_flowing() {
    // The client sends its request and close_notify, then keeps reading:
    // the upstream (plain TCP) sees a FIN, answers after it, and the client
    // gets the whole answer followed by kaproxy's close_notify.
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&route(up, &terminate(&cert, &key, "")));
    let mut c = tls_connect(
        proxy.addr("t"),
        client_config(pki.roots(), None),
        "site.test",
    )
    .unwrap();
    c.write_all(b"request").unwrap();
    close_notify(&mut c);
    let mut u = accept(&listener);
    u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = Vec::new();
    u.read_to_end(&mut req).unwrap();
    assert_eq!(req, b"request", "the upstream reads the request, then EOF");
    let answer = pattern(9, 3 * 1024 * 1024);
    u.write_all(&answer).unwrap();
    u.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("a clean end: close_notify, not a truncation");
    assert_eq!(got.len(), answer.len());
    assert!(got == answer);
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);

    // The other way: the TLS upstream ends first with close_notify and the
    // plain client's request still goes through after it.
    let pki = Pki::new("ca2");
    let (ucert, ukey) = pki.issue("backend", &["backend.test"], false);
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&route(
        up,
        &format!(
            "[route.upstream.tls]\nca = \"{}\"\nserver_name = \"backend.test\"\n",
            toml_path(&pki.ca_path())
        ),
    ));
    let mut c = connect(proxy.addr("t"));
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let scfg = server_config(&ucert, &ukey);
    let server = thread::spawn(move || {
        let mut s = tls_accept(&listener, scfg);
        s.write_all(b"banner").unwrap();
        close_notify(&mut s);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let mut banner = Vec::new();
    c.read_to_end(&mut banner).unwrap();
    assert_eq!(banner, b"banner", "the client sees the banner, then a FIN");
    c.write_all(b"after the half-close").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), b"after the half-close");
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
}

#[test]
fn an_upstream_that_closes_without_close_notify_is_a_cut_not_an_end() {
    let pki = Pki::new("ca");
    let (ucert, ukey) = pki.issue("backend", &["backend.test"], false);
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&route(
        up,
        &format!(
            "[route.upstream.tls]\nca = \"{}\"\nserver_name = \"backend.test\"\n",
            toml_path(&pki.ca_path())
        ),
    ));
    let mut c = connect(proxy.addr("t"));
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let scfg = server_config(&ucert, &ukey);
    let mut s = tls_accept(&listener, scfg);
    s.write_all(b"partial answer").unwrap();
    s.flush().unwrap();
    // A FIN with no close_notify before it.
    s.sock.shutdown(Shutdown::Both).unwrap();
    let mut got = [0u8; 14];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"partial answer");
    let r = c.read(&mut [0u8; 1]);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a truncated TLS stream must reach the client as a reset, not a clean FIN: {r:?}"
    );
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    assert_eq!(reason(&closes[0]), "upstream_error", "{}", closes[0]);
    assert!(
        closes[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("close_notify"),
        "{}",
        closes[0]
    );
}

/// The first flight of a TLS client: a ClientHello, as bytes.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let mut conn = ClientConnection::new(
        client_config(pki.roots(), None),
        ServerName::try_from("site.test").unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn a_handshake_that_stalls_half_way_ends_at_handshake_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    const TOLERANCE: Duration = Duration::from_millis(1500);
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&route(
        up,
        &terminate(&cert, &key, "handshake_timeout = \"1s\"\n"),
    ));
    let hello = client_hello(&pki);
    let mut c = connect(proxy.addr("t"));
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // Half a ClientHello, then silence.
    c.write_all(&hello[..hello.len() / 2]).unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 64];
    let r = c.read(&mut b);
    let elapsed = t0.elapsed();
    println!(
        "stalled handshake closed after {elapsed:?} (bound {TIMEOUT:?} + {TOLERANCE:?}): {r:?}"
    );
    assert!(
        elapsed >= TIMEOUT - Duration::from_millis(100),
        "{elapsed:?}"
    );
    assert!(elapsed <= TIMEOUT + TOLERANCE, "{elapsed:?}");
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "client_tls_error", "{}", closes[0]);
    assert!(
        closes[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "{}",
        closes[0]
    );
    let (_, metrics) = admin_get(proxy.admin(), "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "kaproxy_tls_handshake_failures_total{route=\"t\",side=\"client\",reason=\"timeout\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    listener.set_nonblocking(true).unwrap();
    assert!(matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock));
}

#[test]
fn a_peer_that_dies_mid_handshake_is_closed_at_once() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let (_listener, up) = upstream_listener();
    // A long handshake timeout: the close must come from the reset, not the timer.
    let proxy = Proxy::start(&route(
        up,
        &terminate(&cert, &key, "handshake_timeout = \"30s\"\n"),
    ));
    let hello = client_hello(&pki);
    let mut c = connect(proxy.addr("t"));
    c.write_all(&hello[..hello.len() / 2]).unwrap();
    thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    reset(c);
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    println!("closed {:?} after the reset", t0.elapsed());
    assert_eq!(reason(&closes[0]), "client_tls_error", "{}", closes[0]);
    let (_, metrics) = admin_get(proxy.admin(), "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "kaproxy_tls_handshake_failures_total{route=\"t\",side=\"client\",reason=\"closed\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn tls_to_a_slow_reader_is_not_cut_by_timers_and_loses_nothing() {
    // The client reads slowly, for longer than idle_timeout, while the
    // upstream's data waits in kaproxy (rustls and the sockets) and the other
    // direction keeps carrying the client's small writes.
    const SIZE: usize = 6 * 1024 * 1024;
    let pki = Pki::new("ca");
    let (proxy, listener, scfg, ccfg) = both_sides(&pki, "idle_timeout = \"1s\"\n");
    let addr = proxy.addr("t");
    listener.set_nonblocking(true).unwrap();
    let (digest, ticks) = block_on(Duration::from_secs(120), async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(scfg)
                .accept(sock)
                .await
                .unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let send = tokio::spawn(async move {
                w.write_all(&pattern(5, SIZE)).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            send.await.unwrap();
            got.len()
        });
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("site.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(ccfg)
            .connect(name, sock)
            .await
            .unwrap();
        let (mut r, mut w) = tokio::io::split(tls);
        let writer = tokio::spawn(async move {
            for _ in 0..20 {
                w.write_all(b"tick").await.unwrap();
                w.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(SIZE);
        let mut chunk = vec![0u8; 64 * 1024];
        let start = Instant::now();
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            // About 2.5 s for the whole: longer than idle_timeout.
            if start.elapsed() < Duration::from_millis(2500) {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        writer.await.unwrap();
        (sha(&got), server.await.unwrap())
    });
    assert_eq!(digest, sha(&pattern(5, SIZE)));
    assert_eq!(ticks, 80);
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
}

#[test]
fn check_reports_certificates_and_names_bad_files() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test", "127.0.0.1"], false);
    let (_, other_key) = pki.issue("other", &["other.test"], false);
    // Relative paths resolve against the config file's directory.
    let dir = pki.dir.path();
    let good = "[[route]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\n[route.client.tls]\ncertificates = [{ cert = \"site.pem\", key = \"site.key\" }]\nclient_ca = \"ca.pem\"\n[route.upstream]\nservers = [\"127.0.0.1:9\"]\n[route.upstream.tls]\nca = \"ca.pem\"\ninsecure_skip_verify = true\n".to_string();
    let path = dir.join("k.toml");
    std::fs::write(&path, &good).unwrap();
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "certificate {}: CN=site [site.test, 127.0.0.1], valid until",
            cert.display()
        )),
        "{text}"
    );
    assert!(text.contains("WARNING: insecure_skip_verify"), "{text}");
    let _ = key;

    // rcgen's default validity ends in 4096, so nothing expires; a key that
    // does not belong to the certificate is an error naming file, line and field.
    let bad = good.replace("key = \"site.key\"", "key = \"other.key\"");
    std::fs::write(&path, &bad).unwrap();
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!(
            "{}:5: route \"t\".client.tls.certificates[0]: {}: this key does not belong to",
            path.display(),
            other_key.display()
        )),
        "{err}"
    );
    let bad = good.replace("client_ca = \"ca.pem\"", "client_ca = \"missing.pem\"");
    std::fs::write(&path, &bad).unwrap();
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":6: route \"t\".client.tls.client_ca:")
            && err.contains("missing.pem: cannot read"),
        "{err}"
    );
    let bad = good.replace("ca = \"ca.pem\"\ninsecure", "ca = \"site.key\"\ninsecure");
    std::fs::write(&path, &bad).unwrap();
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":10: route \"t\".upstream.tls.ca:") && err.contains("no CERTIFICATE"),
        "{err}"
    );
}

#[test]
fn client_tls_is_inherited_from_defaults_and_can_be_turned_off() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let up = echo_server();
    let config = format!(
        "[defaults.client.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n[[route]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{up}\"]\n[[route]]\nname = \"p\"\nlisten = \"127.0.0.1:0\"\n[route.client.tls]\nenabled = false\n[route.upstream]\nservers = [\"{up}\"]\n",
        toml_path(&cert),
        toml_path(&key)
    );
    let proxy = Proxy::start(&config);
    let mut c = tls_connect(
        proxy.addr("t"),
        client_config(pki.roots(), None),
        "site.test",
    )
    .unwrap();
    c.write_all(b"tls").unwrap();
    let mut b = [0u8; 3];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"tls");
    let mut p = connect(proxy.addr("p"));
    assert_eq!(round_trip(&mut p, b"plain").unwrap(), b"plain");
}

// ---- Half-dead pairs with TLS on the failing side, in a private network
// namespace (same bounds as tests/keepalive_netns.rs): keepalive idle 1 s,
// interval 1 s, probes 2, so the bound is 3 s; tolerance 2 s.

const BOUND: Duration = Duration::from_secs(3);
const TOLERANCE: Duration = Duration::from_secs(2);
const FAST: &str = "{ idle = \"1s\", interval = \"1s\", probes = 2 }";
const SLOW: &str = "{ idle = \"60s\" }";
const CLIENT_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn netns_config(up: SocketAddr, client_ka: &str, upstream_ka: &str, tables: &str) -> String {
    format!(
        "shutdown_grace = \"1s\"\n[[route]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nkeepalive = {client_ka}\n[route.upstream]\nservers = [\"{up}\"]\nkeepalive = {upstream_ka}\n{tables}"
    )
}

fn expect_reset_within_bound(
    what: &str,
    read: impl FnOnce() -> std::io::Result<usize>,
    t0: Instant,
    proxy: &Proxy,
    why: &str,
) {
    let r = read();
    let elapsed = t0.elapsed();
    println!("{what}: survivor closed {elapsed:?} after the black-hole (bound {BOUND:?} + tolerance {TOLERANCE:?}): {r:?}");
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "{what}: the survivor should see a reset, got {r:?}"
    );
    assert!(elapsed <= BOUND + TOLERANCE, "{what}: took {elapsed:?}");
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), why, "{}", closes[0]);
}

#[test]
fn tls_client_silent_while_idle_resets_the_upstream_within_the_bound() {
    isolated(
        "tls_client_silent_while_idle_resets_the_upstream_within_the_bound",
        || {
            let pki = Pki::new("ca");
            let (cert, key) = pki.issue("site", &["site.test"], false);
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&netns_config(up, FAST, SLOW, &terminate(&cert, &key, "")));
            let sock = connect_from(CLIENT_A, proxy.addr("t"));
            let mut c = tls_over(sock, client_config(pki.roots(), None), "site.test").unwrap();
            c.write_all(b"ping").unwrap();
            let mut u = accept(&listener);
            u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut b = [0u8; 4];
            u.read_exact(&mut b).unwrap();
            u.write_all(b"pong").unwrap();
            c.read_exact(&mut b).unwrap();

            blackhole_host_port(CLIENT_A, proxy.addr("t").port());
            let t0 = Instant::now();
            expect_reset_within_bound(
                "tls client silent while idle",
                || u.read(&mut b),
                t0,
                &proxy,
                "client_dead",
            );
        },
    );
}

#[test]
fn tls_upstream_silent_while_idle_resets_the_client_within_the_bound() {
    isolated(
        "tls_upstream_silent_while_idle_resets_the_client_within_the_bound",
        || {
            let pki = Pki::new("ca");
            let (ucert, ukey) = pki.issue("backend", &["backend.test"], false);
            let (listener, up) = upstream_listener();
            let tables = format!(
                "[route.upstream.tls]\nca = \"{}\"\nserver_name = \"backend.test\"\n",
                toml_path(&pki.ca_path())
            );
            let proxy = Proxy::start(&netns_config(up, SLOW, FAST, &tables));
            let mut c = connect_from(CLIENT_A, proxy.addr("t"));
            c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            c.write_all(b"ping").unwrap();
            let mut u = tls_accept(&listener, server_config(&ucert, &ukey));
            let mut b = [0u8; 4];
            u.read_exact(&mut b).unwrap();
            u.write_all(b"pong").unwrap();
            u.flush().unwrap();
            c.read_exact(&mut b).unwrap();

            blackhole_port(up.port());
            let t0 = Instant::now();
            expect_reset_within_bound(
                "tls upstream silent while idle",
                || c.read(&mut b),
                t0,
                &proxy,
                "upstream_dead",
            );
        },
    );
}

#[test]
fn tls_client_silent_with_data_in_flight_is_caught_by_user_timeout() {
    isolated(
        "tls_client_silent_with_data_in_flight_is_caught_by_user_timeout",
        || {
            let pki = Pki::new("ca");
            let (cert, key) = pki.issue("site", &["site.test"], false);
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&netns_config(up, FAST, SLOW, &terminate(&cert, &key, "")));
            let sock = connect_from(CLIENT_A, proxy.addr("t"));
            let mut c = tls_over(sock, client_config(pki.roots(), None), "site.test").unwrap();
            c.write_all(b"ping").unwrap();
            let mut u = accept(&listener);
            u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut b = [0u8; 4];
            u.read_exact(&mut b).unwrap();

            // The upstream streams towards the TLS client until its connection
            // breaks; keepalive never fires while data is unacknowledged.
            blackhole_host_port(CLIENT_A, proxy.addr("t").port());
            let t0 = Instant::now();
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let chunk = vec![7u8; 64 * 1024];
                let deadline = Instant::now() + Duration::from_secs(30);
                let r = loop {
                    if Instant::now() > deadline {
                        break Ok(0);
                    }
                    if let Err(e) = u.write_all(&chunk) {
                        break Err(e);
                    }
                };
                let _ = tx.send(r.map(|_| 0usize));
            });
            let r = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("writer ends");
            expect_reset_within_bound(
                "tls client silent with data in flight",
                || r,
                t0,
                &proxy,
                "client_dead",
            );
            drop(c);
        },
    );
}

/// A TLS server answering every HTTP request with 200, until the test ends.
fn https_upstream(config: Arc<ServerConfig>) -> SocketAddr {
    let (listener, addr) = upstream_listener();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut sock) = s else { break };
            let config = config.clone();
            thread::spawn(move || {
                sock.set_read_timeout(Some(IO_TIMEOUT)).ok();
                let Ok(mut conn) = ServerConnection::new(config) else {
                    return;
                };
                while conn.is_handshaking() {
                    if conn.complete_io(&mut sock).is_err() {
                        return;
                    }
                }
                let mut s = rustls::StreamOwned::new(conn, sock);
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    addr
}

#[test]
fn health_checks_of_a_tls_upstream_do_the_handshake() {
    let pki = Pki::new("ca");
    let other = Pki::new("other");
    let (ucert, ukey) = pki.issue("backend", &["backend.test"], false);
    let up = https_upstream(server_config(&ucert, &ukey));
    let config = |ca: &Path| {
        route(
            up,
            &format!(
                "health_check = {{ http = \"/health\", interval = \"200ms\", timeout = \"2s\", rise = 1, fall = 1 }}\n[route.upstream.tls]\nca = \"{}\"\nserver_name = \"backend.test\"\n",
                toml_path(ca)
            ),
        )
    };
    let wait_for = |proxy: &Proxy, state: &str, detail: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = admin_get(proxy.admin(), "/upstreams");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let server = &v["routes"][0]["servers"][0];
            let got = server["last_check"]["detail"].as_str().unwrap_or("");
            if server["state"] == state && got.contains(detail) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never {state} ({detail}): {body}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    // The right CA: an HTTP check over TLS answers 200, the server is up.
    let proxy = Proxy::start(&config(&pki.ca_path()));
    wait_for(&proxy, "up", "answered 200");
    // A CA that did not sign the server's certificate: the check fails on the handshake.
    let proxy = Proxy::start(&config(&other.ca_path()));
    wait_for(&proxy, "down", "TLS handshake");
}

#[test]
fn the_proxy_header_comes_before_tls_both_in_and_out() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let (ucert, ukey) = pki.issue("backend", &["backend.test"], false);
    let (listener, up) = upstream_listener();
    let tables = format!(
        "send_proxy = \"v1\"\n[route.client]\nproxy_protocol = true\n{}[route.upstream.tls]\nca = \"{}\"\nserver_name = \"backend.test\"\n",
        terminate(&cert, &key, ""),
        toml_path(&pki.ca_path())
    );
    let proxy = Proxy::start(&route(up, &tables));
    let scfg = server_config(&ucert, &ukey);
    let server = thread::spawn(move || {
        // The PROXY line arrives in the clear, then the TLS handshake on the same socket.
        let mut sock = accept(&listener);
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            sock.read_exact(&mut b).unwrap();
            line.push(b[0]);
            assert!(line.len() <= 107, "no PROXY line: {line:?}");
        }
        let mut conn = ServerConnection::new(scfg).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .expect("TLS after the PROXY line");
        }
        let mut s = rustls::StreamOwned::new(conn, sock);
        let mut msg = [0u8; 5];
        s.read_exact(&mut msg).unwrap();
        s.write_all(b"world").unwrap();
        s.flush().unwrap();
        (String::from_utf8_lossy(&line).into_owned(), msg)
    });
    let mut sock = TcpStream::connect(proxy.addr("t")).unwrap();
    sock.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 443\r\n")
        .unwrap();
    let mut c = tls_over(sock, client_config(pki.roots(), None), "site.test").unwrap();
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"world");
    let (line, msg) = server.join().unwrap();
    assert_eq!(&msg, b"hello");
    assert!(
        line.starts_with("PROXY TCP4 192.0.2.7 127.0.0.1 5555 443"),
        "the original client goes to the server: {line:?}"
    );
}

#[test]
fn min_version_and_alpn_are_what_clients_get() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["site.test"], false);
    let up = echo_server();
    let extra = "min_version = \"1.3\"\nalpn = [\"http/1.1\"]\n";
    let proxy = Proxy::start(&route(up, &terminate(&cert, &key, extra)));
    // ALPN: the client offers two, the route speaks one.
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let c = tls_connect(proxy.addr("t"), Arc::new(cfg), "site.test").unwrap();
    assert_eq!(c.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        c.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(c);
    // A TLS 1.2-only client is refused: no version in common.
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    assert!(tls_connect(proxy.addr("t"), Arc::new(cfg), "site.test").is_err());
    let closes = proxy.wait_events(
        |v| message(v) == "pair closed" && reason(v) == "client_tls_error",
        1,
        Duration::from_secs(10),
    );
    println!("{}", closes[0]);
    let (_, metrics) = admin_get(proxy.admin(), "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "kaproxy_tls_handshake_failures_total{route=\"t\",side=\"client\",reason=\"negotiation\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn an_upstream_that_never_answers_the_handshake_times_out_as_upstream_tls_error() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    const TOLERANCE: Duration = Duration::from_millis(1500);
    let pki = Pki::new("ca");
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&route(
        up,
        &format!(
            "[route.upstream.tls]\nca = \"{}\"\nserver_name = \"backend.test\"\nhandshake_timeout = \"1s\"\n",
            toml_path(&pki.ca_path())
        ),
    ));
    let mut c = connect(proxy.addr("t"));
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // Accepted and read from, never answered.
    let mut u = accept(&listener);
    let t0 = Instant::now();
    let mut hello = [0u8; 5];
    u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    u.read_exact(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    let r = c.read(&mut [0u8; 1]);
    let elapsed = t0.elapsed();
    println!(
        "upstream handshake timed out after {elapsed:?} (bound {TIMEOUT:?} + {TOLERANCE:?}): {r:?}"
    );
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the client is reset: {r:?}"
    );
    assert!(elapsed <= TIMEOUT + TOLERANCE, "{elapsed:?}");
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "upstream_tls_error", "{}", closes[0]);
    let (_, metrics) = admin_get(proxy.admin(), "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "kaproxy_tls_handshake_failures_total{route=\"t\",side=\"upstream\",reason=\"timeout\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    drop(u);
}

/// A reload reads the TLS files again, changed configuration or not: a
/// renewed certificate at the same path serves the next handshakes, a live
/// TLS session carries on untouched, and a file that cannot be used rejects
/// the whole reload while the certificates in force keep serving.
#[test]
fn a_reload_reads_renewed_certificates_and_live_sessions_carry_on() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.issue("site", &["old.test"], false);
    let up = echo_server();
    let config_text = route(up, &terminate(&cert, &key, ""));
    let proxy = Proxy::start(&config_text);
    let addr = proxy.addr("t");
    let roots = client_config(pki.roots(), None);
    let echo = |c: &mut ClientStream, msg: &[u8]| {
        c.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    };
    let mut live = tls_connect(addr, roots.clone(), "old.test").unwrap();
    echo(&mut live, b"before");

    // Renewed in place: same paths, another name.
    let (renewed, renewed_key) = pki.issue("site", &["new.test"], false);
    assert_eq!((&renewed, &renewed_key), (&cert, &key));
    let outcome = proxy.reload(&config_text);
    assert_eq!(message(&outcome), "configuration reloaded", "{outcome}");
    proxy.wait_events(
        |v| message(v) == "TLS certificates and keys read again",
        1,
        Duration::from_secs(5),
    );
    let mut fresh = tls_connect(addr, roots.clone(), "new.test").expect("the renewed certificate");
    echo(&mut fresh, b"renewed");
    let old = tls_connect(addr, roots.clone(), "old.test");
    assert!(old.is_err(), "the old certificate is no longer served");
    echo(&mut live, b"the live session carries on");

    // A key that does not parse: rejected whole, the renewed one still serves.
    std::fs::write(&key, "not a key").unwrap();
    let outcome = proxy.reload(&config_text);
    assert!(message(&outcome).contains("rejected"), "{outcome}");
    let error = outcome["error"].as_str().unwrap();
    assert!(error.contains(&key.display().to_string()), "{error}");
    let mut again = tls_connect(addr, roots, "new.test").expect("still served");
    echo(&mut again, b"still");
    echo(&mut live, b"still live");
}
