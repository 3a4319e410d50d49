"""evaluate on a detector whose boxes are known (tests/synthetic_detector.py): mAP against YOLO txt
and COCO JSON labels, every export layout, small sets; in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.datasets import inspect_dataset
from core.schemas import Preprocessing
from tests.synthetic_detector import (
    FIXTURE_FILES,
    FIXTURES,
    HELD_OUT_SEED,
    NUM_CLASSES,
    PREPROCESSING,
    write_coco_zip,
    write_yolo_zip,
)
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass

pytestmark = pytest.mark.integration

SPEC = [{"name": "images", "shape": [1, 3, 128, 128], "dtype": "float32"}]


def dataset_ref(path: Path) -> DatasetRef:
    info = inspect_dataset(path)
    return DatasetRef(
        path=path,
        format=info.format,
        labeled=info.labeled,
        num_samples=info.num_samples,
        layout=info.layout,
        sample_shape=info.sample_shape,
        label_type=info.label_type,
    )


def evaluate(
    tmp_path: Path, dataset: DatasetRef, layout: str = "yolo", *, artifacts=(), task="auto", detection=None, **config
):
    original = ArtifactRef(FIXTURE_FILES[layout], "onnx", FIXTURES / FIXTURE_FILES[layout])
    ctx = PassContext(
        work_dir=tmp_path,
        original=original,
        artifacts=list(artifacts),
        input_spec=SPEC,
        preprocessing=Preprocessing(**PREPROCESSING),
        task=task,
        task_options={"max_accuracy_drop": 0.01, "detection": detection or {}},
        evaluation_dataset=dataset,
    )
    cls = get_pass("evaluate")
    return cls().run(ctx, original, cls.Config(**config)).metrics


@pytest.fixture(scope="module")
def yolo_zip(tmp_path_factory) -> Path:
    return write_yolo_zip(tmp_path_factory.mktemp("yolo") / "shapes.zip", 40, HELD_OUT_SEED)


def test_map_against_yolo_labels_counts_every_image(yolo_zip, tmp_path):
    dataset = dataset_ref(yolo_zip)
    assert (dataset.num_samples, dataset.label_type) == (40, "boxes")
    metrics = evaluate(tmp_path, dataset, batch_size=16)  # 16 + 16 + a partial 8
    assert metrics["task"] == "detection" and metrics["labels"] == "boxes" and metrics["num_samples"] == 40
    original = metrics["results"][0]
    # The detector reaches 0.97 mAP@0.5 on 200 held-out images (H2's check); 40 of them are close.
    assert (
        original["accuracy"]["map50"] > 0.9 and 0.6 < original["accuracy"]["map50_95"] < original["accuracy"]["map50"]
    )
    assert original["metric"]["name"] == "map50_95" and original["metric"]["drop"] == 0.0
    assert original["fidelity"]["f1"] == 1.0


def test_coco_labels_give_the_same_map_as_yolo_labels(yolo_zip, tmp_path):
    coco = dataset_ref(write_coco_zip(tmp_path / "coco.zip", 40, HELD_OUT_SEED))
    from_yolo = evaluate(tmp_path, dataset_ref(yolo_zip))["results"][0]["accuracy"]
    from_coco = evaluate(tmp_path, coco)["results"][0]["accuracy"]
    # YOLO txt keeps 6 decimals of normalized coordinates: a hair of a pixel apart.
    assert from_coco["map50"] == pytest.approx(from_yolo["map50"], abs=2e-3)
    assert from_coco["map50_95"] == pytest.approx(from_yolo["map50_95"], abs=5e-3)


@pytest.mark.parametrize("layout", ["yolo_objectness", "post_nms"])
def test_every_export_layout_is_read(yolo_zip, tmp_path, layout):
    raw = evaluate(tmp_path, dataset_ref(yolo_zip))["results"][0]["accuracy"]["map50"]
    other = evaluate(tmp_path, dataset_ref(yolo_zip), layout)["results"][0]["accuracy"]["map50"]
    assert other == pytest.approx(raw, abs=0.03)


def test_a_broken_artifact_is_caught_by_agreement_not_cosine(yolo_zip, tmp_path):
    """The head's class scores rounded to a coarse grid (what one INT8 scale for pixel boxes and 0..1
    scores does): cosine stays high, F1 against FP32's detections and the class channels' SNR do not."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(FIXTURES / FIXTURE_FILES["yolo"]))
    out = model.graph.output[0].name
    step = numpy_helper.from_array(np.array(0.64, np.float32), "grid")
    model.graph.initializer.append(step)
    # out' = round(out / 0.64) * 0.64: the naive INT8 output scale, applied to every channel.
    model.graph.node.extend(
        [
            helper.make_node("Div", [out, "grid"], ["scaled"]),
            helper.make_node("Round", ["scaled"], ["rounded"]),
            helper.make_node("Mul", ["rounded", "grid"], ["coarse"]),
        ]
    )
    model.graph.output[0].name = "coarse"
    broken = tmp_path / "coarse.onnx"
    onnx.save(model, str(broken))
    metrics = evaluate(
        tmp_path, dataset_ref(yolo_zip), artifacts=[ArtifactRef("coarse.onnx", "onnx", broken, step="x")]
    )
    result = metrics["results"][1]
    assert result["fidelity"]["cosine"] > 0.99
    assert result["fidelity"]["worst_class_channel_snr_db"] < 15
    assert result["metric"]["drop"] > 0.01
    floor = result["metric"]["floor"]
    assert floor["min"] == 15.0 and floor["met"] is False
    # The job may set its own floor (detection.min_class_channel_snr_db); the metric says what it used.
    lenient = evaluate(
        tmp_path,
        dataset_ref(yolo_zip),
        artifacts=[ArtifactRef("coarse.onnx", "onnx", broken, step="x")],
        detection={"min_class_channel_snr_db": -50},
    )["results"][1]["metric"]["floor"]
    assert lenient["min"] == -50 and lenient["met"] is True


