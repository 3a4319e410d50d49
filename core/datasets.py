"""Calibration / evaluation datasets: what an upload holds, read without trusting it.

Accepted: a zip or tar of images (one folder per class = labeled, flat = unlabeled), or an
``.npz`` with ``x`` (N,C,H,W or N,H,W,C) and optional integer ``y``. Pickled arrays are refused
(``allow_pickle=False`` everywhere). The API uses this to validate an upload; the worker uses
the same listing to read samples, so both agree on what the dataset contains.

Detection labels ride in the same archives: YOLO txt (``images/<name>.<ext>`` beside
``labels/<name>.txt``, lines ``class cx cy w h`` normalized to 0..1, class names from
``classes.txt`` or a ``data.yaml`` ``names:``) or one COCO JSON (``images``, ``annotations``,
``categories``) at the top of the images; any other JSON or YAML is ignored. Such an archive
lists ``label_type="boxes"``; its targets come from ``read_box_targets``. Label files are held in
memory up to MAX_LABEL_FILE_BYTES each and MAX_LABEL_BYTES together.
"""

from __future__ import annotations

import json
import math
import random
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

import numpy as np

from core.errors import InvalidInput, UnsupportedMedia
from core.tasks import image_layout

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_MEMBERS = 1_000_000
# Archive bombs: caps on what members declare they expand to (zipfile reads no more than that).
MAX_IMAGE_BYTES = 256 * 1024**2  # one image file, uncompressed
MAX_ARCHIVE_BYTES = 256 * 1024**3  # everything in one archive, uncompressed
MAX_RATIO = 200  # uncompressed / compressed for any member over 1 MiB (images and arrays stay far below)
# How many images are decoded at upload to prove the archive holds images; the worker reads all.
VERIFY_SAMPLE = 32
# YOLO coordinates are normalized; writers round, so a hair outside 0..1 is still a good label.
LABEL_COORD_SLACK = 1e-3
YAML_SUFFIXES = {".yaml", ".yml"}
# What the listing holds in memory of the files that may carry labels: one file (COCO val2017's
# annotations are 25 MB) and all of them together (YOLO txt files are ~100 bytes an image).
MAX_LABEL_FILE_BYTES = 64 * 1024**2
MAX_LABEL_BYTES = 256 * 1024**2


@dataclass
class DatasetInfo:
    format: str  # zip | tar | npz
    num_samples: int
    labeled: bool
    num_classes: int | None
    class_names: list[str] | None
    sample_shape: list[int]
    layout: str  # HWC (images) | NCHW | NHWC | raw (npz)
    label_type: str | None = None  # classes (folders, npz y) | boxes (YOLO txt, COCO JSON) | None


@dataclass
class ImageListing:
    format: str  # zip | tar
    members: list[str]
    labels: list[int] | None  # class index per member (classes); None for boxes: see read_box_targets
    class_names: list[str] | None
    label_type: str | None = None  # classes | boxes | None


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
            raise InvalidInput(
                f"archive member {info.filename!r} expands to {info.file_size} bytes (at most {member_cap})",
                code="archive_too_large",
            )
        if info.file_size > 1024**2 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise InvalidInput(
                f"archive member {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}:1 "
                f"(at most {MAX_RATIO}:1): a zip bomb?",
                code="zip_bomb",
            )
    if total > MAX_ARCHIVE_BYTES:
        raise InvalidInput(
            f"the archive expands to {total} bytes (at most {MAX_ARCHIVE_BYTES})", code="archive_too_large"
        )


