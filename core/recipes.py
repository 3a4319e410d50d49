"""Recipes: presets, and the checks that make a recipe runnable before anything is queued.

Pure Python over the pass specs (core.steps; no pass implementation, no heavy import): the API
calls ``plan_job`` at POST /v1/jobs and answers 422 with what is wrong; the CLI and the SDK can
plan the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core.datasets import dataset_fit_error, model_layout
from core.errors import InvalidInput
from core.formats import NEEDS_CALIBRATION, NEEDS_DATASET, ONNX
from core.onnx_ops import unsupported_onnx_ops
from core.schemas import Preprocessing, StepSpec, Target
from core.steps.base import PassConfig, PassSpec
from core.steps.registry import get_spec
from core.targets import DEFAULT_AUTO_TARGET, auto_recipe, check_steps_for_target

PRESETS: dict[str, list[StepSpec]] = {
    "onnx": [StepSpec(name="export_onnx"), StepSpec(name="benchmark")],
    "onnx-fp16": [
        StepSpec(name="export_onnx"),
        StepSpec(name="convert_fp16"),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
    "onnx-int8-auto": [
        StepSpec(name="export_onnx"),
        StepSpec(name="quantize_int8", config={"max_accuracy_drop": 0.01, "search_speed": True}),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
    "torch-int8": [
        StepSpec(name="quantize_int8_torch"),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
    "prune50-distill": [
        StepSpec(name="prune_structured", config={"target_ratio": 0.5}),
        StepSpec(name="distill"),
        StepSpec(name="export_pt2"),
        StepSpec(name="export_onnx"),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
    "prune50-distill-int8": [
        StepSpec(name="prune_structured", config={"target_ratio": 0.5}),
        StepSpec(name="distill"),
        StepSpec(name="export_pt2"),
        StepSpec(name="export_onnx"),
        StepSpec(name="quantize_int8"),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
    # x86 CPUs: OpenVINO computes in its own choice of precision (bf16 where the CPU has it).
    "openvino": [
        StepSpec(name="export_onnx"),
        StepSpec(name="convert_openvino"),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
    # NNCF INT8 in OpenVINO, judged on the task's metric (mixed-scale heads float, accuracy control on a miss).
    "openvino-int8": [
        StepSpec(name="export_onnx"),
        StepSpec(name="quantize_openvino"),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
    "tflite-fp16": [
        StepSpec(name="convert_tflite", config={"precision": "fp16"}),
        StepSpec(name="benchmark", config={"batch_sizes": [1]}),
        StepSpec(name="evaluate"),
    ],
    "tflite-int8": [
        StepSpec(name="convert_tflite", config={"precision": "int8"}),
        StepSpec(name="benchmark", config={"batch_sizes": [1]}),
        StepSpec(name="evaluate"),
    ],
    # GPU targets (gpu queue). TensorRT INT8 takes explicit quantization: symmetric int8 Q/DQ
    # (zero points 0) with per-channel weights, which is what its Q/DQ fusions expect.
    "tensorrt-fp16": [
        StepSpec(name="export_onnx"),
        StepSpec(name="build_tensorrt", config={"precision": "fp16"}),
        StepSpec(name="benchmark", config={"batch_sizes": [1, 32]}),
        StepSpec(name="evaluate"),
    ],
    "tensorrt-int8": [
        StepSpec(name="export_onnx"),
        StepSpec(
            name="quantize_int8",
            config={
                "activation_type": "int8",
                "symmetric_activations": True,
                "reduce_range": False,
                "per_channel": True,
            },
        ),
        StepSpec(name="build_tensorrt", config={"precision": "int8"}),
        StepSpec(name="benchmark", config={"batch_sizes": [1, 32]}),
        StepSpec(name="evaluate"),
    ],
    "gpu-fp16": [
        StepSpec(name="compile_gpu", config={"precision": "fp16"}),
        StepSpec(name="benchmark", config={"batch_sizes": [1, 32]}),
        StepSpec(name="evaluate"),
    ],
    "onnx-int8": [
        StepSpec(name="export_onnx"),
        StepSpec(name="quantize_int8"),
        StepSpec(name="benchmark"),
        StepSpec(name="evaluate"),
    ],
}


# Built per job from the target and the upload (core.targets): the candidates the target allows.
AUTO_PRESET = "auto"


@dataclass
class PlannedStep:
    name: str
    config: dict[str, Any]
    queue: str = "cpu"
    optional: bool = False


@dataclass
class Recipe:
    """The job's steps, and (preset auto) the candidates it could not build, with why."""

    steps: list[StepSpec]
    left_out: list[dict[str, Any]]


