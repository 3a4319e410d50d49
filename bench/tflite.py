"""TFLite benchmark: the service's convert_tflite step (FP32, FP16 weights, full INT8) against
torch eager FP32 and ONNX Runtime FP32, on the CPU, at batch 1 (what a phone app runs).

Per variant: file size and batch-1 latency as ratios to torch eager FP32 (variants interleaved
round by round, median of rounds, the same thread count everywhere; LiteRT with its default
XNNPACK delegate), the ops XNNPACK did not take, accuracy on held-out MNIST digits for a residual
CNN trained on mlxtend's 5,000 digits, top-1 agreement and logits SNR against FP32 for torchvision
models with random weights. This measures x86 (no phone here): it shows what the conversion keeps
and costs, not phone latency.

    .venv/bin/pip install mlxtend && .venv/bin/python -m bench.tflite
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.quantization import (
    Timer,
    cpu_name,
    measure,
    mnist_splits,
    to_rgb224,
    train_mnist_cnn,
)
from core.errors import PassError
from core.model_formats import inspect_model
from core.schemas import Preprocessing
from worker.metrics.fidelity import snr_db
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass


def bench_model(name, module, calib_x, eval_x, eval_y, work: Path, threads: int, rounds: int):
    import torch

    from worker.litert import TfliteRunner, delegate_coverage

    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calibration.npz", x=calib_x)
    shape = list(calib_x.shape[1:])
    calibration = DatasetRef(work / "calibration.npz", "npz", False, len(calib_x), "NCHW", shape)
    pt2 = work / f"{name}.pt2"
    torch.export.save(torch.export.export(module, (torch.from_numpy(calib_x[:1]),)), pt2)
    original = ArtifactRef(pt2.name, "exported_program", pt2)
    spec = [dict(i, shape=[1, *shape]) for i in inspect_model(pt2).inputs]  # as the service reads the upload

    def step(pass_name, sub, **config):
        d = work / sub
        d.mkdir(exist_ok=True)
        ctx = PassContext(
            work_dir=d,
            original=original,
            artifacts=[],
            input_spec=spec,
            preprocessing=Preprocessing(),
            calibration_dataset=calibration,
            threads=threads,
        )
        cls = get_pass(pass_name)
        t0 = time.perf_counter()
        result = cls().run(ctx, original, cls.Config(**config))
        return result, time.perf_counter() - t0

    timer = Timer(threads)
    onnx_result, _ = step("export_onnx", "onnx")
    input_name = __import__("onnx").load(str(onnx_result.artifact)).graph.input[0].name
    runners = {
        "torch eager FP32": timer.torch_runner(module),
        "ORT FP32 (export_onnx)": timer.onnx_runner(onnx_result.artifact, input_name),
    }
    sizes = {
        "torch eager FP32": onnx_result.artifact.stat().st_size,
        "ORT FP32 (export_onnx)": onnx_result.artifact.stat().st_size,
    }
    notes, refused = {}, {}
    for precision in ("fp32", "fp16", "int8"):
        label = f"TFLite {precision.upper()} (convert_tflite)"
        try:
            result, seconds = step(
                "convert_tflite", f"tflite-{precision}", precision=precision, num_calibration_samples=256
            )
        except PassError as exc:  # the step's verification refused the file: a row, not a crash
            refused[label] = f"refused by the step's check: {exc.message}"
            continue
        runner = TfliteRunner(result.artifact, threads=threads)
        runners[label] = lambda x, _r=runner: _r({spec[0]["name"]: x})[0]
        sizes[label] = result.artifact.stat().st_size
        coverage = delegate_coverage(result.artifact, threads)
        notes[label] = (
            f"{coverage['ops_delegated']}/{coverage['ops']} ops in XNNPACK"
            + (f", fell back: {', '.join(coverage['fallback_op_types'])}" if coverage["ops_fallback"] else "")
            + f"; converted in {seconds:.0f}s"
        )
    lat1 = measure(runners, eval_x[:1], rounds=rounds, calls=20)
    reference = np.concatenate([runners["torch eager FP32"](eval_x[i : i + 1]) for i in range(len(eval_x))])
    rows = []
    for label, run in runners.items():
        out = np.concatenate([run(eval_x[i : i + 1]) for i in range(len(eval_x))]).astype(np.float64)
        pred = out.argmax(1)
        quality = float((pred == eval_y).mean()) if eval_y is not None else float((pred == reference.argmax(1)).mean())
        rows.append(
            (
                label,
                sizes[label] / sizes["torch eager FP32"],
                lat1[label] / lat1["torch eager FP32"],
                quality,
                snr_db(reference.astype(np.float64), out),
                lat1[label],
                notes.get(label, ""),
            )
        )
    rows += [(label, None, None, None, None, None, reason) for label, reason in refused.items()]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist_cnn,mobilenet_v3_small,resnet18")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")

    import torch
    import torchvision

    x, y, (train, calib, test) = mnist_splits()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; threads {args.threads}; "
        f"rounds {args.rounds} (median); batch 1"
    )
    tmp = Path(tempfile.mkdtemp(prefix="cvopt-tflite-bench-"))
    for name in args.models.split(","):
        t0 = time.time()
        if name == "mnist_cnn":
            module = train_mnist_cnn(x[train], y[train])
            calib_x, eval_x, eval_y, quality = x[calib][:256], x[test], y[test], "accuracy"
        else:
            module = torchvision.models.get_model(name, weights=None).eval()
            calib_x, eval_x, eval_y, quality = (
                to_rgb224(x[calib][:64]),
                to_rgb224(x[test][:64]),
                None,
                "top-1 agreement",
            )
        rows = bench_model(name, module, calib_x, eval_x, eval_y, tmp / name, args.threads, args.rounds)
        print(f"\n{name} ({quality}; {time.time() - t0:.0f}s)")
        print(f"| variant | size | latency b1 | {quality} | logits SNR dB | b1 ms | interpreter |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for label, size, r1, q, snr, ms1, note in rows:
            if size is None:
                print(f"| {label} | - | - | - | - | - | {note} |")
                continue
            print(f"| {label} | {size:.2f}x | {r1:.2f}x | {q:.3f} | {snr:.1f} | {ms1:.2f} | {note} |")


if __name__ == "__main__":
    main()
