# syntax=docker/dockerfile:1
# The speculum image for Docker/BuildKit users: the same two binaries, user, environment, command
# and labels as `make image` (scripts/image.sh), on distroless's cc-debian12 instead of files
# taken from the build machine's Debian packages. `make image` needs no Docker; this needs no
# Debian host.
#
#   docker build -t speculum:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u -d @"$(git log -1 --format=%ct)" +%Y-%m-%dT%H:%M:%SZ)" .
#
# How this file is checked (tests/image.rs, dockerfile_final_stage): the final stage is built with
# buildah, the `build` stage replaced by the binaries `make image` built (--build-context) and the
# distroless base by the base layer of our own image; the result must have our image's files,
# user, env, command and labels. The `build` stage itself is not run there (no rust image offline).

ARG RUST_VERSION=1.95
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# containerd-client's build script compiles containerd's protobufs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The same command as `make image`; the binaries leave the cache mount through /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin speculum --bin speculum-webhook \
 && install -D -m 0755 -t /out/usr/local/bin target/release/speculum target/release/speculum-webhook

# distroless cc-debian12: libc6, libgcc-s1, libssl3 (unused: rustls), ca-certificates, tzdata,
# passwd/group with nonroot (65532), /tmp 1777.
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
COPY --from=build /out/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.title="speculum" \
      org.opencontainers.image.description="Cluster-local, peer-to-peer, policy-aware OCI registry mirror for containerd nodes (speculum) and its admission webhook (speculum-webhook)" \
      org.opencontainers.image.source="https://github.com/speculum-io/speculum" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.created="${CREATED}"
# The webhook runs as nonroot; the daemon's pods set runAsUser: 0 (see README, Container image).
USER 65532:65532
WORKDIR /
CMD ["speculum", "--help"]
