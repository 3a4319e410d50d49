"""The client's report table, in process: every report shape a preset can produce prints
(nulls, "inf" SNRs, artifacts that could not be measured, no throughput, an accuracy of 0.0,
labels, the Pareto front, failed and left-out candidates, constraints nothing meets), never a
traceback. ``cvopt submit``'s flags against the in-process API (tests/conftest.py). The same
table printed by ``cvopt submit --wait`` against the running service, once per preset family,
is in test_client.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner

from cvopt import client_cli
from cvopt.client import Client
from cvopt.client_cli import report_table


def entry(name: str, **fields) -> dict:
    return {
        "name": name,
        "step": fields.pop("step", None),
        "format": "onnx",
        "size_bytes": 1000,
        "size_ratio": 1.0,
        "latency_ms": None,
        "speedup": None,
        "throughput": None,
        "accuracy": None,
        "fidelity": None,
        **fields,
    }


def rows(table: str) -> dict[str, str]:
    return {
        line.split()[0]: line
        for line in table.splitlines()[2:]
        if line and not line.startswith(("*", " ", "recommended:"))
    }


def test_every_report_shape_prints():
    report = {
        "entries": [
            # The original: measured, compared with itself (SNR null, or "inf" as stored in JSON).
            entry(
                "model.onnx",
                latency_ms={"p50_ms": 2.0, "p90_ms": 2.5, "p99_ms": 3.0},
                speedup=1.0,
                throughput={"batch": 8, "images_per_s": 4000.0, "p50_ms": 2.0},
                fidelity={"top1_agreement": 1.0, "snr_db": None, "cosine": 1.0},
            ),
            entry(
                "01-quantize_int8.onnx",
                step="quantize_int8",
                size_ratio=0.26,
                latency_ms={"p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 1.3},
                speedup=2.0,
                fidelity={"top1_agreement": 0.0, "snr_db": "inf"},
                accuracy={"top1": 0.0, "top5": 0.1},
                verdict="over_tolerance",
            ),
            # Not measured at all (a benchmark that failed for it), and one whose batch 8 failed.
            entry("02-convert_fp16.onnx", step="convert_fp16", size_ratio=None),
            entry("03-x.onnx", step="x", latency_ms={"p50_ms": 3.0}, throughput_error="the batch axis is fixed at 1"),
        ],
        "recommended": {
            "artifact": None,
            "reason": "nothing beats the original: 01-quantize_int8.onnx loses 98.0 points of top-1 (tolerance 1.0)",
        },
    }
    table = report_table(report)
    by_name = rows(table)
    assert set(by_name) == {"model.onnx", "01-quantize_int8.onnx", "02-convert_fp16.onnx", "03-x.onnx"}
    assert "4000 @ 8" in by_name["model.onnx"] and "agree 1.000" in by_name["model.onnx"]
    int8 = by_name["01-quantize_int8.onnx"]
    assert "top-1 0.000" in int8 and "agree 0.000" in int8 and "SNR ∞ dB" in int8 and "2.00x" in int8
    assert int8.split()[-1] == "over_tolerance"
    assert by_name["02-convert_fp16.onnx"].split()[4:] == ["-"] * 6  # the verdict too
    assert "* 03-x.onnx: no throughput: the batch axis is fixed at 1" in table
    assert table.splitlines()[-1] == (
        "recommended: none (nothing beats the original: 01-quantize_int8.onnx loses "
        "98.0 points of top-1 (tolerance 1.0))"
    )


def test_the_table_names_the_recommended_artifact_and_a_detector_metric():
    report = {
        "recommended": {"artifact": "01-quantize_int8.onnx", "reason": "fastest within the tolerance"},
        "entries": [
            entry(
                "01-quantize_int8.onnx",
                step="quantize_int8",
                verdict="meets_tolerance",
                metric={"name": "map50_95", "value": 0.412, "reference": 0.415, "drop": 0.003},
            )
        ],
    }
    table = report_table(report)
    assert "mAP@0.5:0.95 0.412" in rows(table)["01-quantize_int8.onnx"]
    assert rows(table)["01-quantize_int8.onnx"].split()[-1] == "meets_tolerance"
    assert table.splitlines()[-1] == "recommended: 01-quantize_int8.onnx (fastest within the tolerance)"


def test_an_empty_or_partial_report_prints():
    assert report_table({"entries": []}).splitlines()[0].startswith("artifact")
    assert report_table({}).splitlines()[0].startswith("artifact")
    assert "?" in report_table({"entries": [{"latency_ms": {"p50_ms": None}, "throughput": {"batch": 8}}]})


# -- cvopt download, against a stand-in for the service's client ---------------------------------

RECOMMENDED = {"artifact": "01-quantize_int8.onnx", "reason": "fastest within the tolerance", "tolerance": 0.01}


class FakeClient:
    """What ``cvopt download`` asks of cvopt.client.Client, for a job that recommends INT8."""

    def __init__(self, url: str, api_key: str) -> None:
        self.calls: list[tuple] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def download_artifacts(self, job_id: str, dest: Path, *, all_artifacts: bool = False) -> list[Path]:
        names = ["00-export_onnx.onnx", "01-quantize_int8.onnx"] if all_artifacts else [RECOMMENDED["artifact"]]
        return [Path(dest) / n for n in names]

    def get_job(self, job_id: str) -> dict:
        return {"id": job_id, "status": "succeeded", "recommended": RECOMMENDED}


def cli():
    group = click.Group()
    client_cli.register(group)
    return group


@pytest.mark.parametrize("every", [False, True])
def test_download_json_names_the_recommendation_beside_what_it_fetched(monkeypatch, tmp_path, every):
    monkeypatch.setattr(client_cli, "Client", FakeClient)
    args = ["download", "j1", str(tmp_path), "--api-key", "k", "--json", *(["--all"] if every else [])]
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["recommended"] == RECOMMENDED
    assert [Path(p).name for p in out["downloaded"]] == (
        ["00-export_onnx.onnx", "01-quantize_int8.onnx"] if every else ["01-quantize_int8.onnx"]
    )


def test_the_client_commands_load_without_the_service():
    # The metric names the table prints come from the service's package without its database layer.
    code = "import sys, cvopt.client_cli; print(sorted(m for m in ('sqlalchemy', 'pydantic') if m in sys.modules))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]"


# -- preset auto's report: labels, the front, failed and left-out candidates, constraints -------


def auto_report(**recommended) -> dict:
    return {
        "target": "x86-cpu",
        "constraints": {"max_accuracy_drop": 0.01, "max_latency_ms": 2.0, "max_size_mb": None},
        "entries": [
            entry(
                "model.onnx",
                label="original (ONNX)",
                size_bytes=4_000_000,
                latency_ms={"p50_ms": 4.0},
                speedup=1.0,
                verdict="original",
                pareto=False,
            ),
            entry(
                "01-convert_openvino.openvino.zip",
                step="convert_openvino",
                format="openvino",
                label="OpenVINO f32",
                size_bytes=4_000_000,
                latency_ms={"p50_ms": 3.1},
                speedup=1.29,
                verdict="misses_constraint",
                pareto=True,
            ),
            entry(
                "04-quantize_int8.onnx",
                step="quantize_int8",
                label="ONNX Runtime INT8 QDQ",
                size_bytes=1_000_000,
                latency_ms={"p50_ms": 3.5},
                speedup=1.14,
                accuracy={"top1": 0.97},
                verdict="misses_constraint",
                pareto=True,
            ),
            entry("05-benchmark.onnx", step="x", verdict="not_measured", pareto=None),
        ],
        "front": ["01-convert_openvino.openvino.zip", "04-quantize_int8.onnx"],
        "failed_candidates": [
            {
                "index": 3,
                "step": "quantize_openvino",
                "label": "OpenVINO INT8 (NNCF)",
                "code": "int8_over_tolerance",
                "message": "loses 2.4 points of top-1 (tolerance 1.0)",
            }
        ],
        "left_out": [
            {"step": "convert_openvino", "config": {"inference_precision": "bf16"}, "reason": "the CPU has no bf16"}
        ],
        "recommended": {
            "artifact": None,
            "reason": "nothing within the tolerance meets the constraints; the closest is 01-convert_openvino...",
            "tolerance": 0.01,
            "accuracy_verified": True,
            **recommended,
        },
    }


def test_the_table_labels_each_artifact_marks_the_front_and_lists_failed_and_left_out_candidates():
    table = report_table(auto_report())
    lines = table.splitlines()
    # Each label on its own line under its artifact, in place of the format column.
    assert lines[0].split()[:3] == ["artifact", "size", "size"] and lines[0].split()[-1] == "verdict"
    labels = {lines[i].split()[0]: lines[i + 1] for i in range(2, 10, 2)}
    assert labels == {
        "model.onnx": "  original (ONNX)",
        "01-convert_openvino.openvino.zip": "  OpenVINO f32",
        "04-quantize_int8.onnx": "  ONNX Runtime INT8 QDQ",
        "05-benchmark.onnx": "  onnx",  # no label: its format
    }
    by_name = rows(table)
    assert set(by_name) == set(labels)
    # The front's entries carry its mark, the others do not.
    openvino = by_name["01-convert_openvino.openvino.zip"]
    assert openvino.split()[1:4] == ["◆", "4.0", "MB"] and openvino.split()[-1] == "misses_constraint"
    assert by_name["04-quantize_int8.onnx"].split()[1] == "◆"
    assert "◆" not in by_name["model.onnx"] and "◆" not in by_name["05-benchmark.onnx"]
    assert (
        "* ◆ the Pareto front of p50, size and metric, fastest first: 01-convert_openvino.openvino.zip, "
        "04-quantize_int8.onnx"
    ) in lines
    assert (
        "* failed: step 3 quantize_openvino (OpenVINO INT8 (NNCF)): int8_over_tolerance: "
        "loses 2.4 points of top-1 (tolerance 1.0)"
    ) in lines
    assert "* left out: convert_openvino (inference_precision=bf16): the CPU has no bf16" in lines
    # A preset auto job's long names and labels stay within a 120-column terminal.
    assert max(len(line) for line in lines if not line.startswith(("*", "recommended:"))) <= 120, table


def test_a_report_without_labels_or_a_front_shows_formats_and_no_notes():
    report = auto_report(artifact="04-quantize_int8.onnx", reason="fastest within the tolerance")
    for e in report["entries"]:
        e.pop("label", None), e.pop("pareto")
    del report["front"], report["failed_candidates"], report["left_out"]
    table = report_table(report)
    assert rows(table)["01-convert_openvino.openvino.zip"].split()[1] == "openvino"
    assert "◆" not in table and not [line for line in table.splitlines() if line.startswith("*")]
    assert table.splitlines()[-1] == "recommended: 04-quantize_int8.onnx (fastest within the tolerance)"


def test_when_nothing_meets_the_constraints_the_closest_is_named_and_nothing_is_recommended():
    report = auto_report(
        closest="01-convert_openvino.openvino.zip",
        missed=["p50 3.1 ms > max_latency_ms 2", "size 4 MB > max_size_mb 3"],
    )
    assert report_table(report).splitlines()[-1] == (
        "recommended: none; nothing meets the constraints; closest: 01-convert_openvino.openvino.zip "
        "(p50 3.1 ms > max_latency_ms 2; size 4 MB > max_size_mb 3)"
    )


def test_download_says_which_candidate_came_closest_when_nothing_meets_the_constraints(monkeypatch, tmp_path):
    recommended = auto_report(closest="01-convert_openvino.openvino.zip", missed=["p50 3.1 ms > max_latency_ms 2"])
    missed = recommended["recommended"]

    class NothingRecommended(FakeClient):
        def download_artifacts(self, job_id: str, dest: Path, *, all_artifacts: bool = False) -> list[Path]:
            return []

        def get_job(self, job_id: str) -> dict:
            return {"id": job_id, "status": "succeeded", "recommended": missed}

    monkeypatch.setattr(client_cli, "Client", NothingRecommended)
    result = CliRunner().invoke(cli(), ["download", "j1", str(tmp_path), "--api-key", "k"])
    # As when nothing beats the original: the job succeeded, so the command does too, and says why.
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        "nothing downloaded: nothing meets the constraints; closest: 01-convert_openvino.openvino.zip "
        "(p50 3.1 ms > max_latency_ms 2); --all fetches every artifact"
    )


# -- cvopt submit's target and limits, against the in-process API --------------------------------


class AppTransport(httpx.BaseTransport):
    """The client's requests answered by the in-process app, each kept as it went: (method, path,
    the JSON body or None)."""

    def __init__(self, app_client) -> None:
        self.app_client = app_client
        self.sent: list[tuple[str, str, dict | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        is_json = request.headers.get("content-type") == "application/json"
        self.sent.append((request.method, request.url.path, json.loads(request.read()) if is_json else None))
        # Through the TestClient's public API: it is built on its own HTTP package, not on httpx.
        sent = {k: v for k, v in request.headers.items() if k not in ("host", "content-length")}
        answer = self.app_client.request(
            request.method, request.url.raw_path.decode(), headers=sent, content=request.read()
        )
        # A fresh response for the client's httpx.Client: the app's is already read (and decoded).
        unsent = ("content-encoding", "content-length", "transfer-encoding")
        headers = [(k, v) for k, v in answer.headers.multi_items() if k not in unsent]
        return httpx.Response(answer.status_code, headers=headers, content=answer.content)


@pytest.fixture
def submit(inprocess_api, monkeypatch, tmp_path):
    """``submit(*args)``: ``cvopt submit tiny.onnx *args --json`` against the in-process API; (the
    result, the bodies of the jobs it posted, every request it sent)."""
    from tests.test_api_inprocess import tiny_onnx

    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx())
    transport = AppTransport(inprocess_api.client)
    monkeypatch.setattr(client_cli, "Client", lambda url, key: Client(url, key, transport=transport, max_retries=0))

    def run(*args: str):
        result = CliRunner().invoke(
            cli(), ["submit", str(model), *args, "--api-key", inprocess_api.admin_key, "--json"]
        )
        sent, transport.sent = transport.sent, []
        return result, [body for method, path, body in sent if (method, path) == ("POST", "/v1/jobs")], sent

    return run


def test_submit_sends_the_target_the_tolerance_and_the_constraints_given(submit, inprocess_api):
    result, [body], _ = submit(
        "--preset", "auto", "--target", "arm-cpu", "--max-accuracy-drop", "0.02", "--max-latency-ms", "2.5",
        "--max-size-mb", "10",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {k: body[k] for k in ("preset", "target", "max_accuracy_drop", "constraints")} == {
        "preset": "auto",
        "target": "arm-cpu",
        "max_accuracy_drop": 0.02,  # the tolerance's one flag, top-level
        "constraints": {"max_latency_ms": 2.5, "max_size_mb": 10.0},
    }
    job = inprocess_api.client.get(f"/v1/jobs/{json.loads(result.output)['job']['id']}").json()
    assert job["target"] == "arm-cpu" and job["max_accuracy_drop"] == 0.02
    assert job["constraints"] == {"max_accuracy_drop": 0.02, "max_latency_ms": 2.5, "max_size_mb": 10.0}
    # The service's report of the queued job prints: preset auto left out what needs datasets.
    report = inprocess_api.client.get(f"/v1/jobs/{job['id']}/report").json()
    assert any(line.startswith("* left out: quantize_int8") for line in report_table(report).splitlines())


def test_submit_sends_no_limits_it_was_not_given(submit):
    result, [body], sent = submit("--preset", "onnx", "--max-latency-ms", "3")
    assert result.exit_code == 0, result.output
    assert body["constraints"] == {"max_latency_ms": 3.0}
    assert not {"target", "max_accuracy_drop"} & set(body)
    assert [(method, path) for method, path, _ in sent] == [("POST", "/v1/models"), ("POST", "/v1/jobs")]
    result, [plain], _ = submit("--preset", "onnx")
    assert result.exit_code == 0 and not {"target", "max_accuracy_drop", "constraints"} & set(plain)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--target", "mips"], "'mips' is not one of"),
        (["--max-latency-ms", "0"], "--max-latency-ms"),
        (["--max-size-mb", "-1"], "--max-size-mb"),
        (["--max-accuracy-drop", "2"], "--max-accuracy-drop"),
    ],
)
def test_submit_refuses_a_target_or_limit_the_service_would_refuse_before_uploading(submit, args, words):
    result, _, sent = submit("--preset", "auto", *args)
    assert result.exit_code == 2 and words in result.output and sent == []


def test_a_preset_whose_artifact_runs_elsewhere_is_the_services_422(submit):
    result, [body], _ = submit("--preset", "openvino", "--target", "arm-cpu")
    assert result.exit_code == 2 and body["target"] == "arm-cpu"
    out = json.loads(result.stdout)
    assert out["code"] == "target_mismatch" and "not on the job's target arm-cpu" in out["error"]


def test_the_clis_targets_are_the_services():
    from typing import get_args

    from core.schemas import Target

    assert client_cli.TARGETS == get_args(Target)
