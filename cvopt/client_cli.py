"""The pipeline-facing commands of ``cvopt``, over cvopt.client: submit (and wait, and
download), status, cancel, download. Config from flags or CVOPT_URL / CVOPT_API_KEY.

Exit codes: 0 the job succeeded (or was submitted, without --wait); 1 the job failed, was
cancelled or did not end in time; 2 the request was refused or the service unreachable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from core.metric_names import metric_label
from cvopt.client import ApiError, Client, CvoptClientError, JobFailed, WaitTimeout

# The deployment targets the service knows (core.schemas.Target; core is not imported for it, as the
# client commands load without pydantic).
TARGETS = ("x86-cpu", "arm-cpu", "nvidia-gpu")

connection = [
    click.option(
        "--url",
        envvar="CVOPT_URL",
        default="http://127.0.0.1:8000",
        show_default=True,
        help="The service (or CVOPT_URL).",
    ),
    click.option("--api-key", envvar="CVOPT_API_KEY", required=True, help="An API key (or CVOPT_API_KEY)."),
    click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout, for scripts."),
]


def with_connection(fn):
    for option in reversed(connection):
        fn = option(fn)
    return fn


def _fail(message: str, exit_code: int, as_json: bool, **payload: Any) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, **payload}, default=str))
    click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


def _call(url: str, api_key: str, as_json: bool, fn):
    """``fn(client)``'s answer; a refused request or an unreachable service exits 2."""
    try:
        with Client(url, api_key) as cv:
            return fn(cv)
    except CvoptClientError as exc:
        _fail(str(exc), 2, as_json)


class Progress:
    """A one-line progress bar on a terminal; one line per step change elsewhere (CI logs)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.tty = quiet, sys.stderr.isatty()
        self.last: tuple | None = None

    def __call__(self, job: dict[str, Any]) -> None:
        if self.quiet:
            return
        steps = job.get("steps") or []
        current = job.get("current_step") or ""
        index = next((s["index"] for s in steps if s["status"] == "running"), None)
        where = f"step {index + 1}/{len(steps)} {current}" if index is not None else job["status"]
        width = 30
        filled = int(round(job.get("progress", 0) * width))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {job.get('progress', 0) * 100:5.1f}% {where}"
        if job.get("waiting_for"):
            line += f" (waiting for a {job['waiting_for']})"
        if self.tty:
            click.echo("\r" + line.ljust(90), nl=False, err=True)
        elif (job["status"], current) != self.last:
            click.echo(line, err=True)
        self.last = (job["status"], current)

    def done(self) -> None:
        if self.tty and not self.quiet and self.last is not None:
            click.echo(err=True)


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _num(value: Any, spec: str, suffix: str = "") -> str:
    """A report number as text; null, missing or not a number (a perfect SNR is stored as the
    string "inf") prints as itself or "-", never a crash."""
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if not isinstance(value, (int, float)):
        return "-"
    if value != value:
        return "-"
    if value in (float("inf"), float("-inf")):
        return ("∞" if value > 0 else "-∞") + suffix
    return format(value, spec) + suffix


def _quality(entry: dict[str, Any]) -> str:
    """Accuracy and fidelity side by side: an agreement of 0.0 is a result, not a blank. Another
    task's metric (mAP, F1 against FP32, pixel agreement) comes first."""
    parts = []
    metric = entry.get("metric") or {}
    if metric.get("name") not in (None, "top1", "top1_agreement"):
        parts.append(f"{metric_label(metric['name'])} " + _num(metric.get("value"), ".3f"))
    accuracy = entry.get("accuracy") or {}
    if accuracy.get("top1") is not None:
        parts.append("top-1 " + _num(accuracy["top1"], ".3f"))
    fidelity = entry.get("fidelity") or {}
    if fidelity.get("top1_agreement") is not None:
        parts.append("agree " + _num(fidelity["top1_agreement"], ".3f"))
    if fidelity.get("snr_db") is not None:
        parts.append("SNR " + _num(fidelity["snr_db"], ".1f", " dB"))
    return ", ".join(parts) or "-"


def _throughput(entry: dict[str, Any]) -> str:
    throughput = entry.get("throughput") or {}
    if throughput.get("images_per_s") is not None:
        return f"{_num(throughput['images_per_s'], '.0f')} @ {_num(throughput.get('batch'), '.0f')}"
    return "-"


def _nothing_meets(rec: dict[str, Any]) -> str | None:
    """ "nothing meets the constraints; closest: <name> (<what it misses>)" when the job's constraints
    ruled out every candidate, else None: the closest miss is named, never shipped."""
    if rec.get("artifact") or not rec.get("closest"):
        return None
    missed = "; ".join(rec.get("missed") or [])
    return f"nothing meets the constraints; closest: {rec['closest']}" + (f" ({missed})" if missed else "")


