"""One self-contained HTML page per job: the recipe, each step's duration, and charts (inline
SVG, no script, no external file) of size, latency (p50 with a p90 whisker) and accuracy or
fidelity for the original and each artifact, a size-vs-latency scatter, and the layers the INT8
fallback kept in float. Everything the user supplied is escaped."""

from __future__ import annotations

import json
from html import escape

from core.models import Job, StepStatus
from core.schemas import ReportRead

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]
STATUS_COLOR = {"succeeded": "#2e7d32", "failed": "#c62828", "cancelled": "#757575", "running": "#1565c0",
                "queued": "#6a1b9a", "skipped": "#9e9e9e", "pending": "#9e9e9e"}


def _num(value: float, digits: int | None) -> str:
    """Fixed decimals when asked; else three significant digits (latencies span 0.02 to 2000 ms)."""
    if digits is not None:
        return f"{value:.{digits}f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(title: str, unit: str, rows: list[tuple[str, float | None, float | None]], *, chart_id: str,
          digits: int | None = None) -> str:
    """Horizontal bars (value, optional whisker end); rows without a value say 'not measured'."""
    label_w, bar_w, row_h = 230, 380, 26
    height = 34 + row_h * max(1, len(rows))
    top = max([v for _, v, _ in rows if v is not None] + [w for _, _, w in rows if w is not None] + [1e-9])
    parts = [f'<svg class="chart" id="{chart_id}" role="img" aria-label="{escape(title)}" '
             f'viewBox="0 0 {label_w + bar_w + 90} {height}" width="{label_w + bar_w + 90}" height="{height}">',
             f'<text x="0" y="16" class="title">{escape(title)}</text>']
    for i, (label, value, whisker) in enumerate(rows):
        y = 30 + i * row_h
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" class="label">{escape(label[:34])}</text>')
        if value is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + 15}" class="muted">not measured</text>')
            continue
        w = bar_w * value / top
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row_h - 8}" '
                     f'fill="{color}"><title>{escape(label)}: {_num(value, digits)} {unit}</title></rect>')
        end = w
        if whisker is not None and whisker > value:
            x1, x2 = label_w + w, label_w + bar_w * whisker / top
            mid = y + 3 + (row_h - 8) / 2
            parts.append(f'<line class="whisker" x1="{x1:.1f}" y1="{mid:.1f}" x2="{x2:.1f}" y2="{mid:.1f}" '
                         f'stroke="#333"/><line x1="{x2:.1f}" y1="{mid - 5:.1f}" x2="{x2:.1f}" y2="{mid + 5:.1f}" '
                         f'stroke="#333"/>')
            end = x2 - label_w
        parts.append(f'<text x="{label_w + end + 6:.1f}" y="{y + 15}" class="value">{_num(value, digits)} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _scatter(points: list[tuple[str, float, float]]) -> str:
    """Size (MB) against p50 latency (ms): down and left is better."""
    w, h, pad, right = 700, 340, 56, 130  # room on the right for the last point's label
    if not points:
        return '<p class="muted">No latency measured: add a benchmark step to the recipe.</p>'
    max_x = max(p[1] for p in points) * 1.15 or 1
    max_y = max(p[2] for p in points) * 1.15 or 1
    parts = [f'<svg class="chart" id="scatter" role="img" aria-label="size against latency" viewBox="0 0 {w} {h}" '
             f'width="{w}" height="{h}">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - right}" y2="{h - pad}" stroke="#555"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="#555"/>',
             f'<text x="{(w - right + pad) / 2}" y="{h - 16}" text-anchor="middle" class="label">size (MB)</text>',
             f'<text x="16" y="{(h - pad) / 2}" transform="rotate(-90 16 {(h - pad) / 2})" text-anchor="middle" '
             f'class="label">p50 latency, batch 1 (ms)</text>']
    for frac in (0, 0.5, 1):
        parts.append(f'<text x="{pad + frac * (w - pad - right):.0f}" y="{h - pad + 16}" text-anchor="middle" '
                     f'class="tick">{_num(frac * max_x, None)}</text>')
        parts.append(f'<text x="{pad - 6}" y="{h - pad - frac * (h - pad - 10) + 4:.0f}" text-anchor="end" '
                     f'class="tick">{_num(frac * max_y, None)}</text>')
    for i, (label, size, latency) in enumerate(points):
        x = pad + size / max_x * (w - pad - right)
        y = h - pad - latency / max_y * (h - pad - 10)
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{color}">'
                     f'<title>{escape(label)}: {size:.2f} MB, {latency:.2f} ms</title></circle>')
        parts.append(f'<text x="{x + 9:.1f}" y="{y - 7:.1f}" class="tick">{escape(label[:28])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fallback_tables(job: Job) -> str:
    out = []
    for step in job.steps:
        fallback = (step.metrics or {}).get("fallback") if step.status == StepStatus.succeeded else None
        if not fallback:
            continue
        kept = fallback.get("kept_float") or []
        attempts = fallback.get("attempts") or []
        metric = fallback.get("metric", "score")
        rows = "".join(
            f"<tr><td>{escape(str(layer.get('node')))}</td><td>{escape(str(layer.get('op_type', '')))}</td>"
            f"<td>{layer.get('worst_channel_snr_db', float('nan')):.1f}</td><td>{layer.get('snr_db', float('nan')):.1f}</td>"
            f"<td>{escape(str(layer.get('reason', '')))}</td></tr>"
            for layer in kept
        ) or '<tr><td colspan="5">none: every quantizable layer runs in INT8</td></tr>'
        tries = "".join(
            f"<tr><td>{a.get('float_layers')}</td><td>{a.get(metric, float('nan')):.4f}</td>"
            f"<td>{a.get('drop', float('nan')):.4f}</td></tr>" for a in attempts
        )
        out.append(
            f'<section class="fallback"><h2>Per-layer precision ({escape(step.name)}, step {step.index})</h2>'
            f"<p>Tolerance {escape(str(fallback.get('tolerance')))} on {escape(metric)}, validated on "
            f"{escape(str(fallback.get('validated_on')))} ({fallback.get('samples')} samples); "
            f"{'met' if fallback.get('tolerance_met') else 'not met'}.</p>"
            f'<table><tr><th>layer kept in float</th><th>op</th><th>worst channel SNR dB</th><th>SNR dB</th>'
            f"<th>why</th></tr>{rows}</table>"
            f"<table><tr><th>layers in float</th><th>{escape(metric)}</th><th>drop</th></tr>{tries}</table></section>"
        )
    return "".join(out)


def render(job: Job, report: ReportRead) -> str:
    entries = report.entries
    mb = [(e.name, e.size_bytes / 1e6, None) for e in entries]
    latency = [(e.name, e.latency_ms["p50_ms"] if e.latency_ms else None,
                e.latency_ms.get("p90_ms") if e.latency_ms else None) for e in entries]
    labeled = any(e.accuracy for e in entries)
    if labeled:
        quality = [(e.name, (e.accuracy or {}).get("top1"), None) for e in entries]
        quality_title = "Top-1 accuracy on the evaluation set"
    else:
        quality = [(e.name, (e.fidelity or {}).get("top1_agreement") if e.fidelity else (1.0 if e.step is None else None),
                    None) for e in entries]
        quality_title = "Fidelity: top-1 agreement with the original"
    points = [(e.name, e.size_bytes / 1e6, e.latency_ms["p50_ms"]) for e in entries if e.latency_ms]
    step_rows = "".join(
        f'<tr><td>{s.index}</td><td>{escape(s.name)}</td>'
        f'<td><span class="status" style="color:{STATUS_COLOR.get(s.status.value, "#000")}">{s.status.value}</span></td>'
        f"<td>{((s.finished_at - s.started_at).total_seconds() if s.started_at and s.finished_at else 0):.2f} s</td>"
        f"<td><code>{escape(json.dumps(s.config, sort_keys=True))}</code></td>"
        f"<td>{escape(s.message or '')}</td></tr>"
        for s in job.steps
    )
    table_rows = ""
    for e in entries:
        q = "-"
        if e.accuracy:
            q = f"top-1 {e.accuracy.get('top1', float('nan')):.4f}"
        elif e.fidelity:
            q = (f"agreement {e.fidelity.get('top1_agreement', float('nan')):.4f}, "
                 f"SNR {e.fidelity.get('snr_db', float('nan')):.1f} dB")
        lat = f"{e.latency_ms['p50_ms']:.2f} / {e.latency_ms['p90_ms']:.2f}" if e.latency_ms else "-"
        table_rows += (
            f"<tr><td>{escape(e.name)}</td><td>{escape(e.format)}</td><td>{e.size_bytes / 1e6:.2f} MB</td>"
            f"<td>{e.size_ratio:.2f}</td><td>{lat}</td><td>{f'{e.speedup:.2f}x' if e.speedup else '-'}</td>"
            f"<td>{escape(q)}</td></tr>"
        )
    error = ""
    if job.error_code:
        error = (f'<p class="error">Failed at step {escape(job.error_step or "-")}: {escape(job.error_code)}: '
                 f"{escape(job.error_message or '')}</p>")
    machine = report.machine or {}
    title = escape(job.name or job.id)
    recipe = escape(job.preset or "custom steps")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cvopt report: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1000px; color: #222; padding: 0 16px; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }} td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }}
code {{ font-size: 12px; }} .muted {{ fill: #888; color: #888; }} .error {{ color: #c62828; font-weight: 600; }}
svg.chart text {{ font: 12px system-ui, sans-serif; }} svg.chart .title {{ font-weight: 600; font-size: 13px; }}
.status {{ font-weight: 600; }} .grid {{ display: grid; grid-template-columns: 1fr; gap: 8px; }}
</style></head>
<body>
<h1>Job {title}</h1>
<p><span class="status" id="job-status" style="color:{STATUS_COLOR.get(job.status.value, '#000')}">{job.status.value}</span>
 · recipe: <b>{recipe}</b> · model <code>{escape(job.model.filename)}</code> ({escape(job.model.format)})
 · created {job.created_at:%Y-%m-%d %H:%M:%S} UTC · measured on {escape(str(machine.get('cpu') or machine.get('gpu') or machine.get('platform') or 'the worker'))}</p>
{error}
<h2>Steps</h2>
<table id="steps"><tr><th>#</th><th>step</th><th>status</th><th>duration</th><th>config</th><th>note</th></tr>{step_rows}</table>
<h2>Original and artifacts</h2>
<table id="artifacts"><tr><th>name</th><th>format</th><th>size</th><th>size ×</th><th>p50 / p90 ms (batch 1)</th><th>speed-up</th><th>quality</th></tr>{table_rows}</table>
<div class="grid">
{_bars("Size", "MB", mb, chart_id="size-chart", digits=2)}
{_bars("Latency at batch 1: p50, whisker to p90", "ms", latency, chart_id="latency-chart")}
{_bars(quality_title, "", quality, chart_id="quality-chart", digits=4)}
</div>
<h2>Size against latency</h2>
{_scatter(points)}
{_fallback_tables(job)}
</body></html>
"""
