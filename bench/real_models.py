"""Real models through the service's steps (not a test): per model, the original, the FP32 ONNX
export, cvopt's INT8 (`onnx-int8-auto`: task-metric search, detector-safe heads, speed search) and
what a user writes by hand (ONNX Runtime `quantize_static` with its defaults), each with the task's
metric, p50 latency at batch 1 (all variants timed round-robin in one benchmark step) and size,
and the artifact the service recommends with its reason.

    PYTHONPATH=. .venv/bin/python bench/real_models.py [--models orientation,yolov8n,shapes,text_det,mobilenet_v2]
        [--threads 2] [--json out.json]

The models are not ours (tests/real_models.py takes them out of PyPI wheels), except `shapes`, the
tiny YOLO-style detector trained on synthetic shapes whose boxes are known (mAP with real labels).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.datasets import inspect_dataset
from core.models import JobStatus
from core.recommend import ArtifactFacts, StepFacts, report_for
from core.schemas import Preprocessing
from tests import real_models as rm
from tests import synthetic_detector as sd
from worker.passes.base import ArtifactRef, DatasetRef, PassContext
from worker.passes.benchmark import machine_info
from worker.passes.registry import get_pass

TOLERANCE = 0.01


@dataclass
class Case:
    name: str
    model: Path
    fmt: str
    input_name: str
    input_shape: list[int]
    preprocessing: dict
    calibration: Path
    evaluation: Path
    what: str


def dataset_ref(path: Path) -> DatasetRef:
    info = inspect_dataset(path)
    return DatasetRef(
        path=path,
        format=info.format,
        labeled=info.labeled,
        num_samples=info.num_samples,
        layout=info.layout,
        sample_shape=info.sample_shape,
        label_type=info.label_type,
    )


def mobilenet_v2_pt2(tmp: Path) -> Path:
    """torchvision's ImageNet MobileNetV2 weights, exported with torch.export at batch 1 (what a team
    uploads when it exports for a phone)."""
    import torch
    import torchvision

    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(rm.asset("mobilenet_v2-b0353104.pth"), weights_only=True))
    path = tmp / "mobilenet_v2_b1.pt2"
    torch.export.save(torch.export.export(net.eval(), (torch.zeros(1, 3, 224, 224),)), path)
    return path


def cases(tmp: Path, names: list[str]) -> list[Case]:
    out = []
    if "orientation" in names:
        pages = rm.orientation_zip(tmp / "orientation.zip")
        out.append(
            Case(
                "orientation",
                rm.asset(rm.ORIENTATION.file),
                "onnx",
                "x",
                rm.ORIENTATION.input_shape,
                rm.ORIENTATION.preprocessing,
                pages,
                pages,
                rm.ORIENTATION.description + "; 48 hand-labeled page crops (calibrated on the same set)",
            )
        )
    if "yolov8n" in names:
        photos = rm.photos_zip(tmp / "photos.zip")
        out.append(
            Case(
                "yolov8n",
                rm.asset(rm.YOLOV8N.file),
                "onnx",
                "images",
                rm.YOLOV8N.input_shape,
                rm.YOLOV8N.preprocessing,
                photos,
                photos,
                rm.YOLOV8N.description + f"; {len(rm.PHOTOS)} photos, no labels (F1 against FP32)",
            )
        )
    if "shapes" in names:
        out.append(
            Case(
                "shapes",
                sd.FIXTURES / sd.FIXTURE_FILES["yolo"],
                "onnx",
                "images",
                [1, 3, 128, 128],
                sd.PREPROCESSING,
                sd.write_yolo_zip(tmp / "calibration.zip", 64, sd.CALIBRATION_SEED),
                sd.write_yolo_zip(tmp / "held_out.zip", 200, sd.HELD_OUT_SEED),
                "tiny YOLOv8-style detector (ours, synthetic shapes); 200 held-out images with YOLO labels",
            )
        )
    if "text_det" in names:
        pages = rm.photos_zip(tmp / "pages.zip", rm.TEXT_PAGES + rm.PHOTOS)
        out.append(
            Case(
                "text_det",
                rm.asset(rm.TEXT_DETECTOR.file),
                "onnx",
                "x",
                rm.TEXT_DETECTOR.input_shape,
                rm.TEXT_DETECTOR.preprocessing,
                pages,
                pages,
                rm.TEXT_DETECTOR.description + "; 2 pages + 10 photos (pixel agreement with FP32)",
            )
        )
    if "mobilenet_v2" in names:
        photos = rm.photos_zip(tmp / "imagenet_photos.zip")
        out.append(
            Case(
                "mobilenet_v2",
                mobilenet_v2_pt2(tmp),
                "exported_program",
                "x",
                [1, 3, 224, 224],
                {"resize": 256},
                photos,
                photos,
                "torchvision MobileNetV2 (ImageNet weights) as a batch-1 .pt2; 10 photos (agreement)",
            )
        )
    return out


def peer_int8(fp32: Path, case: Case, out: Path) -> Path:
    """What a user writes by hand: ORT's quantize_static with its defaults, calibrated on the same images."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from worker.data import iter_batches

    spec = {"name": case.input_name, "shape": case.input_shape, "dtype": "float32"}
    batches = [
        x
        for x, _ in iter_batches(
            dataset_ref(case.calibration), spec, Preprocessing(**case.preprocessing), batch_size=1, limit=64
        )
    ]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {case.input_name: x}

    quantize_static(str(fp32), str(out), Reader())
    return out


