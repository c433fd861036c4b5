//! Configuration reload at its edges: addresses that change hands in one
//! reload, `--watch` in awkward layouts, sockets that a reload could miss,
//! timers and pool state, a route re-added under a removed one's name, and
//! the metrics of removed routes. Each of these once failed (an adversarial
//! review of the reload found them); each comment says what is guarded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Greets every connection with `tag`, then echoes.
fn tag_on(l: TcpListener, tag: u8) -> SocketAddr {
    let a = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                if s.write_all(&[tag]).is_err() {
                    return;
                }
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    a
}

fn tag_server(tag: u8) -> SocketAddr {
    tag_on(TcpListener::bind("127.0.0.1:0").unwrap(), tag)
}

fn open(addr: SocketAddr) -> (TcpStream, u8) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).unwrap();
    (s, tag[0])
}

fn echoes(s: &mut TcpStream) -> bool {
    round_trip(s, b"still here").is_ok_and(|b| b == b"still here")
}

fn route(name: &str, listen: &str, servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\n{extra}\n[route.upstream]\nservers = [{}]\nconnect_timeout = \"1s\"\n",
        list.join(", ")
    )
}

fn ok(outcome: &Value) {
    assert_eq!(message(outcome), "configuration reloaded", "{outcome}");
}

fn free_addr() -> SocketAddr {
    reserved_addr()
}

/// A rename is "removed plus new", and usually keeps the listen address:
/// the new route takes over the old one's listeners (binding anew would
/// fail with EADDRINUSE while they are open).
#[test]
fn renaming_a_route_that_keeps_its_listen_address_is_applied() {
    let up = tag_server(b'1');
    let addr = free_addr();
    let proxy = Proxy::start(&format!(
        "shutdown_grace = \"5s\"\n{}",
        route("old-name", &addr.to_string(), &[up], "")
    ));
    let (mut live, _) = open(addr);
    let outcome = proxy.reload(&format!(
        "shutdown_grace = \"5s\"\n{}",
        route("new-name", &addr.to_string(), &[up], "")
    ));
    ok(&outcome);
    assert_eq!(open(addr).1, b'1', "the renamed route accepts");
    assert!(
        echoes(&mut live),
        "the old route's pair is within its grace"
    );
}

/// Two routes trade addresses in one reload: each takes over the other's
/// listeners.
#[test]
fn two_routes_can_swap_their_listen_addresses_in_one_reload() {
    let (s1, s2) = (tag_server(b'1'), tag_server(b'2'));
    let (x, y) = (free_addr(), free_addr());
    let proxy = Proxy::start(&format!(
        "{}{}",
        route("one", &x.to_string(), &[s1], ""),
        route("two", &y.to_string(), &[s2], "")
    ));
    let outcome = proxy.reload(&format!(
        "{}{}",
        route("one", &y.to_string(), &[s1], ""),
        route("two", &x.to_string(), &[s2], "")
    ));
    ok(&outcome);
    assert_eq!(open(x).1, b'2');
    assert_eq!(open(y).1, b'1');
}

