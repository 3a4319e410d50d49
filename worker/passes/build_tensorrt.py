"""build_tensorrt: an ONNX model (FP32, or INT8 Q/DQ from quantize_int8) into a serialized
TensorRT engine for the GPU of the worker that builds it.

Engines are not portable: each is tied to a GPU model (compute capability) and a TensorRT
version, so the artifact records both, and a job names the GPU kind it wants with ``gpu_kind``
(the step then runs on queue ``gpu.<kind>``; without it, on any GPU worker).

This module is the pure part: the optimization profiles, the precision plan, the metadata and
the names, all unit-tested without TensorRT (the config is the spec's, in core.steps.build_tensorrt).
Everything that imports ``tensorrt`` lives in ``worker.tensorrt_backend``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from core.errors import PassError
from core.formats import TENSORRT_ENGINE
from core.steps.build_tensorrt import BuildTensorrtConfig, BuildTensorrtSpec, ShapeRange
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult

# -- pure logic ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes per input name."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def plan_profiles(
    model_inputs: list[dict[str, Any]], input_spec: list[dict[str, Any]], ranges: list[ShapeRange]
) -> list[Profile]:
    """Optimization profiles from the model's declared input shapes (open dims are strings or
    None) and the job's input spec. Fixed-shape models get one profile at their shape; an open
    batch takes the ranges' batches; open spatial dims take the ranges' hw or the job's shape."""
    declared = {i["name"]: i.get("shape") for i in model_inputs}
    concrete = {s["name"]: [int(d) for d in s["shape"]] for s in input_spec}
    profiles = []
    for r in ranges:
        shapes = {}
        for name, spec_shape in concrete.items():
            file_shape = declared.get(name) or spec_shape
            if len(file_shape) != len(spec_shape):
                raise PassError(
                    f"input {name!r} has rank {len(file_shape)} in the model and {len(spec_shape)} in the job",
                    code="shape_mismatch",
                )
            lo, opt, hi = list(spec_shape), list(spec_shape), list(spec_shape)
            for axis, dim in enumerate(file_shape):
                if isinstance(dim, int) and dim > 0:
                    lo[axis] = opt[axis] = hi[axis] = dim
                    continue
                if axis == 0:
                    lo[0], opt[0], hi[0] = r.min_batch, r.opt_batch, r.max_batch
                elif len(spec_shape) == 4 and axis in (2, 3) and r.min_hw is not None:
                    k = axis - 2
                    lo[axis], opt[axis], hi[axis] = r.min_hw[k], r.opt_hw[k], r.max_hw[k]
            shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
        profiles.append(Profile(shapes))
    # Identical profiles (a fixed-shape model with several ranges) are one profile.
    unique = list({tuple(sorted(p.shapes.items())): p for p in profiles}.values())
    return unique


@dataclass
class PrecisionPlan:
    builder_flags: list[str]  # names of trt.BuilderFlag members
    fp32_layers: list[str] = field(default_factory=list)  # ONNX node names pinned to FP32
    explicit_quantization: bool = False
    notes: list[str] = field(default_factory=list)


def plan_precision(
    precision: str, *, qdq_nodes: int, nodes: list[tuple[str, str]], fp32_patterns: list[str]
) -> PrecisionPlan:
    """The builder flags and per-layer constraints for a precision. ``nodes`` are the ONNX
    graph's (name, op_type); ``qdq_nodes`` its QuantizeLinear/DequantizeLinear count."""
    flags: list[str] = []
    notes: list[str] = []
    explicit = qdq_nodes > 0
    if precision == "int8" and not explicit:
        raise PassError(
            "TensorRT INT8 takes a model with Q/DQ nodes (explicit quantization; implicit calibrators are "
            "deprecated): put quantize_int8 (static, symmetric int8) before build_tensorrt, or use "
            "preset tensorrt-int8",
            code="int8_needs_qdq",
        )
    if precision in ("fp16", "best"):
        flags.append("FP16")
    if precision in ("int8", "best") and explicit:
        flags += ["INT8", "FP16"] if precision == "int8" else ["INT8"]
    if precision == "best" and not explicit:
        notes.append("no Q/DQ nodes: INT8 left out (run quantize_int8 first for INT8 layers)")
    if explicit and precision in ("fp32", "fp16"):
        notes.append(f"the model has {qdq_nodes} Q/DQ nodes: TensorRT runs those layers in INT8 anyway")
        flags.append("INT8")
    pinned = []
    if fp32_patterns:
        regexes = [re.compile(p) for p in fp32_patterns]
        pinned = [name for name, op in nodes if any(r.fullmatch(name) or r.fullmatch(op) for r in regexes)]
        unmatched = [
            p
            for p, r in zip(fp32_patterns, regexes, strict=True)
            if not any(r.fullmatch(n) or r.fullmatch(o) for n, o in nodes)
        ]
        if unmatched:
            raise PassError(
                f"fp32_layers match no node or op type of the model: {unmatched}",
                code="invalid_step_config",
                details={"unmatched": unmatched},
            )
        if precision != "fp32":
            flags.append("OBEY_PRECISION_CONSTRAINTS")
    return PrecisionPlan(
        builder_flags=list(dict.fromkeys(flags)), fp32_layers=pinned, explicit_quantization=explicit, notes=notes
    )


