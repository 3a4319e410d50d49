"""The state_dict shapes of the torchvision architectures a state_dict upload may name, as the
data file the API checks uploads against (core/torchvision_shapes.json.gz) without torchvision.

    .venv/bin/python -m tests.architecture_shapes   # rewrite the file (after a torchvision upgrade)

A dimension that depends on the number of classes is null; ``optional`` lists the keys of
auxiliary heads (inception_v3, googlenet), present all together or not at all."""

from __future__ import annotations

import gzip
import json

from core.model_formats import SHAPES_FILE, TORCHVISION_ARCHITECTURES


def _shapes(architecture: str, **kwargs) -> dict[str, list[int]]:
    import torch
    import torchvision

    if architecture in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = False
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            module = torchvision.models.get_model(architecture, weights=None, **kwargs)
    except NotImplementedError:  # a builder that computes its widths with tensors (regnet)
        module = torchvision.models.get_model(architecture, weights=None, **kwargs)
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def architecture_shapes() -> dict[str, dict]:
    table = {}
    for architecture in sorted(TORCHVISION_ARCHITECTURES):
        thousand, ten = _shapes(architecture, num_classes=1000), _shapes(architecture, num_classes=10)
        tensors = {k: [a if a == b else None for a, b in zip(v, ten[k], strict=True)] for k, v in thousand.items()}
        optional: list[str] = []
        if architecture in ("inception_v3", "googlenet"):
            optional = sorted(set(thousand) - set(_shapes(architecture, num_classes=1000, aux_logits=False)))
        table[architecture] = {"tensors": tensors, "optional": optional}
    return table


def serialized(table: dict) -> bytes:
    # mtime=0: the same table always gives the same bytes, so a rewrite shows no diff.
    return gzip.compress(json.dumps(table, sort_keys=True, separators=(",", ":")).encode(), mtime=0)


if __name__ == "__main__":
    SHAPES_FILE.write_bytes(serialized(architecture_shapes()))
    print(f"wrote {SHAPES_FILE} ({SHAPES_FILE.stat().st_size} bytes)")
