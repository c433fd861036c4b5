//! Half-dead pairs for real: inside a private network namespace one side's packets
//! are black-holed with nftables and the survivor's fate is timed against the
//! configured bound.
//!
//! Failing side: keepalive idle 1 s, interval 1 s, probes 2, so the bound is
//! 1 + 1 × 2 = 3 s, and user_timeout auto is 3 s as well. Tolerance: 2 s on top of
//! the bound, for kernel timer granularity and scheduling on a loaded CI machine.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::netns::{blackhole_host_port, blackhole_port, connect_from, isolated, run};
use common::*;

const BOUND: Duration = Duration::from_secs(3);
const TOLERANCE: Duration = Duration::from_secs(2);
const FAST: &str = "{ idle = \"1s\", interval = \"1s\", probes = 2 }";
const CLIENT_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const CLIENT_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

fn config(up: SocketAddr, client_ka: &str, upstream_ka: &str) -> String {
    format!(
        "shutdown_grace = \"1s\"\n[[route]]\nname = \"ka\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nkeepalive = {client_ka}\n[route.upstream]\nservers = [\"{up}\"]\nkeepalive = {upstream_ka}\n"
    )
}

fn is_reset(r: &std::io::Result<usize>) -> bool {
    matches!(r, Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe))
}

/// Establishes a pair and passes one message each way, so both sides are known good.
fn open_pair(proxy: &Proxy, listener: &TcpListener, from: IpAddr) -> (TcpStream, TcpStream) {
    let mut c = connect_from(from, proxy.addr("ka"));
    let mut u = accept(listener);
    u.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    u.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    u.read_exact(&mut buf).unwrap();
    u.write_all(b"pong").unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    (c, u)
}

fn assert_within_bound(what: &str, elapsed: Duration) {
    println!("{what}: survivor closed {elapsed:?} after the black-hole (bound {BOUND:?} + tolerance {TOLERANCE:?})");
    assert!(
        elapsed <= BOUND + TOLERANCE,
        "{what}: took {elapsed:?}, bound {BOUND:?} + {TOLERANCE:?}"
    );
}

/// Waits for `survivor` to be reset by kaproxy, times it from `t0` against the
/// bound, and checks the logged close reason.
fn expect_reset_within_bound(
    what: &str,
    survivor: &mut TcpStream,
    t0: Instant,
    proxy: &Proxy,
    why: &str,
) {
    let mut buf = [0u8; 1];
    let r = survivor.read(&mut buf);
    let elapsed = t0.elapsed();
    assert!(
        is_reset(&r),
        "{what}: the survivor should see a reset, got {r:?}"
    );
    assert_within_bound(what, elapsed);
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), why, "{}", closes[0]);
}

#[test]
fn client_silent_while_idle_resets_the_upstream_within_the_bound() {
    isolated(
        "client_silent_while_idle_resets_the_upstream_within_the_bound",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, FAST, "{ idle = \"60s\" }"));
            let (_c, mut u) = open_pair(&proxy, &listener, CLIENT_A);

            blackhole_host_port(CLIENT_A, proxy.addr("ka").port());
            let t0 = Instant::now();
            expect_reset_within_bound(
                "client silent while idle",
                &mut u,
                t0,
                &proxy,
                "client_dead",
            );
        },
    );
}

#[test]
fn upstream_silent_while_idle_resets_the_client_within_the_bound() {
    isolated(
        "upstream_silent_while_idle_resets_the_client_within_the_bound",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, "{ idle = \"60s\" }", FAST));
            let (mut c, _u) = open_pair(&proxy, &listener, CLIENT_A);

            blackhole_port(up.port());
            let t0 = Instant::now();
            expect_reset_within_bound(
                "upstream silent while idle",
                &mut c,
                t0,
                &proxy,
                "upstream_dead",
            );
        },
    );
}

#[test]
fn client_silent_with_data_in_flight_is_caught_by_user_timeout() {
    isolated(
        "client_silent_with_data_in_flight_is_caught_by_user_timeout",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, FAST, "{ idle = \"60s\" }"));
            let (mut c, u) = open_pair(&proxy, &listener, CLIENT_A);

            // The upstream streams to the client until its connection breaks; keepalive
            // never fires while data is unacknowledged, only TCP_USER_TIMEOUT does.
            let (tx, rx) = mpsc::channel();
            let writer = thread::spawn(move || {
                let mut u = u;
                let chunk = vec![7u8; 64 * 1024];
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    if let Err(e) = u.write_all(&chunk) {
                        tx.send((Instant::now(), e.kind())).unwrap();
                        return;
                    }
                }
                tx.send((Instant::now(), ErrorKind::TimedOut)).unwrap();
            });
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while got < 4 * 1024 * 1024 {
                got += c.read(&mut buf).unwrap();
            }
            blackhole_host_port(CLIENT_A, proxy.addr("ka").port());
            let t0 = Instant::now();
            let (t1, kind) = rx
                .recv_timeout(Duration::from_secs(40))
                .expect("writer reports");
            writer.join().unwrap();
            assert!(
                matches!(kind, ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
                "upstream write should fail with a reset, got {kind:?}"
            );
            assert_within_bound(
                "client silent with data in flight (user_timeout auto = 3 s)",
                t1 - t0,
            );

            let closes = proxy.wait_closes(1, Duration::from_secs(5));
            assert_eq!(reason(&closes[0]), "client_dead", "{}", closes[0]);
        },
    );
}

