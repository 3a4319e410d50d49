"""What a user gets from the peers' default tools on the real models of bench/real_models.py (not a
test; issue 13): per model, the original ONNX in ONNX Runtime (the baseline), OpenVINO as it runs the
model by default and with f32 forced, NNCF INT8 on OpenVINO and on ONNX (run in ONNX Runtime), and
ONNX Runtime's `quantize_static` defaults; beside them the yardsticks, the service's own FP32 export
(and with --service-int8 its `onnx-int8-auto` artifact), and what a job with ``"preset": "auto"`` on
target x86-cpu recommends (unless --no-auto): auto's steps run in process as the worker runs them,
the service's benchmark, evaluate and report pick the artifact, and that artifact is loaded the way
the worker loads it. Each is judged on the task's metric against the original (the service's own
tallies, worker.metrics.tasks, and core.recommend's tolerance rule), timed round-robin in one run at
batch 1 and measured on disk.

    PYTHONPATH=. .venv/bin/python bench/peers.py [--models orientation,yolov8n,text_det] [--threads 2]
        [--repeats 30] [--service-int8] [--no-auto] [--out peers.json]

Every recipe is written the way the tool's documentation shows it, with its defaults: nothing is
tuned. OpenVINO models get the static batch-1 input shape (``ov.convert_model(..., input=...)``, as
OpenVINO's docs advise for a fixed-shape deployment) and are saved and reloaded with
``ov.save_model``'s defaults (FP16-compressed weights), which is the IR a user ships. The auto job's
whole report (every candidate's verdict, the front, the candidates that failed) and its wall time go
into the JSON output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.real_models import TOLERANCE, Case, cases, dataset_ref, peer_int8
from core.errors import CvoptError, PassError
from core.models import JobStatus
from core.recommend import ArtifactFacts, StepFacts, report_for
from core.schemas import Preprocessing, ReportRead, Target
from core.targets import auto_recipe
from worker.data import iter_batches
from worker.metrics.tasks import box_targets, labels_fit_task, make_tally, measured_task, meets_tolerance, with_drop
from worker.passes.base import ArtifactRef, PassContext, PassResult
from worker.passes.registry import get_pass
from worker.timing import time_round_robin

DEFAULT_MODELS = "orientation,yolov8n,text_det"
TASK_OPTIONS = {"max_accuracy_drop": TOLERANCE, "detection": {}}
AUTO_TARGET = "x86-cpu"
CALIBRATION_LIMIT = 64  # what bench.real_models.peer_int8 calibrates on

# A model's batch-1 input -> its outputs, in the model's output order.
Runner = Callable[[np.ndarray], list[np.ndarray]]


@dataclass
class Variant:
    """One peer recipe's result: how to run it, what it weighs, and what it ran in."""

    label: str
    recipe: str
    runner: Runner | None = None
    size_bytes: int = 0
    runtime: str = ""
    precision: str | None = None
    error: str | None = None
    build_s: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)
    # The summary's row when the label names what the recipe picked on this model (cvopt auto).
    summary_row: str | None = None


# -- the machine --------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


def machine(threads: int) -> dict[str, Any]:
    """The CPU, the instruction sets that decide INT8/bf16 speed, and every library's version."""
    import nncf
    import onnx
    import openvino as ov

    from worker.passes.benchmark import machine_info

    flags = cpu_flags()
    info = machine_info(threads)
    info.update(
        {
            "platform": platform.platform(),
            "avx2": "avx2" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": sorted(f for f in flags if f.startswith("amx")),
            "openvino": ov.__version__.split("-")[0],
            "openvino_cpu_capabilities": list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "nncf": nncf.__version__,
            "onnx": onnx.__version__,
            "load_average_1m_at_start": os.getloadavg()[0],
        }
    )
    return info


