"""The error each node's quantization ADDS, not the error accumulated up to it: every node of the
QDQ graph gets a twin in a probe model, fed the FP32 graph's own inputs through the same Q/DQ, and
its output is compared with the FP32 node's. The fallback keeps the worst of them in float."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.metrics.fidelity import channel_axis, snr_of_sums

# SNRs in the ranking are capped at this: an exact match is infinite, and a node whose quantization
# adds nothing at all ranks no better than one that adds almost nothing.
SNR_CAP_DB = 200.0
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Ops whose outputs are not values computed from the input's values: nothing to rank.
NON_NUMERIC_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape"})
TWIN = "int8_twin/"


@dataclass
class _Twin:
    node: str
    op_type: str
    pairs: list[tuple[str, str]]  # (FP32 output, twin output)
    # A Concat's FP32 inputs and axis: each input's slice of the output is a group of its own.
    concat_inputs: list[str] = field(default_factory=list)
    concat_axis: int = 1


def channel_axes(shape: tuple[int, ...]) -> set[int]:
    """Axes along which an intermediate tensor may hold channels: fidelity.channel_axis's, and for a
    3-D tensor whose axes 1 and 2 are equally long (nothing says which holds the channels) both."""
    if len(shape) < 2:
        return set()
    if len(shape) == 3 and shape[1] == shape[2]:
        return {1, 2}
    return {channel_axis(shape)}


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
                worst = min(
                    worst, min(_db(float(s), float(n)) for s, n in zip(sig[live], self.noise[axis][live], strict=True))
                )
        return worst, whole


def _db(signal: float, noise: float) -> float:
    """fidelity.snr_of_sums capped above (non-finite noise stays -inf: the worst there is)."""
    return min(snr_of_sums(signal, noise), SNR_CAP_DB)


class ProbeBuilder:
    """The probe model: the FP32 graph plus, for each node of the QDQ graph that consumes
    Dequantize'd inputs, a twin of it fed with the FP32 graph's own inputs through the same Q/DQ
    (the quantized graph's scales and zero points, its quantized weights) and followed by the same
    output Q/DQ. A twin's output against the FP32 node's is the error that node's quantization adds
    by itself; the quantized graph's own tensor would also carry every error before it."""

    def __init__(self, fp32, quantized) -> None:
        import onnx
        from onnx import helper

        self.fp32, self.graph = fp32, quantized.graph
        self.producer = {out: n for n in self.graph.node for out in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.graph.node:
            for tensor in n.input:
                self.consumers[tensor].append(n)
        self.q_init = {t.name: t for t in self.graph.initializer}
        self.probe = onnx.ModelProto()
        self.probe.CopyFrom(fp32)
        versions = {o.domain: o.version for o in self.probe.opset_import}
        for o in quantized.opset_import:
            versions[o.domain] = max(versions.get(o.domain, 0), o.version)
        del self.probe.opset_import[:]
        self.probe.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())
        self.probe.ir_version = max(fp32.ir_version, quantized.ir_version)
        self.copied: dict[str, str] = {}
        self.made: dict[tuple, str] = {}
        self.twins: list[_Twin] = []
        self.outputs = [o.name for o in self.probe.graph.output]

    def build(self, skip: Collection[str]) -> tuple[Any, list[_Twin]]:
        """(probe model, twins), every node except those in ``skip``."""
        import onnx

        fp32_nodes = {n.name: n for n in self.fp32.graph.node if n.name}
        for node in self.graph.node:
            if node.op_type in QDQ_OPS or node.op_type in NON_NUMERIC_OPS or not node.name or node.name in skip:
                continue
            ref = fp32_nodes.get(node.name)
            if ref is not None and ref.op_type == node.op_type and len(ref.input) == len(node.input):
                self._add_twin(node, ref)
        known = {o.name for o in self.probe.graph.output}
        for tensor in dict.fromkeys(self.outputs):
            if tensor not in known:
                self.probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
                known.add(tensor)
        return self.probe, self.twins

    def _initializer(self, name: str) -> str | None:
        import onnx

        if name == "":
            return ""
        if name not in self.q_init:
            return None
        if name not in self.copied:
            t = onnx.TensorProto()
            t.CopyFrom(self.q_init[name])
            t.name = self.copied[name] = f"{TWIN}init/{name}"
            self.probe.graph.initializer.append(t)
        return self.copied[name]

    def _qdq_node(self, op: str, template, first: str) -> str | None:
        from onnx import helper

        key = (template.name, op, first)
        if key not in self.made:
            params = [self._initializer(t) for t in template.input[1:]]
            if any(p is None for p in params):
                return None  # scales computed at run time: not a static Q/DQ to copy
            out = f"{TWIN}t{len(self.made)}"
            node = helper.make_node(op, [first, *params], [out], name=out, domain=template.domain)
            node.attribute.extend(template.attribute)
            self.probe.graph.node.append(node)
            self.made[key] = out
        return self.made[key]

    def _dequantized(self, dq, fp32_input: str) -> str | None:
        """The FP32 tensor through ``dq``'s Q/DQ, or a copy of ``dq`` for a quantized weight."""
        stored = self._initializer(dq.input[0])
        if stored:
            return self._qdq_node("DequantizeLinear", dq, stored)
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or not fp32_input:
            return None
        rounded = self._qdq_node("QuantizeLinear", q, fp32_input)
        return self._qdq_node("DequantizeLinear", dq, rounded) if rounded else None

    def _add_twin(self, node, ref) -> None:
        from onnx import helper

        inputs, any_dq = [], False
        for q_in, f_in in zip(node.input, ref.input, strict=True):
            dq = self.producer.get(q_in)
            twin_in = self._dequantized(dq, f_in) if dq is not None and dq.op_type == "DequantizeLinear" else None
            inputs.append(twin_in or f_in)
            any_dq = any_dq or twin_in is not None
        if not any_dq:
            return
        index = len(self.twins)
        outs = [f"{TWIN}n{index}/{k}" for k in range(len(node.output))]
        twin = helper.make_node(node.op_type, inputs, outs, name=f"{TWIN}n{index}", domain=node.domain)
        twin.attribute.extend(node.attribute)
        self.probe.graph.node.append(twin)
        entry = _Twin(node.name, node.op_type, self._output_pairs(node, ref, outs))
        if node.op_type == "Concat":
            entry.concat_inputs = [t for t in ref.input if t]
            entry.concat_axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            self.outputs.extend(entry.concat_inputs)
        self.twins.append(entry)
        self.outputs.extend(t for pair in entry.pairs for t in pair)

    def _output_pairs(self, node, ref, outs: list[str]) -> list[tuple[str, str]]:
        """(FP32 output, twin output) pairs, the twin's through the node's own output Q/DQ."""
        pairs = []
        for q_out, f_out, got in zip(node.output, ref.output, outs, strict=True):
            if not f_out:
                continue
            q = next((c for c in self.consumers.get(q_out, ()) if c.op_type == "QuantizeLinear"), None)
            dq = (
                next((c for c in self.consumers.get(q.output[0], ()) if c.op_type == "DequantizeLinear"), None)
                if q
                else None
            )
            if q is not None and dq is not None:
                rounded = self._qdq_node("QuantizeLinear", q, got)
                got = (self._qdq_node("DequantizeLinear", dq, rounded) if rounded else None) or got
            pairs.append((f_out, got))
        return pairs


def added_error_ranking(
    prepared: Path,
    quantized: Path,
    batches: Iterable[np.ndarray],
    input_name: str,
    *,
    skip: Collection[str] = (),
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Nodes of the QDQ graph by the error their own quantization adds, worst first:
    [{"node", "op_type", "worst_channel_snr_db", "snr_db"}], the SNR of the node's twin (see
    ``ProbeBuilder``) against the FP32 node, on its worst live channel and on the whole output.

    The worst channel, not the whole tensor: a tensor whose range one large channel dominates keeps
    a high whole-tensor SNR while INT8 zeroes its other channels."""
    import onnx

    probe, twins = ProbeBuilder(onnx.load(str(prepared)), onnx.load(str(quantized))).build(set(skip))
    if not twins:
        return []
    session = _session(probe, threads)
    names = list(
        dict.fromkeys(
            [
                *(t for twin in twins for pair in twin.pairs for t in pair),
                *(t for twin in twins for t in twin.concat_inputs),
            ]
        )
    )
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
            ranking.append(
                {
                    "node": twin.node,
                    "op_type": twin.op_type,
                    "worst_channel_snr_db": min(m[0] for m in measured),
                    "snr_db": min(m[1] for m in measured),
                }
            )
    return sorted(ranking, key=lambda r: (r["worst_channel_snr_db"], r["snr_db"]))


def _session(model, threads: int = 1):
    """An ORT session of the in-memory probe model (every intermediate tensor an output)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
