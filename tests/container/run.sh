#!/usr/bin/env bash
# Builds the real Dockerfile with podman and runs the image for real:
#   1. local stand-ins for the base images the Dockerfile names (no registry can be
#      reached here): debian:bookworm-slim from a debootstrap root file system, and
#      rust:1.95-slim-bookworm from the same plus gcc and this machine's Rust toolchain;
#   2. podman build of the Dockerfile, unchanged;
#   3. the image run with a mounted config in front of an upstream on the host:
#      traffic through it, its HEALTHCHECK command, and `podman stop` draining and
#      exiting 0.
# Needs root, podman, runc, debootstrap (apt-get install podman runc debootstrap)
# and a Rust toolchain. Slow (debootstrap and a release build): run by hand,
#   sudo tests/container/run.sh
# Set KAPROXY_REBUILD_BASES=1 to rebuild the stand-in base images.
set -euo pipefail
cd "$(dirname "$0")/../.."

PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
MIRROR="${KAPROXY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
FINAL_BASE=debian:bookworm-slim
BUILD_BASE=rust:1.95-slim-bookworm
IMAGE=localhost/kaproxy:test
NAME=kaproxy-container-test
WORK="$(mktemp -d /tmp/kaproxy-container.XXXXXX)"
UPSTREAM_PID=""

cleanup() {
    "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
    [ -n "$UPSTREAM_PID" ] && kill "$UPSTREAM_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (podman with runc and cgroupfs, debootstrap)"
for tool in podman runc debootstrap python3 rustc; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done

make_base() { # name rootfs-dir [extra debootstrap --include]
    local name="$1" root="$2" include="${3:-}"
    if [ -z "${KAPROXY_REBUILD_BASES:-}" ] && "${PODMAN[@]}" image exists "$name"; then
        echo "stand-in $name exists (KAPROXY_REBUILD_BASES=1 rebuilds it)"
        return 1
    fi
    debootstrap --variant=minbase ${include:+--include="$include"} "$SUITE" "$root" "$MIRROR" >"$WORK/debootstrap-$(basename "$root").log" 2>&1 \
        || { tail -20 "$WORK/debootstrap-$(basename "$root").log"; fail "debootstrap for $name"; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    return 0
}

step "stand-in base image $FINAL_BASE (debootstrap $SUITE minbase)"
if make_base "$FINAL_BASE" "$WORK/final"; then
    tar -C "$WORK/final" -c . | "${PODMAN[@]}" import --change 'CMD ["bash"]' - "$FINAL_BASE" >/dev/null
    rm -rf "$WORK/final"
fi

step "stand-in base image $BUILD_BASE (debootstrap + gcc + this machine's Rust $(rustc --version | cut -d' ' -f2))"
if make_base "$BUILD_BASE" "$WORK/build" "gcc,libc6-dev,ca-certificates"; then
    sysroot="$(rustc --print sysroot)"
    mkdir -p "$WORK/build/usr/local/rust" "$WORK/build/usr/local/cargo/bin"
    # bin and lib are the toolchain; share/ is documentation.
    cp -a "$sysroot/bin" "$sysroot/lib" "$WORK/build/usr/local/rust/"
    [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$WORK/build/usr/local/rust/"
    for b in cargo rustc rustdoc; do ln -s "/usr/local/rust/bin/$b" "$WORK/build/usr/local/cargo/bin/$b"; done
    # This network reaches crates.io through a TLS-inspecting proxy: the build
    # environment trusts the same extra CAs as this host (a property of where the
    # image is built, not of the Dockerfile).
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$WORK/build/usr/local/share/ca-certificates/"
        chroot "$WORK/build" update-ca-certificates >/dev/null
    fi
    tar -C "$WORK/build" -c . | "${PODMAN[@]}" import \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'CMD ["bash"]' - "$BUILD_BASE" >/dev/null
    rm -rf "$WORK/build"
fi

step "podman build of the Dockerfile, unchanged"
# RUN steps share the host network so cargo can reach the crate registry.
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"${PODMAN[@]}" build --format docker --network host "${ULIMITS[@]}" --build-arg KAPROXY_GIT_COMMIT="$COMMIT" -t "$IMAGE" . 2>&1 | tail -5
"${PODMAN[@]}" image inspect "$IMAGE" --format 'image size {{.Size}} bytes, user {{.Config.User}}, entrypoint {{.Config.Entrypoint}} {{.Config.Cmd}}, stop signal {{.Config.StopSignal}}'
[ "$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Config.User}}')" = "10001:10001" ] || fail "image does not run as the non-root user"
"${PODMAN[@]}" image inspect "$IMAGE" --format '{{json .Config.Healthcheck}}' | grep -q healthcheck || fail "image has no HEALTHCHECK"

step "the image's --version names the commit"
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" "$IMAGE" --version | tee "$WORK/version"
grep -q "(commit $COMMIT)" "$WORK/version" || fail "--version does not name commit $COMMIT"

step "the image checks its built-in config"
# Whole output to a file first: head closing the pipe early makes podman fail (EPIPE).
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" "$IMAGE" check >"$WORK/check"
head -4 "$WORK/check"

step "run with a mounted config in front of an upstream on the host"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port); ROUTE_PORT=$(free_port); ADMIN_PORT=$(free_port)
python3 - "$UP_PORT" <<'PY' &
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(64); l.settimeout(600)
def echo(c):
    try:
        while (d := c.recv(65536)):
            c.sendall(d)
    except OSError:
        pass  # the drain step ends its pair with a reset, on purpose
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
PY
UPSTREAM_PID=$!
cat > "$WORK/kaproxy.toml" <<TOML
shutdown_grace = "5s"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[[route]]
name = "echo"
listen = "127.0.0.1:$ROUTE_PORT"
[route.upstream]
servers = ["127.0.0.1:$UP_PORT"]
TOML
chmod 644 "$WORK/kaproxy.toml"
# No systemd here to schedule the periodic checks: they are run by hand below.
"${PODMAN[@]}" run -d --name "$NAME" --network host "${ULIMITS[@]}" --health-interval disable \
    -v "$WORK/kaproxy.toml:/etc/kaproxy/kaproxy.toml:ro" "$IMAGE" >/dev/null
for _ in $(seq 50); do
    "${PODMAN[@]}" logs "$NAME" 2>&1 | grep -q "route listening" && break
    sleep 0.2
done
"${PODMAN[@]}" logs "$NAME" 2>&1 | grep "route listening" || { "${PODMAN[@]}" logs "$NAME"; fail "kaproxy did not start in the container"; }

step "traffic through the container"
python3 - "$ROUTE_PORT" <<'PY'
import hashlib, os, socket, sys, threading
data = os.urandom(8 << 20)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)), daemon=True).start()
got = bytearray()
while (chunk := s.recv(1 << 20)):
    got += chunk
assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), "echo through the container differs"
print(f"8 MiB through the container and back, digests equal")
PY

step "HEALTHCHECK command"
"${PODMAN[@]}" healthcheck run "$NAME" && echo "healthcheck: healthy" || fail "podman healthcheck run reported unhealthy"

step "podman stop drains and exits 0"
python3 - "$ROUTE_PORT" <<'PY' &
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.sendall(b"live pair")
s.recv(64)
time.sleep(30)
PY
HOLDER=$!
sleep 1
start=$(date +%s.%N)
"${PODMAN[@]}" stop -t 20 "$NAME" >/dev/null
took=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
code=$("${PODMAN[@]}" inspect "$NAME" --format '{{.State.ExitCode}}')
kill "$HOLDER" 2>/dev/null || true
"${PODMAN[@]}" logs "$NAME" 2>&1 | grep -E "shutting down|draining|drain|pair closed|exited" | sed 's/^/  /'
echo "podman stop took ${took}s, exit code $code"
[ "$code" = 0 ] || fail "container exit code $code after podman stop"
"${PODMAN[@]}" logs "$NAME" 2>&1 | grep -q 'reason="shutdown"' || fail "the live pair was not closed with reason shutdown"
python3 -c "import sys; sys.exit(0 if $took < 7 else 1)" || fail "stop took ${took}s, beyond shutdown_grace 5s + 1s + podman's own overhead"

printf '\nPASS: image built from the Dockerfile, relayed traffic, passed its HEALTHCHECK, drained on podman stop and exited 0\n'