def machine_line(m: dict[str, Any]) -> str:
    isa = ", ".join(
        name
        for name, present in (
            ("AVX2", m["avx2"]),
            ("AVX-512 VNNI", m["avx512_vnni"]),
            ("AVX-VNNI", m["avx_vnni"]),
            ("AVX-512 BF16", m["avx512_bf16"]),
            ("AMX", bool(m["amx"])),
        )
        if present
    )
    return (
        f"Machine: {m['cpu']} ({m['platform']}), {m['cpu_count']} cores, {m['threads']} threads; {isa}; "
        f"AMX {'yes' if m['amx'] else 'no'}; onnxruntime {m['onnxruntime']}, openvino {m['openvino']} "
        f"(CPU capabilities {', '.join(m['openvino_cpu_capabilities'])}), nncf {m['nncf']}, onnx {m['onnx']}; "
        f"load average {m['load_average_1m_at_start']:.2f} at start"
    )


# -- the peers' recipes --------------------------------------------------------------------------------


def ort_runner(path: Path, input_name: str, threads: int) -> Runner:
    """ONNX Runtime on the CPU with the session options the service's benchmark uses."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda x: session.run(names, {input_name: x})


def ov_compiled(xml: Path, threads: int, precision: str | None) -> tuple[Runner, str]:
    """The IR compiled for the CPU (``precision`` None: OpenVINO's own choice) -> (runner, the
    inference precision it chose)."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config: dict[str, Any] = {props.inference_num_threads: threads}
    if precision:
        config[hints.inference_precision] = precision
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    chose = compiled.get_property(hints.inference_precision).to_string()
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: x})
        return [np.asarray(result[o]) for o in outputs]

    return run, chose


