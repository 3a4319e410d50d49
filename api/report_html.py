"""One self-contained HTML page per job: the recipe, each step's duration, and charts (inline
SVG, no script, no external file) of size, latency (p50 with a p90 whisker) and accuracy or
fidelity for the original and each artifact, a size-vs-latency scatter, MACs against measured latency
per round of a pruning step that aimed at a latency, and the layers the INT8 step kept in float (by rule,
and by the fallback). A job that chose among candidates (preset auto,
a target, constraints) also gets its front drawn (latency against the drop on the task's metric,
the constraints as lines) and its candidates listed: the target, the constraints, those that
failed and those it could not build. Everything the user supplied is escaped."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
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


Box = tuple[float, float, float, float]


def _place_labels(
    points: list[tuple[str, float, float]],
    bounds: Box,
    radius: float,
    blocked: Sequence[Box] = (),
) -> list[tuple[float, float, str, bool]]:
    """(x, baseline y, text-anchor, needs a leader line) for each point's label: the nearest spot
    beside or above/below its point that stays in ``bounds`` and clears every point, every box in
    ``blocked`` (a constraint line's caption) and every label placed before it. Artifacts often sit
    on top of each other (an export and its copy)."""
    taken = [(x - radius, y - radius, x + radius, y + radius) for _, x, y in points] + list(blocked)
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


@dataclass(frozen=True)
class Frame:
    """A scatter's canvas: the data ranges map into the box between the margins. The left margin
    holds ticks like "0.0255" beside the rotated axis title; the right one, the label of a point at
    the right end; the top one, a constraint line's caption."""

    chart_id: str
    aria: str
    x_title: str
    y_title: str
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    w: int = 700
    h: int = 340
    left: int = 72
    bottom: int = 56
    right: int = 130
    top: int = 10

    def px(self, x: float) -> float:
        lo, hi = self.x_range
        return self.left + (x - lo) / (hi - lo) * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        lo, hi = self.y_range
        return self.h - self.bottom - (y - lo) / (hi - lo) * (self.h - self.bottom - self.top)


@dataclass(frozen=True)
class Mark:
    """One point: the label beside it, the tooltip, and its shape, so that a reader without colour
    tells the kinds apart: circle (plain), open (off the front), diamond (on the front), star
    (recommended); ``ring`` circles it (the closest miss)."""

    label: str
    x: float
    y: float
    tip: str
    shape: str = "circle"
    classes: str = ""
    ring: bool = False


def _axes(f: Frame) -> list[str]:
    """The two axis lines, their titles and three ticks on each."""
    base, mid_y = f.h - f.bottom, (f.h - f.bottom + f.top) / 2
    parts = [
        f'<line x1="{f.left}" y1="{base}" x2="{f.w - f.right}" y2="{base}" stroke="#555"/>',
        f'<line x1="{f.left}" y1="{f.top}" x2="{f.left}" y2="{base}" stroke="#555"/>',
        f'<text x="{(f.w - f.right + f.left) / 2}" y="{f.h - 16}" text-anchor="middle" class="label">'
        f"{escape(f.x_title)}</text>",
        f'<text x="16" y="{mid_y}" transform="rotate(-90 16 {mid_y})" text-anchor="middle" class="label">'
        f"{escape(f.y_title)}</text>",
    ]
    for frac in (0, 0.5, 1):
        x = f.x_range[0] + frac * (f.x_range[1] - f.x_range[0])
        y = f.y_range[0] + frac * (f.y_range[1] - f.y_range[0])
        parts.append(
            f'<text x="{f.px(x):.0f}" y="{base + 16}" text-anchor="middle" class="tick">{_num(x, None)}</text>'
        )
        parts.append(
            f'<text x="{f.left - 6}" y="{f.py(y) + 4:.0f}" text-anchor="end" class="tick">{_num(y, None)}</text>'
        )
    return parts


def _marker(m: Mark, x: float, y: float, color: str) -> str:
    tip = f"<title>{escape(m.tip)}</title>"
    cls = f"point {m.classes}".strip()
    ring = (
        f'<circle class="closest-ring" cx="{x:.1f}" cy="{y:.1f}" r="12" fill="none" stroke="#333" '
        f'stroke-width="1.5" stroke-dasharray="3 2"/>'
        if m.ring
        else ""
    )
    if m.shape in ("circle", "open"):
        paint = f'fill="{color}"' if m.shape == "circle" else f'fill="#fff" stroke="{color}" stroke-width="2.5"'
        return f'{ring}<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="6" {paint}>{tip}</circle>'
    if m.shape == "diamond":
        corners = [(0, -8), (8, 0), (0, 8), (-8, 0)]
    else:  # a five-pointed star, outer radius 10
        corners = [
            (r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))
            for k, r in zip(range(10), [10, 4.2] * 5, strict=True)
        ]
    pts = " ".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in corners)
    return f'{ring}<polygon class="{cls}" points="{pts}" fill="{color}" stroke="#222">{tip}</polygon>'


