"""Webhooks: which events a job is due, each claimed once, signed deliveries and their records.

- Events: ``job.started``, ``stage.crawl.done``, ``stage.detect.done``, ``stage.siamese.done``,
  ``job.completed``, ``job.failed``, ``job.cancelled``. Any worker (or the API) calls
  :func:`notify` after it changed a job; the events that became true are claimed once per
  job and webhook (so however many workers notice, each is delivered once) and handed to
  ``crawler.webhook`` tasks.
- Signing: each job with webhooks has a secret, made by the API at creation and shown once.
  A delivery carries ``X-Imgsift-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
  "<t>.<body>">``: a receiver recomputes it (``imgsift_client.verify_webhook``) and rejects
  a wrong signature (forgery) or an old ``t`` (replay).
- Delivery: POST JSON, no redirects followed, under the crawler's network-safety rules;
  retried with exponential backoff on connection errors, timeouts, 429 and 5xx, up to
  ``MAX_ATTEMPTS``; every attempt's outcome is recorded and listed by the API.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel, Field

from imgsift_common.messages import Job, JobState, WebhookEvent, WebhookMessage, utcnow
from imgsift_common.progress import compute_progress
from imgsift_common.sqlstate import StateStore

SECRET_MARKER = "webhook-secret"
DELIVERY_PREFIX = "webhook-delivery:"
MAX_ATTEMPTS = 6
CLAIM_TTL = 30 * 24 * 3600.0
SIGNATURE_HEADER = "X-Imgsift-Signature"

_FINAL_EVENTS = {
    JobState.COMPLETED: WebhookEvent.COMPLETED,
    JobState.FAILED: WebhookEvent.FAILED,
    JobState.CANCELLED: WebhookEvent.CANCELLED,
}


class Attempt(BaseModel):
    at: datetime
    status: int | None = None  # the receiver's HTTP status; None: no answer
    error: str | None = None


class Delivery(BaseModel):
    id: str
    event: WebhookEvent
    url: str
    state: str = "pending"  # pending, delivered, failed (gave up)
    attempts: list[Attempt] = Field(default_factory=list)
    created_at: datetime


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def due_events(job: Job, state: StateStore) -> list[WebhookEvent]:
    """The events that are true of the job now."""
    events = []
    if job.state is not JobState.QUEUED:
        events.append(WebhookEvent.STARTED)
    progress = compute_progress(state.counters(job.id), state.flags(job.id))
    for stage, event in (
        ("crawl", WebhookEvent.CRAWL_DONE),
        ("detect", WebhookEvent.DETECT_DONE),
        ("siamese", WebhookEvent.SIAMESE_DONE),
    ):
        if any(s.value == stage and p.state.value == "done" for s, p in progress.stages.items()):
            events.append(event)
    if job.state in _FINAL_EVENTS:
        events.append(_FINAL_EVENTS[job.state])
    return events


def notify(state: StateStore, job_id: str, send: Callable[[WebhookMessage], None]) -> list[WebhookMessage]:
    """Claim the job's newly true events for each webhook and send one delivery task each. Idempotent."""
    job = state.get_job(job_id)
    if job is None or not job.spec.webhooks:
        return []
    sent = []
    for event in due_events(job, state):
        for hook in job.spec.webhooks:
            if hook.events is not None and event not in hook.events:
                continue
            delivery_id = hashlib.sha256(f"{job.id}|{event.value}|{hook.url}".encode()).hexdigest()[:32]
            token = secrets.token_hex(16)
            if state.claim_idempotency_key(f"webhook:{delivery_id}", token, CLAIM_TTL) != token:
                continue  # another worker (or an earlier call) claimed this delivery
            record = Delivery(id=delivery_id, event=event, url=hook.url, created_at=utcnow())
            state.set_marker(job.id, DELIVERY_PREFIX + delivery_id, record.model_dump_json())
            message = WebhookMessage(job_id=job.id, delivery_id=delivery_id, event=event, url=hook.url)
            send(message)
            sent.append(message)
    return sent


def deliveries(state: StateStore, job_id: str) -> list[Delivery]:
    found = [Delivery.model_validate_json(v) for v in state.markers(job_id, DELIVERY_PREFIX).values()]
    return sorted(found, key=lambda d: (d.created_at, d.id))


def payload(job: Job, state: StateStore, message: WebhookMessage) -> bytes:
    counters = state.counters(job.id)
    body = {
        "id": message.delivery_id,
        "event": message.event.value,
        "job_id": job.id,
        "created_at": utcnow().isoformat(),
        "job": {"state": job.state.value, "threshold": job.spec.threshold, "error": job.error, "counts": counters},
    }
    return json.dumps(body, sort_keys=True).encode()


def record_attempt(state: StateStore, job_id: str, delivery_id: str, attempt: Attempt, final_state: str) -> Delivery:
    raw = state.get_marker(job_id, DELIVERY_PREFIX + delivery_id)
    if raw is None:
        raise KeyError(delivery_id)
    delivery = Delivery.model_validate_json(raw)
    updated = delivery.model_copy(update={"attempts": [*delivery.attempts, attempt], "state": final_state})
    state.set_marker(job_id, DELIVERY_PREFIX + delivery_id, updated.model_dump_json())
    return updated


def retryable(status: int | None) -> bool:
    return status is None or status == 429 or status >= 500
