"""convert_fp16: ONNX FP32 -> FP16 weights and activations, inputs/outputs kept FP32.

Nodes whose activations would overflow FP16 (|x| near 65504) on real or sample inputs stay in
FP32, with the nodes that consume those activations; the metrics name them and why."""

from __future__ import annotations

from core.errors import PassError
from core.formats import ONNX
from core.steps.convert_fp16 import ConvertFp16Config, ConvertFp16Spec
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult

FP16_MAX = 65504.0


def observed_maxima(model_path, feeds_iter) -> dict[str, float]:
    """Max |value| of every float intermediate tensor over the given inputs."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    known = {vi.name: vi for vi in model.graph.value_info}
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            vi = known.get(name)
            if name and name not in existing and vi is not None and vi.type.tensor_type.elem_type in float_types:
                model.graph.output.append(vi)
                existing.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    maxima: dict[str, float] = {}
    for feeds in feeds_iter:
        for name, value in zip(names, session.run(names, feeds), strict=True):
            if value.dtype.kind == "f" and value.size:
                peak = float(np.nanmax(np.abs(value.astype(np.float64))))
                maxima[name] = max(maxima.get(name, 0.0), peak)
    return maxima


def drop_roundtrip_casts(model) -> int:
    """Remove FP32 -> FP16 -> FP32 cast pairs the converter puts between two FP32-kept nodes:
    they would overflow exactly the values the nodes were kept in FP32 for."""
    import onnx

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {out: n for n in model.graph.node for out in n.output}
    removed = 0
    renames: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        src = producer.get(node.input[0]) if node.input else None
        if cast_to(node) == onnx.TensorProto.FLOAT and src is not None and cast_to(src) == onnx.TensorProto.FLOAT16:
            renames[node.output[0]] = src.input[0]
            removed += 1
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for out in model.graph.output:
        if out.name in renames:  # a graph output keeps its name: keep that cast instead
            raise AssertionError("a round-trip cast feeds a graph output")
    used = {name for n in keep for name in n.input} | {o.name for o in model.graph.output}
    final = [n for n in keep if not (cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in used)]
    removed += len(keep) - len(final)
    del model.graph.node[:]
    model.graph.node.extend(topological_order(model, final))
    return removed


def topological_order(model, nodes):
    """The converter appends its Cast nodes at the end; ONNX wants producers before consumers."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:  # a cycle or a dangling input: leave the rest as they were, the checker says why
            return ordered + pending
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    return ordered


class ConvertFp16(ConvertFp16Spec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: ConvertFp16Config) -> PassResult:
        import onnx
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )

        from worker.data import iter_batches, sample_feeds

        model = onnx.load(str(source.path))
        graph_input = model.graph.input[0].name
        dataset = ctx.calibration_dataset or ctx.evaluation_dataset
        if dataset is not None and len(ctx.input_spec) == 1:
            spec = dict(ctx.input_spec[0], name=graph_input)
            batch = int(spec["shape"][0])
            feeds_iter = (
                {graph_input: x}
                for x, _ in iter_batches(dataset, spec, ctx.preprocessing, batch_size=batch, limit=config.num_samples)
            )
            source_of_inputs = "dataset"
        else:
            feeds_iter = (sample_feeds(ctx.input_spec, seed=i) for i in range(min(config.num_samples, 8)))
            source_of_inputs = "random"
        maxima = observed_maxima(source.path, feeds_iter)
        limit = config.overflow_fraction * FP16_MAX
        hot = {name for name, peak in maxima.items() if peak > limit}
        blocked: dict[str, str] = {}
        for node in model.graph.node:
            produced = [o for o in node.output if o in hot]
            consumed = [i for i in node.input if i in hot]
            if produced:
                blocked[node.name] = f"output {produced[0]} reaches {maxima[produced[0]]:.3g}"
            elif consumed:
                blocked[node.name] = f"input {consumed[0]} reaches {maxima[consumed[0]]:.3g}"
        unnamed = [n for n in model.graph.node if not n.name and (set(n.output) | set(n.input)) & hot]
        if unnamed:
            raise PassError("nodes that overflow FP16 have no names; export with named nodes", code="unnamed_nodes")
        converted = convert_float_to_float16(
            model,
            keep_io_types=config.keep_io_types,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(config.op_block_list)),
            node_block_list=sorted(blocked),
        )
        drop_roundtrip_casts(converted)
        out = ctx.work_dir / "model.fp16.onnx"
        onnx.save(converted, str(out))
        try:
            onnx.checker.check_model(str(out))
        except onnx.checker.ValidationError as exc:
            raise PassError(f"the FP16 model is invalid: {exc}", code="invalid_onnx") from exc
        fp16_nodes = sum(1 for n in model.graph.node if n.name not in blocked and n.op_type not in config.op_block_list)
        return PassResult(
            artifact=out,
            format=ONNX,
            metrics={
                "overflow_checked_on": source_of_inputs,
                "kept_fp32": blocked,
                "fp16_nodes": fp16_nodes,
                "max_activation": max(maxima.values(), default=0.0),
            },
        )