def _scatter_svg(
    frame: Frame, marks: list[Mark], *, under: Sequence[str] = (), blocked: Sequence[Box] = (), radius: float = 6
) -> str:
    """The chart: axes, then ``under`` (lines drawn beneath the points), then each mark with its
    label placed clear of the others (a leader line when moved off its row)."""
    f = frame
    parts = [
        f'<svg class="chart" id="{f.chart_id}" role="img" aria-label="{escape(f.aria)}" '
        f'viewBox="0 0 {f.w} {f.h}" width="{f.w}" height="{f.h}">',
        *_axes(f),
        *under,
    ]
    xy = [(m.label, f.px(m.x), f.py(m.y)) for m in marks]
    labels = _place_labels(xy, (f.left + 2, 0, f.w, f.h - f.bottom - 2), radius=radius, blocked=blocked)
    for i, (m, (label, x, y), (tx, ty, anchor, leader)) in enumerate(zip(marks, xy, labels, strict=True)):
        color = PALETTE[i % len(PALETTE)]
        parts.append(_marker(m, x, y, color))
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


def _scatter(points: list[tuple[str, float, float]]) -> str:
    """Size (MB) against p50 latency (ms): down and left is better."""
    if not points:
        return '<p class="muted">No latency measured: add a benchmark step to the recipe.</p>'
    frame = Frame(
        chart_id="scatter",
        aria="size against latency",
        x_title="size (MB)",
        y_title="p50 latency, batch 1 (ms)",
        x_range=(0, max(p[1] for p in points) * 1.15 or 1),
        y_range=(0, max(p[2] for p in points) * 1.15 or 1),
    )
    marks = [
        Mark(name[:28], size, latency, f"{name}: {size:.2f} MB, {_num(latency, None)} ms")
        for name, size, latency in points
    ]
    return _scatter_svg(frame, marks)


def _pruning_rounds(job: Job) -> str:
    """A prune_structured step that pruned toward a latency: each round's MACs against the latency it
    measured on the worker (the original's at 1.0), so a user sees where fewer MACs stopped paying."""
    sections = []
    for step in job.steps:
        metrics = step.metrics or {}
        rounds = [r for r in metrics.get("rounds") or [] if "latency_ratio" in r and "macs" in r]
        if step.name != "prune_structured" or not rounds:
            continue
        macs0 = float(metrics.get("macs_before") or 1)
        frame = Frame(
            chart_id=f"pruning-rounds-{step.index}",
            aria="MACs against measured latency, per pruning round",
            x_title="MACs / original's",
            y_title=f"latency / original's ({metrics.get('latency_runtime', '')})",
            x_range=(0, 1.05),
            y_range=(0, max([1.05] + [float(r["latency_ratio"]) * 1.1 for r in rounds])),
        )
        marks = [Mark("original", 1.0, 1.0, "original: 1.00 MACs, 1.00 latency", classes="original")] + [
            Mark(
                f"round {r['round']}",
                float(r["macs"]) / macs0,
                float(r["latency_ratio"]),
                f"round {r['round']}: channel ratio {r['channel_ratio']}, {float(r['macs']) / macs0:.2f} MACs, "
                f"{float(r['latency_ratio']):.2f} latency ({r['latency_ms']} ms)",
                classes="round",
            )
            for r in rounds
        ]
        sections.append(
            f"<h2>Pruning toward a latency (step {step.index}): goal {escape(str(metrics.get('goal')))}, reached "
            f"{escape(str(metrics.get('latency_ratio')))}</h2>{_scatter_svg(frame, marks)}"
        )
    return "".join(sections)


