//! Upstream connects under pressure: passive ejection after a burst of failed
//! connects, `connect_timeout` per address of a host name, and least-connections
//! counting the connects still in flight.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::netns::{blackhole_server, isolated_with_files};
use common::*;
use serde_json::Value;

/// A listener whose accept queue is full, so the kernel drops further SYNs
/// (tcp_abort_on_overflow is off by default) and connects to it hang: a server
/// that accepts slowly, without root. Returns what must stay alive for that.
fn slow_server() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => return (socket, queued, addr),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// Opens `n` clients one after the other, each sending one line, then waits for
/// every echo: how long each waited for its echo, in connection order.
fn echo_delays(proxy_addr: SocketAddr, n: usize) -> Vec<Duration> {
    let readers: Vec<_> = (0..n)
        .map(|k| {
            let mut c = connect(proxy_addr);
            let msg = format!("client {k}\n");
            c.write_all(msg.as_bytes()).unwrap();
            let sent = Instant::now();
            thread::spawn(move || {
                let mut buf = vec![0u8; msg.len()];
                c.read_exact(&mut buf)
                    .unwrap_or_else(|e| panic!("client {k}: no echo: {e}"));
                assert_eq!(buf, msg.as_bytes());
                let waited = sent.elapsed();
                (c, waited)
            })
        })
        .collect();
    let done: Vec<(TcpStream, Duration)> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    done.into_iter().map(|(_, waited)| waited).collect()
}

fn upstreams(proxy: &Proxy) -> Value {
    let (status, body) = admin_get(proxy.admin(), "/upstreams");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/upstreams: {e}: {body}"))
}

/// The ejection `/upstreams` shows for the first server of the only route, after
/// checking that it is ejected, and that it was ejected once.
fn ejected_for_ms(proxy: &Proxy, server: SocketAddr) -> u64 {
    let v = upstreams(proxy);
    let s = &v["routes"][0]["servers"][0];
    assert_eq!(s["address"], server.to_string(), "{v}");
    assert_eq!(s["state"], "ejected", "{v}");
    let ejections: Vec<Value> = proxy
        .events()
        .into_iter()
        .filter(|e| message(e) == "server state changed" && e["state"] == "ejected")
        .collect();
    assert_eq!(ejections.len(), 1, "{ejections:?}");
    s["ejected_for_ms"].as_u64().expect("ejected_for_ms")
}

#[test]
fn a_burst_of_refused_connects_ejects_for_the_base_backoff_only() {
    let dead = dead_port();
    let live = echo_server();
    let proxy = Proxy::start(&one_route("burst", &[dead, live], ""));
    let addr = proxy.addr("burst");
    // Twenty clients at once: round-robin sends every other one to the dead
    // server first, so its refusals overlap with attempts still in flight.
    let start = Arc::new(Barrier::new(20));
    let clients: Vec<_> = (0..20)
        .map(|k| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let mut c = connect(addr);
                let msg = format!("client {k}");
                assert_eq!(round_trip(&mut c, msg.as_bytes()).unwrap(), msg.as_bytes());
                c
            })
        })
        .collect();
    let _open: Vec<TcpStream> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let left = ejected_for_ms(&proxy, dead);
    assert!(
        left <= 10_000,
        "ejected for {left} ms; one burst must eject for the base backoff (10 s) only"
    );
}

#[test]
fn a_burst_of_timed_out_connects_ejects_for_the_base_backoff_only() {
    // Unlike refusals, these all fail together after connect_timeout, so every
    // one of them was in flight when the first failures ejected the server.
    let (_slow, _queued, slow) = slow_server();
    let live = echo_server();
    let proxy = Proxy::start(&one_route("burst", &[slow, live], ""));
    // Round-robin sends every other client to the slow server first: 5 of 10,
    // more than the 3 failures (default) that eject it.
    let delays = echo_delays(proxy.addr("burst"), 10);
    let retried = delays
        .iter()
        .filter(|d| **d >= Duration::from_millis(900))
        .count();
    assert_eq!(
        retried, 5,
        "clients that waited out connect_timeout: {delays:?}"
    );
    let left = ejected_for_ms(&proxy, slow);
    assert!(
        left <= 10_000,
        "ejected for {left} ms; one burst must eject for the base backoff (10 s) only"
    );
}

const NAMED: &str = "multi.kaproxy.test";
const DEAD_NAME: &str = "dead.kaproxy.test";
const HOSTS: &str = "127.0.0.1 localhost\n\
    127.0.0.2 multi.kaproxy.test\n127.0.0.3 multi.kaproxy.test\n\
    127.0.0.4 dead.kaproxy.test\n127.0.0.5 dead.kaproxy.test\n";
const SILENT_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53));

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The addresses `name` resolves to here, in the order a connect tries them.
fn resolved(name: &str, port: u16) -> Vec<SocketAddr> {
    (name, port).to_socket_addrs().unwrap().collect()
}

fn named_route(host: &str, port: u16) -> String {
    format!(
        "[[route]]\nname = \"named\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{host}:{port}\"]\nconnect_timeout = \"1s\"\npassive_ejection = {{ failures = 0 }}\n"
    )
}

