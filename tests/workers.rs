//! Worker threads: a route listens once per worker (SO_REUSEPORT), pairs are
//! served whichever socket the kernel picks, and shutdown closes every copy.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

/// Listening sockets on `port` in /proc/net/tcp and tcp6 (state 0A = LISTEN).
fn listening_sockets(port: u16) -> usize {
    let port_hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|text| {
            text.lines()
                .skip(1)
                .filter(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    cols.len() > 3 && cols[1].ends_with(&port_hex) && cols[3] == "0A"
                })
                .count()
        })
        .sum()
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

#[test]
fn a_route_listens_once_per_worker_and_every_pair_completes() {
    let up = echo_server();
    let mut proxy =
        Proxy::start_with_env(&one_route("spread", &[up], ""), &[("KAPROXY_WORKERS", "3")]);
    let addr = proxy.addr("spread");
    assert_eq!(listening_sockets(addr.port()), 3, "one listener per worker");

    // Many short pairs from many source ports: the kernel's hash sends them to
    // all three sockets, and every one must be relayed.
    let clients: Vec<_> = (0..6)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..30 {
                    let mut c = connect(addr);
                    let msg = format!("client {t} pair {i}");
                    assert_eq!(round_trip(&mut c, msg.as_bytes()).unwrap(), msg.as_bytes());
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let closes = proxy.wait_closes(180, Duration::from_secs(10));
    assert!(
        closes.iter().all(|c| reason(c) == "completed"),
        "{closes:?}"
    );

    proxy.signal("TERM");
    proxy.wait_events(
        |v| message(v) == "stopped accepting",
        1,
        Duration::from_secs(5),
    );
    // Said once per route, and only once all three sockets are closed.
    assert!(refused(addr), "no copy of the listener is left open");
    assert_eq!(listening_sockets(addr.port()), 0);
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let stopped = proxy
        .events()
        .iter()
        .filter(|v| message(v) == "stopped accepting")
        .count();
    assert_eq!(stopped, 1, "one \"stopped accepting\" line per route");
}

#[test]
fn workers_must_be_a_number() {
    let out = std::process::Command::new(bin())
        .args(["--workers", "many", "check", "-c", "/nonexistent"])
        .output()
        .expect("run kaproxy");
    assert_eq!(out.status.code(), Some(64), "a usage error (EX_USAGE)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers"), "{err}");
}

#[test]
fn a_second_kaproxy_on_a_port_in_use_fails_to_start_instead_of_sharing_it() {
    let up = echo_server();
    let first = Proxy::start_with_env(&one_route("held", &[up], ""), &[("KAPROXY_WORKERS", "2")]);
    let addr = first.addr("held");
    // The same port, with SO_REUSEPORT on every listener of both processes,
    // would be shared silently; it must be refused as before workers existed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("second.toml");
    let config = one_route("held", &[up], "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    assert!(config.contains(&addr.to_string()), "{config}");
    std::fs::write(
        &path,
        format!("{config}\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let mut second = std::process::Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .env("KAPROXY_WORKERS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the second kaproxy");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second kaproxy started and shares the port");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
        "{err}"
    );
    assert_eq!(
        listening_sockets(addr.port()),
        2,
        "the first keeps its listeners"
    );
}

#[test]
fn an_absurd_worker_count_is_a_usage_error_not_a_thread_storm() {
    let out = std::process::Command::new(bin())
        .args(["check", "-c", "/nonexistent"])
        .env("KAPROXY_WORKERS", "10000")
        .output()
        .expect("run kaproxy");
    assert_eq!(out.status.code(), Some(64), "a usage error (EX_USAGE)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers") && err.contains("1024"), "{err}");
}
