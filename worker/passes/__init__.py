"""One module per pass. Importing this package registers them all (and imports no heavy
library: torch, onnxruntime and friends are imported inside each pass's run())."""

from worker.passes import (  # noqa: F401
    benchmark,
    build_tensorrt,
    compile_gpu,
    convert_fp16,
    convert_tflite,
    distill,
    evaluate,
    export_onnx,
    export_pt2,
    finetune,
    prune_structured,
    prune_unstructured,
    quantize_int8,
    quantize_int8_torch,
)
from worker.passes.registry import REGISTRY, get_pass  # noqa: F401