# -- the candidates of a job that chose among them (preset auto, a target, constraints) -----------


def _chose_among_candidates(report: ReportRead) -> bool:
    """A job with a target, constraints or candidates: its page draws the front and lists the
    candidates. Any other job's page looks as it always did (its entries' labels aside)."""
    return bool(report.target or report.constraints or report.failed_candidates or report.left_out)


def _limits(report: ReportRead, tolerance: float) -> tuple[float, float | None, float | None]:
    """(max_accuracy_drop, max_latency_ms, max_size_mb): the constraints' tolerance, else the job's."""
    c = report.constraints
    if c is None:
        return tolerance, None, None
    return (
        c.max_accuracy_drop if c.max_accuracy_drop is not None else tolerance,
        c.max_latency_ms,
        c.max_size_mb,
    )


def _front_drop(e: ReportEntry) -> float:
    """The drop the front counts: the task's metric's, or none for the original and a lossless float
    conversion that was not evaluated (core.recommend's rule; such entries carry ``pareto``)."""
    return float(e.metric["drop"]) if e.metric else 0.0


def _drawn(report: ReportRead) -> list[ReportEntry]:
    """The entries on the chart: timed and judged (``pareto`` is set for exactly those)."""
    return [e for e in report.entries if e.pareto is not None and e.latency_ms]


def _labels(entries: Sequence[ReportEntry]) -> dict[str, str]:
    """Each entry's label by name; two entries with one label (an export and its copy) add their names."""
    counts = Counter(e.label or e.name for e in entries)
    return {e.name: (e.label or e.name) if counts[e.label or e.name] == 1 else f"{e.label} ({e.name})" for e in entries}


def _front_marks(report: ReportRead, drawn: list[ReportEntry], frame: Frame) -> list[Mark]:
    """A point for each entry drawn; one that drops more than the chart shows sits on its top edge,
    its drop in its label."""
    rec = report.recommended
    pick, closest = (rec.artifact, rec.closest) if rec else (None, None)
    labels = _labels(report.entries)
    marks = []
    for e in drawn:
        p50, drop, on = e.latency_ms["p50_ms"], _front_drop(e), bool(e.pareto)
        shape = "star" if e.name == pick else "diamond" if on else "open"
        classes = ["front" if on else "off-front"]
        text = labels[e.name][:32]
        if drop > frame.y_range[1]:
            text = f"{text} (drop {drop:.3g} ↑)"
        if e.name == pick:
            classes.append("recommended")
            text = f"★ {text}"
        if e.name == closest:
            classes.append("closest")
            text = f"{text} (closest)"
        tip = (
            f"{e.name}: {labels[e.name]}; p50 {_num(p50, None)} ms, drop {drop:.4f}, {e.size_bytes / 1e6:.2f} MB; "
            f"{'on' if on else 'off'} the front"
        )
        y = min(drop, frame.y_range[1])
        marks.append(Mark(text, p50, y, tip, shape, " ".join(classes), ring=e.name == closest))
    return marks


# The drop axis ends at this many times the tolerance: a candidate far over it would squash the
# ones that compete into the bottom rows.
DROP_AXIS_TOLERANCES = 4


def _front_frame(report: ReportRead, drawn: list[ReportEntry], tolerance: float) -> Frame:
    """Latency across, drop up, both from 0 (a drop below 0: better than the original), wide enough
    to show the constraint lines; the drop axis no higher than DROP_AXIS_TOLERANCES tolerances."""
    max_drop, max_ms, _ = _limits(report, tolerance)
    p50s = [e.latency_ms["p50_ms"] for e in drawn]
    drops = [_front_drop(e) for e in drawn]
    metric = next((e.metric["name"] for e in report.entries if e.metric), None)
    low = min([0.0, *drops]) * 1.15
    worst = max(drops)
    if max_drop > 0:
        worst = min(worst, DROP_AXIS_TOLERANCES * max_drop)
    high = max(worst, max_drop, 0.0) * 1.15 or (-low / 10 if low else 0.01)
    return Frame(
        chart_id="front-chart",
        aria="Pareto front: latency against the drop on the task's metric",
        x_title="p50 latency, batch 1 (ms)",
        y_title=f"{metric_label(metric)} drop vs the original" if metric else "drop on the task's metric",
        x_range=(0, max([*p50s, max_ms or 0]) * 1.15 or 1),
        y_range=(low, high),
        top=26,
    )


