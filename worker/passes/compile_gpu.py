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
from typing import Literal

from pydantic import Field

from core.errors import PassError
from worker.passes.base import (
    AOTI_PACKAGE,
    EXPORTED_PROGRAM,
    STATE_DICT,
    ArtifactRef,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)

MIN_SNR_DB = {"fp16": 30.0, "bf16": 20.0, "fp32": 60.0}


class CompileGpuConfig(PassConfig):
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    channels_last: bool = True
    max_batch: int = Field(default=64, ge=1, le=4096, description="Largest batch the package accepts.")
    package: Literal["aoti", "exported_program"] = Field(
        default="aoti", description="aoti: AOTInductor package; exported_program: FP16 program compiled at load."
    )
    device: Literal["cuda", "cpu"] = Field(
        default="cuda", description="cpu builds a CPU AOTInductor package (for tests and CPU-only deployments)."
    )
    min_snr_db: float | None = Field(default=None, description="Fidelity floor; default 30 dB (fp16), 20 (bf16).")


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


class CompileGpu(Pass):
    name = "compile_gpu"
    version = 1
    description = "PyTorch to an FP16/BF16 channels-last AOTInductor package for NVIDIA GPUs (gpu queue)."
    Config = CompileGpuConfig
    accepts = frozenset({EXPORTED_PROGRAM, STATE_DICT})
    produces = AOTI_PACKAGE
    queue = "gpu"

    def step_queue(self, config: CompileGpuConfig) -> str:
        return "gpu" if config.device == "cuda" else "cpu"

    def run(self, ctx: PassContext, source: ArtifactRef, config: CompileGpuConfig) -> PassResult:
        import torch

        from worker.metrics.fidelity import snr_db
        from worker.runtime import sample_tensors
        from worker.torch_models import load_module

        if config.device == "cuda" and not torch.cuda.is_available():
            raise PassError("compile_gpu needs a CUDA GPU and this worker has none", code="no_gpu")
        if len(ctx.input_spec) != 1:
            raise PassError("compile_gpu takes single-input models", code="unsupported_model")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.precision]
        device = torch.device(config.device)
        module = load_module(source).to(device)
        with torch.no_grad():
            try:  # an open batch, if the model allows one
                example = tuple(t.to(device) for t in sample_tensors(ctx.input_spec, batch=2))
                reference = module(*example)
            except Exception:  # a program exported with its batch fixed guards it
                example = tuple(t.to(device) for t in sample_tensors(ctx.input_spec))
                reference = module(*example)
            reference = reference[0] if isinstance(reference, (tuple, list)) else reference
            reference = reference.float().cpu().numpy()
        low = _Cast(
            copy.deepcopy(module).to(
                dtype=dtype, memory_format=torch.channels_last if config.channels_last else torch.preserve_format
            ),
            dtype,
            config.channels_last,
        ).eval()
        batch = torch.export.Dim("batch", min=1, max=config.max_batch)
        try:
            program = torch.export.export(low, example, dynamic_shapes=({0: batch},))
            dynamic = True
        except Exception:  # torch.export raises several types; keep the example's batch
            program = torch.export.export(low, example)
            dynamic = False
        ctx.report_progress(0.2)
        example_path = ctx.work_dir / "example.pt"
        torch.save({"x": example[0].cpu()}, example_path)
        floor = config.min_snr_db if config.min_snr_db is not None else MIN_SNR_DB[config.precision]
        fallback_reason = None
        if config.package == "aoti":
            out = ctx.work_dir / f"model.{config.precision}.aoti.pt2"
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(out))
            except Exception as exc:  # Inductor raises many types; the fallback still serves the user
                fallback_reason = f"AOTInductor compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ctx.report_progress(0.8)
            if fallback_reason is None:
                checked = _check_in_child(out, example_path, config.device, ctx.work_dir)
                if "error" in checked:
                    fallback_reason = checked["error"]
                else:
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
            ctx.log.warning("falling back to an ExportedProgram compiled at load: %s", fallback_reason)
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
