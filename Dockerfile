# syntax=docker/dockerfile:1
# kaproxy: multi-stage build. The build stage compiles with the Rust toolchain;
# the final stage holds only the binary and the example configuration.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Manifests first with placeholder sources: the compiled dependencies form a
# layer that is reused while only kaproxy's own sources change.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches/relay \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/relay/main.rs \
    && cargo build --release --locked --bin kaproxy
COPY src ./src
COPY benches ./benches
# The context has no .git: `kaproxy --version` names the commit given here
# (docker build --build-arg KAPROXY_GIT_COMMIT=$(git rev-parse --short HEAD)),
# else "unknown".
ARG KAPROXY_GIT_COMMIT=""
# COPY keeps the context's timestamps, which can be older than the placeholder
# build: touch, so cargo rebuilds kaproxy instead of shipping the placeholder.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin kaproxy \
    && install -D -m 0755 target/release/kaproxy /out/kaproxy \
    && /out/kaproxy --version

FROM debian:bookworm-slim
# The OS trust store, for upstream TLS with ca = "system" (the default).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged user: kaproxy needs no capabilities for ports above 1023.
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kaproxy
COPY --from=build /out/kaproxy /usr/local/bin/kaproxy
COPY conf/kaproxy.toml /etc/kaproxy/kaproxy.toml
USER 10001:10001
# The example routes (Tomcat HTTP and AJP) and the admin endpoint.
EXPOSE 8000 8010 9901
# SIGTERM stops accepting at once and drains live pairs for shutdown_grace
# (30 s by default): give `docker stop -t` / terminationGracePeriodSeconds more.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["kaproxy", "healthcheck"]
ENTRYPOINT ["kaproxy"]
CMD ["run"]
