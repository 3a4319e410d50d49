"""Any model upload as a trainable torch module, and back to the upload's own format.

The training steps (prune_structured, prune_unstructured, distill, finetune) take every model format:
a torchvision state_dict is rebuilt from its architecture; an ONNX graph is converted
(worker.onnx_to_torch: real Conv/BatchNorm/Linear modules that torch-pruning can prune); a .pt2
program is lifted (worker.pt2_lift); a TorchScript module goes through the TorchScript ONNX exporter
and the ONNX converter. Before anything is trained, the module is checked against the upload on the
job's inputs (``round_trip_error``): a conversion that changes the model's outputs is refused, never
pruned. ``save_trainable`` writes the result in the format it came in, with the upload's input and
output names and its dynamic axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.errors import PassError
from core.formats import EXPORTED_PROGRAM, ONNX, STATE_DICT, TORCHSCRIPT
from worker.passes.base import ArtifactRef, PassContext

# The converted module must give the upload's outputs to this relative error (max |diff| / max |ref|)
# on the job's inputs before it is trained; float32 reassociation stays orders of magnitude below.
ROUND_TRIP_TOLERANCE = 1e-3
# Below this an output's size does not scale the error: a text detector's map on random inputs peaks at
# 8e-6, where float32's own rounding reads as a 1% "relative" error.
ABSOLUTE_FLOOR = 1e-3
ONNX_EXPORT_OPSET = 17


@dataclass
class Trainable:
    """A module made from an artifact, with what it takes to write it back like the artifact."""

    module: Any  # torch.nn.Module
    format: str
    input_names: list[str]
    output_names: list[str]
    # {input or output name: {axis: symbolic name}}: the upload's dimensions that are not fixed.
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # The names a user may give a layer by (an ONNX node name, a .pt2 module path) -> submodule name.
    aliases: dict[str, str] = field(default_factory=dict)
    opset: int = ONNX_EXPORT_OPSET
    # An ONNX upload's declared input/output shapes (ints, symbolic names, None), written back as they were.
    declared: dict[str, list] = field(default_factory=dict)


def _declared(model) -> dict[str, list]:
    return {
        v.name: [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim
        ]
        for v in [*model.graph.input, *model.graph.output]
        if v.type.tensor_type.HasField("shape")
    }


def _declare(path: Path, declared: dict[str, list]) -> None:
    """Write the upload's declared shapes over what the exporter inferred (the outputs' shapes are the
    upload's: check_pruned and check_saved hold them to it)."""
    import onnx

    model = onnx.load(str(path))
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dims = declared.get(value.name)
        shape = value.type.tensor_type.shape
        if dims is None or len(shape.dim) not in (0, len(dims)):
            continue
        shape.ClearField("dim")
        for size in dims:
            dim = shape.dim.add()
            if isinstance(size, int):
                dim.dim_value = size
            elif size:
                dim.dim_param = size
        changed = True
    if changed:
        onnx.save(model, str(path))


def _onnx_io(model) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    axes: dict[str, dict[int, str]] = {}
    for value in list(inputs) + list(model.graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                axes.setdefault(value.name, {})[axis] = dim.dim_param or f"{value.name}_{axis}"
    return [i.name for i in inputs], [o.name for o in model.graph.output], axes


def _from_onnx(path: Path) -> Trainable:
    import onnx

    from worker.onnx_to_torch import convert_onnx

    model = onnx.load(str(path))
    module = convert_onnx(model)
    inputs, outputs, axes = _onnx_io(model)
    aliases = dict(module.meta.get("onnx_module_names", {}))  # ONNX node name -> submodule, as converted
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), ONNX_EXPORT_OPSET)
    return Trainable(module, ONNX, inputs, outputs, axes, aliases, max(11, min(opset, 20)), _declared(model))


def _from_exported_program(path: Path) -> Trainable:
    import torch

    from worker.pt2_lift import lift_exported_program, module_names

    program = torch.export.load(str(path))
    module = lift_exported_program(program)
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    axes: dict[str, dict[int, str]] = {}
    for node in placeholders:
        val = node.meta.get("val")
        for axis, size in enumerate(getattr(val, "shape", ())):
            if not isinstance(size, int):
                axes.setdefault(node.name, {})[axis] = str(size)
    outputs = [f"output{i}" if i else "output" for i in range(_count_outputs(program))]
    aliases = {path: name for name, path in module_names(module).items()}
    return Trainable(module, EXPORTED_PROGRAM, [n.name for n in placeholders], outputs, axes, aliases)


def _count_outputs(program) -> int:
    return len(program.graph_signature.user_outputs)


