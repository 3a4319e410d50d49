"""The pass contract.

A pass turns (input artifact, typed config, work dir) into (new artifact, metrics). It never
mutates its input and never touches the database or the object store: the runner owns
ordering, progress, caching, uploads and errors. Importing a pass module must stay cheap
(the API imports the registry to validate recipes): heavy libraries are imported in ``run``.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from core.schemas import Preprocessing

# Artifact formats that passes accept and produce.
ONNX = "onnx"
TORCHSCRIPT = "torchscript"
EXPORTED_PROGRAM = "exported_program"
STATE_DICT = "state_dict"  # weights of a named torchvision architecture (ArtifactRef.meta)
TORCH_FORMATS = frozenset({TORCHSCRIPT, EXPORTED_PROGRAM, STATE_DICT})
ALL_MODEL_FORMATS = frozenset({ONNX, TORCHSCRIPT, EXPORTED_PROGRAM, STATE_DICT})
# Deployment artifacts: made by the target steps, never uploaded, and the end of a chain
# (only the measuring steps take them).
TFLITE = "tflite"  # LiteRT flatbuffer (convert_tflite)
TENSORRT_ENGINE = "tensorrt_engine"  # serialized TensorRT engine for one GPU kind (build_tensorrt)
AOTI_PACKAGE = "aoti_package"  # AOTInductor-compiled .pt2 package (compile_gpu)
DEPLOY_FORMATS = frozenset({TFLITE, TENSORRT_ENGINE, AOTI_PACKAGE})
# TensorFlow uploads: converted to TFLite only (by TensorFlow's own converter).
KERAS = "keras"
SAVED_MODEL = "saved_model"
TF_FORMATS = frozenset({KERAS, SAVED_MODEL})
MEASURABLE_FORMATS = ALL_MODEL_FORMATS | DEPLOY_FORMATS | TF_FORMATS

# What a pass may need from the job, checked at POST /v1/jobs.
NEEDS_CALIBRATION = "calibration_dataset"
NEEDS_DATASET = "dataset"  # evaluation dataset, or the calibration one


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


class PassConfig(BaseModel):
    """Base for every pass's config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("cvopt.pass"))
    report_progress: Callable[[float], None] = lambda fraction: None
    check_cancelled: Callable[[], None] = lambda: None
    # Files shared across one tenant's jobs in the object store (a TensorRT timing cache per GPU
    # and version): fetch_shared(key, dest) -> found?, store_shared(key, path), under
    # ``shared_prefix`` (the tenant's). None outside the runner.
    fetch_shared: Callable[[str, Path], bool] | None = None
    store_shared: Callable[[str, Path], None] | None = None
    shared_prefix: str = ""


@dataclass
class PassResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    # None for analysis passes (benchmark, evaluate): the chain's current artifact stays.
    artifact: Path | None = None
    format: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Pass(ABC):
    """Subclasses register themselves by ``name``; one module per pass in worker/passes/."""

    name: ClassVar[str]
    # The pass's code version: part of every cache key, so a change to what the pass makes is
    # bumped here and no earlier result is reused. Every pass declares its own.
    version: ClassVar[int]
    description: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    accepts: ClassVar[frozenset[str]]
    # The format it produces; None for analysis passes that leave the chain's artifact as is.
    produces: ClassVar[str | None]
    needs: ClassVar[frozenset[str]] = frozenset()
    queue: ClassVar[str] = "cpu"
    # For input formats it does not accept: what the user should do instead (shown in the 422).
    format_hints: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if not isinstance(cls.__dict__.get("version"), int):
                raise TypeError(f"pass {cls.name!r} declares no version (an int; it enters the cache key)")
            from worker.passes.registry import register

            register(cls)

    def output_format(self, input_format: str) -> str:
        return self.produces or input_format

    def step_queue(self, config: PassConfig) -> str:
        """Where this step must run: cpu (any worker), gpu (any GPU worker) or gpu.<kind>."""
        return self.queue

    def requirements(self, config: PassConfig) -> frozenset[str]:
        """What this step needs from the job with this config (checked at POST /v1/jobs)."""
        return self.needs

    @abstractmethod
    def run(self, ctx: PassContext, source: ArtifactRef, config: PassConfig) -> PassResult: ...
