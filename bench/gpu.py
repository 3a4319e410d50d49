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

import time

STARTED = time.time()  # the budget counts from here, before torch is imported

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from worker.gpu_compile import (  # noqa: E402
    MIN_SNR_DB,
    batch_norm_statistics_from,
    compile_model,
    export_low_precision,
    first_output,
    load_aoti,
    load_exported,
    torch_dtype,
)
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
# A compile process skips warming the compiled-at-load variant when this close to its deadline.
WARM_UP_S = 20


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
    model = batch_norm_statistics_from(model.to(device), lambda: torch.randn(8, *shape, device=device))
    return model, shape


# -- phase 1: one model's artifacts, in its own process ------------------------------------------


def compile_one(name: str, args, work: Path, deadline: float) -> None:
    """Both compile_gpu artifacts of ``name`` from one export, then the fallback's compile at load
    warmed at each batch; the report goes to ``work/compile.json`` after every stage, so that a
    process stopped at the deadline still hands over what it finished."""
    device, precision = args.device, args.precision
    batches = [int(b) for b in args.batches.split(",")]
    report: dict = {"model": name, "errors": {}}
    t0 = time.perf_counter()
    model, shape = realistic_model(name, device)
    torch.save(model.state_dict(), work / "weights.pt")
    example = (torch.randn(2, *shape, device=device),)
    with torch.no_grad():
        reference = first_output(model(*example)).float().cpu().numpy()
    max_batch = max(max(batches), 2)
    try:
        exported = export_low_precision(model, example, precision=precision, channels_last=True, max_batch=max_batch)
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
    except Exception as exc:
        report["errors"]["export"] = f"{type(exc).__name__}: {exc}"[:800]
        exported = None
    for package in ("aoti", "exported_program") if exported else ():
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
                max_batch=max_batch,
                package=package,
                device=device,
                # No floor here: one run on a lent GPU must time the artifact even if its SNR misses the
                # step's floor; the SNR and whether it meets the floor go in the report.
                min_snr_db=float("-inf"),
                warn=lambda msg, _p=package: report["errors"].__setitem__(f"{_p} fallback", msg),
                exported=exported,
            )
            compiled.metrics.pop("min_snr_db", None)
            report[package] = {
                "path": str(compiled.path),
                "format": compiled.format,
                "seconds": round(time.perf_counter() - t1, 1),
                "metrics": compiled.metrics,
                "meets_the_steps_floor": compiled.metrics["snr_db"] >= MIN_SNR_DB[precision],
            }
        except Exception as exc:  # record and go on: a partial table is still a result
            report["errors"][package] = f"{type(exc).__name__}: {exc}"[:800]
        write_json(work / "compile.json", report)
    fallback = report.get("exported_program")
    if fallback and time.time() > deadline - WARM_UP_S:
        report["errors"]["compiled at load"] = "not warmed: too close to the budget (the timing compiles it cold)"
    elif fallback:
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
    report["done"] = True
    write_json(work / "compile.json", report)


def start_compiles(models: list[str], args, work: Path, deadline: float) -> dict[str, subprocess.Popen]:
    """One compile process per model, each in a session of its own (stopping it stops its children:
    the package check, the C++ compiler), the first (ResNet-50, the headline number) at the highest
    CPU priority and each next one a little lower, so that a tight budget cuts the last ones first."""
    procs = {}
    for rank, name in enumerate(models):
        model_dir = work / name
        model_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["nice", "-n", str(3 * rank), sys.executable, __file__, "--compile-one", name]
        cmd += ["--device", args.device, "--precision", args.precision, "--batches", args.batches]
        cmd += ["--work", str(model_dir), "--deadline-epoch", str(deadline)]
        with open(model_dir / "compile.log", "w") as log:
            procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
            )
    return procs


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the process's whole session: it, or what it left running (its group outlives it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_compile(name: str, proc: subprocess.Popen, work: Path, deadline: float) -> dict:
    """The compile report of ``name`` (what it finished, when it is stopped at the deadline)."""
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        stop(proc)
    report_path = work / name / "compile.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"errors": {}}
    if not report.get("done"):
        tail = (work / name / "compile.log").read_text(errors="replace")[-800:]
        why = "stopped at the budget" if proc.returncode == -signal.SIGKILL else f"exit {proc.returncode}: {tail}"
        report["errors"]["compile"] = f"not finished ({why})"
    return report