def ir_size(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def ov_save(model, xml: Path) -> int:
    """``ov.save_model`` with its defaults (FP16-compressed weights); the IR's size on disk."""
    import openvino as ov

    ov.save_model(model, str(xml))
    return ir_size(xml)


def calibration_arrays(case: Case) -> list[np.ndarray]:
    spec = {"name": case.input_name, "shape": case.input_shape, "dtype": "float32"}
    prep = Preprocessing(**case.preprocessing)
    return [
        x for x, _ in iter_batches(dataset_ref(case.calibration), spec, prep, batch_size=1, limit=CALIBRATION_LIMIT)
    ]


def original_ref(case: Case) -> ArtifactRef:
    return ArtifactRef(case.model.name, case.fmt, case.model)


def service_step(
    case: Case,
    step_dir: Path,
    threads: int,
    name: str,
    source: ArtifactRef,
    artifacts: list[ArtifactRef],
    config: dict[str, Any],
    task_options: dict[str, Any] = TASK_OPTIONS,
) -> PassResult:
    """One of the service's steps in process, with the context the worker's runner gives it (the job's
    datasets, the artifacts made so far, the task options): the yardsticks the peers must beat. In
    process, not in the runner's step process, so a pass's failure arrives as its own exception."""
    step_dir.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(
        work_dir=step_dir,
        original=original_ref(case),
        artifacts=list(artifacts),
        input_spec=[{"name": case.input_name, "shape": case.input_shape, "dtype": "float32"}],
        preprocessing=Preprocessing(**case.preprocessing),
        task="auto",
        task_options=task_options,
        threads=threads,
        calibration_dataset=dataset_ref(case.calibration),
        evaluation_dataset=dataset_ref(case.evaluation),
    )
    cls = get_pass(name)
    return cls().run(ctx, source, cls.Config.model_validate(config))


def service_artifact(case: Case, work: Path, threads: int, name: str, source: Path | None, **config) -> Path:
    """``export_onnx`` of the original, or ``quantize_int8`` of that export (``source``), alone."""
    artifacts = [ArtifactRef(source.name, "onnx", source, step="export_onnx")] if source else []
    start = artifacts[0] if artifacts else original_ref(case)
    return Path(service_step(case, work / name, threads, name, start, artifacts, config).artifact)


# -- what preset auto recommends ------------------------------------------------------------------------


@dataclass
class AutoJob:
    """A job with preset auto, run in process: the artifacts its steps made (the runner's names), every
    step's facts as the report reads them, the report, and the job's wall time."""

    original: ArtifactRef
    artifacts: list[ArtifactRef]
    steps: list[StepFacts]
    report: ReportRead
    seconds: float


def _candidate_failed(index: int, step, code: str, message: str) -> StepFacts:
    """A failed optional step as the runner records it (_mark_step_failed): the job goes on."""
    print(f"  auto: candidate {index} {step.name} {step.config} failed ({code}): {message[:200]}", flush=True)
    return StepFacts(
        step.name,
        False,
        {"error": {"code": code, "message": message}},
        index=index,
        optional=True,
        failed=True,
        config=dict(step.config),
        message=f"{code}: {message}",
    )


def run_auto_job(case: Case, work: Path, threads: int, target: Target = AUTO_TARGET) -> AutoJob:
    """What the worker does for ``"preset": "auto"`` on x86-cpu, in process: core.targets' steps in
    order, each producing step from the chain's current artifact (the last one that does not end its
    branch, else the original) as worker.runner._run_steps / _run_candidate / _add_artifact do; an
    optional candidate that fails ends failed with its code and the job goes on (a crash counts too:
    the runner's step process reports it as internal_error); a required step's failure raises. Then
    the report over the benchmark and evaluate steps' metrics, as core.views builds it."""
    from worker.runner import FILE_EXTENSIONS

    recipe = auto_recipe(target, model_format=case.fmt, has_calibration=True, has_dataset=True, overrides=None)
    task_options = {**TASK_OPTIONS, "target": target, "left_out": recipe.left_out}
    started = time.perf_counter()
    original = original_ref(case)
    current, artifacts, steps = original, [], []
    for index, step in enumerate(recipe.steps):
        cls = get_pass(step.name)
        if step.optional and current.format not in cls.accepts:
            message = f"{step.name} takes {', '.join(sorted(cls.accepts))}; the chain holds {current.format}"
            steps.append(_candidate_failed(index, step, "source_failed", message))
            continue
        step_started = time.perf_counter()
        try:
            step_dir = work / f"{index:02d}-{step.name}"
            result = service_step(case, step_dir, threads, step.name, current, artifacts, step.config, task_options)
        except PassError as exc:
            if not step.optional:
                raise
            steps.append(_candidate_failed(index, step, exc.code, exc.message))
            continue
        except MemoryError:
            if not step.optional:
                raise
            steps.append(_candidate_failed(index, step, "out_of_memory", f"out of memory at step {step.name}"))
            continue
        except Exception as exc:
            if not step.optional or isinstance(exc, CvoptError):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:500]
            message = f"step {step.name} crashed: {type(exc).__name__}: {first_line}"
            steps.append(_candidate_failed(index, step, "internal_error", message))
            continue
        duration = time.perf_counter() - step_started
        print(f"  auto: step {index} {step.name} {step.config} done in {duration:.1f} s", flush=True)
        if result.artifact is not None:
            fmt = result.format or cls().output_format(current.format)
            ref = ArtifactRef(
                name=f"{index:02d}-{step.name}{FILE_EXTENSIONS.get(fmt, '')}",
                format=fmt,
                path=Path(result.artifact),
                step=step.name,
                step_index=index,
                meta=dict(result.meta),
            )
            if cls.advances_chain():
                current = ref
            artifacts.append(ref)
        metrics = dict(result.metrics, duration_s=round(duration, 3), cached=False)
        steps.append(StepFacts(step.name, True, metrics, index=index, optional=step.optional, config=dict(step.config)))
    report = report_for(
        job_id=f"peers-{case.name}",
        status=JobStatus.succeeded,
        task="auto",
        task_options=task_options,
        steps=steps,
        original=ArtifactFacts(original.name, None, original.format, original.path.stat().st_size),
        artifacts=[ArtifactFacts(a.name, a.step, a.format, a.path.stat().st_size, a.meta) for a in artifacts],
    )
    return AutoJob(original, artifacts, steps, report, time.perf_counter() - started)


