"""Which artifact to ship (core.recommend), rule by rule, in process: the fastest artifact that
meets the job's tolerance on the task's metric is recommended (the FP32 export can be the
answer); one over the tolerance never is; a slower one than the fastest float model says so with
both p50s; a tie within 2% goes to the smaller file; without an evaluate step only lossless float
conversions compete; when the original wins, nothing is recommended and one line says why. Then
the same through the API (TestClient, SQLite): the report, the job's ``recommended`` for one
extra query, and the report page's box."""

from __future__ import annotations

import pytest

from core.models import JobStatus
from core.recommend import (
    ArtifactFacts,
    Candidate,
    StepFacts,
    lossless_artifacts,
    recommend,
    report_for,
    step_keeps_float,
)
from tests.test_api_fast_paths import Statements, api, bearer, new_tenant_key, service, tiny_onnx  # noqa: F401

ORIGINAL = "model.onnx"


def metric(value: float, reference: float = 0.80, name: str = "top1") -> dict:
    return {"name": name, "value": value, "reference": reference, "drop": reference - value, "higher_is_better": True}


def original(p50: float | None = 10.0, size: int = 4_000_000) -> Candidate:
    return Candidate(ORIGINAL, None, size, p50, lossless=True, metric=metric(0.80))


def fp32(p50: float | None, size: int = 4_000_000, **kw) -> Candidate:
    return Candidate(
        "00-export_onnx.onnx", "export_onnx", size, p50, lossless=True, metric=kw.pop("m", metric(0.80)), **kw
    )


def int8(p50: float | None, top1: float | None = 0.795, size: int = 1_000_000, **kw) -> Candidate:
    return Candidate(
        "01-quantize_int8.onnx",
        "quantize_int8",
        size,
        p50,
        lossless=False,
        metric=metric(top1) if top1 is not None else None,
        **kw,
    )


# -- the rules ------------------------------------------------------------------------------------


def test_the_fastest_artifact_within_the_tolerance_is_recommended_with_its_numbers():
    verdicts, rec = recommend([original(10.0), fp32(9.0), int8(4.0)], tolerance=0.01, evaluated=True)
    assert rec.artifact == "01-quantize_int8.onnx"
    assert rec.metrics.p50_ms == 4.0 and rec.metrics.speedup == pytest.approx(2.5)
    assert rec.metrics.size_bytes == 1_000_000 and rec.metrics.size_ratio == pytest.approx(0.25)
    assert rec.metrics.metric.name == "top1" and rec.metrics.metric.value == pytest.approx(0.795)
    assert rec.metrics.metric.drop == pytest.approx(0.005)
    assert "2.50x the original's speed" in rec.reason and "drop 0.0050 <= tolerance 0.01" in rec.reason
    assert [verdicts[n].verdict for n in (ORIGINAL, "00-export_onnx.onnx", "01-quantize_int8.onnx")] == [
        "original",
        "meets_tolerance",
        "meets_tolerance",
    ]
    assert rec.accuracy_verified and rec.tolerance == 0.01


def test_an_artifact_over_the_tolerance_is_never_recommended_however_fast():
    verdicts, rec = recommend([original(10.0), fp32(8.0), int8(2.0, top1=0.759)], tolerance=0.01, evaluated=True)
    assert rec.artifact == "00-export_onnx.onnx"  # the FP32 export is the answer
    assert rec.metrics.speedup == pytest.approx(1.25) and rec.metrics.metric.drop == pytest.approx(0.0)
    judged = verdicts["01-quantize_int8.onnx"]
    assert judged.verdict == "over_tolerance"
    assert judged.reason == "top-1 0.7590 vs 0.8000, drop 0.0410 > tolerance 0.01"


def test_a_drop_equal_to_the_tolerance_meets_it_despite_float_rounding():
    assert 0.99 - 0.98 > 0.01  # what the rule must not trip on
    quantized = Candidate("q", "quantize_int8", 1, 5.0, lossless=False, metric=metric(0.98, reference=0.99))
    verdicts, rec = recommend([original(10.0), quantized], tolerance=0.01, evaluated=True)
    assert verdicts["q"].verdict == "meets_tolerance" and rec.artifact == "q"


def test_an_artifact_slower_than_the_fastest_float_model_says_which_with_both_p50s():
    # INT8 meets the tolerance and beats the original, but the FP32 export is faster still.
    verdicts, rec = recommend([original(10.0), fp32(5.0), int8(6.0)], tolerance=0.01, evaluated=True)
    judged = verdicts["01-quantize_int8.onnx"]
    assert judged.verdict == "slower_than_float"
    assert judged.reason == ("1.20x slower at batch 1 than the float artifact 00-export_onnx.onnx (6 ms vs 5 ms p50)")
    assert rec.artifact == "00-export_onnx.onnx"
    # Against the original when it is the fastest float model; the export itself is judged too.
    verdicts, _ = recommend([original(10.0), fp32(11.0), int8(12.5)], tolerance=0.01, evaluated=True)
    assert (
        verdicts["01-quantize_int8.onnx"].reason == "1.25x slower at batch 1 than the original (12.5 ms vs 10 ms p50)"
    )
    assert verdicts["00-export_onnx.onnx"].verdict == "slower_than_float"


def test_when_nothing_beats_the_original_nothing_is_recommended_and_one_line_says_why():
    verdicts, rec = recommend([original(10.0), fp32(11.0), int8(4.0, top1=0.759)], tolerance=0.01, evaluated=True)
    assert rec.artifact is None and rec.metrics is None
    assert rec.reason == (
        "nothing beats the original: 00-export_onnx.onnx is 1.10x slower at batch 1 than the "
        "original (11 ms vs 10 ms p50); 01-quantize_int8.onnx loses 4.1 points of top-1 "
        "(tolerance 1.0)"
    )
    assert "\n" not in rec.reason


