"""Mixed-precision TFLite: ai-edge-quantizer's static INT8 (int8 activations and int8 weights, calibrated on the
job's images) over a float ``.tflite``, with the ops that add the most error kept float, for when the full
INT8 conversion misses the job's tolerance on the task's metric.

The search, as the ONNX INT8 fallback does it (worker.quantization.gate.per_layer_fallback): judge everything
INT8 first; then rank the ops by the error each ADDS (ai-edge-quantizer's per-tensor comparison of the
all-INT8 model with the float one: the SNR an op's output loses against its worst activation input, in dB; a
cumulative per-tensor error would blame every op after the damaging one) and keep 1, 2, 4, ... of them float
(ai-edge-quantizer's NO_QUANTIZE on the op's scope, its output tensors' names) until the metric is within the
tolerance, up to a cap. The caller judges each candidate (``judge``: path -> the task metric with its drop)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from worker.metrics.tasks import meets_tolerance
from worker.quantization.gate import attempt_entry

# Samples the per-tensor comparison runs on: the ranking settles on a few.
RANK_SAMPLES = 8


def _quantizer(float_path: Path, kept_float: Iterable[str]):
    """A quantizer with the static INT8 recipe over every supported op and NO_QUANTIZE on the kept ops' scopes
    (later recipe entries win in ai-edge-quantizer's recipe manager)."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(str(float_path))
    q.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
    for scope in kept_float:
        q.update_quantization_recipe(
            regex=f"^{re.escape(scope)}$",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            algorithm_key=AlgorithmName.NO_QUANTIZE,
        )
    return q


def _signature(float_path: Path) -> tuple[str, str]:
    """(the signature key, its input's name): ai-edge-quantizer feeds signatures by name."""
    from ai_edge_litert import interpreter as litert

    signatures = litert.Interpreter(model_path=str(float_path)).get_signature_list()
    key = next(iter(signatures))
    return key, signatures[key]["inputs"][0]


def _op_graph(float_path: Path) -> list[dict[str, Any]]:
    """Every op of the float model: its type, scope (ai-edge-quantizer's: output tensor names, each followed
    by ';'), output names and the names of its activation inputs (tensors some op or the graph input makes)."""
    from ai_edge_litert import interpreter as litert

    interp = litert.Interpreter(model_path=str(float_path))
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()  # noqa: SLF001 - the interpreter's only per-node view
    produced = {int(t) for op in ops for t in op["outputs"]} | {d["index"] for d in interp.get_input_details()}
    graph = []
    for op in ops:
        outputs = [names[int(t)] for t in op["outputs"] if int(t) >= 0]
        graph.append(
            {
                "op": op["op_name"],
                "scope": "".join(f"{name};" for name in outputs),
                "outputs": outputs,
                "inputs": [names[int(t)] for t in op["inputs"] if int(t) in produced],
            }
        )
    maker = {name: node["scope"] for node in graph for name in node["outputs"]}
    for node in graph:
        node["producers"] = sorted({maker[name] for name in node["inputs"] if name in maker})
    return graph


def _added_error(q, signature: str, name: str, probe: list[np.ndarray], graph: list[dict]) -> list[dict[str, Any]]:
    """The ops of ``graph`` by the SNR (dB) their outputs lose against their worst activation input in the
    all-INT8 model ``q`` (quantized), most damaging first; ops that add nothing are left out."""
    from ai_edge_quantizer.utils.validation_utils import ValidationErrorMetric

    result = q.validate(
        {signature: [{name: x} for x in probe]}, error_metrics=[ValidationErrorMetric.SNR], num_threads=1
    )
    # SNR in dB, clipped to a finite range (an exact tensor's SNR is signal power over the metric's epsilon;
    # a zero tensor's is 0): the report is JSON.
    snr = {
        tensor: float(np.clip(10 * np.log10(max(float(values["snr"]), 1e-12)), -120.0, 200.0))
        for tensor, values in result.get_all_tensor_results().items()
        if math.isfinite(float(values["snr"]))
    }
    ranked = []
    for node in graph:
        outs = [snr[t] for t in node["outputs"] if t in snr]
        ins = [snr[t] for t in node["inputs"] if t in snr]
        if not outs:
            continue  # not compared (no float counterpart): nothing to blame it for
        out = min(outs)
        added = min(ins) - out if ins else 0.0
        if added > 0:
            ranked.append(
                {
                    "op": node["op"],
                    "scope": node["scope"],
                    "producers": node["producers"],
                    "snr_db": out,
                    "added_db": added,
                }
            )
    ranked.sort(key=lambda entry: -entry["added_db"])
    return ranked


def _float_scopes(kept: list[dict[str, Any]]) -> list[str]:
    """The scopes that keep ``kept`` float: each op with the producers of its activation inputs. A float op
    whose input still comes out of an INT8 op reads that tensor through a dequantize, with the damage done:
    a whole-tensor SNR hides one huge channel crushing the rest (the outlier feature of a detector head's
    Concat), and the error shows only at the op that reads it."""
    return sorted({scope for op in kept for scope in (op["scope"], *op["producers"])})


def _counts(most: int) -> list[int]:
    """1, 2, 4, ... up to ``most`` ops kept float: each try doubles the last."""
    return sorted({min(2**i, most) for i in range(most.bit_length() + 1)} - {0})


def _badness(metric: dict[str, Any]) -> tuple[bool, float]:
    floor = metric.get("floor")
    return (bool(floor and not floor["met"]), float(metric["drop"]))


def mixed_precision(
    float_path: Path,
    work_dir: Path,
    *,
    calibration: list[np.ndarray],
    judge: Callable[[Path], dict[str, Any]],
    tolerance: float,
    max_float_ops: int,
    threads: int,
    check_cancelled: Callable[[], None] = lambda: None,
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(the best candidate, its metric, the report): ai-edge-quantizer's all-INT8 model when it meets the
    tolerance, else the most damaging ops kept float, doubling their number up to ``max_float_ops``, until one
    does; the best found when none does (report["tolerance_met"] says which). ``calibration``: input batches in
    the float model's own layout and batch."""
    signature, name = _signature(float_path)
    full = _quantizer(float_path, ())
    qsvs = full.calibrate({signature: [{name: x} for x in calibration]}, num_threads=threads)
    attempts: list[dict[str, Any]] = []

    def attempt(q, kept: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        check_cancelled()
        path = work_dir / f"model.mixed{len(kept)}.tflite"
        result = q.quantize(qsvs, enable_progress_bar=False, enable_progress_report=False)
        result.export_model(str(path), overwrite=True)
        metric = judge(path)
        attempts.append(
            {
                "route": "ai_edge_quantizer",
                "ranked_ops": len(kept),
                "float_ops": len(_float_scopes(kept)),
                **attempt_entry(metric),
            }
        )
        return path, metric

    path, metric = attempt(full, [])
    best: tuple[Path, dict[str, Any], list[dict[str, Any]]] = (path, metric, [])
    report: dict[str, Any] = {"attempts": attempts, "ranked_by": "added_error", "kept_float": []}
    if not meets_tolerance(metric, tolerance):
        ranked = _added_error(full, signature, name, calibration[:RANK_SAMPLES], _op_graph(float_path))
        report["most_damaging"] = [_entry(op) for op in ranked[:16]]
        most = min(max_float_ops, len(ranked))
        for k in _counts(most):
            path, metric = attempt(_quantizer(float_path, _float_scopes(ranked[:k])), ranked[:k])
            if _badness(metric) < _badness(best[1]):
                best = (path, metric, ranked[:k])
            if meets_tolerance(metric, tolerance):
                break
        report["max_float_ops"] = most
    path, metric, kept = best
    report["kept_float"] = [_entry(op) for op in kept]
    report["float_scopes"] = _float_scopes(kept)
    report["tolerance_met"] = meets_tolerance(metric, tolerance)
    return path, metric, report


def _entry(op: dict[str, Any]) -> dict[str, Any]:
    """An op in the report: its type, output tensor, its output's SNR against float in the all-INT8 model and
    the dB it loses against its worst input there."""
    return {
        "op": op["op"],
        "tensor": op["scope"].rstrip(";"),
        "snr_db": round(op["snr_db"], 2),
        "added_db": round(op["added_db"], 2),
    }
