"""The pass specs and their implementations (one source of truth each, kept in step), recipe planning,
and the API's import hygiene."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import core.steps
import worker.passes
from core.errors import InvalidInput
from core.recipes import PRESETS, DatasetFacts, plan_job, resolve_input_spec
from core.schemas import StepSpec
from core.steps.base import PassSpec
from core.steps.registry import SPECS, get_spec
from worker.passes.base import Pass
from worker.passes.registry import REGISTRY, get_pass

SPEC_MEMBERS = (
    "name",
    "version",
    "description",
    "Config",
    "accepts",
    "produces",
    "needs",
    "queue",
    "format_hints",
    "output_format",
    "step_queue",
    "requirements",
)


def _defined_in(package, base: type, infrastructure=frozenset({"base", "registry"})) -> dict[str, list[type]]:
    """module name -> the subclasses of ``base`` that module defines itself."""
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in infrastructure:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found[info.name] = [
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, base) and v is not base and v.__module__ == module.__name__
        ]
    return found


def test_every_pass_module_registers_exactly_one_pass():
    found = {}
    for name, classes in _defined_in(worker.passes, Pass).items():
        assert len(classes) == 1, f"{name} defines {classes}"
        found[classes[0].name] = classes[0]
    assert found == REGISTRY


def test_every_step_module_defines_exactly_one_spec():
    found = {}
    for name, classes in _defined_in(core.steps, PassSpec).items():
        assert len(classes) == 1, f"core.steps.{name} defines {classes}"
        assert classes[0].name == name
        found[name] = classes[0]
    assert found == SPECS


def test_every_spec_has_exactly_one_implementation_and_every_pass_a_spec():
    assert set(SPECS) == set(REGISTRY)
    for name, spec in SPECS.items():
        implementations = [cls for cls in REGISTRY.values() if spec in cls.__mro__ and cls.name == name]
        assert implementations == [REGISTRY[name]], name
        implementation = REGISTRY[name]
        assert implementation.version == spec.version, name
        # The pass adds run and its helpers; what the API plans with is the spec's alone.
        assert not set(SPEC_MEMBERS) & set(vars(implementation)), name
        assert get_pass(name) is implementation and get_spec(name) is spec


def test_the_runtime_registry_covers_exactly_the_measurable_formats():
    """One table (worker.runtime.RUNTIMES) answers load / info / can-run for every format a step
    can measure, and no other."""
    from core.formats import MEASURABLE_FORMATS
    from worker.runtime import RUNTIMES

    assert set(RUNTIMES) == set(MEASURABLE_FORMATS)


def test_measuring_steps_skip_what_this_worker_cannot_run_but_never_the_reference(monkeypatch, tmp_path):
    """An artifact this worker cannot run is skipped with the reason; the original (refs[0], what
    every ratio and drop is taken against) is never skipped: the step fails saying why."""
    import dataclasses

    from core.errors import PassError
    from core.formats import ONNX, TFLITE
    from worker import runtime
    from worker.passes.base import ArtifactRef

    no_litert = dataclasses.replace(runtime.RUNTIMES[TFLITE], unavailable=lambda ref: "ai-edge-litert is not installed")
    monkeypatch.setitem(runtime.RUNTIMES, TFLITE, no_litert)
    original = ArtifactRef(name="model.onnx", format=ONNX, path=tmp_path / "model.onnx")
    phone = ArtifactRef(name="model.tflite", format=TFLITE, path=tmp_path / "model.tflite", step="convert_tflite")
    assert runtime.split_runnable([original, phone]) == ([original], [(phone, "ai-edge-litert is not installed")])
    with pytest.raises(PassError) as err:
        runtime.split_runnable([phone, original])
    assert err.value.code == "runtime_unavailable" and "ai-edge-litert" in str(err.value)


def test_an_unknown_step_is_the_same_error_for_spec_and_pass():
    for lookup in (get_spec, get_pass):
        with pytest.raises(InvalidInput) as err:
            lookup("no_such_step")
        assert err.value.code == "unknown_step"
        assert err.value.details == {"step": "no_such_step", "known_steps": sorted(SPECS)}


def test_importing_one_pass_runs_no_other_pass_module_and_the_specs_no_worker_code():
    code = (
        "import sys; import worker.passes.export_onnx; import core.recipes, core.steps.registry; "
        "passes = sorted(m for m in sys.modules if m.startswith('worker.passes.')); "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'tensorflow', 'tensorrt')]; "
        "print(passes, heavy); "
        "sys.exit(0 if passes == ['worker.passes.base', 'worker.passes.export_onnx'] and not heavy else 1)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


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
        "heavy += [m for m in sys.modules if m == 'worker' or m.startswith('worker.')]; "
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


def test_every_spec_declares_its_version_and_a_spec_without_one_is_refused():
    assert all(isinstance(vars(spec).get("version"), int) for spec in SPECS.values())
    with pytest.raises(TypeError, match="declares no version"):
        type("Unversioned", (PassSpec,), {"name": "unversioned"})
    assert "unversioned" not in SPECS


def test_no_pass_module_imports_another_pass():
    """Shared words live below the passes (core.formats, core.steps, worker.onnx_graph, worker.timing...), so a
    pass depends on base alone among worker.passes, even inside a function."""
    import ast
    from pathlib import Path

    package = Path(worker.passes.__path__[0])
    for path in package.glob("*.py"):
        if path.stem in ("__init__", "base", "registry"):
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        others = {m for m in imported if m.startswith("worker.passes") and m != "worker.passes.base"}
        assert not others, f"{path.stem} imports {sorted(others)}"
