#!/usr/bin/env bash
# Sets up what the tests need and runs them all: formatting, lints, unit and
# integration tests (including the half-dead tests in private network namespaces),
# then the Debian package in a fresh root (tests/deb/run.sh).
#
# As root it installs nftables, iproute2, util-linux (unshare), bsdutils, tomcat10,
# haproxy, nginx, libnginx-mod-stream, curl, openssl, ca-certificates, systemd,
# debootstrap, systemd-container and strace with apt-get, and cargo-deb with cargo;
# without root those tests print why they are skipped, and under CI=true a
# skipped namespace test is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v nft >/dev/null 2>&1 || need_pkgs+=(nftables)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v ss >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v unshare >/dev/null 2>&1 || need_pkgs+=(util-linux)
# The probe's terminal test runs it under script(1) for a pseudo-terminal.
command -v script >/dev/null 2>&1 || need_pkgs+=(bsdutils)
# The end-to-end pool test runs two real Tomcat instances.
[ -x /usr/share/tomcat10/bin/catalina.sh ] || need_pkgs+=(tomcat10)
# The PROXY protocol tests use real peers: HAProxy (send-proxy, accept-proxy) and
# nginx's stream module (listen ... proxy_protocol).
[ -x /usr/sbin/haproxy ] || need_pkgs+=(haproxy)
[ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need_pkgs+=(libnginx-mod-stream)
# Packaging: systemd-analyze verifies the unit; tests/deb/run.sh installs the
# .deb in a debootstrap root and boots it with systemd-nspawn.
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || need_pkgs+=(systemd-container)
# scripts/syscall-check.sh traces kaproxy against the unit's system call filter.
command -v strace >/dev/null 2>&1 || need_pkgs+=(strace)
# The TLS tests (tests/tls.rs) use real TLS peers: curl, openssl s_client and s_server.
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
[ -d /etc/ssl/certs ] || need_pkgs+=(ca-certificates)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing: ${need_pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
    else
        echo "note: missing ${need_pkgs[*]}; the tests that need them will be skipped (or fail under CI=true)"
    fi
fi

# The NAT tests (tests/path_idle.rs) give a router namespace its own conntrack
# timeout. Their nftables ct and masquerade rules load nf_conntrack and nf_nat
# on demand; load them up front where modprobe is allowed, so a kernel without
# them is reported here rather than by a failing test.
if [ "$(id -u)" = 0 ] && command -v modprobe >/dev/null 2>&1; then
    modprobe -q nf_conntrack 2>/dev/null || echo "note: modprobe nf_conntrack failed; nftables will try to load it"
    modprobe -q nf_nat 2>/dev/null || true
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets

# Every system call kaproxy makes is in the unit's SystemCallFilter=@system-service.
if command -v strace >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1; then
    scripts/syscall-check.sh target/debug/kaproxy
elif [ "${CI:-}" = true ]; then
    echo "scripts/syscall-check.sh needs strace and systemd-analyze; under CI=true this is a failure" >&2
    exit 1
else
    echo "skipped: scripts/syscall-check.sh needs strace and systemd-analyze"
fi

# The Debian package, built and installed in a fresh root (needs root). cargo-deb
# stays installed in ~/.cargo/bin, and the pristine root in /var/cache, for later runs.
if [ "$(id -u)" = 0 ]; then
    command -v cargo-deb >/dev/null 2>&1 || cargo install --locked --version 3.8.0 cargo-deb
    tests/deb/run.sh
elif [ "${CI:-}" = true ]; then
    echo "tests/deb/run.sh needs root; under CI=true this is a failure" >&2
    exit 1
else
    echo "skipped: tests/deb/run.sh (the Debian package in a fresh root) needs root"
fi
