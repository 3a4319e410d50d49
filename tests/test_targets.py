"""Targets (core.targets), in process: which candidates preset ``auto`` builds for each target and
each kind of upload, which of them are optional, which it leaves out and why; the 422s for a target
the upload cannot reach (target_unreachable) and for explicit steps whose artifact runs elsewhere
(target_mismatch); and the label every step's artifact carries in the report."""

from __future__ import annotations

import json
import typing

import pytest

from core.errors import InvalidInput
from core.formats import (
    AOTI_PACKAGE,
    EXPORTED_PROGRAM,
    KERAS,
    ONNX,
    OPENVINO_IR,
    SAME_AS_INPUT,
    SAVED_MODEL,
    STATE_DICT,
    TENSORRT_ENGINE,
    TFLITE,
    TORCHSCRIPT,
)
from core.recipes import PRESETS, DatasetFacts, job_recipe, plan_job
from core.schemas import StepSpec, Target
from core.steps.registry import SPECS, get_spec
from core.targets import (
    AUTO_CANDIDATES,
    DEFAULT_AUTO_TARGET,
    RUNTIMES,
    TARGETS,
    auto_recipe,
    candidate_label,
    check_steps_for_target,
    runs_on,
)

PYTORCH_UPLOADS = (EXPORTED_PROGRAM, TORCHSCRIPT, STATE_DICT)
CALIBRATION_NEEDED = "needs calibration_dataset_id (a few hundred representative images)"
DATASET_NEEDED = "needs evaluation_dataset_id or calibration_dataset_id; without it only lossless candidates count"
TRAINING_NOT_ALLOWED = "trains the model (minutes per epoch on a CPU worker): give allow_training true to build it"
QAT_NOT_ALLOWED = {"step": "quantize_qat", "config": {}, "reason": TRAINING_NOT_ALLOWED}
ARITHMETIC_UNJUDGED = (
    "changes the model's arithmetic: without evaluation_dataset_id or calibration_dataset_id its accuracy cannot be "
    "judged, and only lossless candidates count"
)


def auto(target: Target, fmt: str, *, datasets: bool = True, overrides: dict | None = None):
    return auto_recipe(target, model_format=fmt, has_calibration=datasets, has_dataset=datasets, overrides=overrides)


def shape(steps: list[StepSpec]) -> list[tuple[str, dict, bool]]:
    return [(s.name, s.config, s.optional) for s in steps]


def left_out(recipe) -> dict[tuple[str, str | None], str]:
    """(step, precision of its config) -> why it was left out; quantize_qat aside (it is left out of every job
    that does not allow training, or has no calibration: test_auto_builds_quantization_aware_training_...)."""
    return {
        (x["step"], x["config"].get("precision")): x["reason"] for x in recipe.left_out if x["step"] != "quantize_qat"
    }


# -- the tables themselves ------------------------------------------------------------------------


def test_the_targets_are_the_schemas_targets_and_every_format_a_step_makes_runs_somewhere():
    assert set(typing.get_args(Target)) == set(TARGETS) and DEFAULT_AUTO_TARGET == "x86-cpu"
    made = {spec.produces for spec in SPECS.values() if spec.produces not in (None, SAME_AS_INPUT)}
    assert made <= set(RUNTIMES), made - set(RUNTIMES)
    # Deployment files run on one target each; the model formats run everywhere.
    assert runs_on(OPENVINO_IR) == ("x86-cpu",) and runs_on(TFLITE) == ("arm-cpu",)
    assert runs_on(TENSORRT_ENGINE) == ("nvidia-gpu",) and runs_on(AOTI_PACKAGE) == ("nvidia-gpu",)
    assert set(runs_on(ONNX)) == set(runs_on(STATE_DICT)) == set(TARGETS)
    assert runs_on(KERAS) == ()  # an upload format no step makes


