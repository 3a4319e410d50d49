# CI only: a stand-in for python:3.11-slim built from Debian's own packages (no registry here).
# Python 3.11 in a virtual environment at /usr/local, as the official image has its Python there
# (python, pip on PATH; pip not refused as "externally managed"). The host's CA bundle is copied
# in so that pip gets through the TLS-intercepting proxy of the CI machine: images built on this
# base stay on the CI machine and are never published.
FROM cvopt-ci/debian:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /usr/local \
    && ln -sf /usr/local/bin/python3.11 /usr/local/bin/python
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["python3"]
