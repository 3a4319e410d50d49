"""quantize_int8: ONNX Runtime static post-training quantization (QDQ), per-channel weights,
calibrated on the job's calibration dataset streamed in batches.

Mixed-scale heads stay in float by default: a Concat whose inputs' calibrated ranges differ by
a large factor (a YOLO head joins 0..640 pixel boxes with 0..1 class scores) cannot share one
INT8 scale, so it and everything after it up to the outputs are excluded, and the branches
before it are quantized each at its own scale.

With a tolerance (``max_accuracy_drop``, or the job's with ``search_speed``) quality is judged on
the task's metric against the FP32 model: accuracy (with class labels) or top-1 agreement for a
classifier; post-NMS F1 of the detections, and the worst class channel's SNR of a raw head, for a
detector; pixel agreement of the masks for a segmenter. When the quantized model is out of
tolerance, nodes are ranked by the error each one ADDS (its twin fed with the FP32 model's own
inputs through the same Q/DQ, against the FP32 node), not the error accumulated up to it, and
the worst are kept in float, doubling their number, until the metric is within the tolerance.
Calibration runs once; every candidate reuses it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from core.errors import PassError
from worker.passes.base import (
    NEEDS_CALIBRATION,
    ONNX,
    ArtifactRef,
    DatasetRef,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)

# A Concat whose inputs' largest magnitudes differ by this factor or more cannot share one INT8 scale:
# the smaller input keeps at most 8 - log2(factor) bits, 4 at 16x. YOLO heads sit at 100-1000x (0..1
# scores beside 0..640 pixel boxes); concats of feature maps inside a network sit near 1-4x.
HEAD_RANGE_RATIO = 16.0
# Ops with learned weights: a Concat with one of them downstream is a feature concat inside the
# network (keeping all after it in float would undo the quantization), not an output head.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# A detector whose worst class channel is below this (against FP32, raw head) no longer ranks its
# boxes as FP32 does, whatever the F1 at one confidence threshold says (issue 11: -5.8 dB at F1 0.9+).
MIN_CLASS_CHANNEL_SNR_DB = 15.0
# The added-error probe holds every intermediate tensor of a batch twice (FP32 and twin): a few
# small batches do.
PROBE_SAMPLES = 32
PROBE_BATCH = 4
# Raw head outputs kept for the class-channel SNR (YOLOv8n at 640 px: 84 x 8400 floats, 2.8 MB a sample).
SNR_SAMPLES = 32
# Validation inputs are kept in memory up to this size, else read again from the dataset per candidate.
VALIDATION_CACHE_BYTES = 256 * 2**20
# SNRs reported in metrics are capped at +-this: an exact match is infinite, which JSON cannot hold.
SNR_CAP_DB = 200.0

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Ops whose outputs are not values computed from the input's values: nothing to rank.
NON_NUMERIC_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape"})
TWIN = "int8_twin/"


class QuantizeInt8Config(PassConfig):
    mode: Literal["static", "dynamic"] = Field(
        default="static",
        description="dynamic: weights INT8 ahead of time, activations quantized at run time (no calibration "
        "dataset; suits Linear/MatMul-heavy models, little gain for convolutions).",
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    num_calibration_samples: int = Field(default=256, ge=1, le=100_000)
    batch_size: int = Field(default=16, ge=1, le=1024, description="Calibration batch (models with an open batch axis).")
    per_channel: bool = True
    # u8 activations with s8 weights ran fastest on x86 CPUs without VNNI (measured here).
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    symmetric_activations: bool = False
    reduce_range: bool | None = Field(
        default=None,
        description="7-bit weights. Default: on for u8 activations with s8 weights on x86 CPUs without VNNI, "
        "whose u8s8 kernels saturate with full 8-bit weights (measured: 12 points of accuracy lost).",
    )
    percentile: float = Field(default=99.999, gt=90, le=100)
    op_types: list[str] | None = Field(default=None, description="Only quantize these op types (default: all supported).")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names to keep in float.")
    keep_mixed_scale_heads_float: bool = Field(
        default=True,
        description="Keep in float a Concat whose inputs' calibrated ranges differ 16x or more (a detector head "
        "joining pixel boxes with 0..1 scores) and everything after it up to the outputs; metrics.float_nodes "
        "lists them with the ranges.",
    )
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1,
        description="Per-layer fallback: keep the nodes that add the most error in float until the task's metric "
        "(accuracy or top-1 agreement; post-NMS F1 against FP32 for detectors, which must also keep every class "
        "channel at 15 dB SNR or more; pixel agreement for segmenters) is within this of the FP32 model. "
        "Default: the job's max_accuracy_drop when search_speed is on, else no fallback.",
    )
    max_float_layers: int = Field(default=16, ge=1, le=1000, description="Fallback keeps at most this many layers in float.")
    validation_samples: int = Field(default=512, ge=16, le=100_000, description="Samples that judge the fallback.")
    search_speed: bool = Field(
        default=False,
        description="Also try QOperator and quantizing only Conv/Gemm/MatMul, time every candidate and the "
        "FP32 graph on this worker, and keep the fastest that meets the tolerance.",
    )


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


# Per-channel Q/DQ (DequantizeLinear's axis) exists from this opset on; ORT's quantizer keeps an older
# opset and writes per-channel nodes that the opset does not allow.
PER_CHANNEL_OPSET = 13


def quantizable_graph(source: Path, work_dir: Path, per_channel: bool, log) -> tuple[Path, bool, dict]:
    """(graph to quantize, per_channel, metrics). ORT's quantizers take weights from initializers only, so
    weights held in Constant nodes move there; a graph below opset 13 is converted to 13 for per-channel
    weights, and when the converter cannot, the weights are quantized per tensor and the metrics say why."""
    import onnx
    from onnx import version_converter

    from worker.passes.export_onnx import constants_to_initializers

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
            reason = (f"the model's opset {opset} has no per-channel quantization and converting it to opset "
                      f"{PER_CHANNEL_OPSET} failed ({str(exc).splitlines()[0][:200]}); weights are quantized "
                      "per tensor")
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


def _stride(batches: int) -> int:
    """Calibration is collected this many batches at a time: ORT merges ranges (and histograms)
    between chunks, so memory is bounded by the chunk, not the dataset."""
    return max(d for d in range(1, min(batches, 8) + 1) if batches % d == 0)


# -- mixed-scale heads -------------------------------------------------------------------------------


def calibrated_ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """tensor -> (lowest, highest) from ORT's calibration cache file."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = {}
    for tensor, data in load_tensors_data(cache).data.items():
        if hasattr(data, "lowest") and hasattr(data, "highest"):
            ranges[tensor] = (float(np.min(data.lowest)), float(np.max(data.highest)))
    return ranges


