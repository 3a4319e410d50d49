"""A PyTorch model compiled for an NVIDIA GPU without TensorRT, and the loaders for what that makes:
the mechanics behind the compile_gpu step and the runtime's AOTInductor and compiled-at-load
runners.

The model is cast to FP16 (or BF16) weights and activations, channels-last, exported with an open
batch, and compiled ahead of time by AOTInductor into a ``.pt2`` package that loads with
``torch._inductor.aoti_load_package`` (no Python model code, no compile at load). Inputs and
outputs stay FP32, so the package is a drop-in for the original.

An AOTInductor package that compiles can still crash the process that loads it (seen on one
driver/torch combination), so the package is loaded and checked in a child process first; when
that fails the low-precision ExportedProgram is the artifact instead, and the runtime compiles it
at load with torch.compile (CUDA graphs, "reduce-overhead"), saying so.

This module imports only torch, numpy, the standard library, core's plain-Python errors and format
names and the numpy fidelity metrics, so that bench/gpu.sh runs the service's own compile code on a
GPU machine's bare Python (tests/test_gpu_compile.py holds it to that).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import PassError
from core.formats import AOTI_PACKAGE, EXPORTED_PROGRAM
from worker.metrics.fidelity import snr_db

# The fidelity floor per precision when the job sets none (SNR of the first output, dB).
MIN_SNR_DB = {"fp16": 30.0, "bf16": 20.0, "fp32": 60.0}
# How long the child process may take to load and run a package.
CHILD_TIMEOUT_S = 600


@dataclass
class Compiled:
    """What compile_model made: the file, its format, the report's metrics and the runtime's meta."""

    path: Path
    format: str
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def torch_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def batch_norm_statistics_from(model, sample: Callable[[], Any], batches: int = 4):
    """``model`` (randomly initialised) in eval mode with its BatchNorm running statistics averaged over
    ``batches`` calls of ``sample()``, so that its activations have a trained model's scale: identity
    statistics let them grow through a residual stack, past FP16's range. For benchmarks and checks."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(sample())
    return model.eval()


def cast_module(module, precision: str, channels_last: bool):
    """``module`` wrapped to take FP32 NCHW, compute in ``precision`` (channels-last), return FP32."""
    import torch

    dtype = torch_dtype(precision)
    layout = torch.channels_last if channels_last else torch.preserve_format
    inner = copy.deepcopy(module).to(dtype=dtype, memory_format=layout)

    class Cast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            x = x.to(dtype)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.inner(x)
            return out.float() if isinstance(out, torch.Tensor) else type(out)(o.float() for o in out)

    return Cast().eval()


def export_low_precision(module, example: tuple, *, precision: str, channels_last: bool, max_batch: int):
    """(the module cast to ``precision`` and exported, whether its batch is open): open up to
    ``max_batch`` when the model allows it, else at the example's batch."""
    import torch

    low = cast_module(module, precision, channels_last)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        return torch.export.export(low, example, dynamic_shapes=({0: batch},)), True
    except Exception:  # torch.export raises several types; keep the example's batch
        return torch.export.export(low, example), False


