"""The pipeline runner: claims a job, runs its steps (passes) in order, uploads artifacts under
deterministic keys, records progress, heartbeat and metrics, and always ends the job
``succeeded``, ``failed`` (step, reason, log tail) or ``cancelled``.

Re-runs are safe: an artifact's key is the sha256 of everything that determines it, and a
step whose result is already in the store is reused instead of recomputed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core import logs
from core.errors import CvoptError, JobCancelled, NotFound, PassError, StorageUnavailable
from core.formats import (
    AOTI_PACKAGE,
    EXPORTED_PROGRAM,
    KERAS,
    ONNX,
    OPENVINO_IR,
    SAVED_MODEL,
    STATE_DICT,
    TENSORRT_ENGINE,
    TFLITE,
    TORCHSCRIPT,
)
from core.models import Artifact, Dataset, Job, JobStatus, JobStep, StepStatus, Worker, utcnow
from core.queue import enqueue_job
from core.schemas import Preprocessing
from core.settings import Settings
from core.storage import ObjectStore
from core.workers import is_gpu_queue, live_queues, waiting_for, worker_identity
from worker.passes.base import ArtifactRef, DatasetRef, PassContext, PassResult
from worker.passes.registry import get_pass
from worker.step_process import StepFailed, StepLimits, default_memory_limit_mb, run_step_in_child

log = logging.getLogger("cvopt.runner")

FILE_EXTENSIONS = {
    ONNX: ".onnx",
    TORCHSCRIPT: ".ts.pt",
    EXPORTED_PROGRAM: ".pt2",
    STATE_DICT: ".pt",
    TFLITE: ".tflite",
    TENSORRT_ENGINE: ".engine",
    AOTI_PACKAGE: ".aoti.pt2",
    # One download holding the IR's two files; ".openvino" says what to unpack it for.
    OPENVINO_IR: ".openvino.zip",
    KERAS: ".keras",
    SAVED_MODEL: ".zip",
}
LOG_TAIL_CHARS = 4000


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _LogTail(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)[-LOG_TAIL_CHARS:]


# A candidate that failed with one of these in an earlier run of the job runs again (the machine, not
# the model, may have been the cause); any other refusal stands.
_TRANSIENT_CODES = frozenset({"out_of_memory", "step_timeout", "step_cpu_limit", "internal_error"})
# task_options keys that no step reads (core.recommend does), kept out of the artifact cache key.
_REPORT_ONLY_OPTIONS = frozenset({"target", "constraints", "left_out", "allow_training"})


class _ClaimLost(Exception):
    """The job is no longer this run's: the reaper gave it to another worker (this one looked
    dead: cut off from the database, paused) or it ended. This run stops and writes nothing."""


class _Heartbeat(threading.Thread):
    """Writes heartbeat and progress while a step runs; notices a cancel request, and that the
    job was taken from this run (``lost``, which also stops the running step)."""

    def __init__(
        self, job_id: str, sessions: sessionmaker[Session], interval: float, *, worker: str, attempt: int
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.sessions, self.interval = job_id, sessions, interval
        self.worker, self.attempt = worker, attempt
        self.progress = 0.0
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.stopped = threading.Event()

    def beat(self) -> None:
        with self.sessions() as s:
            owned = s.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.status == JobStatus.running,
                    Job.worker == self.worker,
                    Job.attempts == self.attempt,
                )
                .values(heartbeat_at=utcnow(), progress=self.progress)
            ).rowcount
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
            s.commit()
        if not owned:
            self.lost.set()
            self.cancelled.set()
        elif cancel:
            self.cancelled.set()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # a database blip must not kill the job; the next beat retries
                # One line, no traceback: an outage must not push the job's own log out of its tail.
                log.warning(
                    "heartbeat for job %s failed: %s: %s",
                    self.job_id,
                    type(exc).__name__,
                    (str(exc).strip().splitlines() or [""])[0][:200],
                )


@dataclass
class _Claim:
    job_id: str
    attempt: int


@dataclass(frozen=True)
class _StepRow:
    id: str
    index: int
    name: str
    config: dict[str, Any]
    queue: str
    status: StepStatus
    optional: bool = False
    error_code: str | None = None  # a failed step's, from its metrics


@dataclass
class _JobPlan:
    """The job as its rows stood when this run started, read in one session (none stays open
    while a step runs)."""

    steps: list[_StepRow]
    model_key: str
    model_name: str
    model_format: str
    model_sha: str
    model_details: dict[str, Any]
    calibration: Dataset | None
    evaluation: Dataset | None
    input_spec: list[dict[str, Any]]
    preprocessing: Preprocessing
    task: str
    task_options: dict[str, Any]
    # What every step's result depends on beyond its own pass, config and input (_step_digest).
    job_facts: dict[str, Any]
    # The step cache and the files shared between jobs are the tenant's own: another tenant
    # never reuses (nor learns of) an artifact made from the same bytes.
    tenant_prefix: str
    # Where earlier runs of this job stored what they made, by step index (a step replayed after
    # a hand-over or a lost worker finds its own object, whichever GPU made it).
    recorded: dict[int, str]


@dataclass
class _Chain:
    """What the steps take, as it grows: the job's inputs, the artifact the next producing step
    starts from (``current``, its sha256 ``sha``) and every artifact made so far, in order."""

    original: ArtifactRef
    calibration: DatasetRef | None
    evaluation: DatasetRef | None
    current: ArtifactRef
    sha: str
    artifacts: list[ArtifactRef]


class JobRunner:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ObjectStore,
        sessions: sessionmaker[Session],
        queues: list[str] | None = None,
        celery=None,
    ) -> None:
        self.settings, self.store, self.sessions = settings, store, sessions
        self.celery = celery  # None: the app configured from the environment
        self.me = worker_identity()
        # The attempt this runner holds of each job it runs: every row write checks it still does.
        self._claims: dict[str, int] = {}
        # The queues this worker consumes (None: it runs every step it is given).
        self.queues = set(queues) if queues is not None else None

    def _can_run(self, queue: str | None) -> bool:
        return self.queues is None or queue in (None, "cpu") or queue in self.queues

    def _hand_over(self, job_id: str, queue: str, step: str) -> None:
        """The next step must run elsewhere (an engine for another GPU kind): queue the job
        there. The worker that takes it replays the steps before from the artifact cache and
        skips the measurements already made."""
        with self.sessions() as s:
            self._check_owned(s, job_id)
            job = s.get(Job, job_id)
            job.status, job.queue, job.enqueued_at = JobStatus.queued, queue, utcnow()
            job.worker, job.current_step = None, None
            job.attempts = max(0, job.attempts - 1)  # moving on is not a failed attempt
            s.commit()
        log.info("job %s: step %s runs on queue %s; handing the job over", job_id, step, queue)
        enqueue_job(job_id, queue, celery=self.celery)

    # -- claiming ------------------------------------------------------------------------------

    def _claim(self, job_id: str) -> _Claim | None:
        with self.sessions() as s:
            job = s.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
            if job is None:
                log.warning("job %s does not exist; dropping its message", job_id)
                return None
            if job.status.terminal:
                return None
            now = utcnow()
            if job.cancel_requested:
                self._finish_cancelled(job)
                s.commit()
                return None
            if (
                job.status == JobStatus.running
                and job.heartbeat_at is not None
                and now - job.heartbeat_at < timedelta(seconds=self.settings.stale_after_seconds)
            ):
                log.info("job %s is running on %s; ignoring a duplicate delivery", job_id, job.worker)
                return None
            if job.attempts >= self.settings.max_attempts:
                job.status = JobStatus.failed
                job.error_code = "too_many_attempts"
                job.error_message = (
                    f"the job was started {job.attempts} times and its worker was lost each time "
                    "(killed, out of memory, or restarted)"
                )
                job.error_step = job.current_step
                job.finished_at = now
                s.commit()
                return None
            job.status = JobStatus.running
            job.attempts += 1
            job.worker = self.me
            job.heartbeat_at = now
            job.started_at = job.started_at or now
            s.commit()
            return _Claim(job_id=job_id, attempt=job.attempts)

    @staticmethod
    def _finish_cancelled(job: Job) -> None:
        job.status = JobStatus.cancelled
        job.finished_at = utcnow()
        job.current_step = None
        for step in job.steps:
            if step.status in (StepStatus.pending, StepStatus.running):
                step.status = StepStatus.skipped

    # -- running -------------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        token = logs.job_id.set(job_id)  # every log line of this job carries its id
        try:
            self._run(job_id)
        finally:
            logs.job_id.reset(token)

    def _run(self, job_id: str) -> None:
        claim = self._claim(job_id)
        if claim is None:
            return
        work = self.settings.work_dir / job_id / f"attempt-{claim.attempt}"
        work.mkdir(parents=True, exist_ok=True)
        tail = _LogTail()
        cvopt_logger = logging.getLogger("cvopt")
        cvopt_logger.addHandler(tail)
        heartbeat = _Heartbeat(
            job_id, self.sessions, self.settings.heartbeat_seconds, worker=self.me, attempt=claim.attempt
        )
        heartbeat.start()
        self._claims[job_id] = claim.attempt
        try:
            self._run_steps(job_id, work, heartbeat, tail)
        except _ClaimLost:
            log.warning(
                "job %s was handed to another run (attempt %d looked lost); this one stops without writing",
                job_id,
                claim.attempt,
            )
        finally:
            self._claims.pop(job_id, None)
            heartbeat.stopped.set()
            heartbeat.join(timeout=5)
            cvopt_logger.removeHandler(tail)
            shutil.rmtree(work, ignore_errors=True)

    def _fetch(self, key: str, dest: Path, what: str | None = None) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._storage(what or f"reading {key}", lambda: self.store.get_file(key, dest))
        return dest

    def _storage(self, what: str, operation):
        """A store operation, retried with back-off while storage is unreachable (the client
        retries each request a few times itself; this rides out a restart). A missing object is
        not retried; the last error after CVOPT_STORAGE_RETRY_SECONDS fails the step."""
        tries = 0

        def attempt():
            nonlocal tries
            tries += 1
            return operation()

        try:
            return _with_backoff(
                attempt,
                retry_if=lambda exc: not isinstance(exc, NotFound),
                budget_s=self.settings.storage_retry_seconds,
                first_s=1.0,
                cap_s=10.0,
                warn=lambda exc, delay: log.warning(
                    "storage failed while %s (%s); retrying in %.0f s", what, exc, delay
                ),
            )
        except NotFound:
            raise
        except Exception as exc:
            raise StorageUnavailable(
                f"storage failed while {what}, {tries} tries in {self.settings.storage_retry_seconds:.0f} s: "
                f"{type(exc).__name__}: {str(exc)[:300]}",
                code="storage_unavailable",
            ) from exc

    def _db(self, what: str, operation):
        """A row update, retried with back-off while the database is unreachable, so that a
        running job rides out a short outage instead of losing its worker's work."""
        return _with_backoff(
            operation,
            retry_if=lambda exc: isinstance(exc, OperationalError),
            budget_s=self.settings.db_retry_seconds,
            first_s=0.5,
            cap_s=5.0,
            warn=lambda exc, delay: log.warning(
                "database unavailable while %s (%s); retrying in %.1f s", what, str(exc).splitlines()[0][:200], delay
            ),
        )

    def _fetch_shared(self, key: str, dest: Path) -> bool:
        try:
            self._fetch(key, dest)
            return True
        except NotFound:
            return False

    def _dataset_ref(self, dataset: Dataset | None, work: Path, role: str) -> DatasetRef | None:
        if dataset is None:
            return None
        path = self._fetch(
            dataset.storage_key, work / "inputs" / f"{role}.{dataset.format}", what=f"reading the {role} dataset"
        )
        return DatasetRef(
            path=path,
            format=dataset.format,
            labeled=dataset.labeled,
            num_samples=dataset.num_samples,
            layout=dataset.layout,
            sample_shape=list(dataset.sample_shape),
            label_type=dataset.label_type,
        )

    def _run_steps(self, job_id: str, work: Path, heartbeat: _Heartbeat, tail: _LogTail) -> None:
        """Every step in order, then the job's end: succeeded, cancelled, or failed with the step
        and a reason (an unexpected error also goes on to the worker's log and Celery)."""
        plan = self._read_plan(job_id)
        current_step: str | None = None
        try:
            chain = self._fetch_inputs(plan, work)
            for step in plan.steps:
                current_step = step.name
                run = self._run_candidate if step.optional else self._run_step
                if not run(job_id, plan, step, chain, work, heartbeat):
                    return  # handed over to another queue; the worker there ends the job
            self._finish(job_id, JobStatus.succeeded, tail=tail)
        except _ClaimLost:
            raise
        except JobCancelled:
            self._end_cancelled(job_id, current_step, heartbeat, tail)
        except CvoptError as exc:
            log.warning("job %s failed at %s: %s", job_id, current_step, exc.message)
            extra_log = getattr(exc, "log_text", None)
            self._fail(job_id, tail, current_step, exc.code, exc.message, extra_log=extra_log)
        except MemoryError:
            self._fail(job_id, tail, current_step, "out_of_memory", f"out of memory at step {current_step}")
        except Exception as exc:
            # A bug or an unexpected library error: the job still ends failed with a reason,
            # and the exception goes on to the worker's log and Celery.
            log.exception("job %s crashed at %s", job_id, current_step)
            first_line = (str(exc).strip().splitlines() or [""])[0][:500]
            message = f"step {current_step} crashed: {type(exc).__name__}: {first_line}"
            self._fail(job_id, tail, current_step, "internal_error", message, extra_log=traceback.format_exc())
            raise

    def _read_plan(self, job_id: str) -> _JobPlan:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            model = job.model
            calibration = s.get(Dataset, job.calibration_dataset_id) if job.calibration_dataset_id else None
            evaluation = s.get(Dataset, job.evaluation_dataset_id) if job.evaluation_dataset_id else None
            preprocessing = Preprocessing.model_validate(job.preprocessing or {})
            input_spec, task, task_options = list(job.input_spec), job.task or "auto", dict(job.task_options or {})
            model_details = dict(model.details or {})
            job_facts = {
                "original": {"sha256": model.sha256, "format": model.format, "details": model_details},
                "input_spec": input_spec,
                "preprocessing": preprocessing.model_dump(mode="json"),
                # What the steps judge by; the target, the latency and size constraints and what auto
                # left out only decide the recommendation, so a job that changes them reuses the artifacts.
                "task": {"task": task, **{k: v for k, v in task_options.items() if k not in _REPORT_ONLY_OPTIONS}},
                "datasets": {
                    "calibration": calibration.sha256 if calibration else None,
                    "evaluation": evaluation.sha256 if evaluation else None,
                },
            }
            artifacts = s.scalars(select(Artifact).where(Artifact.job_id == job_id))
            return _JobPlan(
                steps=[
                    _StepRow(
                        st.id,
                        st.index,
                        st.name,
                        dict(st.config),
                        st.queue,
                        st.status,
                        st.optional,
                        ((st.metrics or {}).get("error") or {}).get("code"),
                    )
                    for st in job.steps
                ],
                model_key=model.storage_key,
                model_name=model.filename,
                model_format=model.format,
                model_sha=model.sha256,
                model_details=model_details,
                calibration=calibration,
                evaluation=evaluation,
                input_spec=input_spec,
                preprocessing=preprocessing,
                task=task,
                task_options=task_options,
                job_facts=job_facts,
                tenant_prefix=f"tenants/{job.tenant_id}/",
                recorded={a.step_index: a.storage_key.rsplit("/", 1)[0] for a in artifacts},
            )

    def _fetch_inputs(self, plan: _JobPlan, work: Path) -> _Chain:
        original_path = self._fetch(
            plan.model_key,
            work / "inputs" / f"original{FILE_EXTENSIONS.get(plan.model_format, '')}",
            what="reading the model",
        )
        original = ArtifactRef(
            name=plan.model_name, format=plan.model_format, path=original_path, meta=plan.model_details
        )
        return _Chain(
            original=original,
            calibration=self._dataset_ref(plan.calibration, work, "calibration"),
            evaluation=self._dataset_ref(plan.evaluation, work, "evaluation"),
            current=original,
            sha=plan.model_sha,
            artifacts=[],
        )

    def _run_step(
        self, job_id: str, plan: _JobPlan, step: _StepRow, chain: _Chain, work: Path, heartbeat: _Heartbeat
    ) -> bool:
        """One step: skipped (measured before), handed over (False: another worker goes on),
        replayed from the artifact cache, or executed; then recorded."""
        if heartbeat.cancelled.is_set():
            raise JobCancelled()
        cls = get_pass(step.name)
        if step.status == StepStatus.succeeded and cls.produces is None:
            return True  # measured before a hand-over or a lost worker; its metrics stand
        # A step that already succeeded elsewhere (an engine for another GPU kind) comes back
        # from the artifact cache; only a step still to run can need another worker.
        if step.status != StepStatus.succeeded and not self._can_run(step.queue):
            self._hand_over(job_id, step.queue, step.name)
            return False
        config = cls.Config.model_validate(step.config)
        step_dir = work / f"{step.index:02d}-{step.name}"
        step_dir.mkdir(parents=True, exist_ok=True)
        self._mark_step_running(job_id, step.id, step.name, step.index / len(plan.steps))
        heartbeat.progress = step.index / len(plan.steps)
        ctx = self._context(plan, step, chain, step_dir, heartbeat)
        started = time.perf_counter()
        log.info("job %s: step %d %s started", job_id, step.index, step.name)
        cache_key = _cache_key(plan, step, cls, config, chain.sha)
        result, cached = self._cached_result(cache_key, step_dir) if cache_key else (None, False)
        if result is None:
            result = self._execute(cls, ctx, chain.current, config, heartbeat)
        duration = time.perf_counter() - started
        if result.artifact is not None:
            self._add_artifact(job_id, step, cls, result, cache_key, cached, chain)
        metrics = dict(result.metrics, duration_s=round(duration, 3), cached=cached)
        self._mark_step_done(job_id, step.id, metrics, message=result.metrics.get("warning"))
        log.info("job %s: step %d %s finished in %.2fs", job_id, step.index, step.name, duration)
        return True

    def _run_candidate(
        self, job_id: str, plan: _JobPlan, step: _StepRow, chain: _Chain, work: Path, heartbeat: _Heartbeat
    ) -> bool:
        """An optional step (a candidate of preset auto): when it refuses its result (a PassError: an
        INT8 model over the tolerance, a conversion that does not verify) or its process hits a limit or
        dies, the step ends failed with the code and reason, and the job goes on from the same model.
        Cancellation and the service's own faults (storage, database) still end the job."""
        cls = get_pass(step.name)
        if step.status == StepStatus.failed and step.error_code not in _TRANSIENT_CODES:
            return True  # refused in an earlier run of this job (a lost worker's): the same inputs refuse again
        if chain.current.format not in cls.accepts:
            # The producing step it would start from was a candidate too, and failed.
            message = (
                f"{step.name} takes {', '.join(sorted(cls.accepts))}; the chain holds {chain.current.format} "
                "because the candidate it starts from failed"
            )
            self._mark_step_failed(job_id, step.id, "source_failed", message)
            return True
        log_text = ""
        try:
            return self._run_step(job_id, plan, step, chain, work, heartbeat)
        except (PassError, StepFailed) as exc:
            code, message, log_text = exc.code, exc.message, getattr(exc, "log_text", "")
        except MemoryError:
            code, message = "out_of_memory", f"out of memory at step {step.name}"
        log.warning("job %s: candidate step %d %s failed (%s): %s", job_id, step.index, step.name, code, message)
        if log_text:  # a crash's traceback from the step's process: kept in the worker's log
            log.warning("job %s: candidate step %d %s's last words:\n%s", job_id, step.index, step.name, log_text)
        self._mark_step_failed(job_id, step.id, code, message, log_text)
        return True

    def _mark_step_failed(self, job_id: str, step_id: str, code: str, message: str, log_text: str = "") -> None:
        error = {"code": code, "message": message, **({"log_tail": log_text[-LOG_TAIL_CHARS:]} if log_text else {})}
        self._mark_step_done(job_id, step_id, {"error": error}, f"{code}: {message}", status=StepStatus.failed)

    def _context(
        self, plan: _JobPlan, step: _StepRow, chain: _Chain, step_dir: Path, heartbeat: _Heartbeat
    ) -> PassContext:
        total, prefix = len(plan.steps), plan.tenant_prefix

        def report(fraction: float) -> None:
            heartbeat.progress = (step.index + min(max(fraction, 0.0), 1.0)) / total

        def check_cancelled() -> None:
            if heartbeat.cancelled.is_set():
                raise JobCancelled()

        return PassContext(
            work_dir=step_dir,
            original=chain.original,
            artifacts=list(chain.artifacts),
            input_spec=plan.input_spec,
            preprocessing=plan.preprocessing,
            task=plan.task,
            task_options=plan.task_options,
            calibration_dataset=chain.calibration,
            evaluation_dataset=chain.evaluation,
            threads=self.settings.benchmark_threads,
            log=logging.getLogger(f"cvopt.pass.{step.name}"),
            report_progress=report,
            check_cancelled=check_cancelled,
            shared_prefix=prefix,
            fetch_shared=lambda key, dest: self._fetch_shared(prefix + key, dest),
            store_shared=lambda key, path: self.store.put_file(prefix + key, path),
        )

    def _add_artifact(
        self, job_id: str, step: _StepRow, cls, result: PassResult, cache_key: str | None, cached: bool, chain: _Chain
    ) -> None:
        """Store and record the step's artifact; the next producing step starts from it, unless
        it is a deployment artifact, which ends its branch."""
        fmt = result.format or cls().output_format(chain.current.format)
        ref = ArtifactRef(
            name=f"{step.index:02d}-{step.name}{FILE_EXTENSIONS.get(fmt, '')}",
            format=fmt,
            path=result.artifact,
            step=step.name,
            step_index=step.index,
            meta=dict(result.meta),
        )
        digest = self._record_artifact(job_id, step.id, step.index, step.name, ref, cache_key, result, cached)
        if cls.advances_chain():
            chain.current, chain.sha = ref, digest
        chain.artifacts.append(ref)

    def _end_cancelled(self, job_id: str, current_step: str | None, heartbeat: _Heartbeat, tail: _LogTail) -> None:
        if heartbeat.lost.is_set():
            raise _ClaimLost() from None  # the "cancel" was the heartbeat finding the job taken
        log.info("job %s cancelled during %s", job_id, current_step)
        with self.sessions() as s:
            job = s.get(Job, job_id)
            self._check_owned(s, job_id)
            self._finish_cancelled(job)
            job.log_tail = tail.text()
            s.commit()

    def _fail(
        self, job_id: str, tail: _LogTail, step: str | None, code: str, message: str, *, extra_log: str | None = None
    ) -> None:
        self._finish(job_id, JobStatus.failed, tail=tail, step=step, code=code, message=message, extra_log=extra_log)

    def _execute(self, cls, ctx: PassContext, source: ArtifactRef, config, heartbeat: _Heartbeat) -> PassResult:
        """Run the pass: in a child process with the step limits (the default), or in this
        process (CVOPT_STEP_ISOLATION=inline, for debugging a pass)."""
        if self.settings.step_isolation == "inline":
            return cls().run(ctx, source, config)
        memory = self.settings.step_memory_limit_mb
        limits = StepLimits(
            memory_mb=default_memory_limit_mb(self.settings.worker_concurrency) if memory is None else memory,
            cpu_seconds=self.settings.step_cpu_limit_seconds,
            timeout_seconds=self.settings.step_timeout_seconds,
        )
        return run_step_in_child(
            name=cls.name,
            config=config.model_dump(mode="json"),
            source=source,
            ctx=ctx,
            limits=limits,
            cancelled=heartbeat.cancelled.is_set,
            prewarm=self.settings.step_prewarm,
        )

    # -- the store as a cache --------------------------------------------------------------------

    def _cached_result(self, cache_key: str, step_dir: Path) -> tuple[PassResult | None, bool]:
        manifest_key = f"{cache_key}/result.json"
        try:
            manifest_path = self._fetch(
                manifest_key,
                step_dir / "cached-result.json",
                what=f"looking for a cached result of step {step_dir.name[3:]}",
            )
        except NotFound:
            return None, False
        manifest = json.loads(manifest_path.read_text())
        artifact = self._fetch(
            f"{cache_key}/{manifest['file']}",
            step_dir / manifest["file"],
            what=f"reading the cached result of step {step_dir.name[3:]}",
        )
        if sha256_file(artifact) != manifest["sha256"]:
            log.warning("cached artifact %s is corrupt; recomputing", cache_key)
            return None, False
        return PassResult(
            metrics=manifest["metrics"], artifact=artifact, format=manifest["format"], meta=manifest["meta"]
        ), True

    def _record_artifact(
        self, job_id, step_id, index, name, ref: ArtifactRef, cache_key, result: PassResult, cached
    ) -> str:
        digest = sha256_file(ref.path)
        size = ref.path.stat().st_size
        stored_name = "artifact" + FILE_EXTENSIONS.get(ref.format, "")
        file_key = f"{cache_key}/{stored_name}"
        if not cached:
            self._storage(f"storing the artifact of step {name}", lambda: self.store.put_file(file_key, ref.path))
            manifest = ref.path.parent / "result.json"
            manifest.write_text(
                json.dumps(
                    _json_safe(
                        {
                            "file": stored_name,
                            "sha256": digest,
                            "format": ref.format,
                            "metrics": result.metrics,
                            "meta": result.meta,
                        }
                    )
                )
            )
            # The manifest goes last: its presence means the artifact is whole.
            self._storage(
                f"storing the artifact of step {name}",
                lambda: self.store.put_file(f"{cache_key}/result.json", manifest),
            )
        return self._db(
            f"recording the artifact of step {name}",
            lambda: self._record_artifact_row(job_id, step_id, index, name, ref, file_key, digest, size, result),
        )

    def _record_artifact_row(
        self, job_id, step_id, index, name, ref: ArtifactRef, file_key: str, digest: str, size: int, result: PassResult
    ) -> str:
        with self.sessions() as s:
            self._check_owned(s, job_id)
            existing = s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.step_index == index))
            if existing is None:
                existing = Artifact(job_id=job_id, step_index=index)
                s.add(existing)
            existing.step, existing.name, existing.format = name, ref.name, ref.format
            existing.storage_key, existing.sha256, existing.size_bytes = file_key, digest, size
            existing.meta = dict(result.meta)
            s.flush()
            s.execute(update(JobStep).where(JobStep.id == step_id).values(artifact_id=existing.id))
            s.commit()
        return digest

    # -- row updates -----------------------------------------------------------------------------

    # Each update is whole in itself, so that _db can retry it after a lost connection, and is
    # made only while the job is still this run's.

    def _check_owned(self, s: Session, job_id: str) -> None:
        row = s.execute(
            select(Job.status, Job.worker, Job.attempts).where(Job.id == job_id).with_for_update()
        ).one_or_none()
        if row is None or tuple(row) != (JobStatus.running, self.me, self._claims.get(job_id)):
            raise _ClaimLost()

    def _mark_step_running(self, job_id: str, step_id: str, name: str, progress: float) -> None:
        def write() -> None:
            with self.sessions() as s:
                self._check_owned(s, job_id)
                s.execute(
                    update(JobStep)
                    .where(JobStep.id == step_id)
                    .values(status=StepStatus.running, started_at=utcnow(), finished_at=None, message=None)
                )
                s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(current_step=name, progress=progress, heartbeat_at=utcnow())
                )
                s.commit()

        self._db(f"starting step {name}", write)

    def _mark_step_done(
        self,
        job_id: str,
        step_id: str,
        metrics: dict[str, Any],
        message: str | None,
        status: StepStatus = StepStatus.succeeded,
    ) -> None:
        def write() -> None:
            with self.sessions() as s:
                self._check_owned(s, job_id)
                s.execute(
                    update(JobStep)
                    .where(JobStep.id == step_id)
                    .values(
                        status=status,
                        finished_at=utcnow(),
                        metrics=_json_safe(metrics),
                        message=message,
                    )
                )
                s.commit()

        self._db("recording a step's metrics", write)

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        tail: _LogTail,
        step: str | None = None,
        code: str | None = None,
        message: str | None = None,
        extra_log: str | None = None,
    ) -> None:
        self._db(
            f"ending the job {status.value}",
            lambda: self._write_end(
                job_id, status, tail=tail, step=step, code=code, message=message, extra_log=extra_log
            ),
        )

    def _write_end(
        self,
        job_id: str,
        status: JobStatus,
        *,
        tail: _LogTail,
        step: str | None,
        code: str | None,
        message: str | None,
        extra_log: str | None,
    ) -> None:
        with self.sessions() as s:
            self._check_owned(s, job_id)
            job = s.get(Job, job_id)
            job.status = status
            job.finished_at = utcnow()
            job.log_tail = ((tail.text() + "\n" + (extra_log or "")).strip())[-LOG_TAIL_CHARS:]
            if status == JobStatus.succeeded:
                job.progress = 1.0
                job.current_step = None
            else:
                job.error_code, job.error_message, job.error_step = code, message, step
                for st in job.steps:
                    if st.name == step and st.status == StepStatus.running:
                        st.status = StepStatus.failed
                        st.finished_at = utcnow()
                        st.message = message
                    elif st.status in (StepStatus.pending, StepStatus.running):
                        st.status = StepStatus.skipped
            s.commit()


