//! SIGTERM/SIGINT: stop accepting at once, drain for shutdown_grace, then cut the rest.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn refused(addr: std::net::SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

#[test]
fn sigterm_refuses_new_connections_and_lets_a_live_pair_finish() {
    let (listener, up) = upstream_listener();
    let mut proxy = Proxy::start(
        &one_route("drain", &[up], "")
            .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"10s\""),
    );
    let addr = proxy.addr("drain");
    let mut c = connect(addr);
    c.write_all(b"req").unwrap();
    let mut u = accept(&listener);
    let mut buf = [0u8; 3];
    u.read_exact(&mut buf).unwrap();

    proxy.signal("TERM");
    // Probing before the listener is closed could itself be accepted as a pair.
    proxy.wait_events(
        |v| message(v) == "stopped accepting",
        1,
        Duration::from_secs(3),
    );
    assert!(refused(addr), "a new connect after SIGTERM is refused");

    // The live pair is mid-exchange: its reply still arrives in full.
    let reply = vec![42u8; 1024 * 1024];
    u.write_all(&reply).unwrap();
    drop(u);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, reply);
    drop(c);

    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "exit 0 after a complete drain: {status:?}"
    );
    let closes = proxy.closes();
    assert_eq!(closes.len(), 1);
    assert_eq!(reason(&closes[0]), "completed");
    assert!(
        proxy
            .events()
            .iter()
            .any(|v| message(v) == "drain completed"),
        "{}",
        proxy.raw_log()
    );
}

#[test]
fn pair_open_at_the_grace_deadline_is_closed_with_reason_shutdown() {
    let up = echo_server();
    let mut proxy = Proxy::start(
        &one_route("cut", &[up], "").replace("shutdown_grace = \"2s\"", "shutdown_grace = \"1s\""),
    );
    let mut c = connect(proxy.addr("cut"));
    assert_eq!(round_trip(&mut c, b"hi").unwrap(), b"hi");

    let start = Instant::now();
    proxy.signal("INT");
    let status = proxy.wait_exit(Duration::from_secs(5));
    let elapsed = start.elapsed();
    assert!(status.success(), "{status:?}");
    // Grace 1 s, plus at most 1 s to close what is left.
    assert!(elapsed < Duration::from_secs(2), "exited after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "exited after {elapsed:?}, before the grace period"
    );
    let mut buf = [0u8; 1];
    let r = c.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a cut pair is reset, got {r:?}"
    );
    let closes = proxy.closes();
    assert_eq!(closes.len(), 1);
    assert_eq!(reason(&closes[0]), "shutdown");
    assert!(
        proxy.raw_log().contains("drain incomplete"),
        "{}",
        proxy.raw_log()
    );
}

#[test]
fn second_signal_exits_at_once() {
    let up = echo_server();
    let mut proxy = Proxy::start(
        &one_route("twice", &[up], "")
            .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"60s\""),
    );
    let mut c = connect(proxy.addr("twice"));
    assert_eq!(round_trip(&mut c, b"hi").unwrap(), b"hi");
    proxy.signal("TERM");
    proxy.wait_events(|v| message(v) == "draining", 1, Duration::from_secs(5));
    thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "second signal took {:?}",
        start.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(1),
        "an interrupted drain is not a clean exit"
    );
    // Even then, the pair was closed, reset, and accounted for.
    let closes = proxy.wait_closes(1, Duration::from_secs(2));
    assert_eq!(reason(&closes[0]), "shutdown");
    let mut buf = [0u8; 1];
    let r = c.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the cut pair is reset, got {r:?}"
    );
}
