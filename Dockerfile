# A small CPU image of barnraise (docs/running-a-node.md, "In a container").
#
#   docker build -t barnraise .
#   docker run -d --name barnraise-node -v barnraise:/data \
#       -e BARNRAISE_COORDINATOR=/ip4/203.0.113.5/tcp/4001/p2p/12D3KooW... \
#       -p 4001:4001 -p 4001:4001/udp barnraise node --listen /ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1
#
# Stage 1 builds the release binary; stage 2 is Debian slim with only the
# binary, CA certificates and a non-root user. The node's key and state live
# in the /data volume: keep it, it is the node's identity and credit.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin barnraise \
    && strip target/release/barnraise

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --create-home barnraise
COPY --from=build /src/target/release/barnraise /usr/local/bin/barnraise
USER barnraise
ENV BARNRAISE_HOME=/data BARNRAISE_DATA_DIR=/data NO_COLOR=1
VOLUME ["/data"]
EXPOSE 4001/tcp 4001/udp
ENTRYPOINT ["/usr/local/bin/barnraise"]
CMD ["node"]