def mixed_scale_heads(model, ranges: dict[str, tuple[float, float]], *, ratio: float = HEAD_RANGE_RATIO,
                      op_types: Collection[str] | None = None) -> list[dict[str, Any]]:
    """The nodes to keep in float so that no INT8 scale is shared by a mixed-scale head: each Concat
    whose inputs' largest magnitudes differ ``ratio``-fold or more with no learned op after it, then
    every node after it up to the graph outputs. [{"node", "op_type", "reason", ...numbers}]."""
    if op_types is not None and "Concat" not in op_types:
        return []  # the Concat is not quantized: no scale is shared
    consumers: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        for tensor in node.input:
            consumers[tensor].append(node)
    float_nodes: list[dict[str, Any]] = []
    listed: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Concat" or not node.name or node.name in listed:
            continue
        spans = [(t, *ranges[t]) for t in node.input if t in ranges]
        peaks = [max(abs(lo), abs(hi)) for _, lo, hi in spans]
        live = [p for p in peaks if p > 0]  # an all-zero input has nothing to lose
        if len(live) < 2 or max(live) < ratio * min(live):
            continue
        after = _downstream(node, consumers)
        if any(n.op_type in WEIGHTED_OPS for n in after):
            continue
        factor = max(live) / min(live)
        float_nodes.append({
            "node": node.name, "op_type": node.op_type,
            "reason": (f"mixed-scale head: its inputs' calibrated ranges differ {factor:.0f}x (largest |x| "
                       f"{max(live):.4g} vs {min(live):.4g}); one INT8 scale for both would leave the smaller input "
                       f"{255 / factor:.1f} of 255 levels, so it stays float with all after it"),
            "range_ratio": float(factor),
            "input_ranges": [{"tensor": t, "min": lo, "max": hi} for t, lo, hi in spans],
        })
        listed.add(node.name)
        for later in after:
            if later.name and later.name not in listed:
                float_nodes.append({"node": later.name, "op_type": later.op_type,
                                    "reason": f"after the mixed-scale head {node.name}, up to the outputs"})
                listed.add(later.name)
    return float_nodes


def _downstream(node, consumers: dict[str, list]) -> list:
    """Every node fed (directly or not) by ``node``'s outputs, in first-reached order."""
    seen, order, frontier = {id(node)}, [], list(node.output)
    while frontier:
        tensor = frontier.pop(0)
        for later in consumers.get(tensor, ()):
            if id(later) not in seen:
                seen.add(id(later))
                order.append(later)
                frontier.extend(later.output)
    return order


# -- the error each node adds ------------------------------------------------------------------------


@dataclass
class _Twin:
    node: str
    op_type: str
    pairs: list[tuple[str, str]]  # (FP32 output, twin output)
    # A Concat's FP32 inputs and axis: each input's slice of the output is a group of its own.
    concat_inputs: list[str] = field(default_factory=list)
    concat_axis: int = 1


def channel_axes(shape: tuple[int, ...]) -> set[int]:
    """Axes along which a tensor holds channels: 1 (NCHW, (N, C)); for 3-D tensors the shorter of
    1 and 2, since detection heads put their 4+C channels first or last and anchors on the other
    (per-anchor SNR says nothing: most anchors score near zero in both models)."""
    if len(shape) < 2:
        return set()
    if len(shape) == 3 and shape[1] != shape[2]:
        return {1 if shape[1] < shape[2] else 2}
    return {1, 2} if len(shape) == 3 else {1}


