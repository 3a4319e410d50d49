"""Steps in child processes with limits, driven directly (no stack): a model that asks for 16 GiB
fails with "out of memory at step benchmark", one that never finishes is stopped at the wall-clock
or CPU-time limit, a cancel kills the step, a pass's own error comes back as itself, and nothing
of the step process is left running afterwards."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from core.errors import CvoptError, JobCancelled
from core.schemas import DetectionOptions, Preprocessing
from tests.hostile_models import endless_loop, memory_bomb
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.step_process import StepFailed, StepLimits, run_step_in_child, write_request

pytestmark = pytest.mark.integration

SPEC = [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
BENCH = {"batch_sizes": [1], "runs": 20, "warmup": 1, "max_seconds": 5}


def context(tmp_path: Path, model: Path, **kw) -> tuple[PassContext, ArtifactRef, list[float]]:
    progress: list[float] = []
    original = ArtifactRef(name=model.name, format="onnx", path=model)
    work = tmp_path / "step"
    work.mkdir(exist_ok=True)
    ctx = PassContext(
        work_dir=work,
        original=original,
        artifacts=[],
        input_spec=SPEC,
        preprocessing=Preprocessing(),
        report_progress=progress.append,
        **kw,
    )
    return ctx, original, progress


def run(ctx, source, name="benchmark", config=None, cancelled=lambda: False, **limits):
    return run_step_in_child(
        name=name,
        config=config or BENCH,
        source=source,
        ctx=ctx,
        limits=StepLimits(**limits),
        cancelled=cancelled,
        prewarm=False,
    )


@pytest.fixture
def mark(monkeypatch) -> str:
    """An environment variable the step processes inherit, to find them on the machine."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("CVOPT_TEST_MARK", value)
    return value


def processes_marked(value: str) -> list[int]:
    needle = f"CVOPT_TEST_MARK={value}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
            except OSError:
                continue
    return found


def test_a_normal_step_returns_its_result_and_progress(tmp_path, digit_assets):
    ctx, source, progress = context(tmp_path, digit_assets.models["onnx"])
    result = run(ctx, source, memory_mb=4096, cpu_seconds=600, timeout_seconds=120)
    latency = result.metrics["results"][0]["latency"]["1"]
    assert latency["p50_ms"] > 0 and result.artifact is None
    assert progress and progress[-1] == pytest.approx(1.0)


def test_a_memory_bomb_fails_the_step_as_out_of_memory(tmp_path):
    ctx, source, _ = context(tmp_path, memory_bomb(tmp_path / "bomb.onnx", gib=16))
    with pytest.raises(StepFailed) as failed:
        run(ctx, source, memory_mb=3072, timeout_seconds=120)
    assert failed.value.code == "out_of_memory"
    assert failed.value.message.startswith("out of memory at step benchmark")
    assert "Failed to allocate memory" in failed.value.log_text


def test_a_model_that_never_finishes_is_stopped_at_the_wall_clock_limit(tmp_path, mark):
    ctx, source, _ = context(tmp_path, endless_loop(tmp_path / "loop.onnx"))
    started = time.monotonic()
    with pytest.raises(StepFailed) as failed:
        run(ctx, source, timeout_seconds=4)
    assert failed.value.code == "step_timeout"
    assert failed.value.message.startswith("step benchmark exceeded 4 s")
    assert time.monotonic() - started < 4 + 15  # start-up, the limit, the grace period
    assert processes_marked(mark) == []


def test_a_model_that_spins_is_stopped_at_the_cpu_time_limit(tmp_path):
    ctx, source, _ = context(tmp_path, endless_loop(tmp_path / "loop.onnx"))
    with pytest.raises(StepFailed) as failed:
        run(ctx, source, cpu_seconds=3, timeout_seconds=120)
    assert failed.value.code == "step_cpu_limit"
    assert "exceeded its CPU-time limit of 3 s" in failed.value.message


def test_a_cancel_kills_the_step(tmp_path, mark):
    ctx, source, _ = context(tmp_path, endless_loop(tmp_path / "loop.onnx"))
    cancel = threading.Timer(2.0, lambda: None)
    cancel.start()
    with pytest.raises(JobCancelled):
        run(ctx, source, timeout_seconds=120, cancelled=lambda: not cancel.is_alive())
    assert processes_marked(mark) == []


