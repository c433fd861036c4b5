#!/usr/bin/env bash
# The Debian package, installed for real in a fresh root:
#   1. scripts/build-deb.sh builds target/debian/kaproxy_*.deb (skip with
#      KAPROXY_DEB=path/to/kaproxy.deb);
#   2. a fresh Debian bookworm root (debootstrap minbase with systemd, as a host
#      that runs tomcat10 has; the pristine root is cached as a tar in
#      $KAPROXY_TEST_CACHE, default /var/cache/kaproxy-test, and unpacked anew
#      for every run);
#   3. in it, in a private mount namespace with its own /proc: dpkg -i; the files
#      land where Debian keeps them, the unit is enabled, systemd-analyze verify
#      accepts the installed unit, kaproxy --version, kaproxy check on the
#      installed /etc/kaproxy/kaproxy.toml;
#   4. dpkg -r leaves only the conffile, dpkg --purge leaves nothing: the root's
#      file list equals the one before the install, but for dpkg's own records.
# Needs root, debootstrap, cargo-deb. scripts/test.sh runs it (CI); by hand:
#   sudo tests/deb/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

MIRROR="${KAPROXY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
CACHE="${KAPROXY_TEST_CACHE:-/var/cache/kaproxy-test}"
PRISTINE="$CACHE/$SUITE-minbase-systemd.tar"
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
    DEB="$(./scripts/build-deb.sh | tail -1)"
fi
[ -f "$DEB" ] || fail "no package at $DEB"
echo "$DEB"

step "fresh $SUITE root"
if [ ! -f "$PRISTINE" ]; then
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$SUITE" "$WORK/build" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
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

printf '\nPASS: the package installed in a fresh %s root, its unit verified, kaproxy check passed on the installed config, and remove and purge left nothing\n' "$SUITE"
