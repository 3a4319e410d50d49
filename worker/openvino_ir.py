"""What every OpenVINO step shares (convert_openvino, quantize_openvino): reading the source, fixing its
inputs at the job's shapes (static_shape), and the IR archive they write, one zip of model.xml +
model.bin, byte for byte the same for the same IR, with node names that do not depend on what the
process converted before; and reading that archive back (the runtime, the benchmark's batch check)."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from core.errors import PassError
from core.formats import EXPORTED_PROGRAM
from worker.passes.base import ArtifactRef

# (member, how it is stored): the XML is text and deflates well; the weights barely compress, and
# stored uncompressed they read straight out of the archive.
IR_MEMBERS = (("model.xml", zipfile.ZIP_DEFLATED), ("model.bin", zipfile.ZIP_STORED))
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# A name OpenVINO gave a node it made (a folded constant, a decomposed op): <Type>_<n>, n from a
# counter shared by the whole process.
GENERATED_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_\d+$")


def read_source(source: ArtifactRef) -> Any:
    """An ONNX model or a torch.export program (with the program's own shapes) as an ov.Model with stable
    node names; a graph OpenVINO's frontends cannot read is a clean failure (conversion_failed)."""
    import openvino as ov

    try:
        if source.format != EXPORTED_PROGRAM:
            model = ov.convert_model(str(source.path))
        else:
            import torch

            program = torch.export.load(str(source.path))
            model = ov.convert_model(program)
            _keep_program_shapes(model, program)
    except PassError:
        raise
    except Exception as exc:  # the frontends raise OpConversionFailure, RuntimeError, torch's own errors
        message = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        raise PassError(
            f"OpenVINO could not convert the model: {type(exc).__name__}: {message}", code="conversion_failed"
        ) from exc
    stable_node_names(model)
    return model


def fix_input_shapes(model: Any, input_spec: list[dict[str, Any]]) -> list[list[int]]:
    """Fix every input of ``model`` at its shape in the job's input spec (matched by name, else by
    position): OpenVINO then compiles its kernels for that one shape, faster at it than for an open
    axis, and the IR takes that shape only. (The shapes, in the model's input order, for the meta.)"""
    import openvino as ov

    by_name = {spec["name"]: spec for spec in input_spec}
    specs = [next((by_name[n] for n in port.get_names() if n in by_name), None) for port in model.inputs]
    if any(spec is None for spec in specs):
        if len(input_spec) != len(model.inputs):
            raise PassError(
                f"the job names {len(input_spec)} inputs, the model has {len(model.inputs)}: "
                "cannot fix its input shapes",
                code="shape_mismatch",
            )
        specs = list(input_spec)
    shapes = [[int(d) for d in spec["shape"]] for spec in specs]
    try:
        model.reshape({port: ov.PartialShape(shape) for port, shape in zip(model.inputs, shapes, strict=True)})
    except RuntimeError as exc:  # a graph that hard-codes another shape (a Reshape, a Concat's operands)
        raise PassError(
            f"OpenVINO cannot fix the model's inputs at {shapes}: {_first_line(exc)}", code="shape_mismatch"
        ) from exc
    return shapes


def ir_batch_dims(model: Any) -> list[int | None]:
    """Dim 0 of every input of an ov.Model: its size when fixed, None when open (or a range)."""
    dims: list[int | None] = []
    for port in model.inputs:
        shape = port.get_partial_shape()
        fixed = shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_static
        dims.append(shape[0].get_length() if fixed else None)
    return dims


def read_ir_archive(path: Path, name: str) -> Any:
    """The IR archive at ``path`` as an ov.Model, read from memory: the weights are copied once and
    nothing is unpacked on disk, so there is no directory to clean. A file that is not such an
    archive is corrupt_model (``name``: the artifact's, for the message)."""
    import numpy as np
    import openvino as ov

    try:
        with zipfile.ZipFile(path) as archive:
            xml, weights = (archive.read(member) for member, _ in IR_MEMBERS)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise PassError(
            f"{name} is not an OpenVINO IR archive (model.xml + model.bin): {exc}", code="corrupt_model"
        ) from exc
    try:
        return ov.Core().read_model(xml, ov.Tensor(np.frombuffer(weights, np.uint8)))
    except RuntimeError as exc:  # OpenVINO raises RuntimeError for an IR it cannot read
        raise PassError(f"OpenVINO cannot load {name}: {_first_line(exc)}", code="corrupt_model") from exc


def _first_line(exc: Exception) -> str:
    message = str(exc).strip()
    return message.splitlines()[0][:300] if message else type(exc).__name__


def _keep_program_shapes(model: Any, program: Any) -> None:
    """convert_model leaves every dimension of a torch.export program open; give the IR the
    program's own shapes (a dimension the program declared dynamic stays open) so that it runs
    where the program runs, at the batch sizes it was exported for."""
    import openvino as ov

    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [
        [d if isinstance(d, int) else -1 for d in node.meta["val"].shape]
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs and hasattr(node.meta.get("val"), "shape")
    ]
    if len(shapes) == len(model.inputs):
        model.reshape({port: ov.PartialShape(shape) for port, shape in zip(model.inputs, shapes, strict=True)})


def save_ir_archive(model: Any, work_dir: Path, target: Path, *, compress_to_fp16: bool) -> int:
    """The model as the IR archive at ``target`` (node names made stable first), by way of a scratch
    folder under ``work_dir`` that is removed; the size of its weights (model.bin) in bytes."""
    import openvino as ov

    stable_node_names(model)
    ir_dir = work_dir / "ir"
    ir_dir.mkdir(parents=True, exist_ok=True)
    try:
        # save_model compresses to FP16 unless told not to: say it either way.
        ov.save_model(model, str(ir_dir / "model.xml"), compress_to_fp16=compress_to_fp16)
        write_ir_archive(ir_dir, target)
        return (ir_dir / "model.bin").stat().st_size
    finally:
        shutil.rmtree(ir_dir, ignore_errors=True)


def stable_node_names(model: Any) -> None:
    """Renumber the names OpenVINO generated by the node's place in the graph: they come from a
    process-wide counter, so the same model converted after another would get another model.xml
    (and another sha256). Names the source gave its nodes are kept; one that looks generated
    ("Reshape_15") gets its place too, which names the same node as well. A model without a name of
    its own (a torch.export program's "Model18", from another counter) is "model"."""
    if re.fullmatch(r"Model\d+", model.get_friendly_name()):
        model.set_friendly_name("model")
    for index, op in enumerate(model.get_ordered_ops()):
        generated = GENERATED_NAME.match(op.get_friendly_name())
        if generated:
            op.set_friendly_name(f"{generated.group(1)}_n{index}")


def write_ir_archive(ir_dir: Path, target: Path) -> None:
    """model.xml + model.bin into one zip, byte for byte the same for the same IR: fixed member
    order, timestamps and permissions (the cache and the download's sha256 rely on it)."""
    with zipfile.ZipFile(target, "w") as archive:
        for name, compression in IR_MEMBERS:
            path = ir_dir / name
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = compression
            info.external_attr = 0o644 << 16
            info.file_size = path.stat().st_size  # lets zipfile pick ZIP64 for a weights file over 2 GiB
            with open(path, "rb") as src, archive.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