def write_json(path: Path, data) -> None:
    """Strict JSON (no NaN or Infinity: a non-finite number is null), written whole or not at all."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


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
    dtype = torch_dtype(precision)
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


def time_model(name: str, compiled: dict, args, log: dict, deadline: float) -> list[dict]:
    device, batches = args.device, [int(b) for b in args.batches.split(",")]
    variants, shape = variants_of(name, compiled, device, args.precision, log)
    errors = log.setdefault("errors", {})
    rows = []
    for batch in batches:
        if time.time() > deadline:
            errors[f"{name} b{batch}"] = "not timed: over the budget"
            continue
        torch.manual_seed(batch)
        x = torch.randn(batch, *shape, device=device)  # the BatchNorm statistics' inputs were randn too
        usable, outputs = {}, {}
        with torch.inference_mode():
            for label, fn in variants.items():
                try:
                    for _ in range(3):
                        out = fn(x)
                    outputs[label] = first_output(out).float().cpu().numpy()
                    usable[label] = fn
                except Exception as exc:
                    errors[f"{name} {label} b{batch}"] = f"{type(exc).__name__}: {exc}"[:300]
            samples: dict[str, list[float]] = {label: [] for label in usable}
            for _ in range(args.rounds):
                for label, fn in list(usable.items()):
                    try:
                        samples[label].append(timed(fn, x, iters=args.iters, device=device))
                    except Exception as exc:  # one variant failing mid-run loses that variant only
                        errors[f"{name} {label} b{batch} timing"] = f"{type(exc).__name__}: {exc}"[:300]
                        del usable[label], samples[label]
        base = statistics.median(samples["fp32 eager"]) if samples.get("fp32 eager") else None
        for label, values in samples.items():
            ms = statistics.median(values)
            snr = snr_db(outputs["fp32 eager"], outputs[label]) if "fp32 eager" in outputs else None
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "variant": label,
                    "ms": round(ms, 3),
                    "images_per_s": round(batch * 1000 / ms, 1),
                    "speedup_vs_fp32_eager": round(base / ms, 2) if base else None,
                    "snr_db_vs_fp32": None if snr is None else round(min(snr, 999.0), 1),
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
        # What this Python has of what the service's GPU worker uses (the GPU machine's is not this repo's venv).
        "importable": [
            m
            for m in ("torchvision", "onnx", "onnxruntime", "tensorrt", "triton", "pydantic", "pytest")
            if importlib.util.find_spec(m)
        ],
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts["compute_capability"] = f"{props.major}.{props.minor}"
        facts["memory_gib"] = round(props.total_memory / 1024**3, 1)
        # PyTorch's defaults, which "FP32 eager" runs with: cuDNN convolutions in TF32 on Ampere and later.
        facts["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        facts["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return facts


def print_table(log: dict, name: str) -> None:
    clock = "CUDA events" if log["machine"].get("cuda_device") else "perf_counter"
    print(f"\n{name} ({log['machine']['device']}, torch {log['machine']['torch']}), median of rounds, {clock}")
    print("| batch | variant | ms | images/s | vs FP32 eager | SNR vs FP32 (dB) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in (r for r in log["rows"] if r["model"] == name):
        print(
            f"| {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['images_per_s']:.0f} "
            f"| {_shown(r['speedup_vs_fp32_eager'], '{:.2f}x')} | {_shown(r['snr_db_vs_fp32'], '{:g}')} |",
            flush=True,
        )


def _shown(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fp16 on a GPU, fp32 on a CPU (a logic check)")
    parser.add_argument("--budget-s", type=float, default=215.0, help="seconds from the start, all included")
    parser.add_argument("--out", default="gpu-bench.json")
    parser.add_argument("--compile-one", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-epoch", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    torch.backends.cudnn.benchmark = True
    if args.compile_one:
        compile_one(args.compile_one, args, Path(args.work), args.deadline_epoch)
        return

    deadline = STARTED + args.budget_s  # the clock started before torch was imported
    models = args.models.split(",")
    log: dict = {"machine": machine(args.device), "precision": args.precision, "rows": [], "compile": {}}
    print(f"machine: {log['machine']}", flush=True)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Inductor's caches shared by the compile processes and the timing one (warm loads).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
        compile_deadline = deadline - TIMING_RESERVE_S
        procs = start_compiles(models, args, work, compile_deadline)
        try:
            for name in models:  # phase 1: all compiles at once; a report as each one ends
                report = wait_compile(name, procs[name], work, compile_deadline)
                report["work"] = str(work / name)
                log["compile"][name] = report
                write_json(out, log)
        finally:
            for proc in procs.values():
                stop(proc)
        log["compile_phase_seconds"] = round(time.time() - STARTED, 1)
        print(f"compiled by {log['compile_phase_seconds']} s", flush=True)
        for name in models:  # phase 2: one model at a time, nothing else running
            if time.time() > deadline:
                log.setdefault("errors", {})[name] = "not timed: over the budget"
                continue
            try:
                log["rows"] += time_model(name, log["compile"][name], args, log, deadline)
            except Exception:
                log.setdefault("errors", {})[name] = traceback.format_exc()[-1500:]
            write_json(out, log)
            print_table(log, name)
    log["seconds"] = round(time.time() - STARTED, 1)
    write_json(out, log)
    errors = {
        **log.get("errors", {}),
        **{f"{n} {k}": v for n, c in log["compile"].items() for k, v in c["errors"].items()},
    }
    print(json.dumps(errors, indent=1))
    print(f"done in {log['seconds']} s; json: {out}")


if __name__ == "__main__":
    main()