class _ChannelError:
    """Signal and noise per channel along the tensor's channel axes, and for a Concat per input."""

    def __init__(self) -> None:
        self.signal: dict[Any, np.ndarray] = {}
        self.noise: dict[Any, np.ndarray] = {}
        self.dropped: set[Any] = set()

    def add(self, reference: np.ndarray, got: np.ndarray, segments: tuple[int, list[int]] | None = None) -> None:
        ref = reference.astype(np.float64)
        err = got.astype(np.float64) - ref
        sums: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        for axis in channel_axes(ref.shape) or {None}:
            others = tuple(a for a in range(ref.ndim) if a != axis)
            sums[axis] = (ref**2).sum(others), (err**2).sum(others)
        if segments is not None:
            axis, lengths = segments
            bounds = np.cumsum([0, *lengths])
            if ref.ndim > axis > 0 and bounds[-1] == ref.shape[axis]:
                pick = [slice(None)] * ref.ndim
                parts = []
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                    pick[axis] = slice(lo, hi)
                    parts.append(((ref[tuple(pick)] ** 2).sum(), (err[tuple(pick)] ** 2).sum()))
                sums["inputs"] = np.array([p[0] for p in parts]), np.array([p[1] for p in parts])
        for key, (sig, noi) in sums.items():
            sig, noi = np.atleast_1d(sig), np.atleast_1d(noi)
            if key in self.dropped:
                continue
            if key in self.signal and self.signal[key].shape != sig.shape:
                self.dropped.add(key)  # the axis changes length between batches: not channels
                del self.signal[key], self.noise[key]
                continue
            self.signal[key] = self.signal[key] + sig if key in self.signal else sig
            self.noise[key] = self.noise[key] + noi if key in self.noise else noi

    def worst_and_whole(self) -> tuple[float, float] | None:
        if not self.signal:
            return None
        any_axis = next(iter(self.signal))
        whole = _db(float(self.signal[any_axis].sum()), float(self.noise[any_axis].sum()))
        worst = whole
        for axis, sig in self.signal.items():
            live = sig > 1e-12 * max(float(sig.max()), 1e-30)  # dead channels (all zero after ReLU) say nothing
            if live.any():
                worst = min(worst, min(_db(float(s), float(n)) for s, n in zip(sig[live], self.noise[axis][live],
                                                                                strict=True)))
        return worst, whole


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return SNR_CAP_DB
    return float(min(10 * np.log10(max(signal, 1e-30) / noise), SNR_CAP_DB))


def _probe_graph(fp32, quantized, skip: Collection[str]):
    """(probe model, twins): the FP32 graph plus, for each node of the QDQ graph that consumes
    Dequantize'd inputs, a twin of it fed with the FP32 graph's own inputs through the same Q/DQ
    (the quantized graph's scales and zero points, its quantized weights) and followed by the same
    output Q/DQ. A twin's output against the FP32 node's is the error that node's quantization adds
    by itself; the quantized graph's own tensor would also carry every error before it."""
    import onnx
    from onnx import helper

    graph = quantized.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for tensor in n.input:
            consumers[tensor].append(n)
    q_init = {t.name: t for t in graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node if n.name}

    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    versions = {o.domain: o.version for o in probe.opset_import}
    for o in quantized.opset_import:
        versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    del probe.opset_import[:]
    probe.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())
    probe.ir_version = max(fp32.ir_version, quantized.ir_version)
    copied: dict[str, str] = {}
    made: dict[tuple, str] = {}

    def initializer(name: str) -> str | None:
        if name == "":
            return ""
        if name not in q_init:
            return None
        if name not in copied:
            t = onnx.TensorProto()
            t.CopyFrom(q_init[name])
            t.name = copied[name] = f"{TWIN}init/{name}"
            probe.graph.initializer.append(t)
        return copied[name]

    def qdq_node(op: str, template, first: str) -> str | None:
        key = (template.name, op, first)
        if key not in made:
            params = [initializer(t) for t in template.input[1:]]
            if any(p is None for p in params):
                return None  # scales computed at run time: not a static Q/DQ to copy
            out = f"{TWIN}t{len(made)}"
            node = helper.make_node(op, [first, *params], [out], name=out, domain=template.domain)
            node.attribute.extend(template.attribute)
            probe.graph.node.append(node)
            made[key] = out
        return made[key]

    def dequantized(dq, fp32_input: str) -> str | None:
        """The FP32 tensor through ``dq``'s Q/DQ, or a copy of ``dq`` for a quantized weight."""
        stored = initializer(dq.input[0])
        if stored:
            return qdq_node("DequantizeLinear", dq, stored)
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or not fp32_input:
            return None
        rounded = qdq_node("QuantizeLinear", q, fp32_input)
        return qdq_node("DequantizeLinear", dq, rounded) if rounded else None

    twins: list[_Twin] = []
    outputs = [o.name for o in probe.graph.output]
    for node in graph.node:
        if node.op_type in QDQ_OPS or node.op_type in NON_NUMERIC_OPS or not node.name or node.name in skip:
            continue
        ref = fp32_nodes.get(node.name)
        if ref is None or ref.op_type != node.op_type or len(ref.input) != len(node.input):
            continue
        inputs, any_dq = [], False
        for q_in, f_in in zip(node.input, ref.input, strict=True):
            dq = producer.get(q_in)
            twin_in = dequantized(dq, f_in) if dq is not None and dq.op_type == "DequantizeLinear" else None
            inputs.append(twin_in or f_in)
            any_dq = any_dq or twin_in is not None
        if not any_dq:
            continue
        index = len(twins)
        outs = [f"{TWIN}n{index}/{k}" for k in range(len(node.output))]
        twin = helper.make_node(node.op_type, inputs, outs, name=f"{TWIN}n{index}", domain=node.domain)
        twin.attribute.extend(node.attribute)
        probe.graph.node.append(twin)
        pairs = []
        for q_out, f_out, got in zip(node.output, ref.output, outs, strict=True):
            if not f_out:
                continue
            q = next((c for c in consumers.get(q_out, ()) if c.op_type == "QuantizeLinear"), None)
            dq = next((c for c in consumers.get(q.output[0], ()) if c.op_type == "DequantizeLinear"), None) if q else None
            if q is not None and dq is not None:
                rounded = qdq_node("QuantizeLinear", q, got)
                got = (qdq_node("DequantizeLinear", dq, rounded) if rounded else None) or got
            pairs.append((f_out, got))
        twin_entry = _Twin(node.name, node.op_type, pairs)
        if node.op_type == "Concat":
            twin_entry.concat_inputs = [t for t in ref.input if t]
            twin_entry.concat_axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            outputs.extend(twin_entry.concat_inputs)
        twins.append(twin_entry)
        outputs.extend(t for pair in pairs for t in pair)
    known = {o.name for o in probe.graph.output}
    for tensor in dict.fromkeys(outputs):
        if tensor not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
            known.add(tensor)
    return probe, twins