@pytest.mark.parametrize("size", [1, 7, 20])
def test_small_labeled_sets_work(tmp_path, size):
    dataset = dataset_ref(write_yolo_zip(tmp_path / "few.zip", size, HELD_OUT_SEED))
    metrics = evaluate(tmp_path, dataset, batch_size=8)
    assert metrics["num_samples"] == size and metrics["results"][0]["samples"] == size
    assert metrics["results"][0]["accuracy"]["map50"] is not None


def scaled_head(tmp_path: Path, layout: str, channel: int, factor: float) -> ArtifactRef:
    """The fixture's raw head with one channel multiplied by ``factor`` and every other exactly as it was."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(FIXTURES / FIXTURE_FILES[layout]))
    out = model.graph.output[0].name
    channels = 4 + NUM_CLASSES + (layout == "yolo_objectness")
    scale = np.ones(channels, np.float32)
    scale[channel] = factor
    # (1, C, 1) for a channels-first head, (1, 1, C) for an anchors-first one.
    shape = (1, channels, 1) if layout == "yolo" else (1, 1, channels)
    model.graph.initializer.append(numpy_helper.from_array(scale.reshape(shape), "channel_scale"))
    model.graph.node.append(helper.make_node("Mul", [out, "channel_scale"], ["scaled"]))
    model.graph.output[0].name = "scaled"
    path = tmp_path / f"{layout}_{channel}_{factor}.onnx"
    onnx.save(model, str(path))
    return ArtifactRef(path.name, "onnx", path, step="damaged")


@pytest.mark.parametrize(("layout", "channel"), [("yolo", 4 + 1), ("yolo_objectness", 4)])
def test_the_class_channel_floor_is_per_channel_for_either_head_orientation(yolo_zip, tmp_path, layout, channel):
    """A class channel (channels-first head) or objectness (anchors-first (N, A, 5+C)) halved: 10 log10(4)
    = 6.02 dB on that channel, every other exact. The floor says so; the original's is met."""
    damaged = scaled_head(tmp_path, layout, channel, 0.5)
    metrics = evaluate(tmp_path, dataset_ref(yolo_zip), layout, artifacts=[damaged], max_samples=16)
    original, candidate = metrics["results"]
    assert candidate["fidelity"]["worst_class_channel_snr_db"] == pytest.approx(10 * np.log10(4), abs=1e-4)
    assert candidate["fidelity"]["box_snr_db"] == float("inf")
    floor = candidate["metric"]["floor"]
    assert floor == {"name": "worst_class_channel_snr_db", "min": 15.0, "value": floor["value"], "met": False}
    assert original["metric"]["floor"]["met"] and original["metric"]["floor"]["value"] == float("inf")


def test_post_nms_outputs_have_no_floor(yolo_zip, tmp_path):
    metrics = evaluate(tmp_path, dataset_ref(yolo_zip), "post_nms", max_samples=8)
    assert "floor" not in metrics["results"][0]["metric"]