#[test]
fn each_address_of_a_name_gets_its_own_connect_timeout() {
    isolated_with_files(
        "each_address_of_a_name_gets_its_own_connect_timeout",
        &[("/etc/hosts", HOSTS)],
        || {
            let live = echo_on(SocketAddr::new(ip(3), 0));
            let dropped = SocketAddr::new(ip(2), live.port());
            assert_eq!(
                resolved(NAMED, live.port()),
                vec![dropped, live],
                "the black-holed address is tried first"
            );
            blackhole_server(dropped);
            let proxy = Proxy::start(&named_route(NAMED, live.port()));
            let mut c = connect(proxy.addr("named"));
            let start = Instant::now();
            let echoed = round_trip(&mut c, b"second address");
            let elapsed = start.elapsed();
            assert_eq!(
                echoed.unwrap_or_else(|e| panic!("{e}; log:\n{}", proxy.raw_log())),
                b"second address"
            );
            println!("relayed via {live} after {elapsed:?} (1 s for {dropped}, tolerance 1.5 s)");
            assert!(
                elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
                "relayed after {elapsed:?}: 1 s on {dropped}, then {live} at once"
            );
            drop(c);
            let closes = proxy.wait_closes(1, Duration::from_secs(5));
            assert_eq!(span_field(&closes[0], "upstream.addr"), live.to_string());
        },
    );
}

#[test]
fn a_failed_connect_names_every_address_tried() {
    isolated_with_files(
        "a_failed_connect_names_every_address_tried",
        &[("/etc/hosts", HOSTS)],
        || {
            // Nothing listens on either address: the first drops SYNs, the second refuses.
            let port = TcpListener::bind(SocketAddr::new(ip(5), 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let (dropped, refused) = (SocketAddr::new(ip(4), port), SocketAddr::new(ip(5), port));
            assert_eq!(resolved(DEAD_NAME, port), vec![dropped, refused]);
            blackhole_server(dropped);
            let proxy = Proxy::start(&named_route(DEAD_NAME, port));
            let mut c = connect(proxy.addr("named"));
            let mut buf = [0u8; 1];
            let r = c.read(&mut buf);
            assert!(
                matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                "expected reset, got {r:?}"
            );
            let closes = proxy.wait_closes(1, Duration::from_secs(5));
            assert_eq!(reason(&closes[0]), "connect_failed");
            let error = closes[0]["error"].as_str().unwrap_or("");
            println!("{error}");
            assert!(
                error.contains(&format!("{dropped}: timed out after 1s"))
                    && error.contains(&format!("{refused}: Connection refused")),
                "{error}"
            );
        },
    );
}

#[test]
fn name_resolution_is_bounded_by_connect_timeout() {
    let resolv = format!("nameserver {SILENT_DNS}\noptions timeout:10 attempts:1\n");
    isolated_with_files(
        "name_resolution_is_bounded_by_connect_timeout",
        &[("/etc/hosts", HOSTS), ("/etc/resolv.conf", &resolv)],
        || {
            // A name server that reads queries and never answers.
            let _dns = std::net::UdpSocket::bind(SocketAddr::new(SILENT_DNS, 53)).unwrap();
            let proxy = Proxy::start(&named_route("nowhere.kaproxy.test", 80));
            let start = Instant::now();
            let mut c = connect(proxy.addr("named"));
            let mut buf = [0u8; 1];
            let r = c.read(&mut buf);
            let elapsed = start.elapsed();
            assert!(
                matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                "expected reset, got {r:?}"
            );
            assert!(
                elapsed < Duration::from_millis(2500),
                "closed after {elapsed:?}: 1 s bound on resolving + 1.5 s tolerance"
            );
            let closes = proxy.wait_closes(1, Duration::from_secs(5));
            let error = closes[0]["error"].as_str().unwrap_or("");
            assert!(
                error.contains("cannot resolve nowhere.kaproxy.test: no answer within 1s"),
                "{error}"
            );
        },
    );
}

#[test]
fn least_connections_counts_connects_in_flight() {
    let (_slow, _queued, slow) = slow_server();
    let fast = echo_server();
    let config = format!(
        "[[route]]\nname = \"lc\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [{{ address = \"{slow}\", weight = 1 }}, {{ address = \"{fast}\", weight = 10 }}]\nbalance = \"least-connections\"\nconnect_timeout = \"2s\"\n"
    );
    let proxy = Proxy::start(&config);
    // Both idle: the tie goes to the heavier fast server, so the next client goes
    // to the slow one, whose connect hangs for connect_timeout. Counted from its
    // start, that one attempt weighs as much as ten pairs on the fast server:
    // every later client goes to the fast one, none waits for the slow one.
    let delays = echo_delays(proxy.addr("lc"), 7);
    let waited: Vec<&Duration> = delays
        .iter()
        .filter(|d| **d >= Duration::from_secs(1))
        .collect();
    assert_eq!(
        waited.len(),
        1,
        "only one client waits out the slow server's connect: {delays:?}"
    );
    // Log lines reach stdout through kaproxy's writer thread: wait for the one
    // expected, then make sure it is the only one.
    let failed = |e: &serde_json::Value| message(e) == "upstream connect failed";
    proxy.wait_events(failed, 1, Duration::from_secs(5));
    let failures = proxy.events().into_iter().filter(failed).count();
    assert_eq!(failures, 1, "one connect to the slow server timed out");
}
