//! PROXY protocol, received and sent, against raw sockets and real peers
//! (HAProxy `send-proxy`/`accept-proxy`, nginx `proxy_protocol`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::peers::{free_port, haproxy, have, nginx_stream};
use common::*;

/// nginx's stream module, a package of its own on Debian.
const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 PROXY header for IPv4, written out by hand (not by kaproxy's encoder),
/// with optional TLV bytes after the addresses.
fn v2_ipv4(src: ([u8; 4], u16), dst: ([u8; 4], u16), tlvs: &[u8]) -> Vec<u8> {
    let mut h = SIG.to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src.0);
    h.extend_from_slice(&dst.0);
    h.extend_from_slice(&src.1.to_be_bytes());
    h.extend_from_slice(&dst.1.to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

/// An AWS NLB TLV (PP2_TYPE_AWS, subtype VPC endpoint id).
fn aws_tlv() -> Vec<u8> {
    let value = b"\x01vpce-08d2bf15fac5001c9";
    let mut t = vec![0xea];
    t.extend_from_slice(&(value.len() as u16).to_be_bytes());
    t.extend_from_slice(value);
    t
}

/// A route that expects a PROXY header from its clients.
fn accepting(upstream: SocketAddr, timeout: &str, upstream_extra: &str) -> String {
    format!(
        "{}{upstream_extra}",
        one_route(
            "pp",
            &[upstream],
            &format!(
                "[route.client]\nproxy_protocol = true\nproxy_protocol_timeout = \"{timeout}\"\n"
            )
        )
    )
}

fn no_connection(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).unwrap();
    matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

fn local(s: &TcpStream) -> String {
    s.local_addr().unwrap().to_string()
}

#[test]
fn accepted_headers_name_the_client_and_not_a_byte_of_them_is_relayed() {
    let (up, up_addr) = upstream_listener();
    let proxy = Proxy::start(&accepting(up_addr, "2s", ""));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n".to_vec(),
            "192.0.2.7:40000",
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 443\r\n".to_vec(),
            "[2001:db8::7]:40001",
        ),
        (
            v2_ipv4(([203, 0, 113, 9], 50000), ([10, 0, 0, 1], 80), &aws_tlv()),
            "203.0.113.9:50000",
        ),
    ];
    for (i, (header, original)) in cases.iter().enumerate() {
        let mut c = connect(proxy.addr("pp"));
        // Header and data in one segment: the data must reach the upstream whole.
        let mut first = header.clone();
        first.extend_from_slice(b"payload");
        c.write_all(&first).unwrap();
        let mut u = accept(&up);
        let mut got = [0u8; 7];
        u.read_exact(&mut got).unwrap();
        assert_eq!(
            &got, b"payload",
            "case {i}: the upstream got exactly the data"
        );
        u.write_all(b"reply").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"reply");

        // /connections shows the original client, and the balancer as via.
        let (status, body) = admin_get(proxy.admin(), "/connections");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let pair = &v["pairs"][0]["client"];
        assert_eq!(pair["address"], *original, "{body}");
        assert_eq!(pair["via"], local(&c), "{body}");

        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        u.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "case {i}: nothing after the data: {rest:?}"
        );
        drop(u);
        let closes = proxy.wait_closes(i + 1, Duration::from_secs(10));
        let ev = &closes[i];
        assert_eq!(reason(ev), "completed", "{ev}");
        assert_eq!(span_field(ev, "client.addr"), *original, "{ev}");
        assert_eq!(span_field(ev, "via"), local(&c), "{ev}");
        assert_eq!(ev["bytes.client_to_upstream"], 7, "{ev}");
    }
}

