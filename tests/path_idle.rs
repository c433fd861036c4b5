//! `kaproxy probe` and keepalive against a real NAT that forgets idle flows.
//!
//! Each `nat_*` test re-runs itself under `unshare -n` (root) and builds its
//! own client ── router ── server namespaces (`common::nat`), the router
//! forgetting a TCP flow idle for 8 s. Times are small so the file runs in
//! about a minute with two test threads.
//!
//! Tolerances: the probe's bound must contain the NAT timeout within
//! `TIMER_SLACK` (the kernel's conntrack and keepalive timers tick in jiffies,
//! and the probe reads the idle time a moment before its packet reaches the
//! router); end-to-end detection within `idle + interval × probes` plus 2 s,
//! as in keepalive_netns.rs.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::nat::{NatPath, SERVER_IP};
use common::netns::isolated_with_named_netns as isolated;
use common::*;
use serde_json::Value;

/// The router's `nf_conntrack_tcp_timeout_established` in the NAT tests.
const NAT_TIMEOUT: Duration = Duration::from_secs(8);
const TIMER_SLACK: Duration = Duration::from_millis(250);
const TOLERANCE: Duration = Duration::from_secs(2);

/// A server that accepts and holds every connection without a byte, and,
/// with `close_after`, closes each (FIN) after that long: its own idle timeout.
fn hold_server(bind: SocketAddr, close_after: Option<Duration>) -> SocketAddr {
    let listener = TcpListener::bind(bind).expect("bind the server");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            match close_after {
                Some(after) => {
                    thread::spawn(move || {
                        thread::sleep(after);
                        drop(s);
                    });
                }
                None => held.push(s),
            }
        }
    });
    addr
}

fn probe_cmd(target: SocketAddr, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("probe").arg(target.to_string()).args(args);
    cmd
}

