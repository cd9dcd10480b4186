"""Prometheus metrics: what each worker did, and how full the queues are.

Workers (hooked in by :func:`instrument_celery`, which ``create_celery_app`` calls):

- ``imgsift_tasks_total{task, queue, outcome}``: finished tasks, ``outcome`` one of
  ``succeeded``, ``failed`` (for good: a dead letter), ``retried``, or Celery's other end states;
- ``imgsift_task_duration_seconds{task, queue}``: a histogram of task run times, every outcome
  (its ``_sum`` is the stage's busy time);
- ``imgsift_tasks_in_progress{task, queue}``: tasks running now;
- ``imgsift_stage_items_total{stage, item}``: what the finished tasks' messages carried, the
  images per stage: URLs fetched by ``crawl`` downloads, images run through ``detect``, crops
  scored by ``siamese``.

Celery's prefork children each count in their own process, so a worker whose
``IMGSIFT_METRICS_PORT`` is set runs prometheus_client's multiprocess mode: at ``worker_init``
its main process points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (a temporary one
unless the operator set the variable: then that one, emptied) before the pool forks; each
child writes its values there, ``mark_process_dead`` drops a child's live gauges when it
exits, and the main process serves the sum at ``http://0.0.0.0:PORT/metrics`` from
``worker_ready`` on. A port in use is logged and the worker runs on without metrics.

The API (:func:`api_metrics`, its ``/metrics`` route) reports ``imgsift_queue_depth{queue}``
(Redis ``LLEN`` of each Celery queue, read at scrape time), ``imgsift_dead_letters``,
``imgsift_broker_up`` and its own process metrics.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery, signals
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imgsift_common.celery_app import DEAD_LETTERS_KEY, TASK_ROUTES, QueueName, TaskName

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Task run times: a webhook POST or a near-empty batch (10 ms) to a long training (10 min).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The list in each stage's message whose length is the work the task did: (stage, item, field).
STAGE_ITEMS: dict[str, tuple[str, str, str]] = {
    TaskName.DOWNLOAD: ("crawl", "url", "candidates"),
    TaskName.DETECT: ("detect", "image", "image_keys"),
    TaskName.COMPARE: ("siamese", "crop", "crop_keys"),
}
OUTCOMES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}
# kombu's Redis transport keeps a queue's prioritised messages in lists beside the queue's own.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


# ---------------------------------------------------------------------------- workers


class TaskMetrics:
    """The worker metrics, created in the process that runs tasks (in a prefork child, after the fork)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("task", "queue")
        self.tasks = Counter("imgsift_tasks", "Celery tasks finished", (*labels, "outcome"), registry=registry)
        self.duration = Histogram(
            "imgsift_task_duration_seconds",
            "Celery task run time, every outcome",
            labels,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "imgsift_tasks_in_progress",
            "Celery tasks running now",
            labels,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.items = Counter(
            "imgsift_stage_items",
            "items in the messages of finished tasks: URLs fetched (crawl), images detected, crops scored (siamese)",
            ("stage", "item"),
            registry=registry,
        )


_lock = threading.Lock()
_registry = CollectorRegistry()  # this process's own metrics, when no multiprocess directory is in use
_metrics: TaskMetrics | None = None
_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_started: dict[str, float] = {}  # task id -> perf_counter at prerun
_serve_port: int | None = None
_created_dir: str | None = None
_server: Any = None


def task_metrics() -> TaskMetrics:
    """This process's task metrics, created on first use (so after a prefork child's fork)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = TaskMetrics(_registry)
        return _metrics


def worker_registry() -> CollectorRegistry:
    """What a worker serves: every process's values in multiprocess mode, else this process's."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return _registry
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def instrument_celery(app: Celery) -> None:
    """Count, time and size the tasks of ``app``; serve them from a worker's main process (see above)."""
    _apps.add(app)
    uid = "imgsift-metrics"
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid=f"{uid}-prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid=f"{uid}-postrun")
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid=f"{uid}-init")
    signals.worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid=f"{uid}-ready")
    signals.worker_process_shutdown.connect(_on_child_exit, weak=False, dispatch_uid=f"{uid}-child-exit")
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False, dispatch_uid=f"{uid}-shutdown")


