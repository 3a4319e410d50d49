"""bench/gpu_models.py: the GPU benchmark's torch-only models.

The classifiers are checked against torchvision's own (same modules, same state_dict, same eval
outputs once torchvision's weights are loaded); the detector against the YOLOv8n export's output
layout, size and cost, and against torch.export with a dynamic batch."""

from __future__ import annotations

import ast
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

GPU_MODELS_PATH = Path(__file__).resolve().parents[1] / "bench" / "gpu_models.py"
CLASSIFIERS = ["resnet18", "resnet50", "mobilenet_v3_large", "mobilenet_v3_small"]


def _load_gpu_models():
    # bench/ is a folder of scripts, not a package: load the file as a module of its own.
    spec = importlib.util.spec_from_file_location("bench_gpu_models", GPU_MODELS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_models = _load_gpu_models()


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


def _leaves(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """Every leaf module's name, type and settings (kernel, stride, padding, groups, eps, momentum, ...)."""
    return [(n, type(m).__name__, m.extra_repr()) for n, m in model.named_modules() if not any(m.children())]


def _randomize_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine terms, so that eval-mode BN is no identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + torch.randn(n, generator=g) * 0.1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_matches_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    _randomize_batchnorm(ref, seed=1)
    ours, shape = gpu_models.build(name)
    assert shape == (3, 224, 224)
    assert not ours.training

    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert [(k, tuple(v.shape)) for k, v in our_sd.items()] == [(k, tuple(v.shape)) for k, v in ref_sd.items()]
    assert _leaves(ours) == _leaves(ref)  # BN eps/momentum, activations, dropout, pooling: none in the state_dict
    ours.load_state_dict(ref_sd, strict=True)

    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_classifier_init_is_torchvisions():
    # Same statistics as torchvision's init (not the same draws): Kaiming-normal fan_out convs, N(0, 0.01) linears.
    model = gpu_models.mobilenet_v3_small()
    conv = model.features[0][0].weight  # 16 x 3 x 3 x 3: fan_out = 16 * 9
    assert abs(conv.std().item() - (2 / (16 * 9)) ** 0.5) < 0.03
    assert abs(model.classifier[3].weight.std().item() - 0.01) < 0.001
    assert torch.equal(model.classifier[3].bias, torch.zeros(1000))


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    model, shape = gpu_models.build("yolov8n")
    assert shape == (3, 640, 640)
    return model


def test_detector_size_and_cost(yolo):
    params = sum(p.numel() for p in yolo.parameters())
    assert 3.0e6 < params < 3.4e6, params  # YOLOv8n: 3,157,200
    # Ultralytics reports 8.7 GFLOPs at 640 (2 x multiply-adds); at 320 it is a quarter.
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        yolo(torch.zeros(1, 3, 320, 320))
    assert 8.2e9 < counter.get_total_flops() * 4 < 9.2e9, counter.get_total_flops()


def test_detector_output_layout(yolo):
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = yolo(x)
    assert y.shape == (1, 84, 2100)  # 40x40 + 20x20 + 10x10 anchors
    scores = y[:, 4:]
    assert scores.min() >= 0 and scores.max() <= 1
    assert (y[:, 2:4] >= 0).all()  # w, h
    assert torch.isfinite(y).all()
    assert y[:, 2:4].max() <= 2 * 15 * 32  # DFL distances are at most reg_max - 1 cells a side


def test_detector_anchor_decoding():
    # Box logits all zero: every DFL softmax is uniform, so each side lies 7.5 cells from the cell centre:
    # boxes are the anchors' centres (in pixels) with w = h = 15 strides, anchors row-major per level.
    torch.manual_seed(0)
    model = gpu_models.yolo_detector().eval()
    head = model.model[-1]
    with torch.no_grad():
        for branch in head.cv2:
            branch[-1].weight.zero_()
            branch[-1].bias.zero_()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 96, 160))
    centres, sides = [], []
    for stride in (8, 16, 32):
        h, w = 96 // stride, 160 // stride
        gy, gx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        centres.append(torch.stack((gx.flatten(), gy.flatten())) * stride)
        sides.append(torch.full((2, h * w), 15.0 * stride))
    expected = torch.cat((torch.cat(centres, 1), torch.cat(sides, 1)))
    assert y.shape == (1, 84, 240 + 60 + 15)
    torch.testing.assert_close(y[0, :4], expected, atol=1e-4, rtol=1e-5)


def test_detector_at_640(yolo):
    t0 = time.perf_counter()
    with torch.no_grad():
        y = yolo(torch.rand(1, 3, 640, 640))
    assert y.shape == (1, 84, 8400)
    assert time.perf_counter() - t0 < 10


def test_detector_exports_with_dynamic_batch(yolo):
    batch = torch.export.Dim("batch", min=1, max=64)
    example = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    exported = torch.export.export(yolo, (example,), dynamic_shapes=({0: batch},))
    x = torch.rand(3, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = yolo(x)
        got = exported.module()(x)
    assert got.shape == (3, 84, 2100)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_detector_state_dict_names_follow_ultralytics(yolo):
    keys = yolo.state_dict().keys()
    for key in ("model.0.conv.weight", "model.2.m.0.cv1.bn.running_var", "model.9.cv2.conv.weight"):
        assert key in keys
    assert "model.22.dfl.conv.weight" in keys and "model.22.cv3.2.2.bias" in keys
    assert yolo.model[-1].cv3[0][-1].out_channels == 80
    assert gpu_models.yolo_detector(num_classes=3).eval()(torch.rand(1, 3, 64, 64)).shape == (1, 7, 84)


def test_build_registry():
    assert set(gpu_models.MODELS) == {
        "resnet50",
        "resnet18",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
        "yolov8n",
        "tiny",
    }
    model, shape = gpu_models.build("mobilenet_v3_small")
    assert isinstance(model, torch.nn.Module) and not model.training and shape == (3, 224, 224)
    with pytest.raises(KeyError, match="resnet50"):
        gpu_models.build("vgg16")


def test_imports_only_stdlib_and_torch():
    tree = ast.parse(GPU_MODELS_PATH.read_text())
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add(node.module.split(".")[0])
    assert imported and imported <= allowed, imported - allowed