def recommendation_line(report: dict[str, Any]) -> str | None:
    """ "recommended: <name> (<reason>)", "recommended: none (<why nothing beats the original>)", or
    "recommended: none; nothing meets the constraints; closest: ..."; None until the job succeeded."""
    rec = report.get("recommended")
    if not rec:
        return None
    if missed := _nothing_meets(rec):
        return f"recommended: none; {missed}"
    return f"recommended: {rec.get('artifact') or 'none'} ({rec.get('reason', '')})"


FRONT_MARK = "◆"
HEADER = (
    "artifact",
    "format",
    "size",
    "size ×",
    "p50 ms",
    "speed-up",
    "img/s@batch",
    "accuracy/fidelity",
    "verdict",
)


def _entry_row(e: dict[str, Any], front: set[str]) -> tuple[str, ...]:
    latency = e.get("latency_ms") or {}
    name = str(e.get("name", "?"))
    return (
        f"{name} {FRONT_MARK}" if name in front else name,
        str(e.get("format", "?")),
        _fmt_size(e.get("size_bytes")),
        _num(e.get("size_ratio"), ".2f"),
        _num(latency.get("p50_ms"), ".2f"),
        _num(e.get("speedup"), ".2f", "x"),
        _throughput(e),
        _quality(e),
        str(e.get("verdict") or "-"),
    )


def _table_lines(entries: list[dict[str, Any]], front: set[str]) -> list[str]:
    """The header, a rule and a line per artifact. With labels ("OpenVINO INT8 (NNCF)", what the file is
    and what runs it), each goes on its own indented line under its artifact in place of the format
    column: a column of them would push a preset auto table (long names, long labels) far past 120
    characters. A report without labels (an older service) keeps the format column."""
    labelled = any(e.get("label") for e in entries)
    keep = [i for i in range(len(HEADER)) if not (labelled and HEADER[i] == "format")]
    rows = [tuple(HEADER[i] for i in keep)]
    rows += [tuple(cells[i] for i in keep) for cells in (_entry_row(e, front) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keep))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not labelled:
        return lines
    out = lines[:2]
    for line, e in zip(lines[2:], entries, strict=True):
        out += [line, "  " + str(e.get("label") or e.get("format") or "?")]
    return out


def _config_text(config: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in (config or {}).items())


def _notes(report: dict[str, Any], front: set[str]) -> list[str]:
    """The lines under the table: what the front marks, artifacts without a throughput, candidates
    that failed (no artifact, so no row) and candidates preset auto could not build."""
    notes = []
    if front:
        order = [n for n in report.get("front") or [] if n in front] or sorted(front)
        notes.append(f"* {FRONT_MARK} the Pareto front of p50, size and metric, fastest first: {', '.join(order)}")
    for e in report.get("entries") or []:
        if e.get("throughput_error"):
            notes.append(f"* {e.get('name')}: no throughput: {e['throughput_error']}")
    for f in report.get("failed_candidates") or []:
        label = f" ({f['label']})" if f.get("label") else ""
        code = f"{f['code']}: " if f.get("code") else ""
        notes.append(f"* failed: step {f.get('index', '?')} {f.get('step', '?')}{label}: {code}{f.get('message', '')}")
    for left in report.get("left_out") or []:
        config = _config_text(left.get("config"))
        notes.append(f"* left out: {left.get('step', '?')}{f' ({config})' if config else ''}: {left.get('reason', '')}")
    return notes


def report_table(report: dict[str, Any]) -> str:
    """The report as a text table with each artifact's verdict and label, the Pareto front marked;
    under it what the front is, artifacts that could not be measured, failed and left-out
    candidates; then the recommendation."""
    entries = report.get("entries") or []
    front = set(report.get("front") or []) | {str(e.get("name")) for e in entries if e.get("pareto")}
    recommended = recommendation_line(report)
    return "\n".join(_table_lines(entries, front) + _notes(report, front) + ([recommended] if recommended else []))


def _say_nothing_recommended(recommended: dict[str, Any] | None) -> None:
    rec = recommended or {}
    why = _nothing_meets(rec) or f"no artifact is recommended ({rec.get('reason') or 'the job has no recommendation'})"
    click.echo(f"nothing downloaded: {why}; --all fetches every artifact", err=True)


class _JsonObject(click.ParamType):
    name = "json"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            self.fail(f"not JSON: {exc}", param, ctx)
        if not isinstance(parsed, dict):
            self.fail("expected a JSON object ({...})", param, ctx)
        return parsed


