"""Each step in a child process of its own, with memory, CPU-time and wall-clock limits.

Untrusted models are loaded and run here, not in the worker: a model that exhausts memory, spins,
or crashes a native library ends its own process, and the worker records why ("out of memory at
step X", "step X exceeded N s") and takes the next job. The child is a fresh interpreter
(``python -m worker.step_process``, which imports torch and onnxruntime while it waits as the
spare, so that the next step starts at once), not a fork: the worker has threads (heartbeat,
reaper, Celery's), and a fork would copy their locks mid-use.

The protocol is files and one pipe. The parent writes the request (the pass, its config, the
input artifacts, datasets and job facts) as JSON in the step's work dir; the child sets its own
limits first, runs the pass, and writes the result (or the error) as JSON beside it. Progress
comes back over a pipe as ``progress <fraction>`` lines; the child's log records come back on
stderr as ``LEVEL|logger|message`` lines, which the parent logs again so that they reach the
job's log tail. Cancellation and timeouts kill the child's whole process group; a child whose
worker died kills itself (PR_SET_PDEATHSIG, and a watchdog on its parent's pid).
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import errors
from core.errors import CvoptError, JobCancelled
from core.settings import get_settings
from core.storage import get_store
from worker.passes.base import ArtifactRef, PassContext, PassResult, is_out_of_memory
from worker.passes.registry import get_pass

log = logging.getLogger("cvopt.step")

PROGRESS_FD_ENV = "CVOPT_STEP_PROGRESS_FD"
PARENT_PID_ENV = "CVOPT_STEP_PARENT_PID"
NICE_ENV = "CVOPT_STEP_NICE"
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\|([\w.\-]+)\|(.*)$")
KILL_GRACE_S = 5.0
# Imported by a step process while it waits for its step (what most steps need).
# (The pass registry and the store come with this module's own imports.)
PRELOAD = ("numpy", "torch", "onnx", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class StepLimits:
    memory_mb: int = 0  # RLIMIT_DATA of the step process; 0: none
    cpu_seconds: int = 0  # RLIMIT_CPU; 0: none
    timeout_seconds: int = 0  # wall clock, enforced by the parent; 0: none


class StepFailed(CvoptError):
    """The step's process hit a limit or died; ``log_text`` has its last words."""

    code = "step_failed"

    def __init__(self, message: str, *, code: str, details: Any = None, log_text: str = ""):
        super().__init__(message, code=code, details=details)
        self.log_text = log_text


