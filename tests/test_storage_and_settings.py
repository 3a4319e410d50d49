"""Object stores (a local directory with signed URLs; S3 through a real S3 server) and the
settings object."""

from __future__ import annotations

import time

import httpx
import pytest
from pydantic import ValidationError

from core.errors import NotFound
from core.settings import Settings
from core.storage import LocalStore, S3Store, sign_local, verify_local


def test_local_signatures_expire_and_resist_tampering():
    key = b"k" * 32
    expires = int(time.time()) + 60
    sig = sign_local("jobs/a/model.onnx", expires, key)
    assert verify_local("jobs/a/model.onnx", expires, sig, key)
    assert not verify_local("jobs/b/model.onnx", expires, sig, key)
    assert not verify_local("jobs/a/model.onnx", expires + 1, sig, key)
    assert not verify_local("jobs/a/model.onnx", expires, sig, b"other" * 8)
    past = int(time.time()) - 1
    assert not verify_local("jobs/a/model.onnx", past, sign_local("jobs/a/model.onnx", past, key), key)


def test_local_store_round_trip_and_unsafe_keys(tmp_path):
    store = LocalStore(tmp_path / "objects", signing_key=b"k" * 32, ttl_seconds=60)
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    store.put_file("a/b/c.bin", src)
    assert store.exists("a/b/c.bin")
    store.get_file("a/b/c.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == b"hello"
    for bad in ("../x", "/abs", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            store.put_file(bad, src)
    store.delete("a/b/c.bin")
    with pytest.raises(NotFound):
        store.get_file("a/b/c.bin", tmp_path / "again.bin")


@pytest.mark.integration
def test_s3_store_against_an_s3_server(s3_server, tmp_path, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    settings = Settings(
        storage_url=f"s3://{s3_server.bucket}/unit", s3_endpoint_url=s3_server.endpoint, download_url_ttl_seconds=60
    )
    store = S3Store(s3_server.bucket, "unit", settings)
    store.check()
    src = tmp_path / "m.onnx"
    src.write_bytes(b"\x08\x07" * 1000)
    store.put_file("models/1/m.onnx", src)
    assert store.exists("models/1/m.onnx") and not store.exists("models/1/none")
    signed = store.download_url("models/1/m.onnx", filename="m.onnx", base_url="unused")
    resp = httpx.get(signed.url)
    assert resp.status_code == 200 and resp.content == src.read_bytes()
    assert "X-Amz-Expires=60" in signed.url  # moto does not check signatures; real S3 does
    store.delete("models/1/m.onnx")
    with pytest.raises(NotFound):
        store.get_file("models/1/m.onnx", tmp_path / "gone")


def test_embedded_defaults_live_under_the_data_dir(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert s.resolved_database_url == f"sqlite:///{tmp_path}/cvopt.db"
    assert s.resolved_storage_url == f"file://{tmp_path}/objects"
    assert s.is_embedded_broker
    key = s.signing_key()
    assert len(key) >= 32 and Settings(data_dir=tmp_path).signing_key() == key  # kept across restarts


@pytest.mark.parametrize("secret", ["", "changeme", "short"])
def test_production_refuses_placeholder_secrets(secret):
    with pytest.raises(ValidationError, match="CVOPT_SECRET_KEY"):
        Settings(
            env="production",
            secret_key=secret,
            database_url="postgresql+psycopg://x/y",
            broker_url="redis://r",
            storage_url="s3://b",
        )


def test_production_needs_explicit_services():
    with pytest.raises(ValidationError, match="CVOPT_DATABASE_URL"):
        Settings(env="production", secret_key="s" * 40)


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CVOPT_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("CVOPT_BROKER_URL", "redis://127.0.0.1:6379/3")
    s = Settings()
    assert s.max_upload_bytes == 1234 and not s.is_embedded_broker


def test_the_embedded_broker_keeps_all_its_files_under_the_data_dir(tmp_path, monkeypatch):
    """kombu's filesystem transport writes its exchange table to ./control unless told otherwise:
    `cvopt serve` must not litter the directory it was started from."""
    from core.queue import enqueue_job, make_celery

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    enqueue_job("f" * 32, "cpu", celery=make_celery(Settings(data_dir=data)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert list((data).rglob("*.exchange")) or list(data.rglob("*.msg"))
