"""``cvopt doctor``: the runtime checks run for real here; the GPU checks' compile_gpu part runs on
the CPU (FP32 packages), and the TensorRT part runs every step up to the engine build, which needs
a GPU and TensorRT (neither can be had here: the build is where it stops, and the test says so)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.errors import PassError
from worker import doctor


def cvopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvopt.cli", "doctor", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration
def test_doctor_runs_each_runtime_and_on_a_machine_without_a_gpu_fails_saying_what_waits():
    proc = cvopt("--gpu", "--json")  # one run for both halves: importing TensorFlow alone takes ~15 s
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    runtimes = ["cpu", "onnxruntime", "openvino", "litert", "tensorflow", "torch"]
    assert list(checks)[: len(runtimes)] == runtimes
    assert all(checks[n]["status"] == "ok" for n in runtimes), {n: checks[n]["detail"] for n in runtimes}
    assert "CPUExecutionProvider" in checks["onnxruntime"]["facts"]["providers"]
    assert checks["cpu"]["facts"]["cpu_count"] >= 1 and isinstance(checks["cpu"]["facts"]["vnni"], bool)
    assert checks["gpu"]["status"] == "fail" and "no CUDA GPU" in checks["gpu"]["detail"]
    waiting = [n for n in doctor.GPU_CHECK_NAMES if n != "gpu"]
    assert list(checks)[len(runtimes) :] == ["gpu", *waiting]
    assert all(checks[n]["status"] == "skip" and checks[n]["detail"] == "needs a CUDA GPU" for n in waiting)


def test_a_missing_optional_runtime_is_a_skip_and_a_broken_one_a_failure(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'openvino'", name="openvino")

    def broken():
        raise ModuleNotFoundError("No module named 'openvino._pyopenvino'", name="openvino._pyopenvino")

    def wrong():
        raise PassError("it ran but gave 0.0, not 2.7", code="wrong_answer")

    skipped = doctor._timed_check("openvino", missing, optional=("openvino", "worker"))
    assert skipped.status == doctor.SKIP and skipped.detail == "not installed (pip extra [worker])"
    assert doctor._timed_check("openvino", broken, optional=("openvino", "worker")).status == doctor.SKIP
    other = doctor._timed_check("openvino", lambda: (_ for _ in ()).throw(ModuleNotFoundError(name="numpy")))
    assert other.status == doctor.FAIL
    failed = doctor._timed_check("x", wrong)
    assert failed.status == doctor.FAIL and failed.detail == "PassError (wrong_answer): it ran but gave 0.0, not 2.7"
    assert "traceback" in failed.facts
    text = doctor.render([skipped, failed])
    assert text.splitlines()[-1] == "1 of 2 checks passed or skipped; failed: x"


def test_gpu_checks_without_cuda_skip_tensorrt(monkeypatch, tmp_path):
    """With device cpu (the tests' logic check) the compile checks run and TensorRT waits for CUDA."""
    ran = []
    monkeypatch.setattr(
        doctor._Fixture, "compile_gpu", lambda self, package, precision: ran.append(package) or ("", {})
    )
    checks = {c.name: c for c in doctor.gpu_checks(tmp_path, device="cpu", precision="fp32")}
    assert list(checks) == ["compile_gpu", "compile_gpu fallback", "tensorrt", "tensorrt fp16", "tensorrt int8"]
    assert ran == ["aoti", "exported_program"]
    assert checks["tensorrt"].status == doctor.SKIP and checks["tensorrt int8"].detail == "needs TensorRT"


@pytest.mark.integration
def test_the_compile_check_measures_the_runtimes_artifact(tmp_path):
    """The fallback check on the CPU: the real step, the runtime's loader, SNR against the FP32
    model, timings at each batch (the AOTInductor package is the same path with the other package;
    compiling one for a ResNet-18 takes 100 s on 2 cores, so tests/test_gpu_compile.py compiles a
    small net instead)."""
    fixture = doctor._Fixture(tmp_path, device="cpu", size=64)
    detail, facts = fixture.compile_gpu("exported_program", "fp32")
    assert facts["format"] == "exported_program" and facts["snr_db"] >= 60
    assert set(facts["p50_ms"]) == set(doctor.TIMED_BATCHES) and all(v > 0 for v in facts["p50_ms"].values())
    assert facts["step"]["package"] == "exported_program" and facts["step"]["dynamic_batch"] is True
    assert detail.startswith("exported_program, SNR") and detail.endswith("(perf_counter)")


@pytest.mark.integration
def test_the_tensorrt_checks_run_every_step_before_the_engine(tmp_path):
    """export_onnx, then quantize_int8 as preset tensorrt-int8 has it on the doctor's calibration set;
    build_tensorrt then stops for want of a GPU (TensorRT and a GPU cannot be had here)."""
    fixture = doctor._Fixture(tmp_path, device="cpu", size=64)
    import onnx

    assert fixture.tensorrt_source("fp16") == fixture.onnx() and fixture.onnx().format == "onnx"
    model = onnx.load(str(fixture.tensorrt_source("int8").path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    zero_points = [i for i in model.graph.initializer if "zero_point" in i.name]
    # int8 activations and weights (int32 for biases), as TensorRT's explicit quantization wants
    assert zero_points and {onnx.numpy_helper.to_array(z).dtype.name for z in zero_points} == {"int8", "int32"}
    assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric: zero points 0
    for precision in ("fp16", "int8"):
        with pytest.raises(PassError) as err:
            fixture.tensorrt(precision)
        assert err.value.code == "no_gpu"
