"""The discovery chain's supervision: work a killed worker stranded is found and handed on again.

A worker that records its results and dies before sending the next stage's message leaves an
image nobody detects (or a crop nobody compares); no URL is left in the frontier to show it.
"""

from __future__ import annotations

from imgsift_common.messages import (
    Job,
    JobSpec,
    SourceKind,
    SourceSpec,
)
from imgsift_crawler.pipeline import stalled_work
from tests.support import records

JOB = "job-supervised"


def _store_image(state, sha: str) -> str:  # type: ignore[no-untyped-def]
    return records.record_stored(state, JOB, sha)


def test_unfinished_work_lists_undetected_images_and_unscored_crops(state_store) -> None:  # type: ignore[no-untyped-def]
    state_store.create_job(
        Job(id=JOB, spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="dog"))
    )
    a, b, c = (_store_image(state_store, ch * 64) for ch in "abc")
    crops = records.crops(JOB, "a" * 64, 3)
    state_store.record_detections(JOB, [(a, crops)])
    state_store.record_distances(JOB, [(crops[0].key, 0.3)])
    state_store.record_compare_failure(JOB, crops[1].key)
    images, unscored = state_store.unfinished_work(JOB)
    assert images == sorted([b, c])
    assert unscored == [crops[2].key]


def test_stalled_work_waits_for_a_quiet_period_then_hands_on(state_store) -> None:  # type: ignore[no-untyped-def]
    job = Job(id=JOB, spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="dog"))
    state_store.create_job(job)
    a, b = (_store_image(state_store, ch * 64) for ch in "ab")
    assert stalled_work(job, state_store, 60, now=1000.0) is None  # the watch starts
    assert stalled_work(job, state_store, 60, now=1059.0) is None  # not quiet long enough
    # Progress restarts the watch: a slow stage is not a stalled one.
    crops = records.crops(JOB, "a" * 64, 2)
    state_store.record_detections(JOB, [(a, crops)])
    assert stalled_work(job, state_store, 60, now=1070.0) is None
    assert stalled_work(job, state_store, 60, now=1120.0) is None
    assert stalled_work(job, state_store, 60, now=1130.0) == ([b], sorted(c.key for c in crops))
    # Handed on once per quiet period, not on every tick.
    assert stalled_work(job, state_store, 60, now=1131.0) is None
    assert stalled_work(job, state_store, 60, now=1190.0) == ([b], sorted(c.key for c in crops))
