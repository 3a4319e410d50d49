"""Deployment targets: where each artifact format runs, which steps a job for a target may run, and
the candidates preset ``auto`` builds for it. Pure Python over the formats and the pass specs (no
pass implementation): the API plans with it at POST /v1/jobs and answers 422 with why a target is
out of reach; the report labels every candidate with it.

The candidates share work the way the steps chain (core.recipes): every step that ends its branch
(an OpenVINO IR, a .tflite, an engine) starts from the same model, so the ONNX export is made
once and serves ONNX Runtime, OpenVINO and both INT8 routes; each INT8 step calibrates once and
judges its own variants on the job's images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from core.errors import InvalidInput
from core.formats import (
    AOTI_PACKAGE,
    EXPORTED_PROGRAM,
    KERAS,
    NEEDS_CALIBRATION,
    NEEDS_DATASET,
    ONNX,
    OPENVINO_IR,
    SAVED_MODEL,
    STATE_DICT,
    TENSORRT_ENGINE,
    TFLITE,
    TORCH_FORMATS,
    TORCHSCRIPT,
)
from core.schemas import StepSpec, Target
from core.steps.registry import get_spec

TARGETS: tuple[Target, ...] = ("x86-cpu", "arm-cpu", "nvidia-gpu")

# Steps that keep the float32 weights and arithmetic of their source (each checks its output
# against its source within float rounding); auto without a dataset builds only these, and the
# report (core.recommend.step_keeps_float) treats their artifacts as lossless.
LOSSLESS_STEPS = frozenset({"export_onnx", "export_pt2"})
# Steps that are lossless only at precision fp32 (the artifact's meta["precision"]).
LOSSLESS_AT_FP32 = frozenset({"compile_gpu", "convert_openvino", "convert_tflite"})
# Preset auto without a target: the worker's own kind of machine.
DEFAULT_AUTO_TARGET: Target = "x86-cpu"

# What runs each format on each target. OpenVINO also has an ARM CPU plugin and LiteRT runs on x86
# (XNNPACK), but the service offers each format where it measured it to pay off.
RUNTIMES: dict[str, dict[Target, str]] = {
    ONNX: {"x86-cpu": "ONNX Runtime", "arm-cpu": "ONNX Runtime", "nvidia-gpu": "ONNX Runtime"},
    OPENVINO_IR: {"x86-cpu": "OpenVINO"},
    TFLITE: {"arm-cpu": "LiteRT (XNNPACK)"},
    TENSORRT_ENGINE: {"nvidia-gpu": "TensorRT"},
    AOTI_PACKAGE: {"nvidia-gpu": "AOTInductor"},
    **{fmt: {"x86-cpu": "PyTorch", "arm-cpu": "PyTorch", "nvidia-gpu": "PyTorch"} for fmt in TORCH_FORMATS},
}

# Targets whose latencies the service measures on another machine, said beside every report.
STAND_IN_NOTES: dict[str, str] = {
    "arm-cpu": "arm-cpu: latencies are measured on the worker's x86 CPU (LiteRT with XNNPACK, ONNX Runtime), a "
    "stand-in for the phone's ARM CPU: compare candidates with each other, not with a phone's numbers",
}

_FORMAT_NAMES = {
    ONNX: "an ONNX model",
    OPENVINO_IR: "an OpenVINO IR",
    TFLITE: "a .tflite",
    TENSORRT_ENGINE: "a TensorRT engine",
    AOTI_PACKAGE: "an AOTInductor package",
    KERAS: "a Keras model",
    SAVED_MODEL: "a SavedModel",
}


def runs_on(fmt: str) -> tuple[Target, ...]:
    return tuple(RUNTIMES.get(fmt, {}))


def check_steps_for_target(target: Target, steps: list[StepSpec], model_format: str) -> None:
    """A 422 naming the first step whose artifact does not run on ``target``: a job for one target
    makes nothing for another (an OpenVINO IR on arm-cpu, an engine on x86-cpu)."""
    current = model_format
    for index, step in enumerate(steps):
        spec = get_spec(step.name)
        if spec.produces is None:
            continue
        fmt = spec().output_format(current)
        if target not in runs_on(fmt):
            where = ", ".join(runs_on(fmt)) or "no target of the service"
            raise InvalidInput(
                f"step {index} ({step.name}) makes {_FORMAT_NAMES.get(fmt, fmt)}, which runs on {where}, "
                f"not on the job's target {target}",
                code="target_mismatch",
                details={
                    "index": index,
                    "step": step.name,
                    "format": fmt,
                    "target": target,
                    "runs_on": list(runs_on(fmt)),
                },
            )
        if spec.advances_chain():
            current = fmt


@dataclass(frozen=True)
class _Candidate:
    """One step of auto's recipe for a target: a candidate artifact (optional: its failure is its
    verdict), or a step the others need (the export, the measuring steps)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    optional: bool = True
    trains: bool = False  # built only when the job allows training (JobCreate.allow_training)


