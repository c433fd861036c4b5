//! The processes a run measures and the servers behind them: kaproxy (and an older kaproxy as
//! a baseline), HAProxy and nginx `stream` as proxies; nginx HTTP and iperf3 as servers.
//! Each gets a free loopback port and, where it needs one, a config generated into its own
//! temp dir; the system's nginx and HAProxy configs and services are never used. Every
//! process is killed on drop together with what it forked (nginx workers).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const START_DEADLINE: Duration = Duration::from_secs(10);

/// Pipe size HAProxy is given: kaproxy asks for 1 MiB pipes (src/net/splice.rs), and
/// HAProxy's default is the system's 64 KiB, which costs it 16 splice calls per MiB.
const PIPE_SIZE: usize = 1 << 20;

/// A child process and its descendants, killed together on drop.
pub struct Proc {
    child: Child,
    dir: Option<tempfile::TempDir>,
    /// Stopped with SIGTERM first, so that a master reaps its own workers (nginx).
    term_first: bool,
}

impl Proc {
    fn new(child: Child, dir: Option<tempfile::TempDir>) -> Proc {
        Proc {
            child,
            dir,
            term_first: false,
        }
    }

    /// utime + stime of the process and every descendant, in seconds (proc(5), /proc/PID/stat
    /// fields 14 and 15; whole thread groups, so HAProxy's threads and nginx's workers count).
    pub fn cpu_seconds(&self) -> f64 {
        let ticks: u64 = tree(self.child.id())
            .iter()
            .filter_map(|&pid| stat_fields(pid))
            .map(|f| f.utime + f.stime)
            .sum();
        ticks as f64 / clock_ticks_per_second()
    }

    /// Resident memory (VmRSS) of the process and every descendant, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        tree(self.child.id())
            .iter()
            .filter_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum::<u64>()
            * 1024
    }

    /// The end of the process's log file in its temp dir, for error messages.
    fn log_tail(&self, name: &str) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Collected before the kill: once the parent is gone, nginx workers are reparented and
        // can no longer be found from it.
        let descendants = tree(self.child.id());
        if self.term_first {
            signal(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while !self.exited() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in descendants.into_iter().skip(1) {
            signal(pid, libc::SIGKILL);
        }
    }
}

#[allow(unsafe_code)]
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; the pid is our child or was its descendant
    // moments ago.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

#[allow(unsafe_code)]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn stat_fields(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
    })
}

/// `root` and its descendants, root first.
fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = stat_fields(pid) {
                children.entry(s.ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// A loopback port nobody listens on right now. Another process may take it before the
/// server binds it; the server then fails to start and says so.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Whether something listens on this TCP port, read from /proc/net/tcp{,6}: waiting this way
/// sends no probe connection to a server that would take it for a client (iperf3 does).
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // st 0A is TCP_LISTEN.
                f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
            })
    })
}

