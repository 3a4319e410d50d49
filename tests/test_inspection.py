"""Recognising uploads by content, without torch and without unpickling anything."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from core.datasets import dataset_fit_error, inspect_dataset, model_layout
from core.errors import InvalidInput, UnsupportedMedia
from core.model_formats import inspect_model


class Boom:
    """Unpickling this would run code: the inspector must refuse without loading it."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


@pytest.mark.integration
def test_onnx_inputs_and_outputs_are_read(digit_assets):
    info = inspect_model(digit_assets.models["onnx"])
    assert info.format == "onnx"
    assert info.inputs == [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert info.outputs == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]


@pytest.mark.integration
def test_exported_program_shapes_come_from_its_json(digit_assets):
    info = inspect_model(digit_assets.models["pt2"])
    assert info.format == "exported_program"
    assert info.inputs == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert info.outputs[0]["shape"] == [1, 10]


@pytest.mark.integration
def test_torchscript_is_recognised_with_its_argument_names(digit_assets):
    info = inspect_model(digit_assets.models["torchscript"])
    assert info.format == "torchscript"
    assert [i["name"] for i in info.inputs] == ["image"]
    assert info.inputs[0]["shape"] is None


@pytest.mark.parametrize("payload", [pickle.dumps(Boom()), pickle.dumps(Boom(), protocol=2)])
def test_pickles_are_refused_unread(tmp_path, payload):
    path = tmp_path / "model.pt"
    path.write_bytes(payload)
    with pytest.raises(UnsupportedMedia) as err:
        inspect_model(path)
    assert err.value.code == "pickle_not_allowed"


@pytest.mark.integration
def test_a_torch_save_zip_is_refused_as_a_pickle(digit_assets):
    with pytest.raises(UnsupportedMedia) as err:
        inspect_model(digit_assets.models["state_dict"])
    assert err.value.code == "pickle_not_allowed"


@pytest.mark.integration
@pytest.mark.parametrize("cut", [10, 100, 0.5, -7])
def test_truncated_onnx_is_corrupt(digit_assets, tmp_path, cut):
    data = digit_assets.models["onnx"].read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    path = tmp_path / "t.onnx"
    path.write_bytes(data[:n])
    with pytest.raises(UnsupportedMedia) as err:
        inspect_model(path)
    assert err.value.code in ("corrupt_model", "unrecognized_model_format")


def test_a_zip_that_is_no_model_is_unrecognized(tmp_path):
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(UnsupportedMedia) as err:
        inspect_model(path)
    assert err.value.code == "unrecognized_model_format"


@pytest.mark.integration
def test_image_tar_with_a_wrapping_folder_is_labeled(tmp_path, digit_assets):
    src = zipfile.ZipFile(digit_assets.labeled_zip)
    path = tmp_path / "d.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name in src.namelist()[:40]:
            data = src.read(name)
            info = tarfile.TarInfo("wrap/" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    info = inspect_dataset(path)
    assert info.format == "tar" and info.labeled and info.sample_shape == [8, 8, 1]


def test_tar_links_are_refused(tmp_path):
    path = tmp_path / "l.tar"
    with tarfile.open(path, "w") as tf:
        link = tarfile.TarInfo("a.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(path)
    assert err.value.code == "unsafe_archive"


@pytest.mark.integration
def test_mixed_folder_depths_are_refused(tmp_path, digit_assets):
    png = zipfile.ZipFile(digit_assets.labeled_zip).read(zipfile.ZipFile(digit_assets.labeled_zip).namelist()[0])
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cat/1.png", png)
        zf.writestr("2.png", png)
        zf.writestr("dog/x/3.png", png)
    with pytest.raises(InvalidInput) as err:
        inspect_dataset(path)
    assert err.value.code == "mixed_dataset_layout"


def test_nhwc_npz_layout(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((5, 32, 32, 3), np.uint8))
    info = inspect_dataset(path)
    assert (info.layout, info.sample_shape, info.num_samples, info.labeled) == ("NHWC", [32, 32, 3], 5, False)


@pytest.mark.parametrize(
    ("layout", "sample", "model", "fits"),
    [
        ("HWC", [100, 80, 3], [1, 3, 224, 224], True),
        ("HWC", [8, 8, 1], [1, 16], False),
        ("NCHW", [3, 32, 32], [1, 32, 32, 3], True),
        ("NHWC", [32, 32, 3], [1, 3, 32, 32], True),
        ("NCHW", [1, 16, 16], [1, 1, 8, 8], False),
        ("raw", [16], [1, 16], True),
    ],
)
def test_dataset_fit(layout, sample, model, fits):
    assert (dataset_fit_error(layout=layout, sample_shape=sample, input_shape=model) is None) is fits


def test_model_layout():
    assert model_layout([1, 3, 224, 224]) == "NCHW"
    assert model_layout([1, 224, 224, 3]) == "NHWC"
    assert model_layout([1, 10]) == "raw"


@pytest.fixture(scope="module")
def resnet_state_dict(tmp_path_factory):
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("sd") / "resnet18_10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.mark.integration
def test_a_state_dict_is_accepted_only_with_an_architecture(resnet_state_dict):
    with pytest.raises(UnsupportedMedia) as err:
        inspect_model(resnet_state_dict)
    assert err.value.code == "pickle_not_allowed" and "architecture" in err.value.message
    info = inspect_model(resnet_state_dict, architecture="resnet18")
    assert info.format == "state_dict"
    assert info.details == {"architecture": "resnet18", "default_input_shape": [1, 3, 224, 224]}
    with pytest.raises(InvalidInput) as err:
        inspect_model(resnet_state_dict, architecture="resnet19")
    assert err.value.code == "unknown_architecture"


def test_a_checkpoint_that_would_run_code_is_refused_even_with_an_architecture(tmp_path):
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"weights": Boom()}, path)
    with pytest.raises(UnsupportedMedia) as err:
        inspect_model(path, architecture="resnet18")
    assert err.value.code == "pickle_not_allowed"
    assert any(g.endswith(".exec") for g in err.value.details["globals"])


def test_every_listed_architecture_exists_in_torchvision():
    import torchvision

    from core.model_formats import TORCHVISION_ARCHITECTURES

    assert set(TORCHVISION_ARCHITECTURES) <= set(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.integration
@pytest.mark.parametrize("member", ["../escape.txt", "archive/../../escape.txt", "/etc/cron.d/x"])
def test_a_pt2_archive_with_an_unsafe_member_path_is_refused_at_upload(digit_assets, tmp_path, member):
    """Like dataset zips and tars: nothing with a path outside the archive reaches the worker,
    whose torch.export.load would unpack it."""
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(digit_assets.models["pt2"]) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(member, b"x")
    with pytest.raises(InvalidInput) as err:
        inspect_model(path)
    assert err.value.code == "unsafe_archive" and member in err.value.message
