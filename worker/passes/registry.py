"""The one registry of pass implementations, by step name: the passes that implement core.steps'
specs, imported explicitly. Tests check that every module under worker/passes/ gives exactly one pass
here, and that every spec has exactly one implementation (same name, same version) and vice versa."""

from __future__ import annotations

from core.steps.registry import get_spec
from worker.passes.base import Pass
from worker.passes.benchmark import Benchmark
from worker.passes.build_tensorrt import BuildTensorrt
from worker.passes.compile_gpu import CompileGpu
from worker.passes.convert_fp16 import ConvertFp16
from worker.passes.convert_openvino import ConvertOpenvino
from worker.passes.convert_tflite import ConvertTflite
from worker.passes.distill import Distill
from worker.passes.evaluate import Evaluate
from worker.passes.export_onnx import ExportOnnx
from worker.passes.export_pt2 import ExportPt2
from worker.passes.finetune import Finetune
from worker.passes.prune_structured import PruneStructured
from worker.passes.prune_unstructured import PruneUnstructured
from worker.passes.quantize_int8 import QuantizeInt8
from worker.passes.quantize_int8_torch import QuantizeInt8Torch
from worker.passes.quantize_openvino import QuantizeOpenvino
from worker.passes.quantize_qat import QuantizeQat

REGISTRY: dict[str, type[Pass]] = {
    implementation.name: implementation
    for implementation in (
        Benchmark,
        BuildTensorrt,
        CompileGpu,
        ConvertFp16,
        ConvertOpenvino,
        ConvertTflite,
        Distill,
        Evaluate,
        ExportOnnx,
        ExportPt2,
        Finetune,
        PruneStructured,
        PruneUnstructured,
        QuantizeInt8,
        QuantizeInt8Torch,
        QuantizeOpenvino,
        QuantizeQat,
    )
}


def get_pass(name: str) -> type[Pass]:
    """The pass that runs step ``name``; an unknown name is the same unknown_step error as get_spec's."""
    return REGISTRY[get_spec(name).name]
