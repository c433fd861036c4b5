//! How pairs end: connect failures, resets passed on, FIN vs RST, idle and half-close timers.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn one_server_down_every_connection_goes_to_the_other() {
    let up = echo_server();
    let down = dead_port();
    let proxy = Proxy::start(&one_route("failover", &[down, up], ""));
    for i in 0..10 {
        let mut c = connect(proxy.addr("failover"));
        let msg = format!("request {i}");
        assert_eq!(
            round_trip(&mut c, msg.as_bytes()).unwrap(),
            msg.as_bytes(),
            "connection {i} relayed via the live server"
        );
    }
    let closes = proxy.wait_closes(10, Duration::from_secs(5));
    assert!(
        closes.iter().all(|c| reason(c) == "completed"),
        "{closes:?}"
    );
    assert!(closes
        .iter()
        .all(|c| span_field(c, "upstream.addr") == up.to_string()));
    // Round-robin starts at the dead server every other time until passive
    // ejection (3 failures in a row by default) takes it out of the rotation.
    let failures = proxy
        .events()
        .iter()
        .filter(|v| message(v) == "upstream connect failed")
        .count();
    assert_eq!(failures, 3, "connect failures before ejection");
    let ejected = proxy
        .events()
        .into_iter()
        .find(|v| message(v) == "server state changed")
        .expect("the dead server was ejected");
    assert_eq!(ejected["state"], "ejected");
    assert_eq!(ejected["server"], down.to_string());
}

#[test]
fn all_servers_down_closes_the_client_promptly_with_connect_failed() {
    let proxy = Proxy::start(&one_route("nowhere", &[dead_port(), dead_port()], ""));
    let start = Instant::now();
    // The reset can beat connect() itself back to the client on loopback; either
    // way the client must see a reset, never a clean but empty reply.
    let r = match std::net::TcpStream::connect_timeout(
        &proxy.addr("nowhere"),
        Duration::from_secs(5),
    ) {
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 16];
            c.read(&mut buf)
        }
        Err(e) => Err(e),
    };
    let elapsed = start.elapsed();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected reset, got {r:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}, refused connects should fail at once"
    );
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "connect_failed");
    assert!(
        closes[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("refused"),
        "{}",
        closes[0]
    );
}

/// A pair whose upstream resets it after reading "hello"; returns what the client's
/// next read gives and the logged close reason.
fn upstream_resets(route_extra: &str) -> (std::io::Result<usize>, String) {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("rst", &[up], route_extra));
    let upstream = thread::spawn(move || {
        let mut s = accept(&listener);
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let mut c = connect(proxy.addr("rst"));
    c.write_all(b"hello").unwrap();
    upstream.join().unwrap();
    let mut buf = [0u8; 1];
    let r = c.read(&mut buf);
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    (r, reason(&closes[0]).to_string())
}

#[test]
fn upstream_reset_resets_the_client() {
    let (r, reason) = upstream_resets("");
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected reset, got {r:?}"
    );
    assert_eq!(reason, "upstream_reset");
}

#[test]
fn on_peer_failure_close_sends_fin_instead() {
    let (r, reason) = upstream_resets("on_peer_failure = \"close\"");
    assert!(
        matches!(r, Ok(0)),
        "clean EOF with on_peer_failure = close, got {r:?}"
    );
    assert_eq!(reason, "upstream_reset");
}

#[test]
fn client_reset_resets_the_upstream() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("crst", &[up], ""));
    let c = connect(proxy.addr("crst"));
    let mut s = accept(&listener);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let mut buf = [0u8; 1];
    let r = s.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected reset, got {r:?}"
    );
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "client_reset");
}

