"""ONNX graph rewrites and facts that several steps share (export_onnx, benchmark, the INT8
quantizer): pure functions over an onnx.ModelProto; onnx itself is imported inside them."""

from __future__ import annotations


def constants_to_initializers(model) -> int:
    """Move tensors held by Constant nodes into initializers. Some exporters put every weight
    in a Constant node; quantizers (and per-channel scales) only look at initializers."""
    from onnx import numpy_helper

    moved, keep = 0, []
    initializer_names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.t is not None and a.HasField("t")), None)
        if node.op_type == "Constant" and value is not None and node.output[0] not in initializer_names:
            tensor = numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0])
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def input_batch_dims(model) -> list[int | None]:
    """Dim 0 of every graph input: its size when fixed, None when it is symbolic or missing."""
    initializers = {t.name for t in model.graph.initializer}  # old IR versions list them as inputs
    dims = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = value.type.tensor_type.shape.dim
        dims.append(shape[0].dim_value if shape and shape[0].HasField("dim_value") else None)
    return dims


def with_open_batch(model, batch: int):
    """A copy of ``model`` whose inputs (and outputs) of first dimension ``batch`` take any batch, and whose
    Reshape targets that hard-code the batch follow their input instead. Whether the graph then computes each
    sample as before is for the caller to check: other operators may still hard-code the batch."""
    import onnx
    from onnx import numpy_helper

    opened = onnx.ModelProto()
    opened.CopyFrom(model)
    graph = opened.graph
    initializers = {t.name: t for t in graph.initializer}
    for value in [*graph.input, *graph.output]:
        shape = value.type.tensor_type.shape.dim
        if value.name not in initializers and shape and shape[0].HasField("dim_value") and shape[0].dim_value == batch:
            shape[0].dim_param = "batch"
    rewritten: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        target = numpy_helper.to_array(initializers[node.input[1]])
        if target.ndim != 1 or not len(target) or target[0] != batch:
            continue
        allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if -1 in target and allow_zero:
            continue  # 0 would mean a zero-sized dimension, and a second -1 is not allowed
        if node.input[1] not in rewritten:
            # A new tensor: the old one may feed operators where the batch does not belong.
            opened_target = target.copy()
            opened_target[0] = 0 if -1 in target else -1  # 0 copies the input's dim 0
            name = f"{node.input[1]}_open_batch"
            graph.initializer.append(numpy_helper.from_array(opened_target, name))
            rewritten[node.input[1]] = name
        node.input[1] = rewritten[node.input[1]]
    # Inferred intermediate shapes name the old batch and would contradict the open one.
    del graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(opened)
    except Exception:  # inference is optional here: runtimes infer shapes themselves
        return opened


def graph_io_names(path) -> tuple[list[str], list[str]]:
    """(input names, output names) of an ONNX file's graph, initializers left out, weights not read."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in initializers], [v.name for v in model.graph.output]


def rename_io(model, inputs: list[str], outputs: list[str]) -> bool:
    """Give the graph's inputs and outputs these names (where the counts agree), renaming every use:
    an ONNX model made from a converted or exported upload answers to the upload's own names."""
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    mapping: dict[str, str] = {}
    if len(graph_inputs) == len(inputs):
        mapping.update({v.name: new for v, new in zip(graph_inputs, inputs, strict=True) if v.name != new})
    if len(model.graph.output) == len(outputs):
        mapping.update({v.name: new for v, new in zip(model.graph.output, outputs, strict=True) if v.name != new})
    taken = {o for node in model.graph.node for o in node.output} | initializers
    if not mapping or any(new in taken and new not in mapping for new in mapping.values()):
        return False  # a wanted name is already another value's: leave the graph as it is
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    return True
