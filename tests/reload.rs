//! Reloading a running kaproxy (SIGHUP and `run --watch`): routes added,
//! removed, changed and renamed, all without dropping a live pair; rejected
//! files change nothing; live pairs take new settings.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A server that greets every connection with `tag` and then echoes: a
/// client learns which server its pair went to.
fn tag_server(tag: u8) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
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

/// Connects through the proxy and returns the stream and the tag of the
/// server it reached.
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

fn reloads(proxy: &Proxy, result: &str) -> f64 {
    let (_, m) = admin_get(proxy.admin(), "/metrics");
    metric(
        &m,
        &format!("kaproxy_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(-1.0)
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

fn ok(outcome: &Value) {
    assert_eq!(message(outcome), "configuration reloaded", "{outcome}");
}

#[test]
fn sighup_adds_removes_and_changes_routes_without_dropping_a_live_pair() {
    let (a1, a2, b1, c1) = (
        tag_server(b'1'),
        tag_server(b'2'),
        tag_server(b'b'),
        tag_server(b'c'),
    );
    let grace = "shutdown_grace = \"1s\"\n";
    let proxy = Proxy::start(&format!(
        "{grace}{}{}",
        route("a", "127.0.0.1:0", &[a1], ""),
        route("b", "127.0.0.1:0", &[b1], "")
    ));
    let (a, b) = (proxy.addr("a"), proxy.addr("b"));
    let (mut live_a, tag) = open(a);
    assert_eq!(tag, b'1');
    let (mut live_b, _) = open(b);
    let (_, m) = admin_get(proxy.admin(), "/metrics");
    let loaded_at = metric(&m, "kaproxy_config_last_reload_success_timestamp_seconds").unwrap();
    assert!(loaded_at > 1.7e9, "set at start: {loaded_at}");

    // a: new servers, same listen address (written out, as a user would).
    // b: removed. c: new.
    let t0 = Instant::now();
    ok(&proxy.reload(&format!(
        "{grace}{}{}",
        route("a", &a.to_string(), &[a2], "idle_timeout = \"1h\""),
        route("c", "127.0.0.1:0", &[c1], "")
    )));

    assert!(
        echoes(&mut live_a),
        "a's live pair carries on to its old server"
    );
    let (_, tag) = open(a);
    assert_eq!(tag, b'2', "a new pair follows the new servers");
    assert!(refused(b), "a removed route stops accepting at once");
    assert!(
        echoes(&mut live_b),
        "its live pair may finish within the grace period"
    );
    let closes = proxy.wait_events(
        |v| message(v) == "pair closed" && span_field(v, "route") == "b",
        1,
        Duration::from_secs(5),
    );
    assert_eq!(reason(&closes[0]), "route_removed", "{}", closes[0]);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after the 1 s grace (tolerance 3 s): {waited:?}"
    );
    let mut buf = [0u8; 1];
    let r = live_b.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a cut stream is reset, never a clean end: {r:?}"
    );

    let added = proxy.wait_events(
        |v| message(v) == "route listening" && v["route"] == "c",
        1,
        Duration::from_secs(5),
    );
    let c: SocketAddr = added[0]["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(open(c).1, b'c', "the new route forwards");
    assert_eq!(
        proxy
            .events()
            .iter()
            .filter(|v| message(v) == "route listening" && v["route"] == "a")
            .count(),
        1,
        "a's listener was not touched"
    );
    assert!(echoes(&mut live_a));
    assert_eq!(reloads(&proxy, "ok"), 1.0);
    assert_eq!(reloads(&proxy, "rejected"), 0.0);
    let (_, m) = admin_get(proxy.admin(), "/metrics");
    let now = metric(&m, "kaproxy_config_last_reload_success_timestamp_seconds").unwrap();
    assert!(now >= loaded_at, "{now} after {loaded_at}");
    let (_, up) = admin_get(proxy.admin(), "/upstreams");
    assert!(!up.contains("\"route\":\"b\""), "{up}");
    assert!(
        up.contains(&a2.to_string()) && !up.contains(&a1.to_string()),
        "{up}"
    );
}

#[test]
fn a_bad_file_or_an_address_in_use_is_rejected_whole_and_the_old_config_keeps_serving() {
    let (a1, a2) = (tag_server(b'1'), tag_server(b'2'));
    let proxy = Proxy::start(&route("a", "127.0.0.1:0", &[a1], ""));
    let a = proxy.addr("a");
    let (mut live, _) = open(a);

    // Not valid: the same message `kaproxy check` gives.
    let bad = route("a", &a.to_string(), &[a2], "idle_timeout = \"soon\"");
    let outcome = proxy.reload(&bad);
    assert_eq!(
        message(&outcome),
        "configuration reload rejected; the running configuration keeps serving",
        "{outcome}"
    );
    assert_eq!(outcome["level"], "ERROR", "{outcome}");
    let error = outcome["error"].as_str().unwrap();
    assert!(
        error.contains("kaproxy.toml:")
            && error.contains("route \"a\".idle_timeout")
            && error.contains("not a duration"),
        "{error}"
    );
    let check = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(&proxy.config_path)
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.contains(error),
        "same text as check:\n{check}\n{error}"
    );

    // Valid, but one new listen address is taken: nothing of it applies,
    // not even the route that could have started.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let free = reserved_addr();
    let outcome = proxy.reload(&format!(
        "{}{}{}",
        route("a", &a.to_string(), &[a2], ""),
        route("new", &free.to_string(), &[a2], ""),
        route("clash", &taken_addr.to_string(), &[a2], "")
    ));
    assert!(message(&outcome).contains("rejected"), "{outcome}");
    assert!(
        outcome["error"]
            .as_str()
            .unwrap()
            .contains(&taken_addr.to_string()),
        "{outcome}"
    );
    assert!(refused(free), "the route that could have started did not");
    assert_eq!(open(a).1, b'1', "a still goes to its old server");
    assert!(echoes(&mut live));
    assert_eq!(reloads(&proxy, "rejected"), 2.0);
    assert_eq!(reloads(&proxy, "ok"), 0.0);

    // And a good file after them applies.
    ok(&proxy.reload(&route("a", &a.to_string(), &[a2], "")));
    assert_eq!(open(a).1, b'2');
    assert!(echoes(&mut live));
}

#[test]
fn a_changed_listen_address_moves_new_clients_and_live_pairs_carry_on() {
    let up = tag_server(b'1');
    let proxy = Proxy::start(&route("a", "127.0.0.1:0", &[up], ""));
    let old = proxy.addr("a");
    let (mut live, _) = open(old);
    let new = reserved_addr();
    ok(&proxy.reload(&route("a", &new.to_string(), &[up], "")));
    assert_eq!(open(new).1, b'1', "the new address accepts");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refused(old) {
        assert!(Instant::now() < deadline, "the old address still accepts");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(echoes(&mut live));

    // Renamed: the old name is removed and the new one added.
    let renamed = reserved_addr();
    ok(&proxy.reload(&format!(
        "shutdown_grace = \"5s\"\n{}",
        route("b", &renamed.to_string(), &[up], "")
    )));
    assert_eq!(open(renamed).1, b'1');
    assert!(refused(new));
    assert!(
        echoes(&mut live),
        "within its grace, the renamed route's pair carries on"
    );
}

#[test]
fn a_server_that_stays_keeps_its_ejection_and_a_new_one_starts_eligible() {
    let dead = dead_port();
    let (s1, s2) = (tag_server(b'1'), tag_server(b'2'));
    let pool = "[route.upstream.passive_ejection]\nfailures = 1\nbackoff = \"1m\"\n";
    let cfg = |servers: &[SocketAddr], balance: &str| {
        format!(
            "{}balance = \"{balance}\"\n{pool}",
            route("a", "127.0.0.1:0", servers, "")
        )
    };
    let proxy = Proxy::start(&cfg(&[dead, s1], "first"));
    let a = proxy.addr("a");
    assert_eq!(open(a).1, b'1', "the dead server is tried first, then s1");
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
    assert_eq!(state(dead).as_deref(), Some("ejected"));

    let a_str = a.to_string();
    let new = format!(
        "{}balance = \"first\"\n{pool}",
        route("a", &a_str, &[s2, dead, s1], "")
    );
    ok(&proxy.reload(&new));
    assert_eq!(
        state(dead).as_deref(),
        Some("ejected"),
        "kept across the reload"
    );
    assert_eq!(state(s2).as_deref(), Some("up"));
    assert_eq!(open(a).1, b'2', "first: the new server leads the list");
    assert_eq!(state(s1).as_deref(), Some("up"));
}

#[test]
fn a_new_idle_timeout_applies_to_live_pairs_counted_from_the_reload() {
    let up = tag_server(b'1');
    let proxy = Proxy::start(&route("a", "127.0.0.1:0", &[up], ""));
    let a = proxy.addr("a");
    let (mut live, _) = open(a);
    // Idle for longer than the new timeout before the reload: it must still
    // get the whole timeout from the reload on, not be cut at once.
    thread::sleep(Duration::from_millis(2500));
    let t0 = Instant::now();
    ok(&proxy.reload(&route("a", &a.to_string(), &[up], "idle_timeout = \"2s\"")));
    let closes = proxy.wait_closes(1, Duration::from_secs(10));
    let after = t0.elapsed();
    assert_eq!(reason(&closes[0]), "idle_timeout", "{}", closes[0]);
    println!("idle pair closed {after:?} after the reload (idle_timeout 2 s, tolerance 1 s)");
    assert!(
        after >= Duration::from_millis(1900) && after <= Duration::from_secs(3),
        "closed {after:?} after the reload"
    );
    let mut buf = [0u8; 1];
    assert!(
        matches!(live.read(&mut buf), Ok(0)),
        "an idle close is a clean FIN"
    );

    // Lengthened: a pair idle past the old timeout is not cut by it.
    let (mut live, _) = open(a);
    ok(&proxy.reload(&route("a", &a.to_string(), &[up], "idle_timeout = \"1h\"")));
    thread::sleep(Duration::from_secs(3));
    assert!(echoes(&mut live), "the old 2 s timeout no longer applies");
}

#[test]
fn new_keepalive_settings_are_set_on_live_sockets_and_shown_in_connections() {
    let up = tag_server(b'1');
    let ka = |client: &str, upstream: &str| {
        format!(
            "{}[route.client.keepalive]\n{client}\n[route.upstream.keepalive]\n{upstream}\n",
            route("a", "127.0.0.1:0", &[up], "")
        )
    };
    let first = ka(
        "idle = \"60s\"\ninterval = \"10s\"\nprobes = 3",
        "idle = \"50s\"",
    );
    let proxy = Proxy::start(&first);
    let a = proxy.addr("a");
    let (mut live, _) = open(a);
    let second = ka(
        "idle = \"7s\"\ninterval = \"2s\"\nprobes = 4\nuser_timeout = \"20s\"",
        "enabled = false",
    )
    .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{a}\""));
    ok(&proxy.reload(&second));
    let line = proxy.wait_events(
        |v| message(v) == "keepalive updated on 1 live client sockets",
        1,
        Duration::from_secs(5),
    );
    assert_eq!(line[0]["route"], "a");
    proxy.wait_events(
        |v| message(v) == "keepalive updated on 1 live upstream sockets",
        1,
        Duration::from_secs(5),
    );
    let (_, body) = admin_get(proxy.admin(), "/connections");
    let v: Value = serde_json::from_str(&body).unwrap();
    let pair = &v["pairs"][0];
    let c = &pair["client"]["keepalive"];
    assert_eq!(
        (
            c["enabled"].as_bool(),
            c["idle_s"].as_u64(),
            c["interval_s"].as_u64(),
            c["probes"].as_u64(),
            c["user_timeout_ms"].as_u64()
        ),
        (Some(true), Some(7), Some(2), Some(4), Some(20_000)),
        "{body}"
    );
    assert_eq!(pair["upstream"]["keepalive"]["enabled"], false, "{body}");
    assert!(echoes(&mut live));

    // A client accepted after the reload inherits the new settings too.
    let (_second, _) = open(a);
    let (_, body) = admin_get(proxy.admin(), "/connections");
    let v: Value = serde_json::from_str(&body).unwrap();
    for p in v["pairs"].as_array().unwrap() {
        assert_eq!(p["client"]["keepalive"]["idle_s"], 7, "{body}");
        assert_eq!(p["upstream"]["keepalive"]["enabled"], false, "{body}");
    }
}

