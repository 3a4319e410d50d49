"""What a user sends that the service must keep or refuse cleanly, in process: the API on its
embedded defaults (SQLite, local storage, a broker folder) in a temporary CVOPT_DATA_DIR, called
through FastAPI's TestClient. File names (unicode kept, paths never), signed download links
(the file name is signed; the header never carries a path), unreadable dataset images (named),
a malformed Content-Length (the JSON error shape) and names with control characters (422)."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from core.storage import LocalStore, S3Store, content_disposition

API_KEY = "cvopt_inproc_" + "k" * 32
UNICODE_NAME = "модель_模型_🚀.onnx"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from api.main import create_app
    from core.db import get_engine, get_sessionmaker
    from core.migrate import upgrade
    from core.queue import get_celery
    from core.settings import get_settings
    from core.storage import get_store

    caches = (get_settings, get_engine, get_sessionmaker, get_store, get_celery)
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("CVOPT_")]:
            env.delenv(name)
        env.setenv("CVOPT_DATA_DIR", str(tmp_path_factory.mktemp("inproc") / "data"))
        env.setenv("CVOPT_BOOTSTRAP_API_KEY", API_KEY)
        env.setenv("CVOPT_ACCESS_LOG", "false")
        for cache in caches:
            cache.cache_clear()
        upgrade(get_settings().resolved_database_url)
        try:
            with TestClient(create_app(), headers={"Authorization": f"Bearer {API_KEY}"}) as test_client:
                yield test_client
        finally:
            get_engine().dispose()
            for cache in caches:
                cache.cache_clear()


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "message", "details"} and body["code"] == code, body
    return body


def onnx_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def png(width: int, height: int, pixels: bool = True) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * 3 * width for _ in range(height)) if pixels else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def raw_upload(client, route: str, filename: str, data: bytes, **headers: str):
    """A multipart body written by hand: clients percent-encode control characters in a file
    name, a hostile sender does not."""
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return client.post(
        route, content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}", **headers}
    )


def zipped(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


# -- file names ----------------------------------------------------------------------------------


def test_a_unicode_file_name_is_kept_and_paths_and_control_characters_are_not(client):
    model = client.post("/v1/models", files={"file": (UNICODE_NAME, onnx_model())})
    assert model.status_code == 201, model.text
    assert model.json()["filename"] == UNICODE_NAME and model.json()["name"] == UNICODE_NAME

    hostile = raw_upload(client, "/v1/models", "../..\\etc/\u202emo\x00del\x07.onnx", onnx_model())
    assert hostile.status_code == 201, hostile.text
    assert hostile.json()["filename"] == "model.onnx"

    long_name = "模" * 300 + ".onnx"  # 900 bytes of UTF-8: more than a file system takes in one name
    kept = client.post("/v1/models", files={"file": (long_name, onnx_model())}).json()["filename"]
    assert kept.endswith(".onnx") and kept.startswith("模模") and len(kept.encode()) <= 200


# -- signed download links -----------------------------------------------------------------------


@pytest.fixture
def local_object(client):
    from core.storage import get_store

    store = get_store()
    assert isinstance(store, LocalStore)
    path = store.root / "artifacts" / "job1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    yield store, "artifacts/job1/model.onnx"
    path.unlink()


def test_the_download_file_name_is_signed(client, local_object):
    store, key = local_object
    url = store.download_url(key, filename="model.int8.onnx", base_url="").url
    ok = client.get(url)
    assert ok.status_code == 200 and ok.content == b"weights"
    assert ok.headers["content-disposition"] == 'attachment; filename="model.int8.onnx"'
    for forged in ("../../etc/passwd", "other.onnx"):
        query = parse_qs(urlsplit(url).query)
        query["filename"] = [forged]
        resp = client.get(urlsplit(url).path, params={k: v[0] for k, v in query.items()})
        assert_error(resp, 401, "invalid_signature")
    without = client.get(url.split("&filename=")[0])
    assert without.status_code in (401, 422) and "content-disposition" not in without.headers


def test_a_download_header_carries_a_base_name_only_and_unicode_as_rfc_5987(client, local_object):
    store, key = local_object
    for signed_name, ascii_name, exact in [
        ("../../etc/passwd", "passwd", None),
        ("..\\..\\boot.ini", "boot.ini", None),
        (UNICODE_NAME, "_" * 11 + ".onnx", UNICODE_NAME),
        ('we"ird;\r\nX-Injected: 1.onnx', "we_ird;X-Injected: 1.onnx", 'we"ird;X-Injected: 1.onnx'),
    ]:
        resp = client.get(store.download_url(key, filename=signed_name, base_url="").url)
        assert resp.status_code == 200, resp.text
        header = resp.headers["content-disposition"]
        assert "x-injected" not in resp.headers and "/" not in header and "\\" not in header
        assert header.startswith(f'attachment; filename="{ascii_name}"'), header
        if exact is None:
            assert "filename*" not in header
        else:
            assert unquote(header.split("filename*=UTF-8''", 1)[1]) == exact


def test_an_s3_presigned_link_asks_for_a_safe_content_disposition(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3Store("bucket", "cvopt", Settings(storage_url="s3://bucket/cvopt", s3_endpoint_url="http://127.0.0.1:9"))
    url = store.download_url("artifacts/job1/model.onnx", filename='../x/"' + UNICODE_NAME, base_url="").url
    asked = parse_qs(urlsplit(url).query)["response-content-disposition"][0]
    assert asked == content_disposition('"' + UNICODE_NAME) and asked.isascii() and "/" not in asked
    assert unquote(asked.split("filename*=UTF-8''", 1)[1]) == '"' + UNICODE_NAME


def test_a_report_link_signature_does_not_open_a_download(client):
    from core.views import report_link

    query = {k: v[0] for k, v in parse_qs(urlsplit(report_link("job1")).query).items()}
    resp = client.get("/files/reports/job1", params={**query, "filename": "report.html"})
    assert_error(resp, 401, "invalid_signature")


# -- datasets ------------------------------------------------------------------------------------


def test_an_unreadable_dataset_image_is_named_with_the_reason(client):
    data = zipped({"cat/1.png": b"not an image at all", "dog/2.png": png(4, 4)})
    body = assert_error(client.post("/v1/datasets", files={"file": ("pets.zip", data)}), 422, "invalid_image")
    assert "cat/1.png" in body["message"] and "BytesIO" not in body["message"] and "0x" not in body["message"]
    assert body["details"] == {"member": "cat/1.png", "reason": body["details"]["reason"]}
    assert "not in an image format" in body["details"]["reason"]


def test_a_decompression_bomb_image_is_a_422_not_a_crash(client):
    data = zipped({"a.png": png(100_000, 100_000, pixels=False), "b.png": png(4, 4)})
    body = assert_error(client.post("/v1/datasets", files={"file": ("bomb.zip", data)}), 422, "invalid_image")
    assert "a.png" in body["message"] and "pixels" in body["message"]


# -- Content-Length --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", ["abc", "12abc", "-5", "0x10", "1,2"])
def test_a_malformed_content_length_reaching_the_app_is_a_json_400(client, length):
    # uvicorn (httptools and h11) answers these itself with a plain-text 400 before the app; behind
    # a server that passes them on, the upload route answers in the API's error shape.
    resp = raw_upload(client, "/v1/models", "m.onnx", onnx_model(), **{"Content-Length": length})
    body = assert_error(resp, 400, "invalid_content_length")
    assert length in body["message"]


# -- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["job\u0000one", "job\none", "tab\there", "bell\x07", "c1\x85"])
def test_a_job_name_with_control_characters_is_a_422(client, name):
    body = assert_error(
        client.post("/v1/jobs", json={"model_id": "m", "preset": "onnx", "name": name}), 422, "validation_error"
    )
    assert body["details"]["errors"][0]["loc"][-1] == "name" and "control characters" in body["message"]


def test_model_dataset_and_key_names_with_control_characters_are_422_and_nothing_is_stored(client):
    before = client.get("/v1/models").json()["count"]
    for name in ("evil\x00name", "two\nlines", "x" * 201):
        assert_error(
            client.post("/v1/models", files={"file": ("m.onnx", onnx_model())}, data={"name": name}),
            422,
            "validation_error",
        )
        assert_error(
            client.post("/v1/datasets", files={"file": ("d.zip", zipped({"a.png": png(4, 4)}))}, data={"name": name}),
            422,
            "validation_error",
        )
    assert client.get("/v1/models").json()["count"] == before
    tenant_id = client.get("/v1/tenant").json()["id"]
    assert_error(client.post("/v1/keys", json={"tenant_id": tenant_id, "name": "ci\x00"}), 422, "validation_error")
    # Unicode stays welcome.
    ok = client.post("/v1/models", files={"file": ("m.onnx", onnx_model())}, data={"name": "модель 🚀 v2"})
    assert ok.status_code == 201 and ok.json()["name"] == "модель 🚀 v2"
    job = client.post("/v1/jobs", json={"model_id": ok.json()["id"], "preset": "onnx", "name": "nightly – 模型"})
    assert job.status_code == 202, job.text
    assert job.json()["name"] == "nightly – 模型"