def _front_lines(
    report: ReportRead, drawn: list[ReportEntry], frame: Frame, tolerance: float
) -> tuple[list[str], list[Box]]:
    """Drawn under the points: the front joined fastest first, the zero-drop line when a candidate
    beats the original, and each constraint as a dashed line with its caption (kept clear of labels)."""
    f, (max_drop, max_ms, _) = frame, _limits(report, tolerance)
    at = {e.name: (f.px(e.latency_ms["p50_ms"]), f.py(min(_front_drop(e), f.y_range[1]))) for e in drawn}
    path = " ".join(f"{at[n][0]:.1f},{at[n][1]:.1f}" for n in report.front if n in at)
    lines = [f'<polyline class="front-line" points="{path}" fill="none" stroke="#333" stroke-width="1.5"/>']
    base, end = f.h - f.bottom, f.w - f.right
    if f.y_range[0] < 0:
        lines.append(
            f'<line class="zero" x1="{f.left}" y1="{f.py(0):.1f}" x2="{end}" y2="{f.py(0):.1f}" stroke="#bbb"/>'
        )
    dash = 'stroke="#c62828" stroke-width="1.2" stroke-dasharray="6 4"'
    y = f.py(max_drop)
    lines.append(f'<line class="constraint accuracy-limit" x1="{f.left}" y1="{y:.1f}" x2="{end}" y2="{y:.1f}" {dash}/>')
    captions = [(f"max drop {max_drop:g}", end + 4, y + 4, "start")]
    if max_ms is not None:
        x = f.px(max_ms)
        lines.append(
            f'<line class="constraint latency-limit" x1="{x:.1f}" y1="{f.top}" x2="{x:.1f}" y2="{base}" {dash}/>'
        )
        captions.append((f"max {max_ms:g} ms", x, f.top - 8, "middle"))
    blocked = []
    for text, x, y, anchor in captions:
        width = len(text) * CHAR_W
        x0 = x if anchor == "start" else x - width / 2
        blocked.append((x0, y - ASCENT, x0 + width, y + DESCENT))
        lines.append(
            f'<text class="constraint-label" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="#c62828">'
            f"{escape(text)}</text>"
        )
    return lines, blocked


def _front_caption(report: ReportRead, tolerance: float) -> str:
    """The legend in words (shapes, not colours, tell the kinds apart), the size limit the chart has
    no axis for, and what is not drawn."""
    max_drop, max_ms, max_mb = _limits(report, tolerance)
    labels = _labels(report.entries)
    rec = report.recommended
    parts = [
        "◆ on the Pareto front of p50, size and drop (no other candidate is at least as good on all three), "
        "joined fastest first",
        "○ off the front",
    ]
    if rec and rec.artifact:
        parts.append("★ recommended")
    if rec and rec.closest:
        parts.append("dashed ring: the closest candidate; nothing meets the constraints and it misses one")
    limits = f"max_accuracy_drop {max_drop:g}" + (f", max_latency_ms {max_ms:g}" if max_ms is not None else "")
    parts.append(f"dashed lines: {limits}")
    if max_mb is not None:
        over = [
            f"{labels[e.name]} ({e.size_bytes / 1e6:.2f} MB)" for e in report.entries if e.size_bytes / 1e6 > max_mb
        ]
        parts.append(
            f"max_size_mb {max_mb:g} (size is not an axis): "
            + (f"over it: {', '.join(over)}" if over else "every candidate is within it")
        )
    drawn = {e.name for e in _drawn(report)}
    hidden = [labels[e.name] for e in report.entries if e.name not in drawn]
    if hidden:
        parts.append(f"not drawn (not both timed and judged): {', '.join(hidden)}")
    return f'<p class="caption" id="front-caption">{" · ".join(escape(p) for p in parts)}</p>'


