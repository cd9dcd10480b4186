"""Prometheus metrics: real Celery tasks move the worker counters (eagerly, and in a real
prefork worker serving every child's values on its metrics port), and the API's /metrics
reports the real length of each Redis queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery, Task
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from imgsift_common import metrics
from imgsift_common.celery_app import TaskName, create_celery_app
from tests.conftest import ROOT, free_port


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(name: str, **labels: str) -> float:
    return metrics.worker_registry().get_sample_value(name, labels) or 0.0


@pytest.fixture
def app(redis_url: str) -> Celery:
    return create_celery_app("imgsift-metrics-unit", redis_url)


def test_eager_tasks_count_time_and_size_their_work(app: Celery) -> None:
    @app.task(name=TaskName.DETECT, shared=False)
    def detect(payload: dict[str, Any]) -> int:
        return len(payload["image_keys"])

    @app.task(name=TaskName.COMPARE, shared=False)
    def compare(payload: dict[str, Any]) -> None:
        raise ValueError("bad data")  # no retry: fails for good

    @app.task(name=TaskName.EXPORT, shared=False, bind=True, max_retries=1)
    def export(self: Task, payload: dict[str, Any]) -> None:
        if self.request.retries == 0:
            raise self.retry(countdown=0)

    done = {"task": TaskName.DETECT.value, "queue": "detect"}
    before = {
        "succeeded": value("imgsift_tasks_total", **done, outcome="succeeded"),
        "images": value("imgsift_stage_items_total", stage="detect", item="image"),
        "timed": value("imgsift_task_duration_seconds_count", **done),
        "failed": value("imgsift_tasks_total", task=TaskName.COMPARE.value, queue="siamese", outcome="failed"),
        "crops": value("imgsift_stage_items_total", stage="siamese", item="crop"),
        "retried": value("imgsift_tasks_total", task=TaskName.EXPORT.value, queue="export", outcome="retried"),
    }
    assert detect.apply(args=[{"job_id": "j1", "image_keys": ["a", "b", "c"]}]).get() == 3
    assert detect.apply(args=[{"job_id": "j1", "image_keys": ["d"]}]).get() == 1
    assert compare.apply(args=[{"job_id": "j1", "crop_keys": ["x", "y"]}]).failed()
    export.apply(args=[{"job_id": "j1"}])

    assert value("imgsift_tasks_total", **done, outcome="succeeded") == before["succeeded"] + 2
    assert value("imgsift_stage_items_total", stage="detect", item="image") == before["images"] + 4
    assert value("imgsift_task_duration_seconds_count", **done) == before["timed"] + 2
    assert value("imgsift_tasks_in_progress", **done) == 0
    # A failed batch counts as failed, and its crops were not scored.
    assert value("imgsift_tasks_total", task=TaskName.COMPARE.value, queue="siamese", outcome="failed") == (
        before["failed"] + 1
    )
    assert value("imgsift_stage_items_total", stage="siamese", item="crop") == before["crops"]
    assert value("imgsift_tasks_total", task=TaskName.EXPORT.value, queue="export", outcome="retried") == (
        before["retried"] + 1
    )


def test_tasks_of_other_celery_apps_are_not_counted(app: Celery) -> None:
    other = Celery("not-imgsift", broker="memory://")

    @other.task(name=TaskName.DETECT, shared=False)
    def detect(payload: dict[str, Any]) -> None:
        return None

    labels = {"task": TaskName.DETECT.value, "queue": "detect", "outcome": "succeeded"}
    before = value("imgsift_tasks_total", **labels)
    detect.apply(args=[{"image_keys": ["a"]}])
    assert value("imgsift_tasks_total", **labels) == before


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """A real prefork worker (2 children) of tests/common/metrics_worker.py; its metrics port, its log."""
    port = free_port()
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    (multiproc / "counter_1.db").write_bytes(b"left by an earlier run")  # must be wiped at start
    env = {
        **os.environ,
        "IMGSIFT_REDIS_URL": redis_url,
        "IMGSIFT_METRICS_PORT": str(port),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
    }
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "tests.common.metrics_worker", "worker", "-Q", "crawl"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--concurrency", "2", "--without-gossip", "--without-mingle", "--hostname", f"m{port}@%h"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, port, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_a_prefork_worker_serves_what_its_children_counted(
    worker: tuple[subprocess.Popen[bytes], int, Path], redis_url: str, tmp_path: Path
) -> None:
    proc, port, log = worker
    producer = create_celery_app("imgsift-metrics-producer", redis_url)
    for _ in range(8):
        producer.send_task(TaskName.DOWNLOAD.value, args=[{"job_id": "j", "candidates": [{}, {}]}])
    labels = frozenset({"task": TaskName.DOWNLOAD.value, "queue": "crawl", "outcome": "succeeded"}.items())
    deadline = time.monotonic() + 60
    seen: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            seen = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
        except httpx.HTTPError:
            seen = {}
        if seen.get(("imgsift_tasks_total", labels)) == 8:
            break
        time.sleep(0.2)
    assert seen.get(("imgsift_tasks_total", labels)) == 8, log.read_text()[-3000:]
    assert seen[("imgsift_stage_items_total", frozenset({"stage": "crawl", "item": "url"}.items()))] == 16
    timed = frozenset({"task": TaskName.DOWNLOAD.value, "queue": "crawl"}.items())
    assert seen[("imgsift_task_duration_seconds_count", timed)] == 8
    assert seen[("imgsift_tasks_in_progress", timed)] == 0
    # The values live in per-child files; the stale file of an earlier run is gone.
    files = {p.name for p in (tmp_path / "prom").iterdir()}
    assert "counter_1.db" not in files
    assert any(name.startswith("counter_") for name in files), files
    assert redis.Redis.from_url(redis_url).llen("crawl") == 0


def test_the_api_reports_each_queue_depth_without_a_key(
    redis_url: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, setting in {
        "IMGSIFT_REDIS_URL": redis_url,
        "IMGSIFT_DATABASE_URL": postgres_url,
        "IMGSIFT_STORAGE": "local",
        "IMGSIFT_LOCAL_STORAGE_DIR": str(tmp_path / "objects"),
    }.items():
        monkeypatch.setenv(name, setting)
    client = redis.Redis.from_url(redis_url)
    client.rpush("detect", *[f"message-{i}" for i in range(7)])
    client.rpush("siamese", "one")
    client.lpush("imgsift:dead-letters", "{}", "{}")
    from imgsift_api.main import app

    with TestClient(app) as api:
        response = api.get("/metrics")
        assert "/metrics" not in api.get("/openapi.json").json()["paths"]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    seen = samples(response.text)
    depth = {
        queue: seen[("imgsift_queue_depth", frozenset({"queue": queue}.items()))]
        for queue in ("detect", "siamese", "crawl")
    }
    assert (
        depth == {"detect": client.llen("detect"), "siamese": 1, "crawl": 0} == {"detect": 7, "siamese": 1, "crawl": 0}
    )
    assert seen[("imgsift_dead_letters", frozenset())] == 2
    assert seen[("imgsift_broker_up", frozenset())] == 1
    assert seen[("process_resident_memory_bytes", frozenset())] > 0
