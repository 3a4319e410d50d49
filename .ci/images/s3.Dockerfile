# CI only: a stand-in for MinIO (minio/minio and minio/mc) built on the CI Python base: moto's S3
# server answers on port 9000 for `minio server ...`, and an `mc` that knows the three commands
# docker-compose.yml runs (`mc ready local`, `mc alias set`, `mc mb --ignore-existing`).
FROM cvopt-ci/python:3.11
ARG MOTO_VERSION
ARG BOTO3_VERSION
RUN pip install --no-cache-dir "moto[server]==${MOTO_VERSION}" "boto3==${BOTO3_VERSION}"
COPY minio-standin.sh /usr/local/bin/minio
COPY mc-standin.py /usr/local/bin/mc
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/minio"]
CMD ["server", "/data"]