def service_runner(ref: ArtifactRef, input_name: str, threads: int) -> tuple[Runner, dict[str, Any]]:
    """An artifact loaded the way the worker's benchmark and evaluate load it (worker.runtime), as a
    Runner; and what runs it (runtime_info: OpenVINO names the precision it compiled in)."""
    from worker.runtime import load_runner, runtime_info

    run = load_runner(ref, threads=threads)
    info = runtime_info(ref, threads=threads)
    return (lambda x: list(run({input_name: x}))), info


def auto_variant(case: Case, work: Path, threads: int) -> tuple[Variant, dict[str, Any]]:
    """The artifact preset auto recommends (the original when it recommends nothing, and the variant
    says so) as a Variant, and the job's record for the JSON output: its report and wall time."""
    variant = Variant("cvopt auto", f"preset auto, target {AUTO_TARGET}", summary_row="cvopt auto")
    record: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        job = run_auto_job(case, work / "auto", threads)
        record.update(seconds=round(job.seconds, 1), report=job.report.model_dump(mode="json"))
        rec = job.report.recommended
        name = rec.artifact if rec else None
        ref = next((a for a in job.artifacts if a.name == name), job.original)
        entry = next(e for e in job.report.entries if e.name == ref.name)
        kept = "" if name else " (recommends nothing: keep the original)"
        variant.label = f"cvopt auto → {entry.label}{kept}"
        variant.recipe += f": {ref.name}: {rec.reason if rec else 'no recommendation'}"
        variant.runner, info = service_runner(ref, case.input_name, threads)
        variant.runtime, variant.precision = info["name"], info.get("inference_precision")
        variant.size_bytes = entry.size_bytes
        print(f"  {variant.label}: {variant.recipe} ({job.seconds:.0f} s)", flush=True)
    except Exception as exc:  # the auto job failing on a real model is a result too
        variant.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        print(f"  cvopt auto: failed: {variant.error}", flush=True)
        record.setdefault("error", variant.error)
    variant.build_s = time.perf_counter() - started
    record.setdefault("seconds", round(variant.build_s, 1))
    return variant, record


