"""The pass registry (one source of truth), recipe planning, and the API's import hygiene."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import worker.passes
from core.errors import InvalidInput
from core.schemas import StepSpec
from worker.passes.base import Pass
from worker.passes.registry import REGISTRY
from worker.recipes import PRESETS, DatasetFacts, plan_job, resolve_input_spec


def test_every_pass_module_registers_exactly_one_pass():
    infrastructure = {"base", "registry"}
    modules = [m.name for m in pkgutil.iter_modules(worker.passes.__path__) if m.name not in infrastructure]
    found = {}
    for name in modules:
        module = importlib.import_module(f"worker.passes.{name}")
        classes = [
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Pass) and v.__module__ == module.__name__
        ]
        assert len(classes) == 1, f"{name} defines {classes}"
        found[classes[0].name] = classes[0]
    assert found == REGISTRY


def test_every_preset_plans_on_a_torchvision_state_dict_upload():
    inputs = [{"name": "x", "shape": ["batch", 1, "height", "width"], "dtype": "float32"}]
    facts = DatasetFacts(id="d", layout="NCHW", sample_shape=[1, 8, 8])
    for name, steps in PRESETS.items():
        plan = plan_job(
            model_format="state_dict",
            model_inputs=inputs,
            steps=steps,
            input_shape=None,
            calibration=facts,
            evaluation=None,
            default_input_shape=[1, 1, 8, 8],
        )
        assert plan.input_spec[0]["shape"] == [1, 1, 8, 8]
        assert [s.name for s in plan.steps] == [s.name for s in steps], name
        gpu = name.startswith(("tensorrt-", "gpu-"))
        assert plan.queue == ("gpu" if gpu else "cpu"), name


def test_step_configs_are_filled_with_defaults():
    plan = plan_job(
        model_format="onnx",
        model_inputs=[{"name": "x", "shape": ["n", 3, 4, 4], "dtype": "float32"}],
        steps=[StepSpec(name="export_onnx", config={"opset": 15})],
        input_shape=None,
        calibration=None,
        evaluation=None,
    )
    assert plan.steps[0].config == {"opset": 15, "dynamic_batch": True, "simplify": True, "tolerance": 1e-3}
    assert plan.input_spec == [{"name": "x", "shape": [1, 3, 4, 4], "dtype": "float32"}]


def test_open_spatial_dims_need_an_input_shape():
    inputs = [{"name": "x", "shape": ["n", 3, "h", "w"], "dtype": "float32"}]
    with pytest.raises(InvalidInput) as err:
        resolve_input_spec(inputs, None)
    assert err.value.code == "input_shape_required"
    assert resolve_input_spec(inputs, [2, 3, 64, 48])[0]["shape"] == [2, 3, 64, 48]
    assert resolve_input_spec(inputs, {"x": [1, 3, 8, 8]})[0]["shape"] == [1, 3, 8, 8]


def test_several_inputs_need_named_shapes():
    inputs = [{"name": "a", "shape": None, "dtype": "float32"}, {"name": "b", "shape": None, "dtype": "float32"}]
    with pytest.raises(InvalidInput) as err:
        resolve_input_spec(inputs, [1, 3])
    assert err.value.code == "input_shape_required"
    with pytest.raises(InvalidInput) as err:
        resolve_input_spec(inputs, {"a": [1], "c": [2]})
    assert err.value.code == "shape_mismatch"


def test_the_api_never_imports_torch_or_onnxruntime():
    code = (
        "import sys; import api.main; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorflow', 'tensorrt', 'onnxscript') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dynamic_int8_plans_without_a_calibration_dataset():
    inputs = [{"name": "x", "shape": [1, 16], "dtype": "float32"}]
    steps = [StepSpec(name="quantize_int8", config={"mode": "dynamic"})]
    plan = plan_job(
        model_format="onnx", model_inputs=inputs, steps=steps, input_shape=None, calibration=None, evaluation=None
    )
    assert plan.steps[0].config["mode"] == "dynamic"
    with pytest.raises(InvalidInput) as err:
        plan_job(
            model_format="onnx",
            model_inputs=inputs,
            steps=[StepSpec(name="quantize_int8")],
            input_shape=None,
            calibration=None,
            evaluation=None,
        )
    assert err.value.code == "calibration_dataset_required"


def test_mean_and_std_give_one_value_or_one_per_channel():
    from core.schemas import Preprocessing

    def plan(prep: dict, shape: list[int]):
        return plan_job(
            model_format="onnx",
            model_inputs=[{"name": "x", "shape": shape, "dtype": "float32"}],
            steps=[StepSpec(name="export_onnx")],
            input_shape=None,
            calibration=None,
            evaluation=None,
            preprocessing=Preprocessing.model_validate(prep),
        )

    for fine, shape in (
        ({"mean": [0.5]}, [1, 3, 8, 8]),
        ({"mean": [1, 2, 3], "std": [1, 1, 1]}, [1, 3, 8, 8]),
        ({"mean": [1, 2, 3]}, [1, 8, 8, 3]),
        ({"mean": [1, 2]}, [1, 10]),
    ):
        plan(fine, shape)
    for bad, shape, field in (
        ({"mean": [1, 2]}, [1, 3, 8, 8], "mean"),
        ({"std": [1, 1, 1]}, [1, 1, 8, 8], "std"),
        ({"mean": []}, [1, 8, 8, 3], "mean"),
    ):
        with pytest.raises(InvalidInput) as err:
            plan(bad, shape)
        assert err.value.code == "invalid_preprocessing" and err.value.details["field"] == field


def test_the_readmes_preset_table_lists_every_step_in_order():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {k: v for k, v in re.findall(r"^\| `([a-z0-9-]+)` \| (.+) \|$", readme, re.M) if k in PRESETS}
    assert set(rows) == set(PRESETS)
    for name, steps in PRESETS.items():
        if rows[name].startswith("the same with"):
            continue  # described by the row before it
        listed = re.findall(rf"\b(?:{'|'.join(REGISTRY)})\b", rows[name])
        assert listed == [s.name for s in steps], name


def test_every_pass_declares_its_version_and_a_pass_without_one_is_refused():
    assert all(isinstance(cls.__dict__.get("version"), int) for cls in REGISTRY.values())
    with pytest.raises(TypeError, match="declares no version"):
        type("Unversioned", (Pass,), {"name": "unversioned", "run": lambda self, ctx, source, config: None})
    assert "unversioned" not in REGISTRY
