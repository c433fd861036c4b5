//! Bytes through the real binary: integrity both ways at once, half-close, forward mode.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::*;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const SIZE: usize = 64 * 1024 * 1024;

fn random(seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Sends `data` on a clone of `s` while reading everything the peer sends until EOF;
/// returns the digest of what was read.
fn send_and_receive(s: std::net::TcpStream, data: Vec<u8>) -> (Vec<u8>, usize) {
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    writer.join().unwrap();
    (hasher.finalize().to_vec(), total)
}

#[test]
fn sixty_four_mib_each_way_at_once_arrive_intact() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("bulk", &[up], ""));

    // Both payloads are made before anyone connects: in a debug build on a
    // loaded machine that takes seconds, which must not eat into accept's deadline.
    let up_data = random(2);
    let up_digest = Sha256::digest(&up_data).to_vec();
    let client_data = random(1);
    let client_digest = Sha256::digest(&client_data).to_vec();
    let s = connect(proxy.addr("bulk"));
    let upstream = thread::spawn(move || {
        let s = accept(&listener);
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        send_and_receive(s, up_data)
    });
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (got_at_client, n_client) = send_and_receive(s, client_data);
    let (got_at_upstream, n_upstream) = upstream.join().unwrap();

    assert_eq!(n_upstream, SIZE, "upstream received every byte");
    assert_eq!(n_client, SIZE, "client received every byte");
    assert_eq!(got_at_upstream, client_digest, "client→upstream digest");
    assert_eq!(got_at_client, up_digest, "upstream→client digest");

    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed");
    assert_eq!(closes[0]["bytes.client_to_upstream"], SIZE as u64);
    assert_eq!(closes[0]["bytes.upstream_to_client"], SIZE as u64);
    assert_eq!(span_field(&closes[0], "route"), "bulk");
    assert_eq!(span_field(&closes[0], "upstream.addr"), up.to_string());
    assert!(!span_field(&closes[0], "client.addr").is_empty());
}

#[test]
fn half_closed_client_receives_the_whole_reply() {
    let (listener, up) = upstream_listener();
    let proxy = Proxy::start(&one_route("half", &[up], ""));
    // The upstream answers only after it has read the whole request (EOF),
    // like a protocol that uses the FIN as "request complete".
    let reply: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let expected = reply.clone();
    let upstream = thread::spawn(move || {
        let mut s = accept(&listener);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).unwrap();
        s.write_all(&reply).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        request
    });

    let mut c = connect(proxy.addr("half"));
    c.write_all(b"request body").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();

    assert_eq!(upstream.join().unwrap(), b"request body");
    assert_eq!(got.len(), expected.len(), "whole reply after half-close");
    assert!(got == expected, "reply bytes intact");
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed");
}

#[test]
fn forward_subcommand_relays_without_a_file() {
    let up = echo_server();
    let proxy = Proxy::forward(&[
        "127.0.0.1:0",
        &up.to_string(),
        "--client-keepalive",
        "20s/5s/3",
        "--upstream-keepalive",
        "30s/5s/3/off",
    ]);
    let mut c = connect(proxy.addr("forward"));
    assert_eq!(round_trip(&mut c, b"ping").unwrap(), b"ping");
    drop(c);
    let closes = proxy.wait_closes(1, Duration::from_secs(5));
    assert_eq!(reason(&closes[0]), "completed");
}

