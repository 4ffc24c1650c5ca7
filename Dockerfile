# syntax=docker/dockerfile:1
# Ferry's image: ferry, ferry-worker and ferry-agent, for compose.yaml.
#
#   docker build -t ferry .                                  # CPU
#   docker build -t ferry:latest-cuda --build-arg VARIANT=cuda .   # GPU nodes
#
# VARIANT=cuda builds on NVIDIA's CUDA image with `--features
# ferry-workers/cuda` (mistral.rs on the GPU) and runs on its runtime image;
# set CUDA_COMPUTE_CAP to your GPUs' compute capability (80: A100, 86:
# RTX 30xx/A10, 89: L4/RTX 40xx, 90: H100), since the build has no GPU to ask.
# Builds use .cargo/config.toml, so they target x86-64-v3 (AVX2) like every
# other Ferry build.
#
# Not built by the tests: the development machine has no container runtime.
# ops/cli/tests/deploy.rs checks compose.yaml and its command lines instead.

ARG RUST_VERSION=1.92
ARG CUDA_VERSION=12.4.1
ARG VARIANT=cpu

# --- build stages, one per variant ------------------------------------------

FROM rust:${RUST_VERSION}-bookworm AS build-cpu
ENV FERRY_FEATURES=""

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-cuda
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP=86
ENV CARGO_HOME=/usr/local/cargo \
    RUSTUP_HOME=/usr/local/rustup \
    PATH=/usr/local/cargo/bin:${PATH} \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    FERRY_FEATURES="ferry-workers/cuda"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}

FROM build-${VARIANT} AS build
WORKDIR /src
COPY . .
# `ferry` is built without its default `harness` feature (building through
# cargo, Wine): the image ships no test harness.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p ferry-workers -p ferry-agent --bins \
      ${FERRY_FEATURES:+--features ${FERRY_FEATURES}} \
 && cargo build --release --locked -p ferry-ops --no-default-features \
 && mkdir -p /out \
 && cp target/release/ferry target/release/ferry-worker target/release/ferry-agent /out/

# --- runtime stages, one per variant ----------------------------------------

FROM debian:bookworm-slim AS runtime-cpu

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime-cuda

FROM runtime-${VARIANT}
# The binaries link only libc, libm and libgcc_s (TLS is rustls);
# ca-certificates is for a model fetched from a hub on a GPU node;
# postgresql-client is pg_dump and pg_restore for `ferry backup|restore`
# (compose's backup service uses the CPU image, whose Debian client is 15,
# as compose's PostgreSQL). /backups is made owned by the ferry user, so a
# named volume mounted there starts out writable by it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/ferry ferry \
 && install -d -o ferry -m 0700 /backups
COPY --from=build /out/ /usr/local/bin/
USER ferry
WORKDIR /var/lib/ferry
# compose.yaml gives each service its command; alone, the image shows help.
CMD ["ferry", "--help"]