fn wait_listening(proc: &mut Proc, port: u16, log: &str, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    while !listening(port) {
        if proc.exited() {
            return Err(format!("{what} exited at start: {}", proc.log_tail(log)));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} not listening after {START_DEADLINE:?}: {}",
                proc.log_tail(log)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// An executable on PATH or in the sbin directories (not always on a non-root PATH).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// A process under test or a server, and the address to connect to.
pub struct Running {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub proc: Proc,
}

/// What a part sends, for the one proxy whose best settings depend on it.
#[derive(Clone, Copy)]
pub enum Traffic {
    /// Long streams: HAProxy splices, as kaproxy does.
    Bulk,
    /// Requests, responses, round trips: HAProxy copies through its buffers.
    Messages,
}

/// How to start one of the proxies compared.
pub enum Spec {
    Kaproxy {
        name: &'static str,
        bin: PathBuf,
        admin_flag: bool,
    },
    Haproxy(PathBuf),
    NginxStream(Nginx),
}

impl Spec {
    pub fn name(&self) -> &'static str {
        match self {
            Spec::Kaproxy { name, .. } => name,
            Spec::Haproxy(_) => "haproxy",
            Spec::NginxStream(_) => "nginx-stream",
        }
    }

    /// The proxy in front of `upstream`, sized for `max_pairs` pairs open at once.
    pub fn start(
        &self,
        upstream: SocketAddr,
        max_pairs: usize,
        traffic: Traffic,
    ) -> Result<Running, String> {
        match self {
            Spec::Kaproxy {
                name,
                bin,
                admin_flag,
            } => start_kaproxy(name, bin, *admin_flag, upstream, &[]),
            Spec::Haproxy(bin) => start_haproxy(bin, upstream, max_pairs, traffic),
            Spec::NginxStream(nginx) => nginx.start_stream(upstream, max_pairs),
        }
    }

    /// The proxy terminating TLS in front of the plain `upstream`, with the same
    /// certificate: `cert` and `key` files, and `combined` (both in one file, HAProxy's `crt`).
    pub fn start_tls(
        &self,
        upstream: SocketAddr,
        max_pairs: usize,
        files: &TlsFiles,
    ) -> Result<Running, String> {
        match self {
            Spec::Kaproxy {
                name: "kaproxy",
                bin,
                admin_flag,
            } => {
                let (cert, key) = (files.cert.display(), files.key.display());
                let (cert, key) = (cert.to_string(), key.to_string());
                let args = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
                start_kaproxy("kaproxy", bin, *admin_flag, upstream, &args)
            }
            Spec::Haproxy(bin) => start_haproxy_tls(bin, upstream, max_pairs, &files.combined),
            _ => Err(format!("{}: no TLS case", self.name())),
        }
    }
}

/// The certificate every TLS case uses, as each proxy wants it.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub combined: PathBuf,
}

/// HAProxy terminating TLS (`bind ... ssl crt`) and relaying plain TCP, copying through its
/// buffers (no splice: the bytes pass through OpenSSL anyway).
fn start_haproxy_tls(
    bin: &Path,
    upstream: SocketAddr,
    max_pairs: usize,
    combined: &Path,
) -> Result<Running, String> {
    let port = free_port()?;
    let dir = tempfile::tempdir().map_err(|e| format!("haproxy: temp dir: {e}"))?;
    let cfg = dir.path().join("haproxy.cfg");
    let maxconn = max_pairs.max(4000) + 100;
    let text = format!(
        "global
  maxconn {maxconn}
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend f
  bind 127.0.0.1:{port} ssl crt {}
  default_backend b
backend b
  server s1 {upstream}
",
        combined.display()
    );
    std::fs::write(&cfg, text).map_err(|e| format!("haproxy: {e}"))?;
    let log = std::fs::File::create(dir.path().join("haproxy.log"))
        .map_err(|e| format!("haproxy: {e}"))?;
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("haproxy: cannot run {}: {e}", bin.display()))?;
    let mut proc = Proc::new(child, Some(dir));
    wait_listening(&mut proc, port, "haproxy.log", "haproxy")?;
    Ok(Running {
        name: "haproxy",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        proc,
    })
}

/// The proxies this machine can run, and a sentence for each one it cannot.
pub fn specs(baseline: Option<PathBuf>) -> (Vec<Spec>, Vec<String>) {
    let mut specs = vec![Spec::Kaproxy {
        name: "kaproxy",
        bin: PathBuf::from(env!("CARGO_BIN_EXE_kaproxy")),
        admin_flag: true,
    }];
    let mut skipped = Vec::new();
    if let Some(bin) = baseline {
        if bin.is_file() {
            let admin_flag = supports_admin_flag(&bin);
            specs.push(Spec::Kaproxy {
                name: "baseline",
                bin,
                admin_flag,
            });
        } else {
            skipped.push(format!(
                "baseline: KAPROXY_BENCH_BASELINE={} is not a file",
                bin.display()
            ));
        }
    }
    match which("haproxy") {
        Some(bin) => specs.push(Spec::Haproxy(bin)),
        None => skipped.push("haproxy: not installed (apt-get install haproxy)".into()),
    }
    match Nginx::find() {
        Ok(nginx) if nginx.stream.is_some() => specs.push(Spec::NginxStream(nginx)),
        Ok(_) => skipped.push(
            "nginx-stream: nginx has no stream module (apt-get install libnginx-mod-stream)".into(),
        ),
        Err(e) => skipped.push(format!("nginx-stream: {e}")),
    }
    (specs, skipped)
}