def _upload_and_submit(
    cv: Client,
    model: Path,
    *,
    architecture: str | None,
    calibration: Path | None,
    evaluation: Path | None,
    input_shape: str | None,
    preset: str | None,
    steps: tuple[str, ...],
    fields: dict[str, Any],
) -> dict[str, Any]:
    """Upload the model and its datasets, then submit the job; the job as the service answers."""
    uploaded = cv.upload_model(model, architecture=architecture)
    extra = dict(fields)
    if calibration:
        extra["calibration_dataset_id"] = cv.upload_dataset(calibration)["id"]
    if evaluation:
        extra["evaluation_dataset_id"] = cv.upload_dataset(evaluation)["id"]
    if input_shape:
        extra["input_shape"] = [int(d) for d in input_shape.split(",")]
    return cv.submit_job(model_id=uploaded["id"], preset=preset, steps=list(steps) or None, **extra)


def _wait_and_show(
    cv: Client, job_id: str, *, timeout: float, download: Path | None, all_artifacts: bool, as_json: bool
) -> None:
    """Wait for the job showing progress, then print its report and download what was asked for."""
    progress = Progress(quiet=as_json)
    try:
        job = cv.wait(job_id, timeout=timeout, on_update=progress)
    finally:
        progress.done()
    report = cv.report(job_id)
    files = [str(p) for p in cv.download_artifacts(job_id, download, all_artifacts=all_artifacts)] if download else []
    if as_json:
        document = {"ok": True, "job": job, "report": report, "artifacts": cv.artifacts(job_id), "downloaded": files}
        click.echo(json.dumps(document, default=str))
    else:
        click.echo(report_table(report))
        for path in files:
            click.echo(f"downloaded {path}", err=True)
    if download and not files:
        _say_nothing_recommended(report.get("recommended"))


def _constraints(**limits: float | None) -> dict[str, float] | None:
    """The job's constraints from the limits given; None (no key sent) when none was."""
    given = {k: v for k, v in limits.items() if v is not None}
    return given or None


@click.command("submit")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--preset",
    help="e.g. auto (every candidate --target allows; the fastest that meets the limits is recommended), "
    "onnx-int8, onnx-fp16, prune50-distill-int8, tflite-int8.",
)
@click.option("--step", "steps", multiple=True, help="A step name, repeated in order (instead of --preset).")
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Calibration images (zip/tar/npz).",
)
@click.option(
    "--evaluation", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Labeled evaluation images."
)
@click.option("--architecture", help="The torchvision architecture of a state_dict upload.")
@click.option("--input-shape", help="e.g. 1,3,224,224 when the model does not say.")
@click.option(
    "--preprocessing",
    type=_JsonObject(),
    help='How images become inputs, as JSON, e.g. \'{"resize": 256, "mean": [0, 0, 0]}\'.',
)
@click.option(
    "--overrides",
    type=_JsonObject(),
    help='Step configs over the preset\'s, as JSON, e.g. \'{"distill": {"epochs": 2}}\'.',
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    help="Where the artifact will run; steps for another target are refused (auto: x86-cpu).",
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(0, 1),
    help="The tolerance on the task's metric (0.01 = 1 point); the service's default when not given.",
)
@click.option(
    "--max-latency-ms",
    type=click.FloatRange(0, min_open=True),
    help="The recommendation's p50 at batch 1 on the worker must be at most this.",
)
@click.option(
    "--max-size-mb",
    type=click.FloatRange(0, min_open=True),
    help="The recommendation's file must be at most this many MB (10^6 bytes).",
)
@click.option(
    "--allow-training",
    is_flag=True,
    help="Preset auto may add candidates that train (quantization-aware INT8 distilled from the original).",
)
@click.option("--name", help="A name for the job.")
@click.option("--webhook-url", help="POSTed the job when it ends (signed).")
@click.option("--wait/--no-wait", default=False, help="Wait for the job to end, showing progress.")
@click.option("--timeout", default=6 * 3600.0, show_default=True, help="Seconds --wait waits.")
@click.option(
    "--download",
    type=click.Path(file_okay=False, path_type=Path),
    help="Download the recommended artifact here (implies --wait); sha256 checked.",
)
@click.option(
    "--all", "all_artifacts", is_flag=True, help="With --download: every artifact, not only the recommended one."
)
@with_connection
def submit_command(
    model: Path,
    preset: str | None,
    steps: tuple[str, ...],
    calibration: Path | None,
    evaluation: Path | None,
    architecture: str | None,
    input_shape: str | None,
    preprocessing: dict[str, Any] | None,
    overrides: dict[str, Any] | None,
    target: str | None,
    max_accuracy_drop: float | None,
    max_latency_ms: float | None,
    max_size_mb: float | None,
    allow_training: bool,
    name: str | None,
    webhook_url: str | None,
    wait: bool,
    timeout: float,
    download: Path | None,
    all_artifacts: bool,
    url: str,
    api_key: str,
    as_json: bool,
) -> None:
    """Upload MODEL (and datasets), submit a job, and optionally wait and download."""
    if bool(preset) == bool(steps):
        raise click.UsageError("give --preset or one or more --step")
    fields = {
        "name": name,
        "webhook_url": webhook_url,
        "preprocessing": preprocessing,
        "overrides": overrides,
        "target": target,
        # The tolerance goes top-level, its one place in the CLI (the API also reads it from constraints).
        "max_accuracy_drop": max_accuracy_drop,
        "constraints": _constraints(max_latency_ms=max_latency_ms, max_size_mb=max_size_mb),
        "allow_training": allow_training or None,
    }
    try:
        with Client(url, api_key) as cv:
            job = _upload_and_submit(
                cv,
                model,
                architecture=architecture,
                calibration=calibration,
                evaluation=evaluation,
                input_shape=input_shape,
                preset=preset,
                steps=steps,
                fields=fields,
            )
            if not as_json:
                click.echo(f"job {job['id']} submitted", err=True)
            if not (wait or download is not None):
                click.echo(json.dumps({"ok": True, "job": job}, default=str) if as_json else job["id"])
                return
            _wait_and_show(
                cv, job["id"], timeout=timeout, download=download, all_artifacts=all_artifacts, as_json=as_json
            )
    except (JobFailed, WaitTimeout) as exc:
        _fail(str(exc), 1, as_json, job=exc.job)
    except ApiError as exc:
        _fail(str(exc), 2, as_json, code=exc.code, details=exc.details)
    except CvoptClientError as exc:
        _fail(str(exc), 2, as_json)


