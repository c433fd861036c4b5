#!/usr/bin/env bash
# The Debian package, installed for real in a fresh root:
#   1. scripts/build-deb.sh builds target/debian/kaproxy_*.deb (skip with
#      KAPROXY_DEB=path/to/kaproxy.deb);
#   2. a fresh Debian bookworm root (debootstrap minbase with systemd, as a host
#      that runs tomcat10 has, with procps, which the package depends on;
#      the pristine root is cached as a tar in
#      $KAPROXY_TEST_CACHE, default /var/cache/kaproxy-test, and unpacked anew
#      for every run);
#   3. in it, in a private mount namespace with its own /proc: dpkg -i; the files
#      land where Debian keeps them, the unit is enabled, systemd-analyze verify
#      accepts the installed unit, kaproxy --version, kaproxy check on the
#      installed /etc/kaproxy/kaproxy.toml;
#   4. dpkg -r leaves only the conffile, dpkg --purge leaves nothing: the root's
#      file list equals the one before the install, but for dpkg's own records;
#   5. a second fresh root with the package installed boots systemd for real
#      (systemd-nspawn --boot, private network): kaproxy.service starts as a
#      dynamic user under its sandbox (no capabilities, no_new_privs, seccomp),
#      relays a connection to an echo upstream, serves TCP_INFO on /connections,
#      `systemctl reload` applies an added route without dropping the live
#      pair, and `systemctl stop` drains it to exit 0.
# Needs root, debootstrap, cargo-deb, systemd-nspawn (systemd-container).
# scripts/test.sh runs it (CI); by hand:
#   sudo tests/deb/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

MIRROR="${KAPROXY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
CACHE="${KAPROXY_TEST_CACHE:-/var/cache/kaproxy-test}"
PRISTINE="$CACHE/$SUITE-minbase-systemd-procps.tar"
WORK="$(mktemp -d /tmp/kaproxy-deb.XXXXXX)"
ROOT="$WORK/root"

cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, chroot, dpkg in the fresh root)"
for tool in debootstrap unshare chroot; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done

if [ -n "${KAPROXY_DEB:-}" ]; then
    DEB="$KAPROXY_DEB"
else
    step "build the package (scripts/build-deb.sh)"
    DEB="$(./scripts/build-deb.sh | grep '\.deb$' | tail -1)"
fi
[ -f "$DEB" ] || fail "no package at $DEB"
echo "$DEB"

step "fresh $SUITE root"
if [ ! -f "$PRISTINE" ]; then
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps "$SUITE" "$WORK/build" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$WORK"/build/var/cache/apt/archives/*.deb "$WORK"/build/var/lib/apt/lists/*
    tar -C "$WORK/build" -cf "$PRISTINE.part" . && mv "$PRISTINE.part" "$PRISTINE"
    rm -rf "$WORK/build"
fi
mkdir -p "$ROOT"
tar -C "$ROOT" -xf "$PRISTINE"
cp "$DEB" "$ROOT/tmp/kaproxy.deb"

# Everything in the root but what dpkg and the logs record about themselves.
inventory() {
    (cd "$ROOT" && find . -xdev \( -path ./proc -o -path ./tmp -o -path ./var/lib/dpkg -o -path ./var/log -o -path ./var/cache/debconf -o -path ./run \) -prune -o -print | sort)
}
inventory >"$WORK/before"

