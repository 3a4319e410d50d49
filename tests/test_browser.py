"""The report page and the dashboard in a real headless browser (Debian's chromium): the report
opens through its signed link without the API key, its charts are there with one mark per
measured artifact, and a screenshot is taken; the dashboard, given the key in its link's
fragment, lists the tenant's jobs with links to their reports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.test_end_to_end import upload

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# .ci/run installs Debian's chromium; elsewhere the test says why it did not run.
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def reported_job(stack, digit_assets):
    client = stack.client
    model = upload(client, "/v1/models", digit_assets.models["onnx"], name="digits")
    calibration = upload(client, "/v1/datasets", digit_assets.calibration_npz)
    evaluation = upload(client, "/v1/datasets", digit_assets.labeled_npz)
    job = client.post("/v1/jobs", json={
        "model_id": model["id"], "preset": "onnx-int8", "name": "report <b>page</b>",
        "calibration_dataset_id": calibration["id"], "evaluation_dataset_id": evaluation["id"],
    }).json()
    done = stack.wait_for_job(job["id"])
    assert done["status"] == "succeeded", done["error"]
    return done


@needs_chromium
def test_the_report_renders_its_charts_through_the_signed_link(stack, reported_job, tmp_path):
    url = reported_job["report_url"]
    assert url.startswith(stack.base_url) and "sig=" in url
    page = httpx.get(url)  # no API key: the link's signature is the permission
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    tampered = httpx.get(url.replace("sig=", "sig=00"))
    assert tampered.status_code == 401 and tampered.json()["code"] == "invalid_signature"
    report = stack.client.get(f"/v1/jobs/{reported_job['id']}/report").json()
    measured = [e for e in report["entries"] if e["latency_ms"]]
    assert len(measured) >= 3  # the original, the ONNX export, the INT8 model

    dom = chromium(tmp_path, "--dump-dom", url)
    for chart in ("size-chart", "latency-chart", "quality-chart", "scatter"):
        assert f'id="{chart}"' in dom, chart
    latency_svg = dom[dom.index('id="latency-chart"'):]
    latency_svg = latency_svg[:latency_svg.index("</svg>")]
    assert latency_svg.count('class="bar"') == len(measured)
    assert latency_svg.count('class="whisker"') >= 1  # p90 beyond p50 somewhere
    scatter = dom[dom.index('id="scatter"'):]
    assert scatter[:scatter.index("</svg>")].count('class="point"') == len(measured)
    assert "report &lt;b&gt;page&lt;/b&gt;" in dom and "<b>page</b>" not in dom  # the job's name is escaped
    assert re.search(r'id="job-status"[^>]*>succeeded<', dom)
    assert "Top-1 accuracy" in dom  # the evaluation set is labeled
    for step in reported_job["steps"]:
        assert f"<td>{step['name']}</td>" in dom

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1100,1800", "--hide-scrollbars", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = stack.logs / "report.png"  # kept with the stack's logs for a person to look at
    shutil.copy(shot, keep)


@needs_chromium
def test_the_dashboard_lists_the_tenants_jobs_with_report_links(stack, reported_job, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", "--virtual-time-budget=10000",
                   f"{stack.base_url}/ui#key={stack.api_key}")
    assert f'data-job-id="{reported_job["id"]}"' in dom, dom[-3000:]
    row = dom[dom.index(f'data-job-id="{reported_job["id"]}"'):]
    row = row[:row.index("</tr>")]
    assert "succeeded" in row and 'class="report-link"' in row
    assert re.search(r'<span id="tenant"[^>]*>tenant default</span>', dom)
    # Without a key it asks for one, and shows no job.
    empty = chromium(tmp_path, "--dump-dom", "--virtual-time-budget=3000", f"{stack.base_url}/ui")
    assert "data-job-id" not in empty and re.search(r'<form id="login"(?![^>]*hidden)', empty)