/// Runs `kaproxy probe --json` from the client namespace, bounded by `within`.
fn probe_json(path: &NatPath, target: SocketAddr, args: &[&str], within: Duration) -> Value {
    let t0 = Instant::now();
    let out = path
        .client
        .enter(|| probe_cmd(target, args).arg("--json").output())
        .expect("run kaproxy probe");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!(
        "kaproxy probe {target} {args:?} --json took {took:?}:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "probe failed: {:?}", out.status);
    assert!(took <= within, "probe took {took:?}, bound {within:?}");
    serde_json::from_str(&stdout).expect("JSON on stdout")
}

fn secs_field(v: &Value, key: &str) -> Duration {
    Duration::from_secs_f64(v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}")))
}

#[test]
fn nat_topology_carries_a_flow_idle_4s_and_forgets_one_idle_12s() {
    isolated(
        "nat_topology_carries_a_flow_idle_4s_and_forgets_one_idle_12s",
        || {
            let path = NatPath::new(Some(NAT_TIMEOUT.as_secs() as u32));
            assert_eq!(path.established_timeout(), 8);
            let (tx, rx) = std::sync::mpsc::channel::<TcpStream>();
            let server = path.server.enter(|| {
                let l = TcpListener::bind(SocketAddr::new(SERVER_IP, 0)).unwrap();
                let a = l.local_addr().unwrap();
                thread::spawn(move || {
                    for s in l.incoming().flatten() {
                        if tx.send(s).is_err() {
                            return;
                        }
                    }
                });
                a
            });
            let (mut short, mut long) = path.client.enter(|| (connect(server), connect(server)));
            let accepted: Vec<TcpStream> = (0..2)
                .map(|_| rx.recv_timeout(Duration::from_secs(5)).expect("accepted"))
                .collect();
            // The server sees the router's outside address: the flow is masqueraded.
            let peer = accepted[0].peer_addr().unwrap();
            assert_eq!(peer.ip(), common::nat::ROUTER_OUTSIDE_IP, "{peer}");
            let t0 = Instant::now();
            let mut from_short = accepted[0].try_clone().unwrap();
            let mut from_long = accepted[1].try_clone().unwrap();
            from_short
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            from_long
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();

            thread::sleep(Duration::from_secs(4).saturating_sub(t0.elapsed()));
            short.write_all(b"4").unwrap();
            let mut b = [0u8; 1];
            from_short
                .read_exact(&mut b)
                .expect("a flow idle 4 s still passes");

            thread::sleep(Duration::from_secs(12).saturating_sub(t0.elapsed()));
            long.write_all(b"c").unwrap();
            let r = from_long.read(&mut b);
            assert!(
                matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
                "a flow idle 12 s must be gone, got {r:?}"
            );
            // The path itself still works for a new flow.
            let mut fresh = path.client.enter(|| connect(server));
            let mut fresh_in = rx.recv_timeout(Duration::from_secs(5)).expect("accepted");
            fresh.write_all(b"n").unwrap();
            fresh_in.read_exact(&mut b).unwrap();
            println!("idle 4 s: passed; idle 12 s: dropped; a new flow: passed");
        },
    );
}

#[test]
fn nat_probe_reports_a_bound_around_the_nat_timeout() {
    isolated("nat_probe_reports_a_bound_around_the_nat_timeout", || {
        let path = NatPath::new(Some(NAT_TIMEOUT.as_secs() as u32));
        let server = path
            .server
            .enter(|| hold_server(SocketAddr::new(SERVER_IP, 0), None));
        let resolution = Duration::from_secs(1);
        let v = probe_json(
            &path,
            server,
            &["--max", "24s", "--resolution", "1s", "--connections", "8"],
            Duration::from_secs(60),
        );
        assert_eq!(v["result"], "dropped", "{v}");
        let survived = secs_field(&v, "survived_s");
        let dropped = secs_field(&v, "dropped_s");
        println!(
            "NAT timeout {NAT_TIMEOUT:?}: the probe says dropped after more than {survived:?} and at most {dropped:?}"
        );
        assert!(
            survived <= NAT_TIMEOUT + TIMER_SLACK && dropped + TIMER_SLACK >= NAT_TIMEOUT,
            "({survived:?}, {dropped:?}] must contain {NAT_TIMEOUT:?}"
        );
        assert!(
            dropped - survived <= resolution,
            "bound wider than the resolution"
        );
        assert_eq!(v["drop_sign"], "silence", "the router drops silently");
        let limit = v["path_idle_limit"].as_str().unwrap();
        assert_eq!(limit, format!("{}s", survived.as_secs()));
        // The recommendation passes kaproxy's own check for that limit.
        let rec = &v["recommended"][0];
        let config = format!(
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n[route.client]\npath_idle_limit = \"{limit}\"\nkeepalive = {{ idle = \"{}s\", interval = \"{}s\", probes = {} }}\n[route.upstream]\nservers = [\"127.0.0.1:1\"]\n",
            rec["idle_s"], rec["interval_s"], rec["probes"]
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, config).unwrap();
        let check = Command::new(bin())
            .arg("check")
            .arg("-c")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    });
}

#[test]
fn nat_probe_without_a_nat_timeout_reports_no_drop_within_max() {
    isolated(
        "nat_probe_without_a_nat_timeout_reports_no_drop_within_max",
        || {
            let path = NatPath::new(None);
            let server = path
                .server
                .enter(|| hold_server(SocketAddr::new(SERVER_IP, 0), None));
            let v = probe_json(
                &path,
                server,
                &["--max", "10s", "--resolution", "2s"],
                Duration::from_secs(30),
            );
            assert_eq!(v["result"], "no_drop", "{v}");
            assert!(secs_field(&v, "survived_s") + TIMER_SLACK >= Duration::from_secs(10));
            assert_eq!(v["rounds"].as_array().unwrap().len(), 1, "{v}");
        },
    );
}

#[test]
fn nat_probe_tells_a_server_that_closes_idle_connections_from_the_path() {
    isolated(
        "nat_probe_tells_a_server_that_closes_idle_connections_from_the_path",
        || {
            let path = NatPath::new(Some(NAT_TIMEOUT.as_secs() as u32));
            let server_timeout = Duration::from_secs(5);
            let server = path
                .server
                .enter(|| hold_server(SocketAddr::new(SERVER_IP, 0), Some(server_timeout)));
            let out: Output = path
                .client
                .enter(|| probe_cmd(server, &["--max", "20s", "--resolution", "1s"]).output())
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            println!("{text}");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // The server's 5 s, as the probe saw it: a loaded machine adds
            // a little (one run said 5.1 s), so 5.0 to 5.5 s is accepted.
            let said = text
                .split(&format!(
                    "{server} closes idle connections itself after about "
                ))
                .nth(1)
                .and_then(|rest| {
                    rest.split_once(
                        " s (a FIN from the server: its own idle timeout, not the path's)",
                    )
                })
                .and_then(|(secs, _)| secs.parse::<f64>().ok());
            assert!(
                said.is_some_and(|s| (5.0..=5.5).contains(&s)),
                "expected the server's own 5 s idle timeout (tolerance 0.5 s): {text}"
            );
            assert!(!text.contains("are dropped after"), "{text}");
        },
    );
}

/// kaproxy in the server namespace in front of an upstream there, its client
/// behind the NAT. Returns the proxy, the client's stream and the upstream's.
fn pair_through_the_nat(
    path: &NatPath,
    client_keepalive: &str,
    extra_client: &str,
) -> (Proxy, TcpStream, TcpStream) {
    let (listener, up) = path.server.enter(upstream_listener);
    let config = format!(
        "shutdown_grace = \"1s\"\n[[route]]\nname = \"nat\"\nlisten = \"0.0.0.0:0\"\n[route.client]\nkeepalive = {client_keepalive}\n{extra_client}[route.upstream]\nservers = [\"{up}\"]\nkeepalive = {{ idle = \"60s\" }}\n"
    );
    let proxy = path.server.enter(|| Proxy::start(&config));
    let port = proxy.addr("nat").port();
    let mut c = path
        .client
        .enter(|| connect(SocketAddr::new(SERVER_IP, port)));
    let mut u = accept(&listener);
    assert_eq!(round_trip_through(&mut c, &mut u, b"ping"), b"ping");
    (proxy, c, u)
}

/// Client → upstream, then the same back; returns what came back.
fn round_trip_through(c: &mut TcpStream, u: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    c.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    u.read_exact(&mut buf).unwrap();
    u.write_all(&buf).unwrap();
    c.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn nat_client_keepalive_below_the_timeout_keeps_an_idle_pair_alive() {
    isolated(
        "nat_client_keepalive_below_the_timeout_keeps_an_idle_pair_alive",
        || {
            let path = NatPath::new(Some(NAT_TIMEOUT.as_secs() as u32));
            // 3 s + 1 s fits 90 % of the 8 s limit, which kaproxy checks.
            let (proxy, mut c, mut u) = pair_through_the_nat(
                &path,
                "{ idle = \"3s\", interval = \"1s\", probes = 2 }",
                "path_idle_limit = \"8s\"\n",
            );
            let quiet = NAT_TIMEOUT * 3;
            thread::sleep(quiet);
            assert!(proxy.closes().is_empty(), "{:?}", proxy.closes());
            assert_eq!(round_trip_through(&mut c, &mut u, b"after"), b"after");
            println!("idle {quiet:?} (3 NAT timeouts) behind the NAT: the pair still passes data");
        },
    );
}

#[test]
fn nat_client_keepalive_above_the_timeout_resets_the_upstream_within_the_bound() {
    isolated(
        "nat_client_keepalive_above_the_timeout_resets_the_upstream_within_the_bound",
        || {
            let path = NatPath::new(Some(NAT_TIMEOUT.as_secs() as u32));
            let (idle, interval, probes) = (12u64, 1u64, 2u64);
            let bound = Duration::from_secs(idle + interval * probes);
            let (proxy, _c, mut u) = pair_through_the_nat(
                &path,
                "{ idle = \"12s\", interval = \"1s\", probes = 2 }",
                "",
            );
            let t0 = Instant::now();
            u.set_read_timeout(Some(bound + TOLERANCE + Duration::from_secs(3)))
                .unwrap();
            let mut b = [0u8; 1];
            let r = u.read(&mut b);
            let elapsed = t0.elapsed();
            println!(
                "NAT forgot the flow after {NAT_TIMEOUT:?}; kaproxy's probes from {idle} s on went unanswered; upstream reset {elapsed:?} after the last packet (bound {bound:?} + {TOLERANCE:?})"
            );
            assert!(
                matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                "the upstream should be reset, got {r:?}"
            );
            assert!(
                elapsed + TIMER_SLACK >= Duration::from_secs(idle),
                "reset before the first probe was due: {elapsed:?}"
            );
            assert!(
                elapsed <= bound + TOLERANCE,
                "took {elapsed:?}, bound {bound:?} + {TOLERANCE:?}"
            );
            let closes = proxy.wait_closes(1, Duration::from_secs(5));
            assert_eq!(reason(&closes[0]), "client_dead", "{}", closes[0]);
        },
    );
}

#[test]
fn nat_without_client_keepalive_the_pair_stays_half_dead() {
    isolated(
        "nat_without_client_keepalive_the_pair_stays_half_dead",
        || {
            let path = NatPath::new(Some(NAT_TIMEOUT.as_secs() as u32));
            let (proxy, mut c, mut u) = pair_through_the_nat(&path, "{ enabled = false }", "");
            let t0 = Instant::now();
            thread::sleep(NAT_TIMEOUT + Duration::from_secs(2));
            // The NAT has forgotten the flow: what the client sends is lost...
            c.write_all(b"lost").unwrap();
            u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut b = [0u8; 4];
            let r = u.read(&mut b);
            assert!(
                matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
                "nothing may arrive through a forgotten flow, got {r:?}"
            );
            // ...and nobody tells the upstream: kaproxy still holds the pair open.
            assert!(proxy.closes().is_empty(), "{:?}", proxy.closes());
            assert_eq!(
                u.take_error().unwrap().map(|e| e.kind()),
                None,
                "the upstream connection is still open"
            );
            println!(
                "keepalive off: {:?} after the last packet (NAT timeout {NAT_TIMEOUT:?}) the upstream connection is still open and the client's bytes are lost",
                t0.elapsed()
            );
        },
    );
}

// Without namespaces: errors and output on loopback.

#[test]
fn probe_of_a_closed_port_is_a_clear_error() {
    let out = probe_cmd(dead_port(), &["--max", "10s"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot connect to 127.0.0.1:")
            && err.contains("Connection refused")
            && err.contains("nothing listens there"),
        "{err}"
    );
}

#[test]
fn probe_of_a_server_that_closes_at_once_is_a_clear_error() {
    let server = hold_server(
        "127.0.0.1:0".parse().unwrap(),
        Some(Duration::from_millis(300)),
    );
    let t0 = Instant::now();
    let out = probe_cmd(server, &["--max", "10s", "--resolution", "1s"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("closed idle connections itself after about 0.3 s, before the shortest idle time that could be tested"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "gave up at once");
}

#[test]
fn probe_of_a_server_that_keeps_talking_is_a_clear_error() {
    // A server with an application heartbeat: its connections never go idle.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline && s.write_all(b"x").is_ok() {
                    thread::sleep(Duration::from_millis(300));
                }
            });
        }
    });
    let out = probe_cmd(server, &["--max", "4s", "--resolution", "1s"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("before the probe was due, so its connections do not stay idle"),
        "{err}"
    );
}

