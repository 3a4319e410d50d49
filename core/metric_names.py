"""How people read the task metrics' names: one table for the report, the HTML page and the CLI.
No imports beyond the standard library, so the client can use it without the service's
dependencies (SQLAlchemy, pydantic)."""

from __future__ import annotations

METRIC_LABELS = {
    "top1": "top-1",
    "top1_agreement": "top-1 agreement",
    "map50_95": "mAP@0.5:0.95",
    "map50": "mAP@0.5",
    "f1_vs_float": "F1 vs FP32",
    "pixel_agreement": "pixel agreement",
    "worst_class_channel_snr_db": "worst class-channel SNR",
}


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name)