def test_a_tie_within_two_percent_goes_to_the_smaller_file():
    # INT8 1.5% slower than the FP32 export but a quarter of its size: the tie goes to INT8.
    _, rec = recommend([original(10.0), fp32(5.0), int8(5.075)], tolerance=0.01, evaluated=True)
    assert rec.artifact == "01-quantize_int8.onnx"
    assert rec.reason.startswith(
        "smallest of the fastest within the tolerance (0.25x the size of "
        "00-export_onnx.onnx, whose p50 of 5 ms it matches within 2%): "
    )
    # 3% slower is not a tie, and is slower than the float export.
    verdicts, rec = recommend([original(10.0), fp32(5.0), int8(5.15)], tolerance=0.01, evaluated=True)
    assert rec.artifact == "00-export_onnx.onnx" and verdicts["01-quantize_int8.onnx"].verdict == "slower_than_float"
    # An export as fast as the original and no smaller does not beat it.
    _, rec = recommend([original(10.0, size=4_000_000), fp32(9.9, size=4_000_100)], tolerance=0.01, evaluated=True)
    assert rec.artifact is None and rec.reason == (
        "nothing beats the original: 00-export_onnx.onnx matches the original's p50 within 2% (9.9 ms vs 10 ms) "
        "and is not smaller (1.00x its size)"
    )


def test_a_tie_at_batch_1_goes_to_what_keeps_up_at_the_largest_batch():
    # FP16 on a CPU without FP16 arithmetic: as fast as the export at batch 1, half its size, 4.7x
    # slower at batch 8 (measured on the digits net). The smaller file loses the tie.
    fp16 = Candidate(
        "01-convert_fp16.onnx",
        "convert_fp16",
        2_000_000,
        5.05,
        lossless=False,
        metric=metric(0.80),
        throughput=(8, 38_000.0),
    )
    _, rec = recommend([original(10.0), fp32(5.0, throughput=(8, 181_000.0)), fp16], tolerance=0.01, evaluated=True)
    assert rec.artifact == "00-export_onnx.onnx"
    # Within 2% at the largest batch too, size decides again.
    fp16 = Candidate(
        "01-convert_fp16.onnx",
        "convert_fp16",
        2_000_000,
        5.05,
        lossless=False,
        metric=metric(0.80),
        throughput=(8, 180_000.0),
    )
    _, rec = recommend([original(10.0), fp32(5.0, throughput=(8, 181_000.0)), fp16], tolerance=0.01, evaluated=True)
    assert rec.artifact == "01-convert_fp16.onnx"


def test_a_tie_lost_under_load_says_so_with_the_numbers_not_that_it_is_not_smaller():
    # Half the original's size and as fast at batch 1, but 4x slower at batch 8: the original keeps it.
    base = Candidate(ORIGINAL, None, 4_000_000, 10.0, lossless=True, metric=metric(0.80), throughput=(8, 2000.0))
    fp16 = Candidate(
        "01-convert_fp16.onnx",
        "convert_fp16",
        2_000_000,
        10.1,
        lossless=False,
        metric=metric(0.80),
        throughput=(8, 500.0),
    )
    _, rec = recommend([base, fp16], tolerance=0.01, evaluated=True)
    assert rec.artifact is None
    assert rec.reason == (
        "nothing beats the original: 01-convert_fp16.onnx ties at batch 1 (10.1 ms p50, within 2% "
        "of the fastest) but falls behind at batch 8 (500 vs 2000 images/s for the original)"
    )


def floor(value: float, met: bool) -> dict:
    return {"name": "worst_class_channel_snr_db", "min": 15.0, "value": value, "met": met}


def test_a_detector_under_its_class_channel_floor_is_over_tolerance_whatever_its_f1():
    coarse = Candidate(
        "01-quantize_int8.onnx",
        "quantize_int8",
        1_000_000,
        4.0,
        lossless=False,
        metric={**metric(0.99, reference=1.0, name="f1_vs_float"), "floor": floor(9.34, False)},
    )
    verdicts, rec = recommend([original(10.0), coarse], tolerance=0.01, evaluated=True)
    judged = verdicts[coarse.name]
    assert judged.verdict == "over_tolerance"
    assert judged.reason == "worst class-channel SNR 9.3 dB < floor 15 dB"  # the F1 drop (0.01) alone meets it
    assert rec.artifact is None and rec.reason == (
        "nothing beats the original: 01-quantize_int8.onnx misses its floor (worst class-channel SNR 9.3 dB < "
        "floor 15 dB)"
    )
    # Over on both counts, both are named; a floor met is said beside the drop.
    both = Candidate(
        "q",
        "quantize_int8",
        1,
        4.0,
        lossless=False,
        metric={**metric(0.9, reference=1.0, name="f1_vs_float"), "floor": floor(3.0, False)},
    )
    assert recommend([original(10.0), both], tolerance=0.01, evaluated=True)[0]["q"].reason == (
        "F1 vs FP32 0.9000 vs 1.0000, drop 0.1000 > tolerance 0.01; worst class-channel SNR 3.0 dB < floor 15 dB"
    )
    fine = Candidate(
        "q",
        "quantize_int8",
        1,
        4.0,
        lossless=False,
        metric={**metric(0.995, reference=1.0, name="f1_vs_float"), "floor": floor(21.04, True)},
    )
    verdicts, rec = recommend([original(10.0), fine], tolerance=0.01, evaluated=True)
    assert rec.artifact == "q" and "worst class-channel SNR 21.0 dB >= floor 15 dB" in verdicts["q"].reason


def test_one_default_tolerance():
    from core.schemas import JobCreate, JobRead
    from core.tasks import DEFAULT_TOLERANCE

    assert JobCreate(model_id="m", preset="onnx").max_accuracy_drop == DEFAULT_TOLERANCE
    assert JobRead.model_fields["max_accuracy_drop"].default == DEFAULT_TOLERANCE
    steps = [
        StepFacts("benchmark", True, BENCH),
        StepFacts(
            "evaluate",
            True,
            {
                "results": [
                    {"artifact": ORIGINAL, "metric": {**metric(0.80), "drop": 0.0}},
                    {"artifact": "01-quantize_int8.onnx", "metric": metric(0.80 - DEFAULT_TOLERANCE)},
                ]
            },
        ),
    ]
    report = report_for(
        job_id="j",
        status=JobStatus.succeeded,
        task="classification",
        task_options={},
        steps=steps,
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=ARTIFACTS[1:2],
    )
    assert report.recommended.tolerance == DEFAULT_TOLERANCE and report.recommended.artifact == "01-quantize_int8.onnx"