_MEASURE = (_Candidate("benchmark", optional=False), _Candidate("evaluate", optional=False))
_ORT_INT8 = _Candidate("quantize_int8", {"search_speed": True})
# Beside the post-training INT8 (before it: quantize_qat ends its branch, so quantize_int8 starts from the
# same FP32 export; the INT8 step advances the chain): recovers by training what post-training INT8 loses.
_QAT = _Candidate("quantize_qat", trains=True)

AUTO_CANDIDATES: dict[Target, tuple[_Candidate, ...]] = {
    # x86: ONNX Runtime FP32 (the export) and INT8 (QDQ, QOperator and Conv/Gemm/MatMul-only INT8 judged
    # and timed inside the step), OpenVINO f32 and bf16 compute, NNCF INT8 in OpenVINO.
    "x86-cpu": (
        _Candidate("export_onnx", optional=False),
        _Candidate("convert_openvino", {"inference_precision": "f32", "static_shape": True}),
        _Candidate("convert_openvino", {"inference_precision": "bf16", "weights": "fp16", "static_shape": True}),
        _Candidate("quantize_openvino", {"static_shape": True}),
        _QAT,
        _ORT_INT8,
        *_MEASURE,
    ),
    # ARM phones and boards: LiteRT from the PyTorch or TensorFlow model (the .tflite steps end their
    # branch, so they start from the upload), and ONNX Runtime.
    "arm-cpu": (
        _Candidate("convert_tflite", {"precision": "fp32"}),
        _Candidate("convert_tflite", {"precision": "fp16"}),
        _Candidate("convert_tflite", {"precision": "int8"}),
        _Candidate("export_onnx"),
        _QAT,
        _ORT_INT8,
        _Candidate("benchmark", {"batch_sizes": [1]}, optional=False),
        _Candidate("evaluate", optional=False),
    ),
    # NVIDIA GPUs: AOTInductor FP16 from the PyTorch model, TensorRT FP16 from the ONNX export (the
    # export is a candidate too: AOTInductor does not need it).
    "nvidia-gpu": (
        _Candidate("compile_gpu", {"precision": "fp16"}),
        _Candidate("export_onnx"),
        _Candidate("build_tensorrt", {"precision": "fp16"}),
        _Candidate("benchmark", {"batch_sizes": [1, 32]}, optional=False),
        _Candidate("evaluate", optional=False),
    ),
}


@dataclass
class AutoRecipe:
    steps: list[StepSpec]
    left_out: list[dict[str, Any]]


def auto_recipe(
    target: Target,
    *,
    model_format: str,
    has_calibration: bool,
    has_dataset: bool,
    overrides: dict[str, Any] | None,
    batch: int = 1,
    allow_training: bool = False,
) -> AutoRecipe:
    """Preset auto's steps for ``target`` and this upload, and the candidates left out with why; a
    422 when no candidate can be built (the target is out of the model's reach). ``batch``: the job's
    input batch; the static-shape candidates (compiled for batch 1, where the recommendation is
    timed) keep an open batch axis when the job runs at another."""
    steps: list[StepSpec] = []
    left_out: list[dict[str, Any]] = []
    current = model_format
    for c in AUTO_CANDIDATES[target]:
        spec = get_spec(c.name)
        # Judged with the overrides merged: {"quantize_int8": {"mode": "dynamic"}} needs no calibration.
        config = {**c.config, **(overrides or {}).get(c.name, {})}
        if batch != 1 and c.config.get("static_shape"):
            config["static_shape"] = False
        reason = _why_not(spec, config, current, has_calibration=has_calibration, has_dataset=has_dataset)
        if reason is None and c.trains and not allow_training:
            reason = "trains the model (minutes per epoch on a CPU worker): give allow_training true to build it"
        if reason is not None:
            if c.optional or spec.produces is None:
                left_out.append({"step": c.name, "config": config, "reason": reason})
                continue
            raise _unreachable(target, model_format, f"{c.name} {reason}")
        steps.append(StepSpec(name=c.name, config=config, optional=c.optional))
        if spec.produces is not None and spec.advances_chain():
            current = spec().output_format(current)
    if not any(get_spec(s.name).produces for s in steps):
        raise _unreachable(target, model_format, "; ".join(f"{x['step']} {x['reason']}" for x in left_out))
    return AutoRecipe(steps=steps, left_out=left_out)


