//! Test harness: runs the real `kaproxy` binary on a port-0 config, reads the
//! bound addresses and close events from its JSON log, and kills it on drop.
//! Every wait here has a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod nat;
pub mod netns;
pub mod peers;
pub mod tls;

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kaproxy"))
}

/// Log lines shared between the reader thread and the test.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<Value>>,
    raw: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A running kaproxy.
pub struct Proxy {
    child: Option<Child>,
    log: Arc<Log>,
    routes: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    _dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Proxy {
    /// Starts `kaproxy run` on this config text and waits until every route logged its bound address.
    pub fn start(config: &str) -> Proxy {
        Proxy::start_with_env(config, &[])
    }

    /// As [`Proxy::start`], with extra environment variables for kaproxy.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Proxy {
        Proxy::start_under(config, env, None, &[])
    }

    /// As [`Proxy::start`], with extra arguments after `run`, e.g. `--watch`.
    pub fn start_with_args(config: &str, args: &[&str]) -> Proxy {
        Proxy::start_under(config, &[], None, args)
    }

    /// As [`Proxy::start`], started by `bash -c "{shell}; exec kaproxy ..."`,
    /// e.g. to lower a resource limit first.
    pub fn start_after_shell(config: &str, shell: &str) -> Proxy {
        Proxy::start_under(config, &[], Some(shell), &[])
    }

