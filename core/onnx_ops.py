"""The ONNX operators the worker turns into a trainable torch graph (worker.onnx_to_torch).

Kept in the kernel, apart from the converter, so that the API can refuse a job that trains an ONNX
upload with operators the converter lacks (a 422 at POST /v1/jobs) without importing torch.
worker.onnx_to_torch has one handler per name here, and a test holds the two to each other.
"""

from __future__ import annotations

from collections.abc import Iterable

# Operators of the default domain ("" or "ai.onnx"). Control flow (If, Loop, Scan), model-local
# functions and every other domain are left out on purpose: their bodies are not one static graph.
TRAINABLE_ONNX_OPS: frozenset[str] = frozenset(
    {
        "Abs",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "CastLike",
        "Ceil",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "DepthToSpace",
        "Div",
        "Dropout",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "InstanceNormalization",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "Min",
        "Mish",
        "Mod",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "PRelu",
        "Pad",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Resize",
        "Round",
        "Shape",
        "Sigmoid",
        "Sign",
        "Sin",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tanh",
        "Tile",
        "TopK",
        "Transpose",
        "Unsqueeze",
        "Upsample",
        "Where",
    }
)

_DEFAULT_DOMAINS = ("", "ai.onnx")


def unsupported_onnx_ops(op_types: Iterable[tuple[str, str]]) -> list[str]:
    """The (domain, op_type) pairs the converter cannot turn into torch, sorted and distinct: "op_type"
    for the default domain, "domain::op_type" for any other (every operator of another domain is)."""
    missing: set[str] = set()
    for domain, op_type in op_types:
        if domain in _DEFAULT_DOMAINS:
            if op_type not in TRAINABLE_ONNX_OPS:
                missing.add(op_type)
        else:
            missing.add(f"{domain}::{op_type}")
    return sorted(missing)