def test_nan_outputs_never_read_as_agreement(yolo_zip, tmp_path):
    nan_class = scaled_head(tmp_path, "yolo", 4 + 2, float("nan"))
    metrics = evaluate(tmp_path, dataset_ref(yolo_zip), artifacts=[nan_class], max_samples=8)
    fidelity = metrics["results"][1]["fidelity"]
    assert fidelity["cosine"] == 0.0
    assert fidelity["snr_db"] == fidelity["worst_channel_snr_db"] == float("-inf")
    assert fidelity["worst_class_channel_snr_db"] == float("-inf")
    assert metrics["results"][1]["metric"]["floor"]["met"] is False


def one_detection_per_image(path: Path) -> Path:
    """A batch-less post-NMS export (torchvision style) that finds exactly one box in every image:
    boxes (1, 4), scores (1,), labels (1,)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array([[20, 20, 70, 60]], np.float32), "box"),
        numpy_helper.from_array(np.zeros((1, 4), np.float32), "zeros"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "one_by_one"),
        numpy_helper.from_array(np.array([0], np.int64), "class0"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=1),
        helper.make_node("Reshape", ["mean", "one"], ["mean1"]),
        helper.make_node("Sigmoid", ["mean1"], ["scores"]),
        helper.make_node("Reshape", ["mean", "one_by_one"], ["mean11"]),
        helper.make_node("Mul", ["mean11", "zeros"], ["nothing"]),
        helper.make_node("Add", ["box", "nothing"], ["boxes"]),
        helper.make_node("Identity", ["class0"], ["labels"]),
    ]
    graph = helper.make_graph(
        nodes,
        "one_box",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 128, 128])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, [1]),
        ],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_batchless_export_with_one_detection_per_image_keeps_its_images_apart(yolo_zip, tmp_path):
    """boxes (1, 4) of one image are not a batch of one: five images, five single-box images."""
    path = one_detection_per_image(tmp_path / "one_box.onnx")
    original = ArtifactRef(path.name, "onnx", path)
    ctx = PassContext(
        work_dir=tmp_path,
        original=original,
        artifacts=[],
        input_spec=SPEC,
        preprocessing=Preprocessing(**PREPROCESSING),
        task="detection",
        task_options={"max_accuracy_drop": 0.01, "detection": {}},
        evaluation_dataset=dataset_ref(yolo_zip),
    )
    cls = get_pass("evaluate")
    metrics = cls().run(ctx, original, cls.Config(max_samples=5)).metrics
    result = metrics["results"][0]
    assert metrics["num_samples"] == 5 and result["fidelity"]["detections"] == 5
    assert result["metric"]["name"] == "map50_95" and "floor" not in result["metric"]


def test_the_batch_runner_adds_the_batch_axis_to_batchless_outputs():
    from worker.runtime import BatchRunner

    def run(feeds):  # one image in, its one detection out, no batch axis
        (x,) = feeds.values()
        if len(x) != 1:
            raise ValueError("the input's batch is fixed at 1")
        return [np.array([[1.0, 2.0, 3.0, 4.0]]) * x.mean(), np.array([0.9]), np.array([2])]

    out = BatchRunner(run, "images", 1)(np.ones((3, 3, 8, 8), np.float32))
    assert [o.shape for o in out] == [(3, 1, 4), (3, 1), (3, 1)]
    assert BatchRunner(run, "images", 1)(np.ones((1, 3, 8, 8), np.float32))[0].shape == (1, 1, 4)


def test_a_layout_hint_the_outputs_cannot_hold_fails_the_step_with_its_code(yolo_zip, tmp_path):
    from core.errors import CvoptError

    original = ArtifactRef(FIXTURE_FILES["yolo"], "onnx", FIXTURES / FIXTURE_FILES["yolo"])
    ctx = PassContext(
        work_dir=tmp_path,
        original=original,
        artifacts=[],
        input_spec=SPEC,
        preprocessing=Preprocessing(**PREPROCESSING),
        task="detection",
        task_options={"max_accuracy_drop": 0.01, "detection": {"layout": "post_nms"}},
        evaluation_dataset=dataset_ref(yolo_zip),
    )
    cls = get_pass("evaluate")
    with pytest.raises(CvoptError) as err:
        cls().run(ctx, original, cls.Config(max_samples=4))
    assert err.value.code == "detection_layout_mismatch" and "[4, 7, 336]" in err.value.message  # a batch of 4
