//! Peers that are alive but slow to read: never taken for dead, never cut by a
//! timer that measures silence, closed only by an explicit `stall_timeout`.
//!
//! Every stream here is 64 MiB of a checked pattern: more than the kernel
//! buffers between the peers and kaproxy can hold, so a paused reader really
//! leaves kaproxy with data waiting to be written.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

const TOTAL: u64 = 64 * 1024 * 1024;
const FAST_CLIENT: &str =
    "[route.client]\nkeepalive = { idle = \"1s\", interval = \"1s\", probes = 2 }\n";

/// An upstream that waits for the client's request (its whole direction, up
/// to EOF, if `after_eof`), then sends `total` bytes of the pattern and FIN.
fn streaming_upstream(
    listener: TcpListener,
    total: u64,
    after_eof: bool,
) -> JoinHandle<std::io::Result<()>> {
    thread::spawn(move || {
        let mut u = accept(&listener);
        u.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = [0u8; 64];
        if after_eof {
            while u.read(&mut buf)? > 0 {}
        } else {
            u.read_exact(&mut buf[..3])?;
        }
        write_pattern(&mut u, total)?;
        u.shutdown(Shutdown::Write)?;
        // Wait for the client's end before closing, so nothing is cut here.
        while u.read(&mut buf)? > 0 {}
        Ok(())
    })
}

/// Reads the whole stream, pausing for `pause` after `first` bytes, and checks
/// that it ends with a clean EOF right after `total` bytes.
fn read_with_a_pause(c: &mut TcpStream, first: u64, pause: Duration, total: u64) {
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    read_pattern(c, 0, first).expect("first part");
    thread::sleep(pause);
    read_pattern(c, first, total - first).expect("the rest, after the pause");
    let mut one = [0u8; 1];
    assert_eq!(
        c.read(&mut one).unwrap(),
        0,
        "clean end right after the stream"
    );
}

#[test]
fn idle_timeout_never_cuts_a_download_whose_reader_paused() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("paused", &[up], "idle_timeout = \"1s\""));
    let upstream = streaming_upstream(listener, TOTAL, false);
    let mut c = connect(proxy.addr("paused"));
    c.write_all(b"GET").unwrap();
    // Three idle timeouts long, while kaproxy holds data for the client.
    read_with_a_pause(&mut c, 3 << 20, Duration::from_secs(3), TOTAL);
    c.shutdown(Shutdown::Write).unwrap();
    upstream
        .join()
        .unwrap()
        .expect("upstream streamed without error");
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
}

#[test]
fn half_close_timeout_restarts_on_every_byte_of_the_open_direction() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("trickle", &[up], "half_close_timeout = \"1s\""));
    // The client sends its request and half-closes; the reply trickles in for
    // 3 s, three times the timeout, but never pauses for 1 s.
    let upstream = thread::spawn(move || {
        let mut u = accept(&listener);
        let mut buf = [0u8; 64];
        while u.read(&mut buf).unwrap() > 0 {}
        for i in 0..15u8 {
            u.write_all(&[i; 100]).unwrap();
            thread::sleep(Duration::from_millis(200));
        }
        u.shutdown(Shutdown::Write).unwrap();
    });
    let mut c = connect(proxy.addr("trickle"));
    c.write_all(b"GET").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)
        .expect("reply ends cleanly, not with a reset");
    assert_eq!(reply.len(), 1500);
    upstream.join().unwrap();
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
}

#[test]
fn half_close_timeout_never_cuts_a_reply_waiting_for_a_paused_reader() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route(
        "hc-paused",
        &[up],
        "half_close_timeout = \"1s\"",
    ));
    let upstream = streaming_upstream(listener, TOTAL, true);
    let mut c = connect(proxy.addr("hc-paused"));
    c.write_all(b"GET").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    read_with_a_pause(&mut c, 1 << 20, Duration::from_secs(3), TOTAL);
    upstream
        .join()
        .unwrap()
        .expect("upstream streamed without error");
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
}

#[test]
fn a_live_client_that_stops_reading_is_not_taken_for_dead() {
    // Keepalive bound 1 + 1 × 2 = 3 s, user_timeout auto = 3 s. The client
    // stops reading for 8 s: its kernel keeps answering window probes.
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("slow", &[up], FAST_CLIENT));
    let upstream = streaming_upstream(listener, TOTAL, false);
    let mut c = connect(proxy.addr("slow"));
    c.write_all(b"GET").unwrap();
    read_pattern(&mut c, 0, 1 << 20).unwrap();
    thread::sleep(Duration::from_secs(8));
    assert!(
        proxy.closes().is_empty(),
        "a reader that is alive was closed: {:?}",
        proxy.closes()
    );
    read_pattern(&mut c, 1 << 20, TOTAL - (1 << 20)).expect("the whole stream after the pause");
    c.shutdown(Shutdown::Write).unwrap();
    upstream
        .join()
        .unwrap()
        .expect("upstream streamed without error");
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
}

/// Tolerance on a stall: the watchdog looks every stall_timeout / 4 (0.5 s
/// here), plus scheduling on a loaded machine.
const STALL_TOLERANCE: Duration = Duration::from_millis(1500);

