"""The graph ORT's static quantizer takes: weights held in Constant nodes moved to initializers, a
graph below opset 13 converted for per-channel weights, ORT's pre-processing (shape inference)."""

from __future__ import annotations

import logging
from pathlib import Path

# Per-channel Q/DQ (DequantizeLinear's axis) exists from this opset on; ORT's quantizer keeps an older
# opset and writes per-channel nodes that the opset does not allow.
PER_CHANNEL_OPSET = 13


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (int8 dot products without 16-bit intermediate saturation)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return True  # not x86: the u8s8 saturation problem is x86's
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantizable_graph(source: Path, work_dir: Path, per_channel: bool, log: logging.Logger) -> tuple[Path, bool, dict]:
    """(graph to quantize, per_channel, metrics). ORT's quantizers take weights from initializers only, so
    weights held in Constant nodes move there; a graph below opset 13 is converted to 13 for per-channel
    weights, and when the converter cannot, the weights are quantized per tensor and the metrics say why."""
    import onnx
    from onnx import version_converter

    from worker.onnx_graph import constants_to_initializers

    model = onnx.load(str(source))
    changed = constants_to_initializers(model) > 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    metrics: dict = {}
    if per_channel and opset < PER_CHANNEL_OPSET:
        try:
            converted = version_converter.convert_version(model, PER_CHANNEL_OPSET)
            onnx.checker.check_model(converted)
        except Exception as exc:  # the converter raises RuntimeError, the checker ValidationError
            per_channel = False
            reason = (
                f"the model's opset {opset} has no per-channel quantization and converting it to opset "
                f"{PER_CHANNEL_OPSET} failed ({str(exc).splitlines()[0][:200]}); weights are quantized "
                "per tensor"
            )
            log.warning(reason)
            metrics = {"opset": opset, "warning": reason}
        else:
            model, changed = converted, True
            metrics = {"opset": PER_CHANNEL_OPSET, "converted_from_opset": opset}
    if not changed:
        return source, per_channel, metrics
    out = work_dir / "quantizable.onnx"
    onnx.save(model, str(out))
    return out, per_channel, metrics


def prepared_graph(graph: Path, work_dir: Path, log: logging.Logger) -> Path:
    """ORT's pre-processing (shape inference, constant folding) of ``graph``, or ``graph`` itself
    when it fails: an optimisation, not a requirement."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work_dir / "prepared.onnx"
    try:
        # Symbolic shape inference fails on some dynamic-shape graphs; ONNX's own is enough.
        quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:  # ORT raises whatever its passes raise; quantizing the graph as it is still works
        log.warning("quant_pre_process failed, quantizing without it: %s", exc)
        return graph
    return prepared


def graph_input(path: Path) -> tuple[str, int | None]:
    """(the graph's first input's name, its batch when fixed, else None)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    return graph_input.name, (dims[0].dim_value if dims and dims[0].HasField("dim_value") else None)


def count_nodes(path: Path, op_type: str) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op_type)
