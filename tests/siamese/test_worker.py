from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis.exceptions
import sqlalchemy.exc
from PIL import Image

from imgsift_common.messages import JobState
from imgsift_common.servicestate import ServiceStateStore
from imgsift_common.settings import DEFAULT_TASK_MAX_RETRIES
from imgsift_common.state import Flag
from imgsift_common.storage import LocalStore
from tests.siamese.stored import JOB_ID, create_job, put_crops, put_references


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, postgres_url: str) -> Iterator[ModuleType]:
    """The worker module configured for a local object store, the test Redis and PostgreSQL."""
    monkeypatch.setenv("IMGSIFT_DATABASE_URL", postgres_url)
    monkeypatch.setenv("IMGSIFT_STORAGE", "local")
    monkeypatch.setenv("IMGSIFT_LOCAL_STORAGE_DIR", str(tmp_path / "objects"))
    monkeypatch.setenv("IMGSIFT_REDIS_URL", redis_url)
    from imgsift_siamese import worker

    per_process = (worker.worker_settings, worker.object_store, worker.state_store)
    for cached in per_process:
        cached.cache_clear()
    yield worker
    state_store = per_process[2]  # the test may have replaced the module's attribute
    if state_store.cache_info().currsize:
        state_store().close()
    for cached in per_process:
        cached.cache_clear()


@pytest.fixture
def state(worker: ModuleType) -> ServiceStateStore:
    return worker.state_store()  # type: ignore[no-any-return]


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects")


def test_compare_task_records_distances_and_completes_the_job(
    worker: ModuleType, state: ServiceStateStore, store: LocalStore, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    create_job(state, put_references(store, crops_by_class["dog"][:2]))
    state.set_flag(JOB_ID, Flag.DISCOVERY_DONE)
    first, second = put_crops(store, state, crops_by_class["dog"][2:4], "dog")

    assert worker.compare({"job_id": JOB_ID, "crop_keys": [first]}) == 1
    assert state.get_job(JOB_ID).state is JobState.RUNNING  # type: ignore[union-attr]  # a crop is still open

    assert worker.compare({"job_id": JOB_ID, "crop_keys": [first, second]}) == 1
    assert [key for key, _ in sorted(state.distances(JOB_ID))] == sorted([first, second])
    assert state.get_job(JOB_ID).state is JobState.COMPLETED  # type: ignore[union-attr]


@pytest.mark.parametrize("job_state", [JobState.CANCELLED, None])
def test_compare_task_drops_batches_of_finished_or_unknown_jobs(
    job_state: JobState | None,
    worker: ModuleType,
    state: ServiceStateStore,
    store: LocalStore,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    if job_state is not None:
        create_job(state, put_references(store, crops_by_class["dog"][:1]), job_state=job_state)
    crop_keys = put_crops(store, state, crops_by_class["dog"][1:2], "dog")

    assert worker.compare({"job_id": JOB_ID, "crop_keys": crop_keys}) == 0
    assert state.distances(JOB_ID) == []


def test_a_job_whose_references_are_gone_fails_with_the_reason(
    worker: ModuleType, state: ServiceStateStore, store: LocalStore, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    (reference,) = put_references(store, crops_by_class["dog"][:1])
    create_job(state, [reference])
    store.delete(reference)
    crop_keys = put_crops(store, state, crops_by_class["dog"][1:2], "dog")

    assert worker.compare({"job_id": JOB_ID, "crop_keys": crop_keys}) == 0

    job = state.get_job(JOB_ID)
    assert job is not None and job.state is JobState.FAILED
    assert reference in (job.error or "")


def test_a_training_that_outlasts_its_lock_time_keeps_the_lock(
    worker: ModuleType,
    state: ServiceStateStore,
    store: LocalStore,
    crops_by_class: dict[str, list[Image.Image]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_job(state, put_references(store, crops_by_class["dog"][:2]))
    monkeypatch.setattr(worker, "TRAIN_LOCK_TTL", 0.3)
    seen: list[bool] = []

    def slow_training(*args: object) -> None:
        # Stands in for the fine-tuning (tests/siamese/test_training.py trains for real): only
        # its length matters here, four lock times, while a second training tries to start.
        for _ in range(4):
            time.sleep(0.3)
            seen.append(state.hold_lock(JOB_ID, "train", "train-99", 0.3))
        raise worker.TrainingError("stopped by the test")

    monkeypatch.setattr(worker, "train_job", slow_training)

    assert worker.train({"job_id": JOB_ID, "version": 1}) == 0

    assert seen == [False] * 4  # the first training kept its lock all along
    assert state.hold_lock(JOB_ID, "train", "train-99", 0.3)  # released when it ended


class UnreachableState:
    """A state store whose every read fails with ``error``; counts the attempts."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.attempts = 0

    def get_job(self, job_id: str) -> None:
        self.attempts += 1
        raise self.error


@pytest.mark.parametrize(
    ("error", "attempts"),
    [
        (redis.exceptions.ConnectionError("Redis went away"), 1 + DEFAULT_TASK_MAX_RETRIES),  # transient: retried
        # PostgreSQL restarting: retried too
        (sqlalchemy.exc.OperationalError("SELECT", {}, Exception("connection lost")), 1 + DEFAULT_TASK_MAX_RETRIES),
        (sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key")), 1),  # a bug: not retried
        (RuntimeError("a bug"), 1),  # anything else: retrying cannot help
    ],
)
def test_only_transient_errors_are_retried(
    error: Exception, attempts: int, worker: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable = UnreachableState(error)
    monkeypatch.setattr(worker, "state_store", lambda: unreachable)

    # Eager: each retry runs at once, in this process, so the attempts can be counted.
    result = worker.compare.apply(args=[{"job_id": JOB_ID, "crop_keys": ["jobs/x/crops/a.jpg"]}])

    assert result.failed()
    assert isinstance(result.result, type(error))
    assert unreachable.attempts == attempts
