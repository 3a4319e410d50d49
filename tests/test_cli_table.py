"""The client's report table, in process: every report shape a preset can produce prints
(nulls, "inf" SNRs, artifacts that could not be measured, no throughput, an accuracy of 0.0),
never a traceback. The same table printed by ``cvopt submit --wait`` against the running
service, once per preset family, is in test_client.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cvopt import client_cli
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
