"""The report page of a job that chose among candidates (preset auto, a target, constraints), in
process: the front drawn (one marker per timed and judged entry, the front joined, the pick a star,
the constraint lines), each entry's label and front membership in the table, the candidates that
failed or were left out with why, and, when nothing meets the constraints, the closest candidate
named as a miss and never as the pick. Reports come from core.recommend.report_for on step metrics
as the worker writes them; a plain job's page gains only the labels. One test lays the chart out
in a real headless browser (Debian's chromium) and measures it."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from core.models import Job, JobStatus, Model, utcnow
from core.recommend import ArtifactFacts, StepFacts, report_for
from core.schemas import ReportRead
from tests.test_api_inprocess import model  # noqa: F401
from tests.test_browser import chromium, needs_chromium

ORIGINAL = "model.onnx"
# (name, step, format, meta, size bytes, p50 ms at batch 1 or None, top-1 or None: not evaluated)
OV = "openvino_ir"
CANDIDATES = [
    ("00-export_onnx.onnx", "export_onnx", "onnx", {}, 4_000_000, 9.0, 0.80),
    ("01-convert_openvino.zip", "convert_openvino", OV, {"inference_precision": "f32"}, 4_200_000, 6.0, 0.80),
    ("02-convert_openvino.zip", "convert_openvino", OV, {"inference_precision": "bf16"}, 4_000_000, 3.0, 0.798),
    ("03-quantize_int8.onnx", "quantize_int8", "onnx", {"quant_format": "QOperator"}, 1_000_000, 4.0, 0.796),
    ("04-quantize_openvino.zip", "quantize_openvino", OV, {}, 1_100_000, 2.0, 0.70),
    ("05-quantize_int8.onnx", "quantize_int8", "onnx", {"quant_format": "QDQ"}, 1_000_000, 3.5, None),
]
FAILED = StepFacts(
    "quantize_int8",
    False,
    {"error": {"code": "int8_over_tolerance", "message": "top-1 drop 0.12 > tolerance 0.01 <i>even with fallback</i>"}},
    index=7,
    optional=True,
    failed=True,
    config={"quant_format": "QDQ", "per_channel": True},
)
LEFT_OUT = {
    "step": "convert_openvino",
    "config": {"inference_precision": "f16"},
    "reason": "the worker's CPU runs no f16 <script>alert(1)</script>",
}


def metric(value: float, reference: float = 0.80) -> dict:
    return {"name": "top1", "value": value, "reference": reference, "drop": reference - value, "higher_is_better": True}


def latency(p50: float) -> dict:
    return {"1": {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2, "mean_ms": p50, "images_per_s": 1000 / p50}}


def auto_report(constraints: dict | None, *, target: str | None = "x86-cpu", left_out=(LEFT_OUT,)) -> ReportRead:
    """A finished auto job's report from the metrics its benchmark and evaluate steps write."""
    rows = [(ORIGINAL, None, "onnx", {}, 4_000_000, 10.0, 0.80), *CANDIDATES]
    bench = {"machine": {"cpu": "test"}, "results": [{"artifact": r[0], "latency": latency(r[5])} for r in rows]}
    evaluation = {"results": [{"artifact": r[0], "metric": metric(r[6])} for r in rows if r[6] is not None]}
    made = [
        StepFacts(step, True, {}, index=i, optional=step != "export_onnx") for i, (_, step, *_) in enumerate(CANDIDATES)
    ]
    options: dict = {"max_accuracy_drop": 0.01, "left_out": list(left_out)}
    if target:
        options["target"] = target
    if constraints is not None:
        options["constraints"] = {"max_accuracy_drop": 0.01, **constraints}
    return report_for(
        job_id="j",
        status=JobStatus.succeeded,
        task="classification",
        task_options=options,
        steps=[
            *made,
            FAILED,
            StepFacts("benchmark", True, bench, index=8),
            StepFacts("evaluate", True, evaluation, index=9),
        ],
        original=ArtifactFacts(ORIGINAL, None, "onnx", 4_000_000),
        artifacts=[ArtifactFacts(name, step, fmt, size, meta) for name, step, fmt, meta, size, _, _ in CANDIDATES],
    )


def page_of(report: ReportRead, *, preset: str = "auto") -> str:
    from api.report_html import render

    job = Job(
        id="j",
        name="auto",
        status=JobStatus.succeeded,
        preset=preset,
        created_at=utcnow(),
        task_options={"max_accuracy_drop": 0.01},
        steps=[],
        model=Model(filename=ORIGINAL, format="onnx"),
    )
    return render(job, report)


def between(page: str, start: str, end: str) -> str:
    part = page[page.index(start) :]
    return part[: part.index(end)]


MARKER = re.compile(r'<(circle|polygon) class="point ([^"]*)"[^>]*><title>([^<]*)</title>')


