"""Hostile files against the running API: each gets a clear 4xx, nothing is executed, nothing is
stored. (Random bytes, truncated files and plain pickles are in test_api.py.)"""

from __future__ import annotations

import io
import os
import pickle
import socket
import tarfile
import zipfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tests.test_api import assert_error, post_file, s3_keys

pytestmark = pytest.mark.integration

MARKER = Path("/tmp/cvopt-hostile-marker")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_a_pickle_that_would_run_a_command_never_runs(stack, tmp_path):
    MARKER.unlink(missing_ok=True)
    before = s3_keys(stack)
    raw = pickle.dumps(Exploit())
    assert_error(post_file(stack.client, "/v1/models", "model.pkl", raw), 415, "pickle_not_allowed")
    # The same payload inside a torch.save-style zip, offered as a torchvision state_dict.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", raw)
        zf.writestr("archive/version", "3\n")
    resp = stack.client.post(
        "/v1/models", files={"file": ("weights.pt", buf.getvalue())}, data={"architecture": "resnet18"}
    )
    assert resp.status_code in (415, 422), resp.text
    assert not MARKER.exists()
    assert s3_keys(stack) == before


def test_onnx_with_external_data_pointing_outside_is_refused(stack, tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("float_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weight],
    )
    model = helper.make_model(graph)
    before = s3_keys(stack)
    body = assert_error(
        post_file(stack.client, "/v1/models", "m.onnx", model.SerializeToString()), 422, "external_data_not_allowed"
    )
    assert "never followed" in body["message"]
    assert s3_keys(stack) == before
    assert onnx  # the model above is a plain ONNX protobuf; only the reference makes it hostile


def test_a_zip_bomb_is_refused_from_its_directory(stack):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.png", b"\0" * (64 * 1024**2))  # 64 MiB of zeros, about 64 KiB compressed
    assert len(buf.getvalue()) < 1024**2
    before = s3_keys(stack)
    assert_error(post_file(stack.client, "/v1/datasets", "bomb.zip", buf.getvalue()), 422, "zip_bomb")
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(
            "x.npy",
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4096, 4096), }".ljust(128 - 1)
            + b"\n"
            + b"\0" * (64 * 1024**2),
        )
    assert_error(post_file(stack.client, "/v1/datasets", "bomb.npz", npz.getvalue()), 422, "zip_bomb")
    assert s3_keys(stack) == before


def test_a_tar_with_parent_paths_or_links_is_refused(stack):
    for name, kind in (
        ("../../etc/evil.png", tarfile.REGTYPE),
        ("/abs.png", tarfile.REGTYPE),
        ("link.png", tarfile.SYMTYPE),
    ):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = 3
                tf.addfile(info, io.BytesIO(b"abc"))
        assert_error(post_file(stack.client, "/v1/datasets", "evil.tar", buf.getvalue()), 422, "unsafe_archive")


def test_a_10_gb_declared_upload_is_refused_before_the_body(stack):
    """A request that declares 10 GB is answered 413 from its headers; the client never has to
    send (and the server never stores) the body."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {stack.api_key}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 10737418240\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"--x\r\n")
        reply = b""
        while b"}" not in reply:  # the status line and the JSON body may come in separate reads
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert '"code":"upload_too_large"' in reply.replace(" ", "")
