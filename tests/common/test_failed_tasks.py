"""A task that failed for good leaves its loss in the job, with the reason, and the job can end."""

from __future__ import annotations

import json
from typing import Any

from imgsift_common.celery_app import DISCOVER_CHAIN_MARKER, DeadLetter, TaskName
from imgsift_common.failed_tasks import settle_failed_task
from imgsift_common.messages import (
    Candidate,
    Crop,
    DownloadOutcome,
    FailureReason,
    Job,
    JobSpec,
    JobState,
    SourceKind,
    SourceSpec,
    utcnow,
)
from imgsift_common.sqlstate import StateStore
from imgsift_common.state import Flag
from tests.support.records import crops, record_stored

JOB = "job-failed-tasks"
CHAIN = "c" * 32
ERROR = "MaxRetryError: HTTPConnectionPool(host='s3', port=9000): Max retries exceeded"


def _running_job(state: StateStore) -> Job:
    job = Job(id=JOB, spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://a/1"])], target="dog"))
    assert state.create_job(job)
    state.set_marker(JOB, DISCOVER_CHAIN_MARKER, CHAIN)
    return state.set_job_state(JOB, JobState.RUNNING)


def _letter(task: str, payload: Any, job_id: str | None = JOB) -> DeadLetter:
    return DeadLetter(
        task=task, task_id="t1", job_id=job_id, error=ERROR, args=json.dumps([payload]), retries=8,
        failed_at=utcnow().isoformat(),
    )  # fmt: skip


def _store(state: StateStore, sha: str, url: str) -> str:
    return record_stored(state, JOB, sha, url=url)


def _crops(sha: str, n: int) -> list[Crop]:
    return crops(JOB, sha, n)


def _settle(state: StateStore, task: str, payload: Any) -> Job | None:
    return settle_failed_task(state, _letter(task, payload), payload)


def test_lost_downloads_detections_and_comparisons_are_recorded_and_the_job_completes(state_store) -> None:  # type: ignore[no-untyped-def]
    _running_job(state_store)
    urls = [f"http://a/{i}" for i in range(3)]
    state_store.enqueue_candidates(JOB, [Candidate(image_url=u, source=SourceKind.URLS) for u in urls])
    state_store.set_flag(JOB, Flag.DISCOVERY_DONE)
    a, b = "a" * 64, "b" * 64
    key_a = _store(state_store, a, "http://a/0")
    key_b = _store(state_store, b, "http://a/1")
    state_store.record_detections(JOB, [(key_a, crops := _crops(a, 2))])
    state_store.record_distances(JOB, [(crops[0].key, 0.5)])

    # The download of a/1 (stored) and a/2 (not yet) failed for good: a/2 is failed, a/1 stays stored.
    candidates = [{"image_url": f"http://a/{i}", "source": "urls"} for i in (1, 2)]
    job = _settle(state_store, TaskName.DOWNLOAD, {"job_id": JOB, "candidates": candidates})
    assert job is not None and job.state is JobState.RUNNING
    record = state_store.url_records(JOB, ["http://a/2"]).get("http://a/2")
    assert record is not None and record.outcome is DownloadOutcome.FAILED
    assert record.reason is FailureReason.TASK_FAILED and ERROR in (record.detail or "")
    assert state_store.url_records(JOB, ["http://a/1"])["http://a/1"].outcome is DownloadOutcome.STORED

    # The detection of b, and of a (detected already): b is recorded with no crops, a is unchanged.
    _settle(state_store, TaskName.DETECT, {"job_id": JOB, "image_keys": [key_a, key_b]})
    assert state_store.detected_counts(JOB, [key_a, key_b]) == {key_a: 2, key_b: 0}

    # The comparison of both crops of a: the one scored keeps its distance, the other is counted lost.
    job = _settle(state_store, TaskName.COMPARE, {"job_id": JOB, "crop_keys": [c.key for c in crops]})
    assert state_store.distances(JOB) == [(crops[0].key, 0.5)]
    counters = state_store.counters(JOB)
    assert counters["failed:task_failed"] == 1 and counters["compare_failed"] == 1 and counters["detected"] == 2
    assert job is not None and job.state is JobState.COMPLETED  # nothing left: the job ends, its losses counted

    why = f"failed for good after 8 retries: {ERROR}"
    assert set(state_store.notes(JOB)) == {
        f"crawler.download {why}; 1 URLs recorded as failed (task_failed)",
        f"detector.detect {why}; 1 images recorded with no crops",
        f"siamese.compare {why}; 1 crops counted in compare_failed",
    }


def test_a_lost_discovery_chain_fails_the_job_with_the_reason(state_store) -> None:  # type: ignore[no-untyped-def]
    _running_job(state_store)

    # A tick of a superseded chain: the current chain goes on, the loss is only noted.
    job = _settle(state_store, TaskName.DISCOVER, {"job_id": JOB, "chain": "d" * 32})
    assert job is not None and job.state is JobState.RUNNING

    job = _settle(state_store, TaskName.DISCOVER, {"job_id": JOB, "chain": CHAIN})
    assert job is not None and job.state is JobState.FAILED
    assert job.error == f"discovery stopped: crawler.discover failed for good after 8 retries: {ERROR}"


def test_poison_messages_and_finished_jobs_are_only_noted_or_left_alone(state_store) -> None:  # type: ignore[no-untyped-def]
    _running_job(state_store)
    job = _settle(state_store, TaskName.DETECT, {"job_id": JOB})  # no image_keys: nothing to record
    assert job is not None and job.state is JobState.RUNNING
    assert state_store.notes(JOB) == [f"detector.detect failed for good after 8 retries: {ERROR}"]
    assert state_store.counters(JOB) == {}

    assert settle_failed_task(state_store, _letter(TaskName.DETECT, {}, job_id=None), {}) is None
    assert settle_failed_task(state_store, _letter(TaskName.DETECT, {}, job_id="no-such-job"), {}) is None

    state_store.set_job_state(JOB, JobState.CANCELLED)
    _settle(state_store, TaskName.DISCOVER, {"job_id": JOB, "chain": CHAIN})
    assert state_store.get_job(JOB).state is JobState.CANCELLED and len(state_store.notes(JOB)) == 1
