"""The detector worker as docker-compose.yml starts it: one process, one model, two tasks at a time.

A Celery worker runs in this process with the pool and concurrency of the compose command, the
real YOLO model, PostgreSQL and Redis, and moto's S3 server. While one task's images are in the
model, the other task reads its images and writes its crops; the model's forward passes never
overlap; and two tasks starting together load one model between them.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from imgsift_common.celery_app import TaskName, send
from imgsift_common.messages import ImageBatch
from imgsift_common.state import Counter
from imgsift_detector import model
from tests.conftest import S3_TEST_CREDENTIALS
from tests.detector.conftest import JOB_ID, add_photos, imported_worker, make_job
from tests.support.coco import Coco128
from tests.support.stack import compose_file

IMAGES_PER_TASK = 4
# How long a forward pass waits, on entering, for another to enter too: never, while they take turns.
HOLD = 0.3


def _option(command: list[str], name: str, default: str) -> str:
    return command[command.index(name) + 1] if name in command else default


@pytest.fixture
def worker(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, postgres_url: str, s3_endpoint: str, yolo_weights: Path
) -> Iterator[ModuleType]:
    """imgsift_detector.worker imported as the compose service's process would, storing in moto's S3."""
    monkeypatch.setenv("IMGSIFT_REDIS_URL", redis_url)
    monkeypatch.setenv("IMGSIFT_DATABASE_URL", postgres_url)
    monkeypatch.setenv("IMGSIFT_STORAGE", "s3")
    monkeypatch.setenv("IMGSIFT_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("IMGSIFT_S3_BUCKET", f"pool-{os.urandom(4).hex()}")
    for name, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IMGSIFT_DETECTOR_WEIGHTS", str(yolo_weights))
    monkeypatch.setenv("IMGSIFT_DETECTOR_PIPELINE_STEP", "2")
    with imported_worker() as module:
        yield module


@dataclass
class Timeline:
    """When each task was in the model and in the object store: (kind, task, start, end)."""

    task_of_key: dict[str, int]  # an image's sha256[:24] (in its image key and its crop keys) -> task
    spans: list[tuple[str, int, float, float]] = field(default_factory=list)
    in_model: list[int] = field(default_factory=list)
    most_in_model: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)
    current: threading.local = field(default_factory=threading.local)

    def task_of(self, key: str) -> int:
        name = key.rsplit("/", 1)[-1]
        return next(task for prefix, task in self.task_of_key.items() if name.startswith(prefix))

    def model_call(self, predict: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(predict)
        def timed(*args: Any, **kwargs: Any) -> Any:
            task, start = self.current.task, time.monotonic()
            with self.changed:
                self.in_model.append(task)
                self.most_in_model = max(self.most_in_model, len(self.in_model))
                self.changed.notify_all()
                # Were the passes not taking turns, the other task's would enter now.
                self.changed.wait_for(lambda: len(self.in_model) > 1, timeout=HOLD)
            try:
                return predict(*args, **kwargs)
            finally:
                with self.changed:
                    self.in_model.remove(task)
                    self.spans.append(("model", task, start, time.monotonic()))

        return timed

    def store_call(self, kind: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def timed(key: str, *args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return call(key, *args, **kwargs)
            finally:
                with self.changed:
                    self.spans.append((kind, self.task_of(key), start, time.monotonic()))

        return timed

    def cross_overlaps(self) -> list[tuple[str, int]]:
        """(store call, its task) of each store call that ran while the other task was in the model."""
        models = [(task, start, end) for kind, task, start, end in self.spans if kind == "model"]
        return [
            (kind, task)
            for kind, task, start, end in self.spans
            if kind != "model" and any(t != task and s < end and start < e for t, s, e in models)
        ]


def test_two_tasks_overlap_their_store_calls_with_each_others_forward_passes(
    worker: ModuleType, coco128: Coco128, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = compose_file()["services"]["detector"]["command"]
    pool, concurrency = _option(command, "--pool", "prefork"), int(_option(command, "--concurrency", "0"))
    assert pool == "threads", f"the detector's tasks share one process and one model: {command}"

    state, store = worker.state(), worker.store()
    detector = worker.detector_from_settings(worker.settings)  # loaded (or cached) before the clock starts
    make_job(state, "any")
    images = add_photos(state, store, coco128.images[: 2 * IMAGES_PER_TASK])
    batches = [images[:IMAGES_PER_TASK], images[IMAGES_PER_TASK:]]
    timeline = Timeline({image.sha256[:24]: task for task, batch in enumerate(batches) for image in batch})

    detect_batch = worker.detect_batch

    def tagged(job, image_keys, *args):  # type: ignore[no-untyped-def]
        timeline.current.task = timeline.task_of(image_keys[0])  # the thread that calls the model
        return detect_batch(job, image_keys, *args)

    monkeypatch.setattr(worker, "detect_batch", tagged)
    monkeypatch.setattr(detector._model, "predict", timeline.model_call(detector._model.predict))
    monkeypatch.setattr(store, "get", timeline.store_call("get", store.get))
    monkeypatch.setattr(store, "put", timeline.store_call("put", store.put))

    for batch in batches:
        send(worker.app, TaskName.DETECT, ImageBatch(job_id=JOB_ID, image_keys=[i.key for i in batch]))
    with start_worker(
        worker.app, pool=pool, concurrency=concurrency, queues=["detect"], perform_ping_check=False, shutdown_timeout=60
    ):
        deadline = time.monotonic() + 180
        while state.counters(JOB_ID).get(Counter.DETECTED, 0) < len(images):
            assert time.monotonic() < deadline, state.counters(JOB_ID)
            time.sleep(0.1)

    assert state.counters(JOB_ID)[Counter.CROPS] > 0  # both tasks wrote crops: "any" on COCO photos
    assert {task for kind, task, *_ in timeline.spans if kind == "model"} == {0, 1}
    assert timeline.most_in_model == 1, "two forward passes ran at once"
    # While one task was in the model, the other read its images or wrote its crops (a pool that runs
    # one task at a time finishes a task's last crop write before the next task starts).
    overlaps = timeline.cross_overlaps()
    assert overlaps, timeline.spans


def test_tasks_starting_together_load_one_model(yolo_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []

    class Counted(model.Detector):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            loads.append(self)
            super().__init__(*args, **kwargs)

    # An empty cache of this process's detectors, so that the model is loaded here and not taken from a test before.
    monkeypatch.setattr(model, "_cached_detector", functools.cache(model._cached_detector.__wrapped__))
    monkeypatch.setattr(model, "Detector", Counted)
    start = threading.Barrier(2)
    got: list[model.Detector] = []

    def first_task() -> None:
        start.wait()
        got.append(model.get_detector(str(yolo_weights), "cpu"))

    threads = [threading.Thread(target=first_task) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert len(got) == 2 and got[0] is got[1]
    assert len(loads) == 1