def _from_torchscript(path: Path, ctx: PassContext) -> Trainable:
    """TorchScript has no graph torch.export reads: it goes through the TorchScript ONNX exporter (the one
    export_onnx uses) and the ONNX converter."""
    import torch

    from worker.data import sample_tensors

    script = torch.jit.load(str(path), map_location="cpu").eval()
    names = [s["name"] for s in ctx.input_spec]
    onnx_path = ctx.work_dir / "torchscript.onnx"
    try:
        torch.onnx.export(
            script,
            sample_tensors(ctx.input_spec),
            str(onnx_path),
            dynamo=False,
            opset_version=ONNX_EXPORT_OPSET,
            input_names=names,
            dynamic_axes={n: {0: "batch"} for n in names},
        )
    except Exception as exc:  # the exporter raises many types for operators it cannot export
        raise PassError(
            f"the TorchScript model could not be turned into a graph to train: {str(exc).splitlines()[0][:300]}",
            code="not_trainable",
        ) from exc
    trainable = _from_onnx(onnx_path)
    onnx_path.unlink()
    return replace(trainable, format=TORCHSCRIPT)


def load_trainable(ref: ArtifactRef, ctx: PassContext) -> Trainable:
    """The artifact as a trainable module (float32, eval mode, on the CPU)."""
    from worker.torch_models import module_from_state_dict

    if ref.format == STATE_DICT:
        module = module_from_state_dict(ref)
        names = [s["name"] for s in ctx.input_spec]
        return Trainable(module, STATE_DICT, names, ["output"], {n: {0: "batch"} for n in names})
    if ref.format == ONNX:
        trainable = _from_onnx(ref.path)
    elif ref.format == EXPORTED_PROGRAM:
        trainable = _from_exported_program(ref.path)
    elif ref.format == TORCHSCRIPT:
        trainable = _from_torchscript(ref.path, ctx)
    else:
        raise PassError(f"a {ref.format} model cannot be trained by the service", code="not_trainable")
    trainable.module.float().eval()
    names = [s["name"] for s in ctx.input_spec]
    if len(names) == len(trainable.input_names) and names != trainable.input_names:
        # What is written answers to the job's input names (the upload's, as the API read them).
        renamed = dict(zip(trainable.input_names, names, strict=True))
        trainable.dynamic_axes = {renamed.get(k, k): v for k, v in trainable.dynamic_axes.items()}
        trainable.declared = {renamed.get(k, k): v for k, v in trainable.declared.items()}
        trainable.input_names = names
    return trainable