def test_without_an_evaluate_step_only_lossless_float_conversions_compete():
    candidates = [original(10.0, size=4_000_000), fp32(8.0, m=None), int8(2.0, top1=None)]
    verdicts, rec = recommend(candidates, tolerance=0.01, evaluated=False)
    assert rec.artifact == "00-export_onnx.onnx" and not rec.accuracy_verified
    assert rec.metrics.metric is None and rec.metrics.speedup == pytest.approx(1.25)
    assert "accuracy not verified (the job has no evaluate step)" in rec.reason
    assert verdicts["01-quantize_int8.onnx"].verdict == "not_measured"
    assert verdicts["01-quantize_int8.onnx"].reason == "accuracy not measured: the job has no evaluate step"
    assert verdicts["00-export_onnx.onnx"].reason.startswith("lossless float conversion")
    # Nothing lossless beats the original: null, and the line says accuracy was not verified.
    _, rec = recommend([original(10.0), int8(2.0, top1=None)], tolerance=0.01, evaluated=False)
    assert rec.artifact is None and "01-quantize_int8.onnx was not measured" in rec.reason
    assert "accuracy not verified" in rec.reason


def test_not_measured_says_what_is_missing():
    engine = Candidate(
        "02-build_tensorrt.engine",
        "build_tensorrt",
        900,
        None,
        False,
        unbenchmarked="not benchmarked: a TensorRT engine needs a GPU",
        unevaluated="not evaluated: a TensorRT engine needs a GPU",
    )
    no_eval = int8(3.0, top1=None, unevaluated="not evaluated (made after the evaluate step)")
    verdicts, rec = recommend([original(10.0), engine, no_eval], tolerance=0.01, evaluated=True)
    assert verdicts[engine.name].verdict == "not_measured"
    assert verdicts[engine.name].reason == (
        "not benchmarked: a TensorRT engine needs a GPU; not evaluated: a TensorRT engine needs a GPU"
    )
    assert verdicts[no_eval.name].reason == "not evaluated (made after the evaluate step)"
    assert rec.artifact is None and f"{engine.name} was not measured (not benchmarked" in rec.reason
    # An artifact over the tolerance says so even when it could not be timed.
    verdicts, _ = recommend(
        [original(10.0), int8(None, top1=0.5, unbenchmarked="batch 1 failed: x")], tolerance=0.01, evaluated=True
    )
    assert verdicts["01-quantize_int8.onnx"].verdict == "over_tolerance"


def test_nothing_timed_means_nothing_recommended():
    _, rec = recommend([original(None), fp32(None)], tolerance=0.01, evaluated=False)
    assert rec.artifact is None and rec.reason == "nothing was timed at batch 1: add a benchmark step to the recipe"


@pytest.mark.parametrize(
    ("step", "meta", "keeps"),
    [
        (None, {}, True),
        ("export_onnx", {}, True),
        ("export_pt2", {}, True),
        ("compile_gpu", {"precision": "fp32"}, True),
        ("compile_gpu", {"precision": "fp16"}, False),
        ("convert_tflite", {"precision": "fp32"}, True),
        ("convert_tflite", {"precision": "int8"}, False),
        ("build_tensorrt", {"precision": "fp32"}, False),
        ("convert_fp16", {}, False),
        ("quantize_int8", {}, False),
        ("quantize_int8_torch", {}, False),
        ("prune_structured", {}, False),
        ("prune_unstructured", {}, False),
        ("distill", {}, False),
        ("finetune", {}, False),
        ("some_new_step", {}, False),
    ],
)
def test_which_steps_keep_float(step, meta, keeps):
    assert step_keeps_float(step, meta) is keeps


def test_an_export_of_a_pruned_model_is_not_lossless_and_a_deployment_file_does_not_break_the_chain():
    def facts(name, step, fmt="onnx", **meta):
        return ArtifactFacts(name, step, fmt, 1, meta)

    pruned = [
        facts("00", "prune_structured", "state_dict"),
        facts("01", "distill", "state_dict"),
        facts("02", "export_pt2", "exported_program"),
        facts("03", "export_onnx"),
    ]
    assert lossless_artifacts(pruned) == set()
    # An FP16 TFLite file ends its branch: the FP32 package after it was made from the export.
    branches = [
        facts("00", "export_pt2", "exported_program"),
        facts("01", "convert_tflite", "tflite", precision="fp16"),
        facts("02", "compile_gpu", "aoti_package", precision="fp32"),
    ]
    assert lossless_artifacts(branches) == {"00", "02"}
    # compile_gpu's fallback is an FP16 ExportedProgram, which the next step takes.
    fallback = [facts("00", "compile_gpu", "exported_program", precision="fp16"), facts("01", "export_onnx")]
    assert lossless_artifacts(fallback) == set()


# -- the report -----------------------------------------------------------------------------------


def bench_result(name: str, p50: float | None, **extra) -> dict:
    latency = (
        {"1": {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2, "mean_ms": p50, "images_per_s": 1000 / p50}}
        if p50
        else {}
    )
    return {"artifact": name, "latency": latency, **extra}


ARTIFACTS = [
    ArtifactFacts("00-export_onnx.onnx", "export_onnx", "onnx", 4_000_000),
    ArtifactFacts("01-quantize_int8.onnx", "quantize_int8", "onnx", 1_000_000),
    ArtifactFacts("02-build_tensorrt.engine", "build_tensorrt", "tensorrt_engine", 1_200_000, {"precision": "int8"}),
]
BENCH = {
    "machine": {"cpu": "test"},
    "results": [
        bench_result(ORIGINAL, 10.0),
        bench_result("00-export_onnx.onnx", 9.0),
        bench_result("01-quantize_int8.onnx", 4.0),
        {"artifact": "02-build_tensorrt.engine", "skipped": "a TensorRT engine needs a GPU", "latency": {}},
    ],
}


