# syntax=docker/dockerfile:1
#
# waquota: a release build in the Rust image, run from a slim Debian as a non-root user.
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
    && install -m 0755 target/release/waquota /usr/local/bin/waquota

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin waquota
COPY --from=builder /usr/local/bin/waquota /usr/local/bin/waquota
USER waquota
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/waquota"]
CMD ["serve"]
