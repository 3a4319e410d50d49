"""GPU benchmark: ResNet-50, ResNet-18, MobileNetV3-Large and a YOLOv8n-style detector at batch 1
and 32 on one NVIDIA GPU, in under four minutes.

Variants, timed with CUDA events, interleaved round by round (median of rounds):
  fp32 eager                the model as users run it
  fp16 eager channels-last  .half(), channels-last
  aoti fp16                 the service's compile_gpu artifact: an AOTInductor package, checked in a
                            child process by the step, loaded from disk here
  fp16 compiled at load     the step's fallback artifact: the FP16 ExportedProgram, compiled at load
                            with torch.compile (CUDA graphs, "reduce-overhead")
Each row also gives the SNR of the variant's first output against FP32 eager on the timed batch.

It runs on the GPU machine's own Python, which has torch but not this repo's venv: the models are
bench/gpu_models.py (torchvision's definitions, torch only) and the compile step is
worker.gpu_compile (torch only), the code the compile_gpu step runs. Weights are random; the
BatchNorm statistics are taken from a few random batches so that activations have a trained
model's scale (identity statistics let them grow through the residual stack, past FP16's range).

Two phases, so that no timing shares the CPU with a compile:
  1. every model compiles in its own process, all at once (Inductor is CPU-bound; the machine has
     many cores): both artifacts, and one call of the compiled-at-load fallback at each batch, which
     leaves Inductor's on-disk caches warm;
  2. one process times the models one after another, loading the artifacts as the runtime does.
Each model's results are written to --out as soon as they exist, so a run cut short still returns
a partial table; --budget-s stops starting work that cannot finish in time.

    bash bench/gpu.sh                      # on a GPU machine; JSON under $OUT
    python bench/gpu.py --device cpu --models tiny --batches 1,2 --rounds 1 --iters 1   # logic check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from worker.gpu_compile import compile_model, first_output, load_aoti, load_exported  # noqa: E402
from worker.metrics.fidelity import snr_db  # noqa: E402


def _gpu_models():
    spec = importlib.util.spec_from_file_location("gpu_models", ROOT / "bench" / "gpu_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_models = _gpu_models()
DEFAULT_MODELS = "resnet50,resnet18,mobilenet_v3_large,yolov8n"
# Seconds the timing phase keeps for itself: the compile phase gives up on what is not done by then.
TIMING_RESERVE_S = 75


def timed(fn, x, *, iters: int, device: str) -> float:
    """Mean ms per call over ``iters`` calls: CUDA events on a GPU, perf_counter elsewhere."""
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


def realistic_model(name: str, device: str):
    """(the model in eval mode on ``device`` with BatchNorm statistics from random batches, its
    per-image input shape)."""
    torch.manual_seed(0)
    model, shape = gpu_models.build(name)
    model = model.to(device)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, *shape, device=device))
    return model.eval(), shape


# -- phase 1: one model's artifacts, in its own process ------------------------------------------


def compile_one(name: str, device: str, precision: str, batches: list[int], work: Path) -> dict:
    """Both compile_gpu artifacts of ``name``, and the fallback's compile at load warmed at each batch."""
    report: dict = {"model": name, "errors": {}}
    t0 = time.perf_counter()
    model, shape = realistic_model(name, device)
    torch.save(model.state_dict(), work / "weights.pt")
    example = (torch.randn(2, *shape, device=device),)
    with torch.no_grad():
        reference = first_output(model(*example)).float().cpu().numpy()
    for package in ("aoti", "exported_program"):
        step_dir = work / package
        step_dir.mkdir(exist_ok=True)
        t1 = time.perf_counter()
        try:
            compiled = compile_model(
                model,
                example,
                reference,
                work_dir=step_dir,
                precision=precision,
                max_batch=max(max(batches), 2),
                package=package,
                device=device,
                warn=lambda msg, _p=package: report["errors"].__setitem__(f"{_p} fallback", msg),
            )
            report[package] = {
                "path": str(compiled.path),
                "format": compiled.format,
                "seconds": round(time.perf_counter() - t1, 1),
                "metrics": compiled.metrics,
            }
        except Exception as exc:  # record and go on: a partial table is still a result
            report["errors"][package] = f"{type(exc).__name__}: {exc}"[:800]
    fallback = report.get("exported_program")
    if fallback:
        t1 = time.perf_counter()
        try:
            run = load_exported(Path(fallback["path"]), device)
            with torch.inference_mode():
                for batch in batches:
                    run(torch.randn(batch, *shape, device=device))
            fallback["compile_at_load_seconds"] = round(time.perf_counter() - t1, 1)
        except Exception as exc:
            report["errors"]["compiled at load"] = f"{type(exc).__name__}: {exc}"[:800]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def start_compiles(models: list[str], args, work: Path) -> dict[str, subprocess.Popen]:
    """One compile process per model, the first (ResNet-50, the headline number) at the highest
    CPU priority, each next one a little lower, so that a tight budget cuts the last ones first."""
    procs = {}
    for rank, name in enumerate(models):
        model_dir = work / name
        model_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            __file__,
            "--compile-one",
            name,
            "--device",
            args.device,
            "--precision",
            args.precision,
            "--batches",
            args.batches,
            "--work",
            str(model_dir),
        ]
        log = open(model_dir / "compile.log", "w")  # noqa: SIM115 - closed with the process
        procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), preexec_fn=lambda n=3 * rank: os.nice(n)
        )
    return procs