/// Waits for the pair to close as `why` and checks it came `stall_timeout`
/// (2 s) after `stopped`, within [`STALL_TOLERANCE`].
fn expect_stall_close(proxy: &Proxy, stopped: Instant, why: &str) {
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    let elapsed = stopped.elapsed();
    assert_eq!(reason(&closes[0]), why, "{}", closes[0]);
    println!("{why}: closed {elapsed:?} after the peer stopped reading (stall_timeout 2s)");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed <= Duration::from_secs(2) + STALL_TOLERANCE,
        "closed {elapsed:?} after the peer stopped, stall_timeout 2 s + {STALL_TOLERANCE:?}"
    );
}

/// A writer thread's stream must end with a reset, not complete.
fn expect_cut_by_reset<T>(writer: JoinHandle<std::io::Result<T>>, what: &str) {
    let Err(err) = writer.join().unwrap() else {
        panic!("{what}: the stream was not cut");
    };
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "{what}: told with a reset, got {err:?}"
    );
}

#[test]
fn stall_timeout_closes_a_client_that_reads_nothing_as_client_stalled() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route(
        "stall",
        &[up],
        "[route.client]\nkeepalive = { idle = \"1s\", interval = \"1s\", probes = 2, stall_timeout = \"2s\" }\n",
    ));
    let upstream = streaming_upstream(listener, TOTAL, false);
    let mut c = connect(proxy.addr("stall"));
    c.write_all(b"GET").unwrap();
    read_pattern(&mut c, 0, 1 << 20).unwrap();
    let stopped = Instant::now();
    expect_stall_close(&proxy, stopped, "client_stalled");
    expect_cut_by_reset(upstream, "the upstream's stream was cut");
    // What was already in the client's buffers is still there, then a reset:
    // never a clean end of a stream that was cut.
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match c.read(&mut buf) {
            Ok(0) => break Ok(0),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "client sees a reset, got {end:?}"
    );
}

#[test]
fn stall_timeout_closes_an_upstream_that_reads_nothing_as_upstream_stalled() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route(
        "ustall",
        &[up],
        "[route.upstream.keepalive]\nstall_timeout = \"2s\"\n",
    ));
    let mut c = connect(proxy.addr("ustall"));
    // The client uploads without pause until its connection breaks.
    let uploader = thread::spawn(move || write_pattern(&mut c, 1 << 40));
    let mut u = accept(&listener);
    read_pattern(&mut u, 0, 1 << 20).unwrap();
    // From here the upstream reads nothing, though its kernel still ACKs.
    let stopped = Instant::now();
    expect_stall_close(&proxy, stopped, "upstream_stalled");
    expect_cut_by_reset(uploader, "the client's upload was cut");
    let e = wait_socket_error(&u, Duration::from_secs(5));
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "upstream reset too");
}

#[test]
fn half_close_timeout_never_cuts_a_finished_reply_still_queued_for_a_slow_client() {
    // A `Connection: close` server: the whole reply and its FIN are handed to
    // kaproxy at once, and kaproxy has passed the FIN on, so the pair is
    // half-closed while the reply still waits in the client's direction.
    let total: u64 = 4 << 20;
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("hc-fin", &[up], "half_close_timeout = \"1s\""));
    let upstream = thread::spawn(move || {
        let mut u = accept(&listener);
        let mut buf = [0u8; 3];
        u.read_exact(&mut buf)?;
        write_pattern(&mut u, total)?;
        u.shutdown(Shutdown::Write)
    });
    let mut c = connect(proxy.addr("hc-fin"));
    c.write_all(b"GET").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    read_pattern(&mut c, 0, 64 * 1024).expect("first part");
    // Three half-close timeouts long, while kaproxy holds reply data for the client.
    thread::sleep(Duration::from_secs(3));
    // The client ends its side before reading the rest: once kaproxy has
    // handed everything to the client's kernel, the timer rightly runs, and a
    // slow reader of the last megabytes (a loaded machine, a debug build)
    // would otherwise see it fire.
    c.shutdown(Shutdown::Write).unwrap();
    read_pattern(&mut c, 64 * 1024, total - 64 * 1024).expect("the rest, after the pause");
    let mut one = [0u8; 1];
    assert_eq!(
        c.read(&mut one).unwrap(),
        0,
        "clean end right after the stream"
    );
    if let Err(e) = upstream.join().unwrap() {
        panic!(
            "the upstream could not send its reply: {e}; kaproxy logged {:?}",
            proxy.events()
        );
    }
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed", "{}", closes[0]);
}

#[test]
fn an_upstream_that_shrinks_its_window_and_reads_nothing_is_not_taken_for_dead() {
    // user_timeout auto = 3 s upstream. The server shrinks its receive buffer
    // after accept (as servers that size it do) and reads nothing for 10 s: its
    // kernel still answers every retransmission, only further and further apart.
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route(
        "shrunk",
        &[up],
        "[route.upstream.keepalive]\nidle = \"1s\"\ninterval = \"1s\"\nprobes = 2\n",
    ));
    let mut c = connect(proxy.addr("shrunk"));
    c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let u = accept(&listener);
    socket2::SockRef::from(&u)
        .set_recv_buffer_size(4096)
        .unwrap();
    let uploader = thread::spawn(move || write_pattern(&mut c, 1 << 40));
    thread::sleep(Duration::from_secs(10));
    assert!(
        proxy.closes().is_empty(),
        "a live upstream was closed: {:?}",
        proxy.closes()
    );
    // Now the server goes away for real: that, and only that, ends the pair.
    reset(u);
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    assert_eq!(reason(&closes[0]), "upstream_reset", "{}", closes[0]);
    expect_cut_by_reset(uploader, "the upload was cut by the reset");
}
