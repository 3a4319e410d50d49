"""The wire format: one schema family per resource. ORM rows never define it."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from core.models import JobStatus, StepStatus
from core.tasks import DEFAULT_TOLERANCE


def check_name(value: str) -> str:
    """A name a user gives (job, model, dataset, API key) is stored as text and shown in pages and
    logs: no control characters (Postgres refuses NUL in text; a newline forges a log line)."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ValueError(f"must not contain control characters (found {bad!r})")
    return value


Name = Annotated[str, Field(max_length=200), AfterValidator(check_name)]  # 200: the columns' size


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = Field(default_factory=dict)


class TensorSpec(BaseModel):
    name: str
    # None or a string (a symbolic name such as "batch") marks a dimension the file leaves open.
    shape: list[int | str | None] | None
    dtype: str


# -- models ------------------------------------------------------------------------------------


class ModelRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    filename: str
    format: str
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    details: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class ModelsRead(BaseModel):
    data: list[ModelRead]
    count: int


# -- datasets ----------------------------------------------------------------------------------


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    filename: str
    format: str
    sha256: str
    size_bytes: int
    num_samples: int
    labeled: bool
    num_classes: int | None
    class_names: list[str] | None
    label_type: str | None = Field(
        default=None,
        description="classes (class folders, npz y), boxes (YOLO txt or COCO JSON), or null when unlabeled",
    )
    sample_shape: list[int]
    layout: str
    created_at: datetime


class DatasetsRead(BaseModel):
    data: list[DatasetRead]
    count: int


# -- jobs --------------------------------------------------------------------------------------


class Preprocessing(BaseModel):
    """How dataset images become model inputs. ``.npz`` arrays are taken as model inputs as
    they are (only cast and, if needed, transposed to the model's layout)."""

    model_config = ConfigDict(extra="forbid")

    resize: int | None = Field(
        default=None,
        gt=0,
        description="Resize the shorter side to this, then center-crop; "
        "default: resize straight to the model's input size.",
    )
    scale: float = Field(default=1 / 255, gt=0, description="Pixel values are multiplied by this first.")
    mean: list[float] | None = Field(default=None, description="Default: ImageNet for 3 channels, 0 for 1.")
    std: list[float] | None = Field(default=None, description="Default: ImageNet for 3 channels, 1 for 1.")
    channel_order: Literal["RGB", "BGR"] = "RGB"
    letterbox: bool = Field(
        default=False,
        description="Scale keeping the aspect ratio until the image fits the input, then pad the "
        "rest with grey (114), centred: how YOLO models are fed. Box labels follow the same mapping.",
    )

    @model_validator(mode="after")
    def _one_resize(self) -> Preprocessing:
        if self.letterbox and self.resize is not None:
            raise ValueError("give resize (shorter side, then a centre crop) or letterbox, not both")
        return self

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("std values must be positive")
        return v


TaskName = Literal["classification", "detection", "segmentation"]


