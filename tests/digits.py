"""A small residual CNN trained on scikit-learn's real 8x8 digit images, and the datasets
built from the same images: what the tests optimize end to end."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # N,1,8,8 in 0..1
    return x, digits.target.astype(np.int64)


def build_net():
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(ch)
            self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(ch)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    class DigitNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.block = Residual(32)
            self.head = nn.Linear(32 * 4 * 4, 10)

        def forward(self, image):
            return self.head(self.block(self.down(self.stem(image))).flatten(1))

    return DigitNet()


def train_digit_net(epochs: int = 6, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    x, y = load_digits_arrays()
    net = build_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:1500]), torch.from_numpy(y[:1500])
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return net.eval()


def save_model_files(net, directory: Path) -> dict[str, Path]:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 1, 8, 8)
    paths = {
        "pt2": directory / "digits.pt2",
        "torchscript": directory / "digits.ts",
        "onnx": directory / "digits.onnx",
        "state_dict": directory / "digits_state_dict.pt",
    }
    torch.export.save(torch.export.export(net, (example,)), paths["pt2"])
    torch.jit.trace(net, example).save(str(paths["torchscript"]))
    torch.onnx.export(
        net,
        (example,),
        str(paths["onnx"]),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    torch.save(net.state_dict(), paths["state_dict"])
    return paths


def write_npz(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(path, **arrays)
    return path


def write_image_zip(path: Path, x: np.ndarray, y: np.ndarray | None) -> Path:
    """PNG files, one folder per class when labels are given."""
    from PIL import Image

    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(x):
            buf = io.BytesIO()
            Image.fromarray((img[0] * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
            name = f"digits/{y[i]}/{i:05d}.png" if y is not None else f"{i:05d}.png"
            zf.writestr(name, buf.getvalue())
    return path


def with_outlier_feature(net, factor: float = 1e4):
    """The same function, but one feature feeding the classifier is scaled up by ``factor`` (and
    the classifier's weights for it scaled down): exact in FP32, while per-tensor INT8 of that
    activation zeroes every other feature. The shape of a detector head that concatenates pixel
    boxes with 0..1 scores."""
    import copy

    import torch
    from torch import nn

    net = copy.deepcopy(net)

    class Outlier(nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner
            scale = torch.ones(inner.head.in_features)
            scale[0] = factor
            self.register_buffer("scale", scale)
            with torch.no_grad():
                inner.head.weight[:, 0] /= factor

        def forward(self, image):
            i = self.inner
            features = i.block(i.down(i.stem(image))).flatten(1)
            # Keep the feature from being zero after ReLU so it really dominates the range.
            return i.head((features + 1.0) * self.scale) - i.head.weight @ self.scale

    return Outlier(net).eval()
