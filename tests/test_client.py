"""The Python client and the `cvopt` client commands against the running stack: submit --wait
--download checks each file's sha256 against the artifact list; exit codes tell a pipeline what
happened; the client rides out a dropped connection and a 429, and a retried upload or job
submission makes nothing twice."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cvopt.client import ApiError, Client, JobFailed
from tests.conftest import VENV_BIN
from tests.proxy import TcpProxy
from tests.test_tenants import make_tenant

pytestmark = pytest.mark.integration


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**stack.env, "CVOPT_URL": stack.base_url, "CVOPT_API_KEY": stack.api_key}
    return subprocess.run([str(VENV_BIN / "cvopt"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_wait_download_checks_every_file_against_the_artifact_list(stack, digit_assets, tmp_path):
    out = tmp_path / "out"
    done = cli(
        stack,
        "submit",
        str(digit_assets.models["onnx"]),
        "--preset",
        "onnx-int8",
        "--calibration",
        str(digit_assets.calibration_npz),
        "--wait",
        "--download",
        str(out),
        "--all",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["job"]["status"] == "succeeded"
    listed = {a["name"]: a["sha256"] for a in result["artifacts"]}
    assert listed and {p.name for p in out.iterdir()} == set(listed)
    for path in out.iterdir():
        assert sha256(path) == listed[path.name]
    assert [Path(p).name for p in result["downloaded"]] == [a["name"] for a in result["artifacts"]]

    # Without --all: the recommended artifact only, or nothing and the reason on stderr.
    recommended = result["report"]["recommended"]
    assert recommended == result["job"]["recommended"] and recommended["reason"]
    one = tmp_path / "one"
    fetched = cli(stack, "download", result["job"]["id"], str(one))
    assert fetched.returncode == 0, fetched.stderr
    if recommended["artifact"]:
        assert [p.name for p in one.iterdir()] == [recommended["artifact"]]
        assert sha256(one / recommended["artifact"]) == listed[recommended["artifact"]]
    else:
        assert not one.exists() and "no artifact is recommended" in fetched.stderr

    table = cli(stack, "submit", str(digit_assets.models["onnx"]), "--preset", "onnx")
    assert table.returncode == 0 and len(table.stdout.strip()) == 32  # without --wait: the job id
    waited = cli(stack, "submit", str(digit_assets.models["onnx"]), "--preset", "onnx", "--wait")
    assert waited.returncode == 0, waited.stderr
    header = waited.stdout.splitlines()[0].split()
    assert header[:3] == ["artifact", "size", "size"] and "p50" in waited.stdout
    assert "digits.onnx" in waited.stdout and "00-export_onnx.onnx" in waited.stdout
    assert "ONNX Runtime FP32" in waited.stdout  # each artifact's label under its name
    assert header[-1] == "verdict" and waited.stdout.splitlines()[-1].startswith("recommended: ")
    assert "% " in waited.stderr and "submitted" in waited.stderr  # progress lines while it waited


# The README's pipeline line, without --json, once per preset family: the table must print
# whatever the report holds (an original's null SNR, a TFLite artifact with no throughput, an
# accuracy next to an agreement). Each: (model, preset, extra arguments).
PIPELINES = {
    "auto": ("onnx", ["--target", "x86-cpu", "--max-latency-ms", "20"]),
    "onnx-int8": ("onnx", []),
    "onnx-fp16": ("onnx", []),
    "tflite-int8": ("pt2", []),
    "torch-int8": (
        "teacher",
        [
            "--architecture",
            "resnet18",
            "--input-shape",
            "1,3,32,32",
            "--preprocessing",
            '{"mean": [0, 0, 0], "std": [1, 1, 1]}',
        ],
    ),
    "prune50-distill": (
        "teacher",
        [
            "--architecture",
            "resnet18",
            "--input-shape",
            "1,3,32,32",
            "--preprocessing",
            '{"mean": [0, 0, 0], "std": [1, 1, 1]}',
            "--overrides",
            '{"distill": {"epochs": 1}}',
        ],
    ),
}


@pytest.mark.parametrize("preset", sorted(PIPELINES))
def test_the_readme_pipeline_line_prints_its_table(stack, digit_assets, request, tmp_path, preset):
    model, extra = PIPELINES[preset]
    if model == "teacher":
        root, _, _ = request.getfixturevalue("digit_teacher")
        model_path, calibration = root / "teacher.pt", root / "train.npz"
    else:
        model_path, calibration = digit_assets.models[model], digit_assets.unlabeled_zip
        extra = [*extra, "--preprocessing", '{"mean": [0], "std": [1]}']
    out = tmp_path / "out"
    done = cli(
        stack,
        "submit",
        str(model_path),
        "--preset",
        preset,
        "--calibration",
        str(calibration),
        "--wait",
        "--download",
        str(out),
        "--all",
        *extra,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "100.0% succeeded" in done.stderr
    lines = done.stdout.splitlines()
    # Each artifact's label ("ONNX Runtime INT8 QDQ") on its own line under it, in place of a format column.
    assert lines[0].split()[:3] == ["artifact", "size", "size"] and set(lines[1]) <= {"-", " "}
    assert lines[3].startswith("  ") and lines[3].strip()
    downloaded = sorted(p.name for p in out.iterdir())
    assert downloaded and all(f"downloaded {out / name}" in done.stderr for name in downloaded)
    names = {line.split()[0] for line in lines[2:] if line and not line.startswith("*")}
    assert set(downloaded) <= names and model_path.name in names  # every artifact, and the original
    assert any("agree" in line or "top-1" in line for line in lines[2:])  # each family evaluates
    assert lines[0].split()[-1] == "verdict" and lines[-1].startswith("recommended: ")


def test_exit_codes_tell_a_pipeline_what_happened(stack, digit_assets):
    refused = cli(stack, "submit", str(digit_assets.models["onnx"]), "--preset", "onnx-int8", "--wait")
    assert refused.returncode == 2 and "calibration" in refused.stderr  # a 422: INT8 needs calibration data
    slow = cli(
        stack, "submit", str(digit_assets.models["pt2"]), "--preset", "gpu-fp16", "--wait", "--timeout", "2", "--json"
    )
    assert slow.returncode == 1
    job = json.loads(slow.stdout)["job"]
    assert job["status"] == "queued" and job["waiting_for"] == "gpu worker"
    cancelled = cli(stack, "cancel", job["id"])
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    status = cli(stack, "status", job["id"])
    assert status.returncode == 1 and "cancelled" in status.stdout
    bad_key = subprocess.run(
        [str(VENV_BIN / "cvopt"), "status", job["id"], "--url", stack.base_url, "--api-key", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_key.returncode == 2 and "invalid_api_key" in bad_key.stderr


def test_the_client_rides_out_a_dropped_connection_and_makes_nothing_twice(stack, digit_assets):
    proxy = TcpProxy("127.0.0.1", int(stack.base_url.rsplit(":", 1)[1]))
    proxy.up()
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", stack.api_key, backoff=0.3, max_backoff=1.0) as cv:
            before = cv.request("GET", "/v1/models").json()["count"]
            proxy.down()
            threading.Timer(1.5, proxy.up).start()  # back while the client is still retrying
            model = cv.upload_model(digit_assets.models["onnx"], name="retried")
            again = cv.upload_model(digit_assets.models["onnx"], name="retried")  # a pipeline re-run
            assert again["id"] == model["id"]
            assert cv.request("GET", "/v1/models").json()["count"] == before + 1
            job = cv.wait(
                cv.submit_job(model_id=model["id"], preset="onnx", idempotency_key="ci-run-42")["id"],
                timeout=240,
                poll_interval=0.3,
            )
            assert cv.submit_job(model_id=model["id"], preset="onnx", idempotency_key="ci-run-42")["id"] == job["id"]
            assert job["status"] == "succeeded"
    finally:
        proxy.down()


def test_the_client_honours_429_and_raises_the_jobs_error(stack, digit_assets):
    tenant, admin_made = make_tenant(stack, "henry", max_concurrent_jobs=1)
    key = admin_made.headers["authorization"].split()[1]
    admin_made.close()
    with Client(stack.base_url, key, max_retries=8, backoff=0.2, max_backoff=0.5) as cv:
        model = cv.upload_model(digit_assets.models["pt2"])
        holder = cv.submit_job(model_id=model["id"], preset="gpu-fp16")  # waits for a GPU: holds the slot
        threading.Timer(1.5, lambda: cv.cancel(holder["id"])).start()
        started = time.monotonic()
        job = cv.submit_job(model_id=model["id"], preset="onnx")  # 429 until the holder is cancelled
        assert time.monotonic() - started >= 1.0 and job["status"] == "queued"
        with pytest.raises(JobFailed) as failed:
            cv.wait(holder["id"], timeout=30)
        assert failed.value.job["status"] == "cancelled"
        with pytest.raises(ApiError) as refused:
            cv.get_job("f" * 32)
        assert refused.value.status == 404 and refused.value.code == "job_not_found"
        cv.wait(job["id"], timeout=240, poll_interval=0.3)


def test_idempotency_keys_cover_the_filename_and_a_deleted_upload_frees_its_key(stack, digit_assets, tmp_path):
    calib, calibration = tmp_path / "calib.zip", tmp_path / "calibration.zip"
    calib.write_bytes(digit_assets.unlabeled_zip.read_bytes())
    calibration.write_bytes(calib.read_bytes())
    with Client(stack.base_url, stack.api_key) as cv:
        # The same bytes under two names (the CLI's and a script's): two requests, two datasets.
        first = cv.upload_dataset(calib)
        second = cv.upload_dataset(calibration)
        assert first["id"] != second["id"] and second["filename"] == "calibration.zip"
        assert cv.upload_dataset(calibration)["id"] == second["id"]  # a retry of the same request
        # Deleted, then uploaded again with the same key (the SDK's for the same file): a new object.
        model = cv.upload_model(digit_assets.models["onnx"], name="deleted-then-again")
        cv.request("DELETE", f"/v1/models/{model['id']}")
        again = cv.upload_model(digit_assets.models["onnx"], name="deleted-then-again")
        assert again["id"] != model["id"]  # the key was free
        assert cv.request("GET", f"/v1/models/{again['id']}").json()["id"] == again["id"]