class DetectionOptions(BaseModel):
    """How a detector's outputs are read for measuring (decode + NMS run in the worker, in numpy)."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["auto", "yolo", "yolo_objectness", "post_nms"] = Field(
        default="auto",
        description="yolo: one raw head (N, 4+C, A) or (N, A, 4+C); yolo_objectness: (N, A, 5+C); post_nms: "
        "boxes (N, K, 4) xyxy, scores (N, K), labels (N, K) [, count]. auto: from the output shapes.",
    )
    box_format: Literal["xywh", "xyxy"] = Field(default="xywh", description="Raw heads' boxes, in input pixels.")
    conf_threshold: float = Field(default=0.25, ge=0, le=1, description="Detections kept for agreement with FP32.")
    iou_threshold: float = Field(default=0.45, gt=0, le=1, description="NMS IoU.")
    max_detections: int = Field(default=300, ge=1, le=10_000)
    min_class_channel_snr_db: float = Field(
        default=15.0,
        ge=-100,
        le=200,
        description="A raw head's every class channel (objectness included) must keep this SNR against FP32 "
        "for an artifact to meet the tolerance: F1 can stay 1.0 while INT8 moves a 0.83 score to 0.47.",
    )


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="A registered step, e.g. export_onnx, quantize_int8, benchmark.")
    config: dict[str, Any] = Field(default_factory=dict)
    optional: bool = Field(
        default=False,
        description="A candidate: when the step refuses its result (an error with a code, e.g. int8_over_tolerance) "
        "or runs out of memory, the step ends failed with the reason and the job goes on without its artifact. "
        "Preset auto marks its candidates so.",
    )


Target = Literal["x86-cpu", "arm-cpu", "nvidia-gpu"]


class Constraints(BaseModel):
    """What the recommended artifact must meet; the recommendation is the fastest that meets them all."""

    model_config = ConfigDict(extra="forbid")

    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1, description="The job's tolerance on the task's metric (same as max_accuracy_drop)."
    )
    max_latency_ms: float | None = Field(
        default=None, gt=0, le=3_600_000, description="p50 at batch 1 on the worker (its threads, its CPU or GPU)."
    )
    max_size_mb: float | None = Field(
        default=None, gt=0, le=1_000_000, description="The artifact's file, in MB (10^6)."
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    preset: str | None = None
    steps: list[StepSpec | str] | None = Field(default=None, min_length=1, max_length=32)
    calibration_dataset_id: str | None = None
    evaluation_dataset_id: str | None = None
    # One shape for a single-input model, or {input name: shape}.
    input_shape: list[int] | dict[str, list[int]] | None = None
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    overrides: dict[str, dict[str, Any]] | None = Field(
        default=None, description='With a preset: config changes by step name, e.g. {"distill": {"epochs": 10}}.'
    )
    name: Name | None = None
    task: Literal["auto", "classification", "detection", "segmentation"] = Field(
        default="auto",
        description="What the model does; it decides the metric every gate, search and report uses. auto: "
        "from the model's outputs ((N, C): classification; a YOLO head or boxes/scores/labels: detection; "
        "(N, C, H, W) maps: segmentation).",
    )
    max_accuracy_drop: float = Field(
        default=DEFAULT_TOLERANCE,
        ge=0,
        le=1,
        description="The job's tolerance on the task's metric: top-1 accuracy (agreement with FP32 without "
        "labels), mAP@0.5:0.95 (F1 of detections against FP32's without labels) or pixel agreement. An artifact "
        "that loses more is never recommended.",
    )
    detection: DetectionOptions = Field(default_factory=DetectionOptions)
    target: Target | None = Field(
        default=None,
        description="Where the artifact will run: x86-cpu (ONNX Runtime, OpenVINO), arm-cpu (LiteRT with XNNPACK, "
        "ONNX Runtime; measured on the worker's CPU as a stand-in), nvidia-gpu (TensorRT, AOTInductor FP16). Steps "
        "that make an artifact for another target are a 422; preset auto builds the target's candidates "
        "(default x86-cpu).",
    )
    allow_training: bool = Field(
        default=False,
        description="Preset auto may add candidates that train the model (quantization-aware INT8, distilled from "
        "the original on the calibration images: minutes per epoch on a CPU worker); off, they are left out.",
    )
    constraints: Constraints | None = Field(
        default=None,
        description="What the recommendation must meet: max_accuracy_drop, max_latency_ms (batch 1 on the worker), "
        "max_size_mb. When nothing meets them the job still succeeds; the recommendation is null, says why and "
        "names the closest candidate.",
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POSTed this job's JSON when it ends, signed with the tenant's webhook secret "
        '(header Cvopt-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">); retried with back-off.',
    )

    @model_validator(mode="after")
    def _preset_or_steps(self) -> JobCreate:
        if (self.preset is None) == (self.steps is None):
            raise ValueError("give exactly one of 'preset' or 'steps'")
        if self.overrides is not None and self.preset is None:
            raise ValueError("overrides apply to a preset's steps; with steps, give each step's config")
        given = self.constraints.max_accuracy_drop if self.constraints else None
        if given is not None and "max_accuracy_drop" in self.model_fields_set and given != self.max_accuracy_drop:
            raise ValueError(
                f"max_accuracy_drop {self.max_accuracy_drop:g} and constraints.max_accuracy_drop {given:g} differ: "
                "give one"
            )
        return self

    def tolerance(self) -> float:
        """The job's max_accuracy_drop, from constraints or the top-level field."""
        given = self.constraints.max_accuracy_drop if self.constraints else None
        return self.max_accuracy_drop if given is None else given

    def step_specs(self) -> list[StepSpec] | None:
        if self.steps is None:
            return None
        return [s if isinstance(s, StepSpec) else StepSpec(name=s) for s in self.steps]


class JobError(BaseModel):
    code: str
    message: str
    step: str | None = None


class StepRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    name: str
    config: dict[str, Any]
    queue: str | None = Field(default=None, description="Where the step must run, when not the job's queue.")
    optional: bool = Field(default=False, description="A candidate whose failure does not fail the job.")
    status: StepStatus
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None = None
    metrics: dict[str, Any]
    message: str | None
    artifact_id: str | None