#[test]
fn many_sequential_and_parallel_pairs_all_complete() {
    let up = echo_server();
    let proxy = Proxy::start(&one_route("many", &[up], ""));
    let addr = proxy.addr("many");
    let workers: Vec<_> = (0..8)
        .map(|w| {
            thread::spawn(move || {
                for i in 0..25 {
                    let mut c = connect(addr);
                    let msg = format!("worker {w} message {i}");
                    assert_eq!(round_trip(&mut c, msg.as_bytes()).unwrap(), msg.as_bytes());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let closes = proxy.wait_closes(200, Duration::from_secs(10));
    assert!(
        closes.iter().all(|c| reason(c) == "completed"),
        "{closes:?}"
    );
}

#[test]
fn environment_points_a_route_at_its_servers() {
    let up = echo_server();
    let config = "[[route]]\nname = \"app-http\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"placeholder:9\"]\n";
    let servers = up.to_string();
    let proxy = Proxy::start_with_env(
        config,
        &[("KAPROXY_ROUTE__APP_HTTP__UPSTREAM__SERVERS", &servers)],
    );
    let mut c = connect(proxy.addr("app-http"));
    assert_eq!(round_trip(&mut c, b"via env").unwrap(), b"via env");
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a
/// connect to it hangs until kaproxy's connect_timeout, and meanwhile what the
/// client sends queues up unread in kaproxy's client socket.
fn full_backlog_server() -> (
    socket2::Socket,
    Vec<std::net::TcpStream>,
    std::net::SocketAddr,
) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => return (socket, queued, addr),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

fn send_urgent(s: &std::net::TcpStream, byte: u8) {
    socket2::SockRef::from(s)
        .send_out_of_band(&[byte])
        .expect("send MSG_OOB");
}

/// Reads until `want` bytes, EOF, an error or `within`.
fn read_up_to(s: &mut std::net::TcpStream, want: usize, within: Duration) -> Vec<u8> {
    let deadline = std::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[test]
fn an_urgent_byte_is_relayed_in_place_with_the_data_behind_it() {
    // A read stops short at the urgent mark with data still queued behind it,
    // so a short read must not be taken for an empty queue; and the urgent
    // byte itself is part of the stream (SO_OOBINLINE, RFC 6093), not dropped.
    let (_full, _queued, slow) = full_backlog_server();
    let (listener, fast) = upstream_listener();
    let proxy = Proxy::start(&format!(
        "[[route]]\nname = \"urg\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{slow}\", \"{fast}\"]\nbalance = \"first\"\nconnect_timeout = \"500ms\"\n"
    ));
    let mut c = connect(proxy.addr("urg"));
    c.set_nodelay(true).unwrap();
    // All of it waits in kaproxy's client socket while the first server's connect times out.
    c.write_all(b"abc").unwrap();
    send_urgent(&c, b'X');
    c.write_all(b"def").unwrap();
    let mut u = accept(&listener);
    let got = read_up_to(&mut u, 7, Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&got),
        "abcXdef",
        "client to upstream"
    );

    // And the other way, from an upstream that sends urgent data.
    u.set_nodelay(true).unwrap();
    u.write_all(b"123").unwrap();
    send_urgent(&u, b'Y');
    u.write_all(b"456").unwrap();
    let got = read_up_to(&mut c, 7, Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&got),
        "123Y456",
        "upstream to client"
    );
}

#[test]
fn an_urgent_byte_in_the_middle_of_a_bulk_transfer_does_not_stall_it() {
    // Bulk bursts are spliced, and splice(2) stops at the urgent mark with
    // EAGAIN although data is queued behind it: the relay must read past it.
    let (_full, _queued, slow) = full_backlog_server();
    let (listener, fast) = upstream_listener();
    let proxy = Proxy::start(&format!(
        "[[route]]\nname = \"urg-bulk\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{slow}\", \"{fast}\"]\nbalance = \"first\"\nconnect_timeout = \"500ms\"\n"
    ));
    let c = connect(proxy.addr("urg-bulk"));
    c.set_nodelay(true).unwrap();
    // Small enough to be queued whole in kaproxy's socket during the slow
    // connect, tail included, so no later segment can wake the relay: a first
    // full 64 KiB read turns on splice, which then stops at the mark.
    let before: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
    let mut expected = before.clone();
    expected.push(b'U');
    expected.extend_from_slice(b"after the mark");
    let sender = {
        let mut c = c.try_clone().unwrap();
        thread::spawn(move || {
            c.write_all(&before).unwrap();
            send_urgent(&c, b'U');
            c.write_all(b"after the mark").unwrap();
        })
    };
    let mut u = accept(&listener);
    let got = read_up_to(&mut u, expected.len(), Duration::from_secs(10));
    sender.join().unwrap();
    assert_eq!(got.len(), expected.len(), "bytes relayed before the stall");
    assert!(got == expected, "bytes intact and in order");
}