def _ours(sender: Any) -> bool:
    return getattr(sender, "app", None) in _apps


def _labels(sender: Any) -> tuple[str, str]:
    name = str(getattr(sender, "name", "?"))
    return name, TASK_ROUTES.get(name, {}).get("queue", "")


def _on_prerun(sender: Any = None, task_id: str = "", **_: Any) -> None:
    if not _ours(sender):
        return
    _started[task_id] = time.perf_counter()
    task_metrics().in_progress.labels(*_labels(sender)).inc()


def _on_postrun(sender: Any = None, task_id: str = "", args: Any = None, state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id, None)
    if not _ours(sender) or started is None:
        return
    metrics = task_metrics()
    task, queue = _labels(sender)
    metrics.in_progress.labels(task, queue).dec()
    metrics.duration.labels(task, queue).observe(time.perf_counter() - started)
    metrics.tasks.labels(task, queue, OUTCOMES.get(state or "", (state or "unknown").lower())).inc()
    if state == "SUCCESS" and task in STAGE_ITEMS:
        stage, item, field = STAGE_ITEMS[task]
        payload = args[0] if isinstance(args, (list, tuple)) and args else None
        items = payload.get(field) if isinstance(payload, dict) else None
        if isinstance(items, list):
            metrics.items.labels(stage, item).inc(len(items))


def _on_worker_init(**_: Any) -> None:
    """In the worker's main process, before the pool forks: the multiprocess directory."""
    global _serve_port, _created_dir
    from imgsift_common.settings import MetricsSettings

    _serve_port = MetricsSettings().metrics_port or None
    if _serve_port is None:
        return
    path = os.environ.get(MULTIPROC_ENV)
    if path:  # the operator's directory (a Kubernetes emptyDir...): values of an earlier run go
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        _created_dir = tempfile.mkdtemp(prefix="imgsift-metrics-")
        os.environ[MULTIPROC_ENV] = _created_dir
    # prometheus_client picks its value class when it is first imported (from the variable),
    # which was before this: pick again, so metrics created from now on, in every child, use files.
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()


def _on_worker_ready(**_: Any) -> None:
    """In the worker's main process: serve every child's metrics on the configured port."""
    global _server
    if _serve_port is None or _server is not None:
        return
    try:
        _server = start_http_server(_serve_port, registry=worker_registry())[0]
    except OSError as exc:
        log.error("metrics not served: port %s: %s (set IMGSIFT_METRICS_PORT to a free port, or 0)", _serve_port, exc)
        return
    log.info("metrics served on port %s at /metrics", _serve_port)


def _on_child_exit(pid: int | None = None, **_: Any) -> None:
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _on_worker_shutdown(**_: Any) -> None:
    global _server, _created_dir
    if _server is not None:
        _server.shutdown()
        _server = None
    if _created_dir is not None:
        shutil.rmtree(_created_dir, ignore_errors=True)
        _created_dir = None


# ---------------------------------------------------------------------------- API


class QueueCollector(Collector):
    """Queue depths and dead letters, read from Redis when scraped (one round trip)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        import redis.exceptions

        up = GaugeMetricFamily("imgsift_broker_up", "whether Redis (queues and job state) answered this scrape")
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in QueueName:
                for suffix in _PRIORITY_SUFFIXES:
                    pipe.llen(queue.value + suffix)
            pipe.llen(DEAD_LETTERS_KEY)
            lengths = [int(n) for n in pipe.execute()]
        except redis.exceptions.RedisError as exc:
            log.warning("metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("imgsift_queue_depth", "messages waiting in a Celery queue", labels=["queue"])
        per_queue = len(_PRIORITY_SUFFIXES)
        for i, queue in enumerate(QueueName):
            depth.add_metric([queue.value], sum(lengths[i * per_queue : (i + 1) * per_queue]))
        yield depth
        yield GaugeMetricFamily("imgsift_dead_letters", "tasks that failed for good, kept", value=lengths[-1])


def api_metrics(client: Any) -> tuple[bytes, str]:
    """The API's ``/metrics`` body and content type: the queues (via ``client``, a redis-py client) and this process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(client))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
