"""The Celery task against a real Redis: crops recorded, CropBatch messages queued for the Siamese stage."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from imgsift_common.celery_app import QueueName, TaskName
from imgsift_common.messages import CropBatch, ImageBatch, JobState
from imgsift_common.settings import DEFAULT_TASK_MAX_RETRIES
from imgsift_common.state import Counter, Flag
from imgsift_common.storage import LocalStore
from imgsift_detector.model import WeightsError
from tests.detector.conftest import JOB_ID, add_photos, imported_worker, make_job

PHOTOS = ["000000000036", "000000000136"]  # three labelled persons between them


@pytest.fixture
def worker(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, postgres_url: str, tmp_path: Path, yolo_weights: Path
) -> Iterator[ModuleType]:
    """imgsift_detector.worker imported as a worker process would, configured by the environment."""
    monkeypatch.setenv("IMGSIFT_REDIS_URL", redis_url)
    monkeypatch.setenv("IMGSIFT_DATABASE_URL", postgres_url)
    monkeypatch.setenv("IMGSIFT_STORAGE", "local")
    monkeypatch.setenv("IMGSIFT_LOCAL_STORAGE_DIR", str(tmp_path / "objects"))
    monkeypatch.setenv("IMGSIFT_DETECTOR_WEIGHTS", str(yolo_weights))
    with imported_worker() as module:
        yield module


def _queued(redis_url: str, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(task name, payload) of each message waiting on ``queue``, oldest first."""
    client = redis.Redis.from_url(redis_url)
    messages = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu LPUSHes, workers BRPOP
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        messages.append((envelope["headers"]["task"], args[0]))
    return messages


def _run(worker: ModuleType, redis_url: str, coco128, target: str, job_state: JobState = JobState.RUNNING):  # type: ignore[no-untyped-def]
    state = worker.state()
    store = LocalStore(worker.settings.local_storage_dir)
    make_job(state, target, job_state)
    images = add_photos(state, store, [coco128.image(stem) for stem in PHOTOS])
    worker.detect(ImageBatch(job_id=JOB_ID, image_keys=[i.key for i in images]).model_dump(mode="json"))
    return state


def test_detect_records_crops_and_sends_them_to_siamese_in_chunks(  # type: ignore[no-untyped-def]
    worker: ModuleType, redis_url: str, coco128, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "CROPS_PER_MESSAGE", 2)

    state = _run(worker, redis_url, coco128, "person")

    crop_keys = state.crop_keys(JOB_ID)
    assert len(crop_keys) >= 3
    assert state.counters(JOB_ID)[Counter.DETECTED] == 2
    queued = _queued(redis_url, QueueName.SIAMESE)
    assert {task for task, _ in queued} == {TaskName.COMPARE}
    batches = [CropBatch.model_validate(payload) for _, payload in queued]
    assert all(b.job_id == JOB_ID and 1 <= len(b.crop_keys) <= 2 for b in batches)
    assert sorted(k for b in batches for k in b.crop_keys) == crop_keys
    assert state.get_job(JOB_ID).state is JobState.RUNNING  # crops wait for the Siamese stage


def test_a_job_without_target_objects_completes_at_detection(  # type: ignore[no-untyped-def]
    worker: ModuleType, redis_url: str, coco128
) -> None:
    state = worker.state()
    state.set_flag(JOB_ID, Flag.DISCOVERY_DONE)  # the crawler has handled every URL

    _run(worker, redis_url, coco128, "toothbrush")

    assert state.counters(JOB_ID)[Counter.DETECTED] == 2
    assert state.crop_keys(JOB_ID) == []
    assert state.notes(JOB_ID) == []  # both photos were read: no person-free verdict by accident
    assert _queued(redis_url, QueueName.SIAMESE) == []
    assert state.get_job(JOB_ID).state is JobState.COMPLETED


def test_a_cancelled_job_is_left_alone(worker: ModuleType, redis_url: str, coco128) -> None:  # type: ignore[no-untyped-def]
    state = _run(worker, redis_url, coco128, "person", JobState.CANCELLED)

    assert state.counters(JOB_ID).get(Counter.DETECTED, 0) == 0
    assert _queued(redis_url, QueueName.SIAMESE) == []
    assert state.get_job(JOB_ID).state is JobState.CANCELLED


def test_unavailable_weights_fail_the_job_with_the_fix(  # type: ignore[no-untyped-def]
    worker: ModuleType, redis_url: str, coco128, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.settings, "weights", "/nowhere/yolo.pt")

    with pytest.raises(WeightsError):
        _run(worker, redis_url, coco128, "person")

    job = worker.state().get_job(JOB_ID)
    assert job.state is JobState.FAILED
    assert "IMGSIFT_DETECTOR_WEIGHTS" in job.error


def test_the_task_is_routed_to_the_detect_queue_and_retries_only_transient_faults(worker: ModuleType) -> None:
    task = worker.app.tasks[TaskName.DETECT]
    assert worker.app.amqp.router.route({}, task.name)["queue"].name == QueueName.DETECT
    assert task.max_retries == DEFAULT_TASK_MAX_RETRIES  # IMGSIFT_TASK_MAX_RETRIES
    assert redis.ConnectionError in task.autoretry_for
    assert not any(issubclass(ValueError, fault) for fault in task.autoretry_for)  # a bad message is no outage
