#!/bin/sh
# `minio server DIR [--console-address ...]` -> moto's S3 server on :9000 (kept in memory).
set -eu
[ "${1:-}" = server ] || exec "$@"
exec moto_server -H 0.0.0.0 -p 9000
