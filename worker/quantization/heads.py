"""Mixed-scale heads: a Concat whose inputs' calibrated ranges differ by a large factor (a YOLO head
joins 0..640 pixel boxes with 0..1 class scores) cannot share one INT8 scale, so it and everything
after it up to the outputs stay float; the branches before it are quantized each at its own scale.
(Keeping the head's arithmetic before it float too, DFL and sigmoid, as Ultralytics' recipes do, was
measured on YOLOv8n: the class channels' SNR did not move, 12.8 vs 12.5 dB; the damage left comes from
the quantized features, which the task-metric search and the class-channel floor judge.)"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

# A Concat whose inputs' largest magnitudes differ by this factor or more cannot share one INT8 scale:
# the smaller input keeps at most 8 - log2(factor) bits, 4 at 16x. YOLO heads sit at 100-1000x (0..1
# scores beside 0..640 pixel boxes); concats of feature maps inside a network sit near 1-4x.
HEAD_RANGE_RATIO = 16.0
# Ops with learned weights: a Concat with one of them downstream is a feature concat inside the
# network (keeping all after it in float would undo the quantization), not an output head.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def calibrated_ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """tensor -> (lowest, highest) from ORT's calibration cache file."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = {}
    for tensor, data in load_tensors_data(cache).data.items():
        if hasattr(data, "lowest") and hasattr(data, "highest"):
            ranges[tensor] = (float(np.min(data.lowest)), float(np.max(data.highest)))
    return ranges


def mixed_scale_heads(
    model,
    ranges: dict[str, tuple[float, float]],
    *,
    ratio: float = HEAD_RANGE_RATIO,
    op_types: Collection[str] | None = None,
) -> list[dict[str, Any]]:
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
        float_nodes.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "reason": (
                    f"mixed-scale head: its inputs' calibrated ranges differ {factor:.0f}x (largest |x| "
                    f"{max(live):.4g} vs {min(live):.4g}); one INT8 scale for both would leave the smaller input "
                    f"{255 / factor:.1f} of 255 levels, so it stays float with all after it"
                ),
                "range_ratio": float(factor),
                "input_ranges": [{"tensor": t, "min": lo, "max": hi} for t, lo, hi in spans],
            }
        )
        listed.add(node.name)
        for later in after:
            if later.name and later.name not in listed:
                float_nodes.append(
                    {
                        "node": later.name,
                        "op_type": later.op_type,
                        "reason": f"after the mixed-scale head {node.name}, up to the outputs",
                    }
                )
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