def first_output(out) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def compile_model(
    module,
    example: tuple,
    reference: np.ndarray,
    *,
    work_dir: Path,
    precision: str = "fp16",
    channels_last: bool = True,
    max_batch: int = 64,
    package: str = "aoti",
    device: str = "cuda",
    min_snr_db: float | None = None,
    progress: Callable[[float], None] | None = None,
    warn: Callable[[str], None] | None = None,
    exported: tuple | None = None,
) -> Compiled:
    """Compile ``module`` (already on ``device``, FP32) for ``device``: an AOTInductor package
    checked in a child process, or (``package="exported_program"``, or when the package fails) the
    low-precision ExportedProgram for compile at load. ``reference`` is the FP32 model's first
    output on ``example``; a result whose SNR against it is under the floor is a PassError
    (``compile_mismatch``), never an artifact. ``exported``: export_low_precision's result, when
    the caller has it already (the benchmark makes both packages from one export)."""
    import torch

    work_dir = Path(work_dir)
    program, dynamic = exported or export_low_precision(
        module, example, precision=precision, channels_last=channels_last, max_batch=max_batch
    )
    if progress:
        progress(0.2)
    example_path = work_dir / "example.pt"
    torch.save({"x": example[0].cpu()}, example_path)
    floor = min_snr_db if min_snr_db is not None else MIN_SNR_DB[precision]
    facts = {
        "precision": precision,
        "device": device,
        "dynamic_batch": dynamic,
        "max_batch": max_batch if dynamic else None,
        "channels_last": channels_last,
        "min_snr_db": floor,
    }
    fallback_reason = None
    if package == "aoti":
        out = work_dir / f"model.{precision}.aoti.pt2"
        t0 = time.perf_counter()
        fallback_reason = aoti_package(program, out)
        compile_seconds = round(time.perf_counter() - t0, 1)
        if progress:
            progress(0.8)
        if fallback_reason is None:
            checked = check_in_child(out, example_path, device, work_dir)
            fallback_reason = checked.get("error")
        if fallback_reason is None:
            snr = _checked_snr(reference, checked["output"], floor, what="the compiled package")
            return Compiled(
                out,
                AOTI_PACKAGE,
                {
                    "package": "aoti",
                    **facts,
                    "snr_db": snr,
                    "compile_seconds": compile_seconds,
                    "load_seconds": checked["load_seconds"],
                },
                {"runtime": "aoti", "device": device, "precision": precision},
            )
        if warn:
            warn(f"falling back to an ExportedProgram compiled at load: {fallback_reason}")
    out = work_dir / f"model.{precision}.pt2"
    torch.export.save(program, str(out))
    with torch.no_grad():
        got = first_output(torch.export.load(str(out)).module()(*example))
    snr = _checked_snr(reference, got.float().cpu().numpy(), floor, what=f"the {precision} program")
    metrics = {"package": "exported_program", **facts, "snr_db": snr}
    metrics.pop("max_batch")
    if fallback_reason:
        metrics["warning"] = f"AOTInductor package not used ({fallback_reason}); the program is compiled at load"
    meta = {"runtime": "torch.compile", "device": device, "precision": precision, "compile_at_load": True}
    return Compiled(out, EXPORTED_PROGRAM, metrics, meta)


def _checked_snr(reference: np.ndarray, got: np.ndarray, floor: float, *, what: str) -> float:
    snr = snr_db(reference, got)
    if snr < floor:
        raise PassError(
            f"{what}'s outputs differ from the model's: SNR {snr:.1f} dB < {floor:g} dB", code="compile_mismatch"
        )
    return snr


def aoti_package(program, out: Path) -> str | None:
    """Compile ``program`` into an AOTInductor package at ``out``; None, or why it failed."""
    import torch

    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    except Exception as exc:  # Inductor raises many types; the fallback still serves the user
        return f"AOTInductor compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return None


_CHILD = """
import json, sys, time, torch
path, example, device, out = sys.argv[1:5]
t0 = time.perf_counter()
run = torch._inductor.aoti_load_package(path)
load = time.perf_counter() - t0
x = torch.load(example, weights_only=True)["x"].to(device)
with torch.no_grad():
    y = run(x)
y = y[0] if isinstance(y, (list, tuple)) else y
torch.save({"y": y.float().cpu()}, out)
print(json.dumps({"load_seconds": load}))
"""


def check_in_child(package: Path, example_path: Path, device: str, work_dir: Path) -> dict:
    """Load and run the package in a child process: a package that crashes its loader must not
    take the worker down with it. {"output", "load_seconds"}, or {"error": why}."""
    import torch

    out = Path(work_dir) / "child-output.pt"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(package), str(example_path), device, str(out)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"loading the AOTInductor package took over {CHILD_TIMEOUT_S} s"}
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return {"error": f"the AOTInductor package crashed its loader ({how}): {last}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output"] = torch.load(str(out), weights_only=True)["y"].numpy()
    return result


# -- loading ---------------------------------------------------------------------------------------


def load_aoti(path: Path):
    """An AOTInductor package as a callable (on the device it was compiled for)."""
    import torch

    return torch._inductor.aoti_load_package(str(path))


def compile_at_load(module, device: str):
    """The compiled-at-load runner: on CUDA, torch.compile with CUDA graphs ("reduce-overhead"),
    which removes the kernel-launch overhead that dominates batch 1; elsewhere the module as is."""
    import torch

    module = module.to(device)
    if device == "cuda":
        return torch.compile(module, mode="reduce-overhead")
    return module


def load_exported(path: Path, device: str):
    """A compile_gpu ExportedProgram (the fallback artifact) loaded and compiled at load."""
    import torch

    return compile_at_load(torch.export.load(str(path)).module(), device)
