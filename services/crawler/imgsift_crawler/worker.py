"""Celery tasks of the crawler: thin wrappers that parse a message, call the stage, enqueue the next.

Start with ``celery -A imgsift_crawler.worker worker -Q crawl,export,events`` (``export``: dataset
exports, which need the store and the state but no model; ``events``: webhook deliveries).

A job's discovery is one chain of ``crawler.discover`` ticks: each tick takes discovery
steps for a few seconds, hands the leased URLs to ``crawler.download`` tasks, and enqueues
the next tick, until discovery is over and every URL has an outcome.

- The job records its current chain's token; a tick of any other chain stops (it was
  superseded), so a job never has two chains for long.
- A tick holds a lock while it runs, so two deliveries of one tick never step at once. A new
  chain's first tick that finds the lock held waits for it (the old tick may have died holding
  it); a tick of a chain that already ran stops.
- A crawler worker that starts, or connects again after losing the broker (a Redis restart),
  gives every unfinished job a new chain: if the worker that ran a job's tick died (a kill, an
  outage), or dropped the tick it held with its broker connection, the job goes on at once,
  without waiting for the broker to redeliver the lost tick.
- Once every URL has an outcome the chain stays on as the job's supervisor until the job is
  complete: when the detect and Siamese counters stop moving (``stall_seconds``), it sends
  the images not yet detected and the crops not yet compared again, which a worker killed
  between recording its results and handing them on would otherwise strand.
"""

from __future__ import annotations

import logging
import time
import uuid
from functools import cache
from typing import Any

from celery import Task, bootsteps, signals

from imgsift_common import webhooks
from imgsift_common.celery_app import DISCOVER_CHAIN_MARKER, TaskName, create_celery_app, retry_policy, send
from imgsift_common.logs import configure_logging
from imgsift_common.messages import (
    CropBatch,
    DiscoverMessage,
    DownloadBatch,
    ExportMessage,
    FailureReason,
    ImageBatch,
    Job,
    JobState,
    WebhookMessage,
    utcnow,
)
from imgsift_common.progress import finish_if_complete
from imgsift_common.servicestate import ServiceStateStore
from imgsift_common.storage import ObjectStore, store_from_settings
from imgsift_crawler import pipeline
from imgsift_crawler.fetch import Fetcher, FetchError
from imgsift_crawler.net.limits import RedisHostLimiter
from imgsift_crawler.settings import CrawlerSettings

log = logging.getLogger(__name__)

settings = CrawlerSettings()
configure_logging(settings.log_level)

TICK_SECONDS = 20.0  # how long one discover tick may keep stepping before it hands over
LOCK = "discover"
CHAIN = DISCOVER_CHAIN_MARKER
RUNNING_CHAIN = "discover-chain-running"  # the chain whose tick last held the lock
RESEND_IMAGES = 16  # images per detect message when unfinished work is handed on again
RESEND_CROPS = 64  # crops per compare message, likewise


@cache
def state() -> ServiceStateStore:
    return ServiceStateStore.from_settings(settings)


app = create_celery_app("imgsift-crawler", settings.redis_url, state)


@cache
def store() -> ObjectStore:
    return store_from_settings(settings)


@cache
def fetcher() -> Fetcher:
    # Per-host limits shared by every crawler process through Redis (docs/crawler.md).
    return Fetcher(settings, limiter=RedisHostLimiter.from_url(settings.redis_url, settings.per_host_concurrency))


def _active_job(job_id: str) -> Job | None:
    job = state().get_job(job_id)
    if job is None or job.state.is_final:
        log.info("job missing or finished; message dropped", extra={"job_id": job_id, "stage": "crawl"})
        return None
    return job


def _lock_ttl() -> float:
    # Longer than a tick runs, so only a dead tick's lock expires.
    return TICK_SECONDS + 40.0


def start_chain(job_id: str) -> None:
    """Make a new discovery chain the job's current one and send its first tick."""
    chain = uuid.uuid4().hex
    state().set_marker(job_id, CHAIN, chain)
    send(app, TaskName.DISCOVER, DiscoverMessage(job_id=job_id, chain=chain))