def _is_ignored(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_label_candidate(name: str) -> bool:
    """Members that may hold box labels or class names. They are read in the listing's own pass
    over the archive: a compressed tar cannot seek back to them cheaply."""
    if _is_ignored(name):
        return False
    p = PurePosixPath(name)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return "labels" in p.parts[:-1] or p.name == "classes.txt"
    return suffix == ".json" or suffix in YAML_SUFFIXES


@dataclass
class _LabelFiles:
    """The bytes of the members that may hold labels, and the sizes of the JSON and YAML ones too
    large to read (an error only if one of them is where the labels would be)."""

    texts: dict[str, bytes]
    too_large: dict[str, int]
    held: int = 0

    def wants(self, name: str, size: int) -> bool:
        """Whether to read this member; raises when a label text file or all of them are too large."""
        if not _is_label_candidate(name):
            return False
        if size > MAX_LABEL_FILE_BYTES:
            if PurePosixPath(name).suffix.lower() == ".txt":
                raise _invalid_labels(
                    name,
                    f"{size} bytes; label files are read up to {MAX_LABEL_FILE_BYTES}",
                    size=size,
                    limit=MAX_LABEL_FILE_BYTES,
                )
            self.too_large[name] = size
            return False
        self.held += size
        if self.held > MAX_LABEL_BYTES:
            raise _invalid_labels(
                name,
                f"the archive's label, JSON and YAML files add up to more than {MAX_LABEL_BYTES} bytes",
                limit=MAX_LABEL_BYTES,
            )
        return True


def _scan_archive(path: Path, fmt: str) -> tuple[list[str], _LabelFiles]:
    """Every file member's name, and the bytes of those that may hold labels."""
    names: list[str] = []
    labels = _LabelFiles(texts={}, too_large={})
    texts = labels.texts
    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise InvalidInput(f"the archive has more than {MAX_MEMBERS} entries", code="too_many_files")
            check_zip_members(zf, member_cap=MAX_IMAGE_BYTES)
            for info in infos:
                if not info.is_dir():
                    names.append(info.filename)
                    if labels.wants(info.filename, info.file_size):
                        texts[info.filename] = zf.read(info)
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
                    raise InvalidInput(
                        f"archive member {member.name!r} is too large ({member.size} bytes)", code="archive_too_large"
                    )
                if member.isfile():
                    names.append(member.name)
                    if labels.wants(member.name, member.size):
                        fh = tf.extractfile(member)
                        texts[member.name] = fh.read() if fh else b""
    return names, labels


def _image_members(names: list[str]) -> list[str]:
    images = sorted(n for n in names if not _is_ignored(n) and PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InvalidInput(
            "the dataset holds no images (accepted: " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")",
            code="dataset_has_no_images",
            details={"files": len(names)},
        )
    return images


def list_images(path: Path, fmt: str) -> ImageListing:
    names, label_files = _scan_archive(path, fmt)
    images = _image_members(names)
    boxes = _read_box_labels(images, label_files)
    if boxes is not None:
        return ImageListing(
            format=fmt, members=boxes.members, labels=None, class_names=boxes.class_names, label_type="boxes"
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
        return ImageListing(
            format=fmt,
            members=images,
            labels=[index[d[0]] for d in dirs],
            class_names=class_names,
            label_type="classes",
        )
    raise InvalidInput(
        "images must either all sit at the top of the archive (unlabeled) or all one folder "
        "deep, one folder per class (labeled)",
        code="mixed_dataset_layout",
        details={"folder_depths": sorted(depths)},
    )


# -- box labels ----------------------------------------------------------------------------------


@dataclass
class _BoxLabels:
    kind: str  # yolo | coco
    members: list[str]  # the labeled images, sorted
    class_names: list[str]
    # Per member, (M, 5): yolo [cls, cx, cy, w, h] normalized; coco [cls, x1, y1, x2, y2] pixels.
    rows: dict[str, np.ndarray]


def _invalid_labels(member: str, reason: str, **details: Any) -> InvalidInput:
    return InvalidInput(
        f"the labels in {member!r} are invalid: {reason}",
        code="invalid_labels",
        details={"member": member, "reason": reason, **details},
    )


def _text(member: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _invalid_labels(member, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _read_box_labels(images: list[str], files: _LabelFiles) -> _BoxLabels | None:
    """The archive's box labels, or None when it carries none (a classification or unlabeled set)."""
    coco = _coco_labels(images, files)
    yolo = _yolo_labels(images, files.texts)
    if coco is not None and yolo is not None:
        raise _invalid_labels(coco[0], "the archive holds both a COCO annotation file and YOLO label files; keep one")
    if coco is not None:
        return _parse_coco(coco[0], coco[1], images)
    return yolo


def _yolo_label_member(image: str) -> str | None:
    """labels/<name>.txt for images/<name>.<ext> (the last images/ folder, as Ultralytics maps it)."""
    parts = PurePosixPath(image).parts
    folders = parts[:-1]
    if "images" not in folders:
        return None
    at = len(folders) - 1 - folders[::-1].index("images")
    return str(PurePosixPath(*parts[:at], "labels", *parts[at + 1 : -1], PurePosixPath(parts[-1]).stem + ".txt"))


def _yolo_labels(images: list[str], texts: dict[str, bytes]) -> _BoxLabels | None:
    label_for = {image: _yolo_label_member(image) for image in images}
    if not any(label in texts for label in label_for.values() if label is not None):
        return None
    outside = [image for image, label in label_for.items() if label is None]
    if outside:
        raise _invalid_labels(
            outside[0],
            "YOLO labels are read for images under an images/ folder; this image is not in one",
            images_outside=len(outside),
        )
    class_names = _yolo_class_names(texts)
    rows: dict[str, np.ndarray] = {}
    for image, label in label_for.items():
        # An image without a label file is an image with no objects (Ultralytics' rule too).
        rows[image] = _parse_yolo_txt(label, texts[label]) if label in texts else np.zeros((0, 5))
    top = max((int(r[:, 0].max()) for r in rows.values() if len(r)), default=-1)
    if class_names is None:
        class_names = [str(i) for i in range(top + 1)]
    elif top >= len(class_names):
        bad = next(label_for[i] for i, r in rows.items() if len(r) and r[:, 0].max() >= len(class_names))
        raise _invalid_labels(cast(str, bad), f"class {top} is past the {len(class_names)} class names given")
    return _BoxLabels(kind="yolo", members=images, class_names=class_names, rows=rows)


def _parse_yolo_txt(member: str, data: bytes) -> np.ndarray:
    """(M, 5) [cls, cx, cy, w, h] normalized. A polygon line (YOLO segmentation labels: class then
    x y pairs) stands for its bounding box, as Ultralytics reads it for detection."""
    rows = []
    for number, line in enumerate(_text(member, data).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise _invalid_labels(member, f"line {number} is not numbers: {line.strip()[:80]!r}", line=number) from None
        cls, coords = values[0], values[1:]
        if not all(math.isfinite(v) for v in values) or cls < 0 or cls != int(cls):
            raise _invalid_labels(
                member, f"line {number} does not start with a class index: {line.strip()[:80]!r}", line=number
            )
        if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
            raise _invalid_labels(
                member,
                f"line {number} has {len(values)} values; expected 'class cx cy w h' "
                "(or a polygon: class x1 y1 x2 y2 x3 y3 ...)",
                line=number,
            )
        if min(coords) < -LABEL_COORD_SLACK or max(coords) > 1 + LABEL_COORD_SLACK:
            raise _invalid_labels(
                member,
                f"line {number} has coordinates outside 0..1 (they are normalized by the "
                f"image's width and height): {line.strip()[:80]!r}",
                line=number,
            )
        if len(coords) == 4:
            rows.append([cls, *coords])
        else:
            xs, ys = coords[0::2], coords[1::2]
            x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
            rows.append([cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _depth_first(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (len(PurePosixPath(n).parts), n))


def _yolo_class_names(texts: dict[str, bytes]) -> list[str] | None:
    """From classes.txt (one name a line), else a YAML's ``names:`` (Ultralytics' data.yaml: a list,
    or a mapping from class index to name); the shallowest file wins."""
    listed = _depth_first([n for n in texts if PurePosixPath(n).name == "classes.txt"])
    if listed:
        return [line.strip() for line in _text(listed[0], texts[listed[0]]).splitlines() if line.strip()]
    for member in _depth_first([n for n in texts if PurePosixPath(n).suffix.lower() in YAML_SUFFIXES]):
        import yaml  # with the API's uvicorn[standard]; only YOLO archives with a data.yaml need it

        data = texts[member]
        try:
            doc = yaml.safe_load(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
            # Other YAML (a training config, a notes file) is not ours to judge; one that says names is.
            if b"names:" in data:
                raise _invalid_labels(member, f"not readable YAML: {exc}") from exc
            continue
        if isinstance(doc, dict) and "names" in doc:
            return _yaml_names(member, doc["names"])
    return None


def _yaml_names(member: str, names: Any) -> list[str]:
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            index = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise _invalid_labels(member, "names: must map class indices to names") from None
        if index and min(index) < 0:
            raise _invalid_labels(member, "names: class indices must be 0 or more")
        return [index.get(i, str(i)) for i in range(max(index, default=-1) + 1)]
    raise _invalid_labels(member, "names: must be a list of class names or a mapping from class index to name")


def _looks_like_coco(data: bytes) -> bool:
    return b'"annotations"' in data and b'"images"' in data


def _coco_labels(images: list[str], files: _LabelFiles) -> tuple[str, dict[str, Any]] | None:
    """The one COCO annotation file at the top of the images (the archive's root, or the folder
    all images share or one above it), parsed; None when there is none. A JSON there is COCO only
    when it is an object with "images" and "annotations": other JSON (metadata.json) is ignored, and
    so is one that does not parse unless it names both keys (a broken COCO file is the user's to fix)."""
    texts = files.texts
    folders = [PurePosixPath(n).parts[:-1] for n in images]
    common: tuple[str, ...] = folders[0]
    for folder in folders[1:]:
        shared = 0
        while shared < min(len(common), len(folder)) and common[shared] == folder[shared]:
            shared += 1
        common = common[:shared]

    def at_the_top(member: str) -> bool:
        folder = PurePosixPath(member).parts[:-1]
        return PurePosixPath(member).suffix.lower() == ".json" and folder == common[: len(folder)]

    for member, size in sorted(files.too_large.items()):
        if at_the_top(member):
            raise _invalid_labels(
                member,
                f"{size} bytes; a JSON beside the images is read as COCO annotations up "
                f"to {MAX_LABEL_FILE_BYTES} bytes",
                size=size,
                limit=MAX_LABEL_FILE_BYTES,
            )
    found = []
    for member in sorted(n for n in texts if at_the_top(n)):
        data = texts[member]
        try:
            doc = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            if _looks_like_coco(data):
                raise _invalid_labels(member, f"not readable JSON: {exc}") from exc
            continue
        if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
            found.append((member, doc))
    if len(found) > 1:
        raise _invalid_labels(
            found[1][0], "the archive holds several COCO annotation files; keep one", files=[m for m, _ in found]
        )
    return found[0] if found else None


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _coco_categories(member: str, categories: list[Any]) -> dict[int, str]:
    """Each category's name by its id."""
    cat_names: dict[int, str] = {}
    for cat in categories:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise _invalid_labels(member, f"a category has no integer id: {str(cat)[:80]}")
        if cat["id"] in cat_names:
            raise _invalid_labels(member, f"category id {cat['id']} is listed twice")
        cat_names[cat["id"]] = str(cat.get("name", cat["id"]))
    return cat_names


def _coco_images(
    member: str, entries: list[Any], images: list[str]
) -> tuple[dict[Any, str | None], dict[str, tuple[float, float] | None]]:
    """(the archive member each image id names, None for one it does not hold; the (width, height)
    each found member's entry gives, None when it gives none)."""
    base = PurePosixPath(member).parent
    present = set(images)
    by_basename: dict[str, list[str]] = {}
    for listed in images:
        by_basename.setdefault(PurePosixPath(listed).name, []).append(listed)
    member_of: dict[Any, str | None] = {}
    size_of: dict[str, tuple[float, float] | None] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not _is_id(entry.get("id")) or not isinstance(entry.get("file_name"), str):
            raise _invalid_labels(member, f"an image entry lacks an id or a file_name: {str(entry)[:80]}")
        if entry["id"] in member_of:
            raise _invalid_labels(member, f"image id {entry['id']} is listed twice")
        file_name = entry["file_name"].replace("\\", "/")
        here = str(PurePosixPath(base, file_name))
        if here in present:
            found: str | None = here
        else:
            # Exports name files relative to an images folder the archive may not keep.
            same = by_basename.get(PurePosixPath(file_name).name, [])
            found = same[0] if len(same) == 1 else None
        if found is not None and found in size_of:
            raise _invalid_labels(member, f"two image entries name the file {found!r}")
        member_of[entry["id"]] = found
        if found is not None:
            w: Any = entry.get("width")
            h: Any = entry.get("height")
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h))
            size_of[found] = (float(w), float(h)) if ok else None
    return member_of, size_of


def _parse_coco(member: str, doc: dict[str, Any], images: list[str]) -> _BoxLabels:
    entries, annotations, categories = doc.get("images"), doc.get("annotations"), doc.get("categories")
    if not isinstance(entries, list) or not isinstance(annotations, list):
        raise _invalid_labels(member, "'images' and 'annotations' must be lists")
    if not isinstance(categories, list) or not categories:
        raise _invalid_labels(member, "'categories' must list the classes ({'id', 'name'} each)")
    cat_names = _coco_categories(member, categories)
    # Contiguous class indices in the order of the category ids (COCO's 1..90 become 0..79).
    cat_index = {cid: i for i, cid in enumerate(sorted(cat_names))}
    member_of, size_of = _coco_images(member, entries, images)
    if not size_of:
        raise _invalid_labels(
            member, f"none of the {len(entries)} images it lists is in the archive", images_listed=len(entries)
        )
    rows: dict[str, list[list[float]]] = {m: [] for m in size_of}
    for ann in annotations:
        if not isinstance(ann, dict):
            raise _invalid_labels(member, f"an annotation is not an object: {str(ann)[:80]}")
        ann_id = ann.get("id")
        if not _is_id(ann.get("image_id")) or ann["image_id"] not in member_of:
            raise _invalid_labels(
                member,
                f"annotation {ann_id} names image_id {ann.get('image_id')!r}, which 'images' does not list",
                annotation=ann_id,
            )
        if ann.get("category_id") not in cat_index or isinstance(ann.get("category_id"), bool):
            raise _invalid_labels(
                member,
                f"annotation {ann_id} names category_id {ann.get('category_id')!r}, which 'categories' does not list",
                annotation=ann_id,
            )
        # Crowd regions are not objects to find (COCO ignores detections on them); not scored here.
        if ann.get("iscrowd"):
            continue
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
            or bbox[2] < 0
            or bbox[3] < 0
        ):
            raise _invalid_labels(
                member, f"annotation {ann_id} has no bbox [x, y, width, height]: {str(bbox)[:80]}", annotation=ann_id
            )
        image = member_of[ann["image_id"]]
        if image is None:  # an image the archive does not hold
            continue
        x1, y1 = float(bbox[0]), float(bbox[1])
        x2, y2 = x1 + float(bbox[2]), y1 + float(bbox[3])
        size = size_of[image]
        if size is not None:
            w, h = size
            x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
            y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        rows[image].append([cat_index[ann["category_id"]], x1, y1, x2, y2])
    return _BoxLabels(
        kind="coco",
        members=sorted(rows),
        class_names=[cat_names[c] for c in sorted(cat_names)],
        rows={m: np.asarray(r, dtype=np.float64).reshape(-1, 5) for m, r in rows.items()},
    )


def read_box_targets(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """Each labeled image's boxes, ``(M, 5)`` float64 ``[cls, x1, y1, x2, y2]`` in the original
    image's pixels (YOLO's normalized boxes are scaled by the image's own size); an image with
    no objects has an empty ``(0, 5)``. Keys are the listing's members, in the listing's order
    (list_images, iter_batches)."""
    names, label_files = _scan_archive(path, fmt)
    labels = _read_box_labels(_image_members(names), label_files)
    if labels is None:
        raise InvalidInput("the dataset holds no box labels (YOLO labels/*.txt or a COCO JSON)", code="no_box_labels")
    if labels.kind == "coco":
        return {member: labels.rows[member] for member in labels.members}
    targets = {}
    for member, (w, h) in zip(labels.members, image_sizes(path, fmt, labels.members), strict=True):
        rows = labels.rows[member]
        half_w, half_h = rows[:, 3] / 2, rows[:, 4] / 2
        targets[member] = np.stack(
            [
                rows[:, 0],
                np.clip((rows[:, 1] - half_w) * w, 0, w),
                np.clip((rows[:, 2] - half_h) * h, 0, h),
                np.clip((rows[:, 1] + half_w) * w, 0, w),
                np.clip((rows[:, 2] + half_h) * h, 0, h),
            ],
            axis=1,
        ).reshape(-1, 5)
    return targets


def image_sizes(path: Path, fmt: str, members: list[str]) -> list[tuple[int, int]]:
    """(width, height) of each member, from the image headers alone (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    def size(fh: IO[bytes], name: str) -> tuple[int, int]:
        try:
            with Image.open(fh) as img:
                return img.size
        except UnidentifiedImageError as exc:
            raise _invalid_image(name, "not in an image format Pillow reads") from exc
        except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            raise _invalid_image(name, str(exc)) from exc

    sizes: dict[str, tuple[int, int]] = {}
    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            for name in members:
                with zf.open(name) as fh:
                    sizes[name] = size(fh, name)
    else:
        wanted = set(members)
        # One pass in the archive's own order: a compressed tar reads backwards only from its start.
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if member.name in wanted and member.isfile():
                    file = cast(IO[bytes], tf.extractfile(member))  # a regular file (isfile): never None
                    sizes[member.name] = size(file, member.name)
    missing = [m for m in members if m not in sizes]
    if missing:
        raise InvalidInput(
            f"dataset member {missing[0]!r} is not in the archive",
            code="invalid_dataset",
            details={"member": missing[0]},
        )
    return [sizes[m] for m in members]


def read_member(path: Path, fmt: str, member: str, handle: Any = None) -> bytes:
    if fmt == "zip":
        if handle is not None:
            return cast(bytes, handle.read(member))
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    if handle is not None:
        fh = handle.extractfile(member)
        return fh.read() if fh else b""
    with tarfile.open(path, "r:*") as tf:
        fh = tf.extractfile(member)
        return fh.read() if fh else b""


def open_archive(path: Path, fmt: str) -> zipfile.ZipFile | tarfile.TarFile:
    return zipfile.ZipFile(path) if fmt == "zip" else tarfile.open(path, "r:*")


def decode_image(data: bytes, name: str) -> PILImage:
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
    return InvalidInput(
        f"dataset member {name!r} is not a readable image: {why}",
        code="invalid_image",
        details={"member": name, "reason": why},
    )


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
        format="npz",
        num_samples=int(x_shape[0]),
        labeled=labeled,
        num_classes=num_classes,
        class_names=None,
        sample_shape=[int(s) for s in sample],
        layout=layout,
        label_type="classes" if labeled else None,
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
            first: PILImage | None = None
            for name in sample:
                img = decode_image(read_member(path, fmt, name, handle), name)
                first = first or img
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise UnsupportedMedia(f"the archive is corrupt or truncated: {exc}", code="corrupt_dataset") from exc
    assert first is not None  # the sample holds the first member at least
    channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
    return DatasetInfo(
        format=fmt,
        num_samples=len(listing.members),
        labeled=listing.label_type is not None,
        num_classes=len(listing.class_names) if listing.class_names else None,
        class_names=listing.class_names,
        sample_shape=[first.height, first.width, channels],
        layout="HWC",
        label_type=listing.label_type,
    )


def model_layout(shape: list[int]) -> str:
    """NCHW or NHWC for an image model's 4-D input; raw for anything else (core.tasks' rule, which
    the task's input size also follows)."""
    return image_layout(shape)


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
