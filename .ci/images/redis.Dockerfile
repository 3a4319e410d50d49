# CI only: a stand-in for the official redis image from Debian's Redis 7. Like the official
# entry point it turns protected mode off when started without a configuration file (the
# compose network is what limits who connects).
FROM cvopt-ci/debian:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
