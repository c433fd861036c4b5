//! The admin endpoint of the real binary: metrics that add up, live keepalive
//! state per connection, readiness, bad requests, limits, and `kaproxy status`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::netns::{blackhole_host_port, connect_from, isolated};
use common::*;
use serde_json::Value;

const CLIENT_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn json(admin: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = admin_get(admin, path);
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

/// The keepalive settings a side's socket reports: idle, interval, probes, user timeout ms.
fn keepalive_of(side: &Value) -> (Option<u64>, Option<u64>, Option<u64>, Option<u64>) {
    let ka = &side["keepalive"];
    (
        ka["idle_s"].as_u64(),
        ka["interval_s"].as_u64(),
        ka["probes"].as_u64(),
        ka["user_timeout_ms"].as_u64(),
    )
}

fn poll<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn connections_show_each_side_with_the_keepalive_settings_in_force() {
    let up = echo_server();
    let config = format!(
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nkeepalive = {{ idle = \"20s\", interval = \"4s\", probes = 5 }}\n[route.upstream]\nservers = [\"{up}\"]\nkeepalive = {{ idle = \"33s\", interval = \"7s\", probes = 2, user_timeout = \"2500ms\", stall_timeout = \"7s\" }}\n"
    );
    let proxy = Proxy::start(&config);
    let mut c = connect(proxy.addr("web"));
    assert_eq!(round_trip(&mut c, b"hello").unwrap(), b"hello");

    // The relay counts bytes after writing them, so the echo can arrive first.
    let v = poll(Duration::from_secs(5), "5 bytes counted each way", || {
        let (status, v) = json(proxy.admin(), "/connections?route=web");
        assert_eq!(status, 200);
        let p = &v["pairs"][0];
        (p["bytes_client_to_upstream"] == 5 && p["bytes_upstream_to_client"] == 5).then_some(v)
    });
    assert_eq!(v["returned"], 1);
    assert_eq!(v["more"], 0);
    let p = &v["pairs"][0];
    assert_eq!(p["route"], "web");
    assert_eq!(p["bytes_client_to_upstream"], 5);
    assert_eq!(p["bytes_upstream_to_client"], 5);
    assert_eq!(p["client"]["address"], c.local_addr().unwrap().to_string());
    assert_eq!(p["upstream"]["address"], up.to_string());
    for side in ["client", "upstream"] {
        assert_eq!(p[side]["state"], "established", "{p}");
        assert!(p[side]["rtt_us"].as_u64().is_some(), "{p}");
        assert!(p[side]["last_data_recv_ms"].as_u64().is_some(), "{p}");
    }
    // Read back from the sockets, not echoed from the config; user_timeout and
    // stall_timeout are kaproxy's own, and the kernel's TCP_USER_TIMEOUT is off.
    assert_eq!(p["client"]["keepalive"]["enabled"], true);
    assert_eq!(p["client"]["keepalive"]["stall_timeout_ms"], 0);
    assert_eq!(p["upstream"]["keepalive"]["stall_timeout_ms"], 7000);
    assert_eq!(
        keepalive_of(&p["client"]),
        (Some(20), Some(4), Some(5), Some(40_000))
    );
    assert_eq!(p["upstream"]["keepalive"]["enabled"], true);
    assert_eq!(
        keepalive_of(&p["upstream"]),
        (Some(33), Some(7), Some(2), Some(2500))
    );

    // A large list is bounded and says how many more there are.
    let mut more = vec![];
    for _ in 0..3 {
        let mut s = connect(proxy.addr("web"));
        assert_eq!(round_trip(&mut s, b"x").unwrap(), b"x");
        more.push(s);
    }
    let (_, v) = json(proxy.admin(), "/connections?limit=2");
    assert_eq!(
        (v["returned"].as_u64(), v["more"].as_u64()),
        (Some(2), Some(2))
    );
    let (_, v) = json(proxy.admin(), "/connections?limit=0");
    assert_eq!(
        (v["returned"].as_u64(), v["more"].as_u64()),
        (Some(0), Some(4))
    );
    drop(more);
    drop(c);
    poll(
        Duration::from_secs(5),
        "pairs gone from /connections",
        || (json(proxy.admin(), "/connections").1["returned"] == 0).then_some(()),
    );
}

#[test]
fn bad_requests_get_4xx_and_the_proxy_keeps_serving() {
    let up = echo_server();
    let proxy = Proxy::start(&one_route("web", &[up], ""));
    let admin = proxy.admin();
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/nope", 404, "no such endpoint"),
        ("GET", "/", 404, "no such endpoint"),
        ("POST", "/metrics", 405, "read-only"),
        ("DELETE", "/connections", 405, "read-only"),
        ("GET", "/connections?limit=abc", 400, "limit"),
        ("GET", "/connections?limit=-1", 400, "limit"),
        (
            "GET",
            "/connections?limit=99999999999999999999",
            400,
            "limit",
        ),
        ("GET", "/connections?limit=1&limit=2", 400, "twice"),
        (
            "GET",
            "/connections?sort=age",
            400,
            "unknown query parameter",
        ),
        ("GET", "/metrics?x=1", 400, "unknown query parameter"),
        ("GET", "/connections?route=%zz", 400, "percent escape"),
        ("GET", "/connections?route=nope", 404, "no route named"),
    ];
    for (method, path, status, words) in cases {
        let (got, body) = admin_request(admin, method, path);
        assert_eq!(got, *status, "{method} {path}: {body}");
        assert!(
            body.contains(words),
            "{method} {path}: expected {words:?} in {body}"
        );
    }
    let (status, body) = admin_get(admin, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Garbage instead of HTTP: the connection is closed, nothing else happens.
    let mut s = connect(admin);
    s.write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut c = connect(proxy.addr("web"));
    assert_eq!(round_trip(&mut c, b"still fine").unwrap(), b"still fine");
    assert_eq!(admin_get(admin, "/healthz").0, 200);
}

#[test]
fn admin_connections_are_capped_and_timed_out() {
    let up = echo_server();
    let proxy = Proxy::start(&one_route("web", &[up], ""));
    let admin = proxy.admin();
    // 64 idle connections hold every slot; the next one is closed at once.
    let idle: Vec<TcpStream> = (0..64).map(|_| connect(admin)).collect();
    thread::sleep(Duration::from_millis(200));
    let mut extra = connect(admin);
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = [0u8; 1];
    let start = Instant::now();
    let r = extra.read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "over the cap: closed, got {r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    // Relaying is not affected while the admin endpoint is saturated.
    let mut c = connect(proxy.addr("web"));
    assert_eq!(round_trip(&mut c, b"ok").unwrap(), b"ok");
    // A connection that never sends its request is dropped after the 5 s header timeout.
    let mut first = idle.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = first.read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "idle admin connection closed, got {r:?}"
    );
}

#[test]
fn readyz_flips_when_the_only_server_goes_down_and_back() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = listener.local_addr().unwrap();
    let proxy = Proxy::start(&one_route(
        "solo",
        &[up],
        "[route.upstream.health_check]\ntcp = true\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n",
    ));
    let admin = proxy.admin();
    poll(
        Duration::from_secs(5),
        "ready while the server is up",
        || (admin_get(admin, "/readyz").0 == 200).then_some(()),
    );
    drop(listener);
    let body = poll(
        Duration::from_secs(5),
        "503 once the server is down",
        || {
            let (status, body) = admin_get(admin, "/readyz");
            (status == 503).then_some(body)
        },
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["not_ready"][0]["route"], "solo");
    assert!(
        v["not_ready"][0]["problem"]
            .as_str()
            .unwrap()
            .contains(&format!("{up} down")),
        "{v}"
    );
    let (_, ups) = json(admin, "/upstreams");
    assert_eq!(ups["routes"][0]["servers"][0]["state"], "down");
    assert_eq!(ups["routes"][0]["servers"][0]["last_check"]["ok"], false);
    let (_, metrics) = admin_get(admin, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            &format!("kaproxy_upstream_up{{route=\"solo\",server=\"{up}\"}}")
        ),
        Some(0.0),
        "{metrics}"
    );

    let _back = TcpListener::bind(up).expect("rebind the same port");
    poll(Duration::from_secs(5), "ready again", || {
        (admin_get(admin, "/readyz").0 == 200).then_some(())
    });
    let (_, metrics) = admin_get(admin, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            &format!("kaproxy_upstream_up{{route=\"solo\",server=\"{up}\"}}")
        ),
        Some(1.0)
    );
}