#[test]
fn v2_local_and_v1_unknown_use_the_direct_peer() {
    let up = echo_server();
    let proxy = Proxy::start(&accepting(up, "2s", ""));
    let local_cmd = {
        let mut h = SIG.to_vec();
        // LOCAL with an address block and a TLV, which must be ignored.
        h.extend_from_slice(&[0x20, 0x11, 0, 12 + 3]);
        h.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2, 0x04, 0, 0]);
        h
    };
    for (i, header) in [local_cmd, b"PROXY UNKNOWN\r\n".to_vec()]
        .iter()
        .enumerate()
    {
        let mut c = connect(proxy.addr("pp"));
        c.write_all(header).unwrap();
        assert_eq!(round_trip(&mut c, b"health").unwrap(), b"health");
        drop(c);
        let closes = proxy.wait_closes(i + 1, Duration::from_secs(10));
        let ev = &closes[i];
        assert!(
            span_field(ev, "client.addr").starts_with("127.0.0.1:"),
            "{ev}"
        );
        assert_eq!(
            span_field(ev, "via"),
            "",
            "no via for the direct peer: {ev}"
        );
    }
}

/// Clock ticks of CPU time the process has used (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_header_arriving_in_pieces_is_waited_for_without_spinning() {
    let up = echo_server();
    let proxy = Proxy::start(&accepting(up, "10s", ""));
    let header = b"PROXY TCP4 192.0.2.8 198.51.100.1 41000 443\r\n";
    let mut c = connect(proxy.addr("pp"));
    c.set_nodelay(true).unwrap();
    c.write_all(&header[..10]).unwrap();
    // Same bytes peeked again and again would be a busy loop: a second of
    // waiting must cost next to no CPU (100 ticks = one second of a core).
    thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(proxy.pid());
    thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(proxy.pid()) - before;
    assert!(
        used < 20,
        "{used} ticks of CPU while waiting for the header"
    );
    for b in &header[10..] {
        c.write_all(&[*b]).unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(round_trip(&mut c, b"after").unwrap(), b"after");
    drop(c);
    let ev = &proxy.wait_closes(1, Duration::from_secs(10))[0];
    assert_eq!(span_field(ev, "client.addr"), "192.0.2.8:41000", "{ev}");
}

