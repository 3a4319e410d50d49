"""The GPU benchmark's models, defined with torch alone.

bench/gpu.py runs on a lent GPU machine whose Python has only torch, numpy, onnx and onnxruntime:
no torchvision, no Ultralytics. So the models it measures are defined here, importing nothing but
torch and the standard library (tests/test_gpu_models.py checks the imports).

* ``resnet18``, ``resnet50``, ``mobilenet_v3_large``, ``mobilenet_v3_small``: torchvision's
  architectures (``torchvision.models.<name>(weights=None)``, 1000 classes) layer for layer, with
  the same ``state_dict()`` keys and shapes, the same eval-mode forward and torchvision's weight
  init. tests/test_gpu_models.py loads torchvision's state_dict into each, strictly, and compares
  the outputs.
* ``yolo_detector``: the Ultralytics YOLOv8 detector (Conv-BN-SiLU, C2f, SPPF, a PAN-FPN neck and
  the decoupled Detect head with DFL), with Ultralytics' module names (``model.<i>...``) and the
  output of an Ultralytics ONNX export: ``(N, 4 + num_classes, anchors)``, rows cx, cy, w, h in
  input pixels, then the sigmoid class scores; 8400 anchors at 640x640. Anchors are made from the
  feature maps' shapes in forward, so any input whose sides are multiples of 32 works and
  ``torch.export`` traces it with a dynamic batch. Size "n" is YOLOv8n: 3.16M parameters, 8.7 GFLOPs.

``build(name)`` gives a model from ``MODELS`` in eval mode and its per-image input shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# ---------------------------------------------------------------- torchvision classifiers


def _init_torchvision(model: nn.Module, linear_std: float | None = None) -> nn.Module:
    """torchvision's init: Kaiming-normal (fan_out) convs, BN 1/0, and for MobileNetV3 N(0, 0.01) linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
    return model


