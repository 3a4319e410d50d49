"""Passes on what a new user brings (issue 10): an ONNX upload fixed at batch 1, one at opset 12 with its
weights in Constant nodes, and evaluation sets of any size. Setup, execute, assert on the artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import digits
from tests.test_passes import PREP, SPEC, context, npz_ref, run_pass
from worker.passes.base import ArtifactRef, DatasetRef, PassContext

pytestmark = pytest.mark.integration


def fixed_batch_net(path: Path, *, opset: int = 17, batch: int = 1) -> Path:
    """Conv -> ReLU -> view(batch, -1) -> Linear exported without dynamic axes, as most users export: the
    input, the output and the Reshape target all hold the batch size."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

        def forward(self, image):
            y = torch.relu(self.conv(image))
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(0)
    torch.onnx.export(
        Net().eval(),
        (torch.zeros(batch, 1, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["image"],
        output_names=["logits"],
    )
    return path


def weights_in_constants(path: Path) -> Path:
    """Every initializer moved into a Constant node, as other frameworks' converters write them."""
    model = onnx.load(str(path))
    constants = [
        helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}_const") for t in model.graph.initializer
    ]
    nodes = [*constants, *model.graph.node]
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))
    return path


def batch_bound_model(path: Path, kind: str) -> Path:
    """A batch-1 graph whose batch cannot be opened: ``flatten`` folds the batch into one vector (it no longer
    runs at batch 3); ``mix`` averages over the batch (it runs, but each sample's output depends on the others)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32), "w")
    if kind == "flatten":
        nodes = [
            helper.make_node("Reshape", ["image", "flat"], ["v"]),
            helper.make_node("MatMul", ["v", "w"], ["m"]),
            helper.make_node("Reshape", ["m", "row"], ["logits"]),
        ]
        inits = [
            w,
            numpy_helper.from_array(np.array([64], np.int64), "flat"),
            numpy_helper.from_array(np.array([1, 10], np.int64), "row"),
        ]
    else:
        nodes = [
            helper.make_node("Flatten", ["image"], ["v"]),
            helper.make_node("MatMul", ["v", "w"], ["m"]),
            helper.make_node("ReduceMean", ["m"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Add", ["m", "mean"], ["logits"]),
        ]
        inits = [w]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def batch_dim(path: Path):
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else dim.dim_param


# -- item 5: the batch axis of an ONNX upload ----------------------------------------------------------------


def test_a_batch_1_onnx_upload_gets_an_open_batch_axis_and_a_batch_8_measurement(tmp_path):
    upload = ArtifactRef("net.onnx", "onnx", fixed_batch_net(tmp_path / "net.onnx"))
    result = run_pass("export_onnx", context(tmp_path / "e", upload), upload)
    x = np.random.default_rng(1).standard_normal((8, 1, 8, 8)).astype(np.float32)
    got = session(result.artifact).run(None, {"image": x})[0]
    original = session(upload.path)
    want = np.concatenate([original.run(None, {"image": x[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert batch_dim(result.artifact) == "batch"
    assert result.metrics["batch_axis"] == "dynamic" and "batch_axis_reason" not in result.metrics

    exported = ArtifactRef("exported.onnx", "onnx", result.artifact, step="export_onnx")
    bench = run_pass(
        "benchmark",
        context(tmp_path / "b", upload, artifacts=[exported]),
        exported,
        runs=5,
        warmup=1,
        batch_sizes=[1, 8],
    )
    upload_row, exported_row = bench.metrics["results"]
    assert exported_row["latency"]["8"]["images_per_s"] > 0
    # The upload itself stays at batch 1; its batch-8 row says so in words.
    assert upload_row["latency"]["8"] == {"error": "the model's batch axis is fixed at 1"}


@pytest.mark.parametrize(
    ("kind", "why"), [("flatten", "does not run at batch 3"), ("mix", "does not give each sample its batch-1 output")]
)
def test_a_graph_that_binds_the_batch_stays_fixed_and_says_why(tmp_path, kind, why):
    upload = ArtifactRef("bound.onnx", "onnx", batch_bound_model(tmp_path / "bound.onnx", kind))
    result = run_pass("export_onnx", context(tmp_path / "e", upload), upload)
    assert result.metrics["batch_axis"] == "fixed"
    assert result.metrics["batch_axis_reason"].startswith("the model's batch axis is fixed at 1")
    assert why in result.metrics["batch_axis_reason"]
    assert batch_dim(result.artifact) == 1
    exported = ArtifactRef("exported.onnx", "onnx", result.artifact, step="export_onnx")
    bench = run_pass(
        "benchmark",
        context(tmp_path / "b", upload, artifacts=[exported]),
        exported,
        runs=5,
        warmup=1,
        batch_sizes=[1, 8],
    )
    for row in bench.metrics["results"]:
        assert row["latency"]["1"]["p50_ms"] > 0
        assert row["latency"]["8"] == {"error": "the model's batch axis is fixed at 1"}


def test_a_benchmark_failure_other_than_the_batch_is_named_with_its_batch(tmp_path):
    from worker.passes.benchmark import batch_error

    ref = ArtifactRef("net.onnx", "onnx", fixed_batch_net(tmp_path / "net.onnx", batch=8))
    assert batch_error(ref, 8, RuntimeError("out of luck\nsecond line")) == "batch 8 failed: out of luck"
    assert batch_error(ref, 1, RuntimeError("x")) == "the model's batch axis is fixed at 8"


# -- item 6: evaluation sets of any size ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 20, 50])
def test_evaluation_counts_every_sample_of_a_small_set(digit_assets, tmp_path, n):
    """The .pt2 upload is fixed at batch 1, its ONNX export is open: both see all n samples, none dropped."""
    x, y = digit_assets.x[1500 : 1500 + n], digit_assets.y[1500 : 1500 + n]
    dataset = npz_ref(digits.write_npz(tmp_path / "eval.npz", x, y), True, n)
    original = ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])
    exported = ArtifactRef("digits.onnx", "onnx", digit_assets.models["onnx"], step="export_onnx")
    ctx = context(tmp_path, original, artifacts=[exported], evaluation_dataset=dataset)
    result = run_pass("evaluate", ctx, exported)  # default batch 32: 1 and 20 are one partial batch
    assert result.metrics["num_samples"] == n
    rows = {r["artifact"]: r for r in result.metrics["results"]}
    assert rows["digits.pt2"]["samples"] == rows["digits.onnx"]["samples"] == n
    predicted = session(digit_assets.models["onnx"]).run(None, {"image": x})[0].argmax(1)
    assert rows["digits.onnx"]["accuracy"]["top1"] == pytest.approx(float((predicted == y).mean()))
    assert rows["digits.onnx"]["fidelity"]["top1_agreement"] == 1.0


def test_a_one_image_archive_is_evaluated(digit_assets, tmp_path):
    archive = digits.write_image_zip(tmp_path / "one.zip", digit_assets.x[1500:1501], digit_assets.y[1500:1501])
    dataset = DatasetRef(path=archive, format="zip", labeled=True, num_samples=1, layout="HWC", sample_shape=[8, 8, 1])
    exported = ArtifactRef("digits.onnx", "onnx", digit_assets.models["onnx"])
    result = run_pass("evaluate", context(tmp_path, exported, evaluation_dataset=dataset), exported)
    assert result.metrics["num_samples"] == 1 and result.metrics["results"][0]["samples"] == 1


def test_a_model_fixed_at_batch_4_evaluates_a_set_of_5(digit_assets, tmp_path):
    """The last sample runs in a batch padded to the model's size; the padding's outputs are not counted."""
    model = fixed_batch_net(tmp_path / "b4.onnx", batch=4)
    x = digit_assets.x[1500:1505]
    dataset = npz_ref(digits.write_npz(tmp_path / "eval.npz", x), False, 5)
    ref = ArtifactRef("b4.onnx", "onnx", model)
    spec = [dict(SPEC[0], shape=[4, 1, 8, 8])]
    ctx = PassContext(
        work_dir=tmp_path, original=ref, artifacts=[], input_spec=spec, preprocessing=PREP, evaluation_dataset=dataset
    )
    result = run_pass("evaluate", ctx, ref)
    assert result.metrics["num_samples"] == 5 and result.metrics["results"][0]["samples"] == 5
    assert "accuracy" not in result.metrics["results"][0]  # unlabeled


# -- item 14: INT8 of an opset-12 upload ------------------------------------------------------------------------


@pytest.fixture
def opset12_upload(tmp_path) -> ArtifactRef:
    path = weights_in_constants(fixed_batch_net(tmp_path / "op12.onnx", opset=12))
    assert onnx.load(str(path)).opset_import[0].version == 12 and not onnx.load(str(path)).graph.initializer
    return ArtifactRef("op12.onnx", "onnx", path)


def calibration(digit_assets) -> DatasetRef:
    return npz_ref(digit_assets.calibration_npz, False, 256)


def assert_loads_and_agrees(fp32: Path, int8: Path, x: np.ndarray) -> None:
    onnx.checker.check_model(onnx.load(str(int8)))
    want = session(fp32).run(None, {"image": x[:1]})[0]
    got = session(int8).run(None, {"image": x[:1]})[0]
    assert got.shape == want.shape and np.isfinite(got).all()


def test_int8_of_an_opset_12_upload_converts_the_opset_and_keeps_per_channel_weights(
    opset12_upload, digit_assets, tmp_path
):
    exported = run_pass("export_onnx", context(tmp_path / "e", opset12_upload), opset12_upload)
    ref = ArtifactRef("e.onnx", "onnx", exported.artifact, step="export_onnx")
    ctx = context(tmp_path / "q", ref, calibration_dataset=calibration(digit_assets))
    result = run_pass("quantize_int8", ctx, ref, num_calibration_samples=64)
    assert_loads_and_agrees(ref.path, result.artifact, digit_assets.x[1500:1508])
    assert result.metrics["converted_from_opset"] == 12 and result.metrics["opset"] == 13
    assert result.metrics["per_channel"] is True
    quantized = onnx.load(str(result.artifact))
    assert next(o.version for o in quantized.opset_import if o.domain == "") >= 13
    weight_dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and "conv.weight" in n.input[0])
    scale = next(t for t in quantized.graph.initializer if t.name == weight_dq.input[1])
    assert list(scale.dims) == [4]  # one scale per output channel


def test_int8_straight_on_an_opset_12_upload_with_constant_weights(opset12_upload, digit_assets, tmp_path):
    for mode, kw in (("static", {"num_calibration_samples": 32}), ("dynamic", {})):
        ctx = context(tmp_path / mode, opset12_upload, calibration_dataset=calibration(digit_assets))
        result = run_pass("quantize_int8", ctx, opset12_upload, mode=mode, **kw)
        assert_loads_and_agrees(opset12_upload.path, result.artifact, digit_assets.x[1500:1508])
        assert result.metrics["converted_from_opset"] == 12, mode


def test_int8_falls_back_to_per_tensor_when_the_opset_cannot_be_converted(
    opset12_upload, digit_assets, tmp_path, monkeypatch
):
    from onnx import version_converter

    def refuse(model, target):
        raise RuntimeError("no adapter for this operator")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    ctx = context(tmp_path, opset12_upload, calibration_dataset=calibration(digit_assets))
    result = run_pass("quantize_int8", ctx, opset12_upload, num_calibration_samples=32)
    assert_loads_and_agrees(opset12_upload.path, result.artifact, digit_assets.x[1500:1508])
    assert result.metrics["per_channel"] is False and result.metrics["opset"] == 12
    assert "per tensor" in result.metrics["warning"] and "no adapter" in result.metrics["warning"]
    quantized = onnx.load(str(result.artifact))
    assert not [
        a for n in quantized.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"
    ]


def test_an_upload_that_onnxslim_moves_past_the_tolerance_is_kept_unsimplified(tmp_path):
    """PP-OCRv4's text detector (weights in Constant nodes): onnxslim's fusions move its probability map
    by 2.5e-3 of its range, more than the check allows. The step keeps the graph as exported and says so,
    instead of failing the job."""
    from core.schemas import Preprocessing
    from tests.real_models import TEXT_DETECTOR, asset

    original = ArtifactRef(TEXT_DETECTOR.file, "onnx", asset(TEXT_DETECTOR.file))
    work = tmp_path / "work"
    work.mkdir()
    ctx = PassContext(
        work_dir=work,
        original=original,
        artifacts=[],
        input_spec=[{"name": "x", "shape": TEXT_DETECTOR.input_shape, "dtype": "float32"}],
        preprocessing=Preprocessing(**TEXT_DETECTOR.preprocessing),
    )
    result = run_pass("export_onnx", ctx, original)
    assert result.metrics["simplified"] is False
    assert result.metrics["max_relative_error"] <= 1e-3
    assert "kept the graph without onnxslim" in result.metrics["warning"]
    assert result.metrics["constants_to_initializers"] > 300  # and its weights are initializers now