#[test]
fn idle_timeout_closes_a_silent_pair_but_not_a_busy_one() {
    let up = echo_server();
    let proxy = Proxy::start(&one_route("idle", &[up], "idle_timeout = \"1s\""));
    let mut busy = connect(proxy.addr("idle"));
    let mut silent = connect(proxy.addr("idle"));
    assert_eq!(round_trip(&mut silent, b"x").unwrap(), b"x");
    let start = Instant::now();
    // Keep one pair busy for 2.5 s, well past the 1 s idle timeout.
    while start.elapsed() < Duration::from_millis(2500) {
        assert_eq!(round_trip(&mut busy, b"tick").unwrap(), b"tick");
        thread::sleep(Duration::from_millis(200));
    }
    let mut buf = [0u8; 1];
    assert_eq!(
        silent.read(&mut buf).unwrap(),
        0,
        "silent pair closed with FIN"
    );
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(closes.len(), 1, "only the silent pair closed: {closes:?}");
    assert_eq!(reason(&closes[0]), "idle_timeout");
    let ms = closes[0]["duration_ms"].as_u64().unwrap();
    // Bound 1 s from the last byte; tolerance 1.5 s for scheduling on a loaded machine.
    assert!(
        (1000..2500).contains(&ms),
        "idle pair closed after {ms} ms, expected 1 s + tolerance"
    );
    assert_eq!(round_trip(&mut busy, b"still here").unwrap(), b"still here");
}

#[test]
fn half_close_timeout_bounds_a_pair_stuck_half_closed() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("stuck", &[up], "half_close_timeout = \"1s\""));
    let mut c = connect(proxy.addr("stuck"));
    let mut s = accept(&listener);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        s.read(&mut buf).unwrap(),
        0,
        "upstream sees the client's FIN"
    );
    // The upstream never finishes its direction.
    let start = Instant::now();
    let r = c.read(&mut buf);
    let elapsed = start.elapsed();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "cut short is a reset, got {r:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}, bound 1 s + 2 s tolerance"
    );
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "half_close_timeout");
}

#[test]
fn host_names_are_resolved_on_connect() {
    // "localhost" may resolve to ::1 before 127.0.0.1; the echo server listens on
    // 127.0.0.1 only, so this also shows the addresses being tried one by one.
    let up = echo_server();
    let config = format!(
        "[[route]]\nname = \"named\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"localhost:{}\"]\n",
        up.port()
    );
    let proxy = Proxy::start(&config);
    for _ in 0..3 {
        let mut c = connect(proxy.addr("named"));
        assert_eq!(round_trip(&mut c, b"by name").unwrap(), b"by name");
    }
    let closes = proxy.wait_closes(3, Duration::from_secs(5));
    assert!(
        closes
            .iter()
            .all(|c| reason(c) == "completed" && span_field(c, "upstream.addr") == up.to_string()),
        "{closes:?}"
    );
}

#[test]
fn client_reset_while_its_upload_waits_on_a_slow_upstream_resets_the_upstream() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("upload", &[up], ""));
    let mut c = connect(proxy.addr("upload"));
    // The upstream never reads, so kaproxy's client→upstream direction ends up
    // blocked writing while nothing else reads the client socket.
    let u = accept(&listener);
    let sent = fill_until_blocked(&mut c);
    assert!(sent > 0);
    let t0 = Instant::now();
    reset(c);
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "client_reset", "{}", closes[0]);
    let e = wait_socket_error(&u, Duration::from_secs(5));
    assert_eq!(
        e.kind(),
        ErrorKind::ConnectionReset,
        "upstream told with a reset"
    );
    println!(
        "upload of {sent} bytes cut by a client reset: upstream reset after {:?}",
        t0.elapsed()
    );
}

#[test]
fn upstream_reset_while_a_download_waits_on_a_slow_client_resets_the_client() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("download", &[up], ""));
    let c = connect(proxy.addr("download"));
    let mut u = accept(&listener);
    // The client never reads: kaproxy's upstream→client direction blocks writing.
    let sent = fill_until_blocked(&mut u);
    assert!(sent > 0);
    reset(u);
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    // Not upstream_error (ENOTCONN from a half-close towards a reset peer).
    assert_eq!(reason(&closes[0]), "upstream_reset", "{}", closes[0]);
    let e = wait_socket_error(&c, Duration::from_secs(5));
    assert_eq!(
        e.kind(),
        ErrorKind::ConnectionReset,
        "client told with a reset"
    );
}