#[test]
fn probe_arguments_that_do_not_fit_are_usage_errors() {
    let out = probe_cmd(dead_port(), &["--max", "5s", "--resolution", "5s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: --resolution 5s must be shorter than --max 5s"
    );
    let out = probe_cmd(dead_port(), &["--connections", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn probe_on_loopback_json_reports_no_drop_with_every_connection() {
    let server = hold_server("127.0.0.1:0".parse().unwrap(), None);
    let out = probe_cmd(
        server,
        &[
            "--max",
            "3s",
            "--resolution",
            "1s",
            "--connections",
            "4",
            "--json",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --json and no terminal: nothing but the result.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "no_drop");
    let conns = v["rounds"][0]["connections"].as_array().unwrap();
    let planned: Vec<f64> = conns
        .iter()
        .map(|c| c["planned_idle_s"].as_f64().unwrap())
        .collect();
    assert_eq!(planned, [1.0, 2.0, 3.0]);
    for c in conns {
        assert_eq!(c["verdict"], "answered", "{c}");
        let (idle, plan) = (
            c["idle_s"].as_f64().unwrap(),
            c["planned_idle_s"].as_f64().unwrap(),
        );
        assert!(
            (idle - plan).abs() < 0.1,
            "measured idle {idle} for planned {plan}"
        );
    }
    assert_eq!(v["path_idle_limit"], "3s");
    assert_eq!(v["recommended"][0]["idle_s"], 1);
}

#[test]
fn probe_on_a_terminal_draws_a_progress_bar() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED probe_on_a_terminal_draws_a_progress_bar: script (util-linux) is not installed");
        return;
    }
    let server = hold_server("127.0.0.1:0".parse().unwrap(), None);
    // script(1) gives the probe a pseudo-terminal, as a person's shell would.
    let cmd = format!(
        "{} probe {server} --max 3s --resolution 1s --connections 3",
        bin().display()
    );
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("round 1: 3 connections idle 1.0 s to 3.0 s"),
        "{screen}"
    );
    assert!(
        screen.contains("\r\x1b[2K  [##"),
        "a bar redrawn in place: {screen:?}"
    );
    assert!(screen.contains("no drop within --max 3s"), "{screen}");
}