def markers(svg: str) -> dict[str, tuple[str, set[str]]]:
    """Each marker's entry name (its tooltip starts with it): (shape, classes)."""
    return {html.unescape(tip).split(": ", 1)[0]: (shape, set(cls.split())) for shape, cls, tip in MARKER.findall(svg)}


def center_x(svg: str, name: str) -> float:
    """A marker's x: a circle's cx, or a diamond's or star's top corner."""
    found = re.search(rf'(?:cx="([\d.]+)"|points="([\d.]+),)[^>]*><title>{re.escape(name)}:', svg)
    assert found, name
    return float(found.group(1) or found.group(2))


def test_the_front_is_drawn_one_marker_per_judged_entry_the_front_joined_and_the_pick_a_star():
    report = auto_report({"max_latency_ms": 5.0, "max_size_mb": 4.1})
    page = page_of(report)
    svg = between(page, 'id="front-chart"', "</svg>")
    drawn = markers(svg)
    timed = [e for e in report.entries if e.latency_ms]
    judged = [e.name for e in timed if e.metric or e.step in (None, "export_onnx")]
    # The INT8 model nobody evaluated is timed but not judged: left off the chart, and said so.
    assert len(timed) == 7 and sorted(drawn) == sorted(judged) and len(drawn) == 6
    assert "not drawn (not both timed and judged): ONNX Runtime INT8 QDQ" in between(page, 'id="front-caption"', "</p>")

    on_front = {name for name, (_, cls) in drawn.items() if "front" in cls}
    assert on_front == set(report.front) and "04-quantize_openvino.zip" in on_front
    assert {name for name, (_, cls) in drawn.items() if "off-front" in cls} == set(drawn) - set(report.front)
    assert all(drawn[name][0] == "polygon" for name in report.front)  # diamonds and the star, not circles
    assert all(drawn[name][0] == "circle" for name in set(drawn) - set(report.front))

    pick = report.recommended.artifact
    assert pick == "02-convert_openvino.zip"
    assert [n for n, (_, cls) in drawn.items() if "recommended" in cls] == [pick]
    assert "★ OpenVINO bf16</text>" in svg and svg.count("★") == 1
    # The front is one line through its points, fastest first.
    line = re.search(r'<polyline class="front-line" points="([^"]+)"', svg).group(1)
    xs = [float(p.split(",")[0]) for p in line.split()]
    assert len(xs) == len(report.front) >= 3 and xs == sorted(xs)

    # The latency limit is a vertical line between the 4 ms and the 6 ms candidates; the size limit is told.
    limit = re.search(r'class="constraint latency-limit" x1="([\d.]+)" y1="[\d.]+" x2="([\d.]+)"', svg)
    assert limit and limit.group(1) == limit.group(2)
    assert center_x(svg, "03-quantize_int8.onnx") < float(limit.group(1)) < center_x(svg, "01-convert_openvino.zip")
    assert "max 5 ms</text>" in svg and 'class="constraint accuracy-limit"' in svg
    caption = between(page, 'id="front-caption"', "</p>")
    assert (
        "max_latency_ms 5" in caption
        and "max_size_mb 4.1 (size is not an axis): over it: OpenVINO f32 (4.20 MB)" in caption
    )

    # Without a latency limit there is no latency line.
    no_latency = page_of(auto_report({"max_size_mb": 100.0}))
    assert 'class="constraint latency-limit"' not in no_latency and "max_size_mb 100" in no_latency


def test_the_table_shows_each_label_and_whether_it_is_on_the_front():
    report = auto_report({"max_latency_ms": 5.0})
    table = between(page_of(report), '<table id="artifacts">', "</table>")
    assert "<th>what it is (format)</th>" in table
    for e in report.entries:
        row = between(table, f"<tr><td>{e.name}</td>", "</tr>")
        assert f'<td>{html.escape(e.label)}<br><span class="format">{e.format}</span></td>' in row
        front = {True: "◆ on the front", False: "○ off the front", None: None}[e.pareto]
        assert (front in row) if front else ("the front" not in row), row
    assert {e.pareto for e in report.entries} == {True, False, None}
    assert between(table, "<tr><td>01-convert_openvino.zip</td>", "</tr>").count("misses constraint") == 1
    assert "★ recommended" in between(table, "<tr><td>02-convert_openvino.zip</td>", "</tr>")