@pytest.mark.parametrize("target", TARGETS)
def test_every_candidate_of_auto_has_a_valid_config_and_makes_something_its_target_runs(target):
    for c in AUTO_CANDIDATES[target]:
        spec = get_spec(c.name)
        spec.Config.model_validate(c.config)  # a typo in a candidate's config would fail every auto job
        if spec.produces is None:
            assert not c.optional, c  # the measuring steps are what every candidate needs
        else:
            assert target in runs_on(spec.produces), (target, c)
    # Every candidate is told apart in the report: no two of a target share a step and config.
    keys = [(c.name, json.dumps(c.config, sort_keys=True)) for c in AUTO_CANDIDATES[target]]
    assert len(keys) == len(set(keys))


# -- preset auto, by target and upload -------------------------------------------------------------


@pytest.mark.parametrize("fmt", [ONNX, *PYTORCH_UPLOADS])
def test_auto_on_x86_builds_onnx_runtime_and_openvino_candidates_from_one_export(fmt):
    recipe = auto("x86-cpu", fmt)
    assert shape(recipe.steps) == [
        ("export_onnx", {}, False),  # every candidate starts from it: not optional
        # The IRs take the job's input shape only: faster kernels at the batch the job times.
        ("convert_openvino", {"inference_precision": "f32", "static_shape": True}, True),
        ("convert_openvino", {"inference_precision": "bf16", "weights": "fp16", "static_shape": True}, True),
        ("quantize_openvino", {"static_shape": True}, True),
        ("quantize_int8", {"search_speed": True}, True),  # QDQ, QOperator and Conv-only, judged inside
        ("benchmark", {}, False),
        ("evaluate", {}, False),
    ]
    assert recipe.left_out == [QAT_NOT_ALLOWED]  # quantization-aware training: only with allow_training


def test_auto_on_x86_without_datasets_builds_the_float_candidates_and_says_what_it_left_out():
    recipe = auto("x86-cpu", STATE_DICT, datasets=False)
    # Only what keeps the float arithmetic: without images, nothing else could be judged or recommended.
    assert [s.name for s in recipe.steps] == ["export_onnx", "convert_openvino", "benchmark"]
    assert recipe.steps[1].config["inference_precision"] == "f32"
    assert recipe.left_out == [
        {
            "step": "convert_openvino",
            "config": {"inference_precision": "bf16", "weights": "fp16", "static_shape": True},
            "reason": ARITHMETIC_UNJUDGED,
        },
        {"step": "quantize_openvino", "config": {"static_shape": True}, "reason": CALIBRATION_NEEDED},
        {"step": "quantize_qat", "config": {}, "reason": CALIBRATION_NEEDED},
        {"step": "quantize_int8", "config": {"search_speed": True}, "reason": CALIBRATION_NEEDED},
        {"step": "evaluate", "config": {}, "reason": DATASET_NEEDED},
    ]


@pytest.mark.parametrize("fmt", [EXPORTED_PROGRAM, STATE_DICT])
def test_auto_on_arm_from_pytorch_builds_litert_at_three_precisions_and_onnx_runtime(fmt):
    recipe = auto("arm-cpu", fmt)
    assert shape(recipe.steps) == [
        ("convert_tflite", {"precision": "fp32"}, True),
        ("convert_tflite", {"precision": "fp16"}, True),
        ("convert_tflite", {"precision": "int8"}, True),
        ("export_onnx", {}, True),  # the .tflite steps start from the upload: the export is a candidate too
        ("quantize_int8", {"search_speed": True}, True),
        ("benchmark", {"batch_sizes": [1]}, False),  # a phone runs one image at a time
        ("evaluate", {}, False),
    ]
    without = auto("arm-cpu", fmt, datasets=False)
    assert [s.config.get("precision") for s in without.steps if s.name == "convert_tflite"] == ["fp32"]
    assert left_out(without) == {
        ("convert_tflite", "fp16"): ARITHMETIC_UNJUDGED,
        ("convert_tflite", "int8"): CALIBRATION_NEEDED,
        ("quantize_int8", None): CALIBRATION_NEEDED,
        ("evaluate", None): DATASET_NEEDED,
    }


