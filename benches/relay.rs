//! Side-by-side benchmark, one run, ratios: a direct loopback connection vs the
//! same traffic through the kaproxy binary (release build), and kaproxy's
//! resident memory per idle pair.
//!
//! Run with `cargo bench --bench relay`. Every loop is bounded in count and in time.
//! Environment knobs (all optional): KAPROXY_BENCH_BYTES (bulk bytes per run,
//! default 1 GiB), KAPROXY_BENCH_ROUNDS (round trips per run, default 20000),
//! KAPROXY_BENCH_IDLE_PAIRS (default 10000).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const RUNS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(120);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// kaproxy in forward mode, bound address read from its log.
struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kaproxy"))
            .args([
                "--log-format",
                "json",
                "forward",
                "--admin",
                "off",
                "127.0.0.1:0",
            ])
            .arg(upstream.to_string())
            .env("KAPROXY_LOG", "warn,kaproxy::app=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kaproxy");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("route listening") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let _ = tx.send(
                        v["address"]
                            .as_str()
                            .unwrap()
                            .parse::<SocketAddr>()
                            .unwrap(),
                    );
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("kaproxy listening");
        Proxy { child, addr }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Upstream that discards everything and reports how many bytes each connection sent.
fn sink() -> (SocketAddr, mpsc::Receiver<(u64, Instant)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tx.send((total, Instant::now()));
            });
        }
    });
    (addr, rx)
}

/// Upstream that echoes every connection.
fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            s.set_nodelay(true).unwrap();
            thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One stream of `bytes` to the sink behind `target`; returns bytes per second.
fn bulk(target: SocketAddr, done: &mpsc::Receiver<(u64, Instant)>, bytes: usize) -> f64 {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut s = TcpStream::connect(target).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let (got, at) = done.recv_timeout(DEADLINE).expect("sink finished");
    assert_eq!(got as usize, sent, "sink received every byte");
    sent as f64 / (at - start).as_secs_f64()
}

/// `conns` connections each doing `rounds / conns` 64-byte round trips; returns round trips per second.
fn round_trips(target: SocketAddr, conns: usize, rounds: usize) -> f64 {
    let per = rounds / conns;
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(target).unwrap();
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let msg = [7u8; 64];
                let mut buf = [0u8; 64];
                for _ in 0..per {
                    s.write_all(&msg).unwrap();
                    s.read_exact(&mut buf).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    (per * conns) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Prints one row: direct, kaproxy, and HAProxy when it ran; returns kaproxy / direct.
fn compare(
    name: &str,
    unit: &str,
    scale: f64,
    direct: f64,
    kaproxy: f64,
    haproxy: Option<f64>,
) -> f64 {
    let ratio = kaproxy / direct;
    let mut row = format!(
        "{name:<32} direct {:>9.1} {unit:<6} kaproxy {:>9.1} ({:>5.1}%)",
        direct / scale,
        kaproxy / scale,
        ratio * 100.0
    );
    if let Some(h) = haproxy {
        row += &format!(
            "  haproxy {:>9.1} ({:>5.1}%)",
            h / scale,
            h / direct * 100.0
        );
    }
    println!("{row}");
    ratio
}

/// HAProxy in TCP mode in front of `upstream`, when the haproxy binary is installed:
/// the reference the mission measures itself against.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(upstream: SocketAddr) -> Option<Haproxy> {
        let bin = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = tempfile::tempdir().ok()?;
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4000\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\nfrontend f\n  bind 127.0.0.1:{port}\n  default_backend b\nbackend b\n  server s1 {upstream}\n"
            ),
        )
        .ok()?;
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
        Some(Haproxy {
            child,
            addr,
            _dir: dir,
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unsafe_code)]
fn raise_nofile(want: u64) -> u64 {
    // 10,000 idle pairs need 20,000 descriptors in kaproxy and 20,000 here; the child inherits.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let target = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &target) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Runs the idle-pair upstream in its own process, so that its descriptors do not
/// count against this process's limit. Returns the child and its address.
fn echo_process() -> (Child, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ECHO_ROLE, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn echo process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().parse().expect("echo address");
    (child, addr)
}

const ECHO_ROLE: &str = "KAPROXY_BENCH_ECHO_PROCESS";

/// The echo process: tokio, so that 10,000 connections cost no threads.
fn echo_process_main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap());
        // Bounded: the parent kills this process when done; this stops it regardless.
        let _ = tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
        .await;
    });
}

