"""What the pruning steps share (prune_structured, prune_unstructured): which modules stay as they are, and
how big a model is."""

from __future__ import annotations

from core.errors import PassError


def protected_modules(module, names: list[str] | None) -> list:
    """The modules a pruning step leaves alone: those named, else the first convolution and the classifier
    (the input's and the output's shapes depend on them)."""
    import torch

    mods = dict(module.named_modules())
    if names is not None:
        missing = [n for n in names if n not in mods]
        if missing:
            raise PassError(f"protect names modules the model does not have: {missing}", code="unknown_modules")
        return [mods[n] for n in names]
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return [m for m in (convs[:1] + linears[-1:])]


def measure(module, example) -> tuple[int, int]:
    """(MACs, parameters) of the module on ``example``, as torch-pruning counts them."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example)
    return int(macs), int(params)
