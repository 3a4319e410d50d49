"""The runner's claim and the reaper, on Postgres, each test inside a transaction that is
rolled back (the code under test commits to savepoints)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from core.models import (
    Job,
    JobStatus,
    JobStep,
    Model,
    StepStatus,
    Worker,
    new_id,
    utcnow,
)
from core.queue import make_celery
from core.settings import Settings
from worker.runner import JobRunner, reap_stale_jobs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(migrated_pg):
    engine = create_engine(migrated_pg)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    conn = engine.connect()
    outer = conn.begin()
    factory = sessionmaker(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    yield factory
    outer.rollback()
    conn.close()


@pytest.fixture(scope="module")
def broker_url():
    from tests.conftest import claim_redis_db, release_redis_db

    url = claim_redis_db()
    yield url
    release_redis_db(url)


@pytest.fixture
def broker(broker_url):
    client = redis.Redis.from_url(broker_url)
    client.delete("cpu", "gpu", "gpu.l4", "gpu.h100")
    yield broker_url, client
    client.delete("cpu", "gpu", "gpu.l4", "gpu.h100")


def settings_for(broker_url: str, **kw) -> Settings:
    return Settings(
        broker_url=broker_url,
        database_url="postgresql+psycopg://unused",
        storage_url="file:///tmp/unused",
        stale_after_seconds=60,
        requeue_after_seconds=300,
        max_attempts=3,
        **kw,
    )


def make_job(
    session,
    *,
    status: JobStatus,
    heartbeat_age: float | None = None,
    enqueued_age: float = 0,
    attempts: int = 0,
    cancel_requested: bool = False,
    queue: str = "cpu",
    steps: list[JobStep] | None = None,
) -> Job:
    model = Model(
        id=new_id(),
        tenant_id="default",
        name="m",
        filename="m.onnx",
        format="onnx",
        sha256="0" * 64,
        size_bytes=1,
        storage_key="models/x/m.onnx",
        inputs=[],
        outputs=[],
    )
    now = utcnow()
    job = Job(
        id=new_id(),
        tenant_id="default",
        status=status,
        model_id=model.id,
        queue=queue,
        input_spec=[],
        preprocessing={},
        attempts=attempts,
        cancel_requested=cancel_requested,
        current_step="export_onnx",
        heartbeat_at=None if heartbeat_age is None else now - timedelta(seconds=heartbeat_age),
        enqueued_at=now - timedelta(seconds=enqueued_age),
        progress=0.0,
        steps=steps or [JobStep(index=0, name="export_onnx", config={}, status=StepStatus.pending, metrics={})],
    )
    session.add_all([model, job])
    session.commit()
    return job


def queued_ids(client, queue: str = "cpu") -> list[str]:
    import json

    return [json.loads(m)["headers"]["argsrepr"] for m in client.lrange(queue, 0, -1)]


@pytest.fixture(autouse=True)
def cpu_worker_alive(sessions):
    """A live CPU worker, as in every deployment whose reaper runs (the reaper runs in workers)."""
    with sessions() as s:
        s.add(Worker(id=f"test:{new_id()}", hostname="test", queues=["cpu"], gpu=None))
        s.commit()


def test_reaper_requeues_a_job_whose_worker_went_silent(sessions, broker):
    url, client = broker
    with sessions() as s:
        silent = make_job(s, status=JobStatus.running, heartbeat_age=600, attempts=1)
        alive = make_job(s, status=JobStatus.running, heartbeat_age=5, attempts=1)
    counts = reap_stale_jobs(settings=settings_for(url), sessions=sessions, celery=make_celery(settings_for(url)))
    assert counts == {"requeued": 1, "failed": 0}
    with sessions() as s:
        assert s.get(Job, silent.id).status == JobStatus.queued
        assert s.get(Job, alive.id).status == JobStatus.running
    assert queued_ids(client) == [repr([silent.id])]


def test_reaper_resends_a_queued_job_the_broker_lost(sessions, broker):
    url, client = broker
    with sessions() as s:
        lost = make_job(s, status=JobStatus.queued, enqueued_age=3600)
        fresh = make_job(s, status=JobStatus.queued, enqueued_age=1)
    reap_stale_jobs(settings=settings_for(url), sessions=sessions, celery=make_celery(settings_for(url)))
    assert queued_ids(client) == [repr([lost.id])]
    with sessions() as s:
        assert s.get(Job, fresh.id).status == JobStatus.queued


def test_reaper_fails_a_job_after_max_attempts(sessions, broker):
    url, client = broker
    with sessions() as s:
        doomed = make_job(s, status=JobStatus.running, heartbeat_age=600, attempts=3)
    counts = reap_stale_jobs(settings=settings_for(url), sessions=sessions, celery=make_celery(settings_for(url)))
    assert counts == {"requeued": 0, "failed": 1}
    with sessions() as s:
        job = s.get(Job, doomed.id)
        assert job.status == JobStatus.failed and job.error_code == "too_many_attempts"
        assert job.error_step == "export_onnx" and "3 times" in job.error_message
    assert client.llen("cpu") == 0


def test_a_duplicate_delivery_of_a_running_job_is_ignored(sessions, broker, tmp_path):
    url, _ = broker
    runner = JobRunner(settings=settings_for(url), store=None, sessions=sessions)
    with sessions() as s:
        busy = make_job(s, status=JobStatus.running, heartbeat_age=2, attempts=1)
    assert runner._claim(busy.id) is None
    with sessions() as s:
        assert s.get(Job, busy.id).attempts == 1


def test_claiming_a_cancelled_or_exhausted_job_ends_it(sessions, broker):
    url, _ = broker
    runner = JobRunner(settings=settings_for(url), store=None, sessions=sessions)
    with sessions() as s:
        cancelled = make_job(s, status=JobStatus.queued, cancel_requested=True)
        exhausted = make_job(s, status=JobStatus.queued, attempts=3)
        fine = make_job(s, status=JobStatus.queued)
    assert runner._claim(cancelled.id) is None
    assert runner._claim(exhausted.id) is None
    claim = runner._claim(fine.id)
    assert claim is not None and claim.attempt == 1
    with sessions() as s:
        assert s.get(Job, cancelled.id).status == JobStatus.cancelled
        assert s.get(Job, cancelled.id).steps[0].status == StepStatus.skipped
        assert s.get(Job, exhausted.id).status == JobStatus.failed
        claimed = s.get(Job, fine.id)
        assert claimed.status == JobStatus.running and claimed.worker == runner.me and claimed.heartbeat_at


def test_a_gpu_job_with_no_gpu_worker_waits_visibly_then_fails_with_the_reason(sessions, broker):
    from core.views import job_to_read
    from core.workers import live_queues

    url, client = broker
    settings = settings_for(url, no_worker_timeout_seconds=600)
    with sessions() as s:
        young = make_job(s, status=JobStatus.queued, queue="gpu", enqueued_age=400)
        old = make_job(s, status=JobStatus.queued, queue="gpu", enqueued_age=700)
    counts = reap_stale_jobs(settings=settings, sessions=sessions, celery=make_celery(settings))
    assert counts == {"requeued": 0, "failed": 1}
    assert client.llen("gpu") == 0  # nobody consumes it: re-sending would only pile up messages
    with sessions() as s:
        live = live_queues(s, settings)
        assert live == {"cpu"}
        waiting = job_to_read(s.get(Job, young.id), live)
        assert waiting.status == JobStatus.queued and waiting.waiting_for == "gpu worker"
        failed = s.get(Job, old.id)
        assert failed.status == JobStatus.failed and failed.error_code == "no_worker"
        assert "no gpu worker was alive" in failed.error_message and "600 s" in failed.error_message
        assert failed.error_step == "export_onnx" and failed.steps[0].status == StepStatus.skipped
        # A GPU worker comes up: the job no longer waits for one.
        s.add(Worker(id="gpu-box:1", hostname="gpu-box", queues=["gpu", "gpu.h100"], gpu={"name": "NVIDIA H100"}))
        s.commit()
        assert job_to_read(s.get(Job, young.id), live_queues(s, settings)).waiting_for is None


def test_a_step_for_another_gpu_kind_hands_the_job_over(sessions, broker, tmp_path):
    from core.storage import LocalStore

    url, client = broker
    settings = settings_for(url, data_dir=tmp_path / "data")
    store = LocalStore(tmp_path / "store", signing_key=b"k" * 32, ttl_seconds=60)
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"not needed before the hand-over")
    store.put_file("models/x/m.onnx", model_file)
    with sessions() as s:
        job = make_job(
            s,
            status=JobStatus.queued,
            queue="gpu.h100",
            steps=[
                JobStep(index=0, name="benchmark", config={}, status=StepStatus.succeeded, metrics={"done": 1}),
                JobStep(
                    index=1,
                    name="build_tensorrt",
                    config={"gpu_kind": "l4"},
                    queue="gpu.l4",
                    status=StepStatus.pending,
                    metrics={},
                ),
            ],
        )
    runner = JobRunner(
        settings=settings,
        store=store,
        sessions=sessions,
        queues=["cpu", "gpu", "gpu.h100"],
        celery=make_celery(settings),
    )
    runner.run(job.id)
    with sessions() as s:
        moved = s.get(Job, job.id)
        assert moved.status == JobStatus.queued and moved.queue == "gpu.l4"
        assert moved.attempts == 0 and moved.worker is None  # moving on is not a failed attempt
        assert moved.steps[0].metrics == {"done": 1}  # the measurement made before stays
        assert moved.steps[1].status == StepStatus.pending
    assert queued_ids(client, "gpu.l4") == [repr([job.id])]

    # On the L4 worker, the H100 step that already succeeded is replayed from the cache, never
    # handed back (no ping-pong between kinds). Here its cached engine is missing and the step
    # must be recomputed, which this GPU-less machine cannot: the job fails there, saying so.
    with sessions() as s:
        moved = s.get(Job, job.id)
        moved.steps[0].name, moved.steps[0].config, moved.steps[0].queue = (
            "build_tensorrt",
            {"gpu_kind": "h100"},
            "gpu.h100",
        )
        s.commit()
    l4 = JobRunner(
        settings=settings, store=store, sessions=sessions, queues=["cpu", "gpu", "gpu.l4"], celery=make_celery(settings)
    )
    l4.run(job.id)
    with sessions() as s:
        ended = s.get(Job, job.id)
        assert ended.queue == "gpu.l4" and ended.status == JobStatus.failed
        assert ended.error_step == "build_tensorrt" and ended.error_code in ("no_gpu", "tensorrt_missing")
    assert client.llen("gpu.h100") == 0


def test_a_run_whose_job_was_given_to_another_writes_nothing_more(sessions, broker, tmp_path):
    """The reaper took the job from a worker that only looked dead (cut off from the database,
    paused): when that run comes back, its heartbeat notices and stops the step, and none of its
    row writes lands over the new run's."""
    from worker.runner import _ClaimLost, _Heartbeat, _LogTail

    url, _ = broker
    settings = settings_for(url, work_dir=tmp_path)
    runner = JobRunner(settings=settings, store=None, sessions=sessions, celery=make_celery(settings))
    with sessions() as s:
        job = make_job(s, status=JobStatus.queued)
    claim = runner._claim(job.id)
    runner._claims[job.id] = claim.attempt
    beat = _Heartbeat(job.id, sessions, 1.0, worker=runner.me, attempt=claim.attempt)
    beat.beat()
    assert not beat.lost.is_set()
    with sessions() as s:  # the reaper re-queued it and another worker claimed it
        taken = s.get(Job, job.id)
        taken.worker, taken.attempts = "other-host:1:abc", claim.attempt + 1
        s.commit()
    beat.beat()
    assert beat.lost.is_set() and beat.cancelled.is_set()  # the running step is stopped
    for write in (
        lambda: runner._mark_step_done(job.id, job.steps[0].id, {"x": 1}, message=None),
        lambda: runner._finish(job.id, JobStatus.succeeded, tail=_LogTail()),
    ):
        with pytest.raises(_ClaimLost):
            write()
    with sessions() as s:
        kept = s.get(Job, job.id)
        assert kept.status == JobStatus.running and kept.worker == "other-host:1:abc"
        assert kept.steps[0].status == StepStatus.pending and kept.steps[0].metrics == {}