@dataclass
class JobPlan:
    steps: list[PlannedStep]
    queue: str
    input_spec: list[dict[str, Any]]


@dataclass
class DatasetFacts:
    id: str
    layout: str
    sample_shape: list[int]
    num_classes: int | None = None


def job_recipe(
    *,
    preset: str | None,
    steps: list[StepSpec] | None,
    model_format: str,
    has_calibration: bool,
    has_dataset: bool,
    overrides: dict[str, dict[str, Any]] | None = None,
    target: Target | None = None,
    batch: int = 1,
    allow_training: bool = False,
) -> Recipe:
    """The job's steps from its preset (auto: the target's candidates for this upload, ``batch`` its
    input batch) or its own list; with a target, a 422 for a step whose artifact runs elsewhere."""
    if preset == AUTO_PRESET:
        recipe = auto_recipe(
            target or DEFAULT_AUTO_TARGET,
            model_format=model_format,
            has_calibration=has_calibration,
            has_dataset=has_dataset,
            overrides=overrides,
            batch=batch,
            allow_training=allow_training,
        )
        unknown = set(overrides or {}) - {s.name for s in recipe.steps}
        if unknown:
            why = {x["step"]: x["reason"] for x in recipe.left_out if x["step"] in unknown}
            because = "".join(f"; {step} is left out: {reason}" for step, reason in sorted(why.items()))
            raise InvalidInput(
                f"overrides name steps that preset auto does not run for this job: {sorted(unknown)}{because}",
                code="unknown_step",
                details={"steps": [s.name for s in recipe.steps], "left_out": why},
            )
        return Recipe(steps=recipe.steps, left_out=recipe.left_out)
    resolved = resolve_steps(preset=preset, steps=steps, has_dataset=has_dataset, overrides=overrides)
    if target is not None:
        check_steps_for_target(target, resolved, model_format)
    return Recipe(steps=resolved, left_out=[])


