//! Real third-party peers for interoperability tests: HAProxy and nginx,
//! started in the foreground on loopback ports, stopped on drop. Without the
//! program the test says why it is skipped; under CI=true that is a failure
//! (scripts/test.sh installs haproxy, nginx and libnginx-mod-stream).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A running peer process, killed on drop.
pub struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    /// Its name, for messages.
    pub name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Whether `program` exists; if not, says the test is skipped, or panics under CI.
pub fn have(program: &str, path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    let msg = format!(
        "{program} is not installed at {path} (apt-get install haproxy nginx libnginx-mod-stream)"
    );
    assert!(!under_ci(), "{msg}; under CI=true this is a failure");
    eprintln!("skipped: {msg}");
    false
}

/// A loopback port for a peer that cannot bind port 0 and report it: from
/// the reserved range, which no other test of the binary gets and the
/// kernel never hands out for port 0.
pub fn free_port() -> SocketAddr {
    super::reserved_addr()
}

/// Whether a socket listens on this IPv4 address (state 0A in /proc/net/tcp).
fn listening(addr: SocketAddr) -> bool {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        return false;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        addr.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1] == want && cols[3] == "0A"
            })
        })
        .unwrap_or(false)
}

fn start(
    name: &'static str,
    mut cmd: Command,
    dir: tempfile::TempDir,
    addrs: &[SocketAddr],
) -> Daemon {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
    let mut d = Daemon {
        child,
        _dir: dir,
        name,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in addrs {
        // Watched in /proc rather than by connecting, so that no test
        // connection goes through the peer to kaproxy.
        while !listening(*addr) {
            if let Ok(Some(status)) = d.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = d.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{name} exited with {status}: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen on {addr} within 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    // Drain its output so that it never blocks on a full pipe.
    for out in [
        d.child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        d.child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        thread::spawn(move || {
            let mut out = out;
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
    }
    d
}

/// HAProxy in the foreground with this configuration after a common header
/// (global and defaults, TCP mode, timeouts); waits until `listens` accept.
pub fn haproxy(config: &str, listens: &[SocketAddr]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haproxy.cfg");
    let text = format!(
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n{config}\n"
    );
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new("/usr/sbin/haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    start("haproxy", cmd, dir, listens)
}

/// nginx in the foreground, no master process, with this `stream {}` block
/// content; waits until `listens` accept.
pub fn nginx_stream(stream: &str, listens: &[SocketAddr]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nginx.conf");
    let text = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nmaster_process off;\npid {}/nginx.pid;\nerror_log stderr;\nevents {{ worker_connections 256; }}\nstream {{\n{stream}\n}}\n",
        dir.path().display()
    );
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new("/usr/sbin/nginx");
    cmd.arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&path);
    start("nginx", cmd, dir, listens)
}
