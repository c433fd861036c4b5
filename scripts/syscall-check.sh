#!/usr/bin/env bash
# Does the unit's SystemCallFilter=@system-service (and RestrictAddressFamilies)
# allow every system call kaproxy makes? Runs kaproxy under strace through the
# paths that matter: a host-name upstream with an HTTP health check and
# send_proxy v2, a PROXY protocol route, 4 MiB each way (splice), the admin
# endpoint with a live pair (TCP_INFO), and SIGTERM; then compares the calls seen
# with systemd's own expansion of the set (`systemd-analyze syscall-filter`).
# Needs strace, python3, systemd (systemd-analyze). By hand:
#   scripts/syscall-check.sh [path/to/kaproxy]   (default target/debug/kaproxy)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(realpath "${1:-target/debug/kaproxy}")"
WORK="$(mktemp -d /tmp/kaproxy-syscalls.XXXXXX)"
UP=""
cleanup() { [ -n "$UP" ] && kill "$UP" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
for tool in strace python3 systemd-analyze; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done
cd "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port); R1=$(free_port); R2=$(free_port); ADMIN=$(free_port)

python3 - "$UP_PORT" <<'PY' &
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(64); l.settimeout(120)
def echo(c):
    try:
        while (d := c.recv(65536)):
            c.sendall(d)
    except OSError:
        pass
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
PY
UP=$!
cat >k.toml <<TOML
shutdown_grace = "2s"
[admin]
listen = "127.0.0.1:$ADMIN"
[defaults]
max_connections = 100
[[route]]
name = "hostname"
listen = "127.0.0.1:$R1"
[route.upstream]
servers = ["localhost:$UP_PORT"]
health_check = { http = "/", interval = "1s", timeout = "1s", rise = 1, fall = 1 }
send_proxy = "v2"
[[route]]
name = "proxied"
listen = "127.0.0.1:$R2"
[route.client]
proxy_protocol = true
[route.upstream]
servers = ["127.0.0.1:$UP_PORT"]
TOML

strace -f -qq -o trace "$BIN" run -c k.toml >kaproxy.log 2>&1 &
TRACER=$!
for _ in $(seq 100); do grep -q 'route listening.*proxied' kaproxy.log && break; sleep 0.1; done
python3 - "$R1" "$R2" "$ADMIN" <<'PY'
import os, socket, sys, threading
r1, r2, admin = map(int, sys.argv[1:])
for port, header in ((r1, b""), (r2, b"PROXY TCP4 192.0.2.1 192.0.2.2 1111 2222\r\n")):
    data = os.urandom(4 << 20)
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(header)
    threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)), daemon=True).start()
    while s.recv(1 << 20):
        pass
def get(path):
    a = socket.create_connection(("127.0.0.1", admin), timeout=10)
    a.sendall(f"GET {path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while (c := a.recv(65536)):
        out += c
    return out
live = socket.create_connection(("127.0.0.1", r1), timeout=10)
live.sendall(b"x"); live.recv(64)
assert b'"rtt_us"' in get("/connections"), "no TCP_INFO in /connections"
for path in ("/metrics", "/upstreams", "/healthz", "/readyz"):
    get(path)
live.close()
PY
sleep 1
kill -TERM "$(cat /proc/$TRACER/task/$TRACER/children | awk '{print $1}')"
wait "$TRACER" || true

expand() {
    systemd-analyze syscall-filter "$1" | tail -n +2 | sed 's/^ *//' | grep -v -e '^#' -e '^$' |
        while read -r name; do case "$name" in @*) expand "$name" ;; *) echo "$name" ;; esac; done
}
expand @system-service | sort -u >allowed
# "PID name(" lines; resumed calls carry the same names.
grep -oE '^[0-9]+ +[a-z0-9_]+\(' trace | awk '{print $2}' | tr -d '(' | sort -u >used
families="$(grep -oE 'socket\(AF_[A-Z0-9]+' trace | cut -d'(' -f2 | sort -u | tr '\n' ' ')"
echo "system calls made: $(wc -l <used); allowed by @system-service: $(wc -l <allowed)"
echo "address families: $families"
outside="$(comm -23 used allowed)"
bad_family="$(printf '%s\n' $families | grep -vxE 'AF_INET|AF_INET6|AF_UNIX' || true)"
[ -z "$outside" ] || { echo "FAIL: outside @system-service: $outside"; exit 1; }
[ -z "$bad_family" ] || { echo "FAIL: address families outside RestrictAddressFamilies: $bad_family"; exit 1; }
echo "PASS: every system call is in @system-service, every socket in AF_INET, AF_INET6, AF_UNIX"
