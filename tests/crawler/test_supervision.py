"""The discovery chain's supervision: work a killed worker stranded is found and handed on again.

A worker that records its results and dies before sending the next stage's message leaves an
image nobody detects (or a crop nobody compares); no URL is left in the frontier to show it.
"""

from __future__ import annotations

from imgsift_common import keys
from imgsift_common.messages import (
    Candidate,
    Crop,
    DownloadOutcome,
    DownloadRecord,
    Job,
    JobSpec,
    SourceKind,
    SourceSpec,
    StoredImage,
    utcnow,
)
from imgsift_crawler.pipeline import stalled_work

JOB = "job-supervised"


def _store_image(state, sha: str) -> str:  # type: ignore[no-untyped-def]
    key = keys.image_key(JOB, sha, "JPEG")
    url = f"http://127.0.0.1/{sha[:6]}.jpg"
    image = StoredImage(
        job_id=JOB, key=key, sha256=sha, width=10, height=10, format="JPEG", bytes=1, fetched_at=utcnow(),
        provenance=Candidate(image_url=url, source=SourceKind.URLS),
    )  # fmt: skip
    record = DownloadRecord(url=url, outcome=DownloadOutcome.STORED, sha256=sha, image_key=key)
    assert state.record_download(JOB, record, image, 100).outcome is DownloadOutcome.STORED
    return key


def _crops(image_key: str, sha: str, n: int) -> list[Crop]:
    return [
        Crop(job_id=JOB, key=keys.crop_key(JOB, keys.crop_id(sha, i)), crop_id=keys.crop_id(sha, i),
             image_key=image_key, box=(0, 0, 1, 1), padded_box=(0, 0, 1, 1), score=0.5, class_name="dog")
        for i in range(n)
    ]  # fmt: skip


def test_unfinished_work_lists_undetected_images_and_unscored_crops(state_store) -> None:  # type: ignore[no-untyped-def]
    state_store.create_job(
        Job(id=JOB, spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="dog"))
    )
    a, b, c = (_store_image(state_store, ch * 64) for ch in "abc")
    crops = _crops(a, "a" * 64, 3)
    state_store.record_detection(JOB, a, crops)
    state_store.record_distance(JOB, crops[0].key, 0.3)
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
    crops = _crops(a, "a" * 64, 2)
    state_store.record_detection(JOB, a, crops)
    assert stalled_work(job, state_store, 60, now=1070.0) is None
    assert stalled_work(job, state_store, 60, now=1120.0) is None
    assert stalled_work(job, state_store, 60, now=1130.0) == ([b], sorted(c.key for c in crops))
    # Handed on once per quiet period, not on every tick.
    assert stalled_work(job, state_store, 60, now=1131.0) is None
    assert stalled_work(job, state_store, 60, now=1190.0) == ([b], sorted(c.key for c in crops))