#[test]
fn the_admin_endpoint_moves_to_its_new_address() {
    let up = tag_server(b'1');
    let first = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n",
        route("a", "127.0.0.1:0", &[up], "")
    );
    let proxy = Proxy::start(&first);
    let old = proxy.admin();
    let new = reserved_addr();
    let a = proxy.addr("a");
    ok(&proxy.reload(&format!(
        "{}[admin]\nlisten = \"{new}\"\n",
        route("a", &a.to_string(), &[up], "")
    )));
    let (status, body) = admin_get(new, "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("kaproxy_config_reloads_total{result=\"ok\"} 1"),
        "{body}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refused(old) {
        assert!(
            Instant::now() < deadline,
            "the old admin address still accepts"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lower_max_connections_applies_to_new_clients_and_keeps_live_pairs() {
    let up = tag_server(b'1');
    let proxy = Proxy::start(&route("a", "127.0.0.1:0", &[up], "max_connections = 10"));
    let a = proxy.addr("a");
    let mut live: Vec<TcpStream> = (0..3).map(|_| open(a).0).collect();
    ok(&proxy.reload(&route("a", &a.to_string(), &[up], "max_connections = 2")));
    for s in &mut live {
        assert!(echoes(s), "live pairs over the new limit carry on");
    }
    // A fourth client waits in the backlog: connected, never served.
    let mut waiting = connect(a);
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut tag = [0u8; 1];
    assert!(
        waiting.read(&mut tag).is_err(),
        "over the limit: not served"
    );
    drop(live.pop());
    thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.read(&mut tag).is_err(),
        "2 live of 2: still waiting"
    );
    drop(live.pop());
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    waiting.read_exact(&mut tag).expect("1 live of 2: served");
    assert_eq!(tag[0], b'1');
    assert!(echoes(&mut live[0]));
    assert!(echoes(&mut waiting));
}

/// Kubernetes mounts a ConfigMap as `kaproxy.toml -> ..data/kaproxy.toml`,
/// `..data -> ..<timestamp>`, and updates it by making a new timestamped
/// directory and renaming a new `..data` link over the old one.
#[test]
fn watch_follows_the_kubernetes_symlink_swap_and_debounces_bursts() {
    let (s1, s2, s3) = (tag_server(b'1'), tag_server(b'2'), tag_server(b'3'));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let version = |n: u32, servers: &[SocketAddr], listen: &str| {
        let v = d.join(format!("..2026_11_27_{n}"));
        std::fs::create_dir(&v).unwrap();
        std::fs::write(
            v.join("kaproxy.toml"),
            with_test_admin(&route("a", listen, servers, "")),
        )
        .unwrap();
        v
    };
    let v1 = version(1, &[s1], "127.0.0.1:0");
    std::os::unix::fs::symlink(v1.file_name().unwrap(), d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/kaproxy.toml", d.join("kaproxy.toml")).unwrap();

    let proxy = Proxy::start_file(&d.join("kaproxy.toml"), &["--watch"]);
    let a = proxy.addr("a");
    assert_eq!(open(a).1, b'1');

    let swap = |to: &std::path::Path| {
        let tmp = d.join("..data_tmp");
        std::os::unix::fs::symlink(to.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, d.join("..data")).unwrap();
    };
    let v2 = version(2, &[s2], &a.to_string());
    swap(&v2);
    std::fs::remove_dir_all(&v1).unwrap();
    let reloaded = |n: usize| {
        proxy.wait_events(
            |v| message(v) == "configuration reloaded" && v["trigger"] == "watch",
            n,
            Duration::from_secs(10),
        )
    };
    reloaded(1);
    assert_eq!(open(a).1, b'2', "the swapped-in version is in force");

    // An editor's burst: three saves by rename within a moment make one reload.
    let real = d.join("..data").join("kaproxy.toml");
    for servers in [[s1], [s2], [s3]] {
        let tmp = v2.join("kaproxy.toml.swp");
        std::fs::write(
            &tmp,
            with_test_admin(&route("a", &a.to_string(), &servers, "")),
        )
        .unwrap();
        std::fs::rename(&tmp, &real).unwrap();
        thread::sleep(Duration::from_millis(50));
    }
    reloaded(2);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(reloads(&proxy, "ok"), 2.0, "one reload for the burst");
    assert_eq!(open(a).1, b'3', "the last save is in force");

    // Touching the file without changing it reloads nothing.
    std::fs::write(&real, std::fs::read(&real).unwrap()).unwrap();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(reloads(&proxy, "ok"), 2.0);
}

/// Keep-alive traffic through a route while it is reloaded 20 times:
/// no failed request, no dropped connection, no refused connect.
#[test]
fn twenty_reloads_under_load_fail_no_request_and_drop_no_connection() {
    let up = echo_server();
    let proxy = Proxy::start(&route("a", "127.0.0.1:0", &[up], ""));
    let a = proxy.addr("a");
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, requests) = (stop.clone(), requests.clone());
        workers.push(thread::spawn(move || -> Result<(), String> {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut s = connect(a);
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let msg = format!("worker {w} request {n}");
                match round_trip(&mut s, msg.as_bytes()) {
                    Ok(b) if b == msg.as_bytes() => {}
                    other => return Err(format!("request {n} of worker {w}: {other:?}")),
                }
                n += 1;
                requests.fetch_add(1, Ordering::Relaxed);
                // And a fresh connection now and then.
                if n % 50 == 0 {
                    let mut fresh = TcpStream::connect(a).map_err(|e| format!("connect: {e}"))?;
                    fresh
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    round_trip(&mut fresh, b"fresh").map_err(|e| format!("fresh: {e}"))?;
                }
            }
            Ok(())
        }));
    }
    for i in 0..20 {
        let extra = format!(
            "idle_timeout = \"{}s\"\n[route.client.keepalive]\nidle = \"{}s\"",
            100 + i,
            30 + i
        );
        ok(&proxy.reload(&route("a", &a.to_string(), &[up], &extra)));
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap().unwrap();
    }
    let n = requests.load(Ordering::Relaxed);
    println!("{n} requests during 20 reloads");
    assert!(n > 100, "traffic flowed: {n}");
    assert_eq!(reloads(&proxy, "ok"), 20.0);
    let not_completed: Vec<Value> = proxy
        .closes()
        .into_iter()
        .filter(|c| reason(c) != "completed")
        .collect();
    assert!(not_completed.is_empty(), "{not_completed:?}");
}
