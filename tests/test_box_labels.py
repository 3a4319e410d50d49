"""Which JSON and YAML files in a dataset archive are labels, and how much of them the API reads."""

from __future__ import annotations

import json

import pytest

from core import datasets
from core.datasets import inspect_dataset, read_box_targets
from core.errors import InvalidInput
from tests.archives import png_bytes, tar_of, zip_of


def _coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 8, 8]}],
        "categories": [{"id": 3, "name": "car"}],
    }


@pytest.mark.parametrize(
    "stray",
    [
        "{not json at all",  # a hand-edited notes file
        b"\xff\xfe\x00binary",  # not UTF-8
        "[" * 100_000,  # nested past the parser's recursion limit
        '{"images": 3}',  # an object, but no COCO ("annotations" missing)
    ],
)
@pytest.mark.parametrize("pack", [zip_of, tar_of])
def test_a_stray_json_beside_class_folders_is_ignored(tmp_path, stray, pack):
    png = png_bytes()
    path = pack(
        tmp_path / ("cls.zip" if pack is zip_of else "cls.tar.gz"),
        {"cat/1.png": png, "dog/2.png": png, "metadata.json": stray},
    )
    info = inspect_dataset(path)
    assert (info.label_type, info.class_names, info.num_samples) == ("classes", ["cat", "dog"], 2)


def test_a_broken_coco_file_is_still_a_422(tmp_path):
    text = json.dumps(_coco())[:-5]  # truncated: it names images and annotations but does not parse
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(zip_of(tmp_path / "coco.zip", {"labels.json": text, "images/a.png": png_bytes()}))
    assert err.value.code == "invalid_labels" and err.value.details["member"] == "labels.json"
    assert "not readable JSON" in err.value.message


def test_a_coco_file_over_the_cap_is_a_422_with_its_size(tmp_path, monkeypatch):
    text = json.dumps(_coco())
    path = zip_of(tmp_path / "coco.zip", {"labels.json": text, "images/a.png": png_bytes()})
    assert read_box_targets(path, "zip")["images/a.png"].tolist() == [[0, 2, 2, 10, 10]]
    monkeypatch.setattr(datasets, "MAX_LABEL_FILE_BYTES", len(text) - 1)
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(path)
    assert err.value.code == "invalid_labels"
    assert err.value.details["size"] == len(text) and err.value.details["limit"] == len(text) - 1


def test_a_large_json_below_the_images_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_LABEL_FILE_BYTES", 100)
    png = png_bytes()
    # A per-image sidecar inside a class folder is not where COCO annotations sit: never read, no error.
    path = zip_of(
        tmp_path / "cls.zip", {"cat/1.png": png, "cat/1.json": json.dumps({"pad": "x" * 500}), "dog/2.png": png}
    )
    assert inspect_dataset(path).class_names == ["cat", "dog"]


def test_all_label_files_together_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_LABEL_BYTES", 1000)
    files: dict[str, bytes | str] = {}
    for i in range(60):
        files[f"images/{i}.png"] = png_bytes(8, 8)
        files[f"labels/{i}.txt"] = "0 0.5 0.5 0.25 0.25\n"  # 20 bytes each: 1200 in all
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(zip_of(tmp_path / "many.zip", files))
    assert err.value.code == "invalid_labels" and err.value.details["limit"] == 1000


def test_yaml_that_is_not_the_class_names_is_ignored(tmp_path):
    # aug.yaml (not YAML that parses) is read before data.yaml.
    files = {
        "images/a.png": png_bytes(),
        "labels/a.txt": "1 0.5 0.5 0.5 0.5\n",
        "aug.yaml": "lr: [0.01\n",
        "data.yaml": "names: [cat, dog]\n",
    }
    assert inspect_dataset(zip_of(tmp_path / "ok.zip", files)).class_names == ["cat", "dog"]
    files["data.yaml"] = "names: [cat, dog\n"  # says names but does not parse: the user's to fix
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(zip_of(tmp_path / "bad.zip", files))
    assert err.value.code == "invalid_labels" and err.value.details["member"] == "data.yaml"
