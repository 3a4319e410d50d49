"""convert_tflite: a model into a ``.tflite`` for Android/iOS.

PyTorch models (``.pt2``, torchvision state_dicts, pruned/distilled ones) go through litert-torch:

- ``fp32``: the model as is.
- ``fp16``: FP32 compute with FP16 weights (half the file; GPU delegates and ARM CPUs with FP16
  arithmetic run them natively), by ai-edge-quantizer's weight-only float casting.
- ``int8``: full integer: PT2E static quantization (litert-torch's quantizer: symmetric int8
  weights, per channel by default, int8 activations) calibrated on the job's calibration set;
  the model's inputs and outputs become int8 with a scale and zero point, as phone runtimes
  expect.

Keras ``.keras`` and TensorFlow SavedModel uploads go through ``tf.lite.TFLiteConverter`` with
``Optimize.DEFAULT``: ``fp32``, ``dynamic`` (dynamic-range: int8 weights, float activations
quantized on the fly), ``fp16`` (FP16 weights) and ``int8`` (full integer with the job's
calibration images as the representative dataset; ``io_dtype`` picks int8, uint8 or float32
inputs/outputs).

Nothing is handed back unverified. With a dataset (evaluation, else calibration), an fp16, dynamic or
int8 .tflite is judged like every other artifact: run in LiteRT on up to ``validation_samples`` images
against its source with the INT8 gate's validation set and tallies (worker.quantization.gate,
worker.metrics.tasks: top-1 or top-1 agreement, mAP or post-NMS F1 with the class-channel floor,
pixel agreement), within the job's ``max_accuracy_drop`` (or the step's). An int8 that misses becomes
mixed precision (worker.tflite_mixed: ai-edge-quantizer static INT8 of the FP32 .tflite with the ops
that add the most error kept float, their number doubling up to ``max_float_ops``); meta["precision"]
is then "mixed" ("int8" when ai-edge-quantizer's own all-INT8 meets it), and a miss after that fails
the step with ``int8_over_tolerance`` and every attempt. Its I/O stays int8 with a scale and zero
point wherever the ops at the graph's ends are quantized (metrics.io says, as for every .tflite).

Then the kept .tflite is compared with its source output channel by output channel on the job's
images (random inputs without a dataset): an SNR floor per precision catches a broken conversion
(int8 judged on the task: 0 dB, noise as strong as the output; INT8 noise on a classifier's
near-zero logits leaves single-digit SNRs while top-1 holds). The step reports how much of the
graph XNNPACK took and which op types fell back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import PassError
from core.formats import KERAS, TF_FORMATS, TFLITE
from core.steps.convert_tflite import (
    DEFAULT_MIN_SNR_DB,
    TASK_JUDGED_INT8_SNR_DB,
    ConvertTfliteConfig,
    ConvertTfliteSpec,
)
from worker.metrics.tasks import meets_tolerance
from worker.passes.base import ArtifactRef, Pass, PassContext, PassResult
from worker.quantization.gate import ValidationSet, attempt_entry
from worker.runtime import BatchRunner, load_runner


class ConvertTflite(ConvertTfliteSpec, Pass):
    def run(self, ctx: PassContext, source: ArtifactRef, config: ConvertTfliteConfig) -> PassResult:
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
        import litert_torch

        from worker.data import sample_tensors
        from worker.torch_models import load_module

        if len(ctx.input_spec) != 1:
            raise PassError("TFLite conversion takes single-input models", code="unsupported_model")
        if source.format in TF_FORMATS:
            return self._from_tensorflow(ctx, source, config)
        if config.precision == "dynamic" or config.io_dtype != "auto":
            raise PassError(
                "precision 'dynamic' and io_dtype are for TensorFlow uploads; PyTorch models take "
                "fp32, fp16 or int8 (int8 inputs/outputs)",
                code="invalid_step_config",
            )
        module = load_module(source)
        args = sample_tensors(ctx.input_spec)
        target = ctx.work_dir / f"model.{config.precision}.tflite"
        convert_module = litert_torch.to_channel_last_io(module, args=[0]) if config.io_layout == "nhwc" else module
        convert_args = tuple(a.permute(0, 2, 3, 1).contiguous() for a in args) if config.io_layout == "nhwc" else args
        calibration_samples = 0
        try:
            if config.precision == "int8":
                edge, calibration_samples = self._int8(ctx, config, convert_module, convert_args)
            else:
                edge = litert_torch.convert(convert_module, convert_args)
            ctx.report_progress(0.6)
            if config.precision == "fp16":
                float_path = ctx.work_dir / "model.fp32.tflite"
                edge.export(str(float_path))
                _cast_weights_fp16(float_path, target)
            else:
                edge.export(str(target))
        except PassError:
            raise
        except Exception as exc:  # litert-torch raises many types for ops it cannot lower
            raise PassError(
                "litert-torch could not convert the model: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}",
                code="conversion_failed",
            ) from exc
        ctx.check_cancelled()

        # Verify in the interpreter a phone would use, against the model converted.
        return _verified(
            ctx,
            config,
            target,
            source=source,
            layout=config.io_layout,
            reference=_torch_reference(module),
            shape=tuple(args[0].shape),
            against="the model it was converted from",
            calibration_samples=calibration_samples,
            extra={"io_layout": config.io_layout},
            float_model=lambda path: litert_torch.convert(convert_module, convert_args).export(str(path)),
        )

    def _from_tensorflow(self, ctx: PassContext, source: ArtifactRef, config: ConvertTfliteConfig) -> PassResult:
        from worker.data import iter_batches
        from worker.tf_models import (
            extract_saved_model,
            import_tensorflow,
            load_keras,
            tf_runner,
        )

        if config.io_layout != "nchw":
            raise PassError(
                "io_layout is for PyTorch models; a TensorFlow model keeps its own layout", code="invalid_step_config"
            )
        tf = import_tensorflow()

        def new_converter():
            if source.format == KERAS:
                return tf.lite.TFLiteConverter.from_keras_model(load_keras(source))
            return tf.lite.TFLiteConverter.from_saved_model(
                str(extract_saved_model(source)), signature_keys=[source.meta.get("signature") or "serving_default"]
            )

        converter = new_converter()
        spec = ctx.input_spec[0]
        calibration_samples = 0
        if config.precision != "fp32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if config.precision == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        if config.precision == "int8":
            dataset = ctx.calibration_dataset
            total = min(config.num_calibration_samples, dataset.num_samples)

            def representative():
                nonlocal calibration_samples
                for x, _ in iter_batches(dataset, spec, ctx.preprocessing, batch_size=1, limit=total):
                    ctx.check_cancelled()
                    calibration_samples += 1
                    ctx.report_progress(0.5 * calibration_samples / total)
                    yield [x.astype(np.float32)]

            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io_type = {"auto": tf.int8, "int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[config.io_dtype]
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
        elif config.io_dtype not in ("auto", "float32"):
            raise PassError("integer inputs/outputs need precision int8", code="invalid_step_config")
        try:
            blob = converter.convert()
        except Exception as exc:  # the converter raises ConverterError and friends
            raise PassError(
                f"TensorFlow's TFLite converter failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}",
                code="conversion_failed",
            ) from exc
        target = ctx.work_dir / f"model.{config.precision}.tflite"
        target.write_bytes(blob)
        ctx.check_cancelled()
        reference = tf_runner(source)
        return _verified(
            ctx,
            config,
            target,
            source=source,
            layout="source",
            reference=lambda x: reference({spec["name"]: x})[0],
            shape=tuple(spec["shape"]),
            against="the TensorFlow model",
            calibration_samples=calibration_samples,
            extra={"converter": "tf.lite.TFLiteConverter", "tensorflow": tf.__version__},
            float_model=lambda path: path.write_bytes(new_converter().convert()),
        )

    def _int8(self, ctx: PassContext, config: ConvertTfliteConfig, module, args):
        import litert_torch
        import torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e

        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=config.per_channel)
        )
        fixed = int(ctx.input_spec[0]["shape"][0])
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            graph = torch.export.export(module, args, dynamic_shapes=({0: batch},)).module()
            baked = None
        except Exception:  # the batch is baked into the graph: calibrate at its own batch size
            graph = torch.export.export(module, args).module()
            baked = fixed
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        dataset = ctx.calibration_dataset
        total = min(config.num_calibration_samples, dataset.num_samples)
        if total == 0:
            raise PassError("the calibration dataset holds no samples", code="empty_dataset")
        seen = 0
        with torch.no_grad():
            for x, real in calibration_batches(
                dataset,
                ctx.input_spec[0],
                ctx.preprocessing,
                batch_size=config.batch_size,
                baked_batch=baked,
                limit=total,
            ):
                ctx.check_cancelled()
                tensor = torch.from_numpy(x)
                if config.io_layout == "nhwc":
                    tensor = tensor.permute(0, 2, 3, 1).contiguous()
                prepared(tensor)
                seen += real
                ctx.report_progress(0.4 * seen / total)
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        return litert_torch.convert(converted, args, quant_config=QuantConfig(pt2e_quantizer=quantizer)), seen


def calibration_batches(
    dataset, spec: dict, preprocessing, *, batch_size: int, baked_batch: int | None, limit: int
) -> Iterator[tuple[np.ndarray, int]]:
    """(inputs, how many of them are real samples) over every one of the first ``limit`` samples.
    A graph with a dynamic batch takes the last partial batch at its own size; one whose batch is
    baked in gets it padded with its own samples repeated (a repeated sample adds nothing to the
    range a min/max observer records, and little to a histogram's)."""
    from worker.data import iter_batches

    step = baked_batch or batch_size
    for x, _ in iter_batches(dataset, spec, preprocessing, batch_size=step, limit=limit):
        real = len(x)
        if baked_batch and real < baked_batch:
            x = x[np.arange(baked_batch) % real]
        yield x, real


def _verified(
    ctx: PassContext,
    config: ConvertTfliteConfig,
    target: Path,
    *,
    source: ArtifactRef,
    layout: str,
    reference,
    shape: tuple,
    against: str,
    calibration_samples: int,
    extra: dict,
    float_model: Callable[[Path], Any] | None,
) -> PassResult:
    """Judge the .tflite on the task's metric against its source when the job has images (an int8 miss turns
    into the mixed-precision search), then run the one kept in LiteRT (XNNPACK) against its source, refuse it
    below the SNR floors (a broken conversion), and describe it: fidelity, delegate coverage, I/O types."""
    from worker.litert import TfliteRunner, delegate_coverage, io_details

    precision, task_report = config.precision, None
    task_judged = precision != "fp32" and (ctx.evaluation_dataset or ctx.calibration_dataset) is not None
    if task_judged:
        target, precision, task_report = _on_task(ctx, config, target, source, layout, float_model)
    runner = TfliteRunner(target, threads=ctx.threads, layout=layout)
    fidelity = _compare(ctx, config, reference, runner, shape)
    ctx.report_progress(0.95)
    verification, warnings = _judge(config, fidelity, against, task_judged=task_judged)
    coverage = delegate_coverage(target, ctx.threads)
    metrics = {
        **extra,
        "precision": precision,
        "size_bytes": target.stat().st_size,
        **({"task_metric": task_report} if task_report else {}),
        "verification": verification,
        "interpreter": coverage,
        "io": io_details(target),
    }
    if calibration_samples:
        metrics["calibration_samples"] = calibration_samples
    if coverage["ops_fallback"]:
        warnings.append(
            f"{coverage['ops_fallback']} of {coverage['ops']} ops run outside XNNPACK "
            f"({', '.join(coverage['fallback_op_types'])})"
        )
    if task_report and task_report.get("warning"):
        warnings.append(task_report["warning"])
    if warnings:
        metrics["warning"] = "; ".join(warnings)
    return PassResult(
        artifact=target,
        format=TFLITE,
        metrics=metrics,
        meta={"precision": precision, "io_layout": layout, "runtime": "litert"},
    )


class _SourceValidation(ValidationSet):
    """The INT8 gate's validation set (worker.quantization.gate) with the source model (any format the
    runtimes load: .pt2, state dict, Keras, SavedModel) as the reference and .tflite files as candidates."""

    def __init__(self, ctx: PassContext, source: ArtifactRef, io_layout: str, samples: int) -> None:
        self.io_layout = io_layout
        spec = ctx.input_spec[0]
        fixed = int(spec["shape"][0])
        super().__init__(ctx, spec, source, batch_size=max(fixed, 16 - 16 % fixed), samples=samples, fixed_batch=fixed)

    def runner(self, model: ArtifactRef | Path) -> BatchRunner:
        from worker.litert import TfliteRunner

        if isinstance(model, ArtifactRef):
            run = load_runner(model, threads=self.ctx.threads)
        else:
            run = TfliteRunner(model, threads=self.ctx.threads, layout=self.io_layout)
        return BatchRunner(run, self.spec["name"], self.fixed_batch)


def _on_task(
    ctx: PassContext,
    config: ConvertTfliteConfig,
    target: Path,
    source: ArtifactRef,
    layout: str,
    float_model: Callable[[Path], Any] | None,
) -> tuple[Path, str, dict[str, Any]]:
    """(the .tflite to ship, its precision, the report): ``target`` when its task metric is within the
    tolerance; for int8 that misses, the mixed-precision search's pick; a miss after that fails the step."""
    validation = _SourceValidation(ctx, source, layout, config.validation_samples)
    tolerance = config.max_accuracy_drop
    if tolerance is None:
        tolerance = float(ctx.task_options.get("max_accuracy_drop", 0.01))
    metric = validation.judge(target)
    route = "litert_torch_pt2e" if source.format not in TF_FORMATS else "tf_lite_converter"
    report: dict[str, Any] = {
        "task": validation.task,
        "metric": metric["name"],
        "validated_on": validation.source,
        "samples": validation.samples,
        "tolerance": tolerance,
        "attempts": [{"route": route, "precision": config.precision, **attempt_entry(metric)}],
    }
    if validation.note:
        report["warning"] = validation.note
    precision = config.precision
    if not meets_tolerance(metric, tolerance):
        if precision != "int8":
            raise PassError(
                f"the {precision} .tflite misses the tolerance: {_metric_text(metric, tolerance)}",
                code="tflite_mismatch",
                details={**report, "metric": metric},
            )
        if not (config.mixed_precision and float_model):
            raise PassError(
                f"the full INT8 .tflite misses the tolerance (mixed_precision off): {_metric_text(metric, tolerance)}",
                code="int8_over_tolerance",
                details={**report, "metric": metric},
            )
        target, metric, precision = _mixed(ctx, config, validation, float_model, tolerance, report)
    report.update(value=metric["value"], reference=metric["reference"], drop=metric["drop"])
    if metric.get("floor"):
        report["floor"] = metric["floor"]
    return target, precision, report


def _mixed(
    ctx: PassContext,
    config: ConvertTfliteConfig,
    validation: _SourceValidation,
    float_model: Callable[[Path], Any],
    tolerance: float,
    report: dict[str, Any],
) -> tuple[Path, dict[str, Any], str]:
    """ai-edge-quantizer static INT8 of the FP32 .tflite with the most damaging ops kept float
    (worker.tflite_mixed); (the pick, its metric, "int8" when no op stayed float else "mixed")."""
    from worker.tflite_mixed import mixed_precision

    ctx.log.info("full INT8 misses the tolerance: searching mixed precision")
    float_path = ctx.work_dir / "model.fp32.tflite"
    float_model(float_path)
    fixed = validation.fixed_batch
    total = min(config.num_calibration_samples, ctx.calibration_dataset.num_samples)
    calibration = []
    for x, _ in calibration_batches(
        ctx.calibration_dataset, validation.spec, ctx.preprocessing, batch_size=fixed, baked_batch=fixed, limit=total
    ):
        calibration.append(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if validation.io_layout == "nhwc" else x)
    path, metric, mixed = mixed_precision(
        float_path,
        ctx.work_dir,
        calibration=calibration,
        judge=validation.judge,
        tolerance=tolerance,
        max_float_ops=config.max_float_ops,
        threads=ctx.threads,
        check_cancelled=ctx.check_cancelled,
    )
    report["attempts"].extend(mixed.pop("attempts"))
    report["mixed_precision"] = mixed
    if not mixed["tolerance_met"]:
        raise PassError(
            f"INT8 misses the tolerance even with the {mixed.get('max_float_ops', 0)} ops that add the most error "
            f"kept float (with the ops feeding them); the best attempt kept {len(mixed['float_scopes'])} ops float: "
            f"{_metric_text(metric, tolerance)}",
            code="int8_over_tolerance",
            details={**report, "metric": metric},
        )
    precision = "mixed" if mixed["kept_float"] else "int8"
    chosen = ctx.work_dir / f"model.{precision}.tflite"
    path.replace(chosen)
    return chosen, metric, precision


def _metric_text(metric: dict[str, Any], tolerance: float) -> str:
    floor = metric.get("floor")
    floor_text = f", {floor['name']} {floor['value']:.1f} (floor {floor['min']:g})" if floor else ""
    return (
        f"{metric['name']} {metric['value']:.4f} against {metric['reference']:.4f} for the source, drop "
        f"{metric['drop']:.4f} (tolerance {tolerance:g}){floor_text}"
    )


def _judge(config: ConvertTfliteConfig, fidelity: dict, against: str, *, task_judged: bool) -> tuple[dict, list[str]]:
    """Refuse a .tflite below the floors; warn about output channels INT8 noise swamps. Judged on the task's
    metric, an int8 .tflite's floor only catches a broken conversion (TASK_JUDGED_INT8_SNR_DB)."""
    floor = config.min_snr_db
    if floor is None:
        floor = (
            TASK_JUDGED_INT8_SNR_DB
            if task_judged and config.precision == "int8"
            else DEFAULT_MIN_SNR_DB[config.precision]
        )
    verification = dict(fidelity, min_snr_db=floor, min_channel_snr_db=config.min_channel_snr_db)
    failures = []
    if fidelity["snr_db"] < floor:
        failures.append(f"output SNR {fidelity['snr_db']:.1f} dB < {floor:g} dB")
    if config.min_channel_snr_db is not None and fidelity["worst_channel_snr_db"] < config.min_channel_snr_db:
        failures.append(
            f"worst output channel SNR {fidelity['worst_channel_snr_db']:.1f} dB < {config.min_channel_snr_db:g} dB"
        )
    if failures:
        raise PassError(
            f"the {config.precision} .tflite does not match {against}: {'; '.join(failures)} "
            f"(top-1 agreement {fidelity['top1_agreement']:.3f})",
            code="tflite_mismatch",
            details=verification,
        )
    warnings = []
    if fidelity["worst_channel_snr_db"] < 10:
        warnings.append(
            f"an output channel keeps only {fidelity['worst_channel_snr_db']:.1f} dB SNR (the whole output "
            f"{fidelity['snr_db']:.1f} dB): harmless for a classifier's near-zero logits, not for a score "
            "channel next to larger outputs (set min_channel_snr_db to require it)"
        )
    return verification, warnings


def _cast_weights_fp16(source, target) -> None:
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    recipe = recipe_manager.RecipeManager()
    recipe.add_weight_only_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        num_bits=16,
        algorithm_key=AlgorithmName.FLOAT_CASTING,
    )
    result = quantizer.Quantizer(str(source), recipe.get_quantization_recipe()).quantize(enable_progress_report=False)
    result.export_model(str(target), overwrite=True)