@pytest.mark.parametrize(
    ("fmt", "hint"),
    [
        (ONNX, "not an ONNX model (ONNX to TFLite has no converter here"),
        (TORCHSCRIPT, "not torchscript (litert-torch converts torch.export programs, not TorchScript"),
    ],
)
def test_auto_on_arm_from_onnx_or_torchscript_is_onnx_runtime_only_and_says_why_no_litert(fmt, hint):
    recipe = auto("arm-cpu", fmt)
    assert [s.name for s in recipe.steps] == ["export_onnx", "quantize_int8", "benchmark", "evaluate"]
    reasons = left_out(recipe)
    assert set(reasons) == {("convert_tflite", p) for p in ("fp32", "fp16", "int8")}
    for reason in reasons.values():
        assert reason.startswith("takes exported_program, keras, saved_model, state_dict, ") and hint in reason


@pytest.mark.parametrize("fmt", [KERAS, SAVED_MODEL])
def test_auto_on_arm_from_tensorflow_is_litert_only(fmt):
    recipe = auto("arm-cpu", fmt)
    assert shape(recipe.steps) == [
        ("convert_tflite", {"precision": "fp32"}, True),
        ("convert_tflite", {"precision": "fp16"}, True),
        ("convert_tflite", {"precision": "int8"}, True),
        ("benchmark", {"batch_sizes": [1]}, False),
        ("evaluate", {}, False),
    ]
    reasons = left_out(recipe)
    assert set(reasons) == {("export_onnx", None), ("quantize_int8", None)}
    assert "convert the model with tf2onnx and upload the .onnx" in reasons[("export_onnx", None)]
    # The INT8 step takes what the export would have made, and the export was left out.
    assert reasons[("quantize_int8", None)].startswith("takes onnx, not a ")


@pytest.mark.parametrize(("target", "fmt"), [(t, f) for t in ("x86-cpu", "nvidia-gpu") for f in (KERAS, SAVED_MODEL)])
def test_a_tensorflow_upload_cannot_reach_x86_or_a_gpu_and_the_422_says_why_and_where_it_can_go(target, fmt):
    with pytest.raises(InvalidInput) as err:
        auto(target, fmt)
    assert err.value.code == "target_unreachable"
    assert err.value.details == {"target": target, "model_format": fmt}
    message = err.value.message
    name = "a Keras model" if fmt == KERAS else "a SavedModel"
    assert message.startswith(f"target {target} is out of reach for {name}: ")
    assert "export_onnx takes " in message and "tf2onnx" in message  # one way forward: convert it to ONNX
    assert message.endswith("; TensorFlow uploads convert to TFLite only: target arm-cpu")  # the other
    # Without datasets too: reachability is about the upload, not the data.
    with pytest.raises(InvalidInput) as err:
        auto(target, fmt, datasets=False)
    assert err.value.code == "target_unreachable"


@pytest.mark.parametrize("fmt", [EXPORTED_PROGRAM, STATE_DICT])
def test_auto_on_nvidia_gpu_from_pytorch_builds_aotinductor_and_tensorrt_fp16(fmt):
    recipe = auto("nvidia-gpu", fmt)
    assert shape(recipe.steps) == [
        ("compile_gpu", {"precision": "fp16"}, True),
        ("export_onnx", {}, True),  # AOTInductor does not need it: a failed export fails TensorRT alone
        ("build_tensorrt", {"precision": "fp16"}, True),
        ("benchmark", {"batch_sizes": [1, 32]}, False),
        ("evaluate", {}, False),
    ]
    assert recipe.left_out == []


