//! A NAT between a client and a server, built from three network namespaces:
//!
//! ```text
//! client ns ── veth ── router ns ── veth ── server ns
//! 192.0.2.2          192.0.2.1 | 198.51.100.1      198.51.100.2
//! ```
//!
//! The router forwards with nftables masquerade and forgets a TCP flow that
//! has been idle for `nf_conntrack_tcp_timeout_established`, as a NAT gateway
//! or a stateful firewall does. With `nf_conntrack_tcp_loose = 0` a packet of
//! a forgotten flow is not picked up again as a new one: it is `ct state
//! invalid`, and dropped. Both sysctls are per network namespace.
//!
//! Addresses are from the documentation ranges (RFC 5737) and exist only in
//! these namespaces. Call only from inside
//! [`super::netns::isolated_with_named_netns`] (root,
//! tools present). The namespaces are deleted on drop, also when the test
//! fails; namespaces left by a test process that was killed are swept by the
//! next one.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

use super::netns::run;

/// The client's address, as the router's client side sees it.
pub const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
/// The server's address; the client reaches it through the router.
pub const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));
/// The router's address towards the server: the source of every masqueraded flow.
pub const ROUTER_OUTSIDE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

const PREFIX: &str = "kaproxy-t-";

/// One named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn add(name: String) -> Netns {
        run(&["ip", "netns", "add", &name]);
        let file = File::open(format!("/run/netns/{name}")).expect("open the namespace");
        let ns = Netns { name, file };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut argv = vec!["ip", "-n", &self.name];
        argv.extend_from_slice(args);
        run(&argv)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens
    /// and processes it starts belong to the namespace (namespaces are per
    /// thread, and a child process inherits its parent thread's).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("setns into the test namespace");
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Writes a sysctl of this namespace (through /proc/sys as seen from
    /// inside it: the net.* entries are per namespace).
    fn sysctl(&self, key: &str, value: &str) {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        run(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "sh",
            "-c",
            &format!("echo {value} > {file}"),
        ]);
    }

    fn read_sysctl(&self, key: &str) -> String {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        run(&["ip", "netns", "exec", &self.name, "cat", &file])
            .trim()
            .to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep it alive until they exit; the name goes now.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Deletes namespaces left behind by test processes that no longer exist.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// The three namespaces and the router's settings.
pub struct NatPath {
    /// Where the client runs.
    pub client: Netns,
    /// The NAT.
    pub router: Netns,
    /// Where the server runs.
    pub server: Netns,
}

impl NatPath {
    /// Builds the topology. `established_timeout`: seconds an idle TCP flow
    /// stays in the router's table; `None` keeps the kernel's default (5 days).
    pub fn new(established_timeout: Option<u32>) -> NatPath {
        sweep_stale();
        let pid = std::process::id();
        let ns = |role: &str| Netns::add(format!("{PREFIX}{pid}-{role}"));
        let path = NatPath {
            client: ns("client"),
            router: ns("router"),
            server: ns("server"),
        };
        let (c, r, s) = (path.client.name(), path.router.name(), path.server.name());
        run(&[
            "ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "rc", "netns", r,
        ]);
        run(&[
            "ip", "link", "add", "s0", "netns", s, "type", "veth", "peer", "name", "rs", "netns", r,
        ]);
        for (ns, dev, addr) in [
            (&path.client, "c0", "192.0.2.2/24"),
            (&path.router, "rc", "192.0.2.1/24"),
            (&path.router, "rs", "198.51.100.1/24"),
            (&path.server, "s0", "198.51.100.2/24"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", dev]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        path.client
            .ip(&["route", "add", "default", "via", "192.0.2.1"]);
        // No route back to the client network: only the NAT makes replies work.
        path.router.sysctl("net.ipv4.ip_forward", "1");
        // The ct rules load conntrack (and its per-namespace sysctls) if it is
        // not loaded yet, so they go in before the sysctls are set. Invalid
        // packets are dropped in input too: otherwise the router's own stack
        // would answer a packet of a forgotten flow to its outside address
        // with a reset, and the server side would learn of the drop at once.
        let ruleset = "table ip kaproxy_nat {\n\
             chain postrouting_chain { type nat hook postrouting priority srcnat; oifname \"rs\" masquerade; }\n\
             chain forward_chain { type filter hook forward priority 0; policy accept; ct state invalid drop; }\n\
             chain input_chain { type filter hook input priority 0; policy accept; ct state invalid drop; }\n\
             }\n";
        let mut nft = Command::new("ip")
            .args(["netns", "exec", r, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        nft.stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft ruleset for the router");
        let conntrack = Command::new("ip")
            .args(["netns", "exec", r, "test", "-e"])
            .arg("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            conntrack,
            "the router namespace has no conntrack sysctls: the kernel lacks nf_conntrack (modprobe nf_conntrack)"
        );
        path.router
            .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0");
        if let Some(secs) = established_timeout {
            path.router.sysctl(
                "net.netfilter.nf_conntrack_tcp_timeout_established",
                &secs.to_string(),
            );
        }
        let loose = path
            .router
            .read_sysctl("net.netfilter.nf_conntrack_tcp_loose");
        assert_eq!(loose, "0", "conntrack sysctls of the router namespace");
        path
    }

    /// The router's established-flow timeout in force, seconds.
    pub fn established_timeout(&self) -> u64 {
        self.router
            .read_sysctl("net.netfilter.nf_conntrack_tcp_timeout_established")
            .parse()
            .expect("a number")
    }
}
