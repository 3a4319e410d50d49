"""How close a candidate's raw outputs are to its float original's: SNR and cosine, on the whole
output and per channel. One definition for every measuring step (evaluate, the INT8 gate and its
per-node probe, the GPU compile checks), so that a number means the same wherever it is reported.

Non-finite outputs never read as agreement: noise that is NaN or infinite is an SNR of -inf, and
a sample whose cosine is not finite counts 0."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def snr_of_sums(signal: float, noise: float) -> float:
    """10·log10(signal / noise) from summed squares: +inf for no noise, -inf for non-finite noise
    (a NaN or inf output agrees with nothing)."""
    if not math.isfinite(noise):
        return float("-inf")
    if noise <= 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def snr_db(reference, got) -> float:
    """SNR of ``got`` against ``reference`` over the whole tensor (inf when they agree exactly)."""
    ref = np.asarray(reference, np.float64)
    noise = float(((np.asarray(got, np.float64).reshape(ref.shape) - ref) ** 2).sum())
    return snr_of_sums(float((ref**2).sum()), noise)


def channel_axis(shape: Sequence[int]) -> int:
    """The axis that holds an output's channels: 1 for (N, C) scores and (N, C, H, W) maps; for a
    3-D tensor the shorter of axes 1 and 2, since detection heads put their 4+C channels first or
    last and the anchors on the other (a per-anchor SNR says nothing: most anchors score near zero
    in both models). 0 for a tensor without a batch axis to skip."""
    if len(shape) == 3:
        return 1 if shape[1] <= shape[2] else 2
    return 1 if len(shape) >= 2 else 0


def _channels_last_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """(samples x positions, channels) of a batch-first tensor."""
    x = np.asarray(x, np.float64)
    if x.ndim < 2:
        return x.reshape(-1, 1)
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


class ChannelSums:
    """Summed squares of the reference and of the error per channel, batch after batch (memory does
    not grow with the set)."""

    def __init__(self) -> None:
        self.signal: np.ndarray | None = None
        self.noise: np.ndarray | None = None

    def add(self, reference: np.ndarray, got: np.ndarray, axis: int | None = None) -> None:
        reference = np.asarray(reference)
        axis = channel_axis(reference.shape) if axis is None else axis
        ref = _channels_last_rows(reference, axis)
        err = _channels_last_rows(np.asarray(got).reshape(reference.shape), axis) - ref
        signal, noise = (ref**2).sum(0), (err**2).sum(0)
        self.signal = signal if self.signal is None else self.signal + signal
        self.noise = noise if self.noise is None else self.noise + noise

    def snrs(self, channels: slice = slice(None)) -> list[float]:
        """Each channel's SNR (of those selected)."""
        if self.signal is None:
            return []
        return [
            snr_of_sums(float(s), float(n)) for s, n in zip(self.signal[channels], self.noise[channels], strict=True)
        ]

    def pooled_snr(self, channels: slice = slice(None)) -> float | None:
        """One SNR over the selected channels together."""
        if self.signal is None or not self.signal[channels].size:
            return None
        return snr_of_sums(float(self.signal[channels].sum()), float(self.noise[channels].sum()))


def sample_cosines(got: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each sample's cosine similarity with its reference: 1 when both are all zero, 0 when only one
    is, and 0 when it is not finite (an output with NaN or inf in it)."""
    out = np.asarray(got, np.float64).reshape(len(got), -1)
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
        both_zero = ~out.any(axis=1) & ~ref.any(axis=1)
        cosine = np.where(norms > 0, (out * ref).sum(1) / np.where(norms > 0, norms, 1.0), 0.0)
    cosine = np.where(both_zero, 1.0, cosine)
    return np.where(np.isfinite(cosine), cosine, 0.0)


class Fidelity:
    """Whole-output agreement with the original, in running sums: mean cosine per sample, SNR, and
    the worst channel's SNR along the output's channel axis (a tail of one output can collapse
    under INT8 while the whole tensor still looks fine)."""

    def __init__(self) -> None:
        self.samples = 0
        self.cosine_sum = 0.0
        # Per channel; the whole output's SNR is their pooled sums.
        self.channels = ChannelSums()

    def add(self, got: np.ndarray, reference: np.ndarray) -> None:
        reference = np.asarray(reference)
        got = np.asarray(got).reshape(reference.shape)
        self.samples += len(reference)
        self.cosine_sum += float(sample_cosines(got, reference).sum())
        self.channels.add(reference, got)

    def result(self) -> dict[str, float]:
        return {
            "cosine": self.cosine_sum / self.samples,
            "snr_db": self.channels.pooled_snr(),
            "worst_channel_snr_db": min(self.channels.snrs()),
        }