class WebhookAttempt(BaseModel):
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float


class WebhookRead(BaseModel):
    url: str
    event: str
    status: Literal["pending", "delivered", "failed", "refused"] = Field(
        description="refused: the URL is not allowed (see the attempt's error); it is not retried"
    )
    attempts: list[WebhookAttempt]
    next_attempt_at: datetime | None
    finished_at: datetime | None


class JobRead(BaseModel):
    id: str
    name: str | None
    status: JobStatus
    model_id: str
    preset: str | None
    calibration_dataset_id: str | None
    evaluation_dataset_id: str | None
    queue: str
    input_spec: list[TensorSpec]
    preprocessing: dict[str, Any]
    task: str = Field(default="auto", description="auto when the outputs did not say; the worker decides then.")
    max_accuracy_drop: float = DEFAULT_TOLERANCE
    detection: dict[str, Any] | None = None
    target: Target | None = None
    constraints: Constraints | None = None
    progress: float
    current_step: str | None
    attempts: int
    cancel_requested: bool
    steps: list[StepRead]
    error: JobError | None
    log_tail: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    waiting_for: str | None = Field(
        default=None,
        description='A queued job that no live worker can take says what it waits for, e.g. "gpu worker"; '
        "it fails after CVOPT_NO_WORKER_TIMEOUT_SECONDS.",
    )
    report_url: str | None = Field(
        default=None, description="The job's HTML report; works without the API key until it expires."
    )
    webhook_url: str | None = None
    webhook: WebhookRead | None = Field(default=None, description="The webhook's delivery, once the job ended.")
    recommended: Recommendation | None = Field(
        default=None,
        description="Which artifact to ship (as in the job's report); null until the job succeeded, "
        "and always null in the job list (GET /v1/jobs), which does not build each job's report: read the job "
        "(GET /v1/jobs/{id}) or its report for it.",
    )


class JobsRead(BaseModel):
    data: list[JobRead]
    count: int


class ArtifactRead(BaseModel):
    id: str
    name: str
    step: str
    step_index: int
    format: str
    size_bytes: int
    sha256: str
    meta: dict[str, Any]
    url: str
    expires_at: datetime


class ArtifactsRead(BaseModel):
    data: list[ArtifactRead]
    count: int


Verdict = Literal[
    "original", "meets_tolerance", "slower_than_float", "over_tolerance", "misses_constraint", "not_measured"
]


class ReportEntry(BaseModel):
    name: str
    step: str | None = Field(description="The step that made it; null for the original model.")
    format: str
    label: str = Field(default="", description='What it is and what runs it, e.g. "OpenVINO INT8 (NNCF)".')
    size_bytes: int
    size_ratio: float = Field(description="size / original size")
    latency_ms: dict[str, float] | None = Field(description="p50/p90/p99 at batch 1 on the worker")
    speedup: float | None = Field(description="original p50 / this p50")
    throughput: dict[str, float] | None = Field(
        default=None, description="images/s at the largest benchmarked batch: {batch, images_per_s, p50_ms}"
    )
    throughput_error: str | None = Field(
        default=None,
        description="why the largest batch asked for could not be measured (e.g. the model's batch axis is fixed "
        "at 1); throughput is then from a smaller batch, or null",
    )
    memory_mib: float | None = Field(default=None, description="worker memory added by loading and running it")
    runtime: dict[str, Any] | None = Field(
        default=None,
        description="what measured it: onnxruntime, torch, litert (with its delegate and the ops that fell "
        "back to the interpreter), tensorrt or torch on cuda (with the GPU's name)",
    )
    accuracy: dict[str, float] | None = None
    fidelity: dict[str, float] | None = None
    metric: dict[str, Any] | None = Field(
        default=None,
        description="The task's metric from the evaluate step: {name (top1, top1_agreement, map50_95, f1_vs_float, "
        "pixel_agreement), value, reference (the original's), drop (reference - value), higher_is_better}",
    )
    verdict: Verdict | None = Field(
        default=None,
        description="original (the upload); meets_tolerance; slower_than_float (slower at batch 1 than the fastest "
        "float model: the original or a lossless export); over_tolerance (loses more of the task's metric than "
        "the job's max_accuracy_drop); misses_constraint (within the tolerance, over the job's max_latency_ms or "
        "max_size_mb); not_measured (no latency, or no accuracy for an artifact that changes the weights)",
    )
    verdict_reason: str | None = Field(default=None, description="The verdict's numbers, in one line.")
    pareto: bool | None = Field(
        default=None,
        description="On the front of (batch-1 p50, size, the task's metric): no other entry is at least as good on "
        "all three and better on one. Null when it was not both timed and judged (a lossless float conversion "
        "counts as judged, with the original's metric).",
    )


