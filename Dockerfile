# syntax=docker/dockerfile:1
#
# waquota: a release build in the Rust image (stripped of debug symbols), run from a slim Debian
# as a non-root user, with a HEALTHCHECK through the gRPC health service.
#   docker build -t waquota .
#   docker run --rm -p 50051:50051 waquota                                   # in-memory ledger
#   docker run --rm -p 50051:50051 waquota serve --redis redis://host:6379  # shared ledger

FROM rust:1-bookworm AS builder
WORKDIR /src
# The proto is compiled by build.rs with protox (pure Rust): no protoc needed.
COPY . .
# The cache mounts keep the registry and incremental build between image builds; the binary is
# copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -s -m 0755 target/release/waquota /usr/local/bin/waquota

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin waquota
COPY --from=builder /usr/local/bin/waquota /usr/local/bin/waquota
USER waquota
EXPOSE 50051
# The gRPC health service, asked by the binary itself (exit 0 only when SERVING; NOT_SERVING
# while the store does not answer or during shutdown).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/waquota", "--addr", "http://127.0.0.1:50051", "health"]
ENTRYPOINT ["/usr/local/bin/waquota"]
CMD ["serve"]
