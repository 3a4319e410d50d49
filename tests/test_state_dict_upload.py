"""A state_dict upload is checked against its architecture at upload, in the API and without
torch: the keys and shapes read from the pickle's opcodes (never unpickled) against the table of
torchvision's shapes that core ships. The table itself is checked against the installed
torchvision here."""

from __future__ import annotations

import pytest

from core.errors import InvalidInput
from core.model_formats import SHAPES_FILE, inspect_model
from tests.architecture_shapes import architecture_shapes, serialized


def save(tmp_path, obj, name="weights.pt", **kwargs):
    import torch

    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def build(architecture: str, **kwargs):
    import torchvision

    if architecture in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = False
    return torchvision.models.get_model(architecture, weights=None, **kwargs)


@pytest.mark.integration
def test_the_shipped_table_is_torchvisions():
    assert SHAPES_FILE.read_bytes() == serialized(architecture_shapes()), (
        "torchvision changed: run .venv/bin/python -m tests.architecture_shapes and commit the file"
    )


@pytest.mark.parametrize(
    "architecture,kwargs",
    [
        ("resnet18", {"num_classes": 10}),
        ("mobilenet_v3_small", {}),
        ("inception_v3", {"aux_logits": False, "num_classes": 5}),
        ("inception_v3", {}),
        ("densenet121", {"num_classes": 3}),
    ],
)
def test_weights_of_the_named_architecture_are_accepted(tmp_path, architecture, kwargs):
    state = build(architecture, **kwargs).state_dict()
    for protocol in (2, 4):
        path = save(tmp_path, state, pickle_protocol=protocol)
        info = inspect_model(path, architecture=architecture)
        assert info.format == "state_dict" and info.details["architecture"] == architecture
    wrapped = save(tmp_path, {"state_dict": state, "epoch": 7, "best_top1": 0.71})
    assert inspect_model(wrapped, architecture=architecture).format == "state_dict"


def test_weights_of_another_architecture_are_a_422_naming_the_first_mismatches(tmp_path):
    path = save(tmp_path, build("resnet18").state_dict())
    with pytest.raises(InvalidInput) as refused:
        inspect_model(path, architecture="mobilenet_v3_small")
    err = refused.value
    assert err.code == "state_dict_mismatch" and "mobilenet_v3_small" in err.message
    assert "missing keys" in err.message and "features.0.0.weight" in err.details["missing_keys"]
    assert "conv1.weight" in err.details["unexpected_keys"]

    resnet34 = save(tmp_path, build("resnet34").state_dict(), "r34.pt")
    with pytest.raises(InvalidInput, match="unexpected keys"):
        inspect_model(resnet34, architecture="resnet18")  # same names up to layer1.2: extra blocks

    wide = build("resnet18").state_dict()
    wide["conv1.weight"] = wide["conv1.weight"][:, :1]  # a 1-channel stem
    with pytest.raises(InvalidInput) as shape:
        inspect_model(save(tmp_path, wide, "wide.pt"), architecture="resnet18")
    assert shape.value.details["shape_mismatches"] == ["conv1.weight: [64, 1, 7, 7] (expected [64, 3, 7, 7])"]


def test_a_data_parallel_checkpoint_is_told_how_to_save_instead(tmp_path):
    state = {f"module.{k}": v for k, v in build("resnet18").state_dict().items()}
    with pytest.raises(InvalidInput, match="model.module.state_dict"):
        inspect_model(save(tmp_path, state), architecture="resnet18")


def test_a_pruned_model_saved_by_the_service_is_checked_by_its_keys(tmp_path):
    from worker.torch_models import save_module

    model = build("resnet18", num_classes=10)
    state = model.state_dict()
    path = tmp_path / "pruned.pt"
    save_module(model, path)
    assert inspect_model(path, architecture="resnet18").format == "state_dict"
    import torch

    blob = torch.load(path, weights_only=True)
    blob["state_dict"] = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(blob, path)
    with pytest.raises(InvalidInput, match="missing keys"):
        inspect_model(path, architecture="resnet18")


def _zip_with_pickle(tmp_path, pickle_bytes: bytes, name="weights.pt", members=("archive/data.pkl",)):
    import zipfile

    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:  # stored: no compression ratio for the zip-bomb check to see
        for member in members:
            zf.writestr(member, pickle_bytes)
        zf.writestr("archive/version", "3\n")
    return path


def test_a_pickle_bomb_is_refused_without_walking_it(tmp_path):
    """Millions of opcodes (stored uncompressed, past the zip-bomb ratio check): refused by the
    pickle's size or its opcode count, quickly."""
    import time

    from core.errors import UnsupportedMedia

    huge = b"\x80\x02" + b"]" * (20 * 1024**2) + b"."  # 20 M EMPTY_LIST: gigabytes if walked
    many = b"\x80\x02" + b"]0" * 1_000_000 + b"N."  # 1 M (EMPTY_LIST, POP) under the size cap
    for data in (huge, many):
        started = time.monotonic()
        with pytest.raises(UnsupportedMedia) as refused:
            inspect_model(_zip_with_pickle(tmp_path, data), architecture="resnet18")
        assert refused.value.code == "corrupt_model" and time.monotonic() - started < 5


def test_odd_pickles_are_4xx_and_every_named_global_is_listed(tmp_path):
    from core.errors import UnsupportedMedia

    # An object built before a global: the interpreter stops at NEWOBJ; the refusal still names it.
    newobj = b"\x80\x02N)\x81cos\nsystem\n."
    with pytest.raises(UnsupportedMedia) as refused:
        inspect_model(_zip_with_pickle(tmp_path, newobj), architecture="resnet18")
    assert refused.value.code == "pickle_not_allowed" and "os.system" in refused.value.details["globals"]
    # A tensor whose size is infinite, and a state_dict keyed by an int: refused, never a crash.
    import pickle

    inf_size = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(NK\x00G\x7f\xf0\x00\x00\x00\x00\x00\x00"
        b"\x85NtRs."
    )
    int_key = pickle.dumps({7: 1}, protocol=2)
    for data in (inf_size, int_key):
        with pytest.raises((UnsupportedMedia, InvalidInput)):
            inspect_model(_zip_with_pickle(tmp_path, data), architecture="resnet18")
    with pytest.raises(InvalidInput, match="data.pkl"):
        state = _zip_with_pickle(tmp_path, int_key, members=("a/data.pkl", "b/data.pkl"))
        inspect_model(state, architecture="resnet18")