def test_the_report_carries_each_verdict_and_the_recommendation_once_the_job_succeeded():
    evaluation = {
        "results": [
            {"artifact": ORIGINAL, "task": "classification", "metric": {**metric(0.80), "drop": 0.0}},
            {"artifact": "00-export_onnx.onnx", "metric": metric(0.80)},
            {
                "artifact": "01-quantize_int8.onnx",
                "metric": metric(0.795),
                "fidelity": {"cosine": 0.99, "box_snr_db": None},
            },
            {"artifact": "02-build_tensorrt.engine", "skipped": "a TensorRT engine needs a GPU"},
        ]
    }
    steps = [
        StepFacts("export_onnx", True, {}),
        StepFacts("quantize_int8", True, {}),
        StepFacts("build_tensorrt", True, {}),
        StepFacts("benchmark", True, BENCH),
        StepFacts("evaluate", True, evaluation),
    ]
    report = report_for(
        job_id="j",
        status=JobStatus.succeeded,
        task="auto",
        task_options={"max_accuracy_drop": 0.01},
        steps=steps,
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=ARTIFACTS,
    )
    assert report.task == "classification"  # auto, resolved by the evaluation
    assert list(report.model_dump())[:3] == ["job_id", "status", "recommended"]
    by_name = {e.name: e for e in report.entries}
    assert [e.verdict for e in report.entries] == ["original", "meets_tolerance", "meets_tolerance", "not_measured"]
    assert by_name["02-build_tensorrt.engine"].verdict_reason == (
        "not benchmarked: a TensorRT engine needs a GPU; not evaluated: a TensorRT engine needs a GPU"
    )
    assert by_name["01-quantize_int8.onnx"].metric["drop"] == pytest.approx(0.005)
    assert by_name["01-quantize_int8.onnx"].fidelity == {"cosine": 0.99}  # a measure not taken is left out
    assert report.recommended.artifact == "01-quantize_int8.onnx"

    running = report_for(
        job_id="j",
        status=JobStatus.running,
        task="classification",
        task_options={},
        steps=steps,
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=ARTIFACTS,
    )
    assert running.recommended is None and running.entries[2].verdict == "meets_tolerance"


def test_a_stricter_tolerance_from_the_job_changes_the_answer_and_old_evaluations_still_count():
    # Recorded before evaluate wrote a metric: top-1 from the accuracy (agreement without labels).
    evaluation = {
        "results": [
            {"artifact": ORIGINAL, "accuracy": {"top1": 0.80}},
            {"artifact": "00-export_onnx.onnx", "accuracy": {"top1": 0.80}},
            {"artifact": "01-quantize_int8.onnx", "accuracy": {"top1": 0.795}},
        ]
    }
    steps = [StepFacts("benchmark", True, BENCH), StepFacts("evaluate", True, evaluation)]
    kw = dict(
        job_id="j",
        status=JobStatus.succeeded,
        task="classification",
        steps=steps,
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=ARTIFACTS[:2],
    )
    assert report_for(task_options={}, **kw).recommended.artifact == "01-quantize_int8.onnx"  # default 0.01
    strict = report_for(task_options={"max_accuracy_drop": 0.001}, **kw)
    assert strict.recommended.artifact == "00-export_onnx.onnx"
    assert strict.entries[2].verdict == "over_tolerance" and strict.entries[2].metric["name"] == "top1"


# -- through the API ------------------------------------------------------------------------------


def _succeeded_job(api, key: str) -> str:  # noqa: F811
    """A job (tolerance 0.02) written as succeeded with three artifacts, timed and evaluated."""
    from core.db import get_sessionmaker
    from core.models import Artifact, Job, JobStep, StepStatus, utcnow

    model = api.post("/v1/models", files={"file": ("tiny.onnx", tiny_onnx())}, headers=bearer(key)).json()
    job = api.post(
        "/v1/jobs", json={"model_id": model["id"], "preset": "onnx", "max_accuracy_drop": 0.02}, headers=bearer(key)
    ).json()
    assert api.get(f"/v1/jobs/{job['id']}", headers=bearer(key)).json()["recommended"] is None  # still queued

    names = ["tiny.onnx", "00-export_onnx.onnx", "01-quantize_int8.onnx", "02-convert_fp16.onnx"]
    bench = {
        "machine": {"cpu": "test"},
        "results": [bench_result(n, p50) for n, p50 in zip(names, [2.0, 1.9, 0.8, 1.0], strict=True)],
    }
    evaluation = {
        "results": [
            {"artifact": n, "metric": metric(v, reference=0.9)}
            for n, v in zip(names, [0.9, 0.9, 0.85, 0.89], strict=True)
        ]
    }
    with get_sessionmaker()() as s:
        row = s.get(Job, job["id"])
        now = utcnow()
        row.status, row.finished_at = JobStatus.succeeded, now
        row.steps = [
            JobStep(index=i, name=n, config={}, status=StepStatus.succeeded, metrics=m)
            for i, (n, m) in enumerate(
                [
                    ("export_onnx", {}),
                    ("quantize_int8", {}),
                    ("convert_fp16", {}),
                    ("benchmark", bench),
                    ("evaluate", evaluation),
                ]
            )
        ]
        s.add_all(
            [
                Artifact(
                    job_id=row.id,
                    step_index=i,
                    step=name.split("-", 1)[1].removesuffix(".onnx"),
                    name=name,
                    format="onnx",
                    storage_key=f"artifacts/{name}",
                    sha256="0" * 64,
                    size_bytes=size,
                )
                for i, (name, size) in enumerate(zip(names[1:], [400, 100, 200], strict=True))
            ]
        )
        s.commit()
    return job["id"]


