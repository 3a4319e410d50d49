"""What .ci/compose checks on the running stack, from the host, as a user would.

1. The images: both run as the unprivileged `cvopt` user with a health check; the API image has
   no ML runtime in it (torch, onnxruntime, OpenVINO, NNCF, TensorFlow, TensorRT, the worker).
2. A job through the whole stack: a real CNN (trained here on scikit-learn's digits) and a
   calibration set uploaded with the CLI, `cvopt submit --preset onnx-int8 --wait --download`;
   every downloaded file's sha256 equals the listing's, and came from a presigned URL of the S3
   server (its published port, a SigV4 signature of the store's credentials checked here, no
   API key), not through the API.
3. /metrics as Prometheus scrapes it.
4. A restart through compose: with a job running its benchmark, the worker container is killed
   (SIGKILL: no goodbye) and started again; the job is taken up again and finishes once.

Run by .ci/compose with the project's venv (it imports tests.digits, which trains with torch);
environment: CVOPT_URL, CVOPT_API_KEY, CVOPT_COMPOSE (the compose command line), CVOPT_S3_PUBLIC,
CVOPT_S3_ACCESS_KEY and CVOPT_S3_SECRET_KEY (the store's credentials).
The last line names the job and says `succeeded`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.digits import load_digits_arrays, save_model_files, train_digit_net, write_npz  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.trace in save_model_files

URL = os.environ["CVOPT_URL"]
API_KEY = os.environ["CVOPT_API_KEY"]
COMPOSE = shlex.split(os.environ["CVOPT_COMPOSE"])
S3_PUBLIC = urlparse(os.environ["CVOPT_S3_PUBLIC"])
S3_ACCESS_KEY = os.environ["CVOPT_S3_ACCESS_KEY"]
S3_SECRET_KEY = os.environ["CVOPT_S3_SECRET_KEY"]
CLI = str(Path(sys.executable).with_name("cvopt"))
ML_RUNTIMES = ("torch", "onnxruntime", "openvino", "nncf", "tensorflow", "tensorrt", "worker")


def say(message: str) -> None:
    print(f"[compose-check] {message}", flush=True)


def compose(*args: str, capture: bool = False) -> str:
    done = subprocess.run([*COMPOSE, *args], check=True, text=True, capture_output=capture)
    return done.stdout if capture else ""


def check_images() -> None:
    for service in ("api", "worker-cpu"):
        container = compose("ps", "-q", service, capture=True).strip()
        image = subprocess.run(
            ["docker", "inspect", "-f", "{{.Image}}", container], check=True, text=True, capture_output=True
        ).stdout.strip()
        config = json.loads(
            subprocess.run(["docker", "image", "inspect", image], check=True, text=True, capture_output=True).stdout
        )[0]["Config"]
        assert config["User"] == "cvopt", f"{service} runs as {config['User']!r}, not cvopt"
        assert config.get("Healthcheck", {}).get("Test"), f"{service}'s image has no health check"
        uid = compose("exec", "-T", service, "id", "-u", capture=True).strip()
        assert uid == "10001", f"{service} runs as uid {uid}"
    probe = f"import importlib.util as u; print([m for m in {ML_RUNTIMES!r} if u.find_spec(m)])"
    found = compose("exec", "-T", "api", "python", "-c", probe, capture=True).strip()
    assert found == "[]", f"the API image has ML runtimes: {found}"
    packages = compose("exec", "-T", "api", "pip", "list", "--format=freeze", capture=True).lower()
    heavy = [line for line in packages.splitlines() if line.split("==")[0] in {"torch", "onnxruntime", "openvino"}]
    assert not heavy, heavy
    say("images: api and worker-cpu run as cvopt (uid 10001) with health checks; no ML runtime in the API image")


def make_inputs(scratch: Path) -> tuple[Path, Path]:
    net = train_digit_net(epochs=3)
    model = save_model_files(net, scratch / "model")["onnx"]
    x, _ = load_digits_arrays()
    calibration = write_npz(scratch / "calibration.npz", x[:64])
    return model, calibration


def submit_and_download(model: Path, calibration: Path, scratch: Path) -> dict:
    out = scratch / "download"
    cmd = [CLI, "submit", str(model), "--preset", "onnx-int8", "--calibration", str(calibration)]
    cmd += ["--wait", "--download", str(out), "--all", "--json"]
    say("$ " + " ".join(Path(c).name if c == CLI else c for c in cmd))
    env = {**os.environ, "CVOPT_URL": URL, "CVOPT_API_KEY": API_KEY}
    done = subprocess.run(cmd, check=False, text=True, capture_output=True, env=env, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"cvopt submit failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    document = json.loads(done.stdout)
    job = document["job"]
    assert job["status"] == "succeeded", (job.get("error"), job.get("log_tail"))
    listing = {a["name"]: a for a in document["artifacts"]}
    downloaded = [Path(p) for p in document["downloaded"]]
    assert downloaded and len(downloaded) == len(listing), (downloaded, list(listing))
    for path in downloaded:
        artifact = listing[path.name]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == artifact["sha256"], (path.name, digest, artifact["sha256"])
        check_presigned(artifact, digest)
        say(f"downloaded {path.name}: {path.stat().st_size} bytes, sha256 {digest[:16]}... = the listing's")
    return job


def check_presigned(artifact: dict, digest: str) -> None:
    """The listing's URL is one the S3 server answers by itself: its public address, a SigV4
    query signature made with the store's credentials for that address (computed again here:
    the stand-in server does not check signatures, MinIO and S3 do); fetched with no
    credentials at all, it gives the same bytes."""
    url = urlparse(artifact["url"])
    query = dict(parse_qsl(url.query, keep_blank_values=True))
    assert (url.hostname, url.port) == (S3_PUBLIC.hostname, S3_PUBLIC.port), artifact["url"]
    assert query.get("X-Amz-Algorithm") == "AWS4-HMAC-SHA256", artifact["url"]
    assert query["X-Amz-Credential"].startswith(S3_ACCESS_KEY + "/"), query["X-Amz-Credential"]
    assert query["X-Amz-Signature"] == sigv4_query_signature(url, query), "the URL's signature is not the store's"
    body = httpx.get(artifact["url"], timeout=60).raise_for_status().content
    assert hashlib.sha256(body).hexdigest() == digest


def sigv4_query_signature(url, query: dict[str, str]) -> str:
    """AWS Signature Version 4 of a presigned GET (query-string authentication, unsigned
    payload), from the specification, with the store's secret key."""
    enc = lambda v: quote(v, safe="-_.~")  # noqa: E731
    canonical_query = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(query.items()) if k != "X-Amz-Signature")
    signed = query["X-Amz-SignedHeaders"]
    assert signed == "host", signed
    canonical = "\n".join(["GET", url.path, canonical_query, f"host:{url.netloc}", "", signed, "UNSIGNED-PAYLOAD"])
    _, date, region, service, terminal = query["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/{terminal}"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", query["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + S3_SECRET_KEY).encode()
    for part in (date, region, service, terminal):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def show_metrics() -> None:
    text = httpx.get(f"{URL}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    text.raise_for_status()
    lines = [
        line
        for line in text.text.splitlines()
        if line.startswith(("cvopt_jobs", "cvopt_queue_depth", "cvopt_workers", "cvopt_broker_queue_length"))
    ]
    assert any(line.startswith("cvopt_jobs") for line in lines), text.text[:2000]
    say("/metrics (jobs, queue depths, workers):")
    for line in lines[:30]:
        print("    " + line, flush=True)


def restart_mid_job(model: Path) -> dict:
    client = httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    with model.open("rb") as fh:
        uploaded = client.post("/v1/models", files={"file": (model.name, fh)}).raise_for_status().json()
    # A step long enough to be killed in: up to 4 x 6 s of timed runs of large batches.
    config = {"runs": 10_000, "max_seconds": 6, "batch_sizes": [256, 512, 1024, 2048]}
    response = client.post(
        "/v1/jobs", json={"model_id": uploaded["id"], "steps": [{"name": "benchmark", "config": config}]}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    wait_until(client, job["id"], lambda j: j["status"] == "running" and j["current_step"] == "benchmark", 300)
    time.sleep(2.0)
    say(f"job {job['id']} is running its benchmark: killing the worker container (SIGKILL), then starting it")
    compose("kill", "-s", "SIGKILL", "worker-cpu")
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    compose("start", "worker-cpu")
    done = wait_until(client, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 420)
    assert done["status"] == "succeeded", (done.get("error"), done.get("log_tail"))
    assert done["attempts"] == 2, done["attempts"]  # taken up again once, by the restarted worker
    assert [s["name"] for s in done["steps"]] == ["benchmark"] and done["steps"][0]["status"] == "succeeded"
    results = done["steps"][0]["metrics"]["results"]
    assert [r["artifact"] for r in results] == [uploaded["name"]], results  # one result, recorded once
    say(f"job {done['id']} finished once after the worker's restart (attempts {done['attempts']})")
    return done


def wait_until(client: httpx.Client, job_id: str, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if done(job):
            return job
        if job["status"] in ("failed", "cancelled"):
            raise SystemExit(f"job {job_id} {job['status']}: {job.get('error')}")
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} still {job['status']} ({job.get('current_step')}) after {timeout:.0f} s")
        time.sleep(1.0)


def main() -> None:
    check_images()
    with tempfile.TemporaryDirectory(prefix="cvopt-compose-") as tmp:
        scratch = Path(tmp)
        model, calibration = make_inputs(scratch)
        job = submit_and_download(model, calibration, scratch)
        show_metrics()
        restarted = restart_mid_job(model)
    print(f"job {job['id']} (onnx-int8) succeeded; job {restarted['id']} (worker killed mid-step) succeeded")


if __name__ == "__main__":
    main()