    fn start_under(
        config: &str,
        env: &[(&str, &str)],
        shell: Option<&str>,
        run_args: &[&str],
    ) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kaproxy.toml");
        let config = with_test_admin(config);
        std::fs::write(&path, &config).expect("write config");
        let expected = config.matches("[[route]]").count();
        let mut cmd = match shell {
            Some(shell) => {
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("{shell} && exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(["--log-format", "json", "run", "-c"])
            .arg(&path)
            .args(run_args);
        cmd.envs(env.iter().copied());
        Proxy::spawn(cmd, expected, dir, path)
    }

    /// Starts `kaproxy run -c path` on an existing file, with extra
    /// arguments after `run`, e.g. `--watch`.
    pub fn start_file(path: &Path, args: &[&str]) -> Proxy {
        let text = std::fs::read_to_string(path).expect("read config");
        let mut cmd = Command::new(bin());
        cmd.args(["--log-format", "json", "run", "-c"])
            .arg(path)
            .args(args);
        let dir = tempfile::tempdir().expect("temp dir");
        Proxy::spawn(
            cmd,
            text.matches("[[route]]").count(),
            dir,
            path.to_path_buf(),
        )
    }

    /// Starts `kaproxy forward` with these arguments (one route, "forward").
    pub fn forward(args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(bin());
        cmd.args(["--log-format", "json", "forward"]).args(args);
        if !args.contains(&"--admin") {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        let path = dir.path().join("none");
        Proxy::spawn(cmd, 1, dir, path)
    }

    fn spawn(
        mut cmd: Command,
        expected_routes: usize,
        dir: tempfile::TempDir,
        path: PathBuf,
    ) -> Proxy {
        cmd.env("KAPROXY_LOG", "info")
            .env_remove("KAPROXY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kaproxy");
        let log = Arc::new(Log::default());
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, is_json) in [
            (Box::new(stdout) as Box<dyn Read + Send>, true),
            (Box::new(stderr), false),
        ] {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("KAPROXY_TEST_ECHO").is_some() {
                        eprintln!("[kaproxy] {line}");
                    }
                    if is_json {
                        if let Ok(v) = serde_json::from_str::<Value>(&line) {
                            log.lines.lock().unwrap().push(v);
                        }
                    }
                    log.raw.lock().unwrap().push(line);
                    log.changed.notify_all();
                }
            });
        }
        let mut proxy = Proxy {
            child: Some(child),
            log,
            routes: Vec::new(),
            admin: None,
            _dir: dir,
            config_path: path,
        };
        let listening = proxy.wait_events(
            |v| message(v) == "route listening",
            expected_routes,
            Duration::from_secs(10),
        );
        for v in listening {
            let name = v["route"].as_str().expect("route field").to_string();
            let addr: SocketAddr = v["address"]
                .as_str()
                .expect("address field")
                .parse()
                .expect("address parses");
            proxy.routes.push((name, addr));
        }
        // The admin endpoint is bound before the routes start, so its line is already there.
        proxy.admin = proxy
            .events()
            .iter()
            .find(|v| message(v) == "admin listening")
            .and_then(|v| v["address"].as_str()?.parse().ok());
        proxy
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The admin endpoint's bound address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
            .unwrap_or_else(|| panic!("admin endpoint not listening; log:\n{}", self.raw_log()))
    }

    /// Bound address of a route.
    pub fn addr(&self, route: &str) -> SocketAddr {
        self.routes
            .iter()
            .find(|(n, _)| n == route)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("route {route} not listening"))
    }

    /// All JSON log events so far.
    pub fn events(&self) -> Vec<Value> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Raw stdout and stderr lines, for failure messages.
    pub fn raw_log(&self) -> String {
        self.log.raw.lock().unwrap().join("\n")
    }

    /// Waits until at least `n` events match, or panics with the log at the deadline.
    pub fn wait_events(
        &self,
        pred: impl Fn(&Value) -> bool,
        n: usize,
        within: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            let found: Vec<Value> = lines.iter().filter(|v| pred(v)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "waited {within:?} for {n} matching log events, found {}; log:\n{}",
                    found.len(),
                    self.raw_log()
                );
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// "pair closed" events so far.
    pub fn closes(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|v| message(v) == "pair closed")
            .collect()
    }

    /// Waits for `n` "pair closed" events and returns them.
    pub fn wait_closes(&self, n: usize, within: Duration) -> Vec<Value> {
        self.wait_events(|v| message(v) == "pair closed", n, within)
    }

    /// Writes `config` over the proxy's file, sends SIGHUP and waits for the
    /// reload's outcome: the "configuration reloaded" or "... rejected" event.
    pub fn reload(&self, config: &str) -> Value {
        std::fs::write(&self.config_path, with_test_admin(config)).expect("write config");
        self.reload_now()
    }

    /// Sends SIGHUP and waits for the reload's outcome event.
    pub fn reload_now(&self) -> Value {
        let is_outcome = |v: &Value| message(v).starts_with("configuration reload");
        let before = self.events().iter().filter(|v| is_outcome(v)).count();
        self.signal("HUP");
        self.wait_events(is_outcome, before + 1, Duration::from_secs(10))
            .pop()
            .expect("an outcome")
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args(["-s", sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -s {sig} failed");
    }

    /// Waits for exit within the deadline.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "kaproxy did not exit within {within:?}; log:\n{}",
                    self.raw_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `message` of a JSON log event.
pub fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or("")
}

/// The close reason of a "pair closed" event.
pub fn reason(v: &Value) -> &str {
    v["reason"].as_str().unwrap_or("")
}

/// A span field of a "pair closed" event (route, client.addr, upstream.addr).
pub fn span_field<'a>(v: &'a Value, name: &str) -> &'a str {
    v["span"][name].as_str().unwrap_or("")
}

/// A listener on 127.0.0.1:0 for an upstream peer.
pub fn upstream_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let a = l.local_addr().unwrap();
    (l, a)
}