def test_when_nothing_meets_the_constraints_the_closest_is_named_with_what_it_misses_never_as_the_pick():
    report = auto_report({"max_latency_ms": 1.0})
    rec = report.recommended
    assert rec.artifact is None and rec.closest == "02-convert_openvino.zip"
    page = page_of(report)
    box = between(page, '<section id="recommendation"', "</section>")
    assert "<h2>Nothing meets the constraints</h2>" in box
    assert "The closest is <code>02-convert_openvino.zip</code> (OpenVINO bf16); it misses:" in box
    assert "<li>p50 3 ms &gt; max_latency_ms 1</li>" in box
    assert "recommended" not in box.lower()
    assert "★" not in page and "Recommended:" not in page
    row = between(page, "<tr><td>02-convert_openvino.zip</td>", "</tr>")
    assert "closest: misses a constraint" in row and "recommended" not in row
    drawn = markers(between(page, 'id="front-chart"', "</svg>"))
    assert not [n for n, (_, cls) in drawn.items() if "recommended" in cls]
    assert [n for n, (_, cls) in drawn.items() if "closest" in cls] == [rec.closest]
    assert "OpenVINO bf16 (closest)</text>" in page and page.count('class="closest-ring"') == 1


def test_failed_and_left_out_candidates_are_listed_with_why_and_escaped():
    report = auto_report({"max_latency_ms": 5.0})
    section = between(page_of(report), '<section id="candidates">', "</section>")
    assert "target <b>x86-cpu</b>" in section
    assert "constraints: max_accuracy_drop 0.01, max_latency_ms 5" in section
    assert "on the front, fastest first: OpenVINO INT8 (NNCF), OpenVINO bf16, ONNX Runtime INT8 QOperator" in section
    failed = between(section, '<table id="failed-candidates">', "</table>")
    assert failed.count("<tr>") == 2  # the header, the INT8 candidate
    assert (
        "<td>7</td><td>ONNX Runtime INT8 QDQ</td><td>quantize_int8</td><td><code>int8_over_tolerance</code></td>"
        "<td>top-1 drop 0.12 &gt; tolerance 0.01 &lt;i&gt;even with fallback&lt;/i&gt;</td>"
    ) in failed
    left = between(section, '<table id="left-out">', "</table>")
    assert html.escape(json.dumps({"inference_precision": "f16"})) in left
    assert "the worker&#x27;s CPU runs no f16 &lt;script&gt;alert(1)&lt;/script&gt;" in left
    assert "<script>" not in section and "<i>" not in section

    # Nothing failed and nothing left out: no such tables.
    quiet = page_of(auto_report({"max_latency_ms": 5.0}, left_out=()).model_copy(update={"failed_candidates": []}))
    assert 'id="candidates"' in quiet and 'id="failed-candidates"' not in quiet and 'id="left-out"' not in quiet


def test_labels_are_escaped_in_the_chart_the_table_and_the_box():
    report = auto_report({"max_latency_ms": 5.0})
    for e in report.entries:
        if e.name == "02-convert_openvino.zip":
            e.label = "OpenVINO <b>bf16</b>"
    page = page_of(report)
    assert "<b>bf16</b>" not in page
    shown = "OpenVINO &lt;b&gt;bf16&lt;/b&gt;"
    assert f"★ {shown}</text>" in between(page, 'id="front-chart"', "</svg>")
    assert f"<td>{shown}<br>" in between(page, '<table id="artifacts">', "</table>")
    assert f'<span class="rec-label">({shown})</span>' in between(page, '<section id="recommendation"', "</section>")


def test_a_plain_jobs_page_gains_only_the_labels():
    report = auto_report(None, target=None, left_out=()).model_copy(update={"failed_candidates": []})
    page = page_of(report, preset="onnx-int8")
    for absent in ('id="front-chart"', 'id="front"', 'id="candidates"', '<span class="front-mark', "the front"):
        assert absent not in page, absent
    assert '<td>OpenVINO bf16<br><span class="format">openvino_ir</span></td>' in page
    assert '<td>original (ONNX)<br><span class="format">onnx</span></td>' in page
    assert 'id="scatter"' in page  # the size-against-latency chart, as before
    assert between(page, 'id="scatter"', "</svg>").count('class="point"') == len(
        [e for e in report.entries if e.latency_ms]
    )


def test_a_queued_auto_jobs_page_names_its_target_constraints_and_what_it_left_out(inprocess_api, model):  # noqa: F811
    client = inprocess_api.client
    job = client.post(
        "/v1/jobs", json={"model_id": model["id"], "preset": "auto", "constraints": {"max_latency_ms": 5}}
    )
    assert job.status_code == 202, job.text
    report = client.get(f"/v1/jobs/{job.json()['id']}/report").json()
    page = client.get(f"/v1/jobs/{job.json()['id']}/report.html").text
    assert report["recommended"] is None and report["left_out"]  # no calibration set: no INT8 candidate
    assert "No candidate was both timed and judged: nothing to draw." in between(
        page, '<section id="front">', "</section>"
    )
    section = between(page, '<section id="candidates">', "</section>")
    assert "target <b>x86-cpu</b> · constraints: max_accuracy_drop 0.01, max_latency_ms 5" in section
    left = between(section, '<table id="left-out">', "</table>")
    assert left.count("<tr>") == 1 + len(report["left_out"])
    for c in report["left_out"]:
        assert f"<tr><td>{c['step']}</td>" in left and html.escape(c["reason"]) in left
    assert "No recommendation: the job is queued" in page