def outputs_of(module, args) -> list:
    """The module's outputs on ``args`` as a list of tensors (one output or a tuple)."""
    import torch

    with torch.no_grad():
        out = module(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def round_trip_error(trainable: Trainable, ref: ArtifactRef, ctx: PassContext, feeds: dict) -> float:
    """The module against the artifact it was made from, on ``feeds``: max relative error over the outputs
    (inf when a shape differs)."""
    import numpy as np
    import torch

    from worker.runtime import load_runner

    try:
        want = load_runner(ref, threads=ctx.threads)(feeds)
        got = outputs_of(trainable.module, tuple(torch.from_numpy(v) for v in feeds.values()))
    except Exception as exc:  # a runtime or the module refusing these inputs (a batch the file hard-codes)
        raise PassError(
            f"{ref.name} and the module made from it could not both run the check inputs: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
            code="conversion_mismatch",
        ) from exc
    worst = 0.0
    for w, g in zip(want, got, strict=False):
        g = g.detach().numpy()
        if w.shape != g.shape:
            return float("inf")
        if not w.size:
            continue
        scale = max(float(np.abs(w).max()), ABSOLUTE_FLOOR)
        worst = max(worst, float(np.abs(w.astype(np.float64) - g).max()) / scale)
    return worst if len(want) == len(got) else float("inf")


def check_round_trip(trainable: Trainable, ref: ArtifactRef, ctx: PassContext, feeds: dict) -> float:
    """round_trip_error, refused over ROUND_TRIP_TOLERANCE (nothing is trained on a wrong conversion)."""
    if ref.format == STATE_DICT:
        return 0.0  # the module is the weights' own architecture, not a conversion
    error = round_trip_error(trainable, ref, ctx, feeds)
    if not error <= ROUND_TRIP_TOLERANCE:
        raise PassError(
            f"the {ref.format} model turned into a trainable module gives other outputs than the upload "
            f"(relative error {error:.3g} > {ROUND_TRIP_TOLERANCE}); it is not trained",
            code="conversion_mismatch",
            details={"relative_error": error},
        )
    return error


def _dynamic_shapes(trainable: Trainable, args: tuple) -> tuple | None:
    import torch

    shapes = []
    for name, arg in zip(trainable.input_names, args, strict=True):
        axes = trainable.dynamic_axes.get(name, {})
        shapes.append({axis: torch.export.Dim.AUTO for axis in axes if axis < arg.dim()} or None)
    return tuple(shapes) if any(shapes) else None


def export_program(trainable: Trainable, args: tuple):
    """torch.export of the module with the upload's dynamic axes open where the graph allows; else at the
    shapes of ``args``, and then ``trainable.dynamic_axes`` is emptied (what was written is fixed)."""
    import logging

    import torch

    module = trainable.module.eval()
    dynamic = _dynamic_shapes(trainable, args)
    traced = args
    if dynamic and any(0 in (d or {}) and a.shape[0] == 1 for d, a in zip(dynamic, args, strict=True)):
        # torch.export takes a size of 1 for a constant: the open batch is traced at 2.
        traced = tuple(torch.cat([a, a]) if 0 in (d or {}) else a for d, a in zip(dynamic, args, strict=True))
    try:
        return torch.export.export(module, traced, dynamic_shapes=dynamic)
    except Exception as first:  # torch.export raises several error types; fixed shapes are the fallback
        logging.getLogger("cvopt.pass").warning("exporting at fixed shapes: %s", str(first).splitlines()[0][:300])
        trainable.dynamic_axes = {}
        try:
            return torch.export.export(module, args)
        except Exception as exc:
            raise PassError(
                f"torch.export of the trained model failed: {str(exc).splitlines()[0][:300]}", code="export_failed"
            ) from first


def write_onnx(trainable: Trainable, module, args: tuple, out: Path) -> None:
    """``module`` (the trainable's, or a candidate made from it) as ONNX with the trainable's names and axes.

    The torch.export-based exporter first: its shape arithmetic is compact (the converted YOLO detector: 275 nodes,
    against 921 from the TorchScript exporter) and reads back into a module torch.export can export again (the
    TorchScript exporter's Shape/Gather/Cast chains convert into data-dependent sizes that torch.export refuses);
    the TorchScript exporter where the first fails."""
    import contextlib
    import io

    import torch

    common = {
        "input_names": trainable.input_names,
        "output_names": trainable.output_names,
        "dynamic_axes": trainable.dynamic_axes or None,
    }
    first: Exception | None = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(
                module.eval(),
                args,
                str(out),
                dynamo=True,
                opset_version=max(18, trainable.opset),
                verbose=False,
                **common,
            )
        return
    except Exception as exc:  # the exporter raises many types
        first = exc
    try:
        torch.onnx.export(
            module.eval(),
            args,
            str(out),
            dynamo=False,
            opset_version=trainable.opset,
            do_constant_folding=True,
            **common,
        )
    except Exception as exc:  # the exporter raises many types
        raise PassError(
            f"ONNX export of the trained model failed: {str(exc).splitlines()[0][:300]}", code="export_failed"
        ) from first


def save_trainable(trainable: Trainable, ctx: PassContext, stem: str) -> Path:
    """The module written in ``trainable.format`` under ctx.work_dir (names and dynamic axes as the upload's)."""
    import torch

    from worker.data import sample_tensors
    from worker.torch_models import save_module

    module = trainable.module.cpu().eval()
    args = sample_tensors(ctx.input_spec)
    if trainable.format == STATE_DICT:
        out = ctx.work_dir / f"{stem}.pt"
        save_module(module, out)
    elif trainable.format == ONNX:
        out = ctx.work_dir / f"{stem}.onnx"
        write_onnx(trainable, module, args, out)
        _declare(out, trainable.declared)
    elif trainable.format == EXPORTED_PROGRAM:
        out = ctx.work_dir / f"{stem}.pt2"
        torch.export.save(export_program(trainable, args), str(out))
    else:
        out = ctx.work_dir / f"{stem}.ts.pt"
        with torch.no_grad():
            traced = torch.jit.trace(module, args, check_trace=False)
        torch.jit.save(traced, str(out))
    return out


def check_saved(trainable: Trainable, path: Path, ctx: PassContext) -> float:
    """The written artifact against the module it was written from (on random inputs at the job's
    shape and at one more sample): the relative error, refused over ROUND_TRIP_TOLERANCE."""
    from worker.data import sample_feeds

    if trainable.format == STATE_DICT:
        return 0.0  # the weights themselves, written by torch.save: nothing was converted
    ref = ArtifactRef(path.name, trainable.format, path)
    worst = 0.0
    for batch in dict.fromkeys((None, int(ctx.input_spec[0]["shape"][0]) + 1)):
        if batch is not None and (
            trainable.format == TORCHSCRIPT  # its batch axis is assumed, not known: the job's batch only
            or not all(0 in trainable.dynamic_axes.get(n, {}) for n in trainable.input_names)
        ):
            continue
        worst = max(worst, round_trip_error(trainable, ref, ctx, sample_feeds(ctx.input_spec, batch=batch, seed=3)))
    if not worst <= ROUND_TRIP_TOLERANCE:
        raise PassError(
            f"the written {trainable.format} model disagrees with the trained module (relative error {worst:.3g})",
            code="export_mismatch",
            details={"relative_error": worst},
        )
    return worst