def build_variants(case: Case, work: Path, threads: int, service_int8: bool = False) -> list[Variant]:
    """Every peer recipe on ``case``; a recipe that fails is kept with its error, not dropped."""
    import openvino as ov

    calibration = calibration_arrays(case)
    ir_fp = work / "ov_fp" / "model.xml"
    ir_int8 = work / "ov_nncf_int8" / "model.xml"

    def ov_default():
        size = ov_save(ov.convert_model(str(case.model), input=[case.input_shape]), ir_fp)
        return (*ov_compiled(ir_fp, threads, None), size)

    def ov_f32():
        return (*ov_compiled(ir_fp, threads, "f32"), ir_size(ir_fp))

    def ov_nncf_int8():
        import nncf

        model = ov.convert_model(str(case.model), input=[case.input_shape])
        size = ov_save(nncf.quantize(model, nncf.Dataset(calibration)), ir_int8)
        return (*ov_compiled(ir_int8, threads, None), size)

    def onnx_nncf_int8():
        import nncf
        import onnx

        out = work / "nncf_int8.onnx"
        dataset = nncf.Dataset(calibration, lambda x: {case.input_name: x})
        onnx.save(nncf.quantize(onnx.load(str(case.model)), dataset), str(out))
        return ort_runner(out, case.input_name, threads), None, out.stat().st_size

    def ort_int8():
        out = peer_int8(case.model, case, work / "ort_quantize_static.onnx")
        return ort_runner(out, case.input_name, threads), None, out.stat().st_size

    def ort_fp32():
        return ort_runner(case.model, case.input_name, threads), None, case.model.stat().st_size

    def cvopt_fp32():
        out = service_artifact(case, work, threads, "export_onnx", None)
        exported[0] = out
        return ort_runner(out, case.input_name, threads), None, out.stat().st_size

    def cvopt_int8():
        if exported[0] is None:
            raise RuntimeError("no FP32 export to quantize")
        out = service_artifact(
            case, work, threads, "quantize_int8", exported[0], max_accuracy_drop=TOLERANCE, search_speed=True
        )
        return ort_runner(out, case.input_name, threads), None, out.stat().st_size

    exported: list[Path | None] = [None]

    recipes = [
        ("ORT FP32", "original ONNX in onnxruntime", "onnxruntime", ort_fp32),
        ("OpenVINO default", "ov.convert_model + save_model + compile_model, defaults", "openvino", ov_default),
        ("OpenVINO f32", "same IR, INFERENCE_PRECISION_HINT=f32", "openvino", ov_f32),
        ("NNCF INT8 (OpenVINO)", "nncf.quantize(ov model) defaults, compiled by default", "openvino", ov_nncf_int8),
        (
            "NNCF INT8 (ONNX, ORT)",
            "nncf.quantize(onnx.ModelProto) defaults, in onnxruntime",
            "onnxruntime",
            onnx_nncf_int8,
        ),
        ("ORT quantize_static", "quantize_static defaults (QDQ)", "onnxruntime", ort_int8),
        ("cvopt FP32 (onnx export)", "the service's export_onnx step (simplified ONNX)", "onnxruntime", cvopt_fp32),
    ]
    if service_int8:
        recipes.append(
            ("cvopt INT8 (onnx-int8-auto)", "quantize_int8, task-metric + speed search", "onnxruntime", cvopt_int8)
        )
    variants = []
    for label, recipe, runtime, build in recipes:
        variant = Variant(label, recipe, runtime=runtime)
        started = time.perf_counter()
        try:
            variant.runner, variant.precision, variant.size_bytes = build()
        except Exception as exc:  # a peer tool that fails on a real model is a result: reported, not hidden
            variant.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            print(f"  {label}: failed: {variant.error}", flush=True)
        variant.build_s = time.perf_counter() - started
        variants.append(variant)
    return variants


# -- measuring -----------------------------------------------------------------------------------------


def evaluate(case: Case, variants: list[Variant]) -> str:
    """Every variant's task metric against the first (ORT FP32), over the evaluation set at batch 1,
    with the tallies the service's evaluate step uses; returns the task."""
    dataset = dataset_ref(case.evaluation)
    spec = {"name": case.input_name, "shape": case.input_shape, "dtype": "float32"}
    prep = Preprocessing(**case.preprocessing)
    targets = box_targets(dataset, case.input_shape, prep, dataset.num_samples)
    live = [v for v in variants if v.runner is not None]
    tallies: list | None = None
    task = "auto"
    for seen, (x, labels) in enumerate(iter_batches(dataset, spec, prep, batch_size=1)):
        reference = live[0].runner(x)
        if tallies is None:
            task, layout, _ = measured_task("auto", TASK_OPTIONS, reference, case.input_shape)
            labeled = labels_fit_task(task, dataset)
            tallies = [make_tally(task, layout, TASK_OPTIONS, labeled=labeled) for _ in live]
        sample_targets = targets[seen : seen + 1] if targets is not None else None
        for v, tally in zip(live, tallies, strict=True):
            tally.add(reference if v is live[0] else v.runner(x), reference, labels, sample_targets)
    reference_value = None
    for v, tally in zip(live, tallies or [], strict=True):
        result = tally.result()
        if reference_value is None:
            reference_value = result["metric"]["value"]
        result["metric"] = with_drop(result["metric"], reference_value)
        result["meets_tolerance"] = meets_tolerance(result["metric"], TOLERANCE)
        v.results.update(result)
    return task


# Seconds between two variants' blocks: long enough for the last pool's spinning threads to sleep
# (worker.timing.time_round_robin says what it fixes).
SETTLE_S = 0.1