#[test]
fn admin_can_be_turned_off() {
    let up = echo_server();
    let proxy = Proxy::start(&format!(
        "{}\n[admin]\nlisten = \"\"\n",
        one_route("web", &[up], "")
    ));
    assert!(!proxy
        .events()
        .iter()
        .any(|v| message(v) == "admin listening"));
    let mut c = connect(proxy.addr("web"));
    assert_eq!(round_trip(&mut c, b"x").unwrap(), b"x");
}

#[test]
fn status_shows_routes_servers_pairs_and_close_reasons() {
    let up = echo_server();
    let proxy = Proxy::start(&one_route(
        "web",
        &[up, dead_port()],
        "[route.upstream.passive_ejection]\nfailures = 1\n",
    ));
    for _ in 0..2 {
        let mut c = connect(proxy.addr("web"));
        assert_eq!(round_trip(&mut c, b"x").unwrap(), b"x");
    }
    let mut live = connect(proxy.addr("web"));
    assert_eq!(round_trip(&mut live, b"x").unwrap(), b"x");
    proxy.wait_closes(2, Duration::from_secs(5));
    let out = Command::new(bin())
        .args(["status", "--admin", &proxy.admin().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(": ready"), "{text}");
    assert!(text.contains("route web"), "{text}");
    assert!(
        text.contains("pairs 1 (client side: established 1)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{up}")) && text.contains(" up "),
        "{text}"
    );
    assert!(
        text.contains("ejected"),
        "the dead server shows as ejected: {text}"
    );
    assert!(text.contains("closed so far: completed 2"), "{text}");

    let out = Command::new(bin())
        .args(["status", "--admin", &dead_port().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin endpoint"));
}

#[test]
fn metrics_count_what_happened() {
    isolated("metrics_count_what_happened", || {
        let (listener, up) = upstream_listener();
        let config = format!(
            "[[route]]\nname = \"ka\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nkeepalive = {{ idle = \"1s\", interval = \"1s\", probes = 2 }}\n[route.upstream]\nservers = [\"{up}\"]\n[[route]]\nname = \"down\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{}\"]\n",
            dead_port()
        );
        let proxy = Proxy::start(&config);
        // Echoes the four pairs of route "ka", each until its EOF.
        let echo = thread::spawn(move || {
            for _ in 0..4 {
                let mut s = accept(&listener);
                let mut r = s.try_clone().unwrap();
                thread::spawn(move || {
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        // Three normal pairs, 5 bytes each way.
        for _ in 0..3 {
            let mut c = connect(proxy.addr("ka"));
            assert_eq!(round_trip(&mut c, b"hello").unwrap(), b"hello");
        }
        proxy.wait_closes(3, Duration::from_secs(5));
        // One connect failure. kaproxy may accept and reset the client before our
        // connect call returns, which then reports the reset: either way it counts.
        if let Ok(mut c) = TcpStream::connect_timeout(&proxy.addr("down"), Duration::from_secs(5)) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 1];
            let _ = c.read(&mut buf);
        }
        proxy.wait_closes(4, Duration::from_secs(5));
        // One half-dead pair: the client goes silent.
        let mut c = connect_from(CLIENT_A, proxy.addr("ka"));
        assert_eq!(round_trip(&mut c, b"bye").unwrap(), b"bye");
        blackhole_host_port(CLIENT_A, proxy.addr("ka").port());
        let closes = proxy.wait_closes(5, Duration::from_secs(8));
        assert!(closes.iter().any(|v| reason(v) == "client_dead"));
        echo.join().unwrap();

        let (status, m) = admin_get(proxy.admin(), "/metrics");
        assert_eq!(status, 200);
        let get = |s: &str| metric(&m, s).unwrap_or_else(|| panic!("{s} missing from:\n{m}"));
        assert_eq!(get("kaproxy_pairs_accepted_total{route=\"ka\"}"), 4.0);
        assert_eq!(get("kaproxy_pairs_accepted_total{route=\"down\"}"), 1.0);
        assert_eq!(get("kaproxy_pairs_active{route=\"ka\"}"), 0.0);
        assert_eq!(
            get("kaproxy_pairs_closed_total{route=\"ka\",reason=\"completed\"}"),
            3.0
        );
        assert_eq!(
            get("kaproxy_pairs_closed_total{route=\"ka\",reason=\"client_dead\"}"),
            1.0
        );
        assert_eq!(
            get("kaproxy_pairs_closed_total{route=\"down\",reason=\"connect_failed\"}"),
            1.0
        );
        assert_eq!(
            get("kaproxy_bytes_total{route=\"ka\",direction=\"client_to_upstream\"}"),
            18.0
        );
        assert_eq!(
            get("kaproxy_bytes_total{route=\"ka\",direction=\"upstream_to_client\"}"),
            18.0
        );
        assert!(
            m.contains(
                "kaproxy_upstream_connect_failures_total{route=\"down\",server=\"127.0.0.1:"
            ),
            "{m}"
        );
        assert_eq!(
            get("kaproxy_pair_duration_seconds_count{route=\"ka\"}"),
            4.0
        );
        assert_eq!(
            get("kaproxy_dead_peer_detection_seconds_count{route=\"ka\",side=\"client\"}"),
            1.0
        );
        // Death declared 1 + 1 × 2 = 3 s after the client's last data; 2 s tolerance.
        let detected = get("kaproxy_dead_peer_detection_seconds_sum{route=\"ka\",side=\"client\"}");
        assert!(
            (2.0..=5.0).contains(&detected),
            "detection took {detected} s"
        );
        assert!(m.contains("kaproxy_build_info{version=\""), "{m}");
    });
}

#[test]
fn connections_show_keepalive_probes_to_a_silent_client() {
    isolated(
        "connections_show_keepalive_probes_to_a_silent_client",
        || {
            let (listener, up) = upstream_listener();
            // Bound 2 + 2 × 3 = 8 s: probes are visible for about 6 s before teardown.
            let config = format!(
            "[[route]]\nname = \"ka\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nkeepalive = {{ idle = \"2s\", interval = \"2s\", probes = 3 }}\n[route.upstream]\nservers = [\"{up}\"]\nkeepalive = {{ idle = \"45s\", interval = \"9s\", probes = 4, user_timeout = \"off\" }}\n"
        );
            let proxy = Proxy::start(&config);
            let mut c = connect_from(CLIENT_A, proxy.addr("ka"));
            let mut u = accept(&listener);
            c.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            u.read_exact(&mut buf).unwrap();
            blackhole_host_port(CLIENT_A, proxy.addr("ka").port());

            let pair = poll(
                Duration::from_secs(8),
                "client-side keepalive probes visible in /connections",
                || {
                    let (_, v) = json(proxy.admin(), "/connections");
                    let p = v["pairs"][0].clone();
                    (p["client"]["keepalive_probes_sent"].as_u64().unwrap_or(0) > 0).then_some(p)
                },
            );
            println!("pair while probing: {pair}");
            assert!(
                pair["client"]["last_data_recv_ms"].as_u64().unwrap() >= 2000,
                "{pair}"
            );
            assert_eq!(
                pair["upstream"]["keepalive_probes_sent"], 0,
                "the upstream side answers: {pair}"
            );
            assert_eq!(
                keepalive_of(&pair["client"]),
                (Some(2), Some(2), Some(3), Some(8000))
            );
            assert_eq!(
                keepalive_of(&pair["upstream"]),
                (Some(45), Some(9), Some(4), Some(0))
            );

            let closes = proxy.wait_closes(1, Duration::from_secs(10));
            assert_eq!(reason(&closes[0]), "client_dead");
            let (_, v) = json(proxy.admin(), "/connections");
            assert_eq!(v["returned"], 0, "torn down pairs leave /connections");
        },
    );
}

fn free_port() -> u16 {
    reserved_addr().port()
}

fn healthcheck(config: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["healthcheck", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn healthcheck_asks_the_admin_endpoint_or_the_listeners() {
    let up = echo_server();
    for admin_on in [true, false] {
        let (route_port, admin_port) = (free_port(), free_port());
        let admin = if admin_on {
            format!("[admin]\nlisten = \"0.0.0.0:{admin_port}\"\n")
        } else {
            "[admin]\nenabled = false\n".to_string()
        };
        let config = format!("{admin}[[route]]\nname = \"web\"\nlisten = \"0.0.0.0:{route_port}\"\n[route.upstream]\nservers = [\"{up}\"]\n");
        let mut proxy = Proxy::start(&config);
        let (code, out) = healthcheck(&proxy.config_path);
        assert_eq!(code, Some(0), "admin {admin_on}: {out}");
        let expected = if admin_on {
            format!("127.0.0.1:{admin_port}/healthz answered 200")
        } else {
            format!("accepting on web on 127.0.0.1:{route_port}")
        };
        assert!(out.contains(&expected), "{out}");
        proxy.signal("TERM");
        assert!(proxy.wait_exit(Duration::from_secs(5)).success());
        let (code, out) = healthcheck(&proxy.config_path);
        assert_eq!(code, Some(1), "unhealthy once stopped: {out}");
        assert!(
            out.contains("unhealthy") || out.contains("cannot reach"),
            "{out}"
        );
    }
}

/// The soft RLIMIT_NOFILE after raising it to the hard limit (kaproxy inherits it).
#[allow(unsafe_code)]
fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if lim.rlim_cur < lim.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            lim = raised;
        }
    }
    lim.rlim_cur
}

/// Accepts `n` connections within `within` and keeps them open, silent.
fn hold_connections(
    listener: TcpListener,
    n: usize,
    within: Duration,
) -> thread::JoinHandle<Vec<TcpStream>> {
    thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + within;
        let mut held = Vec::with_capacity(n);
        while held.len() < n {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "kaproxy connected {} of {n} upstreams within {within:?}",
                        held.len()
                    );
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        held
    })
}

/// A GET to the admin endpoint: status, response head and body.
fn admin_get_with_head(admin: SocketAddr, path: &str) -> (u16, String, String) {
    admin_exchange(admin, "GET", path)
}

/// Peak resident memory (VmHWM) of the kaproxy started on this config file, in KiB.
fn peak_rss_kib(config: &std::path::Path) -> Option<u64> {
    let needle = config.to_str()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|d| {
        let cmdline = std::fs::read(d.path().join("cmdline")).ok()?;
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            return None;
        }
        let status = std::fs::read_to_string(d.path().join("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn connections_requests_do_not_stall_other_pairs() {
    // Each idle pair holds two descriptors here and two in kaproxy, which inherits the
    // limit. 3,000 is the count the issue measured; a lower limit gets fewer pairs.
    let nofile = raise_open_files_limit();
    let pairs = 3000.min((nofile.saturating_sub(1000) / 2) as usize);
    if pairs < 3000 {
        println!("note: RLIMIT_NOFILE is {nofile}: {pairs} idle pairs instead of 3000");
    }
    let (holder, idle_up) = upstream_listener_for_bursts();
    let echo = echo_server();
    let proxy = Proxy::start(&format!(
        "[[route]]\nname = \"idle\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{idle_up}\"]\n[[route]]\nname = \"probe\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"{echo}\"]\n"
    ));
    let admin = proxy.admin();
    let mut probe = connect(proxy.addr("probe"));
    assert_eq!(round_trip(&mut probe, b"p").unwrap(), b"p");

    let held = hold_connections(holder, pairs, Duration::from_secs(30));
    let clients: Vec<TcpStream> = (0..pairs).map(|_| connect(proxy.addr("idle"))).collect();
    let upstreams = held.join().expect("upstream holder");
    poll(Duration::from_secs(10), "every pair registered", || {
        let (_, v) = json(admin, "/connections?limit=0");
        (v["more"].as_u64() == Some(pairs as u64 + 1)).then_some(())
    });

    // 8 clients ask for everything at once, again and again; a refused one retries
    // after 10 ms rather than the second Retry-After asks for, to keep the pressure on.
    let until = Instant::now() + Duration::from_secs(4);
    let load: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                let (mut ok, mut busy, mut other) = (0u32, 0u32, Vec::new());
                let (mut busy_sample, mut ok_sample) = (None, None);
                while Instant::now() < until {
                    let (status, head, body) =
                        admin_get_with_head(admin, "/connections?limit=10000");
                    match status {
                        200 => {
                            ok += 1;
                            ok_sample = Some(body);
                        }
                        503 => {
                            busy += 1;
                            busy_sample.get_or_insert((head, body));
                            thread::sleep(Duration::from_millis(10));
                        }
                        s => other.push(format!("{s}: {}", &body[..body.len().min(200)])),
                    }
                }
                (ok, busy, other, busy_sample, ok_sample)
            })
        })
        .collect();
    let mut rtts = Vec::new();
    while Instant::now() < until {
        let start = Instant::now();
        assert_eq!(round_trip(&mut probe, b"p").unwrap(), b"p");
        rtts.push(start.elapsed());
        thread::sleep(Duration::from_millis(5));
    }
    let (mut ok, mut busy, mut other) = (0, 0, Vec::new());
    let (mut busy_sample, mut ok_sample) = (None, None);
    for t in load {
        let (o, b, x, bs, os) = t.join().expect("load thread");
        ok += o;
        busy += b;
        other.extend(x);
        busy_sample = busy_sample.or(bs);
        ok_sample = ok_sample.or(os);
    }
    let peak_kib = peak_rss_kib(&proxy.config_path);
    rtts.sort();
    let worst = *rtts.last().unwrap();
    let p99 = rtts[rtts.len() * 99 / 100];
    println!(
        "{pairs} idle pairs: {} probe round trips, median {:?}, p99 {p99:?}, worst {worst:?}; /connections 200: {ok}, 503: {busy}; kaproxy peak RSS {peak_kib:?} KiB",
        rtts.len(),
        rtts[rtts.len() / 2]
    );
    // A loopback round trip through kaproxy takes well under 1 ms. 100 ms leaves room
    // for a loaded 2-core machine running other tests alongside, and is still far
    // below the stall the issue measured (381 ms with 3,000 pairs).
    assert!(
        worst < Duration::from_millis(100),
        "worst round trip {worst:?} on an unrelated pair"
    );
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert!(ok > 0, "no /connections request succeeded");
    assert!(busy > 0, "8 concurrent requests were all served at once");
    let (head, body) = busy_sample.unwrap();
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{head}"
    );
    assert!(body.contains("busy"), "{body}");
    let v: Value = serde_json::from_str(&ok_sample.unwrap()).expect("a full JSON answer");
    assert_eq!(v["returned"].as_u64(), Some(pairs as u64 + 1));
    assert_eq!(v["more"], 0);
    drop((clients, upstreams));
}

