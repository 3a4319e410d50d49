"""compile_gpu: a PyTorch model compiled for NVIDIA GPUs without TensorRT: FP16 (or BF16)
weights and activations, channels-last, compiled ahead of time by AOTInductor into a ``.pt2``
package that loads with ``torch._inductor.aoti_load_package`` (no Python model code, no
compile at load). Inputs and outputs stay FP32, so it is a drop-in for the original.

An AOTInductor package that compiles can still crash the process that loads it (seen on one
driver/torch combination), so the package is loaded and checked in a child process first; when
that fails the step falls back to the FP16 ExportedProgram, which the runtime compiles at load
with torch.compile (CUDA graphs at batch 1), and says so.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

from core.errors import PassError
from core.formats import AOTI_PACKAGE, EXPORTED_PROGRAM
from core.steps.compile_gpu import CompileGpuConfig, CompileGpuSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult

MIN_SNR_DB = {"fp16": 30.0, "bf16": 20.0, "fp32": 60.0}


class _Cast:
    """Wrap a module: FP32 NCHW in, compute in ``dtype`` (channels-last), FP32 out."""

    def __new__(cls, module, dtype, channels_last: bool):
        import torch

        class Cast(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, x):
                x = x.to(dtype)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = self.inner(x)
                return out.float() if isinstance(out, torch.Tensor) else type(out)(o.float() for o in out)

        return Cast()


class CompileGpu(CompileGpuSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: CompileGpuConfig) -> PassResult:
        import torch

        from worker.torch_models import load_module

        if config.device == "cuda" and not torch.cuda.is_available():
            raise PassError("compile_gpu needs a CUDA GPU and this worker has none", code="no_gpu")
        if len(ctx.input_spec) != 1:
            raise PassError("compile_gpu takes single-input models", code="unsupported_model")
        module = load_module(source).to(torch.device(config.device))
        example, reference = _reference_outputs(ctx, module, config.device)
        program, dynamic = _export_low_precision(module, example, config)
        ctx.report_progress(0.2)
        example_path = ctx.work_dir / "example.pt"
        torch.save({"x": example[0].cpu()}, example_path)
        floor = config.min_snr_db if config.min_snr_db is not None else MIN_SNR_DB[config.precision]
        fallback_reason = None
        if config.package == "aoti":
            packaged = _aoti_package(ctx, config, program, example_path, reference, floor=floor, dynamic=dynamic)
            if isinstance(packaged, PassResult):
                return packaged
            fallback_reason = packaged
            ctx.log.warning("falling back to an ExportedProgram compiled at load: %s", fallback_reason)
        return _exported_program(
            ctx, config, program, example, reference, floor=floor, dynamic=dynamic, fallback_reason=fallback_reason
        )


def _reference_outputs(ctx: PassContext, module, device: str) -> tuple[tuple, object]:
    """(example inputs on ``device``, the FP32 model's first output on them as numpy): batch 2 when the
    model takes an open batch, so the export can keep it open."""
    import torch

    from worker.data import sample_tensors

    with torch.no_grad():
        try:  # an open batch, if the model allows one
            example = tuple(t.to(device) for t in sample_tensors(ctx.input_spec, batch=2))
            reference = module(*example)
        except Exception:  # a program exported with its batch fixed guards it
            example = tuple(t.to(device) for t in sample_tensors(ctx.input_spec))
            reference = module(*example)
        reference = reference[0] if isinstance(reference, (tuple, list)) else reference
        return example, reference.float().cpu().numpy()


def _export_low_precision(module, example: tuple, config: CompileGpuConfig) -> tuple[object, bool]:
    """(the module cast to the config's precision and layout, exported; whether its batch is open)."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.precision]
    layout = torch.channels_last if config.channels_last else torch.preserve_format
    low = _Cast(copy.deepcopy(module).to(dtype=dtype, memory_format=layout), dtype, config.channels_last).eval()
    batch = torch.export.Dim("batch", min=1, max=config.max_batch)
    try:
        return torch.export.export(low, example, dynamic_shapes=({0: batch},)), True
    except Exception:  # torch.export raises several types; keep the example's batch
        return torch.export.export(low, example), False


def _aoti_package(ctx, config, program, example_path, reference, *, floor: float, dynamic: bool) -> PassResult | str:
    """The AOTInductor package, checked in a child process; or why it cannot be used (the caller falls
    back to the ExportedProgram). A package that runs but disagrees with the model is an error."""
    import torch

    from worker.metrics.fidelity import snr_db

    out = ctx.work_dir / f"model.{config.precision}.aoti.pt2"
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    except Exception as exc:  # Inductor raises many types; the fallback still serves the user
        return f"AOTInductor compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        ctx.report_progress(0.8)
    checked = _check_in_child(out, example_path, config.device, ctx.work_dir)
    if "error" in checked:
        return checked["error"]
    snr = snr_db(reference, checked["output"])
    if snr < floor:
        raise PassError(
            f"the compiled package's outputs differ from the model's: SNR {snr:.1f} dB < {floor:g} dB",
            code="compile_mismatch",
        )
    return PassResult(
        artifact=out,
        format=AOTI_PACKAGE,
        metrics={
            "package": "aoti",
            "precision": config.precision,
            "device": config.device,
            "dynamic_batch": dynamic,
            "max_batch": config.max_batch if dynamic else None,
            "channels_last": config.channels_last,
            "snr_db": snr,
            "min_snr_db": floor,
            "load_seconds": checked["load_seconds"],
        },
        meta={"runtime": "aoti", "device": config.device, "precision": config.precision},
    )


def _exported_program(
    ctx, config, program, example, reference, *, floor: float, dynamic: bool, fallback_reason: str | None
) -> PassResult:
    """The low-precision ExportedProgram, which the runtime compiles at load, checked against the model."""
    import torch

    from worker.metrics.fidelity import snr_db

    out = ctx.work_dir / f"model.{config.precision}.pt2"
    torch.export.save(program, str(out))
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(*example)
    snr = snr_db(reference, got.float().cpu().numpy())
    if snr < floor:
        raise PassError(
            f"the {config.precision} program's outputs differ from the model's: SNR {snr:.1f} dB < {floor:g} dB",
            code="compile_mismatch",
        )
    metrics = {
        "package": "exported_program",
        "precision": config.precision,
        "device": config.device,
        "dynamic_batch": dynamic,
        "channels_last": config.channels_last,
        "snr_db": snr,
        "min_snr_db": floor,
    }
    if fallback_reason:
        metrics["warning"] = f"AOTInductor package not used ({fallback_reason}); the program is compiled at load"
    return PassResult(
        artifact=out,
        format=EXPORTED_PROGRAM,
        metrics=metrics,
        meta={
            "runtime": "torch.compile",
            "device": config.device,
            "precision": config.precision,
            "compile_at_load": True,
        },
    )


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


def _check_in_child(package, example_path, device: str, work_dir) -> dict:
    """Load and run the package in a child process: a package that crashes its loader must not
    take the worker down with it."""
    import torch

    out = work_dir / "child-output.pt"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(package), str(example_path), device, str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return {"error": "loading the AOTInductor package took over 600 s"}
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return {"error": f"the AOTInductor package crashed its loader ({how}): {last}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output"] = torch.load(str(out), weights_only=True)["y"].numpy()
    return result
