# CI only: a stand-in for the official postgres image from Debian's PostgreSQL 15. The entry
# point does what the official one does for docker-compose.yml: POSTGRES_USER, POSTGRES_PASSWORD
# and POSTGRES_DB on first start, data in /var/lib/postgresql/data, password logins from the
# network, the server run as the postgres user.
FROM cvopt-ci/debian:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8 \
    PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