#[test]
fn healthy_idle_pair_survives_three_bounds_and_still_passes_data() {
    isolated(
        "healthy_idle_pair_survives_three_bounds_and_still_passes_data",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, FAST, FAST));
            let (mut c, mut u) = open_pair(&proxy, &listener, CLIENT_A);

            let quiet = BOUND * 3;
            thread::sleep(quiet / 2);
            // kaproxy's own sockets (client side and upstream side) carry the keepalive
            // timer: the probes keeping this pair alive are really being sent.
            let ss = run(&["ss", "-tnoi", "state", "established"]);
            let timers = ss.matches("timer:(keepalive").count();
            assert!(
                timers >= 2,
                "expected keepalive timers on both of kaproxy's sockets:\n{ss}"
            );
            thread::sleep(quiet - quiet / 2);

            assert!(
                proxy.closes().is_empty(),
                "nothing may close a healthy pair: {:?}",
                proxy.closes()
            );
            c.write_all(b"after").unwrap();
            let mut buf = [0u8; 5];
            u.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"after");
            u.write_all(b"reply").unwrap();
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"reply");
        },
    );
}

#[test]
fn fifty_silent_clients_of_a_hundred_close_exactly_their_fifty_upstreams() {
    isolated(
        "fifty_silent_clients_of_a_hundred_close_exactly_their_fifty_upstreams",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, FAST, "{ idle = \"60s\" }"));
            let mut pairs = Vec::new();
            for i in 0..100u32 {
                let from = if i < 50 { CLIENT_A } else { CLIENT_B };
                let mut c = connect_from(from, proxy.addr("ka"));
                c.write_all(&i.to_be_bytes()).unwrap();
                let mut u = accept(&listener);
                let mut id = [0u8; 4];
                u.read_exact(&mut id).unwrap();
                assert_eq!(u32::from_be_bytes(id), i, "pairs accepted in order");
                pairs.push((c, u));
            }

            blackhole_host_port(CLIENT_A, proxy.addr("ka").port());
            let t0 = Instant::now();
            let watch = BOUND + TOLERANCE + Duration::from_secs(1);
            let watchers: Vec<_> = pairs
                .iter()
                .map(|(_, u)| {
                    let mut u = u.try_clone().unwrap();
                    u.set_read_timeout(Some(watch)).unwrap();
                    thread::spawn(move || {
                        let mut buf = [0u8; 1];
                        let r = u.read(&mut buf);
                        (r, t0.elapsed())
                    })
                })
                .collect();
            for (i, w) in watchers.into_iter().enumerate() {
                let (r, elapsed) = w.join().unwrap();
                if i < 50 {
                    assert!(
                        is_reset(&r),
                        "pair {i} (silent client): expected reset, got {r:?}"
                    );
                    assert!(
                        elapsed <= BOUND + TOLERANCE,
                        "pair {i}: reset after {elapsed:?}"
                    );
                } else {
                    assert!(
                        matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
                        "pair {i} (live client): must stay open, got {r:?}"
                    );
                }
            }
            for (i, (c, u)) in pairs.iter_mut().enumerate().skip(50) {
                c.write_all(b"live").unwrap();
                let mut buf = [0u8; 4];
                u.read_exact(&mut buf).unwrap();
                u.write_all(&buf).unwrap();
                c.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"live", "pair {i} passes data");
            }
            let closes = proxy.wait_closes(50, Duration::from_secs(5));
            assert_eq!(closes.len(), 50, "exactly the 50 silent pairs closed");
            assert!(
                closes.iter().all(|v| reason(v) == "client_dead"),
                "{closes:?}"
            );
            assert!(closes
                .iter()
                .all(|v| span_field(v, "client.addr").starts_with("127.0.0.2:")));
        },
    );
}

#[test]
fn client_silent_during_an_upload_to_a_slow_upstream_resets_the_upstream_within_the_bound() {
    isolated(
        "client_silent_during_an_upload_to_a_slow_upstream_resets_the_upstream_within_the_bound",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, FAST, "{ idle = \"60s\" }"));
            let (mut c, u) = open_pair(&proxy, &listener, CLIENT_A);
            // The upstream reads nothing more: kaproxy's client→upstream direction
            // blocks writing, and no direction is reading the client socket.
            let sent = fill_until_blocked(&mut c);
            blackhole_host_port(CLIENT_A, proxy.addr("ka").port());
            let t0 = Instant::now();
            let e = wait_socket_error(&u, BOUND + TOLERANCE + Duration::from_secs(5));
            let elapsed = t0.elapsed();
            assert_eq!(
                e.kind(),
                ErrorKind::ConnectionReset,
                "upstream told with a reset"
            );
            assert_within_bound(
                &format!("client silent during an upload ({sent} bytes queued)"),
                elapsed,
            );
            let closes = proxy.wait_closes(1, Duration::from_secs(5));
            assert_eq!(reason(&closes[0]), "client_dead", "{}", closes[0]);
        },
    );
}