/// Releases before the admin endpoint had no `--admin`; they also had no admin port to clash.
fn supports_admin_flag(bin: &Path) -> bool {
    crate::tools::run_bounded(
        Command::new(bin).args(["forward", "--help"]),
        Duration::from_secs(10),
    )
    .map(|(out, _)| out.contains("--admin"))
    .unwrap_or(false)
}

fn start_kaproxy(
    name: &'static str,
    bin: &Path,
    admin_flag: bool,
    upstream: SocketAddr,
    extra: &[&str],
) -> Result<Running, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["--log-format", "json", "forward"]);
    // The default admin port 9901 is fixed: two kaproxies (or another engineer's) would clash.
    if admin_flag {
        cmd.args(["--admin", "off"]);
    }
    let mut child = cmd
        .arg("127.0.0.1:0")
        .arg(upstream.to_string())
        .args(extra)
        // No event per pair: HAProxy and nginx log nothing per connection here either.
        .env("KAPROXY_LOG", "warn,kaproxy::app=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{name}: cannot run {}: {e}", bin.display()))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    // Keeps reading after the address so that a chatty log never fills the pipe.
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !line.contains("route listening") {
                continue;
            }
            let addr = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["address"].as_str().and_then(|a| a.parse().ok()));
            if let Some(addr) = addr {
                let _ = tx.send(addr);
            }
        }
    });
    let proc = Proc::new(child, None);
    let addr = rx.recv_timeout(START_DEADLINE).map_err(|_| {
        format!("{name}: no \"route listening\" log line within {START_DEADLINE:?}")
    })?;
    Ok(Running { name, addr, proc })
}

/// HAProxy on its best settings for `traffic`, measured on this machine; the bench must not
/// compare kaproxy with a handicapped HAProxy.
///
/// Bulk: `option splice-request` and `option splice-response`, as kaproxy splices. With
/// `option splice-auto` (this bench's setting until issue 9), HAProxy 2.6 made no splice(2)
/// call at all on a single iperf3 stream and copied every byte through its 16 KiB buffers
/// (perf stat, syscalls:sys_enter_splice), which put it at 0.6-0.8 of its spliced rate.
/// Pipes of 1 MiB as kaproxy's (src/net/splice.rs); the default 64 KiB costs 16 splice
/// calls per MiB.
///
/// Messages: no splice. Splicing every response (splice-request/response) cost HAProxy about
/// a quarter more CPU per keep-alive request; splice-auto measured the same as no splice.
///
/// nbthread is left at HAProxy's default, one thread per core, as tokio's worker count.
pub fn haproxy_config(port: u16, upstream: SocketAddr, maxconn: usize, traffic: Traffic) -> String {
    let splice = match traffic {
        Traffic::Bulk => "  option splice-request\n  option splice-response\n",
        Traffic::Messages => "",
    };
    format!(
        "global
  maxconn {maxconn}
  # Pipes are pooled up to maxpipes; the default (maxconn / 4) would cost 2 descriptors each.
  maxpipes 64
  tune.pipesize {PIPE_SIZE}
defaults
  mode tcp
{splice}  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server s1 {upstream}
"
    )
}

fn start_haproxy(
    bin: &Path,
    upstream: SocketAddr,
    max_pairs: usize,
    traffic: Traffic,
) -> Result<Running, String> {
    let port = free_port()?;
    let dir = tempfile::tempdir().map_err(|e| format!("haproxy: temp dir: {e}"))?;
    let cfg = dir.path().join("haproxy.cfg");
    let maxconn = max_pairs.max(4000) + 100;
    std::fs::write(&cfg, haproxy_config(port, upstream, maxconn, traffic))
        .map_err(|e| format!("haproxy: {e}"))?;
    let log = std::fs::File::create(dir.path().join("haproxy.log"))
        .map_err(|e| format!("haproxy: {e}"))?;
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("haproxy: cannot run {}: {e}", bin.display()))?;
    let mut proc = Proc::new(child, Some(dir));
    wait_listening(&mut proc, port, "haproxy.log", "haproxy")?;
    Ok(Running {
        name: "haproxy",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        proc,
    })
}