def run_case(case: Case, work: Path, threads: int) -> dict:
    """The service's steps in process, as a job with preset onnx-int8-auto runs them, plus the peer."""
    original = ArtifactRef(case.model.name, case.fmt, case.model)
    spec = [{"name": case.input_name, "shape": case.input_shape, "dtype": "float32"}]
    if case.fmt == "exported_program":
        spec[0]["name"] = "x"
    artifacts: list[ArtifactRef] = []
    steps: list[StepFacts] = []
    timings: dict[str, float] = {}

    def step(name: str, index: int, source: ArtifactRef, **config) -> ArtifactRef | None:
        step_dir = work / f"{index:02d}-{name}"
        step_dir.mkdir(parents=True, exist_ok=True)
        ctx = PassContext(
            work_dir=step_dir,
            original=original,
            artifacts=list(artifacts),
            input_spec=spec,
            preprocessing=Preprocessing(**case.preprocessing),
            task="auto",
            task_options={"max_accuracy_drop": TOLERANCE, "detection": {}},
            threads=threads,
            calibration_dataset=dataset_ref(case.calibration),
            evaluation_dataset=dataset_ref(case.evaluation),
        )
        cls = get_pass(name)
        started = time.perf_counter()
        result = cls().run(ctx, source, cls.Config(**config))
        timings[name] = time.perf_counter() - started
        steps.append(StepFacts(name=name, succeeded=True, metrics=result.metrics))
        if result.artifact is None:
            return None
        filename = f"{index:02d}-{name}.onnx"
        kept = work / filename
        shutil.copyfile(result.artifact, kept)
        ref = ArtifactRef(filename, result.format, kept, step=name, step_index=index, meta=dict(result.meta))
        artifacts.append(ref)
        return ref

    fp32 = step("export_onnx", 0, original)
    step("quantize_int8", 1, fp32, max_accuracy_drop=TOLERANCE, search_speed=True)
    peer = peer_int8(fp32.path, case, work / "02-peer_ort_defaults.onnx")
    artifacts.append(ArtifactRef(peer.name, "onnx", peer, step="peer_ort_defaults", step_index=2))
    step("benchmark", 3, fp32, batch_sizes=[1], runs=30)
    step("evaluate", 4, fp32)
    report = report_for(
        job_id=case.name,
        status=JobStatus.succeeded,
        task="auto",
        task_options={"max_accuracy_drop": TOLERANCE},
        steps=steps,
        original=ArtifactFacts(original.name, None, case.fmt, case.model.stat().st_size),
        artifacts=[ArtifactFacts(a.name, a.step, a.format, a.path.stat().st_size, a.meta) for a in artifacts],
    )
    quantize = next(s.metrics for s in steps if s.name == "quantize_int8")
    return {
        "case": case.name,
        "what": case.what,
        "report": report.model_dump(mode="json"),
        "float_nodes": quantize.get("float_nodes", []),
        "fallback": quantize.get("fallback"),
        "speed_search": quantize.get("speed_search"),
        "step_seconds": timings,
    }


def table(result: dict) -> str:
    report = result["report"]
    lines = [
        f"**{result['case']}**: {result['what']}. Task: {report['task']}.",
        "",
        "| artifact | task metric | drop | p50 ms (batch 1) | vs FP32 ONNX | size MB | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    fp32 = next((e for e in report["entries"] if e["step"] == "export_onnx"), None)
    base = fp32["latency_ms"]["p50_ms"] if fp32 and fp32["latency_ms"] else None
    for e in report["entries"]:
        m = e.get("metric") or {}
        p50 = e["latency_ms"]["p50_ms"] if e["latency_ms"] else None
        star = " ★" if report["recommended"] and report["recommended"]["artifact"] == e["name"] else ""
        lines.append(
            f"| {e['name']}{star} | {m.get('name', '-')} {m['value']:.3f} | {m['drop']:+.3f} | "
            f"{p50:.2f} | {base / p50:.2f}x | {e['size_bytes'] / 1e6:.2f} | {e['verdict']} |"
            if m and p50 and base
            else f"| {e['name']} | - | - | - | - | {e['size_bytes'] / 1e6:.2f} | {e['verdict']} |"
        )
    rec = report["recommended"] or {}
    lines += ["", f"Recommended: {rec.get('artifact') or 'none (keep the original)'}: {rec.get('reason')}"]
    if result["float_nodes"]:
        lines.append(
            "Kept in float by the head guard: "
            + ", ".join(f"{n['node']} ({n['op_type']})" for n in result["float_nodes"][:6])
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="orientation,yolov8n,shapes,text_det,mobilenet_v2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    machine = machine_info(args.threads)
    from worker.passes.quantize_int8 import cpu_has_vnni

    print(
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, {args.threads} threads, "
        f"VNNI {'yes' if cpu_has_vnni() else 'no'}, onnxruntime {machine['onnxruntime']}\n"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="cvopt-bench-") as tmp:
        for case in cases(Path(tmp), args.models.split(",")):
            work = Path(tmp) / case.name
            work.mkdir()
            result = run_case(case, work, args.threads)
            results.append(result)
            print(table(result), "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