#[test]
fn bad_headers_of_every_kind_close_with_client_protocol_error() {
    let (up, up_addr) = upstream_listener();
    let timeout = Duration::from_millis(1500);
    let proxy = Proxy::start(&accepting(up_addr, "1500ms", ""));
    let mut oversized_v1 = b"PROXY UNKNOWN ".to_vec();
    oversized_v1.resize(120, b'A');
    let mut oversized_v2 = SIG.to_vec();
    oversized_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let mut bad_version = SIG.to_vec();
    bad_version.extend_from_slice(&[0x31, 0x11, 0, 12]);
    let mut tlv_overrun = v2_ipv4(([1, 2, 3, 4], 1), ([5, 6, 7, 8], 2), &[0xea, 0, 9, 1]);
    tlv_overrun.extend_from_slice(b"data after it");
    // (what, bytes, half-close after writing, expected to wait for the timeout, error part)
    let cases: Vec<(&str, Vec<u8>, bool, bool, &str)> = vec![
        (
            "missing (HTTP)",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
            false,
            "no PROXY protocol header",
        ),
        (
            "missing (TLS)",
            b"\x16\x03\x01\x02\x00\x01".to_vec(),
            false,
            false,
            "no PROXY protocol header",
        ),
        (
            "malformed v1",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
            false,
            false,
            "malformed PROXY v1",
        ),
        (
            "bad v1 byte",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
            false,
            false,
            "malformed PROXY v1",
        ),
        ("oversized v1", oversized_v1, false, false, "too long"),
        ("oversized v2", oversized_v2, false, false, "too long"),
        (
            "v2 version 3",
            bad_version,
            false,
            false,
            "malformed PROXY v2",
        ),
        (
            "v2 TLV overrun",
            tlv_overrun,
            false,
            false,
            "announces 9 bytes",
        ),
        (
            "closed mid-header",
            b"PROXY TCP4 1.2".to_vec(),
            true,
            false,
            "closed the connection after 14 bytes",
        ),
        (
            "late",
            b"PROXY TCP4 1.2".to_vec(),
            false,
            true,
            "no whole PROXY header within 1s 500ms",
        ),
        ("silent", Vec::new(), false, true, "(0 bytes received)"),
    ];
    let mut clients = Vec::new();
    for (what, bytes, half_close, late, _) in &cases {
        let addr = proxy.addr("pp");
        let (what, bytes, half_close, late) = (*what, bytes.clone(), *half_close, *late);
        clients.push(thread::spawn(move || {
            let mut c = connect(addr);
            let started = Instant::now();
            if !bytes.is_empty() {
                c.write_all(&bytes).unwrap();
            }
            if half_close {
                c.shutdown(Shutdown::Write).unwrap();
            }
            // kaproxy closes: end of stream or a reset, nothing else.
            let mut buf = [0u8; 64];
            match c.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!("{what}: {other:?}"),
            }
            let took = started.elapsed();
            if late {
                assert!(
                    took >= timeout - Duration::from_millis(100),
                    "{what}: closed after {took:?}"
                );
            } else {
                assert!(
                    took < Duration::from_millis(1000),
                    "{what}: fails fast, not after {took:?}"
                );
            }
        }));
    }
    for c in clients {
        c.join().unwrap();
    }
    let closes = proxy.wait_closes(cases.len(), Duration::from_secs(10));
    for (what, _, _, _, error) in &cases {
        assert!(
            closes.iter().any(|ev| reason(ev) == "client_protocol_error"
                && ev["error"].as_str().unwrap_or("").contains(error)),
            "{what}: no client_protocol_error close with {error:?} in {closes:#?}"
        );
    }
    assert!(
        closes
            .iter()
            .all(|ev| reason(ev) == "client_protocol_error"),
        "{closes:#?}"
    );
    assert!(
        no_connection(&up),
        "no upstream connection for a bad header"
    );
    let (_, metrics) = admin_get(proxy.admin(), "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "kaproxy_pairs_closed_total{route=\"pp\",reason=\"client_protocol_error\"}"
        ),
        Some(cases.len() as f64),
        "{metrics}"
    );

    // The process is healthy and serves the next good client.
    assert_eq!(admin_get(proxy.admin(), "/healthz").0, 200);
    up.set_nonblocking(false).unwrap();
    let mut c = connect(proxy.addr("pp"));
    c.write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\nok")
        .unwrap();
    let mut u = accept(&up);
    let mut got = [0u8; 2];
    u.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ok");
}

/// Reads from `u` until `n` bytes or end of stream.
fn read_n(u: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    u.read_exact(&mut got).unwrap();
    got
}

#[test]
fn send_proxy_puts_the_header_first_with_the_client_and_local_address() {
    for version in ["v1", "v2"] {
        let (up, up_addr) = upstream_listener();
        let cfg = format!(
            "{}send_proxy = \"{version}\"\n",
            one_route("send", &[up_addr], "")
        );
        let proxy = Proxy::start(&cfg);
        let pa = proxy.addr("send");
        // A silent client: the header still goes at once (server-first protocols).
        let c = connect(pa);
        let cport = c.local_addr().unwrap().port();
        let mut u = accept(&up);
        let expected = match version {
            "v1" => {
                format!("PROXY TCP4 127.0.0.1 127.0.0.1 {cport} {}\r\n", pa.port()).into_bytes()
            }
            _ => v2_ipv4(([127, 0, 0, 1], cport), ([127, 0, 0, 1], pa.port()), &[]),
        };
        assert_eq!(read_n(&mut u, expected.len()), expected, "{version}");
        let mut c = c;
        c.write_all(b"then data").unwrap();
        assert_eq!(read_n(&mut u, 9), b"then data");
    }
}