def _resume_unfinished_jobs() -> None:
    """Give every unfinished job a new discovery chain."""
    for job in state().list_jobs(limit=10_000):
        if not job.state.is_final and state().get_marker(job.id, CHAIN) is not None:
            log.info("resuming discovery", extra={"job_id": job.id, "stage": "crawl"})
            start_chain(job.id)


class _ResumeDiscoveryOnConnect(bootsteps.StartStopStep):  # type: ignore[misc]
    """Resume every unfinished job each time this worker connects to the broker: at start, and
    after the broker was lost and is back (Redis restarted).

    At start: the worker that ran a job's tick may have died. After a broker restart: a worker
    drops the countdown tick it held with the lost connection, and the broker hands it out
    again only after its visibility timeout (an hour). Either way the job goes on at once.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        _resume_unfinished_jobs()  # a connection error here makes the consumer reconnect and try again


app.steps["consumer"].add(_ResumeDiscoveryOnConnect)


def _freeze_before_fork(sender: Any = None, **_: Any) -> None:
    """In the worker's parent, once its tasks' modules are imported and before the pool forks."""
    if getattr(sender, "app", None) is app:
        pipeline.freeze_imported()


signals.worker_init.connect(_freeze_before_fork, weak=False)


@app.task(name=TaskName.DISCOVER, shared=False, bind=True, **retry_policy(settings.task_max_retries))
def discover(self: Task, payload: dict[str, Any]) -> None:
    """One tick of a job's discovery: page its sources, lease URLs to downloads, schedule the next tick."""
    message = DiscoverMessage.model_validate(payload)
    job = _active_job(message.job_id)
    if job is None:
        return
    current_chain = state().get_marker(job.id, CHAIN)
    if current_chain is None:  # the API's first tick: this chain becomes the job's
        state().set_marker(job.id, CHAIN, message.chain)
    elif current_chain != message.chain:
        return  # a newer chain runs this job
    # One execution at a time: a redelivered copy of this tick runs only if the first died.
    owner = str(self.request.id or message.chain)
    if not state().hold_lock(job.id, LOCK, owner, _lock_ttl()):
        if state().get_marker(job.id, RUNNING_CHAIN) != message.chain:
            # A new chain (the job resumed) waits for the tick holding the lock to end, or for
            # the lock to expire if that tick died holding it (Redis lost in mid-tick).
            discover.apply_async(args=[payload], countdown=settings.step_interval)
        return  # else a second copy of a chain that runs: the copy that holds the lock goes on
    state().set_marker(job.id, RUNNING_CHAIN, message.chain)
    try:
        if job.state is JobState.QUEUED:
            job = state().set_job_state(job.id, JobState.RUNNING)
            notify(job.id)
        if _tick(job):
            # Waiting on downloads, detections or comparisons, or the tick used its time.
            discover.apply_async(args=[payload], countdown=settings.step_interval)
    finally:
        state().release_lock(job.id, LOCK, owner)


def _tick(job: Job) -> bool:
    """Discovery steps for up to TICK_SECONDS; True if the job needs another tick."""
    deadline = time.monotonic() + TICK_SECONDS
    while True:
        step = pipeline.crawl_step(job, state(), fetcher(), settings)
        for batch in step.batches:
            send(app, TaskName.DOWNLOAD, DownloadBatch(job_id=job.id, candidates=batch))
        current = state().get_job(job.id)
        if current is None or current.state.is_final:
            return False
        if step.finished:
            # Every URL has an outcome; the chain stays on as the job's supervisor until the
            # later stages have finished, re-sending what a killed worker left behind.
            current = finish_if_complete(state(), job.id)
            notify(job.id)
            if current is None or current.state.is_final:
                return False
            _resend_stalled(current)
            return True
        if step.paged == 0 or time.monotonic() > deadline:
            return True


