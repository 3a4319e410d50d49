"""Which layers of a graph module structured pruning must leave whole, found from the graph and its shapes.

torch-pruning's dependency graph keeps residual adds, concatenations, depthwise convolutions and
squeeze-excite gates consistent, but it cannot change the numbers a graph hard-codes: an exported
model's Reshape to (N, 144, -1), its Split into (64, 64) channels, a Slice of channels 0..3, a
per-channel constant it multiplies by. Pruning a layer whose channels flow into such a node breaks
the model, or worse, runs and mixes channels up. So, on the shapes of one forward pass (the job's
input), a node is *channel-safe* when it keeps each input's channel axis as it is (elementwise ops,
activations, normalization, pooling, resizing), concatenates along it, or flattens (N, C, ...) into
(N, C*...) for a Linear; every other node that takes activations is not, and the convolutions and
linears whose channels reach it (through any chain of other nodes) are protected. The layers that
take the graph's inputs and those that make its outputs (a classifier's classes, a detector's box and
class channels) are protected too, and any layer the user names. The walk needs no list of operator
names, so it reads converted ONNX graphs and lifted .pt2 programs alike.
"""

from __future__ import annotations

import math
from typing import Any

from core.errors import PassError

INPUT_LAYER = "takes the model's input"
OUTPUT_LAYER = "makes the model's output"
NAMED = "named by the user"


def _weighted_types() -> tuple:
    import torch

    return (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)


def _shapes(node) -> list[tuple[int, ...]] | None:
    """The tensor shapes a node produced in the shape pass (None: it made no tensor)."""
    from torch.fx.passes.shape_prop import TensorMetadata

    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return [tuple(meta.shape)]
    if isinstance(meta, (list, tuple)) and meta and all(isinstance(m, TensorMetadata) for m in meta):
        return [tuple(m.shape) for m in meta]
    return None


def _tensor_inputs(node) -> tuple[list, list]:
    """(activation inputs, constant tensor inputs) of a node, each as (input node, shape)."""
    acts, consts = [], []
    for arg in node.all_input_nodes:
        shapes = _shapes(arg)
        if shapes is None or len(shapes) != 1:
            continue
        (consts if arg.op == "get_attr" else acts).append((arg, shapes[0]))
    return acts, consts


def _keeps_channels(acts: list, outs: list[tuple[int, ...]]) -> bool:
    if len(outs) != 1:
        return False
    out = outs[0]
    return all(len(s) >= 2 and len(out) == len(s) and out[:2] == s[:2] for _, s in acts)


def _concatenates(acts: list, outs: list[tuple[int, ...]]) -> bool:
    if len(outs) != 1 or len(acts) < 2:
        return False
    out = outs[0]
    same_rest = all(len(s) == len(out) and s[0] == out[0] and s[2:] == out[2:] for _, s in acts)
    return same_rest and len(out) >= 2 and sum(s[1] for _, s in acts) == out[1]


def _flattens(acts: list, outs: list[tuple[int, ...]]) -> bool:
    if len(outs) != 1 or len(acts) != 1:
        return False
    (_, s), out = acts[0], outs[0]
    return len(s) >= 3 and len(out) == 2 and out[0] == s[0] and out[1] == math.prod(s[1:])


def _channel_constant(consts: list, outs: list[tuple[int, ...]]) -> bool:
    """A constant with more than one value along the output's channel axis (as broadcasting aligns it)."""
    if len(outs) != 1 or len(outs[0]) < 2:
        return False
    rank = len(outs[0])
    return any(len(s) >= rank - 1 and s[len(s) - (rank - 1)] > 1 for _, s in consts)


