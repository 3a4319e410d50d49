"""Calibration / evaluation datasets: what an upload holds, read without trusting it.

Accepted: a zip or tar of images (one folder per class = labeled, flat = unlabeled), or an
``.npz`` with ``x`` (N,C,H,W or N,H,W,C) and optional integer ``y``. Pickled arrays are refused
(``allow_pickle=False`` everywhere). The API uses this to validate an upload; the worker uses
the same listing to read samples, so both agree on what the dataset contains.
"""

from __future__ import annotations

import random
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from core.errors import InvalidInput, UnsupportedMedia

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_MEMBERS = 1_000_000
# Archive bombs: caps on what members declare they expand to (zipfile reads no more than that).
MAX_IMAGE_BYTES = 256 * 1024**2  # one image file, uncompressed
MAX_ARCHIVE_BYTES = 256 * 1024**3  # everything in one archive, uncompressed
MAX_RATIO = 200  # uncompressed / compressed for any member over 1 MiB (images and arrays stay far below)
# How many images are decoded at upload to prove the archive holds images; the worker reads all.
VERIFY_SAMPLE = 32


@dataclass
class DatasetInfo:
    format: str  # zip | tar | npz
    num_samples: int
    labeled: bool
    num_classes: int | None
    class_names: list[str] | None
    sample_shape: list[int]
    layout: str  # HWC (images) | NCHW | NHWC | raw (npz)


@dataclass
class ImageListing:
    format: str  # zip | tar
    members: list[str]
    labels: list[int] | None
    class_names: list[str] | None