def added_error_ranking(prepared: Path, quantized: Path, batches: Iterable[np.ndarray], input_name: str, *,
                        skip: Collection[str] = (), threads: int = 1) -> list[dict[str, Any]]:
    """Nodes of the QDQ graph by the error their own quantization adds, worst first:
    [{"node", "op_type", "worst_channel_snr_db", "snr_db"}], the SNR of the node's twin (see
    ``_probe_graph``) against the FP32 node, on its worst live channel and on the whole output.

    The worst channel, not the whole tensor: a tensor whose range one large channel dominates keeps
    a high whole-tensor SNR while INT8 zeroes its other channels."""
    import onnx

    probe, twins = _probe_graph(onnx.load(str(prepared)), onnx.load(str(quantized)), set(skip))
    if not twins:
        return []
    session = _session(probe, threads)
    names = list(dict.fromkeys([*(t for twin in twins for pair in twin.pairs for t in pair),
                                *(t for twin in twins for t in twin.concat_inputs)]))
    errors = [[_ChannelError() for _ in twin.pairs] for twin in twins]
    for x in batches:
        values = dict(zip(names, session.run(names, {input_name: x}), strict=True))
        for twin, errs in zip(twins, errors, strict=True):
            segments = None
            if twin.concat_inputs:
                rank = values[twin.concat_inputs[0]].ndim
                axis = twin.concat_axis % max(rank, 1)
                segments = (axis, [values[t].shape[axis] if values[t].ndim > axis else 0 for t in twin.concat_inputs])
            for (ref_name, got_name), err in zip(twin.pairs, errs, strict=True):
                ref, got = values[ref_name], values[got_name]
                if ref.dtype.kind == "f" and ref.shape == got.shape and ref.size:
                    err.add(ref, got, segments)
    ranking = []
    for twin, errs in zip(twins, errors, strict=True):
        measured = [m for m in (e.worst_and_whole() for e in errs) if m is not None]
        if measured:
            ranking.append({"node": twin.node, "op_type": twin.op_type,
                            "worst_channel_snr_db": min(m[0] for m in measured),
                            "snr_db": min(m[1] for m in measured)})
    return sorted(ranking, key=lambda r: (r["worst_channel_snr_db"], r["snr_db"]))


# -- running a candidate on validation inputs -----------------------------------------------------------