class RecommendedMetric(BaseModel):
    name: str
    value: float
    drop: float


class RecommendationMetrics(BaseModel):
    p50_ms: float = Field(description="batch 1 on the worker")
    speedup: float | None = Field(description="original p50 / this p50; null when the original was not timed")
    size_bytes: int
    size_ratio: float = Field(description="size / original size")
    metric: RecommendedMetric | None = Field(
        description="The task's metric; null when accuracy was not measured (a lossless float conversion)"
    )


class Recommendation(BaseModel):
    artifact: str | None = Field(
        description="The artifact to ship: the fastest one measured on the worker that meets the job's tolerance on "
        "the task's metric and its constraints (ties within 2% of p50 go to the smaller file). Null when nothing "
        "beats the original, or when nothing meets the constraints (closest then names the nearest miss)."
    )
    reason: str = Field(description="Why, in one line; when null, why nothing beats the original.")
    metrics: RecommendationMetrics | None = None
    tolerance: float = Field(description="The job's max_accuracy_drop.")
    accuracy_verified: bool = Field(
        description="False when the job has no evaluate step: only lossless float conversions were considered."
    )
    closest: str | None = Field(
        default=None,
        description="When no artifact meets the job's constraints: the one within the tolerance that comes "
        "closest (the least over its worst constraint), never recommended silently.",
    )
    missed: list[str] = Field(
        default_factory=list, description="The constraints the closest candidate misses, with its numbers."
    )


class FailedCandidate(BaseModel):
    index: int
    step: str
    label: str
    code: str | None
    message: str


class LeftOut(BaseModel):
    step: str
    config: dict[str, Any]
    reason: str


class ReportRead(BaseModel):
    job_id: str
    status: JobStatus
    recommended: Recommendation | None = Field(default=None, description="Null until the job succeeded.")
    task: str = Field(default="auto", description="The task whose metric decided the verdicts.")
    machine: dict[str, Any] | None
    target: Target | None = None
    constraints: Constraints | None = None
    latency_note: str | None = Field(
        default=None, description="Where the latencies were measured when that is not the target itself."
    )
    entries: list[ReportEntry]
    front: list[str] = Field(
        default_factory=list, description="The entries on the Pareto front (pareto true), fastest first."
    )
    failed_candidates: list[FailedCandidate] = Field(
        default_factory=list, description="Optional steps (candidates) that ended failed, and why; no artifact."
    )
    left_out: list[LeftOut] = Field(
        default_factory=list, description="Candidates of preset auto the job could not build, and why."
    )


# -- tenants and keys ----------------------------------------------------------------------------


class Quotas(BaseModel):
    """Null: the service-wide default (CVOPT_QUOTA_*); 0: no limit."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_jobs: int | None = Field(
        default=None, ge=0, le=1_000_000, description="Queued plus running jobs at one time."
    )
    max_storage_bytes: int | None = Field(
        default=None, ge=0, le=2**62, description="Bytes of models and datasets kept."
    )
    max_uploads_per_minute: int | None = Field(
        default=None, ge=0, le=1_000_000, description="Model and dataset uploads in any 60 s."
    )


class TenantCreate(Quotas):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TenantUsage(BaseModel):
    active_jobs: int
    storage_bytes: int
    uploads_last_minute: int


class TenantRead(BaseModel):
    id: str
    name: str
    created_at: datetime
    quotas: Quotas = Field(description="The tenant's own quotas; null: the service default.")
    effective_quotas: dict[str, int] = Field(description="What applies now (0: no limit).")
    usage: TenantUsage | None = None


class TenantCreated(TenantRead):
    webhook_secret: str = Field(description="Signs this tenant's webhooks; also at GET /v1/tenant/webhook-secret.")


class WebhookSecret(BaseModel):
    webhook_secret: str


class TenantsRead(BaseModel):
    data: list[TenantRead]
    count: int


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: str = Field(min_length=1, max_length=32)
    name: Name = Field(default="default", min_length=1)
    admin: bool = Field(default=False, description="May create tenants and keys.")


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant_id: str
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None


class ApiKeysRead(BaseModel):
    data: list[ApiKeyRead]
    count: int


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="Shown once; only its hash is stored.")