def engine_name(*, model_stem: str, precision: str, gpu: dict[str, Any], trt_version: str) -> str:
    """e.g. resnet50.fp16.h100-sm90.trt10.8.engine: which engine is for which GPU, at a glance."""
    cc = str(gpu.get("compute_capability", "")).replace(".", "")
    major_minor = ".".join(trt_version.split(".")[:2])
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", model_stem).strip("-") or "model"
    return f"{stem}.{precision}.{gpu.get('kind', 'gpu')}-sm{cc}.trt{major_minor}.engine"


def timing_cache_key(*, gpu: dict[str, Any], trt_version: str) -> str:
    """Where the timing cache for this GPU model and TensorRT version lives in the store. Caches
    are only valid for the same device and version, so both are in the key."""
    cc = str(gpu.get("compute_capability", "")).replace(".", "")
    name = re.sub(r"[^a-z0-9]+", "-", str(gpu.get("name", "gpu")).lower()).strip("-")
    return f"tensorrt/timing-cache/{name}-sm{cc}/trt-{trt_version}.cache"


def engine_metadata(
    *, gpu: dict[str, Any], trt_version: str, precision: str, profiles: list[Profile], plan: PrecisionPlan
) -> dict[str, Any]:
    return {
        "runtime": "tensorrt",
        "gpu_name": gpu.get("name"),
        "gpu_kind": gpu.get("kind"),
        "compute_capability": gpu.get("compute_capability"),
        "cuda": gpu.get("cuda"),
        "tensorrt": trt_version,
        "precision": precision,
        "explicit_quantization": plan.explicit_quantization,
        "fp32_layers": plan.fp32_layers,
        "profiles": [
            {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.shapes.items()}
            for p in profiles
        ],
    }


# -- the pass ----------------------------------------------------------------------------------------


class BuildTensorrt(BuildTensorrtSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: BuildTensorrtConfig) -> PassResult:
        import onnx

        from worker import tensorrt_backend
        from worker.devices import detect_gpu

        gpu = detect_gpu()
        if gpu is None:
            raise PassError("build_tensorrt needs an NVIDIA GPU and this worker has none", code="no_gpu")
        if config.gpu_kind and gpu["kind"] != config.gpu_kind:
            raise PassError(
                f"this step is for {config.gpu_kind} but ran on a {gpu['kind']} ({gpu['name']})", code="wrong_gpu"
            )
        trt_version = tensorrt_backend.version()  # PassError when tensorrt is not installed

        model = onnx.load(str(source.path), load_external_data=False)
        nodes = [(n.name, n.op_type) for n in model.graph.node]
        qdq = sum(op in ("QuantizeLinear", "DequantizeLinear") for _, op in nodes)
        initializers = {i.name for i in model.graph.initializer}
        declared = [
            {
                "name": i.name,
                "shape": [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim],
            }
            for i in model.graph.input
            if i.name not in initializers
        ]
        plan = plan_precision(config.precision, qdq_nodes=qdq, nodes=nodes, fp32_patterns=config.fp32_layers)
        profiles = plan_profiles(declared, ctx.input_spec, config.profiles)

        ctx.report_progress(0.05)
        cache_path = ctx.work_dir / "timing.cache"
        cache_key = timing_cache_key(gpu=gpu, trt_version=trt_version)
        if config.reuse_timing_cache and ctx.fetch_shared is not None:
            ctx.fetch_shared(cache_key, cache_path)
        out = ctx.work_dir / engine_name(
            model_stem=source.path.stem, precision=config.precision, gpu=gpu, trt_version=trt_version
        )
        # build_engine parses first and fails naming every node and op TensorRT refuses, before
        # any GPU time is spent.
        build = tensorrt_backend.build_engine(
            source.path,
            out,
            plan=plan,
            profiles=profiles,
            workspace_mib=config.workspace_mib,
            optimization_level=config.optimization_level,
            timing_cache=cache_path if config.reuse_timing_cache else None,
            log=ctx.log,
        )
        if config.reuse_timing_cache and ctx.store_shared is not None and cache_path.exists():
            ctx.store_shared(cache_key, cache_path)
        meta = engine_metadata(
            gpu=gpu, trt_version=trt_version, precision=config.precision, profiles=profiles, plan=plan
        )
        metrics = {**meta, **build, "timing_cache_key": cache_key if config.reuse_timing_cache else None}
        if plan.notes:
            metrics["warning"] = "; ".join(plan.notes)
        return PassResult(artifact=out, format=TENSORRT_ENGINE, metrics=metrics, meta=meta)