def _session(model_or_path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


class _Runner:
    """One graph on validation batches of any size: a model whose batch is fixed runs that many
    samples at a time, the last chunk padded (worker.runtime.run_in_fixed_batches)."""

    def __init__(self, path: Path, input_name: str, fixed_batch: int | None, threads: int) -> None:
        self.session = _session(path, threads)
        self.input_name, self.fixed_batch = input_name, fixed_batch

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def __call__(self, x: np.ndarray) -> list[list[np.ndarray]]:
        """Chunks of outputs, batch axis first, covering ``x``'s samples in order."""
        from worker.runtime import run_in_fixed_batches

        if not self.fixed_batch:
            return [self._run({self.input_name: x})]
        if self.fixed_batch == 1:
            # A sample a call: batch-less exports (post-NMS boxes (K, 4)) get their batch axis here.
            return [[o[None] if o.ndim == 0 or o.shape[0] != 1 else o for o in self._run({self.input_name: x[i : i + 1]})]
                    for i in range(len(x))]
        return [run_in_fixed_batches(self._run, {self.input_name: x}, self.fixed_batch)]


@dataclass
class _Score:
    value: float
    drop: float
    class_channel_snr_db: float | None = None  # detectors with a raw head

    def within(self, tolerance: float) -> bool:
        return self.drop <= tolerance and self.snr_ok

    @property
    def snr_ok(self) -> bool:
        return self.class_channel_snr_db is None or self.class_channel_snr_db >= MIN_CLASS_CHANNEL_SNR_DB

    def entry(self, metric: str) -> dict[str, Any]:
        out: dict[str, Any] = {metric: self.value, "drop": self.drop}
        if self.class_channel_snr_db is not None:
            out["worst_class_channel_snr_db"] = self.class_channel_snr_db
        return out


def _top1(chunks: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([c[0].reshape(len(c[0]), -1).argmax(1) for c in chunks])


class _TopOne:
    """Classification: accuracy with class labels, else top-1 agreement with the FP32 model."""

    def __init__(self, labeled: bool) -> None:
        self.metric = "top1" if labeled else "top1_agreement"
        self.labeled = labeled
        self.reference_top1: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add_reference(self, chunks: list[list[np.ndarray]], labels: np.ndarray | None) -> None:
        self.reference_top1.append(_top1(chunks))
        if self.labeled:
            self.labels.append(np.asarray(labels))

    def _target(self) -> np.ndarray:
        return np.concatenate(self.labels if self.labeled else self.reference_top1)

    @property
    def baseline(self) -> float:
        return float((np.concatenate(self.reference_top1) == self._target()).mean())

    def score(self, batches: Iterable[list[list[np.ndarray]]]) -> _Score:
        value = float((np.concatenate([_top1(c) for c in batches]) == self._target()).mean())
        return _Score(value, self.baseline - value)


class _DetectionAgreement:
    """Detection: F1 of the candidate's post-NMS detections against FP32's (decoded with the job's
    options), and for a raw head the worst class channel's SNR on the first validation samples."""

    metric = "f1_vs_float"
    baseline = 1.0

    def __init__(self, layout: str, options: dict[str, Any]) -> None:
        self.layout = layout
        self.options = {
            "box_format": options.get("box_format", "xywh"),
            "conf_threshold": options.get("conf_threshold", 0.25),
            "iou_threshold": options.get("iou_threshold", 0.45),
            "max_detections": options.get("max_detections", 300),
        }
        self.raw_head = layout in ("yolo", "yolo_objectness")
        self.reference: list[list] = []
        self.reference_head: list[np.ndarray] = []

    def _decode(self, chunks: list[list[np.ndarray]]) -> list:
        from worker.metrics.detection import decode

        return [d for c in chunks for d in decode(c, self.layout, **self.options)]

    @staticmethod
    def _head_rows(chunks: list[list[np.ndarray]], room: int) -> np.ndarray | None:
        if room <= 0:
            return None
        return np.concatenate([c[0] for c in chunks])[:room]

    def add_reference(self, chunks: list[list[np.ndarray]], labels: np.ndarray | None) -> None:
        self.reference.append(self._decode(chunks))
        if self.raw_head:
            rows = self._head_rows(chunks, SNR_SAMPLES - sum(len(r) for r in self.reference_head))
            if rows is not None:
                self.reference_head.append(rows)

    def score(self, batches: Iterable[list[list[np.ndarray]]]) -> _Score:
        from worker.metrics.detection import AgreementTally, class_channel_snr_db

        tally = AgreementTally()
        head: list[np.ndarray] = []
        for reference, chunks in zip(self.reference, batches, strict=True):
            tally.add(reference, self._decode(chunks))
            if self.raw_head:
                rows = self._head_rows(chunks, SNR_SAMPLES - sum(len(r) for r in head))
                if rows is not None:
                    head.append(rows)
        f1 = float(tally.result()["f1"])
        snr = None
        if self.raw_head and self.reference_head:
            measured = class_channel_snr_db(np.concatenate(self.reference_head), np.concatenate(head), self.layout)
            if "worst_class_channel_snr_db" in measured:
                snr = float(np.clip(measured["worst_class_channel_snr_db"], -SNR_CAP_DB, SNR_CAP_DB))
        return _Score(f1, 1.0 - f1, snr)


class _PixelAgreement:
    """Segmentation: the share of pixels whose class (argmax; a one-channel map thresholded at 0.5,
    or at 0 for logits, as FP32's values say) agrees with FP32's mask."""

    metric = "pixel_agreement"
    baseline = 1.0

    def __init__(self) -> None:
        self.reference: list[np.ndarray] = []
        self.threshold: float | None = None

    def _masks(self, chunks: list[list[np.ndarray]]) -> np.ndarray:
        out = np.concatenate([c[0] for c in chunks])
        if out.ndim < 3 or out.shape[1] > 1:
            return out.argmax(1).astype(np.uint16 if out.shape[1] < 2**16 else np.int64)
        if self.threshold is None:
            self.threshold = 0.5 if out.min() >= 0 and out.max() <= 1 else 0.0
        return (out[:, 0] > self.threshold).astype(np.uint8)

    def add_reference(self, chunks: list[list[np.ndarray]], labels: np.ndarray | None) -> None:
        self.reference.append(self._masks(chunks))

    def score(self, batches: Iterable[list[list[np.ndarray]]]) -> _Score:
        agree = pixels = 0
        for reference, chunks in zip(self.reference, batches, strict=True):
            agree += int((self._masks(chunks) == reference).sum())
            pixels += reference.size
        value = agree / pixels if pixels else 1.0
        return _Score(value, 1.0 - value)


def _resolve_task(ctx: PassContext, spec: dict, output_shapes: list[list[int]]) -> tuple[str, str | None, str | None]:
    """(task, detection layout, note): the job's task, or for ``auto`` what the FP32 outputs say."""
    from core.tasks import detection_layout, infer_task

    task, note = ctx.task, None
    if task == "auto":
        task = infer_task(output_shapes, spec["shape"])
        if task is None:
            note = (f"the outputs {output_shapes} do not say the task; judged as classification (top-1 of the "
                    "flattened first output); give the job's task to choose")
            task = "classification"
    layout = None
    if task == "detection":
        shape = spec["shape"]
        hw = (shape[2], shape[3]) if shape[1] <= 4 else (shape[1], shape[2])
        hint = (ctx.task_options.get("detection") or {}).get("layout", "auto")
        layout = detection_layout(output_shapes, hw, hint)
        if layout is None:
            raise PassError(
                f"the detector's outputs {output_shapes} are none of the layouts read (a YOLO head (N, 4+C, A) or "
                "(N, A, 5+C), or boxes/scores/labels); give detection.layout",
                code="unsupported_outputs", details={"outputs": output_shapes},
            )
    return task, layout, note


@dataclass
class _Validation:
    """Validation batches, FP32's reference on them, and the task's judge of a candidate."""

    dataset: DatasetRef
    spec: dict
    ctx: PassContext
    batch_size: int
    samples: int
    fixed_batch: int | None
    source: str
    task: str = "classification"
    layout: str | None = None
    judge: Any = None
    note: str | None = None
    cached: list[np.ndarray] | None = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.judge.metric

    @property
    def baseline(self) -> float:
        return self.judge.baseline

    def inputs(self) -> Iterator[np.ndarray]:
        if self.cached is not None:
            yield from self.cached
            return
        from worker.data import iter_batches

        for x, _ in iter_batches(self.dataset, self.spec, self.ctx.preprocessing, batch_size=self.batch_size,
                                 limit=self.samples):
            self.ctx.check_cancelled()
            yield x

    def probe_batches(self) -> Iterator[np.ndarray]:
        """The first PROBE_SAMPLES samples in batches the model takes (a fixed batch padded with
        copies of the last sample: a duplicate weighs one sample twice, harmlessly)."""
        size = self.fixed_batch or PROBE_BATCH
        left = PROBE_SAMPLES
        for x in self.inputs():
            for i in range(0, len(x), size):
                if left <= 0:
                    return
                part = x[i : i + min(size, left)]
                left -= len(part)
                if self.fixed_batch and len(part) < size:
                    part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
                yield part

    def timing_feed(self) -> np.ndarray:
        """One batch-1 input (or the fixed batch's worth) for timing."""
        x = next(iter(self.inputs()))
        want = self.fixed_batch or 1
        return x[:want] if len(x) >= want else np.concatenate([x, np.repeat(x[-1:], want - len(x), axis=0)])

    def quality(self, path: Path) -> _Score:
        runner = _Runner(path, self.spec["name"], self.fixed_batch, self.ctx.threads)
        return self.judge.score(runner(x) for x in self.inputs())


class QuantizeInt8(Pass):
    name = "quantize_int8"
    description = "INT8 static quantization (ONNX Runtime, QDQ) calibrated on the calibration dataset."
    Config = QuantizeInt8Config
    accepts = frozenset({ONNX})
    produces = ONNX
    needs = frozenset({NEEDS_CALIBRATION})
    version = 4

    def requirements(self, config: QuantizeInt8Config) -> frozenset[str]:
        return frozenset() if config.mode == "dynamic" else self.needs

    def _dynamic(self, ctx: PassContext, source: ArtifactRef, config: QuantizeInt8Config) -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = ctx.work_dir / "model.int8.dynamic.onnx"
        graph, per_channel, opset_metrics = quantizable_graph(source.path, ctx.work_dir, config.per_channel, ctx.log)
        quantize_dynamic(
            str(graph), str(out), per_channel=per_channel,
            weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[config.weight_type],
            op_types_to_quantize=config.op_types, nodes_to_exclude=config.exclude_nodes,
        )
        quantized = sum(_count(out, op) for op in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul"))
        if quantized == 0:
            raise PassError("nothing in the model could be quantized dynamically", code="nothing_quantized")
        return PassResult(artifact=out, format=ONNX, metrics={"mode": "dynamic", "quantized_nodes": quantized,
                                                              "weight_type": config.weight_type,
                                                              "per_channel": per_channel, **opset_metrics})

    def run(self, ctx: PassContext, source: ArtifactRef, config: QuantizeInt8Config) -> PassResult:
        if config.mode == "dynamic":
            return self._dynamic(ctx, source, config)
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from worker.data import iter_batches

        dataset = ctx.calibration_dataset
        if dataset is None:  # checked at POST /v1/jobs; kept for direct callers
            raise PassError("quantize_int8 needs a calibration dataset", code="calibration_dataset_required")
        if len(ctx.input_spec) != 1:
            raise PassError("calibration feeds single-input models only", code="unsupported_model")

        graph, per_channel, opset_metrics = quantizable_graph(source.path, ctx.work_dir, config.per_channel, ctx.log)
        prepared = ctx.work_dir / "prepared.onnx"
        try:
            # Symbolic shape inference fails on some dynamic-shape graphs; ONNX's own is enough.
            quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # optional optimisation: quantize the graph as it is
            ctx.log.warning("quant_pre_process failed, quantizing without it: %s", exc)
            prepared = graph

        model = onnx.load(str(prepared), load_external_data=False)
        graph_input = model.graph.input[0]
        dims = graph_input.type.tensor_type.shape.dim
        fixed_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        batch_size = fixed_batch or config.batch_size
        spec = dict(ctx.input_spec[0], name=graph_input.name)
        total = min(config.num_calibration_samples, dataset.num_samples)
        if fixed_batch:
            total -= total % fixed_batch
            if total == 0:
                raise PassError(
                    f"the model's batch is fixed at {fixed_batch}; give at least that many calibration samples",
                    code="calibration_dataset_too_small",
                )
        n_batches = -(-total // batch_size)

        class Reader(CalibrationDataReader):
            """Streams the calibration batches; ORT asks for them a chunk at a time."""

            def __init__(self) -> None:
                self.seen = 0
                self.set_range(0, n_batches)

            def __len__(self) -> int:
                return n_batches

            def set_range(self, start_index: int, end_index: int) -> None:
                first = start_index * batch_size
                self.batches = (
                    x for x, _ in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch_size,
                                               offset=first, limit=min(end_index * batch_size, total) - first)
                )

            def get_next(self):
                ctx.check_cancelled()
                x = next(self.batches, None)
                if x is None:
                    return None
                self.seen += len(x)
                ctx.report_progress(0.6 * self.seen / total)
                return {graph_input.name: x}

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[config.calibration_method]
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        reader = Reader()
        ranges = ctx.work_dir / "calibration.json"
        reduce_range = config.reduce_range
        if reduce_range is None:
            reduce_range = (config.activation_type, config.weight_type) == ("uint8", "int8") and not cpu_has_vnni()
        head_nodes: list[str] = []  # mixed-scale heads: float in every candidate

        def quantize(exclude: list[str], out: Path, *, fmt=QuantFormat.QDQ, op_types=config.op_types) -> Path:
            quantize_static(
                str(prepared), str(out),
                # After the first call the ranges come from the cache file: calibrated once.
                reader if not ranges.exists() else None,
                quant_format=fmt,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=qtype[config.activation_type],
                weight_type=qtype[config.weight_type],
                calibrate_method=method,
                op_types_to_quantize=op_types,
                nodes_to_exclude=sorted(set(config.exclude_nodes) | set(head_nodes) | set(exclude)),
                calibration_cache_path=str(ranges),
                extra_options={
                    "ActivationSymmetric": config.symmetric_activations,
                    "CalibPercentile": config.percentile,
                    # Not CalibMaxIntermediateOutputs: ORT 1.32 drops (not merges) what it
                    # collected when that cap is reached. The strided reader bounds memory.
                    "CalibStridedMinMax": _stride(n_batches),
                },
            )
            return out

        out = quantize([], ctx.work_dir / "model.int8.onnx")
        if reader.seen == 0:
            raise PassError("the calibration dataset yielded no samples", code="empty_dataset")
        float_nodes: list[dict[str, Any]] = []
        if config.keep_mixed_scale_heads_float:
            # The ranges exist only once calibrated: the first graph is quantized whole, then again
            # (from the cached ranges) without the heads.
            float_nodes = mixed_scale_heads(model, calibrated_ranges(ranges), op_types=config.op_types)
            if float_nodes:
                head_nodes.extend(n["node"] for n in float_nodes)
                ctx.log.info("keeping %d node(s) of mixed-scale heads in float: %s", len(head_nodes), head_nodes)
                out = quantize([], ctx.work_dir / "model.int8.heads_float.onnx")
        q_nodes = _count(out, "QuantizeLinear")
        if q_nodes == 0:
            raise PassError("nothing in the model could be quantized (no supported ops)", code="nothing_quantized")
        metrics = {
            "calibration_samples": reader.seen,
            "calibration_method": config.calibration_method,
            "quantize_linear_nodes": q_nodes,
            "activation_type": config.activation_type,
            "weight_type": config.weight_type,
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "quant_format": "QDQ",
            "float_nodes": float_nodes,
            **opset_metrics,
        }
        tolerance = config.max_accuracy_drop
        if tolerance is None and config.search_speed:
            tolerance = ctx.task_options.get("max_accuracy_drop")
        if tolerance is not None or config.search_speed:
            val = self._validation(ctx, config, spec, batch_size, fixed_batch, prepared)
            out, metrics["fallback"] = self._fallback(ctx, config, tolerance, prepared, out, quantize, val, head_nodes)
            if config.search_speed:
                out, metrics["speed_search"] = self._search_speed(ctx, config, tolerance, prepared, out, quantize,
                                                                  val, metrics["fallback"])
                metrics["quant_format"] = "QOperator" if metrics["speed_search"]["chosen"] == "qoperator" else "QDQ"
            warnings = [w for w in (opset_metrics.get("warning"), val.note,
                                    metrics.get("speed_search", {}).get("warning")) if w]
            if warnings:
                metrics["warning"] = "; ".join(warnings)
            metrics["quantize_linear_nodes"] = _count(out, "QuantizeLinear")
        return PassResult(artifact=out, format=ONNX, metrics=metrics)

    # -- speed search --------------------------------------------------------------------------------

    def _search_speed(self, ctx, config: QuantizeInt8Config, tolerance: float | None, prepared: Path, chosen: Path,
                      quantize, val: _Validation, fallback: dict) -> tuple[Path, dict]:
        """Time the quality-approved INT8 graph against alternatives and the FP32 graph, on this
        worker, and keep the fastest INT8 that still meets the tolerance."""
        from onnxruntime.quantization import QuantFormat

        from worker.passes.benchmark import time_interleaved

        kept = [layer["node"] for layer in fallback["kept_float"]]
        limit = tolerance if tolerance is not None else 1.0
        candidates: dict[str, Path] = {"qdq": chosen}
        try:
            candidates["qoperator"] = quantize(kept, ctx.work_dir / "model.int8.qop.onnx", fmt=QuantFormat.QOperator)
        except Exception as exc:  # QOperator lacks kernels for some graphs: not a candidate then
            ctx.log.warning("QOperator candidate failed: %s", exc)
        if config.op_types is None:
            candidates["qdq_weighted_only"] = quantize(
                kept, ctx.work_dir / "model.int8.weighted.onnx", op_types=["Conv", "Gemm", "MatMul"]
            )
        scores = {label: val.quality(path) for label, path in candidates.items()}
        results = {
            label: {**scores[label].entry(val.metric), "size_bytes": path.stat().st_size}
            for label, path in candidates.items()
        }
        timings = time_interleaved({"fp32": prepared, **candidates}, {val.spec["name"]: val.timing_feed()},
                                   runs=9, threads=ctx.threads)
        for label in candidates:
            results[label]["p50_ms"] = timings[label]["p50_ms"]
        fp32_p50 = timings["fp32"]["p50_ms"]
        ok = [label for label in candidates if scores[label].within(limit)]
        pool = ok or list(candidates)
        best = min(pool, key=lambda label: results[label]["p50_ms"])
        report = {"fp32_p50_ms": fp32_p50, "candidates": results, "chosen": best}
        if results[best]["p50_ms"] > fp32_p50:
            report["warning"] = (
                f"the fastest INT8 candidate ({best}, p50 {results[best]['p50_ms']:.3f} ms at batch 1) is slower "
                f"than the FP32 graph ({fp32_p50:.3f} ms) on this worker; it is {results[best]['size_bytes'] / prepared.stat().st_size:.2f}x "
                "the size. Keep the FP32 ONNX artifact where speed matters."
            )
            ctx.log.warning(report["warning"])
        if not ok:
            report["reason"] = "no candidate met the tolerance; returning the fastest of them"
        return candidates[best], report

    # -- per-layer fallback ------------------------------------------------------------------------

    def _validation(self, ctx: PassContext, config: QuantizeInt8Config, spec: dict, batch_size: int,
                    fixed_batch: int | None, prepared: Path) -> _Validation:
        from worker.data import iter_batches

        dataset = ctx.evaluation_dataset or ctx.calibration_dataset
        val = _Validation(
            dataset=dataset, spec=spec, ctx=ctx, batch_size=batch_size,
            samples=min(config.validation_samples, dataset.num_samples), fixed_batch=fixed_batch,
            source="evaluation" if ctx.evaluation_dataset else "calibration",
        )
        reference = _Runner(prepared, spec["name"], fixed_batch, ctx.threads)
        cached_bytes = 0
        for x, labels in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch_size, limit=val.samples):
            ctx.check_cancelled()
            chunks = reference(x)
            if val.judge is None:
                val.task, val.layout, val.note = _resolve_task(ctx, spec, [list(o.shape) for o in chunks[0]])
                if val.note:
                    ctx.log.warning(val.note)
                if val.task == "detection":
                    val.judge = _DetectionAgreement(val.layout, ctx.task_options.get("detection") or {})
                elif val.task == "segmentation":
                    val.judge = _PixelAgreement()
                else:
                    # Labels count when they are classes (box labels say nothing of a classifier).
                    class_labels = dataset.labeled and dataset.label_type in (None, "classes")
                    val.judge = _TopOne(labeled=class_labels and labels is not None)
            val.judge.add_reference(chunks, labels)
            cached_bytes += x.nbytes
            if val.cached is not None and cached_bytes <= VALIDATION_CACHE_BYTES:
                val.cached.append(x)
            else:
                val.cached = None  # too large to hold: each candidate reads the dataset again
        if val.judge is None:
            raise PassError(f"the {val.source} dataset yielded no samples", code="empty_dataset")
        ctx.report_progress(0.65)
        return val

    def _fallback(self, ctx, config: QuantizeInt8Config, tolerance: float | None, prepared: Path, full: Path,
                  quantize, val: _Validation, head_nodes: list[str]):
        metric = val.metric
        baseline = val.baseline
        report: dict[str, Any] = {
            "task": val.task, "metric": metric, "validated_on": val.source, "samples": val.samples,
            "tolerance": tolerance, "fp32": baseline, "attempts": [], "kept_float": [],
        }
        if val.task == "detection":
            report["layout"] = val.layout
            report["min_class_channel_snr_db"] = MIN_CLASS_CHANNEL_SNR_DB
        score = val.quality(full)
        report["attempts"].append({"float_layers": 0, **score.entry(metric)})
        ctx.report_progress(0.7)
        if tolerance is None or score.within(tolerance):
            report.update(tolerance_met=True, result=score.value)
            return full, report

        ranked = added_error_ranking(prepared, full, val.probe_batches(), val.spec["name"],
                                     skip=set(config.exclude_nodes) | set(head_nodes), threads=ctx.threads)
        report["ranked_by"] = "added_error"
        report["most_damaging"] = ranked[:16]

        def badness(s: _Score) -> tuple[bool, float]:
            return (not s.snr_ok, s.drop)

        best = (score, full, [])
        most = min(config.max_float_layers, len(ranked))
        for k in sorted({min(2**i, most) for i in range(most.bit_length() + 1)} - {0}):
            ctx.check_cancelled()
            keep = [layer["node"] for layer in ranked[:k]]
            candidate = quantize(keep, ctx.work_dir / f"model.int8.fallback{k}.onnx")
            score = val.quality(candidate)
            report["attempts"].append({"float_layers": k, **score.entry(metric)})
            if badness(score) < badness(best[0]):
                best = (score, candidate, ranked[:k])
            ctx.report_progress(0.7 + 0.3 * k / most)
            if score.within(tolerance):
                break
        score, chosen, kept = best
        report["kept_float"] = [
            dict(layer, reason=(
                f"alone, its quantization leaves its worst output channel at {layer['worst_channel_snr_db']:.1f} dB "
                f"SNR against FP32 on the same inputs (whole tensor {layer['snr_db']:.1f} dB): among the "
                f"{len(kept)} nodes that add the most error"
            ))
            for layer in kept
        ]
        report["tolerance_met"] = score.within(tolerance)
        report["result"] = score.value
        if not report["tolerance_met"]:
            shortfall = (f"the {metric} drop within {tolerance}" if score.drop > tolerance else
                         f"every class channel to {MIN_CLASS_CHANNEL_SNR_DB:.0f} dB SNR")
            report["reason"] = (
                f"keeping up to {most} layers in float did not bring {shortfall}; returning the best found "
                f"(drop {score.drop:.4f}"
                + (f", worst class channel {score.class_channel_snr_db:.1f} dB)" if score.class_channel_snr_db
                   is not None else ")")
            )
            ctx.log.warning(report["reason"])
        return chosen, report


def _count(path: Path, op_type: str) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op_type)