@pytest.mark.parametrize("fmt", [ONNX, TORCHSCRIPT])
def test_auto_on_nvidia_gpu_from_onnx_or_torchscript_is_tensorrt_only(fmt):
    recipe = auto("nvidia-gpu", fmt)
    assert [s.name for s in recipe.steps] == ["export_onnx", "build_tensorrt", "benchmark", "evaluate"]
    assert left_out(recipe) == {
        ("compile_gpu", "fp16"): f"takes exported_program, state_dict, not {'an ONNX model' if fmt == ONNX else fmt}"
    }


def test_auto_plans_with_its_optional_flags_and_the_queue_of_its_target():
    inputs = [{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    facts = DatasetFacts(id="d", layout="NCHW", sample_shape=[1, 8, 8])
    for target, queue in (("x86-cpu", "cpu"), ("arm-cpu", "cpu"), ("nvidia-gpu", "gpu")):
        recipe = auto(target, STATE_DICT)
        plan = plan_job(
            model_format=STATE_DICT,
            model_inputs=inputs,
            steps=recipe.steps,
            input_shape=None,
            calibration=facts,
            evaluation=None,
        )
        assert [(p.name, p.optional) for p in plan.steps] == [(s.name, s.optional) for s in recipe.steps], target
        assert plan.queue == queue, target
        # The candidate configs come back filled with their defaults, the candidate's own values kept.
        by_precision = [p.config["inference_precision"] for p in plan.steps if p.name == "convert_openvino"]
        assert by_precision == (["f32", "bf16"] if target == "x86-cpu" else [])


# -- job_recipe: auto, overrides, and explicit steps with a target -------------------------------


def recipe(**kw):
    base = {"preset": None, "steps": None, "model_format": STATE_DICT, "has_calibration": True, "has_dataset": True}
    return job_recipe(**{**base, **kw})


def test_auto_without_a_target_is_x86_and_its_left_out_comes_back():
    made = recipe(preset="auto", has_calibration=False, has_dataset=False)
    assert [s.name for s in made.steps] == ["export_onnx", "convert_openvino", "benchmark"]
    assert [x["step"] for x in made.left_out] == [
        "convert_openvino",
        "quantize_openvino",
        "quantize_qat",
        "quantize_int8",
        "evaluate",
    ]
    # A plain preset leaves nothing out that the report should list.
    assert recipe(preset="onnx").left_out == []


def test_an_override_applies_to_every_candidate_of_its_step_over_the_candidates_own_config():
    made = recipe(preset="auto", overrides={"convert_openvino": {"weights": "fp16"}, "benchmark": {"runs": 20}})
    openvino = [s.config for s in made.steps if s.name == "convert_openvino"]
    assert openvino == [
        {"inference_precision": "f32", "static_shape": True, "weights": "fp16"},
        {"inference_precision": "bf16", "static_shape": True, "weights": "fp16"},
    ]
    assert next(s.config for s in made.steps if s.name == "benchmark") == {"runs": 20}


@pytest.mark.parametrize(
    ("target", "overrides", "has_calibration", "unknown"),
    [
        ("x86-cpu", {"build_tensorrt": {}}, True, "['build_tensorrt']"),  # another target's step
        ("x86-cpu", {"distill": {"epochs": 2}}, True, "['distill']"),  # a step auto never runs
        ("x86-cpu", {"quantize_openvino": {}}, False, "['quantize_openvino']"),  # left out: no calibration
        ("arm-cpu", {"convert_tflite": {}}, True, None),  # runs on arm: fine
    ],
)
def test_overrides_naming_a_step_auto_does_not_run_for_this_job_are_a_422(target, overrides, has_calibration, unknown):
    kw = dict(preset="auto", target=target, overrides=overrides, has_calibration=has_calibration)
    if unknown is None:
        assert any(s.name == "convert_tflite" for s in recipe(**kw).steps)
        return
    with pytest.raises(InvalidInput) as err:
        recipe(**kw)
    assert err.value.code == "unknown_step"
    # A left-out candidate's reason follows (test_an_override_of_a_left_out_candidate_says_why_it_was_left_out).
    assert err.value.message.startswith(f"overrides name steps that preset auto does not run for this job: {unknown}")
    assert "export_onnx" in err.value.details["steps"] and list(overrides)[0] not in err.value.details["steps"]


def test_an_override_that_drops_a_candidates_need_is_judged_with_the_override():
    # Dynamic INT8 needs no calibration images (an evaluation set judges it): auto keeps the candidate
    # instead of a 422 for the override.
    made = recipe(
        preset="auto", overrides={"quantize_int8": {"mode": "dynamic"}}, has_calibration=False, has_dataset=True
    )
    assert ("quantize_int8", {"search_speed": True, "mode": "dynamic"}, True) in shape(made.steps)
    assert [x["step"] for x in made.left_out] == ["quantize_openvino", "quantize_qat"]
    # One that adds a need the job cannot give is judged by it too: every LiteRT candidate needs
    # calibration now, none runs, and the override names a step auto does not run for this job.
    overrides = {"convert_tflite": {"precision": "int8"}}
    assert [x["reason"] for x in auto("arm-cpu", STATE_DICT, datasets=False, overrides=overrides).left_out][:3] == [
        CALIBRATION_NEEDED
    ] * 3
    with pytest.raises(InvalidInput) as err:
        recipe(preset="auto", target="arm-cpu", overrides=overrides, has_calibration=False)
    assert err.value.code == "unknown_step" and "convert_tflite" not in err.value.details["steps"]


def test_an_invalid_override_reaches_plan_job_and_its_field_is_named():
    made = recipe(preset="auto", overrides={"quantize_int8": {"mode": "sometimes"}})
    with pytest.raises(InvalidInput) as err:
        plan_job(
            model_format=STATE_DICT,
            model_inputs=[{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}],
            steps=made.steps,
            input_shape=None,
            calibration=DatasetFacts(id="d", layout="NCHW", sample_shape=[1, 8, 8]),
            evaluation=None,
        )
    assert err.value.code == "invalid_step_config" and err.value.details["step"] == "quantize_int8"
    assert err.value.details["errors"][0]["loc"] == ["mode"]


@pytest.mark.parametrize(
    ("target", "fmt", "steps", "index", "made", "runs"),
    [
        ("arm-cpu", ONNX, ["export_onnx", "convert_openvino"], 1, "an OpenVINO IR", ["x86-cpu"]),
        ("nvidia-gpu", ONNX, ["quantize_openvino", "benchmark"], 0, "an OpenVINO IR", ["x86-cpu"]),
        ("x86-cpu", ONNX, ["export_onnx", "build_tensorrt"], 1, "a TensorRT engine", ["nvidia-gpu"]),
        ("x86-cpu", KERAS, ["convert_tflite", "benchmark"], 0, "a .tflite", ["arm-cpu"]),
        ("arm-cpu", STATE_DICT, ["export_onnx", "compile_gpu"], 1, "an AOTInductor package", ["nvidia-gpu"]),
    ],
)
def test_explicit_steps_whose_artifact_runs_elsewhere_than_the_target_are_a_422(target, fmt, steps, index, made, runs):
    with pytest.raises(InvalidInput) as err:
        recipe(steps=[StepSpec(name=s) for s in steps], model_format=fmt, target=target)
    assert err.value.code == "target_mismatch"
    name = steps[index]
    assert err.value.message == (
        f"step {index} ({name}) makes {made}, which runs on {', '.join(runs)}, not on the job's target {target}"
    )
    assert err.value.details == {
        "index": index,
        "step": name,
        "format": get_spec(name).produces,
        "target": target,
        "runs_on": runs,
    }
    # Without a target the same steps are only checked for chaining (by plan_job), not for where they run.
    assert [s.name for s in recipe(steps=[StepSpec(name=s) for s in steps], model_format=fmt).steps] == steps


def test_explicit_steps_for_the_target_pass_and_a_deployment_file_does_not_change_what_the_next_step_takes():
    # The IR ends its branch: quantize_int8 takes the ONNX export, which runs on x86.
    steps = [StepSpec(name=n) for n in ("export_onnx", "convert_openvino", "quantize_int8", "benchmark")]
    assert recipe(steps=steps, target="x86-cpu").steps == steps
    check_steps_for_target("arm-cpu", [StepSpec(name=n) for n in ("convert_tflite", "export_onnx")], STATE_DICT)
    check_steps_for_target("nvidia-gpu", [StepSpec(name=n) for n in ("compile_gpu", "export_onnx")], STATE_DICT)
    # Measuring steps make nothing: a Keras upload may be benchmarked with any target.
    check_steps_for_target("x86-cpu", [StepSpec(name="benchmark")], KERAS)


def test_a_preset_with_a_target_is_checked_like_explicit_steps():
    with pytest.raises(InvalidInput) as err:
        recipe(preset="openvino-int8", target="arm-cpu")
    assert err.value.code == "target_mismatch" and err.value.details["step"] == "quantize_openvino"
    assert recipe(preset="openvino-int8", target="x86-cpu").steps[1].name == "quantize_openvino"
    # Every preset is for at least one target.
    for name in PRESETS:
        fits = []
        for target in TARGETS:
            try:
                recipe(preset=name, target=target)
                fits.append(target)
            except InvalidInput as exc:
                assert exc.code == "target_mismatch", (name, target)
        assert fits, name


# -- labels ----------------------------------------------------------------------------------------


LABELS = {
    # step: (artifact format, meta or config, runtime's precision, label)
    "export_onnx": (ONNX, {}, None, "ONNX Runtime FP32"),
    "quantize_int8": (ONNX, {"quant_format": "QOperator"}, None, "ONNX Runtime INT8 QOperator"),
    "quantize_qat": (ONNX, {"quant_format": "QDQ", "trained": True}, None, "ONNX Runtime INT8 (QAT)"),
    "convert_fp16": (ONNX, {}, None, "ONNX Runtime FP16"),
    "convert_openvino": (
        OPENVINO_IR,
        {"inference_precision": "auto", "weights": "fp16"},
        "bf16",
        "OpenVINO bf16, FP16 weights",
    ),
    "quantize_openvino": (OPENVINO_IR, {"precision": "int8"}, "bf16", "OpenVINO INT8 (NNCF)"),
    "convert_tflite": (TFLITE, {"precision": "int8"}, None, "LiteRT INT8"),
    "build_tensorrt": (TENSORRT_ENGINE, {"precision": "fp16"}, None, "TensorRT FP16"),
    "compile_gpu": (AOTI_PACKAGE, {"precision": "bf16"}, None, "AOTInductor BF16"),
    "quantize_int8_torch": (TORCHSCRIPT, {}, None, "PyTorch INT8"),
    "prune_structured": (STATE_DICT, {}, None, "PyTorch (prune_structured)"),
    "prune_unstructured": (STATE_DICT, {}, None, "PyTorch (prune_unstructured)"),
    "distill": (STATE_DICT, {}, None, "PyTorch (distill)"),
    "finetune": (STATE_DICT, {}, None, "PyTorch (finetune)"),
    "export_pt2": (EXPORTED_PROGRAM, {}, None, "PyTorch (export_pt2)"),
}


def test_every_step_that_makes_an_artifact_has_a_label():
    producing = {name for name, spec in SPECS.items() if spec.produces is not None}
    assert set(LABELS) == producing  # a new step gets a row here


@pytest.mark.parametrize("step", sorted(LABELS))
def test_the_label_says_what_the_artifact_is_and_what_runs_it(step):
    fmt, facts, ran_in, label = LABELS[step]
    assert candidate_label(step, fmt, facts, ran_in) == label


def test_labels_fall_back_to_the_config_when_the_runtime_did_not_say():
    # A failed candidate has no artifact: its label comes from its config.
    assert (
        candidate_label("convert_openvino", ONNX, {"inference_precision": "f32", "weights": "fp32"}) == "OpenVINO f32"
    )
    assert candidate_label("convert_openvino", ONNX, None) == "OpenVINO auto"
    assert candidate_label("quantize_int8", ONNX, {"search_speed": True}) == "ONNX Runtime INT8"
    assert candidate_label("quantize_int8", ONNX, {"quant_format": "dynamic"}) == "ONNX Runtime INT8 dynamic"
    assert candidate_label("convert_tflite", TFLITE, {}) == "LiteRT FP32"
    assert candidate_label("convert_tflite", TFLITE, {"precision": "mixed"}) == "LiteRT mixed INT8/float"
    assert candidate_label("build_tensorrt", TENSORRT_ENGINE, None) == "TensorRT FP32"


@pytest.mark.parametrize(
    ("fmt", "label"),
    [
        (ONNX, "original (ONNX)"),
        (EXPORTED_PROGRAM, "original (.pt2)"),
        (TORCHSCRIPT, "original (TorchScript)"),
        (STATE_DICT, "original (state dict)"),
        (KERAS, "original (Keras)"),
        (SAVED_MODEL, "original (SavedModel)"),
    ],
)
def test_the_original_is_labelled_by_its_upload_format(fmt, label):
    assert candidate_label(None, fmt, {"precision": "fp32"}, "f32") == label


def test_auto_for_a_job_at_another_batch_keeps_the_openvino_candidates_open_batch():
    """The static-shape IRs are compiled for batch 1, where the recommendation is timed; a job whose
    input batch is 4 gets IRs with an open batch axis instead, so the benchmark can time them at 1."""
    at_one = auto("x86-cpu", ONNX)
    at_four = auto_recipe("x86-cpu", model_format=ONNX, has_calibration=True, has_dataset=True, overrides=None, batch=4)
    static = {s.name: s.config.get("static_shape") for s in at_one.steps if "static_shape" in s.config}
    assert static == {"convert_openvino": True, "quantize_openvino": True}
    assert [s.config.get("static_shape") for s in at_four.steps if s.name.endswith("openvino")] == [False] * 3


def test_an_override_of_a_left_out_candidate_says_why_it_was_left_out():
    with pytest.raises(InvalidInput) as err:
        recipe(preset="auto", overrides={"quantize_openvino": {"accuracy_control": False}}, has_calibration=False)
    assert err.value.code == "unknown_step"
    assert err.value.message.endswith(f"; quantize_openvino is left out: {CALIBRATION_NEEDED}")
    assert err.value.details["left_out"] == {"quantize_openvino": CALIBRATION_NEEDED}


def test_auto_builds_quantization_aware_training_only_when_the_job_allows_training():
    without = auto_recipe("x86-cpu", model_format=ONNX, has_calibration=True, has_dataset=True, overrides=None)
    assert "quantize_qat" not in [s.name for s in without.steps]
    (why,) = [x["reason"] for x in without.left_out if x["step"] == "quantize_qat"]
    assert "allow_training" in why
    with_training = auto_recipe(
        "x86-cpu", model_format=ONNX, has_calibration=True, has_dataset=True, overrides=None, allow_training=True
    )
    names = [s.name for s in with_training.steps]
    assert names.index("export_onnx") < names.index("quantize_qat") < names.index("quantize_int8")
    # Beside the post-training INT8, not before it in one chain: QAT ends its branch, so both start from the
    # FP32 export.
    assert get_spec("quantize_qat").ends_branch and not get_spec("quantize_qat").advances_chain()
    assert get_spec("quantize_int8").advances_chain()
    plan = plan_job(
        model_format=ONNX,
        model_inputs=[{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}],
        steps=with_training.steps,
        input_shape=None,
        calibration=DatasetFacts(id="c" * 32, layout="NCHW", sample_shape=[3, 8, 8]),
        evaluation=None,
    )
    assert "quantize_qat" in [s.name for s in plan.steps]