def resolve_steps(
    *,
    preset: str | None,
    steps: list[StepSpec] | None,
    has_dataset: bool = True,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[StepSpec]:
    """The job's steps. A preset's steps that need a dataset (evaluate) are left out when the
    job gives none; explicit steps are taken as written and checked by plan_job."""
    if preset is not None:
        if preset not in PRESETS:
            raise InvalidInput(
                f"unknown preset {preset!r}",
                code="unknown_preset",
                details={"presets": sorted([*PRESETS, AUTO_PRESET])},
            )
        chosen = [s for s in PRESETS[preset] if has_dataset or NEEDS_DATASET not in get_spec(s.name).needs]
        unknown = set(overrides or {}) - {s.name for s in chosen}
        if unknown:
            raise InvalidInput(
                f"overrides name steps that preset {preset!r} does not run: {sorted(unknown)}",
                code="unknown_step",
                details={"steps": [s.name for s in chosen]},
            )
        return [
            StepSpec(name=s.name, config={**s.config, **(overrides or {}).get(s.name, {})}, optional=s.optional)
            for s in chosen
        ]
    assert steps is not None
    return steps


def resolve_input_spec(
    model_inputs: list[dict[str, Any]],
    input_shape: list[int] | dict[str, list[int]] | None,
    default_input_shape: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Every input with a concrete shape: the file's fixed dims, an open batch taken as 1, and
    the job's ``input_shape`` for the rest. A conflict or a gap is a 422 naming the input."""
    if input_shape is None and default_input_shape and len(model_inputs) == 1:
        input_shape = default_input_shape
    if isinstance(input_shape, list):
        if len(model_inputs) != 1:
            raise InvalidInput(
                "the model has several inputs: give input_shape as {input name: shape}",
                code="input_shape_required",
                details={"inputs": [i["name"] for i in model_inputs]},
            )
        given = {model_inputs[0]["name"]: input_shape}
    else:
        given = dict(input_shape or {})
    unknown = set(given) - {i["name"] for i in model_inputs}
    if unknown:
        raise InvalidInput(
            f"input_shape names inputs the model does not have: {sorted(unknown)}",
            code="shape_mismatch",
            details={"inputs": [i["name"] for i in model_inputs]},
        )
    resolved = []
    for spec in model_inputs:
        name, file_shape = spec["name"], spec.get("shape")
        shape = given.get(name)
        if shape is not None:
            if any(d <= 0 for d in shape):
                raise InvalidInput(f"input_shape for {name!r} must be positive, got {shape}", code="shape_mismatch")
            if file_shape is not None:
                if len(file_shape) != len(shape) or any(
                    isinstance(f, int) and f != s for f, s in zip(file_shape, shape, strict=True)
                ):
                    raise InvalidInput(
                        f"input_shape {shape} for {name!r} does not match the model's {file_shape}",
                        code="shape_mismatch",
                        details={"input": name, "model_shape": file_shape, "input_shape": shape},
                    )
        elif file_shape is None:
            raise InvalidInput(
                f"the model file does not record the shape of input {name!r} (TorchScript keeps "
                "none): give input_shape, e.g. [1, 3, 224, 224]",
                code="input_shape_required",
                details={"input": name},
            )
        else:
            open_dims = [i for i, d in enumerate(file_shape) if not isinstance(d, int)]
            if any(i != 0 for i in open_dims):
                raise InvalidInput(
                    f"input {name!r} has open dimensions {file_shape}: give input_shape",
                    code="input_shape_required",
                    details={"input": name, "model_shape": file_shape},
                )
            shape = [1 if not isinstance(d, int) else d for d in file_shape]
        resolved.append({"name": name, "shape": [int(d) for d in shape], "dtype": spec.get("dtype", "float32")})
    return resolved


def plan_job(
    *,
    model_format: str,
    model_inputs: list[dict[str, Any]],
    model_outputs: list[dict[str, Any]] | None = None,
    steps: list[StepSpec],
    input_shape: list[int] | dict[str, list[int]] | None,
    calibration: DatasetFacts | None,
    evaluation: DatasetFacts | None,
    default_input_shape: list[int] | None = None,
    preprocessing: Preprocessing | None = None,
    model_operators: list[str] | None = None,
) -> JobPlan:
    """The job as it will run, or the 422 that says why it cannot: steps that chain, valid configs,
    the datasets the steps need and that fit the model, concrete input shapes."""
    planned, queue = _plan_steps(model_format, steps, calibration=calibration, evaluation=evaluation)
    _check_trainable(model_format, steps, model_operators)
    input_spec = resolve_input_spec(model_inputs, input_shape, default_input_shape)
    _check_datasets_fit(input_spec, calibration=calibration, evaluation=evaluation)
    _check_classes(evaluation, model_outputs or [])
    if preprocessing is not None:
        _check_preprocessing(preprocessing, input_spec)
    return JobPlan(steps=planned, queue=queue, input_spec=input_spec)


def _plan_steps(
    model_format: str,
    steps: list[StepSpec],
    *,
    calibration: DatasetFacts | None,
    evaluation: DatasetFacts | None,
) -> tuple[list[PlannedStep], str]:
    """Each step checked against the format the one before it leaves; the job's starting queue."""
    current = model_format
    planned: list[PlannedStep] = []
    queue = "cpu"
    for index, step in enumerate(steps):
        spec = get_spec(step.name)
        _check_accepts(spec, index, current)
        config = _validated_config(spec, index, step.config)
        _check_needs(spec, spec().requirements(config), calibration=calibration, evaluation=evaluation)
        step_queue = spec().step_queue(config)
        if queue == "cpu" and step_queue != "cpu":
            # The job starts where its first GPU step must run (GPU workers run the CPU steps
            # before it too); a later step for another GPU kind hands the job over.
            queue = step_queue
        planned.append(
            PlannedStep(name=step.name, config=config.model_dump(mode="json"), queue=step_queue, optional=step.optional)
        )
        if spec.advances_chain():
            # A deployment artifact (engine, .tflite, package) ends its branch: the next
            # producing step (an engine for another GPU kind) starts from the same model.
            current = spec().output_format(current)
    return planned, queue


def _check_trainable(model_format: str, steps: list[StepSpec], operators: list[str] | None) -> None:
    """A step that trains an ONNX model needs every operator of the upload converted to torch: refused
    here, before anything runs, naming the operators it cannot convert (None: the upload predates the list)."""
    if model_format != ONNX or operators is None:
        return
    current = model_format
    for index, step in enumerate(steps):
        spec = get_spec(step.name)
        if spec.trains and current == ONNX and not step.optional:
            # An optional candidate (auto's quantize_qat) that meets them fails alone, with the same code.
            missing = unsupported_onnx_ops(_domain_and_op(op) for op in operators)
            if missing:
                raise InvalidInput(
                    f"step {index} ({step.name}) trains the model as a torch graph, and the ONNX upload has "
                    f"operators the service cannot convert: {', '.join(missing)}",
                    code="unsupported_operators",
                    details={"index": index, "step": step.name, "operators": missing},
                )
            return
        if spec.advances_chain():
            current = spec().output_format(current)


def _domain_and_op(operator: str) -> tuple[str, str]:
    """core.model_formats lists an operator as "op_type" or "domain::op_type"."""
    domain, _, op = operator.rpartition("::")
    return domain, op


def _check_accepts(spec: type[PassSpec[Any]], index: int, current: str) -> None:
    if current in spec.accepts:
        return
    hint = spec.format_hints.get(current)
    before = "the step before it leaves" if index else "the upload is"
    raise InvalidInput(
        f"step {index} ({spec.name}) takes {sorted(spec.accepts)} but {before} a {current} model"
        + (f": {hint}" if hint else ""),
        code="steps_do_not_chain",
        details={"index": index, "step": spec.name, "input_format": current, "accepts": sorted(spec.accepts)},
    )


def _validated_config(spec: type[PassSpec[Any]], index: int, config: dict[str, Any]) -> PassConfig:
    try:
        return spec.Config.model_validate(config)
    except ValidationError as exc:
        raise InvalidInput(
            f"invalid config for step {index} ({spec.name})",
            code="invalid_step_config",
            details={
                "index": index,
                "step": spec.name,
                "errors": [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()],
            },
        ) from None


def _check_needs(
    spec: type[PassSpec[Any]],
    needs: frozenset[str],
    *,
    calibration: DatasetFacts | None,
    evaluation: DatasetFacts | None,
) -> None:
    if NEEDS_CALIBRATION in needs and calibration is None:
        raise InvalidInput(
            f"step {spec.name} needs calibration_dataset_id (a few hundred representative images)",
            code="calibration_dataset_required",
            details={"step": spec.name},
        )
    if NEEDS_DATASET in needs and calibration is None and evaluation is None:
        raise InvalidInput(
            f"step {spec.name} needs evaluation_dataset_id or calibration_dataset_id",
            code="dataset_required",
            details={"step": spec.name},
        )


def _check_datasets_fit(
    input_spec: list[dict[str, Any]], *, calibration: DatasetFacts | None, evaluation: DatasetFacts | None
) -> None:
    """Each dataset's samples fit the model's one input."""
    for role, facts in (("calibration", calibration), ("evaluation", evaluation)):
        if facts is None:
            continue
        if len(input_spec) != 1:
            raise InvalidInput(
                "datasets can feed single-input models only",
                code="shape_mismatch",
                details={"inputs": [s["name"] for s in input_spec]},
            )
        problem = dataset_fit_error(
            layout=facts.layout, sample_shape=facts.sample_shape, input_shape=input_spec[0]["shape"]
        )
        if problem:
            raise InvalidInput(
                f"the {role} dataset does not fit the model: {problem}",
                code="shape_mismatch",
                details={"dataset_id": facts.id, "input": input_spec[0]},
            )


def _check_preprocessing(preprocessing: Preprocessing, input_spec: list[dict[str, Any]]) -> None:
    """Per-channel mean and std give one value, or one per channel of the model's image input."""
    shape = input_spec[0]["shape"] if len(input_spec) == 1 else []
    layout = model_layout(shape)
    if layout == "raw":
        return
    channels = shape[1] if layout == "NCHW" else shape[3]
    for field in ("mean", "std"):
        values = getattr(preprocessing, field)
        if values is not None and len(values) not in (1, channels):
            raise InvalidInput(
                f"preprocessing.{field} has {len(values)} values; the model's input {input_spec[0]['name']!r} "
                f"has {channels} channels (give 1 value, or {channels})",
                code="invalid_preprocessing",
                details={"field": field, "values": len(values), "channels": channels, "input": input_spec[0]},
            )


def _check_classes(evaluation: DatasetFacts | None, outputs: list[dict[str, Any]]) -> None:
    """A labeled evaluation set with more classes than the model scores cannot be evaluated."""
    if evaluation is None or not evaluation.num_classes or not outputs:
        return
    shape = outputs[0].get("shape") or []
    scores = shape[-1] if shape and isinstance(shape[-1], int) else None
    if scores is not None and evaluation.num_classes > scores:
        raise InvalidInput(
            f"the evaluation dataset has {evaluation.num_classes} classes but the model's output "
            f"{outputs[0]['name']!r} scores {scores}",
            code="classes_mismatch",
            details={"dataset_id": evaluation.id, "dataset_classes": evaluation.num_classes, "model_classes": scores},
        )
