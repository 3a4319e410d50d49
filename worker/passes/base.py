"""The pass contract.

A pass turns (input artifact, typed config, work dir) into (new artifact, metrics). It never
mutates its input and never touches the database or the object store: the runner owns
ordering, progress, caching, uploads and errors. What a pass is called, takes, makes and is
configured with is its spec, in core.steps; importing a pass module stays cheap all the same
(heavy libraries are imported in ``run``), and importing this one imports no pass.
"""

from __future__ import annotations

import logging
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from core.schemas import Preprocessing
from core.steps.base import PassConfig, PassSpec

# Library messages that mean an allocation failed (the step's memory limit, or the machine's).
OOM_MESSAGES = re.compile(
    r"can't allocate memory|cannot allocate memory|bad[_ ]alloc|out of memory|"
    r"failed to allocate memory|MemoryError",
    re.IGNORECASE,
)


def is_out_of_memory(exc: BaseException) -> bool:
    """A pass that tolerates a failing run (a batch size the model can't take) must still let
    an allocation failure through: the step is out of memory, not the variant unusable."""
    return isinstance(exc, MemoryError) or bool(OOM_MESSAGES.search(f"{type(exc).__name__}: {exc}"))


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    format: str
    path: Path
    step: str | None = None  # None: the original upload
    step_index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetRef:
    path: Path
    format: str  # zip | tar | npz
    labeled: bool
    num_samples: int
    layout: str
    sample_shape: list[int]
    label_type: str | None = None  # classes | boxes (detection targets; core.datasets.read_box_targets)


@dataclass
class PassContext:
    work_dir: Path
    original: ArtifactRef
    # Every artifact made by earlier steps, in order (analysis passes measure them all).
    artifacts: list[ArtifactRef]
    # [{"name", "shape" (all concrete), "dtype"}]
    input_spec: list[dict[str, Any]]
    preprocessing: Preprocessing
    # classification | detection | segmentation, or auto (measuring passes decide from the outputs).
    task: str = "auto"
    # {"max_accuracy_drop": float, "detection": core.schemas.DetectionOptions as a dict}
    task_options: dict[str, Any] = field(default_factory=dict)
    calibration_dataset: DatasetRef | None = None
    evaluation_dataset: DatasetRef | None = None
    threads: int = 1
    # The process-local fields (metadata "local") stay in the process that made the context: a
    # step process makes its own (to_wire).
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("cvopt.pass"), metadata={"local": True})
    report_progress: Callable[[float], None] = field(default=lambda fraction: None, metadata={"local": True})
    check_cancelled: Callable[[], None] = field(default=lambda: None, metadata={"local": True})
    # Files shared across one tenant's jobs in the object store (a TensorRT timing cache per GPU
    # and version): fetch_shared(key, dest) -> found?, store_shared(key, path), under
    # ``shared_prefix`` (the tenant's). None outside the runner.
    fetch_shared: Callable[[str, Path], bool] | None = field(default=None, metadata={"local": True})
    store_shared: Callable[[str, Path], None] | None = field(default=None, metadata={"local": True})
    shared_prefix: str = ""

    # -- on the wire to a step process (worker.step_process) ---------------------------------------
    # One definition that walks dataclasses.fields, so that a field added above travels without
    # being listed again; a value JSON cannot carry fails loudly at json.dumps.

    def to_wire(self) -> dict[str, Any]:
        """Every field but the process-local ones, as JSON values. The step process makes those
        itself (from_wire's ``local``): its logger, its progress pipe, its store's fetch_shared and
        store_shared; check_cancelled stays a no-op there, as the parent kills it on a cancel."""
        return {f.name: self.value_to_wire(getattr(self, f.name)) for f in fields(self) if not f.metadata.get("local")}

    @classmethod
    def from_wire(cls, data: dict[str, Any], **local: Any) -> PassContext:
        """The context that to_wire wrote, with the process-local fields ``local`` added."""
        hints = typing.get_type_hints(cls)
        wired = {
            f.name: cls.value_from_wire(hints[f.name], data[f.name]) for f in fields(cls) if not f.metadata.get("local")
        }
        return cls(**wired, **local)

    @staticmethod
    def value_to_wire(value: Any) -> Any:
        """A value as JSON: dataclasses (ArtifactRef, DatasetRef) field by field, paths as strings,
        pydantic models (Preprocessing) dumped, containers item by item; the rest as it is."""
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: PassContext.value_to_wire(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json")
        if isinstance(value, (list, tuple)):
            return [PassContext.value_to_wire(v) for v in value]
        if isinstance(value, dict):
            return {k: PassContext.value_to_wire(v) for k, v in value.items()}
        return value

    @staticmethod
    def value_from_wire(hint: Any, value: Any) -> Any:
        """value_to_wire undone, as the type ``hint`` (a field's annotation) says."""
        origin = typing.get_origin(hint)
        if value is None:
            return None
        if origin in (typing.Union, types.UnionType):
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            return PassContext.value_from_wire(hint, value)
        if origin is list:
            (item,) = typing.get_args(hint)
            return [PassContext.value_from_wire(item, v) for v in value]
        if is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            return hint(**{f.name: PassContext.value_from_wire(hints[f.name], value[f.name]) for f in fields(hint)})
        if hint is Path:
            return Path(value)
        if hasattr(hint, "model_validate"):
            return hint.model_validate(value)
        return value


@dataclass
class PassResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    # None for analysis passes (benchmark, evaluate): the chain's current artifact stays.
    artifact: Path | None = None
    format: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Pass(PassSpec, ABC):
    """The implementation of one spec (core.steps): ``class ExportOnnx(ExportOnnxSpec, Pass)`` adds ``run``
    and its helpers, nothing of the spec. One module per pass in worker/passes/, listed in
    worker.passes.registry; the spec's ``version`` is the number in every cache key of the pass."""

    @abstractmethod
    def run(self, ctx: PassContext, source: ArtifactRef, config: PassConfig) -> PassResult: ...