# One private mount namespace: /proc inside the root goes away with it.
in_root() {
    unshare --mount --pid --fork --mount-proc="$ROOT/proc" chroot "$ROOT" /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

step "dpkg -i"
in_root dpkg -i /tmp/kaproxy.deb
in_root dpkg -s kaproxy | grep -q '^Status: install ok installed' || fail "dpkg does not list kaproxy as installed"
for f in /usr/bin/kaproxy /etc/kaproxy/kaproxy.toml /usr/lib/systemd/system/kaproxy.service \
    /usr/share/man/man1/kaproxy.1.gz /usr/share/man/man1/kaproxy-run.1.gz /usr/share/man/man1/kaproxy-check.1.gz \
    /usr/share/bash-completion/completions/kaproxy /usr/share/zsh/vendor-completions/_kaproxy \
    /usr/share/fish/vendor_completions.d/kaproxy.fish /usr/share/doc/kaproxy/copyright; do
    [ -f "$ROOT$f" ] || fail "$f is not installed"
done
in_root dpkg-query --control-show kaproxy conffiles | grep -qx '/etc/kaproxy/kaproxy.toml' \
    || fail "/etc/kaproxy/kaproxy.toml is not a conffile"
[ "$(stat -c %a "$ROOT/etc/kaproxy/kaproxy.toml")" = 644 ] || fail "the config is not 0644 (DynamicUser must read it)"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/kaproxy.service" ] || fail "kaproxy.service is not enabled"
echo "installed: binary, unit (enabled), conffile, 7 man pages, 3 completions"

step "systemd-analyze verify on the installed unit"
out="$(in_root systemd-analyze verify --man=no kaproxy.service 2>&1)" || { echo "$out"; fail "systemd-analyze verify failed"; }
[ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify printed warnings"; }
echo "accepted"

step "kaproxy --version and kaproxy check on the installed config"
in_root kaproxy --version | tee "$WORK/version"
grep -Eq '^kaproxy [0-9]+\.[0-9]+\.[0-9]+ \(commit ([0-9a-f]{7,}|unknown)\)$' "$WORK/version" || fail "unexpected --version output"
# Under the unit's LimitNOFILE, as systemd would start it.
nofile="$(sed -n 's/^LimitNOFILE=//p' "$ROOT/usr/lib/systemd/system/kaproxy.service")"
limit=(prlimit --nofile="$nofile:$nofile")
if ! prlimit --nofile="$nofile:$nofile" true 2>/dev/null; then
    # A sandbox whose own hard limit is lower (and that may not raise it):
    # check runs under that, and its descriptor warning is expected.
    echo "note: cannot raise RLIMIT_NOFILE to the unit's $nofile here (hard $(ulimit -Hn)); checking under the current limit"
    limit=()
fi
in_root "${limit[@]}" kaproxy check -c /etc/kaproxy/kaproxy.toml >"$WORK/check" \
    || { cat "$WORK/check"; fail "kaproxy check rejected the installed config"; }
grep -E '^route|descriptors' "$WORK/check"
grep -q 'tomcat-http' "$WORK/check" || fail "check did not describe the packaged routes"
if [ "${#limit[@]}" -gt 0 ] && grep '^warning' "$WORK/check"; then fail "kaproxy check warns under LimitNOFILE=$nofile"; fi
in_root zcat /usr/share/man/man1/kaproxy.1.gz | grep -q '^\.SH ENVIRONMENT' || fail "kaproxy.1 has no ENVIRONMENT section"

step "dpkg -r keeps only the conffile"
in_root dpkg -r kaproxy
[ ! -e "$ROOT/usr/bin/kaproxy" ] || fail "/usr/bin/kaproxy is still there after dpkg -r"
[ ! -e "$ROOT/usr/lib/systemd/system/kaproxy.service" ] || fail "the unit is still there after dpkg -r"
[ -f "$ROOT/etc/kaproxy/kaproxy.toml" ] || fail "dpkg -r removed the conffile (only --purge may)"
in_root dpkg -s kaproxy | grep -q '^Status: deinstall ok config-files' || fail "kaproxy is not in state config-files"

step "dpkg --purge leaves the root as it was"
in_root dpkg --purge kaproxy
in_root dpkg -s kaproxy >/dev/null 2>&1 && fail "dpkg still knows kaproxy after --purge"
inventory >"$WORK/after"
if ! diff -u "$WORK/before" "$WORK/after"; then
    fail "files left or removed by install and purge (above)"
fi
echo "no file left behind"

step "the unit started for real: a second fresh root booted with systemd-nspawn"
if ! command -v systemd-nspawn >/dev/null; then
    [ "${CI:-}" = true ] && fail "systemd-nspawn is not installed (apt-get install systemd-container)"
    echo "SKIP: systemd-nspawn is not installed (apt-get install systemd-container)"
else
    BOOT="$WORK/boot"
    mkdir -p "$BOOT"
    tar -C "$BOOT" -xf "$PRISTINE"
    cp "$DEB" "$BOOT/tmp/kaproxy.deb"
    ROOT="$BOOT" in_root dpkg -i /tmp/kaproxy.deb >/dev/null 2>&1
    # An echo upstream for the packaged tomcat-http route (127.0.0.1:8080), made
    # of what systemd ships, and a oneshot that drives kaproxy.service once it is
    # up, writes what it saw to /boot-test.result and powers the machine off.
    cat >"$BOOT/etc/systemd/system/echo-upstream.service" <<'UNIT'
[Service]
ExecStart=/usr/bin/systemd-socket-activate --inetd -a -l 127.0.0.1:8080 /bin/cat
UNIT
    cat >"$BOOT/etc/systemd/system/boot-test.service" <<'UNIT'
[Unit]
Wants=echo-upstream.service kaproxy.service
After=echo-upstream.service kaproxy.service
[Service]
Type=oneshot
ExecStart=/bin/bash /boot-test.sh
ExecStopPost=/bin/systemctl --no-block poweroff
UNIT
    cat >"$BOOT/boot-test.sh" <<'SH'
exec >/boot-test.result 2>&1
http() { # path
    exec 3<>/dev/tcp/127.0.0.1/9901
    printf 'GET %s HTTP/1.1
Host: kaproxy
Connection: close

' "$1" >&3
    timeout 5 cat <&3
    exec 3<&-
}
for _ in $(seq 100); do http /healthz 2>/dev/null | grep -q '200 OK' && break; sleep 0.1; done
echo "active=$(systemctl is-active kaproxy)"
pid=$(systemctl show -p MainPID --value kaproxy)
echo "uid=$(stat -c %u /proc/$pid)"
grep -E '^(NoNewPrivs|Seccomp|CapEff|CapAmb):' /proc/$pid/status | tr -d '	' | sed 's/:/=/'
echo "nofile=$(awk '/Max open files/ {print $4}' /proc/$pid/limits)"
# One pair through the tomcat-http route to the echo upstream: the relay
# (splice) and /connections (TCP_INFO) run under the unit's system call filter.
exec 4<>/dev/tcp/127.0.0.1/8000
echo "kaproxy under systemd" >&4
read -r -t 5 line <&4
echo "echo=$line"
http /connections | grep -q '"rtt_us":[0-9]' && echo "connections=tcp_info" || http /connections | tail -3
# systemctl reload: check, then SIGHUP. A route added to the file starts, the
# live pair carries on, and it is the same process.
cat >>/etc/kaproxy/kaproxy.toml <<'TOML'

[[route]]
name = "added-by-reload"
listen = "127.0.0.1:8020"
[route.upstream]
servers = ["127.0.0.1:8080"]
TOML
if systemctl reload kaproxy; then echo "reload=ok"; else
    systemctl status kaproxy --no-pager -l | tail -20
    journalctl -u kaproxy -o cat --no-pager | tail -20
fi
for _ in $(seq 50); do journalctl -u kaproxy -o cat --no-pager | grep -q 'configuration reloaded' && break; sleep 0.1; done
journalctl -u kaproxy -o cat --no-pager | grep -q 'configuration reloaded' && echo "reloaded=logged"
echo "same_pid=$([ "$(systemctl show -p MainPID --value kaproxy)" = "$pid" ] && echo yes || echo no)"
echo "still here" >&4
read -r -t 5 line <&4
echo "after_reload=$line"
exec 5<>/dev/tcp/127.0.0.1/8020
echo "new route" >&5
read -r -t 5 line <&5
echo "added=$line"
exec 5<&-
exec 4<&-
sleep 0.5
http /metrics | grep -E '^kaproxy_pairs_closed_total\{route="tomcat-http",reason="completed"\}'
systemctl stop kaproxy
echo "stop_result=$(systemctl show -p Result --value kaproxy) exit_status=$(systemctl show -p ExecMainStatus --value kaproxy)"
journalctl -u kaproxy -o cat --no-pager | grep -E 'route listening|kaproxy exited|SIGTERM' | head -5
SH
    ln -s /etc/systemd/system/boot-test.service "$BOOT/etc/systemd/system/multi-user.target.wants/boot-test.service"
    # --private-network: the machine has only its own loopback, so the packaged
    # ports (8000, 8010, 9901) cannot clash with anything on this host.
    timeout 180 systemd-nspawn -q -D "$BOOT" --private-network --register=no --keep-unit --console=pipe -b \
        </dev/null >"$WORK/boot.log" 2>&1 || true
    [ -f "$BOOT/boot-test.result" ] || { tail -30 "$WORK/boot.log"; fail "the booted machine wrote no result"; }
    sed 's/^/  /' "$BOOT/boot-test.result"
    r="$BOOT/boot-test.result"
    grep -qx 'active=active' "$r" || fail "kaproxy.service was not active"
    uid="$(sed -n 's/^uid=//p' "$r")"
    [ -n "$uid" ] && [ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ] || fail "kaproxy did not run as a dynamic user (uid $uid)"
    grep -qx 'NoNewPrivs=1' "$r" || fail "NoNewPrivileges is not in force"
    grep -qx 'Seccomp=2' "$r" || fail "the system call filter is not in force"
    grep -qx 'CapEff=0000000000000000' "$r" || fail "kaproxy holds capabilities"
    # systemd cannot raise the limit past the hard limit the machine inherits.
    hard="$(ulimit -Hn)"
    [ "$hard" = unlimited ] || [ "$hard" -ge "$nofile" ] || echo "note: this host's hard RLIMIT_NOFILE is $hard, below the unit's $nofile"
    want="$nofile"; [ "$hard" != unlimited ] && [ "$hard" -lt "$nofile" ] && want="$hard"
    grep -qx "nofile=$want" "$r" || fail "RLIMIT_NOFILE is not the unit's LimitNOFILE ($want here)"
    grep -qx 'echo=kaproxy under systemd' "$r" || fail "no traffic through the route under systemd"
    grep -qx 'connections=tcp_info' "$r" || fail "/connections showed no TCP_INFO under the filter"
    grep -qx 'reload=ok' "$r" || fail "systemctl reload failed"
    grep -qx 'reloaded=logged' "$r" || fail "kaproxy did not log the reload"
    grep -qx 'same_pid=yes' "$r" || fail "the reload restarted kaproxy"
    grep -qx 'after_reload=still here' "$r" || fail "the live pair did not survive the reload"
    grep -qx 'added=new route' "$r" || fail "the route added by the reload does not forward"
    grep -q 'reason="completed"} 1' "$r" || fail "the pair did not close as completed"
    grep -qx 'stop_result=success exit_status=0' "$r" || fail "systemctl stop did not end in success with exit 0"
fi

printf '\nPASS: the package installed in a fresh %s root, its unit verified, kaproxy check passed on the installed config, remove and purge left nothing, and kaproxy.service ran under systemd with its sandbox, relayed, and stopped cleanly\n' "$SUITE"
