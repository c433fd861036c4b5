//! `max_connections`: at the limit a route stops accepting, clients wait in the
//! listen backlog and are served as slots free; other routes are unaffected.
//! And the descriptor limit checks that go with it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn metrics_of(proxy: &Proxy) -> String {
    admin_get(proxy.admin(), "/metrics").1
}

fn series(text: &str, name: &str, route: &str) -> f64 {
    metric(text, &format!("{name}{{route=\"{route}\"}}")).unwrap_or(-1.0)
}

/// Waits until `cond` holds, or panics with `what` at the deadline.
fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A client that sent its id and waits for the echo.
struct Client {
    stream: TcpStream,
    id: String,
    served: bool,
}

impl Client {
    /// Reads the echo if it is there (non-blocking); whether it has been served.
    fn poll(&mut self) -> bool {
        if !self.served {
            let mut buf = [0u8; 3];
            match self.stream.peek(&mut buf) {
                Ok(3) => {
                    self.stream.read_exact(&mut buf).unwrap();
                    assert_eq!(std::str::from_utf8(&buf).unwrap(), self.id);
                    self.served = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("client {}: {e}", self.id),
            }
        }
        self.served
    }
}

fn served(clients: &mut [Client]) -> usize {
    clients.iter_mut().map(|c| c.poll()).filter(|s| *s).count()
}

#[test]
fn at_the_limit_clients_wait_in_the_backlog_and_each_is_served_when_a_slot_frees() {
    let up = echo_server();
    let other_up = echo_server();
    let cfg = format!(
        "{}\n[[route]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 0\n[route.upstream]\nservers = [\"{other_up}\"]\n",
        one_route("limited", &[up], "max_connections = 50")
    );
    // Two workers, each with its own copy of the listener: the slots are shared.
    let proxy = Proxy::start_with_env(&cfg, &[("KAPROXY_WORKERS", "2")]);
    let addr = proxy.addr("limited");
    let mut clients: Vec<Client> = (0..80)
        .map(|i| {
            let mut stream = connect(addr);
            let id = format!("{i:03}");
            stream.write_all(id.as_bytes()).unwrap();
            stream.set_nonblocking(true).unwrap();
            Client {
                stream,
                id,
                served: false,
            }
        })
        .collect();

    wait_for("50 clients served", Duration::from_secs(10), || {
        served(&mut clients) >= 50
    });
    // The other 30 stay unserved: not accepted at all, not accepted and dropped.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(served(&mut clients), 50, "exactly the limit is served");
    let m = metrics_of(&proxy);
    assert_eq!(series(&m, "kaproxy_pairs_active", "limited"), 50.0, "{m}");
    assert_eq!(
        series(&m, "kaproxy_pairs_accepted_total", "limited"),
        50.0,
        "{m}"
    );
    assert_eq!(series(&m, "kaproxy_route_at_limit", "limited"), 1.0, "{m}");
    assert_eq!(
        series(&m, "kaproxy_route_limit_reached_total", "limited"),
        1.0,
        "{m}"
    );
    assert_eq!(series(&m, "kaproxy_route_at_limit", "other"), 0.0, "{m}");
    assert!(
        proxy.closes().is_empty(),
        "nothing closed: {:?}",
        proxy.closes()
    );
    for c in clients.iter().filter(|c| !c.served) {
        let mut b = [0u8; 1];
        assert!(
            matches!(c.stream.peek(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "a waiting client is neither answered nor closed"
        );
    }

    // /upstreams and `kaproxy status` show the limit.
    let (_, body) = admin_get(proxy.admin(), "/upstreams");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let limited = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "limited")
        .unwrap();
    assert_eq!(limited["max_connections"], 50, "{body}");
    assert_eq!(limited["slots_taken"], 50, "{body}");
    let other = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "other")
        .unwrap();
    assert!(other["max_connections"].is_null(), "{body}");
    let status = std::process::Command::new(bin())
        .args(["status", "--admin", &proxy.admin().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("limit 50 (50 taken, AT LIMIT"), "{text}");
    assert!(text.contains("limit none"), "{text}");

    // Another route is unaffected.
    for _ in 0..5 {
        let started = Instant::now();
        let mut o = connect(proxy.addr("other"));
        assert_eq!(round_trip(&mut o, b"other").unwrap(), b"other");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    // Each freed slot serves one waiting client, promptly.
    for freed in 1..=30 {
        let i = clients.iter().position(|c| c.served).unwrap();
        let done = clients.remove(i);
        done.stream.shutdown(std::net::Shutdown::Both).unwrap();
        drop(done);
        let started = Instant::now();
        wait_for(
            &format!("the waiting client for freed slot {freed}"),
            Duration::from_secs(5),
            || served(&mut clients) == 50,
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "slot {freed}: {:?}",
            started.elapsed()
        );
    }
    assert!(
        clients.iter().all(|c| c.served),
        "all 80 were served in the end"
    );
    let m = metrics_of(&proxy);
    assert_eq!(
        series(&m, "kaproxy_pairs_accepted_total", "limited"),
        80.0,
        "{m}"
    );
    assert_eq!(series(&m, "kaproxy_pairs_active", "limited"), 50.0, "{m}");
    drop(clients);
    wait_for("the gauge back at 0", Duration::from_secs(10), || {
        let m = metrics_of(&proxy);
        series(&m, "kaproxy_route_at_limit", "limited") == 0.0
            && series(&m, "kaproxy_pairs_active", "limited") == 0.0
    });
}

fn check_output(config: &str, nofile: u32) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" check -c \"$1\""))
        .arg(bin())
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn check_warns_when_the_descriptor_limit_cannot_hold_every_route_at_its_limit() {
    let up = dead_port();
    let big = one_route("big", &[up], "max_connections = 5000");
    let out = check_output(&big, 2048);
    assert!(out.contains("limit soft 2048 hard 2048"), "{out}");
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning:"))
        .unwrap_or_else(|| panic!("{out}"));
    let needed: u64 = warning
        .split("ulimit -n ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{warning}"));
    assert!(
        needed > 10_000,
        "two descriptors per pair and then some: {warning}"
    );
    assert!(
        warning.contains(&format!("LimitNOFILE={needed}")),
        "{warning}"
    );

    let small = one_route("small", &[up], "max_connections = 100");
    let out = check_output(&small, 2048);
    assert!(!out.contains("warning:"), "{out}");
    assert!(out.contains("max_connections    = 100 live pairs"), "{out}");
}

#[test]
fn run_raises_the_soft_descriptor_limit_to_what_the_routes_need() {
    let up = echo_server();
    let proxy = Proxy::start_after_shell(
        &one_route("r", &[up], "max_connections = 1000"),
        "ulimit -Sn 256",
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or_else(|| panic!("{limits}"));
    assert!(
        (2_000..3_000).contains(&soft),
        "soft limit {soft}:\n{limits}"
    );
    let raised = proxy
        .events()
        .into_iter()
        .find(|v| message(v).starts_with("raised the descriptor limit"))
        .unwrap_or_else(|| panic!("{}", proxy.raw_log()));
    assert_eq!(raised["from"], 256);
    assert_eq!(raised["to"], soft);
    let mut c = connect(proxy.addr("r"));
    assert_eq!(round_trip(&mut c, b"ok").unwrap(), b"ok");
}
