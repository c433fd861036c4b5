//! Upstream connects under pressure: passive ejection after a burst of failed
//! connects.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

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
