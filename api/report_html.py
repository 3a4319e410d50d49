"""One self-contained HTML page per job: the recipe, each step's duration, and charts (inline
SVG, no script, no external file) of size, latency (p50 with a p90 whisker) and accuracy or
fidelity for the original and each artifact, a size-vs-latency scatter, and the layers the INT8
step kept in float (by rule, and by the fallback). Everything the user supplied is escaped."""

from __future__ import annotations

import json
import math
from html import escape

from core.metric_names import metric_label
from core.models import Job, StepStatus
from core.schemas import ReportEntry, ReportRead
from core.tasks import DEFAULT_TOLERANCE

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]
STATUS_COLOR = {
    "succeeded": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#757575",
    "running": "#1565c0",
    "queued": "#6a1b9a",
    "skipped": "#9e9e9e",
    "pending": "#9e9e9e",
}


def _num(value: float, digits: int | None) -> str:
    """Fixed decimals when asked; else three significant digits (latencies span 0.02 to 2000 ms)."""
    if digits is not None:
        return f"{value:.{digits}f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(
    title: str,
    unit: str,
    rows: list[tuple[str, float | None, float | None]],
    *,
    chart_id: str,
    digits: int | None = None,
    scale_max: float | None = None,
) -> str:
    """Horizontal bars (value, optional whisker end); rows without a value say 'not measured'.
    ``scale_max``: a fixed full scale, drawn as a grey track, for values read as absolutes (an
    accuracy of 0.06 must look small); without it the largest value fills the bar."""
    label_w, bar_w, row_h = 230, 380, 26
    height = 34 + row_h * max(1, len(rows))
    top = scale_max or max([v for _, v, _ in rows if v is not None] + [w for _, _, w in rows if w is not None] + [1e-9])
    parts = [
        f'<svg class="chart" id="{chart_id}" role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {label_w + bar_w + 90} {height}" width="{label_w + bar_w + 90}" height="{height}">',
        f'<text x="0" y="16" class="title">{escape(title)}</text>',
    ]
    for i, (label, value, whisker) in enumerate(rows):
        y = 30 + i * row_h
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" class="label">{escape(label[:34])}</text>'
        )
        if value is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + 15}" class="muted">not measured</text>')
            continue
        w = bar_w * min(value, top) / top
        color = PALETTE[i % len(PALETTE)]
        if scale_max:
            parts.append(
                f'<rect class="track" x="{label_w}" y="{y + 3}" width="{bar_w}" height="{row_h - 8}" fill="#eee"/>'
            )
        parts.append(
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row_h - 8}" '
            f'fill="{color}"><title>{escape(label)}: {_num(value, digits)} {unit}</title></rect>'
        )
        end = bar_w if scale_max else w
        if whisker is not None and whisker > value:
            x1, x2 = label_w + w, label_w + bar_w * whisker / top
            mid = y + 3 + (row_h - 8) / 2
            parts.append(
                f'<line class="whisker" x1="{x1:.1f}" y1="{mid:.1f}" x2="{x2:.1f}" y2="{mid:.1f}" '
                f'stroke="#333"/><line x1="{x2:.1f}" y1="{mid - 5:.1f}" x2="{x2:.1f}" y2="{mid + 5:.1f}" '
                f'stroke="#333"/>'
            )
            end = x2 - label_w
        parts.append(
            f'<text x="{label_w + end + 6:.1f}" y="{y + 15}" class="value">{_num(value, digits)} {unit}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# A label's box, from its length: an upper bound on a 12px system-ui character's advance and
# the text's height above and below its baseline.
CHAR_W, ASCENT, DESCENT = 7.0, 11, 3


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_labels(
    points: list[tuple[str, float, float]], bounds: tuple[float, float, float, float], radius: float
) -> list[tuple[float, float, str, bool]]:
    """(x, baseline y, text-anchor, needs a leader line) for each point's label: the nearest spot
    beside or above/below its point that stays in ``bounds`` and clears every point and every label
    placed before it. Artifacts often sit on top of each other (an export and its copy)."""
    taken = [(x - radius, y - radius, x + radius, y + radius) for _, x, y in points]
    placed = []
    for label, x, y in points:
        width = len(label) * CHAR_W
        candidates = []
        for shift in sorted(range(-14, 15), key=abs):  # rows of text above and below the point
            ty = y + 4 + shift * (ASCENT + DESCENT + 1)
            for anchor, tx in (("start", x + radius + 3), ("end", x - radius - 3)):
                x0 = tx if anchor == "start" else tx - width
                candidates.append((tx, ty, anchor, shift != 0, (x0, ty - ASCENT, x0 + width, ty + DESCENT)))
        inside = [
            c
            for c in candidates
            if bounds[0] <= c[4][0] and c[4][2] <= bounds[2] and bounds[1] <= c[4][1] and c[4][3] <= bounds[3]
        ] or candidates
        free = (c for c in inside if not any(_overlap(c[4], t) for t in taken))
        tx, ty, anchor, leader, box = next(free, inside[0])
        taken.append(box)
        placed.append((tx, ty, anchor, leader))
    return placed


def _scatter(points: list[tuple[str, float, float]]) -> str:
    """Size (MB) against p50 latency (ms): down and left is better."""
    # The left margin holds ticks like "0.0255" beside the rotated axis title; the right one, the
    # label of a point at the largest size.
    w, h, left, bottom, right = 700, 340, 72, 56, 130
    if not points:
        return '<p class="muted">No latency measured: add a benchmark step to the recipe.</p>'
    max_x = max(p[1] for p in points) * 1.15 or 1
    max_y = max(p[2] for p in points) * 1.15 or 1
    parts = [
        f'<svg class="chart" id="scatter" role="img" aria-label="size against latency" viewBox="0 0 {w} {h}" '
        f'width="{w}" height="{h}">',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#555"/>',
        f'<line x1="{left}" y1="10" x2="{left}" y2="{h - bottom}" stroke="#555"/>',
        f'<text x="{(w - right + left) / 2}" y="{h - 16}" text-anchor="middle" class="label">size (MB)</text>',
        f'<text x="16" y="{(h - bottom) / 2}" transform="rotate(-90 16 {(h - bottom) / 2})" text-anchor="middle" '
        f'class="label">p50 latency, batch 1 (ms)</text>',
    ]
    for frac in (0, 0.5, 1):
        parts.append(
            f'<text x="{left + frac * (w - left - right):.0f}" y="{h - bottom + 16}" text-anchor="middle" '
            f'class="tick">{_num(frac * max_x, None)}</text>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{h - bottom - frac * (h - bottom - 10) + 4:.0f}" text-anchor="end" '
            f'class="tick">{_num(frac * max_y, None)}</text>'
        )
    xy = [
        (label[:28], left + size / max_x * (w - left - right), h - bottom - latency / max_y * (h - bottom - 10))
        for label, size, latency in points
    ]
    labels = _place_labels(xy, (left + 2, 0, w, h - bottom - 2), radius=6)
    for i, ((label, x, y), (tx, ty, anchor, leader)) in enumerate(zip(xy, labels, strict=True)):
        color = PALETTE[i % len(PALETTE)]
        name, size, latency = points[i]
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{color}">'
            f"<title>{escape(name)}: {size:.2f} MB, {_num(latency, None)} ms</title></circle>"
        )
        if leader:
            parts.append(
                f'<line class="leader" x1="{x:.1f}" y1="{y:.1f}" x2="{tx:.1f}" y2="{ty - 4:.1f}" '
                f'stroke="{color}" stroke-width="0.8"/>'
            )
        parts.append(
            f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" class="point-label">{escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _float_nodes_table(step) -> str:
    """The nodes a quantize step kept in float by rule (metrics.float_nodes: a detector's mixed-scale
    head and the tail after it), one row per reason: a head's tail is one row, its names folded."""
    nodes = (step.metrics or {}).get("float_nodes") or []
    if step.status != StepStatus.succeeded or not nodes:
        return ""
    groups: list[list[dict]] = []
    for node in nodes:
        if groups and groups[-1][0].get("reason") == node.get("reason"):
            groups[-1].append(node)
        else:
            groups.append([node])
    rows = []
    for group in groups:
        names = [escape(str(n.get("node"))) for n in group]
        shown = (
            names[0]
            if len(names) == 1
            else (f"<details><summary>{len(names)} nodes</summary>{', '.join(names)}</details>")
        )
        ops = ", ".join(escape(op) for op in dict.fromkeys(str(n.get("op_type", "")) for n in group))
        rows.append(f"<tr><td>{shown}</td><td>{ops}</td><td>{escape(str(group[0].get('reason', '')))}</td></tr>")
    return (
        f'<section class="float-nodes"><h2>Kept in float by rule ({escape(step.name)}, step {step.index})</h2>'
        f"<table><tr><th>node</th><th>op</th><th>why</th></tr>{''.join(rows)}</table></section>"
    )


def _fallback_tables(job: Job) -> str:
    out = []
    for step in job.steps:
        out.append(_float_nodes_table(step))
        fallback = (step.metrics or {}).get("fallback") if step.status == StepStatus.succeeded else None
        if not fallback:
            continue
        kept = fallback.get("kept_float") or []
        attempts = fallback.get("attempts") or []
        metric = fallback.get("metric", "score")
        rows = (
            "".join(
                f"<tr><td>{escape(str(layer.get('node')))}</td><td>{escape(str(layer.get('op_type', '')))}</td>"
                f"<td>{layer.get('worst_channel_snr_db', float('nan')):.1f}</td><td>{layer.get('snr_db', float('nan')):.1f}</td>"
                f"<td>{escape(str(layer.get('reason', '')))}</td></tr>"
                for layer in kept
            )
            or '<tr><td colspan="5">none: every quantizable layer runs in INT8</td></tr>'
        )
        tries = "".join(
            f"<tr><td>{a.get('float_layers')}</td><td>{a.get(metric, float('nan')):.4f}</td>"
            f"<td>{a.get('drop', float('nan')):.4f}</td></tr>"
            for a in attempts
        )
        out.append(
            f'<section class="fallback"><h2>Per-layer precision ({escape(step.name)}, step {step.index})</h2>'
            f"<p>Tolerance {escape(str(fallback.get('tolerance')))} on {escape(metric)}, validated on "
            f"{escape(str(fallback.get('validated_on')))} ({fallback.get('samples')} samples); "
            f"{'met' if fallback.get('tolerance_met') else 'not met'}.</p>"
            f"<table><tr><th>layer kept in float</th><th>op</th><th>worst channel SNR dB</th><th>SNR dB</th>"
            f"<th>why</th></tr>{rows}</table>"
            f"<table><tr><th>layers in float</th><th>{escape(metric)}</th><th>drop</th></tr>{tries}</table></section>"
        )
    return "".join(out)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _quality(e: ReportEntry) -> str:
    """Accuracy and fidelity side by side: an accuracy must not hide an agreement of 0.0, and
    0.0 is a value, not a missing one. Another task's metric (mAP, F1 against FP32, pixel
    agreement) comes first."""
    parts = []
    if e.metric and e.metric.get("name") not in ("top1", "top1_agreement"):
        parts.append(f"{metric_label(e.metric['name'])} {_fraction(e.metric.get('value'))}")
    if e.accuracy and "top1" in e.accuracy:
        parts.append(f"top-1 {_fraction(e.accuracy.get('top1'))}")
    if e.fidelity and "top1_agreement" in e.fidelity:
        parts.append(f"agreement {_fraction(e.fidelity.get('top1_agreement'))}")
    if e.fidelity:
        snr = e.fidelity.get("snr_db")
        if snr is not None:
            parts.append("SNR ∞ dB" if math.isinf(snr) else f"SNR {snr:.1f} dB")
    return ", ".join(parts) or "-"


def _throughput(e: ReportEntry, notes: list[str]) -> str:
    """Images/s at the largest batch measured; why a larger one could not be goes to ``notes``,
    once per distinct reason (a batch fixed at 1 fails every artifact the same way)."""
    measured = f"{e.throughput['images_per_s']:.0f} img/s at batch {e.throughput['batch']:.0f}" if e.throughput else ""
    if not e.throughput_error:
        return measured or "-"
    if e.throughput_error not in notes:
        notes.append(e.throughput_error)
    mark = f"<sup>{notes.index(e.throughput_error) + 1}</sup>"
    failed = "larger batch failed" if measured else "not measured"
    return f'{measured}{"<br>" if measured else ""}<span class="why">{failed} {mark}</span>'


VERDICT_COLOR = {
    "original": "#555",
    "meets_tolerance": "#2e7d32",
    "slower_than_float": "#a04000",
    "over_tolerance": "#c62828",
    "not_measured": "#757575",
}


def _verdict(e: ReportEntry, recommended: str | None) -> str:
    if e.verdict is None:
        return "-"
    mark = '<br><b class="pick">★ recommended</b>' if e.name == recommended else ""
    return (
        f'<span class="verdict" style="color:{VERDICT_COLOR.get(e.verdict, "#000")}">'
        f"{escape(e.verdict.replace('_', ' '))}</span>{mark}"
    )


def _verdict_row(e: ReportEntry, columns: int) -> str:
    """The verdict's numbers, in a line under the artifact's row (too long for a cell)."""
    if not e.verdict_reason or e.verdict == "original":
        return ""
    return (
        f'<tr class="why-row"><td></td><td colspan="{columns - 1}"><span class="verdict-why">'
        f"{escape(e.verdict_reason)}</span></td></tr>"
    )


def _recommendation(job: Job, report: ReportRead) -> str:
    """The box the page opens with: which artifact to ship, why, and its numbers; or, in one line,
    why nothing beats the original."""
    rec = report.recommended
    if rec is None:
        return (
            f'<section id="recommendation" class="rec pending"><p>No recommendation: the job is '
            f"{escape(job.status.value)}; one is made once it succeeds.</p></section>"
        )
    if rec.artifact is None or rec.metrics is None:
        return (
            f'<section id="recommendation" class="rec none"><h2>No artifact recommended</h2>'
            f'<p class="rec-why">{escape(rec.reason)}</p></section>'
        )
    m = rec.metrics
    numbers = [f"p50 {_num(m.p50_ms, None)} ms at batch 1"]
    if m.speedup:
        numbers.append(f"{m.speedup:.2f}x the original's speed")
    numbers.append(f"{m.size_bytes / 1e6:.2f} MB ({m.size_ratio:.2f}x the original's size)")
    if m.metric is not None:
        numbers.append(
            f"{metric_label(m.metric.name)} {m.metric.value:.4f}, drop {m.metric.drop:.4f} "
            f"(tolerance {rec.tolerance:g})"
        )
    else:
        numbers.append("accuracy not measured (lossless float conversion)")
    return (
        f'<section id="recommendation" class="rec ok"><h2>Recommended: <code>{escape(rec.artifact)}</code></h2>'
        f'<p class="rec-why">{escape(rec.reason)}</p>'
        f'<p class="rec-numbers">{" · ".join(escape(n) for n in numbers)}</p></section>'
    )


_STYLE = """\
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1000px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0 16px; } td, th { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
code { font-size: 12px; } .muted { fill: #888; color: #888; } .error { color: #c62828; font-weight: 600; }
svg.chart text { font: 12px system-ui, sans-serif; } svg.chart .title { font-weight: 600; font-size: 13px; }
.why { color: #a04000; font-size: 12px; } #artifacts td:nth-child(-n+7), #artifacts td:nth-child(9) { white-space: nowrap; }
#artifacts tr.why-row td { white-space: normal; }
#artifacts tr:has(+ tr.why-row) td { border-bottom: none; } #artifacts tr.why-row td { padding-top: 0; }
.status { font-weight: 600; } .grid { display: grid; grid-template-columns: 1fr; gap: 8px; }
.rec { border: 2px solid #2e7d32; border-radius: 6px; padding: 4px 16px; margin: 16px 0; background: #f3faf3; }
.rec.none { border-color: #a04000; background: #fff8f0; } .rec.pending { border-color: #9e9e9e; background: #f7f7f7; }
.rec h2 { margin: 8px 0 4px; } .verdict { font-weight: 600; } .pick { color: #2e7d32; }
.verdict-why { color: #555; font-size: 12px; }
"""


def _quality_charts(entries: list[ReportEntry]) -> str:
    """Accuracy when the job had labels, fidelity to the original when it had none (or both)."""
    labeled = any(e.accuracy for e in entries)
    accuracy = [(e.name, (e.accuracy or {}).get("top1"), None) for e in entries]
    agreement = [
        (e.name, e.fidelity.get("top1_agreement") if e.fidelity else (1.0 if e.step is None else None), None)
        for e in entries
    ]
    charts = ""
    if labeled:
        charts += _bars(
            "Top-1 accuracy on the evaluation set", "", accuracy, chart_id="accuracy-chart", digits=4, scale_max=1.0
        )
    if not labeled or any(e.fidelity for e in entries):
        charts += _bars(
            "Fidelity: top-1 agreement with the original",
            "",
            agreement,
            chart_id="agreement-chart",
            digits=4,
            scale_max=1.0,
        )
    return charts


def _step_rows(job: Job) -> str:
    return "".join(
        f"<tr><td>{s.index}</td><td>{escape(s.name)}</td>"
        f'<td><span class="status" style="color:{STATUS_COLOR.get(s.status.value, "#000")}">{s.status.value}</span></td>'
        f"<td>{((s.finished_at - s.started_at).total_seconds() if s.started_at and s.finished_at else 0):.2f} s</td>"
        f"<td><code>{escape(json.dumps(s.config, sort_keys=True))}</code></td>"
        f"<td>{escape(s.message or '')}</td></tr>"
        for s in job.steps
    )


def _artifact_rows(report: ReportRead) -> tuple[str, str]:
    """The artifacts table's rows, and the footnotes its throughput cells point to."""
    table_rows = ""
    throughput_notes: list[str] = []
    recommended = report.recommended.artifact if report.recommended else None
    for e in report.entries:
        lat = f"{_num(e.latency_ms['p50_ms'], None)} / {_num(e.latency_ms['p90_ms'], None)}" if e.latency_ms else "-"
        table_rows += (
            f"<tr><td>{escape(e.name)}</td><td>{escape(e.format)}</td><td>{e.size_bytes / 1e6:.2f} MB</td>"
            f"<td>{e.size_ratio:.2f}</td><td>{lat}</td><td>{f'{e.speedup:.2f}x' if e.speedup else '-'}</td>"
            f"<td>{_throughput(e, throughput_notes)}</td><td>{escape(_quality(e))}</td>"
            f"<td>{_verdict(e, recommended)}</td></tr>{_verdict_row(e, 9)}"
        )
    notes = "".join(
        f'<p class="why"><sup>{i}</sup> throughput not measured: {escape(note)}</p>'
        for i, note in enumerate(throughput_notes, 1)
    )
    return table_rows, notes


def render(job: Job, report: ReportRead) -> str:
    """The job's report as one self-contained HTML page (no script, no external resource)."""
    entries = report.entries
    mb = [(e.name, e.size_bytes / 1e6, None) for e in entries]
    latency = [
        (e.name, e.latency_ms["p50_ms"] if e.latency_ms else None, e.latency_ms.get("p90_ms") if e.latency_ms else None)
        for e in entries
    ]
    quality_charts = _quality_charts(entries)
    points = [(e.name, e.size_bytes / 1e6, e.latency_ms["p50_ms"]) for e in entries if e.latency_ms]
    step_rows = _step_rows(job)
    table_rows, notes = _artifact_rows(report)
    error = ""
    if job.error_code:
        error = (
            f'<p class="error">Failed at step {escape(job.error_step or "-")}: {escape(job.error_code)}: '
            f"{escape(job.error_message or '')}</p>"
        )
    machine = report.machine or {}
    title = escape(job.name or job.id)
    recipe = escape(job.preset or "custom steps")
    tolerance = f"{float((job.task_options or {}).get('max_accuracy_drop', DEFAULT_TOLERANCE)):g}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cvopt report: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
{_STYLE}</style></head>
<body>
<h1>Job {title}</h1>
<p><span class="status" id="job-status" style="color:{STATUS_COLOR.get(job.status.value, "#000")}">{job.status.value}</span>
 · recipe: <b>{recipe}</b> · model <code>{escape(job.model.filename)}</code> ({escape(job.model.format)})
 · created {job.created_at:%Y-%m-%d %H:%M:%S} UTC · measured on {escape(str(machine.get("cpu") or machine.get("gpu") or machine.get("platform") or "the worker"))}</p>
{error}
{_recommendation(job, report)}
<h2>Steps</h2>
<table id="steps"><tr><th>#</th><th>step</th><th>status</th><th>duration</th><th>config</th><th>note</th></tr>{step_rows}</table>
<h2>Original and artifacts</h2>
<table id="artifacts"><tr><th>name</th><th>format</th><th>size</th><th>size ×</th><th>p50 / p90 ms (batch 1)</th>
<th>speed-up</th><th>throughput</th><th>quality</th><th>verdict (tolerance {tolerance})</th></tr>{table_rows}</table>
{notes}
<div class="grid">
{_bars("Size", "MB", mb, chart_id="size-chart", digits=2)}
{_bars("Latency at batch 1: p50, whisker to p90", "ms", latency, chart_id="latency-chart")}
{quality_charts}
</div>
<h2>Size against latency</h2>
{_scatter(points)}
{_fallback_tables(job)}
</body></html>
"""