def run_case(case: Case, work: Path, threads: int, repeats: int, service_int8: bool, auto: bool) -> dict[str, Any]:
    variants = build_variants(case, work, threads, service_int8)
    auto_job = None
    if auto:
        variant, auto_job = auto_variant(case, work, threads)
        variants.append(variant)
    if variants[0].runner is None:
        raise SystemExit(f"{case.name}: ONNX Runtime cannot run the original: {variants[0].error}")
    task = evaluate(case, variants)
    first = next(
        iter_batches(
            dataset_ref(case.evaluation),
            {"name": case.input_name, "shape": case.input_shape},
            Preprocessing(**case.preprocessing),
            batch_size=1,
        )
    )[0]
    live = [v for v in variants if v.runner is not None]
    timed = time_round_robin(
        {v.label: (lambda v=v: v.runner(first)) for v in live}, runs=repeats, budget_s=30.0, settle_s=SETTLE_S
    )
    for v in live:
        v.results["latency_ms"] = timed[v.label]
    base = variants[0].results["latency_ms"]["p50_ms"]
    rows = []
    for v in variants:
        row = {
            "variant": v.label,
            "recipe": v.recipe,
            "runtime": v.runtime,
            "inference_precision": v.precision,
            "size_bytes": v.size_bytes,
            "build_s": round(v.build_s, 1),
            "error": v.error,
            "summary_row": v.summary_row,
            **v.results,
        }
        if "latency_ms" in v.results:
            row["ratio_to_ort_fp32"] = v.results["latency_ms"]["p50_ms"] / base
        rows.append(row)
    result = {"case": case.name, "what": case.what, "task": task, "variants": rows}
    if auto_job is not None:
        result["auto"] = auto_job
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"**{result['case']}**: {result['what']}. Task: {result['task']}. "
        f"(load average {result['load_average_1m_after']:.2f} after)",
        "",
        "| peer default | runs in | task metric | drop | meets 0.01 | p50 ms | latency / ORT FP32 | size MB |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for row in result["variants"]:
        runs_in = row["runtime"] + (f" ({row['inference_precision']})" if row["inference_precision"] else "")
        if row["error"]:
            lines.append(f"| {row['variant']} | {runs_in} | failed: {row['error'][:90]} | - | - | - | - | - |")
            continue
        m = row["metric"]
        floor = m.get("floor")
        note = f" (floor {floor['value']:.1f} dB)" if floor and not floor["met"] else ""
        lat = row["latency_ms"]["p50_ms"]
        lines.append(
            f"| {row['variant']} | {runs_in} | {m['name']} {m['value']:.3f}{note} | {m['drop']:+.3f} | "
            f"{'yes' if row['meets_tolerance'] else 'no'} | {lat:.2f} | {row['ratio_to_ort_fp32']:.2f} | "
            f"{row['size_bytes'] / 1e6:.2f} |"
        )
    if "auto" in result:
        lines += ["", auto_table(result["auto"])]
    return "\n".join(lines)