# Appended to a copy of the page (the served one allows no script): where the browser laid the chart out.
MEASURE = """<script>
const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const svg = document.getElementById("front-chart");
const out = {chart: box(svg),
  labels: [...svg.querySelectorAll(".point-label")].map((e) => ({text: e.textContent, box: box(e)})),
  points: [...svg.querySelectorAll(".point")].map(box),
  fixed: [...svg.querySelectorAll("text:not(.point-label)")].map(box)};
const pre = document.createElement("pre");
pre.id = "geometry";
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


@needs_chromium
@pytest.mark.parametrize("constraints", [{"max_latency_ms": 5.0}, {"max_latency_ms": 1.0}])
def test_the_front_chart_keeps_labels_apart_from_each_other_the_points_and_the_captions(tmp_path: Path, constraints):
    page = page_of(auto_report(constraints))
    measured = tmp_path / "front.html"
    measured.write_text(page.replace("</body>", MEASURE + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", measured.as_uri())
    geometry = json.loads(html.unescape(re.search(r'<pre id="geometry">(.*?)</pre>', dom, re.S).group(1)))

    def apart(a, b):
        return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    labels = geometry["labels"]
    assert len(labels) == len(geometry["points"]) == 6
    chart = geometry["chart"]
    for i, label in enumerate(labels):
        a = label["box"]
        assert all(apart(a, other["box"]) for other in labels[i + 1 :]), labels
        assert all(apart(a, p) for p in geometry["points"] + geometry["fixed"]), (label, geometry)
        assert chart[0] <= a[0] and a[2] <= chart[2] and chart[1] <= a[1] and a[3] <= chart[3], (label, chart)


def test_an_arm_cpu_report_says_its_latencies_are_an_x86_stand_in(inprocess_api):
    from tests.test_api_inprocess import tiny_onnx, upload

    client = inprocess_api.client
    model = upload(client, "/v1/models", "tiny.onnx", tiny_onnx())
    job = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "auto", "target": "arm-cpu"}).json()
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["target"] == "arm-cpu" and "stand-in for the phone's ARM CPU" in report["latency_note"]
    page = client.get(f"/v1/jobs/{job['id']}/report.html").text
    assert "stand-in for the phone&#x27;s ARM CPU" in page or "stand-in for the phone's ARM CPU" in page
    x86 = client.post("/v1/jobs", json={"model_id": model["id"], "preset": "onnx", "target": "x86-cpu"}).json()
    assert client.get(f"/v1/jobs/{x86['id']}/report").json()["latency_note"] is None


def test_a_step_that_pruned_toward_a_latency_draws_macs_against_the_latency_it_measured():
    from api.report_html import render
    from core.models import JobStep, StepStatus

    rounds = [
        {"round": 1, "channel_ratio": 0.2254, "macs": 665_000_000, "latency_ms": 11.0, "latency_ratio": 0.76},
        {"round": 2, "channel_ratio": 0.6126, "macs": 273_000_000, "latency_ms": 8.6, "latency_ratio": 0.62},
    ]
    step = JobStep(
        index=0,
        name="prune_structured",
        status=StepStatus.succeeded,
        config={"target_latency_ratio": 0.6},
        metrics={
            "macs_before": 870_000_000,
            "rounds": rounds,
            "goal": 0.6,
            "latency_ratio": 0.62,
            "latency_runtime": "onnxruntime",
        },
    )
    job = Job(
        id="j",
        name="prune",
        status=JobStatus.succeeded,
        preset=None,
        created_at=utcnow(),
        task_options={"max_accuracy_drop": 0.01},
        steps=[step],
        model=Model(filename="m.onnx", format="onnx"),
    )
    page = render(job, auto_report(None))
    chart = between(page, 'id="pruning-rounds-0"', "</svg>")
    tips = [m[2] for m in MARKER.findall(chart)]
    assert tips[0].startswith("original: 1.00 MACs") and len(tips) == 3
    assert "round 2: channel ratio 0.6126, 0.31 MACs, 0.62 latency (8.6 ms)" in tips
    assert "goal 0.6, reached 0.62" in page
    # A step that pruned to a parameter ratio has no latency per round, and no such chart.
    step.metrics = {"rounds": [{"round": 1, "channel_ratio": 0.3, "macs": 1, "parameters": 1}]}
    assert "pruning-rounds" not in render(job, auto_report(None))