def default_memory_limit_mb(concurrency: int) -> int:
    """80% of the machine's memory, shared among the jobs a worker runs at once."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return 0
    return int(total * 0.8 / max(1, concurrency) / 2**20)


# -- what a step process is given ------------------------------------------------------------------


def write_request(
    path: Path, *, name: str, config: dict, source: ArtifactRef, ctx: PassContext, limits: StepLimits
) -> None:
    """The step as JSON for the child: the context by its own definition (PassContext.to_wire)."""
    request = {
        "pass": name,
        "config": config,
        "source": PassContext.value_to_wire(source),
        "context": ctx.to_wire(),
        "limits": dataclasses.asdict(limits),
    }
    path.write_text(json.dumps(request))


# -- the parent's side -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Child:
    proc: subprocess.Popen
    progress_r: int


_spare: _Child | None = None
_spare_lock = threading.Lock()


def _spawn() -> _Child:
    """A fresh step process that imports the heavy libraries, then waits for its request."""
    progress_r, progress_w = os.pipe()
    env = dict(
        os.environ,
        **{
            PROGRESS_FD_ENV: str(progress_w),
            PARENT_PID_ENV: str(os.getpid()),
            NICE_ENV: str(get_settings().step_nice),
            "PYTHONUNBUFFERED": "1",
        },
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.step_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(progress_w,),
        env=env,
        start_new_session=True,
    )
    os.close(progress_w)
    return _Child(proc=proc, progress_r=progress_r)


def _alive_or_new(child: _Child | None) -> _Child:
    """``child`` if it still runs, else a new step process (a dead one's pipe is closed)."""
    if child is not None and child.proc.poll() is None:
        return child
    if child is not None:
        os.close(child.progress_r)
    return _spawn()


def prewarm() -> None:
    """Start the spare step process now (a worker's pool process at start-up), so that even the
    first step after a restart does not wait for imports."""
    global _spare
    with _spare_lock:
        _spare = _alive_or_new(_spare)


def _take_child(prewarm: bool) -> _Child:
    """The spare step process if it is alive (its imports are done: a step starts at once), else
    a new one; then another spare starts while this step runs."""
    global _spare
    with _spare_lock:
        child, _spare = _alive_or_new(_spare), None
        if prewarm:
            _spare = _spawn()
    return child


def run_step_in_child(
    *,
    name: str,
    config: dict,
    source: ArtifactRef,
    ctx: PassContext,
    limits: StepLimits,
    cancelled: Callable[[], bool],
    prewarm: bool = True,
) -> PassResult:
    """Run one pass in a child process and return its result; raise the pass's own error, or
    StepFailed when the process hit a limit or died, or JobCancelled when ``cancelled()``."""
    request = ctx.work_dir / "step-request.json"
    result_path = ctx.work_dir / "step-result.json"
    result_path.unlink(missing_ok=True)
    write_request(request, name=name, config=config, source=source, ctx=ctx, limits=limits)
    child = _take_child(prewarm)
    proc, progress_r = child.proc, child.progress_r
    try:
        proc.stdin.write(f"{request}\n".encode())
        proc.stdin.close()
    except OSError:  # it died while it waited; its exit status says why below
        pass
    tail: list[str] = []
    # The relays log in this thread's context (the job id on every line).
    readers = [
        threading.Thread(
            target=contextvars.copy_context().run, args=(_relay_logs, proc.stderr, name, tail), daemon=True
        ),
        threading.Thread(target=_relay_progress, args=(progress_r, ctx.report_progress), daemon=True),
    ]
    for thread in readers:
        thread.start()
    started = time.monotonic()
    killed_for: str | None = None
    try:
        while (ended := _reap(proc, 0.25)) is None:
            if cancelled():
                killed_for = "cancelled"
            elif limits.timeout_seconds and time.monotonic() - started > limits.timeout_seconds:
                killed_for = "timeout"
            if killed_for:
                ended = _kill_group(proc)
                break
    except BaseException:
        _kill_group(proc)  # the worker itself is stopping: leave no step behind
        raise
    finally:
        for thread in readers:
            thread.join(timeout=5)
    returncode, peak_mb = ended
    log_text = "\n".join(tail[-40:])
    if killed_for == "cancelled":
        raise JobCancelled()
    if killed_for == "timeout":
        raise StepFailed(
            f"step {name} exceeded {limits.timeout_seconds} s (CVOPT_STEP_TIMEOUT_SECONDS) and was stopped",
            code="step_timeout",
            details={"timeout_s": limits.timeout_seconds},
            log_text=log_text,
        )
    return _outcome(name, returncode, result_path, limits, peak_mb, log_text)


def _outcome(
    name: str, returncode: int, result_path: Path, limits: StepLimits, peak_mb: float, log_text: str
) -> PassResult:
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if result is not None and result.get("ok"):
        return PassResult(
            metrics=result["metrics"],
            artifact=Path(result["artifact"]) if result["artifact"] else None,
            format=result["format"],
            meta=result["meta"],
        )
    error = (result or {}).get("error") or {}
    memory_hint = f" (limit {limits.memory_mb} MiB, CVOPT_STEP_MEMORY_LIMIT_MB)" if limits.memory_mb else ""
    if error.get("type") == "cvopt":
        cls = getattr(errors, error.get("class", ""), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, CvoptError) else CvoptError
        raise cls(error["message"], code=error["code"], details=error.get("details"))
    if error.get("type") == "oom" or (
        returncode < 0
        and (-returncode == signal.SIGKILL or (limits.memory_mb and peak_mb >= 0.9 * limits.memory_mb))
        and -returncode != signal.SIGXCPU
    ):
        raise StepFailed(
            f"out of memory at step {name}{memory_hint}",
            code="out_of_memory",
            details={"memory_limit_mb": limits.memory_mb, "peak_rss_mb": round(peak_mb)},
            log_text=log_text,
        )
    if returncode == -signal.SIGXCPU:
        raise StepFailed(
            f"step {name} exceeded its CPU-time limit of {limits.cpu_seconds} s (CVOPT_STEP_CPU_LIMIT_SECONDS)",
            code="step_cpu_limit",
            details={"cpu_limit_s": limits.cpu_seconds},
            log_text=log_text,
        )
    if error.get("type") == "crash":
        raise StepFailed(
            f"step {name} crashed: {error['exc_type']}: {error['message']}",
            code="internal_error",
            log_text=error.get("traceback", "") or log_text,
        )
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
    raise StepFailed(
        f"step {name} crashed: its process ended with {how}",
        code="internal_error",
        details={"returncode": returncode},
        log_text=log_text,
    )


def _reap(proc: subprocess.Popen, timeout: float) -> tuple[int, float] | None:
    """Wait up to ``timeout`` s for the child: (return code, its own peak RSS in MiB), or None."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(0.05, timeout))


def _kill_group(proc: subprocess.Popen) -> tuple[int, float]:
    """SIGTERM to the step's process group, SIGKILL after a grace period; what the step itself
    started (compile workers) goes too."""
    if proc.returncode is not None:
        return proc.returncode, 0.0
    ended = None
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if (ended := _reap(proc, wait)) is not None:
            break
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return ended or (-signal.SIGKILL, 0.0)


def _relay_logs(stream, name: str, tail: list[str]) -> None:
    fallback = logging.getLogger(f"cvopt.pass.{name}")
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        if not line:
            continue
        tail.append(line)
        del tail[:-200]
        match = LOG_LINE.match(line)
        if match:
            level, logger_name, message = match.groups()
            logging.getLogger(logger_name).log(logging.getLevelName(level), "%s", message)
        else:
            fallback.info("%s", line)
    stream.close()


def _relay_progress(fd: int, report: Callable[[float], None]) -> None:
    with os.fdopen(fd, "r") as pipe:
        for line in pipe:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "progress":
                try:
                    report(float(parts[1]))
                except ValueError:
                    pass


# -- the child's side --------------------------------------------------------------------------------


def _apply_limits(limits: dict) -> None:
    if limits.get("memory_mb"):
        # RLIMIT_DATA counts heap and private anonymous mappings (Linux 4.7+): what a model's
        # tensors take, but not the shared libraries' code, which RLIMIT_AS would.
        size = int(limits["memory_mb"]) * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (size, size))
    if limits.get("cpu_seconds"):
        soft = int(limits["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 10))  # SIGXCPU at soft, SIGKILL at hard


def die_with_parent(parent: int) -> None:
    """End this process (SIGKILL) when its parent ends, however the parent ends: a step with its
    worker, the embedded worker with ``cvopt serve``. ``parent``: the parent's pid as it was when
    it started this process; if it died before the kernel was told, this process was already
    handed to init and must not run on."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not glibc
        pass
    if os.getppid() != parent:
        os._exit(137)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(137)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class _StderrLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().replace("\n", " | ")
            sys.stderr.write(f"{record.levelname}|{record.name}|{message}\n")
        except Exception:  # pragma: no cover - logging must never fail a step
            pass


def _child_main() -> int:
    _become_step_process()
    line = sys.stdin.readline().strip()
    if not line:
        return 0  # the worker closed it: no step for this one
    request_path = Path(line)
    request = json.loads(request_path.read_text())
    _apply_limits(request["limits"])
    root = logging.getLogger()
    root.handlers[:] = [_StderrLines()]
    root.setLevel(logging.INFO)
    progress = os.fdopen(int(os.environ[PROGRESS_FD_ENV]), "w", buffering=1)
    result_path = request_path.with_name("step-result.json")

    def write(payload: dict) -> None:
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, default=str))
        tmp.replace(result_path)

    return _run_request(request, lambda fraction: progress.write(f"progress {fraction:.4f}\n"), write)


