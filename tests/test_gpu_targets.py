"""The GPU targets' logic that runs without a GPU: TensorRT profiles, precision plans, names and
metadata (TensorRT itself cannot be installed here: the tests that need it are skipped, saying
so), GPU kinds and queues, the hand-over between GPU kinds, and compile_gpu's packaging on the
CPU (AOTInductor compiles CPU packages too; the CUDA path is proven by bench/gpu.sh on a GPU)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

from core.errors import InvalidInput, PassError
from core.recipes import plan_job, resolve_steps
from core.schemas import StepSpec
from core.steps.build_tensorrt import BuildTensorrtConfig, ShapeRange
from core.workers import gpu_kind_from_name, gpu_queue, waiting_for
from tests.test_passes import context, run_pass
from worker.passes.base import ArtifactRef
from worker.passes.build_tensorrt import (
    engine_metadata,
    engine_name,
    plan_precision,
    plan_profiles,
    timing_cache_key,
)

H100 = {"name": "NVIDIA H100 80GB HBM3", "kind": "h100", "compute_capability": "9.0", "cuda": "12.8"}
NEEDS_TRT = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installable here (NVIDIA's index, no GPU)"
)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("Tesla T4", "t4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("Orin", "orin"),
    ],
)
def test_gpu_kinds_are_short_stable_slugs(name, kind):
    assert gpu_kind_from_name(name) == kind
    assert gpu_queue(kind) == f"gpu.{kind}" and gpu_queue(None) == "gpu"
    assert waiting_for("gpu") == "gpu worker" and waiting_for(f"gpu.{kind}") == f"gpu worker ({kind})"


def test_open_batch_gets_the_profiles_ranges_and_fixed_models_one_profile():
    spec = [{"name": "x", "shape": [1, 3, 224, 224], "dtype": "float32"}]
    open_batch = [{"name": "x", "shape": [None, 3, 224, 224]}]
    (p,) = plan_profiles(open_batch, spec, [ShapeRange(min_batch=1, opt_batch=8, max_batch=32)])
    assert p.shapes["x"] == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    two = plan_profiles(open_batch, spec, [ShapeRange(), ShapeRange(min_batch=16, opt_batch=32, max_batch=64)])
    assert [q.shapes["x"][1][0] for q in two] == [1, 32]
    fixed = [{"name": "x", "shape": [1, 3, 224, 224]}]
    profiles = plan_profiles(fixed, spec, [ShapeRange(), ShapeRange(max_batch=64)])
    assert len(profiles) == 1 and profiles[0].shapes["x"][0] == profiles[0].shapes["x"][2] == (1, 3, 224, 224)


def test_open_resolution_takes_the_hw_range():
    spec = [{"name": "img", "shape": [1, 3, 320, 320], "dtype": "float32"}]
    declared = [{"name": "img", "shape": ["n", 3, "h", "w"]}]
    r = ShapeRange(min_batch=1, opt_batch=4, max_batch=8, min_hw=[256, 256], opt_hw=[320, 320], max_hw=[640, 640])
    (p,) = plan_profiles(declared, spec, [r])
    assert p.shapes["img"] == ((1, 3, 256, 256), (4, 3, 320, 320), (8, 3, 640, 640))
    # Without a hw range the job's resolution is the only one.
    (q,) = plan_profiles(declared, spec, [ShapeRange(max_batch=8)])
    assert q.shapes["img"][0][2:] == q.shapes["img"][2][2:] == (320, 320)


def test_shape_ranges_must_be_ordered():
    with pytest.raises(ValueError):
        ShapeRange(min_batch=8, opt_batch=4, max_batch=16)
    with pytest.raises(ValueError):
        ShapeRange(min_hw=[256, 256], opt_hw=[128, 128], max_hw=[512, 512])
    with pytest.raises(ValueError):
        ShapeRange(min_hw=[256, 256])
    with pytest.raises(ValueError):
        BuildTensorrtConfig(fp32_layers=["(unclosed"])


NODES = [("conv1", "Conv"), ("relu1", "Relu"), ("head/Softmax", "Softmax"), ("fc", "Gemm")]


def test_precision_plans():
    assert plan_precision("fp32", qdq_nodes=0, nodes=NODES, fp32_patterns=[]).builder_flags == []
    assert plan_precision("fp16", qdq_nodes=0, nodes=NODES, fp32_patterns=[]).builder_flags == ["FP16"]
    int8 = plan_precision("int8", qdq_nodes=40, nodes=NODES, fp32_patterns=[])
    assert set(int8.builder_flags) == {"INT8", "FP16"} and int8.explicit_quantization
    best = plan_precision("best", qdq_nodes=0, nodes=NODES, fp32_patterns=[])
    assert best.builder_flags == ["FP16"] and "INT8 left out" in best.notes[0]
    with pytest.raises(PassError) as err:
        plan_precision("int8", qdq_nodes=0, nodes=NODES, fp32_patterns=[])
    assert err.value.code == "int8_needs_qdq" and "quantize_int8" in err.value.message


def test_fp32_layers_become_obeyed_constraints_and_must_match():
    plan = plan_precision("fp16", qdq_nodes=0, nodes=NODES, fp32_patterns=["Softmax", "fc"])
    assert plan.fp32_layers == ["head/Softmax", "fc"]
    assert "OBEY_PRECISION_CONSTRAINTS" in plan.builder_flags
    with pytest.raises(PassError) as err:
        plan_precision("fp16", qdq_nodes=0, nodes=NODES, fp32_patterns=["LayerNorm"])
    assert err.value.details == {"unmatched": ["LayerNorm"]}


def test_engine_names_and_metadata_say_which_gpu_and_version():
    name = engine_name(model_stem="03-export_onnx", precision="fp16", gpu=H100, trt_version="10.8.0.43")
    assert name == "03-export_onnx.fp16.h100-sm90.trt10.8.engine"
    key = timing_cache_key(gpu=H100, trt_version="10.8.0.43")
    assert key == "tensorrt/timing-cache/nvidia-h100-80gb-hbm3-sm90/trt-10.8.0.43.cache"
    assert timing_cache_key(gpu={**H100, "compute_capability": "8.9"}, trt_version="10.8.0.43") != key
    profiles = plan_profiles(
        [{"name": "x", "shape": [None, 3, 8, 8]}], [{"name": "x", "shape": [1, 3, 8, 8]}], [ShapeRange(max_batch=4)]
    )
    plan = plan_precision("fp16", qdq_nodes=0, nodes=NODES, fp32_patterns=["Softmax"])
    meta = engine_metadata(gpu=H100, trt_version="10.8.0.43", precision="fp16", profiles=profiles, plan=plan)
    assert meta["gpu_name"] == H100["name"] and meta["compute_capability"] == "9.0"
    assert meta["tensorrt"] == "10.8.0.43" and meta["cuda"] == "12.8"
    assert meta["profiles"] == [{"x": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [4, 3, 8, 8]}}]
    assert meta["fp32_layers"] == ["head/Softmax"]


def test_tensorrt_presets_plan_onto_gpu_queues():
    spec = [{"name": "x", "shape": [None, 3, 8, 8], "dtype": "float32"}]
    plan = plan_job(
        model_format="onnx",
        model_inputs=spec,
        steps=resolve_steps(preset="tensorrt-fp16", steps=None, has_dataset=False),
        input_shape=None,
        calibration=None,
        evaluation=None,
    )
    assert plan.queue == "gpu"
    assert [(s.name, s.queue) for s in plan.steps] == [
        ("export_onnx", "cpu"),
        ("build_tensorrt", "gpu"),
        ("benchmark", "cpu"),
    ]
    # Two GPU kinds in one job: it starts on the first kind's queue; the runner hands it over.
    steps = [
        StepSpec(name="export_onnx"),
        StepSpec(name="build_tensorrt", config={"gpu_kind": "h100"}),
        StepSpec(name="benchmark"),
        StepSpec(name="build_tensorrt", config={"gpu_kind": "l4"}),
        StepSpec(name="benchmark"),
    ]
    plan = plan_job(
        model_format="onnx", model_inputs=spec, steps=steps, input_shape=None, calibration=None, evaluation=None
    )
    assert plan.queue == "gpu.h100"
    assert [s.queue for s in plan.steps] == ["cpu", "gpu.h100", "cpu", "gpu.l4", "cpu"]
    # INT8 for TensorRT is symmetric int8 Q/DQ with per-channel weights.
    quant = next(s for s in resolve_steps(preset="tensorrt-int8", steps=None) if s.name == "quantize_int8")
    assert quant.config["activation_type"] == "int8" and quant.config["symmetric_activations"]
    assert quant.config["reduce_range"] is False


def test_a_bad_gpu_kind_is_a_422():
    with pytest.raises(InvalidInput) as err:
        plan_job(
            model_format="onnx",
            model_inputs=[{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}],
            steps=[StepSpec(name="build_tensorrt", config={"gpu_kind": "H100 PCIe!"})],
            input_shape=None,
            calibration=None,
            evaluation=None,
        )
    assert err.value.code == "invalid_step_config"


@pytest.mark.integration
def test_build_tensorrt_without_a_gpu_fails_with_a_clear_reason(digit_assets, tmp_path):
    original = ArtifactRef("digits.onnx", "onnx", digit_assets.models["onnx"])
    with pytest.raises(PassError) as err:
        run_pass("build_tensorrt", context(tmp_path, original), original)
    assert err.value.code in ("no_gpu", "tensorrt_missing")


@pytest.mark.integration
@NEEDS_TRT
def test_preflight_and_build_on_a_gpu_worker(digit_assets, tmp_path):  # runs where TensorRT is
    from worker import tensorrt_backend

    assert tensorrt_backend.unsupported_ops(digit_assets.models["onnx"]) == []
    original = ArtifactRef("digits.onnx", "onnx", digit_assets.models["onnx"])
    result = run_pass("build_tensorrt", context(tmp_path, original), original, precision="fp16")
    assert result.format == "tensorrt_engine" and result.meta["tensorrt"]
    runner = tensorrt_backend.EngineRunner(result.artifact)
    out = runner({"image": digit_assets.x[:1]})[0]
    assert out.shape == (1, 10)


@pytest.mark.integration
def test_compile_gpu_packages_and_checks_in_a_child_process(digit_assets, tmp_path):
    """The AOTInductor path end to end on the CPU (device=cpu): compile, load in a child
    process, compare, and load it back through the runtime."""
    from worker.runtime import load_runner

    original = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    result = run_pass("compile_gpu", context(tmp_path, original), original, device="cpu", precision="fp32", max_batch=8)
    assert result.format == "aoti_package", result.metrics
    assert result.metrics["package"] == "aoti" and result.metrics["snr_db"] > 60
    assert result.metrics["dynamic_batch"] is False  # this upload was exported with batch 1
    package = ArtifactRef("p.aoti.pt2", result.format, result.artifact, meta=dict(result.meta))
    x = digit_assets.x[:1]
    got = load_runner(package)({"image": x})[0]
    want = load_runner(original)({"image": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_compile_gpu_without_a_gpu_says_so(digit_assets, tmp_path):
    original = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    with pytest.raises(PassError) as err:
        run_pass("compile_gpu", context(tmp_path, original), original)
    assert err.value.code == "no_gpu"


@pytest.mark.integration
def test_gpu_artifacts_are_skipped_not_crashed_on_a_cpu_worker(digit_assets, tmp_path):
    original = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    engine = ArtifactRef(
        "m.engine",
        "tensorrt_engine",
        digit_assets.models["onnx"],
        step="build_tensorrt",
        meta={"gpu_name": H100["name"], "compute_capability": "9.0"},
    )
    ctx = context(tmp_path, original, artifacts=[engine])
    bench = run_pass("benchmark", ctx, engine, batch_sizes=[1], runs=5, warmup=1)
    rows = {r["artifact"]: r for r in bench.metrics["results"]}
    assert rows["m.engine"]["skipped"] == "needs an NVIDIA GPU; this worker has none"
    assert rows["digits.pt2"]["latency"]["1"]["p50_ms"] > 0
    assert onnx  # the engine stand-in above is an ONNX file: it must never be opened as one