/// [`upstream_listener`] with a listen backlog of 4,096 rather than std's 128,
/// for tests that make kaproxy open thousands of upstream connections at once:
/// with a short backlog the kernel drops SYNs, and a connect whose SYN is
/// retried after a second can run out of connect_timeout.
pub fn upstream_listener_for_bursts() -> (TcpListener, SocketAddr) {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind upstream");
    sock.listen(4096).expect("listen");
    let l: TcpListener = sock.into();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Accepts one connection within 10 s (the proxy's connect to an upstream peer),
/// with 20 s deadlines on its reads and writes.
pub fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection from kaproxy within 10 s"
                );
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Echo server: echoes every connection until EOF, then half-closes. Runs until the process ends.
pub fn echo_server() -> SocketAddr {
    echo_on("127.0.0.1:0".parse().unwrap())
}

/// [`echo_server`] on a given address.
pub fn echo_on(addr: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(addr).expect("bind echo server");
    let a = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    a
}

/// A port on 127.0.0.1 with nothing listening, from the reserved range so
/// that no other test of the binary starts listening there meanwhile.
pub fn dead_port() -> SocketAddr {
    reserved_addr()
}

/// Connects with a deadline on every read and write.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Writes `msg`, reads the same number of bytes back, returns them.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// A loopback address that no other test of this binary gets and that the
/// kernel never hands out for port 0 (below the ephemeral range), for a test
/// that must write a listen address before kaproxy binds it. A port taken by
/// port 0 and given back would race with other tests binding port 0.
pub fn reserved_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Each test binary (run one after another) starts elsewhere in 20000..32000.
    let base = 20_000 + (std::process::id() % 60) as u16 * 200;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < 200,
            "more reserved addresses than a test binary may take"
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], base + n));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// `config` with an admin endpoint on a free port unless it has one: parallel
/// tests never clash on 9901.
pub fn with_test_admin(config: &str) -> String {
    if config.contains("[admin]") {
        config.to_string()
    } else {
        format!("{config}\n[admin]\nlisten = \"127.0.0.1:0\"\n")
    }
}

/// A minimal config with one route on 127.0.0.1:0 to these servers, plus extra route-level TOML.
pub fn one_route(name: &str, servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "shutdown_grace = \"2s\"\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{extra}\n[route.upstream]\nservers = [{}]\nconnect_timeout = \"1s\"\n",
        list.join(", ")
    )
}

/// A GET to the admin endpoint: status and body.
pub fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    admin_request(admin, "GET", path)
}

/// Any request to the admin endpoint, `Connection: close`: status and body.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = admin_exchange(admin, method, path);
    (status, body)
}

/// Any request to the admin endpoint, `Connection: close`: status, response head and body.
pub fn admin_exchange(admin: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = connect(admin);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// A metric's value from Prometheus text, by name and exact label set text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Byte `i` of every test stream: a pattern with a period (251) that no buffer
/// size divides, so a lost, repeated or reordered chunk shows.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// Writes `total` bytes of the pattern, in 64 KiB chunks; the first error ends it.
pub fn write_pattern(s: &mut TcpStream, total: u64) -> std::io::Result<()> {
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    while sent < total {
        let n = chunk.len().min((total - sent) as usize);
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern_byte(sent + k as u64);
        }
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    Ok(())
}

/// Reads `n` bytes of the pattern starting at `offset` and checks every one.
pub fn read_pattern(s: &mut TcpStream, offset: u64, n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < n {
        let want = buf.len().min((n - got) as usize);
        let k = s.read(&mut buf[..want])?;
        if k == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("end of stream after {} bytes", offset + got),
            ));
        }
        for (j, b) in buf[..k].iter().enumerate() {
            let at = offset + got + j as u64;
            assert_eq!(*b, pattern_byte(at), "byte {at} of the stream is wrong");
        }
        got += k as u64;
    }
    Ok(())
}

/// Writes until the socket's buffers and the path behind it are full (a write
/// blocks for 300 ms), within 20 s and 1 GiB. Returns the bytes written.
pub fn fill_until_blocked(s: &mut TcpStream) -> u64 {
    s.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    while Instant::now() < deadline && sent < (1 << 30) {
        match s.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                return sent;
            }
            Err(e) => panic!("writing until blocked: {e} after {sent} bytes"),
        }
    }
    panic!("the path never filled: {sent} bytes written");
}

/// Closes with RST (SO_LINGER 0), as a crashing process's kernel would not, but
/// as an aborting peer does.
pub fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// Waits for a pending error on `s` (SO_ERROR) without reading, so a peer that
/// is deliberately not reading can still see that it was reset.
pub fn wait_socket_error(s: &TcpStream, within: Duration) -> std::io::Error {
    let deadline = Instant::now() + within;
    loop {
        if let Some(e) = s.take_error().expect("SO_ERROR") {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no error on the socket within {within:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}