def test_the_api_reports_the_recommendation_and_the_job_shows_it_for_one_more_query(api):  # noqa: F811
    _, _, key = new_tenant_key(api, "recommend")
    job = {"id": _succeeded_job(api, key)}

    report = api.get(f"/v1/jobs/{job['id']}/report", headers=bearer(key)).json()
    assert list(report)[:3] == ["job_id", "status", "recommended"]
    assert [e["verdict"] for e in report["entries"]] == [
        "original",
        "meets_tolerance",
        "over_tolerance",
        "meets_tolerance",
    ]
    rec = report["recommended"]
    # INT8 loses 5 points (tolerance 2): FP16 at 1.0 ms is the fastest within it.
    assert rec["artifact"] == "02-convert_fp16.onnx" and rec["tolerance"] == 0.02
    assert rec["metrics"]["speedup"] == pytest.approx(2.0) and rec["metrics"]["metric"]["drop"] == pytest.approx(0.01)

    api.get("/v1/tenant", headers=bearer(key))  # the key is now known to this process
    with Statements() as sent:
        shown = api.get(f"/v1/jobs/{job['id']}", headers=bearer(key)).json()
    assert shown["recommended"] == rec
    # One query more than a queued job's view: the model and its artifacts, joined.
    extra = [q for q in sent.sql if "artifacts" in q or "FROM models" in q]
    assert len(extra) == 1 and "FROM models LEFT OUTER JOIN artifacts" in extra[0], sent.sql
    assert len(sent.sql) == 3, sent.sql  # the job, its steps, and that one

    page = api.get(f"/v1/jobs/{job['id']}/report.html", headers=bearer(key)).text
    box = page[page.index('<section id="recommendation"') : page.index("</section>")]
    assert "Recommended: <code>02-convert_fp16.onnx</code>" in box and "2.00x the original&#x27;s speed" in box
    assert page.index('id="recommendation"') < page.index('id="artifacts"')
    assert "over tolerance" in page and "★ recommended" in page


def test_the_job_list_builds_no_report_per_job(api):  # noqa: F811
    _, _, key = new_tenant_key(api, "listing")
    ids = [_succeeded_job(api, key) for _ in range(3)]
    api.get("/v1/tenant", headers=bearer(key))  # the key is now known to this process
    with Statements() as sent:
        listed = api.get("/v1/jobs", headers=bearer(key)).json()
    assert sorted(j["id"] for j in listed["data"]) == sorted(ids)
    assert [j["recommended"] for j in listed["data"]] == [None, None, None]
    assert not [q for q in sent.sql if "FROM models LEFT OUTER JOIN artifacts" in q], sent.sql
    # One job read still carries it.
    assert api.get(f"/v1/jobs/{ids[0]}", headers=bearer(key)).json()["recommended"]["artifact"] == (
        "02-convert_fp16.onnx"
    )


def test_the_page_leads_with_why_nothing_beats_the_original():
    from api.report_html import render
    from core.models import Job, Model, utcnow

    evaluation = {
        "results": [
            {"artifact": ORIGINAL, "metric": {**metric(0.80), "drop": 0.0}},
            {"artifact": "00-export_onnx.onnx", "metric": metric(0.80)},
            {"artifact": "01-quantize_int8.onnx", "metric": metric(0.759)},
        ]
    }
    bench = {
        "results": [
            bench_result(ORIGINAL, 10.0),
            bench_result("00-export_onnx.onnx", 11.0),
            bench_result("01-quantize_int8.onnx", 4.0),
        ]
    }
    report = report_for(
        job_id="j",
        status=JobStatus.succeeded,
        task="classification",
        task_options={},
        steps=[StepFacts("benchmark", True, bench), StepFacts("evaluate", True, evaluation)],
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=ARTIFACTS[:2],
    )
    job = Job(
        id="j",
        name="<nothing>",
        status=JobStatus.succeeded,
        preset="onnx-int8",
        created_at=utcnow(),
        task_options={},
        steps=[],
        model=Model(filename=ORIGINAL, format="onnx"),
    )
    page = render(job, report)
    box = page[page.index('<section id="recommendation"') : page.index("</section>")]
    assert "No artifact recommended" in box
    assert (
        "nothing beats the original: 00-export_onnx.onnx is 1.10x slower at batch 1 than the original "
        "(11 ms vs 10 ms p50); 01-quantize_int8.onnx loses 4.1 points of top-1 (tolerance 1.0)"
    ) in box
    assert "★ recommended" not in page and page.count("over tolerance") == 1


def test_the_page_lists_the_nodes_kept_in_float_by_rule_one_row_per_reason():
    from api.report_html import render
    from core.models import Job, JobStep, Model, StepStatus, utcnow

    head = {
        "node": "/model.22/Concat_5",
        "op_type": "Concat",
        "reason": "mixed-scale head: its inputs' calibrated ranges differ 640x",
        "range_ratio": 640.0,
    }
    tail = [
        {
            "node": f"/model.22/Sigmoid_{i}",
            "op_type": op,
            "reason": "after the mixed-scale head /model.22/Concat_5, up to the outputs",
        }
        for i, op in enumerate(["Sigmoid", "Mul", "Transpose"])
    ]
    step = JobStep(
        index=1, name="quantize_int8", config={}, status=StepStatus.succeeded, metrics={"float_nodes": [head, *tail]}
    )
    job = Job(
        id="j",
        name="det",
        status=JobStatus.succeeded,
        preset="onnx-int8",
        created_at=utcnow(),
        task_options={},
        steps=[step],
        model=Model(filename=ORIGINAL, format="onnx"),
    )
    report = report_for(
        job_id="j",
        status=JobStatus.succeeded,
        task="detection",
        task_options={},
        steps=[],
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=[],
    )
    page = render(job, report)
    section = page[page.index('<section class="float-nodes">') :]
    section = section[: section.index("</section>")]
    assert "Kept in float by rule (quantize_int8, step 1)" in section
    assert section.count("<tr>") == 3  # the header, the head, its tail folded into one row
    assert (
        "/model.22/Concat_5</td><td>Concat</td><td>mixed-scale head: its inputs&#x27; calibrated ranges differ 640x"
    ) in section
    assert "<summary>3 nodes</summary>/model.22/Sigmoid_0, /model.22/Sigmoid_1, /model.22/Sigmoid_2" in section
    assert "<td>Sigmoid, Mul, Transpose</td>" in section


