"""The calibration batches, streamed to ORT's calibrator a chunk at a time."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.passes.base import DatasetRef, PassContext
from worker.runtime import pad_batch

# Calibration reports progress up to this share of the step; the gate takes the rest.
CALIBRATION_PROGRESS = 0.6


def stride(batches: int) -> int:
    """Calibration is collected this many batches at a time: ORT merges ranges (and histograms)
    between chunks, so memory is bounded by the chunk, not the dataset."""
    return max(d for d in range(1, min(batches, 8) + 1) if batches % d == 0)


class CalibrationReader:
    """ORT's CalibrationDataReader (it checks for ``get_next``): ``total`` samples in batches of
    ``batch_size``, ORT choosing the chunk of batches with ``set_range``. A model fixed at batch B
    gets its last, short batch padded with copies of its last sample: a repeat leaves min/max ranges
    as they are and weighs one sample twice in a histogram, and no sample is dropped. ``seen``
    counts the real samples."""

    def __init__(
        self,
        ctx: PassContext,
        dataset: DatasetRef,
        spec: dict[str, Any],
        *,
        batch_size: int,
        total: int,
        fixed_batch: int | None,
    ) -> None:
        self.ctx, self.dataset, self.spec = ctx, dataset, spec
        self.batch_size, self.total, self.fixed_batch = batch_size, total, fixed_batch
        self.n_batches = -(-total // batch_size)
        self.seen = 0
        self.set_range(0, self.n_batches)

    def __len__(self) -> int:
        return self.n_batches

    def set_range(self, start_index: int, end_index: int) -> None:
        from worker.data import iter_batches

        first = start_index * self.batch_size
        limit = min(end_index * self.batch_size, self.total) - first
        self.batches = (
            x
            for x, _ in iter_batches(
                self.dataset, self.spec, self.ctx.preprocessing, batch_size=self.batch_size, offset=first, limit=limit
            )
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.ctx.check_cancelled()
        x = next(self.batches, None)
        if x is None:
            return None
        self.seen += len(x)
        self.ctx.report_progress(CALIBRATION_PROGRESS * self.seen / self.total)
        return {self.spec["name"]: pad_batch(x, self.fixed_batch) if self.fixed_batch else x}


def job_calibration_reader(ctx, input_name: str, fixed_batch: int | None, config) -> CalibrationReader:
    """The job's calibration images for a graph whose input is ``input_name`` (``fixed_batch``: its batch
    when fixed), in the batches and number ``config`` (a QuantizeInt8Config) asks: what quantize_int8 and
    quantize_qat both calibrate on."""
    dataset = ctx.calibration_dataset
    assert dataset is not None  # the step's spec needs one: POST /v1/jobs checked it
    return CalibrationReader(
        ctx,
        dataset,
        dict(ctx.input_spec[0], name=input_name),
        batch_size=fixed_batch or config.batch_size,
        total=min(config.num_calibration_samples, dataset.num_samples),
        fixed_batch=fixed_batch,
    )