#[test]
fn connections_under_churn_list_only_live_pairs() {
    let echo = echo_server();
    let proxy = Proxy::start(&one_route("churn", &[echo], ""));
    let (admin, route) = (proxy.admin(), proxy.addr("churn"));
    let stable: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = connect(route);
            assert_eq!(round_trip(&mut s, b"s").unwrap(), b"s");
            s
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(3);
    let churn: Vec<_> = (0..4)
        .map(|i| {
            thread::spawn(move || {
                let mut opened = 0usize;
                while Instant::now() < until {
                    let mut s = connect(route);
                    // Half of them close before the upstream is even connected.
                    if (opened + i) % 2 == 0 {
                        assert_eq!(round_trip(&mut s, b"c").unwrap(), b"c");
                    }
                    opened += 1;
                }
                opened
            })
        })
        .collect();

    // Every pair listed, with the addresses it was listed with.
    let mut listed: Vec<(u64, String)> = Vec::new();
    let mut requests = 0;
    while Instant::now() < until {
        let closed_before: std::collections::HashSet<u64> = proxy
            .closes()
            .iter()
            .filter_map(|v| v["span"]["pair.id"].as_u64())
            .collect();
        let (status, v) = json(admin, "/connections?limit=10000");
        assert_eq!(status, 200, "{v}");
        requests += 1;
        let pairs = v["pairs"].as_array().expect("pairs");
        assert_eq!(v["returned"].as_u64(), Some(pairs.len() as u64));
        let mut last = 0;
        for p in pairs {
            let id = p["id"].as_u64().expect("id");
            assert!(id > last, "ids ascending and unique: {v}");
            last = id;
            assert!(
                !closed_before.contains(&id),
                "pair {id} closed before the request: {p}"
            );
            // A socket whose connection has fully ended (state "close") has no
            // addresses any more; any address shown must be the pair's own.
            let (client, upstream) = (&p["client"], &p["upstream"]);
            assert!(client.get("error").is_none(), "{p}");
            assert!(client["state"].is_string(), "{p}");
            let local = &client["local_address"];
            assert!(local.is_null() || *local == route.to_string(), "{p}");
            if !upstream.is_null() {
                assert!(upstream.get("error").is_none(), "{p}");
                let peer = &upstream["address"];
                assert!(peer.is_null() || *peer == echo.to_string(), "{p}");
            }
            if let Some(addr) = client["address"].as_str() {
                listed.push((id, addr.to_string()));
            }
        }
    }
    let opened: usize = churn.into_iter().map(|t| t.join().unwrap()).sum();
    drop(stable);
    let closes = proxy.wait_closes(opened + 20, Duration::from_secs(20));
    let client_of: std::collections::HashMap<u64, &str> = closes
        .iter()
        .filter_map(|v| Some((v["span"]["pair.id"].as_u64()?, span_field(v, "client.addr"))))
        .collect();
    println!(
        "{opened} pairs opened and closed during {requests} requests, {} entries listed",
        listed.len()
    );
    assert!(requests > 3 && opened > 100, "not much churn");
    for (id, client) in &listed {
        // A descriptor read after its pair closed would show some other socket.
        assert_eq!(
            Some(client.as_str()),
            client_of.get(id).copied(),
            "pair {id} listed with another pair's client address"
        );
    }
}

