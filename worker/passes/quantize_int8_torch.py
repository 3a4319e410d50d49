"""quantize_int8_torch: the PyTorch path users know. FX graph mode post-training quantization
(Conv-BN-ReLU fused, qconfig x86 / fbgemm / qnnpack, observers calibrated on the job's images,
converted to quantized kernels), saved as TorchScript.

It needs the model's Python modules, so it takes a state_dict of a torchvision architecture;
graphs that are already exported (.pt2, TorchScript) go through quantize_int8 (ONNX Runtime).
"""

from __future__ import annotations

import warnings

from core.errors import PassError
from core.formats import TORCHSCRIPT
from core.steps.quantize_int8_torch import QuantizeInt8TorchConfig, QuantizeInt8TorchSpec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


class QuantizeInt8Torch(QuantizeInt8TorchSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: QuantizeInt8TorchConfig) -> PassResult:
        import torch
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        from worker.data import iter_batches, sample_tensors
        from worker.torch_models import module_from_state_dict

        if ctx.calibration_dataset is None:
            raise PassError("quantize_int8_torch needs a calibration dataset", code="calibration_dataset_required")
        torch.backends.quantized.engine = config.backend
        module = module_from_state_dict(source)
        example = sample_tensors(ctx.input_spec)
        seen = 0
        total = min(config.num_calibration_samples, ctx.calibration_dataset.num_samples)
        with warnings.catch_warnings():
            # FX quantization is deprecated in favour of PT2E (torchao); it is still the path
            # that gives eager CPU kernels, and its warnings say nothing to the user.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                prepared = prepare_fx(module, get_default_qconfig_mapping(config.backend), example)
            except Exception as exc:  # FX tracing fails on data-dependent control flow
                raise PassError(
                    f"the model cannot be traced for PyTorch quantization: {str(exc).splitlines()[0]}; "
                    "use quantize_int8 (ONNX Runtime) instead",
                    code="not_traceable",
                ) from exc
            with torch.inference_mode():
                for x, _ in iter_batches(
                    ctx.calibration_dataset,
                    ctx.input_spec[0],
                    ctx.preprocessing,
                    batch_size=config.batch_size,
                    limit=total,
                ):
                    ctx.check_cancelled()
                    prepared(torch.from_numpy(x))
                    seen += len(x)
                    ctx.report_progress(0.8 * seen / total)
            quantized = convert_fx(prepared)
            with torch.inference_mode():
                scripted = torch.jit.trace(quantized, example, check_trace=False)
            # TorchScript is deprecated too, but it is what runs quantized CPU kernels without
            # the Python model code (an ExportedProgram of them does not round-trip here).
            out = ctx.work_dir / "model.int8.ts"
            torch.jit.save(scripted, str(out))
        quantized_modules = sum(
            1
            for m in quantized.modules()
            if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
        )
        if quantized_modules == 0:
            raise PassError("nothing in the model could be quantized", code="nothing_quantized")
        return PassResult(
            artifact=out,
            format=TORCHSCRIPT,
            metrics={"backend": config.backend, "calibration_samples": seen, "quantized_modules": quantized_modules},
        )
