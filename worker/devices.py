"""What accelerator this worker has, for the queues it consumes and for engine metadata."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from core.workers import gpu_kind_from_name


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@lru_cache
def detect_gpu(kind_override: str = "") -> dict[str, Any] | None:
    """The first CUDA device, or None when torch sees none (then the worker takes no GPU queue)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    tensorrt = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13")
    return {
        "name": props.name,
        "kind": kind_override or gpu_kind_from_name(props.name),
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 1024**3, 1),
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "tensorrt": tensorrt,
    }
