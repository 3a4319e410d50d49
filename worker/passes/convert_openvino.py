"""convert_openvino: an ONNX model or a torch.export program (.pt2) to OpenVINO IR for x86 CPUs.

``ov.convert_model`` reads either; ``ov.save_model`` writes the IR with FP32 or FP16-compressed
weights (FP16 weights are decompressed at load: half the file, the same compute). The artifact is
one file, a zip of ``model.xml`` + ``model.bin`` and nothing else, written with fixed timestamps and
member order so that the same IR always has the same sha256.

Nothing is handed back unverified: the archive is loaded the way benchmark and evaluate load it
(worker.runtime, in the configured inference precision) and compared with its source on the job's
images (random inputs without a dataset), at the job's batch: an IR whose inputs are fixed at the job's
shapes (static_shape) takes that batch only. OpenVINO computes in bf16 on CPUs that have it unless told
otherwise; the precision the compiled model really used is measured and recorded, and the floor is
that precision's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from core.errors import PassError
from core.formats import OPENVINO_IR
from core.steps.convert_openvino import DEFAULT_MIN_SNR_DB, ConvertOpenvinoConfig, ConvertOpenvinoSpec
from worker.openvino_ir import fix_input_shapes, read_source, save_ir_archive
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult


class ConvertOpenvino(ConvertOpenvinoSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: ConvertOpenvinoConfig) -> PassResult:
        import openvino as ov

        model = read_source(source)
        static_shape = fix_input_shapes(model, ctx.input_spec) if config.static_shape else None
        ctx.report_progress(0.3)
        target = ctx.work_dir / f"model.{config.weights}.openvino.zip"
        weights_bytes = save_ir_archive(model, ctx.work_dir, target, compress_to_fp16=config.weights == "fp16")
        ctx.check_cancelled()

        meta = {
            "inference_precision": config.inference_precision,
            "weights": config.weights,
            "runtime": "openvino",
            "static_shape": static_shape,
        }
        artifact = ArtifactRef(name=target.name, format=OPENVINO_IR, path=target, meta=meta)
        verification, precision = _verify(ctx, config, source, artifact)
        ctx.report_progress(0.95)
        metrics = {
            "source_format": source.format,
            "weights": config.weights,
            "inference_precision": precision,
            "inference_precision_hint": config.inference_precision,
            "openvino": ov.get_version(),
            "size_bytes": target.stat().st_size,
            "weights_bytes": weights_bytes,
            "static_shape": static_shape,
            "verification": verification,
        }
        # "fp32" (the recommendation's lossless float conversion) only when asked for: "auto" may
        # compute in bf16 on the worker that measures it, whatever it computed in here.
        lossless = config.weights == "fp32" and config.inference_precision == "f32" and precision == "f32"
        meta["precision"] = "fp32" if lossless else f"{config.weights} weights, {precision} compute"
        return PassResult(artifact=target, format=OPENVINO_IR, metrics=metrics, meta=meta)


def _verify(
    ctx: PassContext, config: ConvertOpenvinoConfig, source: ArtifactRef, artifact: ArtifactRef
) -> tuple[dict[str, Any], str]:
    """Run the archive as the measuring steps will and its source side by side; refuse it under the
    floor of the precision it computed in. (verification facts, that precision)."""
    from worker.metrics.fidelity import Fidelity
    from worker.runtime import load_runner, runtime_info

    ir = load_runner(artifact, threads=ctx.threads)
    precision = str(runtime_info(artifact, threads=ctx.threads)["inference_precision"])
    reference = load_runner(source, threads=ctx.threads)
    inputs, feeds_iter = _verify_feeds(ctx, config)
    outputs: list[Fidelity] = []
    for feeds in feeds_iter:
        ctx.check_cancelled()
        want, got = reference(feeds), ir(feeds)
        if len(got) != len(want) or any(np.shape(g) != np.shape(w) for g, w in zip(got, want, strict=False)):
            raise PassError(
                f"the OpenVINO IR gives outputs of shapes {[np.shape(g) for g in got]}, its source "
                f"{[np.shape(w) for w in want]}",
                code="openvino_mismatch",
            )
        outputs = outputs or [Fidelity() for _ in want]
        for fidelity, g, w in zip(outputs, got, want, strict=True):
            fidelity.add(np.asarray(g, np.float64), np.asarray(w, np.float64))
    results = [f.result() for f in outputs]
    floor = config.min_snr_db if config.min_snr_db is not None else DEFAULT_MIN_SNR_DB.get(precision, 20.0)
    verification = {
        "inputs": inputs,
        "samples": outputs[0].samples if outputs else 0,
        "snr_db": min(r["snr_db"] for r in results),
        "worst_channel_snr_db": min(r["worst_channel_snr_db"] for r in results),
        "cosine": min(r["cosine"] for r in results),
        "min_snr_db": floor,
        "inference_precision": precision,
    }
    if not verification["snr_db"] >= floor:  # also refuses a NaN
        raise PassError(
            f"the OpenVINO IR does not match its source: output SNR {verification['snr_db']:.1f} dB < {floor:g} dB "
            f"(computing in {precision}, weights {config.weights})",
            code="openvino_mismatch",
            details=verification,
        )
    return verification, precision


def _verify_feeds(ctx: PassContext, config: ConvertOpenvinoConfig) -> tuple[str, Iterator[dict[str, np.ndarray]]]:
    """("dataset" or "random", the inputs): the job's images at the model's batch size when it has
    any and one input, else random inputs."""
    from worker.data import iter_batches, sample_feeds

    dataset = ctx.evaluation_dataset or ctx.calibration_dataset
    if dataset is not None and dataset.num_samples and len(ctx.input_spec) == 1:
        spec = ctx.input_spec[0]
        fixed = int(spec["shape"][0])
        total = min(config.verify_samples, dataset.num_samples)
        total = max(fixed, total - total % fixed)
        batches = iter_batches(dataset, spec, ctx.preprocessing, batch_size=fixed, limit=total)
        return "dataset", ({spec["name"]: x} for x, _ in batches)
    fixed = max(int(ctx.input_spec[0]["shape"][0]), 1) if ctx.input_spec else 1
    count = max(1, config.verify_samples // fixed)
    return "random", (sample_feeds(ctx.input_spec, seed=i) for i in range(count))
