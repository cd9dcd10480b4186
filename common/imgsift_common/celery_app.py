"""Celery app factory, task names and queue routing: the one place they are defined.

Services never import each other's code; they enqueue the next stage by task name
(``app.send_task(TaskName.DETECT, ...)``) and the routes below put it on that stage's queue.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import redis.exceptions
import urllib3.exceptions
from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]
from pydantic import BaseModel


class QueueName(StrEnum):
    CRAWL = "crawl"
    DETECT = "detect"
    SIAMESE = "siamese"
    TRAIN = "train"  # fine-tuning the Siamese head (the siamese worker)
    EXPORT = "export"  # dataset exports (the crawler worker: no model needed)
    EVENTS = "events"  # webhook deliveries (the crawler worker: its network rules apply)


class TaskName(StrEnum):
    DISCOVER = "crawler.discover"
    DOWNLOAD = "crawler.download"
    DETECT = "detector.detect"
    COMPARE = "siamese.compare"
    TRAIN = "siamese.train"
    EXPORT = "crawler.export"
    WEBHOOK = "crawler.webhook"


# The job marker naming the one discovery chain (of crawler.discover ticks) a job has.
DISCOVER_CHAIN_MARKER = "discover-chain"
# The job marker holding the model version the last training request asked for ("0": none pending).
TRAIN_REQUEST_MARKER = "training-requested"

TASK_ROUTES: dict[str, dict[str, str]] = {
    TaskName.DISCOVER: {"queue": QueueName.CRAWL},
    TaskName.DOWNLOAD: {"queue": QueueName.CRAWL},
    TaskName.DETECT: {"queue": QueueName.DETECT},
    TaskName.COMPARE: {"queue": QueueName.SIAMESE},
    TaskName.TRAIN: {"queue": QueueName.TRAIN},
    TaskName.EXPORT: {"queue": QueueName.EXPORT},
    TaskName.WEBHOOK: {"queue": QueueName.EVENTS},
}


# Faults a later attempt can outlive: Redis or the object store unreachable or slow, or a 5xx
# from the store. Tasks retry these with backoff and jitter, a bounded number of times;
# anything else is a bug or bad data, and retrying cannot help.
def _transient_errors() -> tuple[type[Exception], ...]:
    from minio.error import ServerError

    return (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        urllib3.exceptions.MaxRetryError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.TimeoutError,
        ServerError,
    )


TRANSIENT_ERRORS = _transient_errors()
RETRY_POLICY = {
    "autoretry_for": TRANSIENT_ERRORS,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 5,
}


def create_celery_app(name: str, broker_url: str) -> Celery:
    """A Celery app with imgsift's conventions: JSON only, late acks, prefetch 1."""
    app = Celery(name, broker=broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # job state lives in Redis structures we design, not results
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # a killed worker's task goes back on the queue
        worker_prefetch_multiplier=1,
        task_queues=[Queue(q.value) for q in QueueName],
        task_default_queue=QueueName.CRAWL.value,
        task_routes={str(k): v for k, v in TASK_ROUTES.items()},
        broker_connection_retry_on_startup=True,
        # With acks_late a task must finish within the visibility timeout or Redis
        # hands it to another worker; our batches are small, an hour is generous.
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
    )
    _route_failures_to_dead_letters(app, broker_url)
    return app


# ---------------------------------------------------------------------------- dead letters

DEAD_LETTERS_KEY = "imgsift:dead-letters"
DEAD_LETTERS_KEPT = 10_000


class DeadLetter(BaseModel):
    """A task that failed for good: a poison message, or a transient fault past its retries."""

    task: str
    task_id: str
    job_id: str | None
    error: str
    args: str  # the message as received, cut to 2,000 characters
    retries: int
    failed_at: str


def _route_failures_to_dead_letters(app: Celery, broker_url: str) -> None:
    """Record every task of ``app`` that fails for good, instead of retrying it forever.

    Late acknowledgement acks a failed task (``task_acks_on_failure_or_timeout``), so the
    broker never redelivers it; the record is what an operator sees (``GET /v1/dead-letters``).
    """
    from celery import signals

    def on_failure(sender: Any = None, task_id: str = "", exception: BaseException | None = None,
                   args: Any = None, **_: Any) -> None:  # fmt: skip
        if sender is None or getattr(sender, "app", None) is not app:
            return
        record_dead_letter(broker_url, getattr(sender, "name", "?"), task_id, args, exception,
                           getattr(getattr(sender, "request", None), "retries", 0) or 0)  # fmt: skip

    signals.task_failure.connect(on_failure, weak=False)


def record_dead_letter(
    redis_url: str, task: str, task_id: str, args: Any, exception: BaseException | None, retries: int
) -> DeadLetter:
    import datetime
    import json

    import redis

    payload = args[0] if isinstance(args, (list, tuple)) and args else args
    job_id = payload.get("job_id") if isinstance(payload, dict) else None
    letter = DeadLetter(
        task=task,
        task_id=task_id,
        job_id=str(job_id) if job_id is not None else None,
        error=f"{type(exception).__name__}: {exception}"[:2000] if exception else "unknown",
        args=json.dumps(args, default=str)[:2000],
        retries=retries,
        failed_at=datetime.datetime.now(datetime.UTC).isoformat(),
    )
    client = redis.Redis.from_url(redis_url)
    try:
        client.lpush(DEAD_LETTERS_KEY, letter.model_dump_json())
        client.ltrim(DEAD_LETTERS_KEY, 0, DEAD_LETTERS_KEPT - 1)
    finally:
        client.close()
    return letter


def dead_letters(client: Any, limit: int = 100) -> list[DeadLetter]:
    """The newest dead letters first, from a redis-py client."""
    return [DeadLetter.model_validate_json(raw) for raw in client.lrange(DEAD_LETTERS_KEY, 0, limit - 1)]


def send(app: Celery, task: TaskName, message: BaseModel, **options: Any) -> None:
    """Enqueue ``task`` with a pydantic message, serialised as JSON."""
    app.send_task(str(task), args=[message.model_dump(mode="json")], **options)