fn idle_pairs(n: usize) -> (f64, u64) {
    let (mut echo_child, up) = echo_process();
    let proxy = Proxy::start(up);
    // Warm up the runtime and allocator with a few pairs before the baseline.
    for _ in 0..50 {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.write_all(b"warm").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
    }
    thread::sleep(Duration::from_millis(300));
    let before = proxy.rss_kib();
    let deadline = Instant::now() + DEADLINE;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        assert!(
            Instant::now() < deadline,
            "opening idle pairs took too long"
        );
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // One round trip each, so every pair has had (and given back) its buffers.
        s.write_all(b"idle").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        conns.push(s);
    }
    thread::sleep(Duration::from_millis(500));
    let after = proxy.rss_kib();
    let per_pair = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    drop(conns);
    let _ = echo_child.kill();
    let _ = echo_child.wait();
    (per_pair, after)
}

fn main() {
    if std::env::var_os(ECHO_ROLE).is_some() {
        return echo_process_main();
    }
    let only = std::env::var("KAPROXY_BENCH_ONLY").unwrap_or_default();
    // `cargo bench` passes --bench. Without it (`cargo test --benches`) this is a
    // smoke run with small sizes that only shows the benchmark still works.
    let full = std::env::args().any(|a| a == "--bench");
    let bytes = env_usize("KAPROXY_BENCH_BYTES", if full { 1 << 30 } else { 8 << 20 });
    let rounds = env_usize("KAPROXY_BENCH_ROUNDS", if full { 20_000 } else { 320 });
    let pairs = env_usize("KAPROXY_BENCH_IDLE_PAIRS", if full { 10_000 } else { 200 });
    println!("kaproxy relay benchmark: {RUNS} alternating runs each, medians; direct, kaproxy and (when installed) HAProxy on loopback in one process run");

    let mut thr = f64::NAN;
    if only.is_empty() || only == "throughput" {
        let (sink_addr, done) = sink();
        let proxy = Proxy::start(sink_addr);
        let haproxy = Haproxy::start(sink_addr);
        // HAProxy's readiness probe reached the sink as an empty stream: discard it.
        thread::sleep(Duration::from_millis(300));
        while done.try_recv().is_ok() {}
        let (mut d, mut p, mut h) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            d.push(bulk(sink_addr, &done, bytes));
            p.push(bulk(proxy.addr, &done, bytes));
            if let Some(hp) = &haproxy {
                h.push(bulk(hp.addr, &done, bytes));
            }
        }
        let h = (!h.is_empty()).then(|| median(h));
        thr = compare(
            "single-stream throughput",
            "MiB/s",
            1024.0 * 1024.0,
            median(d),
            median(p),
            h,
        );
    }
    if only.is_empty() || only == "rt" {
        let echo_addr = echo();
        let proxy = Proxy::start(echo_addr);
        let haproxy = Haproxy::start(echo_addr);
        for conns in [1usize, 16] {
            let (mut d, mut p, mut h) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..RUNS {
                d.push(round_trips(echo_addr, conns, rounds));
                p.push(round_trips(proxy.addr, conns, rounds));
                if let Some(hp) = &haproxy {
                    h.push(round_trips(hp.addr, conns, rounds));
                }
            }
            let h = (!h.is_empty()).then(|| median(h));
            compare(
                &format!("64 B round trips, {conns} conn(s)"),
                "rt/s",
                1.0,
                median(d),
                median(p),
                h,
            );
        }
    }

    // kaproxy holds two descriptors per pair; this process one (the echo process the other).
    let limit = raise_nofile(2 * pairs as u64 + 256);
    let n = pairs.min((limit as usize).saturating_sub(256) / 2 / 100 * 100);
    if n < pairs {
        println!("note: the hard RLIMIT_NOFILE here is {limit} and cannot be raised (no CAP_SYS_RESOURCE): {n} idle pairs instead of {pairs}");
    }
    let (per_pair, rss) = idle_pairs(n);
    println!(
        "{:<34} {per_pair:>8.0} bytes of kaproxy RSS per pair ({n} pairs open, RSS {rss} KiB)",
        "idle pair memory"
    );

    println!();
    if !full {
        println!("smoke run (no --bench): sizes too small for the figures to mean anything; use cargo bench --bench relay");
        return;
    }
    if !thr.is_nan() {
        println!(
            "targets: throughput >= 80% of direct: {}",
            if thr >= 0.8 { "met" } else { "MISSED" }
        );
    }
    println!(
        "targets: idle pair < 2 KiB: {}",
        if per_pair < 2048.0 { "met" } else { "MISSED" }
    );
}