def channel_unsafe(node, modules: dict[str, Any]) -> str | None:
    """Why pruning the channels that reach ``node`` would break it (None: torch-pruning keeps it right)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    if node.op == "call_module" and isinstance(modules[node.target], _weighted_types()):
        return None
    acts, consts = _tensor_inputs(node)
    outs = _shapes(node)
    if not acts or outs is None:
        return None  # shape arithmetic, constants
    if _channel_constant(consts, outs):
        return "multiplies or adds a per-channel constant"
    if _keeps_channels(acts, outs) or _concatenates(acts, outs) or _flattens(acts, outs):
        return None
    shapes = ", ".join(str(list(s)) for _, s in acts)
    return f"{node.name} reshapes, splits or slices the channels ({shapes} -> {', '.join(str(list(o)) for o in outs)})"


def _walk(start_nodes, is_weighted, step) -> list:
    """The weighted nodes reached from ``start_nodes`` along ``step`` (a node's neighbours, or None to stop
    there) without passing another weighted node."""
    seen, found, stack = set(), [], list(start_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_weighted(node):
            found.append(node)
            continue
        stack.extend(step(node) or ())
    return found


def _producers(start_nodes, is_weighted) -> list:
    """The weighted nodes whose outputs reach ``start_nodes`` without passing another weighted node."""
    return _walk(start_nodes, is_weighted, lambda node: node.all_input_nodes)


def _consumers(start_nodes, is_weighted) -> list:
    """The weighted nodes the input's activations reach first (not through shape arithmetic: a Shape of the
    input read deep in the network does not make that layer an input layer)."""
    return _walk(
        start_nodes,
        is_weighted,
        lambda node: node.users if node.op == "placeholder" or _shapes(node) is not None else None,
    )


def resolve_names(module, names: list[str], aliases: dict[str, str]) -> dict[str, str]:
    """{submodule name: "named by the user"} for the layers a user named (module names, or the upload's own
    names through ``aliases``); a name the model does not have is a PassError."""
    modules = dict(module.named_modules())
    resolved, missing = {}, []
    for name in names:
        target = name if name in modules else aliases.get(name)
        if target is None or target not in modules:
            missing.append(name)
        else:
            resolved[target] = NAMED
    if missing:
        raise PassError(
            f"protect names layers the model does not have: {missing}",
            code="unknown_modules",
            details={"unknown": missing, "some_names": sorted(aliases or modules)[:20]},
        )
    return resolved


def protected_layers(gm, example: tuple, names: list[str] | None = None, aliases: dict | None = None) -> dict[str, str]:
    """{submodule name: why it keeps its output channels} for a torch.fx GraphModule, from one shape pass
    on ``example``."""
    from torch.fx.passes.shape_prop import ShapeProp

    modules = dict(gm.named_modules())
    weighted = _weighted_types()

    def is_weighted(node) -> bool:
        return node.op == "call_module" and isinstance(modules.get(node.target), weighted)

    ShapeProp(gm).propagate(*example)
    why: dict[str, str] = {}
    for node in gm.graph.nodes:
        reason = channel_unsafe(node, modules)
        if reason:
            for producer in _producers(node.all_input_nodes, is_weighted):
                why.setdefault(producer.target, reason)
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    for producer in _producers(outputs, is_weighted):
        why[producer.target] = OUTPUT_LAYER
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for consumer in _consumers(placeholders, is_weighted):
        why.setdefault(consumer.target, INPUT_LAYER)
    why.update(resolve_names(gm, names or [], aliases or {}))
    return why


def check_pruned(module, example: tuple, want_shapes: list[tuple[int, ...]]) -> None:
    """The pruned module runs and gives outputs of the original's shapes, or the step fails saying so."""
    from worker.trainable import outputs_of

    try:
        got = [tuple(o.shape) for o in outputs_of(module, example)]
    except Exception as exc:  # whatever the graph raises on channels it hard-codes
        raise PassError(
            f"the pruned graph does not run: {str(exc).splitlines()[0][:300]}; name the layers feeding that node "
            "in protect",
            code="pruning_failed",
        ) from exc
    if got != want_shapes:
        raise PassError(
            f"the pruned graph's outputs have shapes {got}, not the original's {want_shapes}",
            code="pruning_failed",
        )
