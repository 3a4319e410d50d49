"""Model inputs: a dataset streamed as preprocessed batches in bounded memory, or random ones of the
model's input shapes (sample_feeds) where only the shapes matter."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from core.datasets import (
    decode_image,
    list_images,
    model_layout,
    open_archive,
    read_member,
)
from core.errors import PassError
from core.schemas import Preprocessing
from worker.passes.base import DatasetRef

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "uint8": np.uint8, "int8": np.int8}


def sample_feeds(input_spec: list[dict[str, Any]], *, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every model input (the batch dimension replaced when given)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_spec:
        shape = [int(d) for d in spec["shape"]]
        if batch is not None and shape:
            shape[0] = batch
        dtype = NP_DTYPES.get(spec.get("dtype", "float32"), np.float32)
        feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def sample_tensors(input_spec: list[dict[str, Any]], *, batch: int | None = None) -> tuple:
    """sample_feeds as a tuple of torch tensors, in input order (example args for torch)."""
    import torch

    return tuple(torch.from_numpy(v) for v in sample_feeds(input_spec, batch=batch).values())


def job_feeds(ctx) -> dict:
    """What a converted or exported model is checked on (ctx: a PassContext): a few of the job's own images
    when it has a dataset (random inputs drive a deep net where no image does, and amplify rounding there),
    else random inputs."""
    dataset = ctx.evaluation_dataset or ctx.calibration_dataset
    if dataset is None or len(ctx.input_spec) != 1 or not dataset.num_samples:
        return sample_feeds(ctx.input_spec)
    spec = ctx.input_spec[0]
    x, _ = next(
        iter_batches(dataset, spec, ctx.preprocessing, batch_size=int(spec["shape"][0]), limit=int(spec["shape"][0])),
        (None, None),
    )
    return {spec["name"]: x} if x is not None and len(x) == int(spec["shape"][0]) else sample_feeds(ctx.input_spec)


def _image_to_array(img, *, height: int, width: int, channels: int, prep: Preprocessing) -> np.ndarray:
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if prep.letterbox:
        img = _letterbox(img, width, height)
    elif prep.resize:
        scale = prep.resize / min(img.width, img.height)
        img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    elif (img.width, img.height) != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32).reshape(height, width, channels) * prep.scale
    if channels == 3 and prep.channel_order == "BGR":
        arr = arr[..., ::-1]
    mean = prep.mean if prep.mean is not None else (IMAGENET_MEAN if channels == 3 else [0.0])
    std = prep.std if prep.std is not None else (IMAGENET_STD if channels == 3 else [1.0])
    return (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def letterbox_geometry(image_wh: tuple[int, int], input_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """(new width, new height, left, top) of a letterboxed image: scaled by the smaller ratio so it fits
    the input whole, centred (worker.metrics.detection maps box labels with the same numbers)."""
    (img_w, img_h), (in_w, in_h) = image_wh, input_wh
    scale = min(in_w / img_w, in_h / img_h)
    new_w, new_h = min(in_w, max(1, round(img_w * scale))), min(in_h, max(1, round(img_h * scale)))
    return new_w, new_h, (in_w - new_w) // 2, (in_h - new_h) // 2


# Ultralytics pads letterboxed images with this grey.
LETTERBOX_FILL = 114


def _letterbox(img, width: int, height: int):
    from PIL import Image

    new_w, new_h, left, top = letterbox_geometry((img.width, img.height), (width, height))
    canvas = Image.new(img.mode, (width, height), LETTERBOX_FILL if img.mode == "L" else (LETTERBOX_FILL,) * 3)
    canvas.paste(img.resize((new_w, new_h), Image.BILINEAR), (left, top))
    return canvas


def iter_batches(
    dataset: DatasetRef,
    input_spec: dict[str, Any],
    prep: Preprocessing,
    *,
    batch_size: int,
    limit: int | None = None,
    offset: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield (inputs, labels or None) with inputs shaped like ``input_spec`` but batch_size rows:
    ``limit`` samples from sample ``offset`` on."""
    shape = [int(d) for d in input_spec["shape"]]
    dtype = NP_DTYPES.get(input_spec.get("dtype", "float32"), np.float32)
    layout = model_layout(shape)
    available = max(dataset.num_samples - offset, 0)
    total = available if limit is None else min(limit, available)
    if dataset.format == "npz":
        yield from _npz_batches(dataset, shape, layout, dtype, batch_size, offset, total)
    else:
        yield from _image_batches(dataset, shape, layout, dtype, prep, batch_size, offset, total)


def _image_batches(dataset, shape, layout, dtype, prep, batch_size, offset, total):
    if layout == "NCHW":
        channels, height, width = shape[1:]
    else:
        height, width, channels = shape[1:]
    listing = list_images(dataset.path, dataset.format)
    members = listing.members[offset : offset + total]
    labels_all = listing.labels[offset : offset + total] if listing.labels is not None else None
    with open_archive(dataset.path, dataset.format) as handle:
        for start in range(0, len(members), batch_size):
            names = members[start : start + batch_size]
            arrays = []
            for name in names:
                img = decode_image(read_member(dataset.path, dataset.format, name, handle), name)
                arr = _image_to_array(img, height=height, width=width, channels=channels, prep=prep)
                arrays.append(arr.transpose(2, 0, 1) if layout == "NCHW" else arr)
            labels = None
            if labels_all is not None:
                labels = np.asarray(labels_all[start : start + batch_size], dtype=np.int64)
            yield np.stack(arrays).astype(dtype, copy=False), labels


def _read_npy_rows(zf: zipfile.ZipFile, member: str):
    """Open an .npy inside the npz and return (shape, dtype, file positioned at the data)."""
    fh = zf.open(member)
    version = np.lib.format.read_magic(fh)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(fh)
    if fortran:
        fh.close()
        raise PassError(f"{member} is stored in Fortran order; save it C-contiguous", code="invalid_dataset")
    if dtype.hasobject:
        fh.close()
        raise PassError(f"{member} holds Python objects; only numeric arrays are read", code="invalid_dataset")
    return shape, dtype, fh


def _npz_batches(dataset, shape, layout, dtype, batch_size, offset, total):
    with zipfile.ZipFile(dataset.path) as zf:
        x_shape, x_dtype, xf = _read_npy_rows(zf, "x.npy")
        y = None
        if "y.npy" in zf.namelist():
            with np.load(dataset.path, allow_pickle=False) as npz:
                y = np.asarray(npz["y"], dtype=np.int64)
        row = int(np.prod(x_shape[1:])) * x_dtype.itemsize
        with xf:
            if offset:
                xf.seek(xf.tell() + offset * row)
                y = y[offset:] if y is not None else None
            for start in range(0, total, batch_size):
                n = min(batch_size, total - start)
                buf = xf.read(row * n)
                if len(buf) != row * n:
                    raise PassError("x.npy ends early: the dataset file is truncated", code="invalid_dataset")
                x = np.frombuffer(buf, dtype=x_dtype).reshape((n, *x_shape[1:]))
                if dataset.layout == "NCHW" and layout == "NHWC":
                    x = x.transpose(0, 2, 3, 1)
                elif dataset.layout == "NHWC" and layout == "NCHW":
                    x = x.transpose(0, 3, 1, 2)
                # A copy: frombuffer views are read-only, and runtimes may want to write.
                yield np.array(x, dtype=dtype, order="C"), (y[start : start + n] if y is not None else None)
