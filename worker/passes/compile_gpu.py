"""compile_gpu: a PyTorch model compiled for NVIDIA GPUs without TensorRT: FP16 (or BF16)
weights and activations, channels-last, compiled ahead of time by AOTInductor into a ``.pt2``
package, checked in a child process, with the FP16 ExportedProgram compiled at load as the
fallback. The mechanics are in worker.gpu_compile (torch only, so that bench/gpu.sh and
``cvopt doctor --gpu`` run them on a GPU machine's bare Python); this is the step around them.
"""

from __future__ import annotations

from core.errors import PassError
from core.steps.compile_gpu import CompileGpuConfig, CompileGpuSpec
from worker.gpu_compile import compile_model, first_output
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


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
        compiled = compile_model(
            module,
            example,
            reference,
            work_dir=ctx.work_dir,
            precision=config.precision,
            channels_last=config.channels_last,
            max_batch=config.max_batch,
            package=config.package,
            device=config.device,
            min_snr_db=config.min_snr_db,
            progress=ctx.report_progress,
            warn=ctx.log.warning,
        )
        return PassResult(artifact=compiled.path, format=compiled.format, metrics=compiled.metrics, meta=compiled.meta)


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
        return example, first_output(reference).float().cpu().numpy()