/// The nginx binary, and the `load_module` line its stream module needs (empty when built in).
pub struct Nginx {
    bin: PathBuf,
    stream: Option<String>,
}

impl Nginx {
    pub fn find() -> Result<Nginx, String> {
        let bin = which("nginx").ok_or("not installed (apt-get install nginx)")?;
        let (_, configure) =
            crate::tools::run_bounded(Command::new(&bin).arg("-V"), Duration::from_secs(10))?;
        let stream = if configure.contains("--with-stream=dynamic") {
            ["/usr/lib/nginx/modules", "/usr/share/nginx/modules"]
                .iter()
                .map(|d| Path::new(d).join("ngx_stream_module.so"))
                .find(|p| p.is_file())
                .map(|p| format!("load_module {};\n", p.display()))
        } else if configure.contains("--with-stream") {
            Some(String::new())
        } else {
            None
        };
        Ok(Nginx { bin, stream })
    }

    /// nginx with `body` in the main context, in its own prefix dir, stopped on drop.
    fn start(
        &self,
        name: &'static str,
        body: &str,
        max_conns: usize,
        files: &[(&str, &[u8])],
    ) -> Result<Running, String> {
        let port = free_port()?;
        let dir = tempfile::tempdir().map_err(|e| format!("{name}: temp dir: {e}"))?;
        let d = dir.path().display().to_string();
        for (file, content) in files {
            std::fs::write(dir.path().join(file), content).map_err(|e| format!("{name}: {e}"))?;
        }
        // As root, workers would switch to nobody, who cannot read the 0700 temp dir.
        let user = if is_root() { "user root;\n" } else { "" };
        let conf = format!(
            "{load}{user}daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {conns}; }}
{body}",
            load = self.stream.as_deref().unwrap_or(""),
            nofile = 2 * max_conns + 256,
            conns = 2 * max_conns + 256,
            body = body
                .replace("{port}", &port.to_string())
                .replace("{dir}", &d),
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).map_err(|e| format!("{name}: {e}"))?;
        let child = Command::new(&self.bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            // -e: the compiled-in /var/log/nginx/error.log is opened before the config is read.
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{name}: cannot run {}: {e}", self.bin.display()))?;
        let mut proc = Proc::new(child, Some(dir));
        proc.term_first = true;
        wait_listening(&mut proc, port, "error.log", name)?;
        Ok(Running {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            proc,
        })
    }

    fn start_stream(&self, upstream: SocketAddr, max_pairs: usize) -> Result<Running, String> {
        // backlog as kaproxy's (4096) and HAProxy's (maxconn); nginx's own default is 511.
        let body = format!(
            "stream {{ server {{ listen 127.0.0.1:{{port}} backlog=4096; proxy_pass {upstream}; }} }}\n"
        );
        self.start("nginx-stream", &body, max_pairs, &[])
    }

    /// nginx serving `/small` (a small static file) over HTTP/1.1 keep-alive, never logging.
    pub fn start_http(&self, small: &[u8]) -> Result<Running, String> {
        let body = "http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 1h;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server { listen 127.0.0.1:{port} backlog=4096; root {dir}; }
}
";
        self.start("nginx", body, 1024, &[("small", small)])
    }
}

/// iperf3's server, one test at a time, on loopback only.
pub fn start_iperf3_server(bin: &Path) -> Result<Running, String> {
    let port = free_port()?;
    let dir = tempfile::tempdir().map_err(|e| format!("iperf3: temp dir: {e}"))?;
    let log =
        std::fs::File::create(dir.path().join("iperf3.log")).map_err(|e| format!("iperf3: {e}"))?;
    let child = Command::new(bin)
        .args(["-s", "-B", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .stdout(log.try_clone().map_err(|e| format!("iperf3: {e}"))?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("iperf3: cannot run {}: {e}", bin.display()))?;
    let mut proc = Proc::new(child, Some(dir));
    wait_listening(&mut proc, port, "iperf3.log", "iperf3 server")?;
    Ok(Running {
        name: "iperf3",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        proc,
    })
}