def test_a_worker_is_lost_only_after_several_heartbeats():
    with pytest.raises(ValueError, match="at least 3 x"):
        Settings(heartbeat_seconds=20, worker_lost_after_seconds=30)


def test_the_migrations_match_the_models(migrated_pg):
    from alembic import command

    from core.migrate import alembic_config

    command.check(alembic_config(migrated_pg))  # raises when a model change has no migration


def test_a_failed_candidate_step_is_recorded_and_the_job_goes_on(sessions, broker, tmp_path):
    """Optional steps (preset auto's candidates): a step that refuses its result ends failed with its code
    and reason, in its own process as in production; a step that cannot start from what the chain holds
    is failed too; the job still succeeds, the measuring step times what was made, and the report lists
    the failed candidates."""
    from core.storage import LocalStore
    from core.views import job_report
    from tests.test_api_inprocess import tiny_onnx

    url, _ = broker
    settings = settings_for(url, data_dir=tmp_path / "data")
    store = LocalStore(tmp_path / "store", signing_key=b"k" * 32, ttl_seconds=60)
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(tiny_onnx())
    store.put_file("models/x/m.onnx", model_file)

    def step(index: int, name: str, config: dict, optional: bool) -> JobStep:
        return JobStep(
            index=index, name=name, config=config, queue="cpu", optional=optional, status=StepStatus.pending, metrics={}
        )

    with sessions() as s:
        job = make_job(
            s,
            status=JobStatus.queued,
            steps=[
                step(0, "export_onnx", {}, False),
                # FP16 weights cannot keep 200 dB: the IR is refused (openvino_mismatch).
                step(1, "convert_openvino", {"weights": "fp16", "inference_precision": "f32", "min_snr_db": 200}, True),
                step(2, "quantize_int8", {}, True),  # no calibration dataset: refused
                step(3, "compile_gpu", {}, True),  # takes a PyTorch program; the chain holds ONNX
                step(4, "benchmark", {"batch_sizes": [1], "runs": 5, "warmup": 1}, False),
            ],
        )
        job.input_spec = [{"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32"}]
        job.task_options = {"max_accuracy_drop": 0.01}
        s.commit()
    JobRunner(settings=settings, store=store, sessions=sessions, queues=["cpu"], celery=make_celery(settings)).run(
        job.id
    )
    with sessions() as s:
        ended = s.get(Job, job.id)
        assert ended.status == JobStatus.succeeded, (ended.error_code, ended.error_message)
        statuses = [(st.name, st.status) for st in ended.steps]
        assert statuses == [
            ("export_onnx", StepStatus.succeeded),
            ("convert_openvino", StepStatus.failed),
            ("quantize_int8", StepStatus.failed),
            ("compile_gpu", StepStatus.failed),
            ("benchmark", StepStatus.succeeded),
        ]
        codes = [st.metrics["error"]["code"] for st in ended.steps[1:4]]
        assert codes == ["openvino_mismatch", "calibration_dataset_required", "source_failed"]
        assert "dB < 200 dB" in ended.steps[1].message
        timed = [r["artifact"] for r in ended.steps[4].metrics["results"]]
        assert timed == ["m.onnx", "00-export_onnx.onnx"]  # only what was made
        report = job_report(s, ended)
        assert [(f.index, f.step, f.code) for f in report.failed_candidates] == [
            (1, "convert_openvino", "openvino_mismatch"),
            (2, "quantize_int8", "calibration_dataset_required"),
            (3, "compile_gpu", "source_failed"),
        ]
        assert report.failed_candidates[0].label == "OpenVINO f32, FP16 weights"