def _become_step_process() -> None:
    """Tie this process to its worker, lower its priority, and do the slow imports now, while it
    waits as the spare, not while a step waits."""
    die_with_parent(int(os.environ.get(PARENT_PID_ENV) or os.getppid()))
    # Below the API and the worker itself: on a shared machine, a step's imports and compute must
    # not take the CPU from requests (CVOPT_STEP_NICE; 0 keeps the worker's priority).
    os.nice(int(os.environ.get(NICE_ENV) or 0))
    for module in PRELOAD:
        try:
            __import__(module)
        except Exception:  # an optional extra that is not installed; the step says so itself
            pass


def _run_request(request: dict, report: Callable[[float], None], write: Callable[[dict], None]) -> int:
    """Run the requested pass and ``write`` its result or its error; the process's exit code."""
    try:
        cls = get_pass(request["pass"])
        config = cls.Config.model_validate(request["config"])
        _log_start(request)
        ctx = PassContext.from_wire(request["context"], **_local_fields(request, report))
        result = cls().run(ctx, PassContext.value_from_wire(ArtifactRef, request["source"]), config)
        artifact = str(result.artifact) if result.artifact else None
        write(
            {"ok": True, "metrics": result.metrics, "artifact": artifact, "format": result.format, "meta": result.meta}
        )
        return 0
    except CvoptError as exc:
        error = {"class": type(exc).__name__, "code": exc.code, "message": exc.message, "details": exc.details}
        write({"ok": False, "error": {"type": "cvopt", **error}})
        return 0
    except MemoryError:
        write({"ok": False, "error": {"type": "oom"}})
        return 1
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:500]
        kind = "oom" if is_out_of_memory(exc) else "crash"
        logging.getLogger("cvopt.step").error("step %s failed: %s", request["pass"], first_line)
        error = {"exc_type": type(exc).__name__, "message": first_line, "traceback": traceback.format_exc()[-4000:]}
        write({"ok": False, "error": {"type": kind, **error}})
        return 1


def _local_fields(request: dict, report: Callable[[float], None]) -> dict[str, Any]:
    """The PassContext fields that do not travel (PassContext.to_wire), made in this process."""
    store = get_store()
    shared_prefix = request["context"]["shared_prefix"]

    def fetch_shared(key: str, dest: Path) -> bool:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(shared_prefix + key, dest)
            return True
        except errors.NotFound:
            return False

    return {
        "log": logging.getLogger(f"cvopt.pass.{request['pass']}"),
        "report_progress": report,
        "fetch_shared": fetch_shared,
        "store_shared": lambda key, path: store.put_file(shared_prefix + key, path),
    }


def _log_start(request: dict) -> None:
    limits = request["limits"]
    logging.getLogger("cvopt.step").info(
        "step %s runs in process %d (nice %d, memory limit %s, CPU-time limit %s)",
        request["pass"],
        os.getpid(),
        os.nice(0),
        f"{limits['memory_mb']} MiB" if limits.get("memory_mb") else "none",
        f"{limits['cpu_seconds']} s" if limits.get("cpu_seconds") else "none",
    )


if __name__ == "__main__":
    sys.exit(_child_main())