def wait_compile(name: str, proc: subprocess.Popen, work: Path, deadline: float) -> dict:
    """The compile report of ``name``; stops the process at the deadline."""
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"errors": {"compile": "not finished within the budget"}}
    report_path = work / name / "compile.json"
    if proc.returncode != 0 or not report_path.exists():
        tail = (work / name / "compile.log").read_text(errors="replace")[-800:]
        return {"errors": {"compile": f"exit {proc.returncode}: {tail}"}}
    return json.loads(report_path.read_text())


# -- phase 2: timing ---------------------------------------------------------------------------------


def variants_of(name: str, compiled: dict, device: str, precision: str, log: dict) -> tuple[dict, tuple]:
    """{label: callable on an FP32 NCHW batch}, and the per-image input shape."""
    model, shape = gpu_models.build(name)
    weights = Path(compiled["work"]) / "weights.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:  # the compile process died before saving: the same seed gives the same model
        model, shape = realistic_model(name, device)
    model = model.to(device).eval()
    variants = {"fp32 eager": model}
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    low = gpu_models.build(name)[0].to(device).eval()
    low.load_state_dict(model.state_dict())
    low = low.to(dtype=dtype, memory_format=torch.channels_last)

    def eager_low(x, _m=low):
        return first_output(_m(x.to(dtype).contiguous(memory_format=torch.channels_last))).float()

    variants[f"{precision} eager channels-last"] = eager_low
    for label, key, loader in (
        (f"aoti {precision}", "aoti", load_aoti),
        (f"{precision} compiled at load", "exported_program", lambda p: load_exported(p, device)),
    ):
        artifact = compiled.get(key)
        if not artifact:
            continue
        if key == "aoti" and artifact["format"] != "aoti_package":
            continue  # the step fell back; the fallback is the next row
        t0 = time.perf_counter()
        try:
            variants[label] = loader(Path(artifact["path"]))
            log.setdefault("load_seconds", {})[f"{name} {label}"] = round(time.perf_counter() - t0, 1)
        except Exception as exc:
            log.setdefault("errors", {})[f"{name} {label} load"] = f"{type(exc).__name__}: {exc}"[:500]
    return variants, shape