# -- constraints (issue 13): max_latency_ms and max_size_mb bind like the tolerance -------------------


def test_constraints_are_limits_beyond_the_tolerance():
    from core.recommend import Limits

    assert not Limits.of(None) and not Limits.of({}) and not Limits.of({"max_accuracy_drop": 0.02})
    assert Limits.of({"max_latency_ms": 5.0, "max_accuracy_drop": 0.02}) == Limits(max_latency_ms=5.0)
    on_the_limit = int8(5.0, size=2_000_000)
    assert Limits(max_latency_ms=5.0, max_size_mb=2.0).misses(on_the_limit) == []  # at the limit meets it
    assert Limits(max_latency_ms=4.0, max_size_mb=1.5).misses(on_the_limit) == [
        "p50 5 ms > max_latency_ms 4",
        "size 2 MB > max_size_mb 1.5",
    ]
    assert Limits(max_latency_ms=4.0, max_size_mb=1.5).overshoot(on_the_limit) == pytest.approx(2.0 / 1.5)
    assert Limits(max_latency_ms=10.0).overshoot(on_the_limit) == 1.0  # within: counted as on the limit


def test_an_artifact_within_the_tolerance_over_max_latency_misses_the_constraint_and_says_by_how_much():
    from core.recommend import Limits

    fp16 = Candidate("02-x.onnx", "convert_fp16", 2_000_000, 6.0, lossless=False, metric=metric(0.80))
    verdicts, rec = recommend(
        [original(10.0), fp32(9.0), int8(4.0), fp16],
        tolerance=0.01,
        evaluated=True,
        limits=Limits(max_latency_ms=5.0),
    )
    assert verdicts["00-export_onnx.onnx"].verdict == "misses_constraint"
    assert verdicts["00-export_onnx.onnx"].reason == (
        "p50 9 ms > max_latency_ms 5; top-1 0.8000 vs 0.8000, drop 0.0000 <= tolerance 0.01; "
        "1.11x the original's speed at batch 1"
    )
    assert verdicts["02-x.onnx"].verdict == "misses_constraint"
    assert verdicts["01-quantize_int8.onnx"].verdict == "meets_tolerance"
    assert rec.artifact == "01-quantize_int8.onnx" and rec.closest is None and rec.missed == []
    # The pool is what meets every constraint: the export (9 ms) and FP16 (6 ms) are no runner-up.
    assert "next:" not in rec.reason


def test_a_float_model_over_max_size_is_no_speed_reference_for_an_int8_one_that_meets_it():
    from core.recommend import Limits

    # The FP32 export is faster (5 ms) but 4 MB; INT8 is 6 ms and 1 MB. Without a size limit the export
    # wins and INT8 is slower_than_float; with max_size_mb 2 INT8 is the only answer that meets everything.
    verdicts, rec = recommend([original(10.0), fp32(5.0), int8(6.0)], tolerance=0.01, evaluated=True)
    assert rec.artifact == "00-export_onnx.onnx" and verdicts["01-quantize_int8.onnx"].verdict == "slower_than_float"
    verdicts, rec = recommend(
        [original(10.0), fp32(5.0), int8(6.0)], tolerance=0.01, evaluated=True, limits=Limits(max_size_mb=2.0)
    )
    assert verdicts["00-export_onnx.onnx"].verdict == "misses_constraint"
    assert verdicts["00-export_onnx.onnx"].reason.startswith("size 4 MB > max_size_mb 2; ")
    assert verdicts["01-quantize_int8.onnx"].verdict == "meets_tolerance"
    assert rec.artifact == "01-quantize_int8.onnx"
    assert rec.metrics.p50_ms == 6.0 and rec.metrics.size_ratio == pytest.approx(0.25)


def test_the_original_that_misses_a_constraint_does_not_win():
    from core.recommend import Limits

    # The original is the fastest (4 ms) and within everything but size: without limits it wins.
    _, rec = recommend([original(4.0), int8(5.0)], tolerance=0.01, evaluated=True)
    assert rec.artifact is None and rec.reason.startswith("nothing beats the original: ")
    _, rec = recommend([original(4.0), int8(5.0)], tolerance=0.01, evaluated=True, limits=Limits(max_size_mb=2.0))
    assert rec.artifact == "01-quantize_int8.onnx"
    assert rec.reason.startswith(
        "fastest within the tolerance and the constraints: 0.80x the original's speed at batch 1 (5 ms vs 4 ms p50)"
    )
    # An original that meets the limits still competes, and a faster artifact over a limit is named.
    _, rec = recommend(
        [original(10.0), int8(4.0, size=5_000_000)], tolerance=0.01, evaluated=True, limits=Limits(max_size_mb=4.5)
    )
    assert rec.artifact is None and rec.reason == (
        "nothing beats the original: 01-quantize_int8.onnx misses a constraint (size 5 MB > max_size_mb 4.5)"
    )


def test_when_nothing_meets_the_constraints_nothing_is_recommended_and_the_closest_is_named_with_its_misses():
    from core.recommend import Limits

    limits = Limits(max_latency_ms=5.0, max_size_mb=0.5)
    # Over the worst limit: the original 8x (size), the export 8x (size), INT8 2x (size 1 MB / 0.5).
    verdicts, rec = recommend([original(10.0), fp32(9.0), int8(6.0)], tolerance=0.01, evaluated=True, limits=limits)
    assert rec.artifact is None and rec.metrics is None
    assert rec.closest == "01-quantize_int8.onnx"
    assert rec.missed == ["p50 6 ms > max_latency_ms 5", "size 1 MB > max_size_mb 0.5"]
    assert rec.reason == (
        "nothing within the tolerance meets the constraints; the closest is 01-quantize_int8.onnx "
        "(p50 6 ms > max_latency_ms 5; size 1 MB > max_size_mb 0.5)"
    )
    assert verdicts["01-quantize_int8.onnx"].verdict == "misses_constraint"
    # Equally far over: the faster one is closer.
    fp16 = Candidate("02-convert_fp16.onnx", "convert_fp16", 1_000_000, 5.5, lossless=False, metric=metric(0.80))
    _, rec = recommend(
        [original(10.0), int8(6.0), fp16], tolerance=0.01, evaluated=True, limits=Limits(max_size_mb=0.5)
    )
    assert rec.closest == "02-convert_fp16.onnx" and rec.missed == ["size 1 MB > max_size_mb 0.5"]


