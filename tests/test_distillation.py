"""Recovery training on any torch module (worker.distillation.train_module): a student that is a
perturbed copy of its teacher gets back to agreeing with it, label-free, for a classifier (one
ending in Softmax too), a probability map, a model with two outputs and the shapes detector."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from core.errors import PassError
from core.schemas import Preprocessing
from core.steps.distill import DistillConfig
from core.steps.finetune import FinetuneConfig
from tests import synthetic_detector
from tests.digits import load_digits_arrays, write_npz
from worker.distillation import train_module
from worker.passes.base import ArtifactRef, DatasetRef, PassContext


def make_context(tmp_path: Path, x: np.ndarray, *, task: str = "auto") -> PassContext:
    """A context whose calibration set is ``x`` (unlabeled npz), its input spec shaped like it."""
    path = write_npz(tmp_path / "images.npz", x.astype(np.float32))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return PassContext(
        work_dir=work,
        original=ArtifactRef("original", "onnx", tmp_path / "original.onnx"),
        artifacts=[],
        input_spec=[{"name": "image", "shape": [1, *x.shape[1:]], "dtype": "float32"}],
        preprocessing=Preprocessing(mean=[0.0], std=[1.0]),
        task=task,
        calibration_dataset=DatasetRef(path, "npz", False, len(x), "NCHW", list(x.shape[1:])),
    )


def perturbed(model, scale: float, prefix: str = ""):
    """A copy of ``model`` with Gaussian noise (``scale`` x each weight's std) added to the weights of
    its convolutions and linear layers under ``prefix``."""
    import torch

    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in student.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name.startswith(prefix):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * scale * module.weight.std())
    return student


@pytest.fixture(scope="module")
def digit_classifier():
    """A small conv classifier trained for a few seconds on real 8x8 digits, and 96 other digits."""
    import torch
    from torch import nn

    x, y = load_digits_arrays()
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000])
    for _ in range(3):
        for i in range(0, len(xt), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[i : i + 64]), yt[i : i + 64]).backward()
            optimizer.step()
    return net.eval(), x[1000:1096]


def test_a_perturbed_classifier_gets_back_to_agreeing_with_its_teacher(digit_classifier, tmp_path):
    teacher, images = digit_classifier
    student = perturbed(teacher, 0.6)
    config = DistillConfig(epochs=5, validation_fraction=0.25, batch_size=16)
    trained, m = train_module(make_context(tmp_path, images), student, teacher, config, step="distill", task="auto")
    assert m["task"] == "classification" and m["validation_metric"] == "top1_agreement_with_teacher"
    assert m["beta"] == 0.0 and not m["teacher_outputs_probabilities"]
    assert m["validation_best"] >= m["validation_before"] + 0.15, m["epochs"]
    assert len(m["epochs"]) == 6 and m["epochs"][0]["epoch"] == 0 and m["device"] in ("cpu", "cuda")
    assert not trained.training


def test_a_classifier_ending_in_softmax_trains_as_its_logits_twin(digit_classifier, tmp_path):
    """The Softmax outputs are taken back to logits by their log: the run matches the same network's
    without the Softmax epoch by epoch (a second softmax would flatten the targets, and differ)."""
    from torch import nn

    teacher, images = digit_classifier
    config = DistillConfig(epochs=2, validation_fraction=0.25, batch_size=16)
    runs = {}
    for name, wrap in (("logits", lambda m: m), ("softmax", lambda m: nn.Sequential(m, nn.Softmax(1)))):
        (tmp_path / name).mkdir()
        ctx = make_context(tmp_path / name, images)
        student, wrapped_teacher = wrap(perturbed(teacher, 0.6)), wrap(copy.deepcopy(teacher))
        runs[name] = train_module(ctx, student, wrapped_teacher, config, step="distill", task="classification")[1]
    assert runs["softmax"]["teacher_outputs_probabilities"] and not runs["logits"]["teacher_outputs_probabilities"]
    for plain, soft in zip(runs["logits"]["epochs"], runs["softmax"]["epochs"], strict=True):
        assert soft["validation"] == pytest.approx(plain["validation"], abs=1e-6)
        assert soft.get("loss", 0.0) == pytest.approx(plain.get("loss", 0.0), rel=1e-3)


def shape_masks(targets: list[np.ndarray], size: int) -> np.ndarray:
    """(N, 1, size, size) 1 inside the shapes' boxes, 0 elsewhere."""
    masks = np.zeros((len(targets), 1, size, size), np.float32)
    for mask, target in zip(masks, targets, strict=True):
        for _, x1, y1, x2, y2 in target.astype(int):
            mask[0, y1:y2, x1:x2] = 1
    return masks


@pytest.fixture(scope="module")
def probability_map_net():
    """A tiny conv net trained for a second to map the synthetic shapes' boxes: (N, 1, H, W) sigmoid
    probabilities; with ``outputs=2`` it also returns its logits pooled 2 x 2, (N, 1, H/2, W/2)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MapNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.outputs = 1
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=2, dilation=2),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 1, 1),
            )

        def forward(self, image):
            logits = self.body(image)
            return torch.sigmoid(logits) if self.outputs == 1 else (torch.sigmoid(logits), F.avg_pool2d(logits, 2))

    images, targets = synthetic_detector.make_images(64, 4_000, size=64)
    x, y = torch.from_numpy(synthetic_detector.to_model_input(images)), torch.from_numpy(shape_masks(targets, 64))
    torch.manual_seed(0)
    net = MapNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(60):
        i = step % 4 * 16
        optimizer.zero_grad()
        F.binary_cross_entropy(net(x[i : i + 16]), y[i : i + 16]).backward()
        optimizer.step()

    # Running statistics that fit the final weights, as a converged model's do (60 steps at a high
    # rate leave them behind the weights, and training in train mode then chases the difference).
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches below
        for i in range(0, len(x), 16):
            net(x[i : i + 16])

    def build(outputs: int):
        net.outputs = outputs
        return copy.deepcopy(net).eval()

    return build


@pytest.mark.parametrize("outputs", [1, 2])
def test_a_perturbed_dense_model_gets_back_to_its_teachers_outputs(probability_map_net, outputs, tmp_path):
    teacher = probability_map_net(outputs)
    student = perturbed(teacher, 0.25)
    images = synthetic_detector.to_model_input(synthetic_detector.make_images(48, 3_000, size=64)[0])
    ctx = make_context(tmp_path, images, task="auto" if outputs == 1 else "segmentation")
    config = DistillConfig(epochs=3, validation_fraction=0.25, batch_size=8)
    _, m = train_module(ctx, student, teacher, config, step="distill", task=ctx.task)
    assert m["task"] == ("dense" if outputs == 1 else "segmentation") and m["validation_metric"] == "output_agreement"
    assert m["outputs"] == outputs and "class_agreement_before" not in m
    assert m["validation_before"] < 0 and m["validation_best"] >= 0.5, m["epochs"]
    if outputs == 2:
        before, best = m["output_agreements_before"], m["output_agreements_best"]
        assert all(b > a for a, b in zip(before, best, strict=True)), (before, best)


def test_the_shapes_detector_recovers_its_class_scores_label_free(tmp_path):
    """The YOLOv8-style head (N, 4 + 3, A): pixel boxes and 0..1 scores, weighed alike by the teacher's
    per-channel variance; noise in the heads' convolutions costs agreement that 2 epochs win back."""
    teacher = synthetic_detector.load_detector()
    student = perturbed(teacher, 1.0, prefix="heads")
    images = synthetic_detector.to_model_input(synthetic_detector.make_images(64, 7_000)[0])
    ctx = make_context(tmp_path, images, task="detection")
    config = DistillConfig(epochs=2, validation_fraction=0.25, batch_size=16)
    _, m = train_module(ctx, student, teacher, config, step="distill", task="detection")
    assert m["task"] == "detection" and m["validation_metric"] == "output_agreement" and m["beta"] == 0.0
    assert m["validation_best"] >= m["validation_before"] + 0.03, m["epochs"]
    assert m["class_agreement_best"] >= m["class_agreement_before"] + 0.03, m["epochs"]
    assert m["validation_samples"] == 16 and m["train_samples"] == 48


def test_dense_models_train_label_free_only(probability_map_net, tmp_path):
    teacher = probability_map_net(1)
    images = synthetic_detector.to_model_input(synthetic_detector.make_images(8, 3_000, size=64)[0])
    ctx = make_context(tmp_path, images, task="segmentation")
    with pytest.raises(PassError) as err:  # finetune: labels, no teacher
        train_module(ctx, copy.deepcopy(teacher), None, FinetuneConfig(epochs=1), step="finetune", task="segmentation")
    assert err.value.code == "invalid_step_config"
    with pytest.raises(PassError) as err:
        train_module(ctx, teacher, None, DistillConfig(epochs=1), step="distill", task="no-such-task")
    assert err.value.code == "invalid_step_config"
