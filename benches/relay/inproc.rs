//! Traffic made inside the bench process: 64-byte round trips against an echo server, one
//! bulk stream into a sink, and idle pairs against an echo server in a child process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::procs::{Spec, Traffic};

const DEADLINE: Duration = Duration::from_secs(120);

/// Sender write size and sink read size. iperf3's default length is 128 KiB too.
const CHUNK: usize = 128 * 1024;

/// Upstream that discards everything and reports how many bytes each connection sent.
pub fn sink() -> (SocketAddr, mpsc::Receiver<(u64, Instant)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
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

/// One stream of `bytes` to the sink behind `target`; returns bytes per second.
pub fn bulk(
    target: SocketAddr,
    done: &mpsc::Receiver<(u64, Instant)>,
    bytes: usize,
) -> Result<f64, String> {
    let chunk = vec![0x5au8; CHUNK];
    let mut s = TcpStream::connect(target).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).map_err(|e| e.to_string())?;
        sent += chunk.len();
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let (got, at) = done
        .recv_timeout(DEADLINE)
        .map_err(|_| "sink did not finish".to_string())?;
    if got as usize != sent {
        return Err(format!("sink received {got} of {sent} bytes"));
    }
    Ok(sent as f64 / (at - start).as_secs_f64())
}

/// Upstream that echoes every connection.
pub fn echo() -> SocketAddr {
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

/// `conns` connections each doing `rounds / conns` 64-byte round trips; returns round trips per second.
pub fn round_trips(target: SocketAddr, conns: usize, rounds: usize) -> Result<f64, String> {
    let per = rounds / conns;
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            thread::spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(target)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(DEADLINE))?;
                let msg = [7u8; 64];
                let mut buf = [0u8; 64];
                for _ in 0..per {
                    s.write_all(&msg)?;
                    s.read_exact(&mut buf)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| "round-trip thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok((per * conns) as f64 / start.elapsed().as_secs_f64())
}

#[allow(unsafe_code)]
pub fn raise_nofile(want: u64) -> u64 {
    // Each idle pair costs this process one descriptor and the proxy two; children inherit.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
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

pub const ECHO_ROLE: &str = "KAPROXY_BENCH_ECHO_PROCESS";

/// Runs the idle-pair upstream in its own process, so that its descriptors do not
/// count against this process's limit.
pub struct EchoProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl EchoProcess {
    pub fn start() -> Result<EchoProcess, String> {
        let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .env(ECHO_ROLE, "1")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("echo process: {e}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .map_err(|e| format!("echo process: {e}"))?;
        let addr = line
            .trim()
            .parse()
            .map_err(|_| format!("echo process said {line:?}"))?;
        Ok(EchoProcess { child, addr })
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The echo process: tokio, so that 10,000 connections cost no threads.
pub fn echo_process_main() {
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

fn round_trip(s: &mut TcpStream, msg: &[u8; 4]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b)
}

/// Opens `n` pairs through the proxy, each after one round trip, and returns the proxy's RSS
/// growth per pair in bytes and its RSS with all of them open.
pub fn idle_pairs(spec: &Spec, n: usize) -> Result<(f64, u64), String> {
    let echo = EchoProcess::start()?;
    let proxy = spec.start(echo.addr, n, Traffic::Messages)?;
    // Warm up the runtime and allocator with a few pairs before the baseline.
    for _ in 0..50 {
        let mut s = TcpStream::connect(proxy.addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        round_trip(&mut s, b"warm").map_err(|e| format!("warm-up: {e}"))?;
    }
    thread::sleep(Duration::from_millis(300));
    let before = proxy.proc.rss_bytes();
    let deadline = Instant::now() + DEADLINE;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() > deadline {
            return Err(format!("only {i} pairs open after {DEADLINE:?}"));
        }
        let mut s = TcpStream::connect(proxy.addr).map_err(|e| format!("pair {i}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // One round trip each, so every pair has had (and given back) its buffers.
        round_trip(&mut s, b"idle").map_err(|e| format!("pair {i}: {e}"))?;
        conns.push(s);
    }
    thread::sleep(Duration::from_millis(500));
    let after = proxy.proc.rss_bytes();
    Ok((after.saturating_sub(before) as f64 / n as f64, after))
}