def auto_table(auto: dict[str, Any]) -> str:
    """The auto job as its report tells it: every candidate with the service's own benchmark and
    verdict, the front, the recommendation and its reason, the candidates that failed."""
    if "report" not in auto:
        return f"preset auto: no report after {auto['seconds']:.0f} s: {auto.get('error')}"
    report = auto["report"]
    lines = [
        f"preset auto ({report['target']}), {auto['seconds']:.0f} s; as the job's report has it"
        + (f" ({report['latency_note']})" if report.get("latency_note") else "")
        + ":",
        "",
        "| candidate | artifact | task metric | drop | p50 ms (service benchmark) | size MB | verdict |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    rec = report["recommended"] or {}
    for e in report["entries"]:
        m, lat = e.get("metric"), e.get("latency_ms")
        metric = f"{m['name']} {m['value']:.3f} | {m['drop']:+.3f}" if m else "- | -"
        p50 = f"{lat['p50_ms']:.2f}" if lat else "-"
        star = " ★" if rec.get("artifact") == e["name"] else ""
        lines.append(
            f"| {e['label']}{star} | {e['name']} | {metric} | {p50} | {e['size_bytes'] / 1e6:.2f} | {e['verdict']} |"
        )
    lines += [
        "",
        f"Recommended: {rec.get('artifact') or 'nothing (keep the original)'}: {rec.get('reason')}",
        f"Front: {', '.join(report['front'])}",
    ]
    for f in report["failed_candidates"]:
        lines.append(f"Failed: {f['label']} ({f['step']}): {f['code']}: {f['message'][:160]}")
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    """One row per recipe, one column per model: latency / ORT FP32 (lower is faster), the task
    metric with ✓ where it meets the tolerance (✗ where not), size MB."""

    def row_of(v: dict[str, Any]) -> str:
        return v.get("summary_row") or v["variant"]

    labels = list(dict.fromkeys(row_of(row) for r in results for row in r["variants"]))
    head = " | ".join(f"{r['case']} ({r['variants'][0]['metric']['name']})" for r in results)
    lines = [f"| recipe | {head} |", "|---|" + "---|" * len(results)]
    for label in labels:
        cells = []
        for r in results:
            row = next((v for v in r["variants"] if row_of(v) == label), None)
            if row is None or row["error"]:
                cells.append("failed" if row else "-")
                continue
            mark = "✓" if row["meets_tolerance"] else "✗"
            ratio, value, size = row["ratio_to_ort_fp32"], row["metric"]["value"], row["size_bytes"] / 1e6
            picked = f" ({row['variant'].split('→', 1)[-1].strip()})" if row_of(row) != row["variant"] else ""
            cells.append(f"{ratio:.2f} · {value:.3f} {mark} · {size:.1f} MB{picked}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="of bench/real_models.py's ONNX models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="timing rounds (median of rounds)")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument(
        "--service-int8",
        action="store_true",
        help="also the service's onnx-int8-auto artifact (its search takes minutes)",
    )
    parser.add_argument(
        "--no-auto",
        dest="auto",
        action="store_false",
        help="leave out what preset auto recommends (its job takes minutes per model)",
    )
    parser.add_argument(
        "--auto-target",
        choices=["arm-cpu", "nvidia-gpu"],
        help="only the auto job for this target, on any model of bench/real_models.py (.pt2 too), as its "
        "report tells it: the peers here are x86 tools",
    )
    args = parser.parse_args()
    info = machine(args.threads)
    print(machine_line(info), "\n", flush=True)
    if args.auto_target:
        auto_only(args, info)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="cvopt-peers-") as tmp:
        for case in cases(Path(tmp), args.models.split(",")):
            if case.fmt != "onnx":
                print(f"{case.name}: skipped, the peers' recipes here start from ONNX ({case.fmt})\n")
                continue
            work = Path(tmp) / case.name
            work.mkdir()
            started = time.perf_counter()
            result = run_case(case, work, args.threads, args.repeats, args.service_int8, args.auto)
            result["seconds"] = round(time.perf_counter() - started, 1)
            result["load_average_1m_after"] = os.getloadavg()[0]
            results.append(result)
            print(table(result), "\n", flush=True)
    if results:
        print(summary(results), "\n")
    if args.out:
        args.out.write_text(
            json.dumps({"machine": info, "tolerance": TOLERANCE, "results": results}, indent=1, default=str)
        )


def auto_only(args: argparse.Namespace, info: dict[str, Any]) -> None:
    """``--auto-target``: the auto job for another target on each model, its report as the table."""
    records = []
    with tempfile.TemporaryDirectory(prefix="cvopt-peers-") as tmp:
        for case in cases(Path(tmp), args.models.split(",")):
            job = run_auto_job(case, Path(tmp) / case.name, args.threads, args.auto_target)
            record = {"case": case.name, "seconds": round(job.seconds, 1), "report": job.report.model_dump(mode="json")}
            records.append(record)
            print(f"**{case.name}**: {case.what}\n\n{auto_table(record)}\n", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "tolerance": TOLERANCE, "auto": records}, indent=1))


if __name__ == "__main__":
    main()