@click.command("status")
@click.argument("job_id")
@with_connection
def status_command(job_id: str, url: str, api_key: str, as_json: bool) -> None:
    """Show a job (exit 1 if it failed or was cancelled)."""
    job = _call(url, api_key, as_json, lambda cv: cv.get_job(job_id))
    if as_json:
        click.echo(json.dumps(job, default=str))
    else:
        click.echo(f"{job['id']}  {job['status']}  {job['progress'] * 100:.0f}%  {job.get('current_step') or ''}")
        if job.get("error"):
            click.echo(f"failed at {job['error'].get('step')}: {job['error']['message']}")
    sys.exit(1 if job["status"] in ("failed", "cancelled") else 0)


@click.command("cancel")
@click.argument("job_id")
@with_connection
def cancel_command(job_id: str, url: str, api_key: str, as_json: bool) -> None:
    """Cancel a queued or running job."""
    job = _call(url, api_key, as_json, lambda cv: cv.cancel(job_id))
    click.echo(json.dumps(job, default=str) if as_json else f"{job['id']}  {job['status']}")


@click.command("download")
@click.argument("job_id")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--all", "all_artifacts", is_flag=True, help="Every artifact, not only the recommended one.")
@with_connection
def download_command(job_id: str, dest: Path, all_artifacts: bool, url: str, api_key: str, as_json: bool) -> None:
    """Download a job's recommended artifact (--all: every artifact) into DEST, checking each sha256."""

    def fetch(cv: Client) -> tuple[list[Path], dict[str, Any]]:
        files = cv.download_artifacts(job_id, dest, all_artifacts=all_artifacts)
        # The job carries the recommendation: what was chosen and why, or why nothing was.
        return files, cv.get_job(job_id)

    files, job = _call(url, api_key, as_json, fetch)
    if as_json:
        click.echo(
            json.dumps({"ok": True, "downloaded": [str(p) for p in files], "recommended": job.get("recommended")})
        )
    elif files:
        click.echo("\n".join(str(p) for p in files))
    if not files and not all_artifacts:
        if job["status"] != "succeeded":
            click.echo(
                f"nothing downloaded: job {job_id} is {job['status']}; an artifact is recommended "
                "once it succeeds (--all fetches what is there)",
                err=True,
            )
        else:
            _say_nothing_recommended(job.get("recommended"))


def register(main: click.Group) -> None:
    """Add the client commands to ``main`` (the ``cvopt`` group, or a test's own group)."""
    for command in (submit_command, status_command, cancel_command, download_command):
        main.add_command(command)