#[test]
fn client_that_stopped_reading_and_then_vanished_is_dead_not_stalled() {
    isolated(
        "client_that_stopped_reading_and_then_vanished_is_dead_not_stalled",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, FAST, "{ idle = \"60s\" }"));
            let (mut c, u) = open_pair(&proxy, &listener, CLIENT_A);
            let writer = thread::spawn(move || {
                let mut u = u;
                write_pattern(&mut u, 1 << 40)
            });
            read_pattern(&mut c, 0, 1 << 20).unwrap();
            // Alive but not reading for two seconds: window probes are answered.
            thread::sleep(Duration::from_secs(2));
            assert!(proxy.closes().is_empty(), "{:?}", proxy.closes());
            blackhole_host_port(CLIENT_A, proxy.addr("ka").port());
            let t0 = Instant::now();
            let closes = proxy.wait_closes(1, Duration::from_secs(20));
            let elapsed = t0.elapsed();
            assert_eq!(reason(&closes[0]), "client_dead", "{}", closes[0]);
            // Window probes go out on the kernel's backed-off schedule (here about
            // 3 s and 6.2 s after the client stopped reading). Death needs two
            // of them unanswered and the bound passed since the first: about
            // 4.2 s to 5 s after the black-hole. The limit allows one more
            // backed-off interval (3.2 s) on top of the bound and tolerance.
            let limit = BOUND + Duration::from_millis(3200) + TOLERANCE;
            println!("stalled client vanished: closed {elapsed:?} after the black-hole (limit {limit:?})");
            assert!(elapsed <= limit, "took {elapsed:?}, limit {limit:?}");
            let err = writer.join().unwrap().expect_err("upstream's stream cut");
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                ),
                "upstream told with a reset, got {err:?}"
            );
        },
    );
}

#[test]
fn upstream_silent_when_the_client_half_closes_resets_the_client_within_the_bound() {
    isolated(
        "upstream_silent_when_the_client_half_closes_resets_the_client_within_the_bound",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, "{ idle = \"60s\" }", FAST));
            let (mut c, _u) = open_pair(&proxy, &listener, CLIENT_A);
            blackhole_port(up.port());
            // The FIN kaproxy passes on is never acknowledged; keepalive does not
            // run while it is outstanding, so only the watchdog can tell.
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let t0 = Instant::now();
            expect_reset_within_bound(
                "upstream silent after the client's FIN",
                &mut c,
                t0,
                &proxy,
                "upstream_dead",
            );
        },
    );
}

#[test]
fn client_gone_before_a_write_is_dead_within_the_bound_of_its_vanishing() {
    isolated(
        "client_gone_before_a_write_is_dead_within_the_bound_of_its_vanishing",
        || {
            let (listener, up) = upstream_listener();
            let proxy = Proxy::start(&config(up, FAST, "{ idle = \"60s\" }"));
            let (_c, mut u) = open_pair(&proxy, &listener, CLIENT_A);
            blackhole_host_port(CLIENT_A, proxy.addr("ka").port());
            let t0 = Instant::now();
            // Keepalive probes at 1 s and 2 s go unanswered; then data arrives
            // for the client, which stops the keepalive timer. The client has
            // still been silent since the black-hole, not since the write.
            thread::sleep(Duration::from_millis(2500));
            u.write_all(&[1u8; 1000]).unwrap();
            expect_reset_within_bound(
                "client gone 2.5 s before a write",
                &mut u,
                t0,
                &proxy,
                "client_dead",
            );
        },
    );
}

/// The deciding test of live re-tuning: a pair opened under slow client
/// keepalive (60 s + 3 × 10 s = 90 s) is reloaded to 1 s / 1 s / 2, then its
/// client is cut off. Only settings that reached the already-open socket can
/// find that within the new 3 s bound.
#[test]
fn a_reload_retunes_a_live_client_socket_and_its_death_is_found_within_the_new_bound() {
    isolated(
        "a_reload_retunes_a_live_client_socket_and_its_death_is_found_within_the_new_bound",
        || {
            let (listener, up) = upstream_listener();
            let slow = "{ idle = \"60s\", interval = \"10s\", probes = 3 }";
            let proxy = Proxy::start(&config(up, slow, "{ idle = \"60s\" }"));
            let (_c, mut u) = open_pair(&proxy, &listener, CLIENT_A);
            let addr = proxy.addr("ka");
            let fast = config(up, FAST, "{ idle = \"60s\" }")
                .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
            let outcome = proxy.reload(&fast);
            assert_eq!(message(&outcome), "configuration reloaded", "{outcome}");
            proxy.wait_events(
                |v| message(v) == "keepalive updated on 1 live client sockets",
                1,
                Duration::from_secs(5),
            );

            blackhole_host_port(CLIENT_A, addr.port());
            let t0 = Instant::now();
            expect_reset_within_bound(
                "client silent after a reload to 1s/1s/2",
                &mut u,
                t0,
                &proxy,
                "client_dead",
            );
        },
    );
}
