"""build_tensorrt: an ONNX model (FP32, or INT8 Q/DQ from quantize_int8) into a serialized
TensorRT engine for the GPU of the worker that builds it.

Engines are not portable: each is tied to a GPU model (compute capability) and a TensorRT
version, so the artifact records both, and a job names the GPU kind it wants with ``gpu_kind``
(the step then runs on queue ``gpu.<kind>``; without it, on any GPU worker).

This module is the pure part: the config, the optimization profiles, the precision plan, the
metadata and the names, all unit-tested without TensorRT. Everything that imports ``tensorrt``
lives in ``worker.tensorrt_backend``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from core.errors import PassError
from core.settings import GPU_KIND_PATTERN
from core.workers import gpu_queue
from worker.passes.base import (
    ONNX,
    TENSORRT_ENGINE,
    ArtifactRef,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
)

Precision = Literal["fp32", "fp16", "int8", "best"]


class ShapeRange(PassConfig):
    """One optimization profile: the range of batch sizes (and, optionally, image sizes) the
    engine accepts, and the point TensorRT tunes its kernels for."""

    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=1, ge=1)
    max_batch: int = Field(default=32, ge=1)
    # [height, width] for models with open spatial axes; default: the job's input shape.
    min_hw: list[int] | None = Field(default=None, min_length=2, max_length=2)
    opt_hw: list[int] | None = Field(default=None, min_length=2, max_length=2)
    max_hw: list[int] | None = Field(default=None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ordered(self) -> ShapeRange:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("need min_batch <= opt_batch <= max_batch")
        hws = [self.min_hw, self.opt_hw, self.max_hw]
        if any(h is not None for h in hws):
            if any(h is None for h in hws):
                raise ValueError("give min_hw, opt_hw and max_hw together")
            for a, b in zip(hws, hws[1:], strict=False):
                if a[0] > b[0] or a[1] > b[1]:
                    raise ValueError("need min_hw <= opt_hw <= max_hw")
        return self


class BuildTensorrtConfig(PassConfig):
    precision: Precision = Field(
        default="fp16",
        description="fp32; fp16 (FP16 kernels allowed); int8 (needs a Q/DQ model from quantize_int8: explicit "
        "quantization, TensorRT 10's way); best (every precision TensorRT finds faster).",
    )
    gpu_kind: str | None = Field(
        default=None,
        pattern=GPU_KIND_PATTERN,
        description="The GPU kind the engine is for (a worker's CVOPT_GPU_KIND, e.g. h100, l4); the step "
        "runs on that kind's queue. Several kinds: one build_tensorrt step per kind.",
    )
    fp32_layers: list[str] = Field(
        default_factory=list,
        description="Layers kept in FP32 (regular expressions over ONNX node names or op types, e.g. "
        "'Softmax', '.*head.*'): a per-layer precision constraint, for layers that overflow in FP16.",
    )
    profiles: list[ShapeRange] = Field(
        default_factory=lambda: [ShapeRange()],
        min_length=1,
        max_length=8,
        description="Optimization profiles for an open batch (and resolution); ignored for fixed shapes.",
    )
    workspace_mib: int = Field(default=4096, ge=64, le=1 << 20, description="Builder workspace limit.")
    optimization_level: int = Field(default=3, ge=0, le=5, description="TensorRT builder optimization level.")
    reuse_timing_cache: bool = Field(
        default=True,
        description="Reuse the timing cache saved by earlier builds for the same GPU and TensorRT version "
        "(faster, more reproducible builds), and save the updated one.",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> BuildTensorrtConfig:
        for pattern in self.fp32_layers:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"fp32_layers: {pattern!r} is not a regular expression: {exc}") from None
        return self


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


class BuildTensorrt(Pass):
    name = "build_tensorrt"
    version = 1
    description = "ONNX to a TensorRT engine for one GPU kind (gpu queue)."
    Config = BuildTensorrtConfig
    accepts = frozenset({ONNX})
    produces = TENSORRT_ENGINE
    queue = "gpu"

    def step_queue(self, config: BuildTensorrtConfig) -> str:
        return gpu_queue(config.gpu_kind)

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
