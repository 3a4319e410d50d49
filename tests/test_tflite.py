"""convert_tflite on the trained digit CNN: each precision is converted by litert-torch, run in
the LiteRT interpreter (XNNPACK) and measured against the original on held-out digits."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import InvalidInput
from core.recipes import plan_job, resolve_steps
from core.schemas import StepSpec
from tests.test_passes import PREP, SPEC, context, keep, npz_ref, run_pass
from worker.litert import TfliteRunner, io_details
from worker.passes.base import ArtifactRef

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def original(digit_assets) -> ArtifactRef:
    return ArtifactRef("digits.pt2", "exported_program", digit_assets.models["pt2"])


def accuracy(runner, digit_assets, n: int = 200) -> float:
    x, y = digit_assets.x[1500 : 1500 + n], digit_assets.y[1500 : 1500 + n]
    logits = np.concatenate([runner({"image": x[i : i + 1]})[0] for i in range(n)])
    return float((logits.argmax(1) == y).mean())


@pytest.fixture(scope="module")
def original_accuracy(original, digit_assets) -> float:
    from worker.runtime import load_runner

    return accuracy(load_runner(original), digit_assets)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_each_precision_runs_in_the_interpreter_and_keeps_accuracy(
    precision, original, original_accuracy, digit_assets, tmp_path
):
    ctx = context(
        tmp_path,
        original,
        calibration_dataset=npz_ref(digit_assets.calibration_npz, False, 256),
        evaluation_dataset=npz_ref(digit_assets.labeled_npz, True, 297),
    )
    result = run_pass("convert_tflite", ctx, original, precision=precision, num_calibration_samples=128)
    assert result.format == "tflite"
    assert result.artifact.read_bytes()[4:8] == b"TFL3"  # the flatbuffer's file identifier
    verification = result.metrics["verification"]
    assert verification["inputs"] == "dataset" and verification["samples"] >= 32
    assert verification["snr_db"] >= verification["min_snr_db"]
    coverage = result.metrics["interpreter"]
    assert coverage["delegate"] == "XNNPACK" and coverage["ops_delegated"] > 0
    assert coverage["ops_delegated"] + coverage["ops_fallback"] == coverage["ops"]

    runner = TfliteRunner(result.artifact)
    got = accuracy(runner, digit_assets)
    assert got >= original_accuracy - (0.02 if precision == "int8" else 0.005)
    io = io_details(result.artifact)
    if precision == "int8":
        # Full integer: int8 in, int8 out, with the scale a phone app quantizes its pixels by.
        assert io["inputs"][0]["dtype"] == "int8" and io["inputs"][0]["quantization"]["scale"] > 0
        assert result.metrics["calibration_samples"] == 128
    else:
        assert io["inputs"][0]["dtype"] == "float32"


def test_sizes_follow_the_precision(original, digit_assets, tmp_path):
    sizes = {}
    for precision in ("fp32", "fp16", "int8"):
        ctx = context(
            tmp_path / precision, original, calibration_dataset=npz_ref(digit_assets.calibration_npz, False, 256)
        )
        sizes[precision] = run_pass("convert_tflite", ctx, original, precision=precision).metrics["size_bytes"]
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    assert sizes["int8"] < 0.4 * sizes["fp32"]


def test_channels_last_io_takes_nhwc_and_the_runner_transposes(original, digit_assets, tmp_path):
    result = run_pass("convert_tflite", context(tmp_path, original), original, io_layout="nhwc")
    assert io_details(result.artifact)["inputs"][0]["shape"] == [1, 8, 8, 1]
    assert result.metrics["verification"]["inputs"] == "random"
    x = digit_assets.x[1500:1501]
    nchw = TfliteRunner(result.artifact, layout="nhwc")({"image": x})[0]
    from worker.runtime import load_runner

    np.testing.assert_allclose(nchw, load_runner(original)({"image": x})[0], rtol=1e-3, atol=1e-3)


def test_a_larger_batch_is_resized_or_refused_cleanly(original, digit_assets, tmp_path):
    result = run_pass("convert_tflite", context(tmp_path, original), original)
    runner = TfliteRunner(result.artifact)
    x = digit_assets.x[1500:1508]
    try:
        out = runner({"image": x})[0]
        assert out.shape == (8, 10)
    except (RuntimeError, ValueError):
        pass  # the graph keeps its batch; the runner must still serve batch 1 afterwards
    assert runner({"image": x[:1]})[0].shape == (1, 10)


def test_benchmark_and_evaluate_measure_the_tflite_artifact(original, digit_assets, tmp_path):
    ctx = context(tmp_path, original, calibration_dataset=npz_ref(digit_assets.calibration_npz, False, 256))
    result = run_pass("convert_tflite", ctx, original, precision="int8")
    tflite = keep(result, tmp_path, "digits.int8.tflite", "convert_tflite")
    tflite = ArtifactRef(tflite.name, tflite.format, tflite.path, step=tflite.step, meta=dict(result.meta))
    ctx = context(
        tmp_path / "measure",
        original,
        artifacts=[tflite],
        evaluation_dataset=npz_ref(digit_assets.labeled_npz, True, 297),
    )
    bench = run_pass("benchmark", ctx, tflite, batch_sizes=[1], runs=10, warmup=2)
    rows = {r["artifact"]: r for r in bench.metrics["results"]}
    assert rows["digits.int8.tflite"]["latency"]["1"]["p50_ms"] > 0
    assert rows["digits.int8.tflite"]["runtime"]["name"] == "litert"
    assert rows["digits.int8.tflite"]["runtime"]["delegate"] == "XNNPACK"
    evaluation = run_pass("evaluate", ctx, tflite, batch_size=16)
    scores = {r["artifact"]: r for r in evaluation.metrics["results"]}
    assert scores["digits.int8.tflite"]["accuracy"]["top1"] >= scores["digits.pt2"]["accuracy"]["top1"] - 0.02
    assert scores["digits.int8.tflite"]["fidelity"]["top1_agreement"] > 0.95


def test_onnx_and_torchscript_uploads_get_a_422_that_names_the_route():
    steps = resolve_steps(preset="tflite-fp16", steps=None)
    for fmt, words in (("onnx", "upload the PyTorch model"), ("torchscript", "torch.export.save")):
        with pytest.raises(InvalidInput) as err:
            plan_job(
                model_format=fmt, model_inputs=SPEC, steps=steps, input_shape=None, calibration=None, evaluation=None
            )
        assert err.value.code == "steps_do_not_chain"
        assert words in err.value.message


def test_int8_without_calibration_is_refused_before_queueing():
    with pytest.raises(InvalidInput) as err:
        plan_job(
            model_format="exported_program",
            model_inputs=SPEC,
            steps=[StepSpec(name="convert_tflite", config={"precision": "int8"})],
            input_shape=None,
            calibration=None,
            evaluation=None,
        )
    assert err.value.code == "calibration_dataset_required"


def test_a_score_channel_swamped_by_int8_noise_is_refused_when_asked(digit_assets, tmp_path):
    """A detector-like head: box coordinates in pixels next to 0..1 scores in one output. Full
    INT8 keeps the whole output's SNR while the score channels drown; min_channel_snr_db says no."""
    import torch

    from core.errors import PassError

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.boxes = torch.nn.Linear(8 * 64, 4)
            self.scores = torch.nn.Linear(8 * 64, 4)

        def forward(self, image):
            features = torch.relu(self.conv(image)).flatten(1)
            return torch.cat([self.boxes(features) * 500.0, torch.sigmoid(self.scores(features))], dim=1)

    path = tmp_path / "head.pt2"
    torch.export.save(torch.export.export(Head().eval(), (torch.zeros(1, 1, 8, 8),)), path)
    source = ArtifactRef("head.pt2", "exported_program", path)
    calibration = npz_ref(digit_assets.calibration_npz, False, 256)
    # Any drop of the task's metric accepted: full INT8 stays (no mixed search), and the floor alone decides.
    lenient = run_pass(
        "convert_tflite",
        context(tmp_path / "a", source, calibration_dataset=calibration),
        source,
        precision="int8",
        max_accuracy_drop=1.0,
    )
    verification = lenient.metrics["verification"]
    assert verification["snr_db"] > 20 and verification["worst_channel_snr_db"] < 10
    assert "min_channel_snr_db" in lenient.metrics["warning"]
    with pytest.raises(PassError) as err:
        run_pass(
            "convert_tflite",
            context(tmp_path / "b", source, calibration_dataset=calibration),
            source,
            precision="int8",
            min_channel_snr_db=15,
            max_accuracy_drop=1.0,
        )
    assert err.value.code == "tflite_mismatch" and "worst output channel" in err.value.message