def _resend_stalled(job: Job) -> None:
    work = pipeline.stalled_work(job, state(), settings.stall_seconds)
    if work is None:
        return
    images, crops = work
    for start in range(0, len(images), RESEND_IMAGES):
        send(app, TaskName.DETECT, ImageBatch(job_id=job.id, image_keys=images[start : start + RESEND_IMAGES]))
    for start in range(0, len(crops), RESEND_CROPS):
        send(app, TaskName.COMPARE, CropBatch(job_id=job.id, crop_keys=crops[start : start + RESEND_CROPS]))


@app.task(name=TaskName.DOWNLOAD, shared=False, **retry_policy(settings.task_max_retries))
def download(payload: dict[str, Any]) -> None:
    """Download, validate and store a batch of candidates; send the stored images to the detector."""
    message = DownloadBatch.model_validate(payload)
    job = _active_job(message.job_id)
    if job is None:
        return
    # The task's id holds the fetch claims: a retry or a redelivery of this task keeps them.
    owner = download.request.id or None
    images = pipeline.download_batch(job, message.candidates, store(), state(), settings, fetcher(), owner)
    if images:
        send(app, TaskName.DETECT, ImageBatch(job_id=job.id, image_keys=[i.key for i in images]))
    finish_if_complete(state(), job.id)
    notify(job.id)


@app.task(name=TaskName.EXPORT, shared=False, **retry_policy(settings.task_max_retries))
def export(payload: dict[str, Any]) -> None:
    """Build a dataset export of a job into the object store (crawler workers hold no model)."""
    import tempfile
    from pathlib import Path

    from imgsift_common.exports import run_export

    message = ExportMessage.model_validate(payload)
    with tempfile.TemporaryDirectory(prefix="imgsift-export-") as workdir:
        status = run_export(message, state(), store(), Path(workdir))
    log.info(
        "export",
        extra={"job_id": message.job_id, "export_id": message.export_id, "state": status.state if status else None},
    )


def notify(job_id: str) -> None:
    """Hand the job's newly true events to webhook deliveries (each event once per webhook)."""
    webhooks.notify(state(), job_id, lambda message: send(app, TaskName.WEBHOOK, message))


# Retried by itself while the receiver fails, and on transient faults (Redis unreachable) too.
@app.task(name=TaskName.WEBHOOK, shared=False, bind=True, **retry_policy(webhooks.MAX_ATTEMPTS - 1))
def webhook(self: Task, payload: dict[str, Any]) -> None:
    """POST one signed event to one webhook; retried with backoff while the receiver fails."""
    message = WebhookMessage.model_validate(payload)
    job = state().get_job(message.job_id)
    secret = state().get_marker(message.job_id, webhooks.SECRET_MARKER)
    if job is None or secret is None:
        return
    body = webhooks.payload(job, state(), message)
    headers = {
        "Content-Type": "application/json",
        "X-Imgsift-Event": message.event.value,
        "X-Imgsift-Delivery": message.delivery_id,
        webhooks.SIGNATURE_HEADER: webhooks.sign(secret, body, int(time.time())),
    }
    status: int | None = None
    error = None
    try:
        status = fetcher().post(message.url, body, headers)
    except FetchError as exc:
        error = f"{exc.reason.value}: {exc.detail}"
        if exc.reason in (FailureReason.BLOCKED_ADDRESS, FailureReason.INVALID_URL):
            webhooks.record_attempt(
                state(), job.id, message.delivery_id, webhooks.Attempt(at=utcnow(), error=error), "failed"
            )
            return  # no retry makes a refused address acceptable
    ok = status is not None and 200 <= status < 300
    last = self.request.retries >= webhooks.MAX_ATTEMPTS - 1
    outcome = "delivered" if ok else ("failed" if last or not webhooks.retryable(status) else "pending")
    attempt = webhooks.Attempt(at=utcnow(), status=status, error=error)
    webhooks.record_attempt(state(), job.id, message.delivery_id, attempt, outcome)
    if outcome == "pending":
        raise self.retry(countdown=min(settings.webhook_backoff * 2**self.request.retries, 600.0))