#[test]
fn bytes_are_counted_while_a_long_pair_is_still_open() {
    let up = echo_server();
    let proxy = Proxy::start(&one_route("long", &[up], ""));
    let mut c = connect(proxy.addr("long"));
    let chunk = vec![7u8; 100 * 1024];
    assert_eq!(round_trip(&mut c, &chunk).unwrap(), chunk);
    // The pair stays open: its traffic must show now, not when it closes.
    let series = |direction: &str| {
        format!("kaproxy_bytes_total{{route=\"long\",direction=\"{direction}\"}}")
    };
    let text = poll(Duration::from_secs(5), "100 KiB counted each way", || {
        let (status, text) = admin_get(proxy.admin(), "/metrics");
        assert_eq!(status, 200);
        let both = ["client_to_upstream", "upstream_to_client"]
            .iter()
            .all(|d| metric(&text, &series(d)) == Some(102_400.0));
        both.then_some(text)
    });
    assert_eq!(
        metric(&text, "kaproxy_pairs_active{route=\"long\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(proxy.closes().is_empty());
    assert_eq!(
        metric(&text, "kaproxy_log_lines_dropped_total"),
        Some(0.0),
        "{text}"
    );
    // Every close reason and both detection histograms exist from the start.
    assert_eq!(
        metric(
            &text,
            "kaproxy_pairs_closed_total{route=\"long\",reason=\"client_stalled\"}"
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "kaproxy_dead_peer_detection_seconds_count{route=\"long\",side=\"upstream\"}"
        ),
        Some(0.0),
        "{text}"
    );
}

#[test]
fn accepted_sockets_inherit_the_client_options_of_their_route() {
    // kaproxy sets client options once, on each route's listening socket; every
    // accepted socket must hold them without a setsockopt of its own.
    let up = echo_server();
    // Route, its client keepalive, and what must be read back: enabled, idle, interval, probes.
    type Expected = (bool, u64, u64, u64);
    let routes: [(&str, &str, Expected); 3] = [
        (
            "odd",
            "{ idle = \"7s\", interval = \"3s\", probes = 5 }",
            (true, 7, 3, 5),
        ),
        (
            "edge",
            "{ idle = \"32767s\", interval = \"1s\", probes = 127 }",
            (true, 32767, 1, 127),
        ),
        ("off", "{ enabled = false }", (false, 0, 0, 0)),
    ];
    let mut config = String::new();
    for (name, ka, _) in &routes {
        config += &format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nkeepalive = {ka}\n[route.upstream]\nservers = [\"{up}\"]\nkeepalive = {{ idle = \"11s\", interval = \"13s\", probes = 17 }}\n"
        );
    }
    let proxy = Proxy::start(&config);
    let mut clients = Vec::new();
    for (name, _, _) in &routes {
        let mut c = connect(proxy.addr(name));
        assert_eq!(round_trip(&mut c, b"x").unwrap(), b"x");
        clients.push(c);
    }
    let (status, v) = json(proxy.admin(), "/connections");
    assert_eq!(status, 200);
    for (name, _, (enabled, idle, interval, probes)) in &routes {
        let p = v["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["route"] == *name)
            .unwrap_or_else(|| panic!("no pair of route {name}: {v}"));
        let ka = &p["client"]["keepalive"];
        assert_eq!(ka["enabled"], *enabled, "{name}: {ka}");
        assert_eq!(ka["nodelay"], true, "{name}: {ka}");
        if *enabled {
            assert_eq!(
                (
                    ka["idle_s"].as_u64(),
                    ka["interval_s"].as_u64(),
                    ka["probes"].as_u64()
                ),
                (Some(*idle), Some(*interval), Some(*probes)),
                "{name}: {ka}"
            );
        }
        let up_ka = &p["upstream"]["keepalive"];
        assert_eq!(
            (
                up_ka["enabled"].as_bool(),
                up_ka["nodelay"].as_bool(),
                up_ka["idle_s"].as_u64(),
                up_ka["interval_s"].as_u64(),
                up_ka["probes"].as_u64()
            ),
            (Some(true), Some(true), Some(11), Some(13), Some(17)),
            "{name}: {up_ka}"
        );
    }
}
