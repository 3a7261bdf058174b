# syntax=docker/dockerfile:1
# The picloud-router binary in a slim Debian image. Used by compose.yaml; on its own:
#   docker build -t picloud-router .
#   docker run --rm picloud-router --help

# --- build -----------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The registry and the target dir are BuildKit caches: a rebuild after a source change only
# compiles the workspace crates. The binary is copied out of the cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p picloud-router \
    && install -D -m 0755 target/release/picloud-router /out/picloud-router

# --- run -------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to webhooks, SMTP and managed Postgres/NATS; curl: the healthcheck.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 picloud \
    && useradd --system --uid 10001 --gid picloud --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin picloud
COPY --from=build /out/picloud-router /usr/local/bin/picloud-router
USER 10001:10001
ENV PICLOUD_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["picloud-router"]
CMD ["serve", "--migrate"]
