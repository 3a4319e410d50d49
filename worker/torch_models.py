"""Build a torch module from an upload that is weights only: a state_dict of a torchvision
architecture, loaded with ``torch.load(weights_only=True)`` (never a full unpickle)."""

from __future__ import annotations

from core.errors import PassError
from core.formats import EXPORTED_PROGRAM, STATE_DICT, TORCHSCRIPT
from core.model_formats import unwrap_checkpoint
from worker.data import sample_tensors
from worker.passes.base import ArtifactRef

# Module attributes that define tensor shapes; a pruned model records them beside its weights
# (plain ints, so the file still loads with weights_only=True).
SHAPE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")


def save_module(module, path) -> None:
    """Weights plus the shape attributes of every module: enough to rebuild a pruned
    torchvision model from its architecture, without pickling any class."""
    import torch

    attributes = {}
    for name, sub in module.named_modules():
        found = {a: getattr(sub, a) for a in SHAPE_ATTRIBUTES if isinstance(getattr(sub, a, None), int)}
        if found:
            attributes[name] = found
    torch.save({"state_dict": module.state_dict(), "module_attributes": attributes}, str(path))


def _reshape_to(module, state: dict, attributes: dict) -> None:
    """Give a freshly built model the pruned shapes recorded by save_module."""
    import torch

    modules = dict(module.named_modules())
    for name, attrs in attributes.items():
        if name in modules:
            for attr, value in attrs.items():
                setattr(modules[name], attr, int(value))
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        sub = modules.get(owner)
        current = getattr(sub, leaf, None) if sub is not None else None
        if current is not None and current.shape != tensor.shape:
            if isinstance(current, torch.nn.Parameter):
                setattr(sub, leaf, torch.nn.Parameter(torch.empty_like(tensor)))
            else:
                sub.register_buffer(leaf, torch.empty_like(tensor))


def export_open_batch(module, input_spec, log):
    """torch.export the module with an open batch axis; (program, True). When the graph
    specialised on the batch size (or the module guards it), (None, False)."""
    import torch

    args = sample_tensors(input_spec, batch=2)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        return torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args)), True
    except Exception as exc:  # torch.export raises several error types here
        log.warning("keeping a fixed batch size: %s", str(exc).splitlines()[0])
        return None, False


def module_from_state_dict(ref: ArtifactRef):
    import torch
    import torchvision

    architecture = ref.meta.get("architecture")
    if not architecture:
        raise PassError("a state_dict upload needs its architecture", code="architecture_required")
    try:
        blob = torch.load(str(ref.path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise PassError(f"the state_dict could not be read as weights only: {exc}", code="invalid_state_dict") from exc
    state = unwrap_checkpoint(blob)
    attributes = blob.get("module_attributes") if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state:
        raise PassError("the checkpoint holds no state_dict", code="invalid_state_dict")
    # The classifier's weight has one row (or 1x1 filter) per class: torchvision names it fc,
    # classifier or head(s); otherwise take the last matrix.
    heads = [
        v
        for k, v in state.items()
        if k.split(".")[0] in ("fc", "classifier", "head", "heads")
        and k.endswith("weight")
        and getattr(v, "ndim", 0) in (2, 4)
    ]
    matrices = heads or [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    kwargs = {"num_classes": int(matrices[-1].shape[0])} if matrices else {}
    if architecture in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = any("aux" in k.lower() for k in state)
        kwargs["init_weights"] = False
    module = torchvision.models.get_model(architecture, weights=None, **kwargs)
    if attributes:
        _reshape_to(module, state, attributes)
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


def load_module(ref: ArtifactRef):
    """Any PyTorch artifact as a module in eval mode, on the CPU."""
    import warnings

    import torch

    if ref.format == STATE_DICT:
        return module_from_state_dict(ref)
    if ref.format == EXPORTED_PROGRAM:
        return torch.export.load(str(ref.path)).module()
    if ref.format == TORCHSCRIPT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            return torch.jit.load(str(ref.path), map_location="cpu").eval()
    raise PassError(f"{ref.format} is not a PyTorch model", code="unsupported_model")