def _cache_key(plan: _JobPlan, step: _StepRow, cls, config, input_sha256: str) -> str | None:
    """Where the step's result is stored: nowhere for a measuring step; for a step that succeeded
    before, where that run stored it; else under the digest of everything that determines it."""
    if cls.produces is None:
        return None
    if step.status == StepStatus.succeeded and step.index in plan.recorded:
        return plan.recorded[step.index]
    return plan.tenant_prefix + "artifacts/" + _step_digest(cls, config, input_sha256, step.queue, plan.job_facts)


def _step_digest(cls, config, input_sha256: str, queue: str, job_facts: dict[str, Any]) -> str:
    """Everything that changes what a step makes: its code version and config, its input, the
    job's facts (how the upload is read, e.g. a state_dict's architecture; the original, a
    distillation's teacher; shapes, preprocessing, data) and where it runs."""
    return canonical_digest(
        {
            **job_facts,
            "pass": cls.name,
            "pass_version": cls.version,
            "config": config.model_dump(mode="json"),
            "input_sha256": input_sha256,
            "queue": queue,
            # An engine or compiled package is this GPU's and these libraries' own.
            "device": _gpu_facts() if is_gpu_queue(queue) else None,
        }
    )


def _gpu_facts() -> dict[str, Any] | None:
    """What the worker's GPU build depends on, as the worker's main process detected it at start
    (CVOPT_WORKER_GPU; None outside a GPU worker)."""
    gpu = json.loads(os.environ.get("CVOPT_WORKER_GPU") or "null")
    if not gpu:
        return None
    return {k: gpu.get(k) for k in ("name", "compute_capability", "cuda", "torch", "tensorrt")}