#[test]
fn a_received_header_is_sent_on_with_its_client_and_destination() {
    let (up, up_addr) = upstream_listener();
    let cfg = accepting(up_addr, "2s", "send_proxy = \"v1\"\n");
    let proxy = Proxy::start(&cfg);
    let mut c = connect(proxy.addr("pp"));
    c.write_all(&v2_ipv4(
        ([198, 51, 100, 4], 6000),
        ([203, 0, 113, 1], 443),
        &aws_tlv(),
    ))
    .unwrap();
    c.write_all(b"x").unwrap();
    let mut u = accept(&up);
    let line = b"PROXY TCP4 198.51.100.4 203.0.113.1 6000 443\r\nx";
    assert_eq!(read_n(&mut u, line.len()), line);
}

/// HAProxy's own HTTP answer carrying the client address it saw.
const HAPROXY_ECHO_SRC: &str =
    "  mode http\n  http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port]\\n\"\n";

/// Sends an HTTP/1.0 request through `addr` and returns the response body.
fn http_body(addr: SocketAddr) -> (String, u16) {
    let mut c = connect(addr);
    let port = c.local_addr().unwrap().port();
    c.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    (body, port)
}

/// Reads one line through `addr` (nginx `return`) and the client's port.
fn line_through(addr: SocketAddr) -> (String, u16) {
    let mut c = connect(addr);
    let port = c.local_addr().unwrap().port();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    (s.trim().to_string(), port)
}

#[test]
fn haproxy_send_proxy_in_front_of_kaproxy() {
    if !have("haproxy", "/usr/sbin/haproxy") {
        return;
    }
    let up = echo_server();
    let proxy = Proxy::start(&accepting(up, "2s", ""));
    for (i, option) in ["send-proxy", "send-proxy-v2"].iter().enumerate() {
        let front = free_port();
        let _hap = haproxy(
            &format!(
                "frontend fe\n  bind {front}\n  default_backend be\nbackend be\n  server k {} {option}\n",
                proxy.addr("pp")
            ),
            &[front],
        );
        let mut c = connect(front);
        assert_eq!(
            round_trip(&mut c, b"through haproxy").unwrap(),
            b"through haproxy"
        );
        let client = local(&c);
        drop(c);
        let ev = &proxy.wait_closes(i + 1, Duration::from_secs(10))[i];
        assert_eq!(span_field(ev, "client.addr"), client, "{option}: {ev}");
        let via = span_field(ev, "via");
        assert!(
            via.starts_with("127.0.0.1:") && via != client,
            "{option}: via is HAProxy: {ev}"
        );
    }
}

#[test]
fn kaproxy_send_proxy_to_haproxy_accept_proxy_and_nginx_proxy_protocol() {
    if !have("haproxy", "/usr/sbin/haproxy")
        || !have("nginx", "/usr/sbin/nginx")
        || !have("libnginx-mod-stream", NGINX_STREAM)
    {
        return;
    }
    let hap_addr = free_port();
    let _hap = haproxy(
        &format!("frontend fe\n  bind {hap_addr} accept-proxy\n{HAPROXY_ECHO_SRC}"),
        &[hap_addr],
    );
    let ngx_addr = free_port();
    let _ngx = nginx_stream(
        &format!("server {{ listen {ngx_addr} proxy_protocol; return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }}"),
        &[ngx_addr],
    );
    for version in ["v1", "v2"] {
        let to_hap = Proxy::start(&format!(
            "{}send_proxy = \"{version}\"\n",
            one_route("h", &[hap_addr], "")
        ));
        let (body, port) = http_body(to_hap.addr("h"));
        assert_eq!(
            body,
            format!("127.0.0.1:{port}"),
            "HAProxy accept-proxy, {version}"
        );
        let to_ngx = Proxy::start(&format!(
            "{}send_proxy = \"{version}\"\n",
            one_route("n", &[ngx_addr], "")
        ));
        let (line, port) = line_through(to_ngx.addr("n"));
        assert_eq!(
            line,
            format!("127.0.0.1:{port}"),
            "nginx proxy_protocol, {version}"
        );
    }
}

