"""Build a torch module from an upload that is weights only: a state_dict of a torchvision
architecture, loaded with ``torch.load(weights_only=True)`` (never a full unpickle)."""

from __future__ import annotations

from core.errors import PassError
from worker.passes.base import ArtifactRef


def _state_dict(obj):
    """A plain state_dict, or one wrapped the way training scripts save checkpoints."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def module_from_state_dict(ref: ArtifactRef):
    import torch
    import torchvision

    architecture = ref.meta.get("architecture")
    if not architecture:
        raise PassError("a state_dict upload needs its architecture", code="architecture_required")
    try:
        state = _state_dict(torch.load(str(ref.path), map_location="cpu", weights_only=True))
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise PassError(f"the state_dict could not be read as weights only: {exc}", code="invalid_state_dict") from exc
    if not isinstance(state, dict) or not state:
        raise PassError("the checkpoint holds no state_dict", code="invalid_state_dict")
    # The classifier's weight has one row (or 1x1 filter) per class: torchvision names it fc,
    # classifier or head(s); otherwise take the last matrix.
    heads = [v for k, v in state.items() if k.split(".")[0] in ("fc", "classifier", "head", "heads")
             and k.endswith("weight") and getattr(v, "ndim", 0) in (2, 4)]
    matrices = heads or [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    kwargs = {"num_classes": int(matrices[-1].shape[0])} if matrices else {}
    if architecture in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = any("aux" in k.lower() for k in state)
        kwargs["init_weights"] = False
    module = torchvision.models.get_model(architecture, weights=None, **kwargs)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise PassError(
            f"the weights do not fit torchvision's {architecture}: {first}",
            code="state_dict_mismatch",
            details={"architecture": architecture},
        ) from exc
    return module.float().eval()
