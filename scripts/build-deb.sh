#!/usr/bin/env bash
# Builds the Debian package target/debian/kaproxy_<version>-1_<arch>.deb:
#   1. the man pages and bash, zsh and fish completions, generated from the clap
#      definitions (examples/generate.rs) into target/assets;
#   2. cargo deb: the release binary, the systemd unit, the example config as a
#      conffile, the man pages (gzipped) and completions.
# Needs cargo-deb (cargo install cargo-deb). Prints the paths of the package
# (.deb) and of its debug symbols (kaproxy-dbgsym_*.ddeb).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || { echo "cargo-deb is not installed: cargo install --locked cargo-deb" >&2; exit 1; }
rm -rf target/assets
cargo run --quiet --locked --example generate -- target/assets >/dev/null
cargo deb --locked "$@"