/// `--watch` on a path whose directory is a symlink that a deployment swaps
/// (`/etc/kaproxy/current -> releases/N`): the swap is a rename in the
/// symlink's parent, which is watched too; later edits in the new target
/// are seen as well.
#[test]
fn watch_follows_a_config_directory_that_is_a_swapped_symlink() {
    let (s1, s2) = (tag_server(b'1'), tag_server(b'2'));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let addr = free_addr();
    for (v, s) in [("v1", s1), ("v2", s2)] {
        std::fs::create_dir(d.join(v)).unwrap();
        std::fs::write(
            d.join(v).join("kaproxy.toml"),
            with_test_admin(&route("a", &addr.to_string(), &[s], "")),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("v1", d.join("current")).unwrap();
    let proxy = Proxy::start_file(&d.join("current").join("kaproxy.toml"), &["--watch"]);
    assert_eq!(open(addr).1, b'1');

    let tmp = d.join("current.tmp");
    std::os::unix::fs::symlink("v2", &tmp).unwrap();
    std::fs::rename(&tmp, d.join("current")).unwrap();
    proxy.wait_events(
        |v| message(v) == "configuration reloaded" && v["trigger"] == "watch",
        1,
        Duration::from_secs(5),
    );
    assert_eq!(open(addr).1, b'2');
}

/// The debounce has an upper bound: another file in the directory written
/// every 150 ms (a log, a swap file) must not hold a changed config off.
#[test]
fn watch_reloads_while_another_file_in_the_directory_keeps_changing() {
    let (s1, s2) = (tag_server(b'1'), tag_server(b'2'));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kaproxy.toml");
    let addr = free_addr();
    let cfg = |s| with_test_admin(&route("a", &addr.to_string(), &[s], ""));
    std::fs::write(&path, cfg(s1)).unwrap();
    let proxy = Proxy::start_file(&path, &["--watch"]);
    assert_eq!(open(addr).1, b'1');

    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, log) = (stop.clone(), dir.path().join("other.log"));
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(8);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap();
                let _ = writeln!(f, "tick");
                thread::sleep(Duration::from_millis(150));
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    std::fs::write(&path, cfg(s2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut reloaded = false;
    while Instant::now() < deadline {
        if proxy
            .events()
            .iter()
            .any(|v| message(v) == "configuration reloaded")
        {
            reloaded = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert!(
        reloaded,
        "a changed file was not reloaded within 3 s (debounce 0.5 s) while other.log kept changing"
    );
}

/// Only a changed `idle_timeout` / `half_close_timeout` counts from the
/// reload: frequent reloads for anything else must not keep idle pairs open.
#[test]
fn an_unrelated_change_does_not_restart_the_idle_timer_of_live_pairs() {
    let up = tag_server(b'1');
    let addr = free_addr();
    let cfg = |extra: &str| {
        route(
            "a",
            &addr.to_string(),
            &[up],
            &format!("idle_timeout = \"2s\"\n{extra}"),
        )
    };
    let proxy = Proxy::start(&cfg(""));
    let t0 = Instant::now();
    let (_live, _) = open(addr);
    thread::sleep(Duration::from_millis(1500));
    ok(&proxy.reload(&cfg("max_connections = 50")));
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    let after = t0.elapsed();
    assert_eq!(reason(&closes[0]), "idle_timeout", "{}", closes[0]);
    assert!(
        after <= Duration::from_millis(2900),
        "idle_timeout 2 s, unchanged by the reload, closed the pair {after:?} after it opened"
    );
}

/// A server that checks had marked down, when the checks are removed: what
/// they found is forgotten, since nothing will check it again.
#[test]
fn turning_health_checks_off_does_not_leave_a_server_down_forever() {
    let s1 = tag_server(b'1');
    let s2 = dead_port();
    let addr = free_addr();
    let checked = "health_check = { tcp = true, interval = \"200ms\", timeout = \"200ms\", rise = 1, fall = 1 }\n";
    let cfg = |extra: &str| format!("{}{extra}", route("a", &addr.to_string(), &[s1, s2], ""));
    let proxy = Proxy::start(&cfg(checked));
    let state = |server: SocketAddr| {
        let (_, body) = admin_get(proxy.admin(), "/upstreams");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["routes"][0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address"] == server.to_string())
            .map(|s| s["state"].as_str().unwrap().to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(s2).as_deref() != Some("down") {
        assert!(Instant::now() < deadline, "s2 never marked down");
        thread::sleep(Duration::from_millis(50));
    }
    ok(&proxy.reload(&cfg("")));
    // s2 comes back on its port.
    tag_on(TcpListener::bind(s2).unwrap(), b'2');
    thread::sleep(Duration::from_millis(500));
    let tags: Vec<u8> = (0..6).map(|_| open(addr).1).collect();
    assert_eq!(
        state(s2).as_deref(),
        Some("up"),
        "no health check left to mark it up again; tags {tags:?}"
    );
    assert!(
        tags.contains(&b'2'),
        "round-robin over two servers never reached s2: {tags:?}"
    );
}

/// A route removed (its pairs in their grace) and re-added under the same
/// name is a different route: retuning the new one leaves the old one's
/// pairs alone, and the log counts only the new one's.
#[test]
fn retuning_a_re_added_route_leaves_the_removed_routes_pairs_alone() {
    let up = tag_server(b'1');
    let other = tag_server(b'9');
    let grace = "shutdown_grace = \"30s\"\n";
    let ka = |idle: u32| format!("[route.client.keepalive]\nidle = \"{idle}s\"\n");
    let first = free_addr();
    let proxy = Proxy::start(&format!(
        "{grace}{}",
        route("a", &first.to_string(), &[up], &ka(60))
    ));
    let (mut old_pair, _) = open(first);
    let z = free_addr();
    let keep = route("z", &z.to_string(), &[other], "");
    // Removed: its pair has 30 s.
    ok(&proxy.reload(&format!("{grace}{keep}")));
    // Re-added under the same name, elsewhere.
    let second = free_addr();
    ok(&proxy.reload(&format!(
        "{grace}{keep}{}",
        route("a", &second.to_string(), &[up], &ka(60))
    )));
    // The new route "a" (no live pair) gets a new client keepalive.
    ok(&proxy.reload(&format!(
        "{grace}{keep}{}",
        route("a", &second.to_string(), &[up], &ka(7))
    )));
    let line = proxy.wait_events(
        |v| message(v).starts_with("keepalive updated on") && v["side"] == "client",
        1,
        Duration::from_secs(5),
    );
    let (_, body) = admin_get(proxy.admin(), "/connections");
    let v: Value = serde_json::from_str(&body).unwrap();
    let idle = v["pairs"][0]["client"]["keepalive"]["idle_s"].as_u64();
    assert!(echoes(&mut old_pair));
    assert_eq!(
        (message(&line[0]), idle),
        ("keepalive updated on 0 live client sockets", Some(60)),
        "the removed route's pair took the re-added route's keepalive: {body}"
    );
}

/// A server whose weight changes keeps its count of live pairs, which
/// least-connections and /upstreams rely on.
#[test]
fn a_server_whose_weight_changes_keeps_counting_its_live_pairs() {
    let (s1, s2) = (tag_server(b'1'), tag_server(b'2'));
    let addr = free_addr();
    let cfg = |w1: u32| {
        format!(
            "[[route]]\nname = \"a\"\nlisten = \"{addr}\"\n[route.upstream]\nbalance = \"least-connections\"\nservers = [{{ address = \"{s1}\", weight = {w1} }}, \"{s2}\"]\n"
        )
    };
    let proxy = Proxy::start(&cfg(1));
    let live: Vec<(TcpStream, u8)> = (0..4).map(|_| open(addr)).collect();
    assert_eq!(live.iter().filter(|(_, t)| *t == b'1').count(), 2);
    let active = |server: SocketAddr| {
        let (_, body) = admin_get(proxy.admin(), "/upstreams");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["routes"][0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address"] == server.to_string())
            .and_then(|s| s["active_pairs"].as_u64())
    };
    assert_eq!(active(s1), Some(2));
    ok(&proxy.reload(&cfg(2)));
    assert_eq!(
        active(s1),
        Some(2),
        "s1 still carries 2 live pairs after its weight changed"
    );
}

/// Linux copies a listener's options into a connection when its handshake
/// completes, not at accept(2): a client waiting in the backlog during a
/// reload (at `max_connections`, by design) has the old ones, and is not in
/// the registry yet. The accept loop sets the new ones on what it accepts
/// until its backlog has been empty once.
#[test]
fn a_client_waiting_in_the_backlog_during_a_reload_gets_the_new_keepalive() {
    let up = tag_server(b'1');
    let addr = free_addr();
    let cfg = |idle: u32| {
        route(
            "a",
            &addr.to_string(),
            &[up],
            &format!("max_connections = 1\n[route.client.keepalive]\nidle = \"{idle}s\"\n"),
        )
    };
    let proxy = Proxy::start(&cfg(60));
    let (first, _) = open(addr);
    // Handshake done, waiting in the backlog: the route is at its limit.
    let mut waiting = connect(addr);
    thread::sleep(Duration::from_millis(200));
    ok(&proxy.reload(&cfg(7)));
    drop(first);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut tag = [0u8; 1];
    waiting
        .read_exact(&mut tag)
        .expect("served once the slot is free");
    let (_, body) = admin_get(proxy.admin(), "/connections");
    let v: Value = serde_json::from_str(&body).unwrap();
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 1, "{body}");
    assert_eq!(
        pairs[0]["client"]["keepalive"]["idle_s"], 7,
        "a pair accepted after the reload has the old client keepalive: {body}"
    );
}

/// A pair whose upstream connect is in flight during the reload made its
/// socket with the old options and was not registered when the live
/// sockets were retuned: it sets the new ones itself once connected. The
/// connect is held by an upstream whose accept queue is full.
#[test]
fn a_pair_connecting_during_a_reload_gets_the_new_upstream_keepalive() {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let upstream: TcpListener = sock.into();
    let up = upstream.local_addr().unwrap();
    // Fills the accept queue: the proxy's SYN is dropped until it is taken.
    let _filler = TcpStream::connect(up).unwrap();
    let addr = free_addr();
    let cfg = |idle: u32| {
        format!(
            "[[route]]\nname = \"a\"\nlisten = \"{addr}\"\n[route.upstream]\nservers = [\"{up}\"]\nconnect_timeout = \"8s\"\nkeepalive = {{ idle = \"{idle}s\" }}\n"
        )
    };
    let proxy = Proxy::start(&cfg(50));
    let mut client = connect(addr);
    thread::sleep(Duration::from_millis(300));
    ok(&proxy.reload(&cfg(9)));
    // Frees the queue; the retried SYN gets through.
    let _f = accept(&upstream);
    let mut server = accept(&upstream);
    server.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    client.read_exact(&mut b).unwrap();
    let (_, body) = admin_get(proxy.admin(), "/connections");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["pairs"][0]["upstream"]["keepalive"]["idle_s"], 9,
        "connected after the reload, with the old upstream keepalive: {body}"
    );
}

/// `user_timeout` turned on by a reload reaches a pair whose data is already
/// stuck towards a vanished peer: the watchdog arms only on a write, so the
/// relay arms it on data in flight when the settings change. Keepalive does
/// not run with data in flight; without this the pair would wait for the
/// kernel's retransmission limit (~15 min). In a network namespace: the
/// client is black-holed, the upstream sends towards it, then the reload
/// sets `user_timeout = "2s"`.
#[test]
fn a_reload_that_sets_user_timeout_reaches_a_pair_with_data_already_stuck() {
    use common::netns::{blackhole_host_port, connect_from, isolated};
    use std::net::{IpAddr, Ipv4Addr};
    const NAME: &str = "a_reload_that_sets_user_timeout_reaches_a_pair_with_data_already_stuck";
    isolated(NAME, || {
        let client_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let (listener, up) = upstream_listener();
        let addr = free_addr();
        let cfg = |ut: &str| {
            format!(
                "shutdown_grace = \"1s\"\n[[route]]\nname = \"ka\"\nlisten = \"{addr}\"\n[route.client]\nkeepalive = {{ idle = \"60s\", interval = \"10s\", probes = 3, user_timeout = \"{ut}\" }}\n[route.upstream]\nservers = [\"{up}\"]\n"
            )
        };
        let proxy = Proxy::start(&cfg("off"));
        let mut c = connect_from(client_ip, addr);
        let mut u = accept(&listener);
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        u.read_exact(&mut buf).unwrap();
        u.write_all(b"pong").unwrap();
        c.read_exact(&mut buf).unwrap();

        blackhole_host_port(client_ip, addr.port());
        u.write_all(&[b'r'; 4096]).unwrap();
        thread::sleep(Duration::from_millis(500));
        ok(&proxy.reload(&cfg("2s")));
        let t0 = Instant::now();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = u.read(&mut buf);
        let waited = t0.elapsed();
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "within 10 s of a reload to user_timeout 2 s, the dead client's pair was not closed: {r:?} after {waited:?}"
        );
        assert!(waited <= Duration::from_secs(5), "{waited:?}");
    });
}

/// A removed route's series (about 70) go once its last pair has closed,
/// so that renamed routes do not pile up in /metrics.
#[test]
fn a_removed_route_leaves_no_series_in_metrics_once_its_pairs_are_gone() {
    let up = tag_server(b'1');
    let (a, b) = (free_addr(), free_addr());
    let grace = "shutdown_grace = \"200ms\"\n";
    let proxy = Proxy::start(&format!(
        "{grace}{}{}",
        route("keep", &a.to_string(), &[up], ""),
        route("gone", &b.to_string(), &[up], "")
    ));
    let (live, _) = open(b);
    ok(&proxy.reload(&format!(
        "{grace}{}",
        route("keep", &a.to_string(), &[up], "")
    )));
    proxy.wait_closes(1, Duration::from_secs(5));
    drop(live);
    // The series go once the last pair has closed: looked for every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut m = String::new();
    while Instant::now() < deadline {
        m = admin_get(proxy.admin(), "/metrics").1;
        if !m.contains("route=\"gone\"") {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(m.contains("route=\"keep\""), "{m}");
    let left: Vec<&str> = m.lines().filter(|l| l.contains("route=\"gone\"")).collect();
    assert!(
        left.is_empty(),
        "{} series of the removed route, e.g. {:?}",
        left.len(),
        &left[..left.len().min(3)]
    );
}

/// A route removed (its pairs in their grace) and re-added under the same
/// name shares the `kaproxy_route_at_limit` series: the removed one stops
/// writing it, so a closing old pair does not clear the new route's gauge.
#[test]
fn a_re_added_route_at_its_limit_stays_at_limit_when_an_old_pair_closes() {
    let up = tag_server(b'1');
    let other = tag_server(b'9');
    let grace = "shutdown_grace = \"30s\"\n";
    let keep = route("z", &free_addr().to_string(), &[other], "");
    let first = free_addr();
    let proxy = Proxy::start(&format!(
        "{grace}{keep}{}",
        route("a", &first.to_string(), &[up], "max_connections = 1")
    ));
    let (old_pair, _) = open(first);
    ok(&proxy.reload(&format!("{grace}{keep}")));
    let second = free_addr();
    ok(&proxy.reload(&format!(
        "{grace}{keep}{}",
        route("a", &second.to_string(), &[up], "max_connections = 1")
    )));
    let (mut new_pair, _) = open(second);
    let at_limit = || {
        let (_, m) = admin_get(proxy.admin(), "/metrics");
        metric(&m, "kaproxy_route_at_limit{route=\"a\"}")
    };
    assert_eq!(at_limit(), Some(1.0), "the new route holds 1 of 1");
    drop(old_pair);
    proxy.wait_closes(1, Duration::from_secs(5));
    assert!(echoes(&mut new_pair));
    assert_eq!(
        at_limit(),
        Some(1.0),
        "the new route still holds 1 of 1 after the removed route's pair closed"
    );
}

/// `listen` from `0.0.0.0:P` to `127.0.0.1:P` (stop exposing a port, keep
/// its number): the new listener is bound next to the old one (both
/// SO_REUSEPORT, both kaproxy's), then the old one closes.
#[test]
fn narrowing_listen_from_all_addresses_to_loopback_on_the_same_port_is_applied() {
    let up = tag_server(b'1');
    let port = free_addr().port();
    let proxy = Proxy::start(&route("a", &format!("0.0.0.0:{port}"), &[up], ""));
    let loopback: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut live, _) = open(loopback);
    ok(&proxy.reload(&route("a", &loopback.to_string(), &[up], "")));
    assert_eq!(open(loopback).1, b'1');
    assert!(echoes(&mut live));
}

/// A removed route leaves the admin endpoint's list at once: a /metrics
/// scrape while the rest of the reload runs (here 2,000 live sockets to
/// retune) must not write its servers' series again.
#[test]
fn a_scrape_during_a_reload_does_not_bring_back_a_removed_routes_server() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    // An upstream that only holds what it accepts.
    let (held, up) = upstream_listener_for_bursts();
    thread::spawn(move || {
        let mut keep = Vec::new();
        for s in held.incoming().flatten() {
            keep.push(s);
        }
    });
    let gone_server = tag_server(b'g');
    let a = free_addr();
    let cfg = |idle: u32, with_b: bool| {
        let b = if with_b {
            route("b", "127.0.0.1:0", &[gone_server], "")
        } else {
            String::new()
        };
        format!(
            "shutdown_grace = \"1s\"\n{}{b}",
            route(
                "a",
                &a.to_string(),
                &[up],
                &format!("max_connections = 0\n[route.client.keepalive]\nidle = \"{idle}s\"\n")
            )
        )
    };
    let proxy = Proxy::start(&cfg(30, true));
    let clients: Vec<TcpStream> = (0..2000).map(|_| connect(a)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = admin_get(proxy.admin(), "/metrics");
        if metric(&m, "kaproxy_pairs_active{route=\"a\"}") == Some(2000.0) {
            break;
        }
        assert!(Instant::now() < deadline, "2,000 pairs never established");
        thread::sleep(Duration::from_millis(50));
    }
    let admin = proxy.admin();
    let series = format!("kaproxy_upstream_up{{route=\"b\",server=\"{gone_server}\"}}");
    for round in 0..3u32 {
        if round > 0 {
            ok(&proxy.reload(&cfg(40 + round, true)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let stop = stop.clone();
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let _ = admin_get(admin, "/metrics");
                }
            })
        };
        thread::sleep(Duration::from_millis(100));
        ok(&proxy.reload(&cfg(50 + round, false)));
        thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        scraper.join().unwrap();
        let (_, m) = admin_get(admin, "/metrics");
        assert_eq!(
            metric(&m, &series),
            None,
            "round {round}: route b was removed, yet /metrics says its server is up"
        );
    }
    drop(clients);
}
