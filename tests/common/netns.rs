//! Runs a test body inside a private network namespace (`unshare -n`, as root),
//! where it may black-hole traffic with nftables without touching the host.
//!
//! The test binary re-executes itself under `unshare -n` for just that one test;
//! the child brings `lo` up and runs the body, and everything it starts (kaproxy,
//! peers) lives and dies inside that namespace. Without root or the tools this
//! prints why the test is skipped; under CI=true that is a failure instead.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

const CHILD_ENV: &str = "KAPROXY_TEST_IN_NETNS";

fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

fn sh_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn why_not_possible(own_files: bool) -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some(format!(
            "needs root for unshare -n and nftables (uid is {})",
            uid.unwrap_or_else(|| "unknown".into())
        ));
    }
    for tool in ["unshare", "nft", "ip", "ss"] {
        if !sh_ok("sh", &["-c", &format!("command -v {tool}")]) {
            return Some(format!(
                "{tool} is not installed (apt-get install nftables iproute2 util-linux)"
            ));
        }
    }
    if !sh_ok("unshare", &["-n", "true"]) {
        return Some("unshare -n is not permitted here".into());
    }
    if own_files && !sh_ok("unshare", &["-n", "-m", "true"]) {
        return Some("unshare -m is not permitted here".into());
    }
    None
}

/// Runs `body` in a fresh network namespace; `name` must be the test's own name.
pub fn isolated(name: &str, body: impl FnOnce()) {
    isolated_with_files(name, &[], body)
}

/// As [`isolated`], for a test that also makes named namespaces of its own
/// (`ip netns add`, see `nat`), which takes mounts under /run/netns.
pub fn isolated_with_named_netns(name: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_none() && why_not_possible(false).is_none() {
        // Unique per call: the tests of one binary run in parallel, and a shared
        // name made all but one trial fail with "File exists".
        static TRIALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = TRIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let trial = format!("kaproxy-t-{}-trial-{n}", std::process::id());
        let ok = sh_ok("ip", &["netns", "add", &trial]);
        let _ = sh_ok("ip", &["netns", "del", &trial]);
        if !ok {
            let why = "ip netns add is not permitted here (it mounts under /run/netns)";
            if under_ci() {
                panic!("{name} must run in CI but cannot: {why}");
            }
            eprintln!("SKIPPED {name}: {why}");
            return;
        }
    }
    isolated(name, body)
}

/// As [`isolated`], and in a private mount namespace where each `(path, text)`
/// is bind-mounted over `path` (`/etc/hosts`, `/etc/resolv.conf`): a test can
/// give a name several addresses, or point the resolver somewhere, while the
/// host's own files stay untouched.
pub fn isolated_with_files(name: &str, files: &[(&str, &str)], body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (i, (path, text)) in files.iter().enumerate() {
            let own = dir.path().join(i.to_string());
            std::fs::write(&own, text).expect("write a replacement file");
            run(&["mount", "--bind", own.to_str().expect("utf-8 path"), path]);
        }
        run(&["ip", "link", "set", "lo", "up"]);
        run(&["nft", "add", "table", "inet", "kaproxy_test"]);
        run(&[
            "nft",
            "add",
            "chain",
            "inet",
            "kaproxy_test",
            "output",
            "{ type filter hook output priority 0; policy accept; }",
        ]);
        body();
        return;
    }
    if let Some(why) = why_not_possible(!files.is_empty()) {
        if under_ci() {
            panic!("{name} must run in CI but cannot: {why}");
        }
        eprintln!("SKIPPED {name}: {why}");
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    // unshare -m makes every mount private, so the bind mounts stay in here.
    let namespaces: &[&str] = if files.is_empty() {
        &["-n", "--"]
    } else {
        &["-n", "-m", "--"]
    };
    let out = Command::new("unshare")
        .args(namespaces)
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the test inside unshare -n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "{name} failed inside its network namespace"
    );
    // Guards against a name that filtered out every test, which would "pass" vacuously.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{name} did not run inside the namespace"
    );
}

/// Runs a command that must succeed.
pub fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Adds `nft add rule inet kaproxy_test output <matches> drop`.
fn drop_rule(matches: &[&str]) {
    let mut argv = vec!["nft", "add", "rule", "inet", "kaproxy_test", "output"];
    argv.extend_from_slice(matches);
    argv.push("drop");
    run(&argv);
}

/// Drops every packet between `ip` and the port `port` (both directions), as if
/// the host at `ip` had been cut off without a word.
pub fn blackhole_host_port(ip: IpAddr, port: u16) {
    let (ip, port) = (ip.to_string(), port.to_string());
    drop_rule(&["ip", "saddr", &ip, "tcp", "dport", &port]);
    drop_rule(&["ip", "daddr", &ip, "tcp", "sport", &port]);
}

/// Drops every packet to or from a server address, so connects to it hang as if
/// the host were gone: SYNs go unanswered and nothing is refused.
pub fn blackhole_server(addr: SocketAddr) {
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    drop_rule(&["ip", "daddr", &ip, "tcp", "dport", &port]);
    drop_rule(&["ip", "saddr", &ip, "tcp", "sport", &port]);
}

/// Drops every packet to or from a TCP port.
pub fn blackhole_port(port: u16) {
    let port = port.to_string();
    drop_rule(&["tcp", "dport", &port]);
    drop_rule(&["tcp", "sport", &port]);
}

/// Connects to `to` from source address `from` (any 127.x.y.z works on lo).
pub fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::new(from, 0).into())
        .expect("bind source address");
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .expect("connect to proxy");
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}
