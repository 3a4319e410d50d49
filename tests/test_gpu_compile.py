"""bench/gpu.sh's Python side, on the CPU: bench/gpu.py and the compile code it shares with the
compile_gpu step (worker.gpu_compile) must run on a GPU machine's bare Python, which has torch,
numpy, onnx and onnxruntime but not this repo's venv (no pydantic, SQLAlchemy, torchvision...).

Here they run in a venv that holds only those packages (the processes it starts, the compile and
check children included, are as bare), at FP32 on the CPU: the
AOTInductor package, its child-process check, the compiled-at-load fallback, the interleaved
timing and the partial JSON. The CUDA side (CUDA events, FP16, CUDA graphs) waits for a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What the lent GPU machine's Python has: torch and its dependencies, numpy, onnx, onnxruntime and
# theirs. This repo's core/ and worker/ travel with the working tree; bench/ is loaded by path.
BARE_GPU_MACHINE = {
    "torch", "torchgen", "functorch", "triton", "nvidia", "cuda", "sympy", "mpmath", "networkx", "jinja2",
    "markupsafe", "filelock", "fsspec", "typing_extensions", "setuptools", "pkg_resources", "_distutils_hack",
    "numpy", "onnx", "google", "protobuf", "ml_dtypes", "onnxruntime", "coloredlogs", "humanfriendly",
    "flatbuffers", "packaging",
}  # fmt: skip


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python like the GPU machine's: a venv of its own (so the processes it starts are bare too)
    whose site-packages links only the packages above from this venv's."""
    root = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        top = entry.name.split("-")[0] if entry.name.endswith(".dist-info") else entry.name.split(".")[0]
        if top.lower() in BARE_GPU_MACHINE:
            (site / entry.name).symlink_to(entry)
    return python


def run_bare(python: Path, *args: str, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("PYTHONPATH", None)
    return subprocess.run([python, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_bare_python_lacks_the_venv_and_has_the_compile_code(bare_python, tmp_path):
    for module in ("pydantic", "torchvision", "sqlalchemy"):
        proc = run_bare(bare_python, "-c", f"import {module}", tmp_path=tmp_path)
        assert proc.returncode != 0 and f"No module named '{module}'" in proc.stderr
    ok = run_bare(bare_python, "-c", "import worker.gpu_compile, onnx, onnxruntime", tmp_path=tmp_path)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.integration
def test_bench_gpu_runs_on_a_bare_python_and_writes_its_table(bare_python, tmp_path):
    out = tmp_path / "gpu-bench.json"
    args = ["bench/gpu.py", "--device", "cpu", "--models", "tiny", "--batches", "1,2"]
    args += ["--rounds", "2", "--iters", "2", "--budget-s", "400", "--out", str(out)]
    proc = run_bare(bare_python, *args, tmp_path=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = json.loads(out.read_text())
    compiled = log["compile"]["tiny"]
    assert compiled["errors"] == {}, compiled["errors"]
    assert compiled["aoti"]["format"] == "aoti_package" and compiled["aoti"]["metrics"]["dynamic_batch"] is True
    assert compiled["aoti"]["metrics"]["snr_db"] >= 60 and compiled["aoti"]["metrics"]["load_seconds"] > 0
    assert compiled["exported_program"]["format"] == "exported_program"
    rows = {(r["batch"], r["variant"]): r for r in log["rows"]}
    for batch in (1, 2):
        for variant in ("fp32 eager", "fp32 eager channels-last", "aoti fp32", "fp32 compiled at load"):
            row = rows[(batch, variant)]
            assert row["ms"] > 0 and row["images_per_s"] > 0
            assert row["snr_db_vs_fp32"] >= 60, row  # FP32 everywhere: the same numbers, give or take
        assert rows[(batch, "fp32 eager")]["speedup_vs_fp32_eager"] == 1.0
    assert not log.get("errors"), log.get("errors")
    assert "| 2 | aoti fp32 |" in proc.stdout and log["machine"]["cuda_device"] is False


@pytest.mark.integration
def test_bench_gpu_over_its_budget_still_returns_what_it_has(bare_python, tmp_path):
    """A budget too short for the compiles: they are stopped (their children too), the eager rows
    are timed all the same, and the JSON says what was cut."""
    out = tmp_path / "gpu-bench.json"
    args = ["bench/gpu.py", "--device", "cpu", "--models", "tiny", "--batches", "1", "--rounds", "1"]
    args += ["--iters", "1", "--budget-s", "85", "--out", str(out)]  # compiles stopped after ~10 s
    proc = run_bare(bare_python, *args, tmp_path=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = json.loads(out.read_text())  # strict JSON: json.loads would take NaN, the check below would not
    assert "NaN" not in out.read_text() and "Infinity" not in out.read_text()
    assert "not finished (stopped at the budget)" in log["compile"]["tiny"]["errors"]["compile"]
    variants = {r["variant"] for r in log["rows"]}
    assert {"fp32 eager", "fp32 eager channels-last"} <= variants and "aoti fp32" not in variants
    assert log["seconds"] < 85 + 30


# -- worker.gpu_compile's branches, on a small model on the CPU --------------------------------------


@pytest.fixture()
def small(tmp_path):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    example = (torch.rand(2, 3, 8, 8),)
    with torch.no_grad():
        return model, example, model(*example).numpy()


def test_a_failed_aoti_compile_falls_back_and_says_why(small, tmp_path, monkeypatch):
    from worker import gpu_compile

    monkeypatch.setattr(gpu_compile, "aoti_package", lambda program, out: "AOTInductor compile failed: boom")
    warned = []
    compiled = gpu_compile.compile_model(
        *small, work_dir=tmp_path, precision="fp32", max_batch=4, device="cpu", warn=warned.append
    )
    assert compiled.format == "exported_program" and compiled.meta["compile_at_load"] is True
    assert compiled.metrics["warning"] == (
        "AOTInductor package not used (AOTInductor compile failed: boom); the program is compiled at load"
    )
    assert warned == ["falling back to an ExportedProgram compiled at load: AOTInductor compile failed: boom"]
    assert compiled.metrics["dynamic_batch"] is True and "max_batch" not in compiled.metrics


def test_a_package_that_crashes_its_loader_falls_back(small, tmp_path, monkeypatch):
    from worker import gpu_compile

    monkeypatch.setattr(gpu_compile, "aoti_package", lambda program, out: None)
    crashed = {"error": "the AOTInductor package crashed its loader (signal 11): "}
    monkeypatch.setattr(gpu_compile, "check_in_child", lambda *a: crashed)
    compiled = gpu_compile.compile_model(*small, work_dir=tmp_path, precision="fp32", max_batch=4, device="cpu")
    assert compiled.format == "exported_program" and "crashed its loader (signal 11)" in compiled.metrics["warning"]


def test_a_program_that_disagrees_with_the_model_is_an_error_not_an_artifact(small, tmp_path):
    from core.errors import PassError
    from worker import gpu_compile

    model, example, reference = small
    with pytest.raises(PassError) as err:
        gpu_compile.compile_model(
            model, example, reference + 1.0, work_dir=tmp_path, package="exported_program", device="cpu"
        )
    assert err.value.code == "compile_mismatch" and "< 30 dB" in str(err.value)