@pytest.fixture(scope="module")
def dynamic_batch_original(digit_assets, tmp_path_factory) -> ArtifactRef:
    """The digit net exported with an open batch axis (the fixture's .pt2 bakes in a batch of 1)."""
    import torch

    from tests.digits import build_net

    net = build_net()
    net.load_state_dict(torch.load(digit_assets.models["state_dict"], weights_only=True))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net.eval(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("dynamic") / "digits_dynamic.pt2"
    torch.export.save(program, path)
    return ArtifactRef(path.name, "exported_program", path)


@pytest.mark.parametrize("samples", [7, 20])
def test_int8_calibrates_on_every_sample_of_a_small_set(dynamic_batch_original, digit_assets, tmp_path, samples):
    # 7 is under one batch of 16, 20 is one and a bit: each image counts, none is refused.
    original = dynamic_batch_original
    ctx = context(tmp_path, original, calibration_dataset=npz_ref(digit_assets.calibration_npz, False, samples))
    ctx.input_spec = [{**SPEC[0], "shape": [2, 1, 8, 8]}]  # a batch of 1 would specialize the export to it
    result = run_pass("convert_tflite", ctx, original, precision="int8", batch_size=16, verify_samples=8)
    assert result.metrics["calibration_samples"] == samples
    assert result.metrics["verification"]["top1_agreement"] > 0.8


def test_a_baked_batch_calibrates_the_last_partial_batch_padded_with_its_own_samples(digit_assets):
    from worker.passes.convert_tflite import calibration_batches

    dataset = npz_ref(digit_assets.calibration_npz, False, 7)
    spec = {**SPEC[0], "shape": [4, 1, 8, 8]}
    baked = list(calibration_batches(dataset, spec, PREP, batch_size=16, baked_batch=4, limit=7))
    assert [(len(x), real) for x, real in baked] == [(4, 4), (4, 3)]
    last = baked[1][0]
    np.testing.assert_array_equal(last[3], last[0])  # the pad repeats the batch's first sample
    np.testing.assert_array_equal(last[:3], digit_assets.x[4:7])
    dynamic = list(calibration_batches(dataset, spec, PREP, batch_size=16, baked_batch=None, limit=7))
    assert [(len(x), real) for x, real in dynamic] == [(7, 7)]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_the_tflite_is_judged_on_the_task_metric_within_the_tolerance(precision, original, digit_assets, tmp_path):
    """With class labels the metric is top-1 against them; the judged value is the .tflite's own top-1 on
    the first validation samples, and int8's SNR floor drops to the broken-conversion guard."""
    from worker.runtime import load_runner

    ctx = context(
        tmp_path,
        original,
        calibration_dataset=npz_ref(digit_assets.calibration_npz, False, 256),
        evaluation_dataset=npz_ref(digit_assets.labeled_npz, True, 297),
    )
    ctx.task_options = {"max_accuracy_drop": 0.02}
    result = run_pass("convert_tflite", ctx, original, precision=precision, validation_samples=200)
    judged = result.metrics["task_metric"]
    assert judged["metric"] == "top1" and judged["validated_on"] == "evaluation" and judged["samples"] == 200
    assert judged["tolerance"] == 0.02 and judged["drop"] <= 0.02
    assert judged["value"] == pytest.approx(accuracy(TfliteRunner(result.artifact), digit_assets))
    assert judged["reference"] == pytest.approx(accuracy(load_runner(original), digit_assets))
    assert [a["route"] for a in judged["attempts"]] == ["litert_torch_pt2e"]
    assert result.meta["precision"] == result.metrics["precision"] == precision
    assert result.metrics["verification"]["min_snr_db"] == (0.0 if precision == "int8" else 20.0)


@pytest.fixture(scope="module")
def outlier_original(digit_assets) -> ArtifactRef:
    """The digit net with one classifier feature 10^4 times the others: exact in FP32, while per-tensor INT8
    of that activation zeroes every other feature (the shape of a detector head's Concat)."""
    return ArtifactRef("outlier.pt2", "exported_program", digit_assets.models["outlier_pt2"])


def test_an_int8_miss_keeps_the_ops_that_add_the_most_error_float(outlier_original, digit_assets, tmp_path):
    from worker.runtime import load_runner

    calibration = npz_ref(digit_assets.calibration_npz, False, 256)
    ctx = context(tmp_path, outlier_original, calibration_dataset=calibration)
    result = run_pass("convert_tflite", ctx, outlier_original, precision="int8")
    judged = result.metrics["task_metric"]
    attempts = judged["attempts"]
    # Full INT8 (PT2E, then ai-edge-quantizer's) collapses to chance; the search keeps ops float until it holds.
    assert attempts[0]["route"] == "litert_torch_pt2e" and attempts[0]["drop"] > 0.5
    assert attempts[1]["route"] == "ai_edge_quantizer" and attempts[1]["float_ops"] == 0
    assert attempts[-1]["float_ops"] > 0 and attempts[-1]["drop"] <= 0.01
    assert judged["metric"] == "top1_agreement" and judged["drop"] == attempts[-1]["drop"]
    mixed = judged["mixed_precision"]
    assert mixed["tolerance_met"] and mixed["kept_float"][0]["op"] == "FULLY_CONNECTED"
    assert len(mixed["float_scopes"]) == attempts[-1]["float_ops"]
    assert result.meta["precision"] == result.metrics["precision"] == "mixed"
    assert result.artifact.name == "model.mixed.tflite"
    # Measured again here: the artifact agrees with the source on the calibration images.
    x = digit_assets.x[:256]
    source = load_runner(outlier_original)
    tflite = TfliteRunner(result.artifact)
    got = np.concatenate([tflite({"image": x[i : i + 1]})[0] for i in range(len(x))]).argmax(1)
    want = np.concatenate([source({"image": x[i : i + 1]})[0] for i in range(len(x))]).argmax(1)
    assert (got == want).mean() >= 0.99
    # Most of the graph still runs in INT8: weights stored as int8.
    assert result.metrics["size_bytes"] < 0.5 * (tmp_path / "work" / "model.fp32.tflite").stat().st_size


def test_an_int8_miss_without_mixed_precision_fails_with_the_attempts(outlier_original, digit_assets, tmp_path):
    from core.errors import PassError

    calibration = npz_ref(digit_assets.calibration_npz, False, 256)
    ctx = context(tmp_path, outlier_original, calibration_dataset=calibration)
    with pytest.raises(PassError) as err:
        run_pass("convert_tflite", ctx, outlier_original, precision="int8", mixed_precision=False)
    assert err.value.code == "int8_over_tolerance"
    assert "mixed_precision off" in err.value.message and "top1_agreement" in err.value.message
    details = err.value.details
    assert details["tolerance"] == 0.01 and details["metric"]["drop"] > 0.5
    assert [a["route"] for a in details["attempts"]] == ["litert_torch_pt2e"]


def test_a_keras_int8_miss_becomes_mixed_precision_too(digit_assets, tmp_path):
    """The TensorFlow route: the converter's full INT8 of a Keras model with an outlier feature collapses;
    the mixed search starts from the converter's FP32 .tflite and keeps the damaging ops float."""
    from core.schemas import Preprocessing
    from worker.passes.base import PassContext
    from worker.tf_models import import_tensorflow

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), name="image"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(16, name="features"),
            keras.layers.Dense(10, name="logits"),
        ]
    )
    # One feature 10^4 times the others, the next layer's weights for it scaled down: the same function.
    weights, bias = model.get_layer("features").get_weights()
    weights[:, 0] *= 1e4
    bias[0] = 1e4
    model.get_layer("features").set_weights([weights, bias])
    weights, bias = model.get_layer("logits").get_weights()
    weights[0, :] /= 1e4
    model.get_layer("logits").set_weights([weights, bias])
    path = tmp_path / "outlier.keras"
    model.save(path)
    source = ArtifactRef(path.name, "keras", path)
    (tmp_path / "work").mkdir()
    ctx = PassContext(
        work_dir=tmp_path / "work",
        original=source,
        artifacts=[],
        input_spec=[{"name": "image", "shape": [1, 8, 8, 1], "dtype": "float32"}],
        preprocessing=Preprocessing(mean=[0.0], std=[1.0]),
        calibration_dataset=npz_ref(digit_assets.calibration_npz, False, 256),
    )
    result = run_pass("convert_tflite", ctx, source, precision="int8")
    judged = result.metrics["task_metric"]
    assert judged["attempts"][0]["route"] == "tf_lite_converter" and judged["attempts"][0]["drop"] > 0.5
    assert judged["drop"] <= 0.01 and judged["mixed_precision"]["kept_float"]
    assert result.meta["precision"] == "mixed" and result.meta["io_layout"] == "source"
    x = digit_assets.x[:64].transpose(0, 2, 3, 1)
    runner = TfliteRunner(result.artifact, layout="source")
    got = np.concatenate([runner({"image": x[i : i + 1]})[0] for i in range(64)])
    assert (got.argmax(1) == model.predict(x, verbose=0).argmax(1)).mean() >= 0.95