#[test]
fn two_kaproxy_hops_between_haproxy_and_nginx_keep_the_client() {
    if !have("haproxy", "/usr/sbin/haproxy")
        || !have("nginx", "/usr/sbin/nginx")
        || !have("libnginx-mod-stream", NGINX_STREAM)
    {
        return;
    }
    let ngx_addr = free_port();
    let _ngx = nginx_stream(
        &format!("server {{ listen {ngx_addr} proxy_protocol; return \"$proxy_protocol_addr:$proxy_protocol_port $remote_addr\\n\"; }}"),
        &[ngx_addr],
    );
    // client -> HAProxy (send-proxy-v2) -> kaproxy B (accept, send v1) -> kaproxy A (accept, send v2) -> nginx
    let a = Proxy::start(&accepting(ngx_addr, "2s", "send_proxy = \"v2\"\n"));
    let b = Proxy::start(&accepting(a.addr("pp"), "2s", "send_proxy = \"v1\"\n"));
    let front = free_port();
    let _hap = haproxy(
        &format!("frontend fe\n  bind {front}\n  default_backend be\nbackend be\n  server b {} send-proxy-v2\n", b.addr("pp")),
        &[front],
    );
    let (line, port) = line_through(front);
    assert!(
        line.starts_with(&format!("127.0.0.1:{port} ")),
        "nginx saw the original client: {line}"
    );
    for hop in [&b, &a] {
        let ev = &hop.wait_closes(1, Duration::from_secs(10))[0];
        assert_eq!(
            span_field(ev, "client.addr"),
            format!("127.0.0.1:{port}"),
            "{ev}"
        );
        assert_ne!(span_field(ev, "via"), "", "{ev}");
    }
}

#[test]
fn health_checks_send_a_header_without_a_client_to_a_proxy_protocol_server() {
    if !have("haproxy", "/usr/sbin/haproxy") {
        return;
    }
    // HAProxy with accept-proxy refuses a connection without a header, so an
    // HTTP check passes only if kaproxy sends LOCAL (v2) or UNKNOWN (v1) first.
    let hap_addr = free_port();
    let _hap = haproxy(
        &format!("frontend fe\n  bind {hap_addr} accept-proxy\n{HAPROXY_ECHO_SRC}"),
        &[hap_addr],
    );
    for send in ["v1", "v2", "off"] {
        let cfg = format!(
            "{}send_proxy = \"{send}\"\nhealth_check = {{ http = \"/\", interval = \"200ms\", timeout = \"1s\", rise = 1, fall = 1 }}\n",
            one_route("hc", &[hap_addr], "")
        );
        let proxy = Proxy::start(&cfg);
        let want = if send == "off" { "down" } else { "up" };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = admin_get(proxy.admin(), "/upstreams");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["routes"][0]["servers"][0]["state"] == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "send_proxy {send}: server not {want}: {body}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn forward_takes_the_same_settings_as_flags() {
    let (up, up_addr) = upstream_listener();
    let proxy = Proxy::forward(&[
        "127.0.0.1:0",
        &up_addr.to_string(),
        "--proxy-protocol",
        "--proxy-protocol-timeout",
        "1s",
        "--send-proxy",
        "v1",
        "--max-connections",
        "5",
    ]);
    let mut c = connect(proxy.addr("forward"));
    c.write_all(b"PROXY TCP4 192.0.2.3 192.0.2.4 7000 80\r\nhi")
        .unwrap();
    let mut u = accept(&up);
    let line = b"PROXY TCP4 192.0.2.3 192.0.2.4 7000 80\r\nhi";
    assert_eq!(read_n(&mut u, line.len()), line);
    let (_, body) = admin_get(proxy.admin(), "/upstreams");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["routes"][0]["max_connections"], 5, "{body}");
}