def _with_backoff(operation, *, retry_if, budget_s: float, first_s: float, cap_s: float, warn):
    """``operation()`` until it succeeds; an error that ``retry_if`` accepts is retried after
    ``first_s`` seconds, doubling up to ``cap_s``, while ``budget_s`` allows, each retry announced
    through ``warn(exc, delay)``; then the last error is raised."""
    deadline = time.monotonic() + budget_s
    delay = first_s
    while True:
        try:
            return operation()
        except Exception as exc:
            if not retry_if(exc) or time.monotonic() + delay > deadline:
                raise
            warn(exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, cap_s)


def _json_safe(value: Any) -> Any:
    """Metrics go into JSON columns: infinities (a perfect SNR) become strings."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- the reaper ----------------------------------------------------------------------------------


def reap_stale_jobs(*, settings: Settings, sessions: sessionmaker[Session], celery=None) -> dict[str, int]:
    """Re-queue running jobs whose worker went silent and queued jobs nobody picked up.

    The broker only carries ids; this makes the database the source of truth again after a
    worker died or the broker lost its queue. Bounded: a job past max_attempts fails. Jobs are
    sent again oldest first, so that they keep their submission order among themselves.
    """
    now = utcnow()
    with sessions() as s:
        live = live_queues(s, settings)
        failed = _fail_unserved(s, settings, live, now)
        requeue, too_many = _take_back_stale(s, settings, live, now)
        s.commit()
    for job_id, queue in requeue:
        log.warning("re-queueing job %s", job_id)
        enqueue_job(job_id, queue, celery=celery)
    return {"requeued": len(requeue), "failed": failed + too_many}


def _fail_unserved(s: Session, settings: Settings, live: set[str], now: datetime) -> int:
    """Fail the queued jobs on a queue that no live worker consumes (a GPU job and no GPU worker
    up) past the timeout, saying why: re-sending them would only pile messages up."""
    abandoned = now - timedelta(seconds=settings.no_worker_timeout_seconds)
    failed = 0
    for job in s.scalars(
        select(Job)
        .where(Job.status == JobStatus.queued, Job.queue.not_in(live or {""}), Job.enqueued_at < abandoned)
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all():
        pending = [st for st in job.steps if st.status == StepStatus.pending]
        job.status = JobStatus.failed
        job.error_code = "no_worker"
        # The step that waits for the missing worker, not the CPU steps before it.
        waiting = next((st for st in pending if st.queue == job.queue), pending[0] if pending else None)
        job.error_step = waiting.name if waiting else None
        job.error_message = (
            f"no {waiting_for(job.queue)} was alive to take this job for "
            f"{settings.no_worker_timeout_seconds:.0f} s (queue {job.queue!r}); start one with "
            f"`cvopt worker --queues {job.queue}` on a machine that has "
            + ("an NVIDIA GPU" if is_gpu_queue(job.queue) else "the worker extras")
        )
        job.finished_at = now
        for st in pending:
            st.status = StepStatus.skipped
        failed += 1
    return failed


def _take_back_stale(
    s: Session, settings: Settings, live: set[str], now: datetime
) -> tuple[list[tuple[str, str]], int]:
    """([(job id, queue)] to send again, how many failed past max_attempts): running jobs whose
    worker went silent, and queued jobs nobody picked up on a queue someone consumes."""
    stale = now - timedelta(seconds=settings.stale_after_seconds)
    lost = now - timedelta(seconds=settings.worker_lost_after_seconds)
    forgotten = now - timedelta(seconds=settings.requeue_after_seconds)
    # A worker that stopped deletes its row; one that died stops refreshing it. Its jobs go
    # back to the queue after a few missed heartbeats rather than after stale_after_seconds.
    beating = select(Worker.id).where(Worker.last_seen_at >= lost)
    rows = s.scalars(
        select(Job)
        .where(
            ((Job.status == JobStatus.running) & (Job.heartbeat_at < stale))
            | ((Job.status == JobStatus.running) & (Job.heartbeat_at < lost) & Job.worker.not_in(beating))
            | ((Job.status == JobStatus.queued) & (Job.enqueued_at < forgotten))
        )
        .order_by(Job.created_at, Job.id)
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all()
    requeue: list[tuple[str, str]] = []
    failed = 0
    for job in rows:
        if job.status == JobStatus.running and job.attempts >= settings.max_attempts:
            job.status = JobStatus.failed
            job.error_code = "too_many_attempts"
            job.error_step = job.current_step
            job.error_message = (
                f"the worker running step {job.current_step} stopped answering "
                f"{job.attempts} times (killed, out of memory, or restarted)"
            )
            job.finished_at = now
            failed += 1
            continue
        if job.status == JobStatus.queued and job.queue not in live:
            continue  # nobody could take it; the original message waits in the broker
        job.status = JobStatus.queued
        job.enqueued_at = now
        requeue.append((job.id, job.queue))
    return requeue, failed