def _why_not(
    spec: Any, config: dict[str, Any], current: str, *, has_calibration: bool, has_dataset: bool
) -> str | None:
    if current not in spec.accepts:
        hint = spec.format_hints.get(current)
        return f"takes {', '.join(sorted(spec.accepts))}, not {_FORMAT_NAMES.get(current, current)}" + (
            f" ({hint})" if hint else ""
        )
    try:
        parsed = spec.Config.model_validate(config)
    except ValidationError:
        return None  # kept: plan_job's invalid_step_config 422 names the override's bad field
    needs = spec().requirements(parsed)
    if NEEDS_CALIBRATION in needs and not has_calibration:
        return "needs calibration_dataset_id (a few hundred representative images)"
    if NEEDS_DATASET in needs and not has_dataset:
        return "needs evaluation_dataset_id or calibration_dataset_id; without it only lossless candidates count"
    if not has_dataset and spec.produces is not None and not _keeps_float(spec.name, parsed):
        # Built, it could only be "not_measured": the report recommends nothing it cannot judge.
        return (
            "changes the model's arithmetic: without evaluation_dataset_id or calibration_dataset_id its accuracy "
            "cannot be judged, and only lossless candidates count"
        )
    return None


def _keeps_float(step: str, config: Any) -> bool:
    """Whether a candidate with this config keeps its source's float32 arithmetic: the config that makes
    the artifact core.recommend.step_keeps_float calls lossless (meta precision fp32)."""
    if step in LOSSLESS_STEPS:
        return True
    if step not in LOSSLESS_AT_FP32:
        return False
    if step == "convert_openvino":  # precision fp32 = FP32 weights and f32 compute asked for
        return bool(config.weights == "fp32" and config.inference_precision == "f32")
    return bool(config.precision == "fp32")


def _unreachable(target: Target, model_format: str, why: str) -> InvalidInput:
    upload = _FORMAT_NAMES.get(model_format, f"a {model_format} model")
    hint = "; TensorFlow uploads convert to TFLite only: target arm-cpu" if model_format in (KERAS, SAVED_MODEL) else ""
    return InvalidInput(
        f"target {target} is out of reach for {upload}: {why}{hint}",
        code="target_unreachable",
        details={"target": target, "model_format": model_format},
    )


_ORIGINAL_NAMES = {
    ONNX: "ONNX",
    EXPORTED_PROGRAM: ".pt2",
    TORCHSCRIPT: "TorchScript",
    STATE_DICT: "state dict",
    KERAS: "Keras",
    SAVED_MODEL: "SavedModel",
}


def candidate_label(step: str | None, fmt: str, facts: dict[str, Any] | None, ran_in: str | None = None) -> str:
    """What an artifact is and what runs it, for the report and the front, e.g. "OpenVINO INT8 (NNCF)".
    ``facts``: the artifact's meta, or a failed step's config; ``ran_in``: the precision the
    runtime compiled it in, when the benchmark recorded it."""
    facts = facts or {}
    precision = str(facts.get("precision") or "").upper()
    if step is None:
        return f"original ({_ORIGINAL_NAMES.get(fmt, fmt)})"
    if step == "quantize_int8":
        form = facts.get("quant_format")
        return f"ONNX Runtime INT8 {form}" if form else "ONNX Runtime INT8"
    if step == "quantize_qat":
        # The step keeps the post-training graph when that judged better: the label says which it is.
        return "ONNX Runtime INT8 (QAT)" if facts.get("trained", True) else "ONNX Runtime INT8 (QAT judged worse: PTQ)"
    if step == "convert_fp16":
        return "ONNX Runtime FP16"
    if step == "convert_openvino":
        weights = ", FP16 weights" if facts.get("weights") == "fp16" else ""
        return f"OpenVINO {ran_in or facts.get('inference_precision', 'auto')}{weights}"
    if step == "quantize_openvino":
        return "OpenVINO INT8 (NNCF)"
    if step == "convert_tflite":
        if precision == "MIXED":  # INT8 with the ops that broke the task's metric kept float
            return "LiteRT mixed INT8/float"
        return f"LiteRT {precision or 'FP32'}"
    if step == "build_tensorrt":
        return f"TensorRT {precision or 'FP32'}"
    if step == "compile_gpu":
        return f"AOTInductor {precision or 'FP32'}"
    if step == "quantize_int8_torch":
        return "PyTorch INT8"
    if step == "export_onnx":
        return "ONNX Runtime FP32"
    runtime = next(iter(RUNTIMES.get(fmt, {}).values()), fmt)
    return f"{runtime} ({step})"