def detect_format(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise InvalidInput("the dataset file is empty", code="empty_dataset")
    if head == b"PK\x03\x04" or head == b"PK\x05\x06":
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except zipfile.BadZipFile as exc:
            raise UnsupportedMedia(f"the zip archive is corrupt: {exc}", code="corrupt_dataset") from exc
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    raise UnsupportedMedia(
        "the dataset must be a zip or tar of images, or an .npz with arrays x (and y)",
        code="unsupported_dataset_format",
    )


def _check_member_name(name: str) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("\\") or ":" in p.parts[0]:
        raise InvalidInput(f"archive member {name!r} has an unsafe path", code="unsafe_archive")


def check_zip_members(zf: zipfile.ZipFile, *, member_cap: int = MAX_ARCHIVE_BYTES) -> None:
    """Refuse zip bombs and unsafe member paths (``../``, absolute) from the central directory,
    before anything is decompressed."""
    total = 0
    for info in zf.infolist():
        _check_member_name(info.filename)
        total += info.file_size
        if info.file_size > member_cap:
            raise InvalidInput(f"archive member {info.filename!r} expands to {info.file_size} bytes "
                               f"(at most {member_cap})", code="archive_too_large")
        if info.file_size > 1024**2 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise InvalidInput(
                f"archive member {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}:1 "
                f"(at most {MAX_RATIO}:1): a zip bomb?", code="zip_bomb",
            )
    if total > MAX_ARCHIVE_BYTES:
        raise InvalidInput(f"the archive expands to {total} bytes (at most {MAX_ARCHIVE_BYTES})",
                           code="archive_too_large")


def _is_ignored(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def list_images(path: Path, fmt: str) -> ImageListing:
    names: list[str] = []
    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise InvalidInput(f"the archive has more than {MAX_MEMBERS} entries", code="too_many_files")
            check_zip_members(zf, member_cap=MAX_IMAGE_BYTES)
            for info in infos:
                if not info.is_dir():
                    names.append(info.filename)
    else:
        with tarfile.open(path, "r:*") as tf:
            total = 0
            for count, member in enumerate(tf):
                if count >= MAX_MEMBERS:
                    raise InvalidInput(f"the archive has more than {MAX_MEMBERS} entries", code="too_many_files")
                _check_member_name(member.name)
                if member.issym() or member.islnk():
                    raise InvalidInput(f"archive member {member.name!r} is a link", code="unsafe_archive")
                total += member.size
                if member.size > MAX_IMAGE_BYTES or total > MAX_ARCHIVE_BYTES:
                    raise InvalidInput(f"archive member {member.name!r} is too large ({member.size} bytes)",
                                       code="archive_too_large")
                if member.isfile():
                    names.append(member.name)
    images = sorted(
        n for n in names if not _is_ignored(n) and PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise InvalidInput(
            "the dataset holds no images (accepted: " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")",
            code="dataset_has_no_images",
            details={"files": len(names)},
        )
    dirs = [PurePosixPath(n).parts[:-1] for n in images]
    # A single folder wrapping everything (dataset/...) is not a class level.
    while all(len(d) >= 1 for d in dirs) and len({d[0] for d in dirs}) == 1 and any(len(d) > 1 for d in dirs):
        dirs = [d[1:] for d in dirs]
    depths = {len(d) for d in dirs}
    # Flat, or one folder holding everything (zip -r images.zip images/): no classes.
    if depths == {0} or (depths == {1} and len({d[0] for d in dirs}) == 1):
        return ImageListing(format=fmt, members=images, labels=None, class_names=None)
    if depths == {1}:
        class_names = sorted({d[0] for d in dirs})
        index = {c: i for i, c in enumerate(class_names)}
        return ImageListing(format=fmt, members=images, labels=[index[d[0]] for d in dirs], class_names=class_names)
    raise InvalidInput(
        "images must either all sit at the top of the archive (unlabeled) or all one folder "
        "deep, one folder per class (labeled)",
        code="mixed_dataset_layout",
        details={"folder_depths": sorted(depths)},
    )


def read_member(path: Path, fmt: str, member: str, handle: Any = None) -> bytes:
    if fmt == "zip":
        if handle is not None:
            return handle.read(member)
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    if handle is not None:
        fh = handle.extractfile(member)
        return fh.read() if fh else b""
    with tarfile.open(path, "r:*") as tf:
        fh = tf.extractfile(member)
        return fh.read() if fh else b""


def open_archive(path: Path, fmt: str):
    return zipfile.ZipFile(path) if fmt == "zip" else tarfile.open(path, "r:*")


def decode_image(data: bytes, name: str):
    """The image in the dataset's member ``name``; InvalidInput naming the member and saying why
    it is not one (Pillow's own message names an in-memory buffer, not the file)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as exc:
        why = "the file is empty" if not data else f"its {len(data)} bytes are not in an image format Pillow reads"
        raise _invalid_image(name, why) from exc
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:  # truncated, corrupt, huge
        raise _invalid_image(name, str(exc)) from exc
    return img


def _invalid_image(name: str, why: str) -> InvalidInput:
    return InvalidInput(f"dataset member {name!r} is not a readable image: {why}", code="invalid_image",
                        details={"member": name, "reason": why})


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), dtype


def _inspect_npz(path: Path) -> DatasetInfo:
    with zipfile.ZipFile(path) as zf:
        check_zip_members(zf)
        members = set(zf.namelist())
        if "x.npy" not in members:
            raise InvalidInput("the .npz has no array named x", code="invalid_npz", details={"arrays": sorted(members)})
        try:
            x_shape, x_dtype = _npy_header(zf, "x.npy")
            y_info = _npy_header(zf, "y.npy") if "y.npy" in members else None
        except ValueError as exc:
            raise InvalidInput(f"the .npz arrays are unreadable: {exc}", code="invalid_npz") from exc
    if x_dtype.hasobject or x_dtype.kind not in "fiub":
        raise InvalidInput(f"x must be a numeric array, got dtype {x_dtype}", code="invalid_npz")
    if len(x_shape) < 2 or x_shape[0] == 0:
        raise InvalidInput(f"x must hold at least one sample, got shape {list(x_shape)}", code="empty_dataset")
    labeled, num_classes = False, None
    if y_info is not None:
        y_shape, y_dtype = y_info
        if y_dtype.kind not in "iu" or len(y_shape) != 1 or y_shape[0] != x_shape[0]:
            raise InvalidInput(
                f"y must be one integer label per sample: got shape {list(y_shape)} dtype {y_dtype} "
                f"for {x_shape[0]} samples",
                code="invalid_npz",
            )
        with np.load(path, allow_pickle=False) as npz:
            y = npz["y"]
        if y.min() < 0:
            raise InvalidInput("labels in y must be non-negative class indices", code="invalid_npz")
        labeled, num_classes = True, int(y.max()) + 1
    sample = list(x_shape[1:])
    if len(sample) == 3 and sample[0] in (1, 3, 4):
        layout = "NCHW"
    elif len(sample) == 3 and sample[-1] in (1, 3, 4):
        layout = "NHWC"
    else:
        layout = "raw"
    return DatasetInfo(
        format="npz", num_samples=int(x_shape[0]), labeled=labeled, num_classes=num_classes,
        class_names=None, sample_shape=[int(s) for s in sample], layout=layout,
    )


def inspect_dataset(path: Path) -> DatasetInfo:
    fmt = detect_format(path)
    if fmt == "npz":
        return _inspect_npz(path)
    try:
        listing = list_images(path, fmt)
        # Decode the first image and a random sample: an archive of renamed files fails here.
        rng = random.Random(0)
        sample = [listing.members[0]] + rng.sample(listing.members, min(VERIFY_SAMPLE, len(listing.members)))
        with open_archive(path, fmt) as handle:
            first = None
            for name in sample:
                img = decode_image(read_member(path, fmt, name, handle), name)
                first = first or img
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise UnsupportedMedia(f"the archive is corrupt or truncated: {exc}", code="corrupt_dataset") from exc
    channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
    return DatasetInfo(
        format=fmt,
        num_samples=len(listing.members),
        labeled=listing.labels is not None,
        num_classes=len(listing.class_names) if listing.class_names else None,
        class_names=listing.class_names,
        sample_shape=[first.height, first.width, channels],
        layout="HWC",
    )


def model_layout(shape: list[int]) -> str:
    """NCHW or NHWC for an image model's 4-D input; raw for anything else."""
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW"
    if len(shape) == 4 and shape[3] in (1, 3):
        return "NHWC"
    return "raw"


def dataset_fit_error(*, layout: str, sample_shape: list[int], input_shape: list[int]) -> str | None:
    """Why this dataset cannot feed a model input of ``input_shape``, or None if it can."""
    m_layout = model_layout(input_shape)
    if layout == "HWC":
        if m_layout == "raw":
            return f"image datasets need a 4-D image input (N,C,H,W or N,H,W,C); the model takes {input_shape}"
        return None  # images are resized and converted to the model's channels
    if m_layout == "raw" or layout == "raw":
        if list(sample_shape) != list(input_shape[1:]):
            return f"samples of shape {sample_shape} do not match the model input {input_shape}"
        return None
    chw = sample_shape if layout == "NCHW" else [sample_shape[2], sample_shape[0], sample_shape[1]]
    m_chw = input_shape[1:] if m_layout == "NCHW" else [input_shape[3], input_shape[1], input_shape[2]]
    if list(chw) != list(m_chw):
        return (
            f"samples of shape {sample_shape} ({layout}) do not match the model input "
            f"{input_shape} ({m_layout}); .npz arrays are not resized"
        )
    return None
