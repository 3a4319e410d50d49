"""The GPU steps on a real CUDA GPU: skipped where torch sees none (every development machine so
far; bench/gpu.sh and ``cvopt doctor --gpu`` are the checks for a lent GPU machine, which lacks
this venv). On a GPU machine with the dev extra: ``pytest tests/test_gpu_cuda.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_passes import context, run_pass
from worker.metrics.fidelity import snr_db
from worker.passes.base import ArtifactRef
from worker.runtime import load_runner, runtime_info

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here")


def _check(result, original: ArtifactRef, digit_assets) -> None:
    ref = ArtifactRef(result.artifact.name, result.format, result.artifact, meta=dict(result.meta))
    runner = load_runner(ref, device="cuda")
    feeds = {"image": digit_assets.x[:1].astype(np.float32)}  # this upload was exported at batch 1
    want = load_runner(original, device="cpu")(feeds)[0]
    assert snr_db(want, runner(feeds)[0]) >= 30
    samples = runner.time_ms(feeds, runs=10, warmup=3)  # CUDA events on device-resident inputs
    assert len(samples) == 10 and all(0 < s < 1000 for s in samples)
    assert runtime_info(ref, device="cuda")["gpu"] == torch.cuda.get_device_name(0)


def test_compile_gpu_fp16_package_on_cuda(digit_assets, tmp_path):
    original = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    result = run_pass("compile_gpu", context(tmp_path, original), original, precision="fp16", max_batch=8)
    assert result.format == "aoti_package", result.metrics.get("warning")
    assert result.metrics["device"] == "cuda" and result.metrics["snr_db"] >= 30
    _check(result, original, digit_assets)


def test_compile_gpu_fallback_compiles_at_load_on_cuda(digit_assets, tmp_path):
    original = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    result = run_pass(
        "compile_gpu", context(tmp_path, original), original, precision="fp16", package="exported_program"
    )
    assert result.format == "exported_program" and result.meta["compile_at_load"] is True
    _check(result, original, digit_assets)


def test_doctor_gpu_checks_pass_on_this_gpu(tmp_path):
    from worker import doctor

    checks = {c.name: c for c in doctor.gpu_checks(tmp_path)}
    assert checks["gpu"].status == doctor.OK
    for name in ("compile_gpu", "compile_gpu fallback"):
        assert checks[name].status == doctor.OK, checks[name].detail
        assert checks[name].detail.endswith("(CUDA events)")
    if checks["tensorrt"].status == doctor.OK:  # where the worker image's TensorRT is installed
        assert checks["tensorrt fp16"].status == checks["tensorrt int8"].status == doctor.OK