def time_model(name: str, compiled: dict, args, log: dict) -> list[dict]:
    device, batches = args.device, [int(b) for b in args.batches.split(",")]
    variants, shape = variants_of(name, compiled, device, args.precision, log)
    rows = []
    for batch in batches:
        torch.manual_seed(batch)
        x = torch.rand(batch, *shape, device=device)
        usable, outputs = {}, {}
        with torch.inference_mode():
            for label, fn in variants.items():
                try:
                    for _ in range(3):
                        out = fn(x)
                    outputs[label] = first_output(out).float().cpu().numpy()
                    usable[label] = fn
                except Exception as exc:
                    log.setdefault("errors", {})[f"{name} {label} b{batch}"] = f"{type(exc).__name__}: {exc}"[:300]
            samples: dict[str, list[float]] = {label: [] for label in usable}
            for _ in range(args.rounds):
                for label, fn in usable.items():
                    samples[label].append(timed(fn, x, iters=args.iters, device=device))
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
                    "snr_db_vs_fp32": round(min(snr_db(outputs["fp32 eager"], outputs[label]), 999.0), 1),
                }
            )
    return rows


def machine(device: str) -> dict:
    facts = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_device": device == "cuda",
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts["compute_capability"] = f"{props.major}.{props.minor}"
        facts["memory_gib"] = round(props.total_memory / 1024**3, 1)
    return facts


def print_table(log: dict, name: str) -> None:
    clock = "CUDA events" if log["machine"].get("cuda_device") else "perf_counter"
    print(f"\n{name} ({log['machine']['device']}, torch {log['machine']['torch']}), median of rounds, {clock}")
    print("| batch | variant | ms | images/s | vs FP32 eager | SNR vs FP32 (dB) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in (r for r in log["rows"] if r["model"] == name):
        print(
            f"| {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['images_per_s']:.0f} "
            f"| {r['speedup_vs_fp32_eager']:.2f}x | {r['snr_db_vs_fp32']:g} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fp16 on a GPU, fp32 on a CPU (a logic check)")
    parser.add_argument("--budget-s", type=float, default=220.0, help="stop starting work after this")
    parser.add_argument("--out", default="gpu-bench.json")
    parser.add_argument("--compile-one", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    batches = [int(b) for b in args.batches.split(",")]
    torch.backends.cudnn.benchmark = True
    if args.compile_one:
        work = Path(args.work)
        report = compile_one(args.compile_one, args.device, args.precision, batches, work)
        (work / "compile.json").write_text(json.dumps(report, indent=1))
        return

    started = time.monotonic()
    deadline = started + args.budget_s
    models = args.models.split(",")
    log: dict = {"machine": machine(args.device), "precision": args.precision, "rows": [], "compile": {}}
    print(f"machine: {log['machine']}", flush=True)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Inductor's caches shared by the compile processes and the timing one (warm loads).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
        procs = start_compiles(models, args, work)
        for name in models:  # phase 1: all compiles at once; a report as each one ends
            report = wait_compile(name, procs[name], work, deadline - TIMING_RESERVE_S)
            report["work"] = str(work / name)
            log["compile"][name] = report
            out.write_text(json.dumps(log, indent=1))
        log["compile_phase_seconds"] = round(time.monotonic() - started, 1)
        print(f"compiled in {log['compile_phase_seconds']} s", flush=True)
        for name in models:  # phase 2: one model at a time, nothing else running
            if time.monotonic() > deadline:
                log.setdefault("errors", {})[name] = "not timed: over the budget"
                continue
            try:
                log["rows"] += time_model(name, log["compile"][name], args, log)
            except Exception:
                log.setdefault("errors", {})[name] = traceback.format_exc()[-1500:]
            out.write_text(json.dumps(log, indent=1))
            print_table(log, name)
    log["seconds"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(log, indent=1))
    errors = {
        **log.get("errors", {}),
        **{f"{n} {k}": v for n, c in log["compile"].items() for k, v in c["errors"].items()},
    }
    print(json.dumps(errors, indent=1))
    print(f"done in {log['seconds']} s; json: {out}")


if __name__ == "__main__":
    main()