def test_an_artifact_over_the_tolerance_is_never_the_closest_the_original_can_be():
    from core.recommend import Limits

    # INT8 meets the latency limit but loses 10 points: the closest within the tolerance is the original.
    verdicts, rec = recommend(
        [original(10.0), int8(4.0, top1=0.70)], tolerance=0.01, evaluated=True, limits=Limits(max_latency_ms=5.0)
    )
    assert verdicts["01-quantize_int8.onnx"].verdict == "over_tolerance"
    assert rec.artifact is None and rec.closest == ORIGINAL
    assert rec.reason == (
        "nothing within the tolerance meets the constraints; the closest is the original (p50 10 ms > max_latency_ms 5)"
    )
    # Nothing timed at all: no closest, and the reason says what to add.
    _, rec = recommend([original(None), int8(None)], tolerance=0.01, evaluated=True, limits=Limits(max_latency_ms=5.0))
    assert rec.artifact is None and rec.closest is None and rec.missed == []
    assert rec.reason == "nothing was timed at batch 1: add a benchmark step to the recipe"


def test_the_reason_names_the_runner_up_and_how_much_slower_it_is():
    _, rec = recommend([original(10.0), fp32(8.0), int8(4.0)], tolerance=0.01, evaluated=True)
    assert rec.reason.endswith("drop 0.0050 <= tolerance 0.01; next: 00-export_onnx.onnx at 2.00x its p50")
    _, rec = recommend([original(10.0), int8(4.0)], tolerance=0.01, evaluated=True)
    assert rec.reason.endswith("; next: the original at 2.50x its p50")
    # A win by size within the tie: the runner-up is the faster file it matched.
    _, rec = recommend([original(10.0), fp32(5.0), int8(5.075)], tolerance=0.01, evaluated=True)
    assert rec.artifact == "01-quantize_int8.onnx" and rec.reason.endswith(
        "; next: 00-export_onnx.onnx (5 ms p50, tied and larger)"
    )
    # Alone in the pool: no runner-up; without an evaluate step the note still ends the line.
    _, rec = recommend([original(None), fp32(8.0, m=None)], tolerance=0.01, evaluated=False)
    assert "next:" not in rec.reason and rec.reason.endswith("only lossless float conversions were considered")


# -- the Pareto front ---------------------------------------------------------------------------------


def test_the_pareto_front_keeps_what_nothing_dominates_and_both_of_a_duplicate():
    from core.recommend import pareto_front

    points = {
        "fast": (1.0, 10.0, 0.0),
        "small": (2.0, 5.0, 0.0),
        "slower_same_size": (3.0, 5.0, 0.0),  # dominated by small: slower, same size and drop
        "fast_but_lossier": (1.0, 10.0, 0.01),  # dominated by fast: ties two objectives, worse on one
        "fastest_lossy": (0.5, 20.0, 0.05),  # fastest of all: on the front despite its drop
        "copy_of_fast": (1.0, 10.0, 0.0),  # equal points dominate neither: both stay
    }
    assert pareto_front(points) == {"fast", "small", "fastest_lossy", "copy_of_fast"}
    assert pareto_front({}) == set()
    assert pareto_front({"only": (5.0, 5.0, 5.0)}) == {"only"}
    # A trade-off on every objective: all three on the front.
    assert pareto_front({"a": (1, 3, 2), "b": (2, 1, 3), "c": (3, 2, 1)}) == {"a", "b", "c"}


OV = "02-convert_openvino.openvino.zip"
FRONT_ARTIFACTS = [
    ArtifactFacts("00-export_onnx.onnx", "export_onnx", "onnx", 4_000_000),
    ArtifactFacts(
        "01-convert_openvino.openvino.zip",
        "convert_openvino",
        "openvino_ir",
        4_100_000,
        {"precision": "fp32", "inference_precision": "f32", "weights": "fp32"},
    ),
    ArtifactFacts("04-quantize_int8.onnx", "quantize_int8", "onnx", 1_000_000, {"quant_format": "QOperator"}),
    ArtifactFacts("05-convert_fp16.onnx", "convert_fp16", "onnx", 2_000_000),
]


def _front_report(constraints: dict | None = None, **options):
    bench = {
        "machine": {"cpu": "test"},
        "results": [
            bench_result(ORIGINAL, 10.0),
            bench_result("00-export_onnx.onnx", 9.0),
            bench_result("01-convert_openvino.openvino.zip", 6.0, runtime={"inference_precision": "f32"}),
            bench_result("04-quantize_int8.onnx", 5.0),
            bench_result("05-convert_fp16.onnx", 7.0),
        ],
    }
    evaluation = {
        "results": [
            {"artifact": ORIGINAL, "task": "classification", "metric": {**metric(0.80), "drop": 0.0}},
            {"artifact": "00-export_onnx.onnx", "metric": metric(0.80)},
            {"artifact": "01-convert_openvino.openvino.zip", "metric": metric(0.80)},
            {"artifact": "04-quantize_int8.onnx", "metric": metric(0.795)},
            # FP16 never evaluated: not judged, so neither on nor off the front.
            {"artifact": "05-convert_fp16.onnx", "skipped": "evaluation ran out of time"},
        ]
    }
    steps = [
        StepFacts("export_onnx", True, {}, index=0),
        StepFacts("convert_openvino", True, {}, index=1, optional=True),
        StepFacts(
            "convert_openvino",
            False,
            {"error": {"code": "conversion_failed", "message": "output SNR 12.0 dB < 20 dB"}},
            index=2,
            optional=True,
            failed=True,
            config={"inference_precision": "bf16", "weights": "fp32"},
            message="conversion_failed: output SNR 12.0 dB < 20 dB",
        ),
        StepFacts(
            "quantize_openvino",
            False,
            {},
            index=3,
            optional=True,
            failed=True,
            config={"preset": "performance"},
            message="out of memory at step quantize_openvino",
        ),
        StepFacts("quantize_int8", True, {}, index=4, optional=True),
        StepFacts("convert_fp16", True, {}, index=5),
        StepFacts("benchmark", True, bench, index=6),
        StepFacts("evaluate", True, evaluation, index=7),
    ]
    task_options = {"max_accuracy_drop": 0.01, **options}
    if constraints is not None:
        task_options["constraints"] = constraints
    return report_for(
        job_id="j",
        status=JobStatus.succeeded,
        task="auto",
        task_options=task_options,
        steps=steps,
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=FRONT_ARTIFACTS,
    )


