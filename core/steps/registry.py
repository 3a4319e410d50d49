"""The one registry of pass specs, by step name. The worker's registry (worker.passes.registry) maps the
same names to the passes that implement them; a test keeps the two in step."""

from __future__ import annotations

from typing import Any

from core.errors import InvalidInput
from core.steps.base import PassSpec
from core.steps.benchmark import BenchmarkSpec
from core.steps.build_tensorrt import BuildTensorrtSpec
from core.steps.compile_gpu import CompileGpuSpec
from core.steps.convert_fp16 import ConvertFp16Spec
from core.steps.convert_openvino import ConvertOpenvinoSpec
from core.steps.convert_tflite import ConvertTfliteSpec
from core.steps.distill import DistillSpec
from core.steps.evaluate import EvaluateSpec
from core.steps.export_onnx import ExportOnnxSpec
from core.steps.export_pt2 import ExportPt2Spec
from core.steps.finetune import FinetuneSpec
from core.steps.prune_structured import PruneStructuredSpec
from core.steps.prune_unstructured import PruneUnstructuredSpec
from core.steps.quantize_int8 import QuantizeInt8Spec
from core.steps.quantize_int8_torch import QuantizeInt8TorchSpec
from core.steps.quantize_openvino import QuantizeOpenvinoSpec
from core.steps.quantize_qat import QuantizeQatSpec

SPECS: dict[str, type[PassSpec[Any]]] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec,
        BuildTensorrtSpec,
        CompileGpuSpec,
        ConvertFp16Spec,
        ConvertOpenvinoSpec,
        ConvertTfliteSpec,
        DistillSpec,
        EvaluateSpec,
        ExportOnnxSpec,
        ExportPt2Spec,
        FinetuneSpec,
        PruneStructuredSpec,
        PruneUnstructuredSpec,
        QuantizeInt8Spec,
        QuantizeInt8TorchSpec,
        QuantizeOpenvinoSpec,
        QuantizeQatSpec,
    )
}


def unknown_step(name: str) -> InvalidInput:
    return InvalidInput(
        f"unknown step {name!r}", code="unknown_step", details={"step": name, "known_steps": sorted(SPECS)}
    )


def get_spec(name: str) -> type[PassSpec[Any]]:
    """The spec of step ``name``; an unknown name is the API's 422 unknown_step."""
    try:
        return SPECS[name]
    except KeyError:
        raise unknown_step(name) from None