def _front_section(report: ReportRead, tolerance: float) -> str:
    """The candidates drawn: batch-1 p50 against the drop on the task's metric; down and left is better."""
    if not _chose_among_candidates(report):
        return ""
    drawn = _drawn(report)
    if not drawn:
        chart = '<p class="muted">No candidate was both timed and judged: nothing to draw.</p>'
    else:
        frame = _front_frame(report, drawn, tolerance)
        under, blocked = _front_lines(report, drawn, frame, tolerance)
        chart = _scatter_svg(frame, _front_marks(report, drawn, frame), under=under, blocked=blocked, radius=10)
    return (
        f'<section id="front"><h2>Latency against accuracy: the front</h2>{chart}'
        f"{_front_caption(report, tolerance)}</section>"
    )


def _constraints_text(report: ReportRead) -> str:
    values = report.constraints.model_dump(exclude_none=True) if report.constraints else {}
    return ", ".join(f"{k} {v:g}" for k, v in values.items()) or "none beyond the tolerance"


def _candidates_section(report: ReportRead) -> str:
    """The target, the constraints, the front by name, and the candidates that failed or that the
    job could not build, each with why."""
    if not _chose_among_candidates(report):
        return ""
    labels = _labels(report.entries)
    facts = [f"target <b>{escape(report.target or 'any')}</b>", f"constraints: {escape(_constraints_text(report))}"]
    if report.front:
        facts.append("on the front, fastest first: " + ", ".join(escape(labels.get(n, n)) for n in report.front))
    if report.latency_note:
        facts.append(f"<i>{escape(report.latency_note)}</i>")
    out = [f'<section id="candidates"><h2>Candidates</h2><p>{" · ".join(facts)}</p>']
    if report.failed_candidates:
        rows = "".join(
            f"<tr><td>{c.index}</td><td>{escape(c.label)}</td><td>{escape(c.step)}</td>"
            f"<td><code>{escape(c.code or '-')}</code></td><td>{escape(c.message)}</td></tr>"
            for c in report.failed_candidates
        )
        out.append(
            '<h3>Failed (no artifact)</h3><table id="failed-candidates"><tr><th>#</th><th>candidate</th>'
            f"<th>step</th><th>code</th><th>why</th></tr>{rows}</table>"
        )
    if report.left_out:
        rows = "".join(
            f"<tr><td>{escape(c.step)}</td><td><code>{escape(json.dumps(c.config, sort_keys=True))}</code></td>"
            f"<td>{escape(c.reason)}</td></tr>"
            for c in report.left_out
        )
        out.append(
            '<h3>Left out (not built)</h3><table id="left-out"><tr><th>step</th><th>config</th><th>why</th></tr>'
            f"{rows}</table>"
        )
    out.append("</section>")
    return "".join(out)


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
    "misses_constraint": "#8e24aa",
    "not_measured": "#757575",
}


def _verdict(e: ReportEntry, recommended: str | None, closest: str | None = None, front: bool = False) -> str:
    """The verdict, the pick or the closest miss, and (``front``: a job that chose among candidates)
    whether the entry is on the front; shapes as on the front chart."""
    if e.verdict is None:
        return "-"
    mark = '<br><b class="pick">★ recommended</b>' if e.name == recommended else ""
    if e.name == closest:
        mark = '<br><b class="closest">closest: misses a constraint</b>'
    if front and e.pareto:
        mark += '<br><span class="front-mark on">◆ on the front</span>'
    elif front and e.pareto is False:
        mark += '<br><span class="front-mark">○ off the front</span>'
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
    if rec.artifact is None and rec.closest is not None:
        return _closest_box(report)
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
    label = next((e.label for e in report.entries if e.name == rec.artifact and e.label), None)
    shown = f' <span class="rec-label">({escape(label)})</span>' if label else ""
    return (
        f'<section id="recommendation" class="rec ok"><h2>Recommended: <code>{escape(rec.artifact)}</code>{shown}</h2>'
        f'<p class="rec-why">{escape(rec.reason)}</p>'
        f'<p class="rec-numbers">{" · ".join(escape(n) for n in numbers)}</p></section>'
    )


def _closest_box(report: ReportRead) -> str:
    """Nothing within the tolerance meets the constraints: the closest candidate and what it misses,
    said as a miss, never as the pick."""
    rec = report.recommended
    assert rec is not None and rec.closest is not None
    label = _labels(report.entries).get(rec.closest)
    shown = f" ({escape(label)})" if label and label != rec.closest else ""
    missed = "".join(f"<li>{escape(m)}</li>" for m in rec.missed)
    return (
        '<section id="recommendation" class="rec none"><h2>Nothing meets the constraints</h2>'
        f'<p class="closest-line">The closest is <code>{escape(rec.closest)}</code>{shown}; it misses:</p>'
        f'<ul class="missed">{missed}</ul><p class="rec-why">{escape(rec.reason)}</p></section>'
    )