def test_the_report_draws_the_front_lists_failed_and_left_out_candidates_and_labels_every_entry():
    left = [{"step": "evaluate", "config": {}, "reason": "needs evaluation_dataset_id"}]
    report = _front_report({"max_latency_ms": 8.0, "max_accuracy_drop": 0.01}, target="x86-cpu", left_out=left)
    by_name = {e.name: e for e in report.entries}
    assert [e.label for e in report.entries] == [
        "original (ONNX)",
        "ONNX Runtime FP32",
        "OpenVINO f32",
        "ONNX Runtime INT8 QOperator",
        "ONNX Runtime FP16",
    ]
    # INT8 (5 ms, 1 MB, drop 0.005) is the fastest and smallest; OpenVINO f32 (6 ms, 4.1 MB, drop 0) the
    # fastest lossless; the export (9 ms, 4 MB) the smallest lossless. The original (10 ms, 4 MB, drop 0)
    # is dominated by the export: as small, as accurate, faster.
    assert report.front == ["04-quantize_int8.onnx", "01-convert_openvino.openvino.zip", "00-export_onnx.onnx"]
    assert [by_name[n].pareto for n in report.front] == [True] * 3 and by_name[ORIGINAL].pareto is False
    assert by_name["05-convert_fp16.onnx"].pareto is None  # timed but not judged
    # max_latency_ms 8: the export (9 ms) is slower than the OpenVINO float IR that meets it; INT8 wins.
    assert by_name["00-export_onnx.onnx"].verdict == "slower_than_float"
    assert by_name["01-convert_openvino.openvino.zip"].verdict == "meets_tolerance"
    assert report.recommended.artifact == "04-quantize_int8.onnx"
    assert report.recommended.reason.endswith("; next: 01-convert_openvino.openvino.zip at 1.20x its p50")
    assert [c.model_dump() for c in report.failed_candidates] == [
        {
            "index": 2,
            "step": "convert_openvino",
            "label": "OpenVINO bf16",
            "code": "conversion_failed",
            "message": "output SNR 12.0 dB < 20 dB",
        },
        {
            "index": 3,
            "step": "quantize_openvino",
            "label": "OpenVINO INT8 (NNCF)",
            "code": None,
            "message": "out of memory at step quantize_openvino",
        },
    ]
    assert [x.model_dump() for x in report.left_out] == left
    assert report.target == "x86-cpu"
    assert report.constraints.max_latency_ms == 8.0 and report.constraints.max_size_mb is None


def test_a_dominated_entry_is_off_the_front_and_ties_on_p50_list_the_smaller_first():
    report = _front_report()
    assert report.target is None and report.constraints is None and report.left_out == []
    assert report.recommended.closest is None and report.recommended.artifact == "04-quantize_int8.onnx"
    tied = [
        ArtifactFacts("00-export_onnx.onnx", "export_onnx", "onnx", 4_000_000),
        ArtifactFacts("01-quantize_int8.onnx", "quantize_int8", "onnx", 1_000_000),
        ArtifactFacts("02-y.onnx", "export_onnx", "onnx", 5_000_000),
    ]
    bench = {"results": [bench_result(ORIGINAL, 10.0), *(bench_result(a.name, 5.0) for a in tied)]}
    evaluation = {
        "results": [
            {"artifact": ORIGINAL, "metric": {**metric(0.80), "drop": 0.0}},
            {"artifact": "00-export_onnx.onnx", "metric": metric(0.80)},
            {"artifact": "01-quantize_int8.onnx", "metric": metric(0.795)},
            {"artifact": "02-y.onnx", "metric": metric(0.80)},
        ]
    }
    report = report_for(
        job_id="j",
        status=JobStatus.succeeded,
        task="classification",
        task_options={},
        steps=[StepFacts("benchmark", True, bench), StepFacts("evaluate", True, evaluation)],
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=tied,
    )
    by_name = {e.name: e for e in report.entries}
    # All at 5 ms: INT8 smaller but lossier, the export lossless; 02-y as fast and lossless but bigger
    # than the export (dominated), the original slower at the same size (dominated).
    assert report.front == ["01-quantize_int8.onnx", "00-export_onnx.onnx"]
    assert by_name["02-y.onnx"].pareto is False and by_name[ORIGINAL].pareto is False


def test_the_runner_up_set_aside_under_load_is_named_for_that_not_for_size():
    # FP16 ties the export at batch 1 and is half its size, but falls behind at batch 8: the export wins
    # because it keeps up, and the reason says so, not that it is the smallest.
    fp16 = Candidate("01-convert_fp16.onnx", "convert_fp16", 2_000_000, 5.0, False, metric(0.80), throughput=(8, 200.0))
    export = fp32(5.05, throughput=(8, 800.0))
    _, rec = recommend([original(10.0), export, fp16], tolerance=0.01, evaluated=True)
    assert rec.artifact == "00-export_onnx.onnx"
    assert rec.reason.startswith("fastest within the tolerance that keeps up at batch 8: ")
    assert rec.reason.endswith(
        "; next: 01-convert_fp16.onnx, tied at batch 1 but behind at batch 8 (200 vs 800 images/s)"
    )
