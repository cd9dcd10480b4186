"""Celery app factory, task names and queue routing: the one place they are defined.

Services never import each other's code; they enqueue the next stage by task name
(``app.send_task(TaskName.DETECT, ...)``) and the routes below put it on that stage's queue.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import redis.exceptions
import sqlalchemy.exc
import urllib3.exceptions
from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]
from pydantic import BaseModel

from imgsift_common import broker
from imgsift_common.settings import DEFAULT_TASK_MAX_RETRIES

if TYPE_CHECKING:
    from imgsift_common.servicestate import ServiceStateStore


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


# Faults a later attempt can outlive: PostgreSQL, Redis or the object store unreachable or slow,
# or a 5xx from the store. Tasks retry these with backoff and jitter, a bounded number of times;
# anything else is a bug or bad data, and retrying cannot help. The API answers them with 503.
def _store_errors() -> tuple[type[Exception], ...]:
    from minio.error import ServerError

    return (urllib3.exceptions.MaxRetryError, urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
            ServerError)  # fmt: skip


# PostgreSQL down, restarting or dropping a connection: SQLAlchemy wraps the driver's connection
# errors (and a server-side cancellation, deadlock or serialisation failure, which a new attempt
# also outlives) in OperationalError; InterfaceError is a connection used after it broke.
# IntegrityError and the other DBAPIErrors are bugs or bad data: never retried.
DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
STATE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    *DATABASE_ERRORS,
)
STORE_ERRORS = _store_errors()


def _transient_errors() -> tuple[type[Exception], ...]:
    from kombu.exceptions import OperationalError

    # OperationalError: the broker unreachable when a task sends the next stage's message.
    return (OperationalError, *STATE_ERRORS, *STORE_ERRORS)


TRANSIENT_ERRORS = _transient_errors()


def retry_policy(max_retries: int = DEFAULT_TASK_MAX_RETRIES) -> dict[str, Any]:
    """The options of a task that retries transient faults with backoff, ``max_retries`` times.

    By default (``IMGSIFT_TASK_MAX_RETRIES``, 8) the retries wait at most 2, 4, 8, 16, 32, 60,
    60 and 60 s, each drawn at random below that (full jitter, so tasks that failed together
    do not come back together): 242 s at most, 121 s on average. Eight, not five: with five the
    waits add up to less than 30 s for 45% of the tasks whose attempts fail at once, so a
    30-second outage would already lose work (docs/reliability.md, "Outages").
    """
    return {
        "autoretry_for": TRANSIENT_ERRORS,
        "retry_backoff": 2,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": max_retries,
    }


RETRY_POLICY = retry_policy()  # the default; workers use retry_policy(settings.task_max_retries)


def create_celery_app(name: str, broker_url: str, state: Callable[[], ServiceStateStore] | None = None) -> Celery:
    """A Celery app with imgsift's conventions: JSON only, late acks, prefetch 1.

    ``state`` (a worker's: its cached job-state store) is where the jobs of tasks that fail for
    good are settled, and what a starting worker waits for (:func:`_wait_for_database`).
    """
    app = Celery(name, broker=broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # job records live in PostgreSQL tables we design, not results
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # a killed worker's task goes back on the queue
        worker_prefetch_multiplier=1,
        task_queues=[Queue(q.value) for q in QueueName],
        task_default_queue=QueueName.CRAWL.value,
        task_routes={str(k): v for k, v in TASK_ROUTES.items()},
        broker_connection_retry_on_startup=True,
        # Sending a message (the next stage, a retry) waits up to about a minute for the broker to
        # come back (0, 1, 2, 3, 4, then 5 s between tries) instead of one second: a task that
        # meets a Redis restart carries on, rather than failing or having its retry refused.
        task_publish_retry_policy={"max_retries": 15, "interval_start": 0, "interval_step": 1, "interval_max": 5},
        # kombu's Redis transport, but a worker survives a Redis restart (imgsift_common/broker.py).
        **({"broker_transport": broker.TRANSPORT} if broker_url.startswith(("redis://", "rediss://")) else {}),
        # With acks_late a task must finish within the visibility timeout or Redis
        # hands it to another worker; our batches are small, an hour is generous.
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
    )
    _route_failures_to_dead_letters(app, broker_url, state)
    if state is not None:
        _wait_for_database(app, state)
    from imgsift_common.metrics import instrument_celery  # imports this module

    instrument_celery(app)  # Prometheus: tasks, durations, items per stage (IMGSIFT_METRICS_PORT)
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


def _wait_for_database(app: Celery, state: Callable[[], ServiceStateStore]) -> None:
    """A starting worker waits for PostgreSQL (as for its broker) and refuses a schema it does not know."""
    from celery import signals

    from imgsift_common.schema import SchemaMismatch
    from imgsift_common.servicestate import wait_for_database

    name = app.main

    def on_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        engine = state().engine
        try:
            wait_for_database(engine)
        except SchemaMismatch as exc:
            raise SystemExit(f"imgsift worker {name} refuses to start: {exc}") from exc
        finally:
            engine.dispose()  # no connection of the parent's is inherited by its forked children

    signals.worker_init.connect(on_init, weak=False)


def _route_failures_to_dead_letters(
    app: Celery, broker_url: str, state: Callable[[], ServiceStateStore] | None
) -> None:
    """Record every task of ``app`` that fails for good, instead of retrying it forever.

    Late acknowledgement acks a failed task (``task_acks_on_failure_or_timeout``), so the
    broker never redelivers it; the record is what an operator sees (``GET /v1/dead-letters``).
    """
    from celery import signals

    def on_failure(sender: Any = None, task_id: str = "", exception: BaseException | None = None,
                   args: Any = None, **_: Any) -> None:  # fmt: skip
        if sender is None or getattr(sender, "app", None) is not app:
            return
        letter = record_dead_letter(broker_url, getattr(sender, "name", "?"), task_id, args, exception,
                                    getattr(getattr(sender, "request", None), "retries", 0) or 0)  # fmt: skip
        if state is not None:
            _settle_job(app, state(), letter, args)

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


def _settle_job(app: Celery, state: ServiceStateStore, letter: DeadLetter, args: Any) -> None:
    """Record in the letter's job what its task could not do (imgsift_common.failed_tasks)."""
    if letter.job_id is None:
        return
    from imgsift_common import webhooks
    from imgsift_common.failed_tasks import settle_failed_task

    payload = args[0] if isinstance(args, (list, tuple)) and args else args
    settle_failed_task(
        state,
        letter,
        payload,
        lambda job_id: webhooks.notify(state, job_id, lambda m: send(app, TaskName.WEBHOOK, m)),
    )


def dead_letters(client: Any, limit: int = 100) -> list[DeadLetter]:
    """The newest dead letters first, from a redis-py client."""
    return [DeadLetter.model_validate_json(raw) for raw in client.lrange(DEAD_LETTERS_KEY, 0, limit - 1)]


def send(app: Celery, task: TaskName, message: BaseModel, **options: Any) -> None:
    """Enqueue ``task`` with a pydantic message, serialised as JSON."""
    app.send_task(str(task), args=[message.model_dump(mode="json")], **options)