_STYLE = """\
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1000px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0 16px; } td, th { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
code { font-size: 12px; } .muted { fill: #888; color: #888; } .error { color: #c62828; font-weight: 600; }
svg.chart text { font: 12px system-ui, sans-serif; } svg.chart .title { font-weight: 600; font-size: 13px; }
.why { color: #a04000; font-size: 12px; }
#artifacts td:nth-child(1), #artifacts td:nth-child(n+3):nth-child(-n+7), #artifacts td:nth-child(9) { white-space: nowrap; }
#artifacts tr.why-row td { white-space: normal; }
#artifacts tr:has(+ tr.why-row) td { border-bottom: none; } #artifacts tr.why-row td { padding-top: 0; }
.status { font-weight: 600; } .grid { display: grid; grid-template-columns: 1fr; gap: 8px; }
.rec { border: 2px solid #2e7d32; border-radius: 6px; padding: 4px 16px; margin: 16px 0; background: #f3faf3; }
.rec.none { border-color: #a04000; background: #fff8f0; } .rec.pending { border-color: #9e9e9e; background: #f7f7f7; }
.rec h2 { margin: 8px 0 4px; } .verdict { font-weight: 600; } .pick { color: #2e7d32; }
.verdict-why { color: #555; font-size: 12px; } .closest { color: #8e24aa; } .front-mark { font-size: 12px; } .front-mark.on { font-weight: 600; }
.format { color: #666; font-size: 12px; }
.caption { color: #444; font-size: 12px; margin-top: 0; } .missed { margin: 0 0 4px; }
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


def _what(e: ReportEntry) -> str:
    """What the artifact is and runs in (its label), over its file format."""
    if not e.label:
        return escape(e.format)
    return f'{escape(e.label)}<br><span class="format">{escape(e.format)}</span>'


def _artifact_rows(report: ReportRead) -> tuple[str, str]:
    """The artifacts table's rows, and the footnotes its throughput cells point to."""
    table_rows = ""
    throughput_notes: list[str] = []
    rec = report.recommended
    recommended, closest = (rec.artifact, rec.closest) if rec else (None, None)
    front = _chose_among_candidates(report)
    for e in report.entries:
        lat = f"{_num(e.latency_ms['p50_ms'], None)} / {_num(e.latency_ms['p90_ms'], None)}" if e.latency_ms else "-"
        table_rows += (
            f"<tr><td>{escape(e.name)}</td><td>{_what(e)}</td><td>{e.size_bytes / 1e6:.2f} MB</td>"
            f"<td>{e.size_ratio:.2f}</td><td>{lat}</td><td>{f'{e.speedup:.2f}x' if e.speedup else '-'}</td>"
            f"<td>{_throughput(e, throughput_notes)}</td><td>{escape(_quality(e))}</td>"
            f"<td>{_verdict(e, recommended, closest, front)}</td></tr>{_verdict_row(e, 9)}"
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
    tolerance = float((job.task_options or {}).get("max_accuracy_drop", DEFAULT_TOLERANCE))
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
{_front_section(report, tolerance)}
{_candidates_section(report)}
<h2>Steps</h2>
<table id="steps"><tr><th>#</th><th>step</th><th>status</th><th>duration</th><th>config</th><th>note</th></tr>{step_rows}</table>
<h2>Original and artifacts</h2>
<table id="artifacts"><tr><th>name</th><th>what it is (format)</th><th>size</th><th>size ×</th><th>p50 / p90 ms (batch 1)</th>
<th>speed-up</th><th>throughput</th><th>quality</th><th>verdict (tolerance {tolerance:g})</th></tr>{table_rows}</table>
{notes}
<div class="grid">
{_bars("Size", "MB", mb, chart_id="size-chart", digits=2)}
{_bars("Latency at batch 1: p50, whisker to p90", "ms", latency, chart_id="latency-chart")}
{quality_charts}
</div>
<h2>Size against latency</h2>
{_scatter(points)}
{_pruning_rounds(job)}
{_fallback_tables(job)}
</body></html>
"""
