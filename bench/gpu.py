"""GPU benchmark: ResNet-50 / ResNet-18 / MobileNetV3-Small at batch 1 and 32 on one NVIDIA GPU.

Variants, timed with CUDA events, interleaved round by round (median of rounds):
  fp32 eager          the model as users run it
  fp16 eager          .half(), channels-last
  aoti fp16           the service's compile_gpu artifact (AOTInductor package), loaded from disk
  fp16 compiled       the fallback artifact: FP16 ExportedProgram + torch.compile at load
                      (CUDA graphs, "reduce-overhead")
  tensorrt fp16       the service's build_tensorrt engine, where `tensorrt` imports

Runs on the lent GPU machine's own Python and torch (not this repo's venv): the service's
passes are used where they import there, and every failure is recorded, not fatal, so that a
partial table still comes back. Writes JSON after each model to --out.

    bash bench/gpu.sh                      # on a GPU machine; JSON under $OUT
    python bench/gpu.py --device cpu --models resnet18 --batches 1 --rounds 2   # logic check on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def timed(fn, x, *, iters: int, device: str) -> float:
    """Mean ms per call over ``iters`` calls, CUDA events on a GPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - t0) * 1000 / iters


def build_variants(name: str, device: str, batches: list[int], work: Path, log: dict) -> dict:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    variants = {"fp32 eager": model}
    half = torch.float16 if device == "cuda" else torch.bfloat16
    low = torchvision.models.get_model(name, weights=None).eval().to(device)
    low.load_state_dict(model.state_dict())
    low = low.to(dtype=half, memory_format=torch.channels_last)

    def eager_low(x, _m=low):
        return _m(x.to(half).contiguous(memory_format=torch.channels_last)).float()

    variants[f"{'fp16' if device == 'cuda' else 'bf16'} eager"] = eager_low

    # The service's own steps, on a state_dict upload of this model.
    try:
        from core.schemas import Preprocessing
        from worker.passes.base import ArtifactRef, PassContext
        from worker.passes.registry import get_pass
        from worker.runtime import load_runner

        weights = work / f"{name}.pt"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
        original = ArtifactRef(f"{name}.pt", "state_dict", weights, meta={"architecture": name})
        spec = [{"name": "x", "shape": [1, 3, 224, 224], "dtype": "float32"}]

        def run_step(step: str, **config):
            cls = get_pass(step)
            step_dir = work / f"{name}-{step}-{config.get('package', '')}"
            step_dir.mkdir(exist_ok=True)
            ctx = PassContext(
                work_dir=step_dir, original=original, artifacts=[], input_spec=spec, preprocessing=Preprocessing()
            )
            t0 = time.perf_counter()
            result = cls().run(ctx, original, cls.Config(**config))
            log.setdefault("steps", {})[f"{name} {step} {config}"] = {
                "seconds": round(time.perf_counter() - t0, 1),
                **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool))},
            }
            return ArtifactRef(result.artifact.name, result.format, result.artifact, meta=dict(result.meta))

        def as_callable(ref):
            runner = load_runner(ref, device=device)
            inner = getattr(runner, "module", None)
            return inner if inner is not None else (lambda x, _r=runner: _r({"x": x.cpu().numpy()}))

        precision = "fp16" if device == "cuda" else "bf16"
        for label, package in ((f"aoti {precision}", "aoti"), (f"{precision} compiled at load", "exported_program")):
            try:
                ref = run_step(
                    "compile_gpu", precision=precision, device=device, package=package, max_batch=max(batches)
                )
                if package == "aoti" and ref.format != "aoti_package":
                    log.setdefault("errors", {})[f"{name} {label}"] = "fell back to an ExportedProgram"
                    continue
                variants[label] = as_callable(ref)
            except Exception as exc:  # record and go on: a partial table is still a result
                log.setdefault("errors", {})[f"{name} {label}"] = f"{type(exc).__name__}: {exc}"[:500]
        import importlib.util

        if device == "cuda" and importlib.util.find_spec("tensorrt"):
            try:
                onnx_ref = run_step("export_onnx")
                cls = get_pass("build_tensorrt")
                ctx = PassContext(
                    work_dir=work, original=original, artifacts=[], input_spec=spec, preprocessing=Preprocessing()
                )
                result = cls().run(ctx, onnx_ref, cls.Config(precision="fp16"))
                engine = load_runner(ArtifactRef("e", result.format, result.artifact, meta=dict(result.meta)))
                variants["tensorrt fp16"] = lambda x, _r=engine: _r({"x": x.cpu().numpy()})
            except Exception as exc:
                log.setdefault("errors", {})[f"{name} tensorrt"] = f"{type(exc).__name__}: {exc}"[:500]
    except ImportError as exc:
        log.setdefault("errors", {})[f"{name} service passes"] = f"not importable here: {exc}"
    return variants


def bench_model(name: str, device: str, batches: list[int], rounds: int, iters: int, work: Path, log: dict) -> list:
    t0 = time.perf_counter()
    variants = build_variants(name, device, batches, work, log)
    log.setdefault("build_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device=device)
        usable = {}
        with torch.inference_mode():
            for label, fn in variants.items():
                try:
                    for _ in range(3):
                        fn(x)
                    usable[label] = fn
                except Exception as exc:
                    log.setdefault("errors", {})[f"{name} {label} b{batch}"] = f"{type(exc).__name__}: {exc}"[:300]
            samples = {label: [] for label in usable}
            for _ in range(rounds):
                for label, fn in usable.items():
                    samples[label].append(timed(fn, x, iters=iters, device=device))
        base = statistics.median(samples["fp32 eager"])
        for label, values in samples.items():
            ms = statistics.median(values)
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "variant": label,
                    "ms": round(ms, 3),
                    "images_per_s": round(batch * 1000 / ms, 1),
                    "speedup_vs_fp32_eager": round(base / ms, 2),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet50,resnet18,mobilenet_v3_small")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="gpu-bench.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.backends.cudnn.benchmark = True
    machine = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_device": args.device == "cuda",
    }
    log: dict = {"machine": machine, "rows": []}
    print(f"machine: {machine}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                log["rows"] += bench_model(name, args.device, batches, args.rounds, args.iters, Path(tmp), log)
            except Exception:
                log.setdefault("errors", {})[name] = traceback.format_exc()[-1500:]
            Path(args.out).write_text(json.dumps(log, indent=1))
            print_table(log, name)
    print(json.dumps(log.get("errors", {}), indent=1))


def print_table(log: dict, name: str) -> None:
    clock = "CUDA events" if log["machine"].get("cuda_device") else "perf_counter"
    print(f"\n{name} ({log['machine']['device']}, torch {log['machine']['torch']}), median of rounds, {clock}")
    print("| batch | variant | ms | images/s | vs FP32 eager |")
    print("|---:|---|---:|---:|---:|")
    for r in (r for r in log["rows"] if r["model"] == name):
        print(
            f"| {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['images_per_s']:.0f} "
            f"| {r['speedup_vs_fp32_eager']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
