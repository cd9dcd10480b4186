"""Webhook events are claimed once however many workers notice; signatures verify and expire."""

from __future__ import annotations

import pytest

from imgsift_client import InvalidSignature, verify_webhook
from imgsift_common import webhooks
from imgsift_common.messages import Job, JobSpec, JobState, SourceKind, SourceSpec, WebhookEvent
from imgsift_common.state import Flag

JOB = "job-hooks"


def _job(state, **hook):  # type: ignore[no-untyped-def]
    spec = JobSpec(
        sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])],
        target="dog",
        webhooks=[{"url": "http://127.0.0.1:9/all"}, {"url": "http://127.0.0.1:9/final", **hook}],
    )
    state.create_job(Job(id=JOB, spec=spec))


def test_events_are_claimed_once_per_webhook(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store, events=["job.completed", "job.failed"])
    sent: list = []  # type: ignore[type-arg]
    assert webhooks.notify(state_store, JOB, sent.append) == []  # queued: nothing happened yet
    state_store.set_job_state(JOB, JobState.RUNNING)
    webhooks.notify(state_store, JOB, sent.append)
    webhooks.notify(state_store, JOB, sent.append)  # a second worker noticing the same thing
    assert [(m.event, m.url.rsplit("/", 1)[-1]) for m in sent] == [(WebhookEvent.STARTED, "all")]
    state_store.set_flag(JOB, Flag.DISCOVERY_DONE)  # nothing discovered, all stages done
    state_store.set_job_state(JOB, JobState.COMPLETED)
    webhooks.notify(state_store, JOB, sent.append)
    events = sorted((m.event.value, m.url.rsplit("/", 1)[-1]) for m in sent)
    assert events == sorted([
        ("job.started", "all"), ("stage.crawl.done", "all"), ("stage.detect.done", "all"),
        ("stage.siamese.done", "all"), ("job.completed", "all"), ("job.completed", "final"),
    ])  # fmt: skip
    listed = webhooks.deliveries(state_store, JOB)
    assert len(listed) == 6 and all(d.state == "pending" and d.attempts == [] for d in listed)
    first = listed[0]
    done = webhooks.record_attempt(
        state_store, JOB, first.id, webhooks.Attempt(at=first.created_at, status=200), "delivered"
    )
    assert done.state == "delivered" and done.attempts[0].status == 200


def test_signatures_verify_and_reject_forgeries_and_replays() -> None:
    body = b'{"event": "job.completed"}'
    header = webhooks.sign("s3cret", body, 1_000_000)
    verify_webhook("s3cret", body, header, now=1_000_100)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify_webhook("s3cret", body + b" ", header, now=1_000_100)
    with pytest.raises(InvalidSignature, match="does not match"):
        verify_webhook("other", body, header, now=1_000_100)
    with pytest.raises(InvalidSignature, match="old"):
        verify_webhook("s3cret", body, header, now=1_000_000 + 3600)
    with pytest.raises(InvalidSignature, match="malformed"):
        verify_webhook("s3cret", body, "v1=abc")
    assert webhooks.retryable(None) and webhooks.retryable(503) and webhooks.retryable(429)
    assert not webhooks.retryable(404) and not webhooks.retryable(200)
