"""Structured pruning on torchvision architectures (random weights prove the graph handling),
and distillation recovering a pruned, trained model's accuracy on held-out digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from core.schemas import Preprocessing
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass

pytestmark = pytest.mark.integration

SPEC32 = [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]


def run_pass(name, work: Path, source: ArtifactRef, original: ArtifactRef | None = None, spec=SPEC32, **kw):
    config = kw.pop("config", {})
    work.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(
        work_dir=work,
        original=original or source,
        artifacts=[],
        input_spec=spec,
        preprocessing=Preprocessing(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]),
        **kw,
    )
    cls = get_pass(name)
    result = cls().run(ctx, source, cls.Config(**config))
    return result, ArtifactRef(result.artifact.name, result.format, result.artifact, step=name, meta=result.meta)


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121"])
def test_half_the_parameters_removed_and_the_result_still_exports(architecture, tmp_path):
    import torch
    import torchvision

    from worker.torch_models import module_from_state_dict

    torch.manual_seed(0)
    path = tmp_path / f"{architecture}.pt"
    torch.save(torchvision.models.get_model(architecture, weights=None, num_classes=10).state_dict(), path)
    source = ArtifactRef(path.name, "state_dict", path, meta={"architecture": architecture})
    # round_to 1: DenseNet's 32-channel layers move in steps of 8 all at once (0.57, then 0.40 of the parameters).
    result, pruned = run_pass("prune_structured", tmp_path / "prune", source, config={"round_to": 1})
    m = result.metrics
    assert abs(m["parameters_ratio"] - 0.5) <= 0.03, m
    assert m["macs_after"] < 0.7 * m["macs_before"] and m["size_bytes_after"] < 0.55 * m["size_bytes_before"]
    module = module_from_state_dict(pruned)  # rebuilt from architecture + recorded shapes
    assert sum(p.numel() for p in module.parameters()) == m["parameters_after"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = module(x).numpy()
    assert want.shape == (2, 10)
    _, pt2 = run_pass("export_pt2", tmp_path / "pt2", pruned, original=source)
    whole = torch.export.load(str(pt2.path)).module()  # no torchvision, no cvopt code needed
    with torch.no_grad():
        assert np.abs(whole(x).numpy() - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    exported, onnx_ref = run_pass("export_onnx", tmp_path / "export", pruned, original=source)
    got = ort.InferenceSession(str(onnx_ref.path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


def accuracy(ref: ArtifactRef, x, y) -> float:
    import torch

    from worker.torch_models import module_from_state_dict

    with torch.no_grad():
        return float((module_from_state_dict(ref)(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_label_free_distillation_recovers_a_pruned_models_accuracy(digit_teacher, tmp_path):
    root, test_x, test_y = digit_teacher
    teacher = ArtifactRef("teacher.pt", "state_dict", root / "teacher.pt", meta={"architecture": "resnet18"})
    teacher_acc = accuracy(teacher, test_x, test_y)
    assert teacher_acc > 0.8, teacher_acc
    _, pruned = run_pass("prune_structured", tmp_path / "prune", teacher, config={"target_ratio": 0.7})
    pruned_acc = accuracy(pruned, test_x, test_y)
    train = DatasetRef(root / "train.npz", "npz", False, 1200, "NCHW", [3, 32, 32])
    result, distilled = run_pass(
        "distill", tmp_path / "distill", pruned, original=teacher, calibration_dataset=train, config={"epochs": 3}
    )
    distilled_acc = accuracy(distilled, test_x, test_y)
    assert result.metrics["beta"] == 0.0 and result.metrics["validation_metric"] == "top1_agreement_with_teacher"
    assert result.metrics["validation_best"] >= result.metrics["validation_before"]
    assert distilled_acc > pruned_acc + 0.05, (pruned_acc, distilled_acc, teacher_acc)
    assert len(result.metrics["epochs"]) == 4


def test_finetune_needs_labels_and_uses_them(digit_teacher, tmp_path):
    from core.errors import PassError

    root, test_x, test_y = digit_teacher
    teacher = ArtifactRef("teacher.pt", "state_dict", root / "teacher.pt", meta={"architecture": "resnet18"})
    _, pruned = run_pass("prune_structured", tmp_path / "prune", teacher, config={"target_ratio": 0.7})
    unlabeled = DatasetRef(root / "train.npz", "npz", False, 1200, "NCHW", [3, 32, 32])
    with pytest.raises(PassError) as err:
        run_pass(
            "finetune", tmp_path / "f0", pruned, original=teacher, calibration_dataset=unlabeled, config={"epochs": 1}
        )
    assert err.value.code == "labels_required"
    labeled = DatasetRef(root / "train_labeled.npz", "npz", True, 1200, "NCHW", [3, 32, 32])
    result, tuned = run_pass(
        "finetune", tmp_path / "f1", pruned, original=teacher, calibration_dataset=labeled, config={"epochs": 2}
    )
    assert result.metrics["validation_metric"] == "accuracy" and result.metrics["alpha"] == 0.0
    assert accuracy(tuned, test_x, test_y) > accuracy(pruned, test_x, test_y)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"sparsity": 0.6, "scope": "global"}, 0.6),
        ({"sparsity": 0.5, "scope": "layer"}, 0.5),
        ({"pattern": "2:4"}, 0.5),
    ],
)
def test_unstructured_pruning_reports_sparsity_honestly(config, expected, tmp_path):
    import torch
    import torchvision

    from worker.torch_models import module_from_state_dict

    torch.manual_seed(0)
    path = tmp_path / "r.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    source = ArtifactRef(path.name, "state_dict", path, meta={"architecture": "resnet18"})
    result, sparse = run_pass("prune_unstructured", tmp_path / "u", source, config=config)
    m = result.metrics
    module = module_from_state_dict(sparse)
    convs = [(n, c) for n, c in module.named_modules() if isinstance(c, torch.nn.Conv2d)]
    assert float((convs[0][1].weight == 0).float().mean()) == 0.0  # the first conv stays dense
    pruned = torch.cat([c.weight.detach().flatten() for _, c in convs[1:]])  # the classifier stays dense too
    assert abs(float((pruned == 0).float().mean()) - expected) < 0.01
    if config.get("scope") == "layer" or "pattern" in config:
        assert all(abs(s - expected) < 0.02 for s in m["sparsity_per_layer"].values())
    if "pattern" in config:
        w = convs[5][1].weight.detach().reshape(convs[5][1].weight.shape[0], -1)
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert abs(m["size_bytes"] - path.stat().st_size) < 0.01 * path.stat().st_size  # dense size unchanged
    assert m["gzip_bytes"] < 0.85 * m["original_gzip_bytes"]
    assert "no speed-up" in m["note"]