class _ResBlock(nn.Module):
    """torchvision's BasicBlock (``bottleneck=False``) or Bottleneck (stride on the 3x3, "ResNet v1.5")."""

    def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        cout = planes * (4 if bottleneck else 1)
        if bottleneck:  # (in, out, kernel, stride) of conv1, conv2, conv3
            k = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, cout, 1, 1)]
        else:
            k = [(cin, planes, 3, stride), (planes, planes, 3, 1)]
        for i, (a, b, ks, s) in enumerate(k, 1):
            setattr(self, f"conv{i}", nn.Conv2d(a, b, ks, s, ks // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(b))
            if i == (len(k) if bottleneck else 1):  # where torchvision registers it (its printed order)
                self.relu = nn.ReLU(inplace=True)
        self.n = len(k)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.n + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.n:
                out = self.relu(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers: list[int], bottleneck: bool, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(_ResBlock(cin, planes, 2 if i > 0 and j == 0 else 1, bottleneck))
                cin = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        _init_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet([2, 2, 2, 2], bottleneck=False, num_classes=num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet([3, 4, 6, 3], bottleneck=True, num_classes=num_classes)


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's (from the TF MobileNet repo): round to a multiple of ``divisor``, never down by over 10%."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation with MobileNetV3's BatchNorm (eps 0.001, momentum 0.01)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = [_conv_bn_act(cin, exp, 1, act=act)] if exp != cin else []
        layers.append(_conv_bn_act(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(_SqueezeExcitation(exp, _make_divisible(exp // 4, 8)))
        layers.append(_conv_bn_act(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


# (input, kernel, expanded, output, SE, hardswish, stride) per block, torchvision's tables (width 1.0).
_V3_LARGE = [
    (16, 3, 16, 16, 0, 0, 1), (16, 3, 64, 24, 0, 0, 2), (24, 3, 72, 24, 0, 0, 1), (24, 5, 72, 40, 1, 0, 2),
    (40, 5, 120, 40, 1, 0, 1), (40, 5, 120, 40, 1, 0, 1), (40, 3, 240, 80, 0, 1, 2), (80, 3, 200, 80, 0, 1, 1),
    (80, 3, 184, 80, 0, 1, 1), (80, 3, 184, 80, 0, 1, 1), (80, 3, 480, 112, 1, 1, 1), (112, 3, 672, 112, 1, 1, 1),
    (112, 5, 672, 160, 1, 1, 2), (160, 5, 960, 160, 1, 1, 1), (160, 5, 960, 160, 1, 1, 1),
]  # fmt: skip
_V3_SMALL = [
    (16, 3, 16, 16, 1, 0, 2), (16, 3, 72, 24, 0, 0, 2), (24, 3, 88, 24, 0, 0, 1), (24, 5, 96, 40, 1, 1, 2),
    (40, 5, 240, 40, 1, 1, 1), (40, 5, 240, 40, 1, 1, 1), (40, 5, 120, 48, 1, 1, 1), (48, 5, 144, 48, 1, 1, 1),
    (48, 5, 288, 96, 1, 1, 2), (96, 5, 576, 96, 1, 1, 1), (96, 5, 576, 96, 1, 1, 1),
]  # fmt: skip


class MobileNetV3(nn.Module):
    def __init__(self, setting: list[tuple[int, ...]], last_channel: int, num_classes: int = 1000) -> None:
        super().__init__()
        last_in = setting[-1][3]
        self.features = nn.Sequential(
            _conv_bn_act(3, setting[0][0], 3, 2, act=nn.Hardswish),
            *(_InvertedResidual(c, k, e, o, bool(se), bool(hs), s) for c, k, e, o, se, hs, s in setting),
            _conv_bn_act(last_in, 6 * last_in, 1, act=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        _init_torchvision(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(_V3_LARGE, 1280, num_classes)


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(_V3_SMALL, 1024, num_classes)


# ---------------------------------------------------------------- YOLOv8 detector (Ultralytics layout)


class Conv(nn.Module):
    """Conv2d (no bias, "same" padding) + BatchNorm (eps 0.001, momentum 0.03) + SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convs: split in halves, chain ``n`` bottlenecks on one, concat all."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 5) -> None:
        super().__init__()
        c = cin // 2
        self.cv1, self.cv2 = Conv(cin, c, 1), Conv(4 * c, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, 1)


class DFL(nn.Module):
    """Distribution focal loss integral: the expected bin (0..reg_max-1) of each side's softmax."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    """YOLOv8's decoupled head; forward gives the exported layout (N, 4 + nc, anchors)."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...] = (8, 16, 32)) -> None:
        super().__init__()
        self.nc, self.nl, self.reg_max, self.strides = nc, len(ch), 16, strides
        self.no = nc + 4 * self.reg_max
        c2, c3 = max(16, ch[0] // 4, 4 * self.reg_max), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch
        )
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max)
        with torch.no_grad():  # Ultralytics' bias_init (for an image size of 640)
            for a, b, s in zip(self.cv2, self.cv3, strides, strict=True):
                a[-1].bias.fill_(1.0)
                b[-1].bias.fill_(math.log(5 / nc / (640 / s) ** 2))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        xs = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(xs)]
        n = xs[0].shape[0]
        x_cat = torch.cat([x.view(n, self.no, -1) for x in xs], 2)
        box, cls = x_cat.split((4 * self.reg_max, self.nc), 1)
        anchors, stride = self._anchors(xs)
        lt, rb = self.dfl(box).chunk(2, 1)  # distances to the left-top and right-bottom sides, in cells
        x1y1, x2y2 = anchors - lt, anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride
        return torch.cat((dbox, cls.sigmoid()), 1)

    def _anchors(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres (1, 2, A) in cells and each anchor's stride (1, 1, A), from the maps' static shapes."""
        points, strides = [], []
        for x, s in zip(xs, self.strides, strict=True):
            h, w = x.shape[2], x.shape[3]
            sx = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
            sy = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
            gy, gx = torch.meshgrid(sy, sx, indexing="ij")
            points.append(torch.stack((gx, gy), 0).view(2, -1))
            strides.append(torch.full((1, h * w), s, device=x.device, dtype=x.dtype))
        return torch.cat(points, 1).unsqueeze(0), torch.cat(strides, 1).unsqueeze(0)


# Ultralytics' yolov8.yaml scales: (depth, width, max channels).
YOLO_SCALES = {
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.25, 512),
}


class YoloDetector(nn.Module):
    """YOLOv8 as Ultralytics builds it from yolov8.yaml: ``model`` is the 23 layers, each with its inputs."""

    def __init__(self, size: str = "n", num_classes: int = 80) -> None:
        super().__init__()
        depth, width, max_ch = YOLO_SCALES[size]

        def ch(c: int) -> int:
            return math.ceil(min(c, max_ch) * width / 8) * 8

        def n(k: int) -> int:
            return max(round(k * depth), 1)

        c3, c4, c5 = ch(256), ch(512), ch(1024)
        layers: list[tuple[int | list[int], nn.Module]] = [
            (-1, Conv(3, ch(64), 3, 2)),  # 0 P1/2
            (-1, Conv(ch(64), ch(128), 3, 2)),  # 1 P2/4
            (-1, C2f(ch(128), ch(128), n(3), True)),
            (-1, Conv(ch(128), c3, 3, 2)),  # 3 P3/8
            (-1, C2f(c3, c3, n(6), True)),
            (-1, Conv(c3, c4, 3, 2)),  # 5 P4/16
            (-1, C2f(c4, c4, n(6), True)),
            (-1, Conv(c4, c5, 3, 2)),  # 7 P5/32
            (-1, C2f(c5, c5, n(3), True)),
            (-1, SPPF(c5, c5, 5)),  # 9
            (-1, nn.Upsample(scale_factor=2.0, mode="nearest")),
            ([-1, 6], Concat()),
            (-1, C2f(c5 + c4, c4, n(3))),  # 12
            (-1, nn.Upsample(scale_factor=2.0, mode="nearest")),
            ([-1, 4], Concat()),
            (-1, C2f(c4 + c3, c3, n(3))),  # 15 (P3/8 out)
            (-1, Conv(c3, c3, 3, 2)),
            ([-1, 12], Concat()),
            (-1, C2f(c3 + c4, c4, n(3))),  # 18 (P4/16 out)
            (-1, Conv(c4, c4, 3, 2)),
            ([-1, 9], Concat()),
            (-1, C2f(c4 + c5, c5, n(3))),  # 21 (P5/32 out)
            ([15, 18, 21], Detect(num_classes, (c3, c4, c5))),
        ]
        self.sources = [f for f, _ in layers]
        self.model = nn.ModuleList(m for _, m in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for f, m in zip(self.sources, self.model, strict=True):
            x = m([x if j == -1 else outs[j] for j in f]) if isinstance(f, list) else m(x if f == -1 else outs[f])
            outs.append(x)
        return x


def yolo_detector(size: str = "n", num_classes: int = 80) -> YoloDetector:
    return YoloDetector(size, num_classes)


def tiny() -> nn.Module:
    """A small residual CNN (conv, BatchNorm, a residual block, pooling, a linear head) for checking
    the benchmark's logic on a CPU, where compiling the real models takes minutes."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.block(x))
            return self.head(x.mean((2, 3)))

    return Tiny()


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "resnet50": (resnet50, (3, 224, 224)),
    "resnet18": (resnet18, (3, 224, 224)),
    "mobilenet_v3_large": (mobilenet_v3_large, (3, 224, 224)),
    "mobilenet_v3_small": (mobilenet_v3_small, (3, 224, 224)),
    "yolov8n": (yolo_detector, (3, 640, 640)),
    "tiny": (tiny, (3, 32, 32)),
}


def build(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """The named model in eval mode (random weights) and its per-image input shape (C, H, W)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    factory, shape = MODELS[name]
    return factory().eval(), shape