def _torch_reference(module):
    import torch

    def run(x):
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()

    return run


def _compare(ctx: PassContext, config: ConvertTfliteConfig, reference, runner, shape: tuple) -> dict:
    """Top-1 agreement and the worst output channel's SNR of the .tflite against the model it
    was converted from (``reference``: numpy batch -> numpy output), on the job's images when it
    has any (random inputs otherwise)."""
    from worker.data import iter_batches
    from worker.metrics.tasks import ClassificationTally

    spec = ctx.input_spec[0]
    fixed = int(spec["shape"][0])
    dataset = ctx.evaluation_dataset or ctx.calibration_dataset
    if dataset is not None:
        total = min(config.verify_samples, dataset.num_samples)
        total = max(fixed, total - total % fixed)
        batches = (x for x, _ in iter_batches(dataset, spec, ctx.preprocessing, batch_size=fixed, limit=total))
        source = "dataset"
    else:
        rng = np.random.default_rng(0)
        count = max(1, config.verify_samples // fixed)
        batches = (rng.standard_normal(shape).astype(np.float32) for _ in range(count))
        source = "random"
    tally = ClassificationTally(labeled=False)
    for x in batches:
        tally.add([runner({spec["name"]: x})[0]], [np.asarray(reference(x))])
    return {"inputs": source, "samples": tally.n, **tally.result()["fidelity"]}