def test_a_pass_error_comes_back_as_itself(tmp_path, digit_assets):
    calibration = DatasetRef(
        path=digit_assets.calibration_npz,
        format="npz",
        labeled=False,
        num_samples=256,
        layout="NCHW",
        sample_shape=[1, 28, 28],
    )
    ctx, source, _ = context(tmp_path, digit_assets.models["onnx"], calibration_dataset=calibration)
    with pytest.raises(CvoptError) as failed:
        run(ctx, source, name="quantize_int8", config={"op_types": ["NoSuchOp"]}, timeout_seconds=120)
    assert failed.value.code == "nothing_quantized" and not isinstance(failed.value, StepFailed)


def test_a_step_process_dies_with_its_worker(tmp_path, mark):
    """The worker SIGKILLed mid-step (the fault test's case): its step process must not run on."""
    import subprocess
    import sys

    loop = endless_loop(tmp_path / "loop.onnx")
    script = f"""
from pathlib import Path
from tests.test_step_process import context, run
ctx, source, _ = context(Path({str(tmp_path)!r}), Path({str(loop)!r}))
run(ctx, source, timeout_seconds=600)
"""
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while len(processes_marked(mark)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    step = [pid for pid in processes_marked(mark) if pid != worker.pid]
    assert step, "the step process never started"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_marked(mark) == []


def test_the_context_crosses_to_the_step_process_whole(tmp_path):
    """Every field of PassContext either travels (equal after the JSON round trip) or is one the
    step process makes itself; a field added to the context without either fails here."""
    original = ArtifactRef(name="m.onnx", format="onnx", path=tmp_path / "m.onnx", meta={"opset": 17})
    made = ArtifactRef("01-x.onnx", "onnx", tmp_path / "x.onnx", step="x", step_index=1, meta={"a": [1, 2]})
    data = DatasetRef(tmp_path / "d.zip", "zip", True, 8, "NCHW", [3, 4, 4], label_type="boxes")
    values = {
        "work_dir": tmp_path / "step",
        "original": original,
        "artifacts": [made, original],
        "input_spec": SPEC,
        "preprocessing": Preprocessing(letterbox=True, channel_order="BGR", mean=[0.5] * 3, std=[0.2] * 3),
        "task": "detection",
        "task_options": {"max_accuracy_drop": 0.02, "detection": DetectionOptions().model_dump(mode="json")},
        "calibration_dataset": data,
        "evaluation_dataset": dataclasses.replace(data, format="npz", labeled=False, label_type=None),
        "threads": 3,
        "shared_prefix": "tenants/t1/",
    }
    local = {
        "log": logging.getLogger("cvopt.pass.test"),
        "report_progress": lambda fraction: None,
        "check_cancelled": lambda: None,
        "fetch_shared": lambda key, dest: False,
        "store_shared": lambda key, path: None,
    }
    assert {f.name for f in dataclasses.fields(PassContext)} == set(values) | set(local)
    # Every value differs from its default, so that a field dropped on the way would show.
    defaults = PassContext(tmp_path, original, [], [], Preprocessing())
    assert all(getattr(defaults, k) != v for k, v in values.items() if k not in ("original", "work_dir"))

    ctx = PassContext(**values, **local)
    wire = json.loads(json.dumps(ctx.to_wire()))
    assert set(wire) == set(values)
    back = PassContext.from_wire(wire, **local)
    for name, value in values.items():
        assert getattr(back, name) == value, name
        assert type(getattr(back, name)) is type(value), name
    assert isinstance(back.original.path, Path) and isinstance(back.calibration_dataset.path, Path)
    for name, value in local.items():
        assert getattr(back, name) is value, name


def test_the_request_carries_the_source_and_the_context(tmp_path):
    source = ArtifactRef(name="m.onnx", format="onnx", path=tmp_path / "m.onnx", step="x", step_index=0)
    ctx = PassContext(tmp_path, source, [source], SPEC, Preprocessing(), task="classification")
    path = tmp_path / "step-request.json"
    write_request(path, name="benchmark", config=BENCH, source=source, ctx=ctx, limits=StepLimits(memory_mb=5))
    request = json.loads(path.read_text())
    assert request["pass"] == "benchmark" and request["config"] == BENCH
    assert request["limits"] == {"memory_mb": 5, "cpu_seconds": 0, "timeout_seconds": 0}
    assert PassContext.value_from_wire(ArtifactRef, request["source"]) == source
    assert PassContext.from_wire(request["context"]).artifacts == [source]
