"""Both job-state stores behave the same: record-once counters, final states, distance pages."""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from imgsift_common import keys
from imgsift_common.messages import (
    Candidate,
    Crop,
    DownloadOutcome,
    DownloadRecord,
    FailureReason,
    Job,
    JobSpec,
    JobState,
    SourceKind,
    SourceSpec,
    StoredImage,
)
from imgsift_common.progress import compute_progress, finish_if_complete
from imgsift_common.state import DownloadItem, Flag, StreamState
from tests.support.records import stored_image

JOB = "job-state"


def _job(state) -> Job:  # type: ignore[no-untyped-def]
    job = Job(id=JOB, spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://a/1"])], target="dog"))
    assert state.create_job(job)
    return job


def _image(sha: str, url: str) -> tuple[DownloadRecord, StoredImage]:
    return stored_image(JOB, sha, url=url)


def test_create_is_once_and_final_states_stick(state_store) -> None:  # type: ignore[no-untyped-def]
    job = _job(state_store)
    assert not state_store.create_job(job)
    assert state_store.set_job_state(JOB, JobState.RUNNING).state is JobState.RUNNING
    assert state_store.set_job_state(JOB, JobState.CANCELLED).state is JobState.CANCELLED
    # a late worker cannot complete a cancelled job
    assert state_store.set_job_state(JOB, JobState.COMPLETED).state is JobState.CANCELLED
    assert state_store.get_job(JOB).state is JobState.CANCELLED


def test_update_job_changes_fields_but_never_the_state(state_store) -> None:  # type: ignore[no-untyped-def]
    job = _job(state_store)
    state_store.set_job_state(JOB, JobState.CANCELLED)
    updated = state_store.update_job(JOB, spec=job.spec.model_copy(update={"threshold": 0.3}))
    assert updated.spec.threshold == 0.3 and updated.state is JobState.CANCELLED
    assert state_store.get_job(JOB) == updated
    with pytest.raises(ValueError, match="set_job_state"):
        state_store.update_job(JOB, state=JobState.RUNNING)


def test_download_records_are_once_per_url_and_dedupe_by_content(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    a = "a" * 64
    record, image = _image(a, "http://x/1")
    assert state_store.record_downloads(JOB, [DownloadItem(record, image)], 10)[0].outcome is DownloadOutcome.STORED
    # redelivery of the same URL: same answer, no counter moves
    assert state_store.record_downloads(JOB, [DownloadItem(record, image)], 10)[0].outcome is DownloadOutcome.STORED
    copy, copy_image = _image(a, "http://x/copy")
    dup = state_store.record_downloads(JOB, [DownloadItem(copy, copy_image)], 10)[0]
    assert dup.outcome is DownloadOutcome.DUPLICATE and dup.duplicate_of == "http://x/1"
    failed = DownloadRecord(url="http://x/bad", outcome=DownloadOutcome.FAILED, reason=FailureReason.NOT_AN_IMAGE)
    state_store.record_downloads(JOB, [DownloadItem(failed)], 10)
    state_store.record_downloads(JOB, [DownloadItem(failed)], 10)
    assert state_store.counters(JOB) == {"downloaded": 1, "duplicates": 1, "failed": 1, "failed:not_an_image": 1}
    assert state_store.get_images(JOB, [image.key]).get(image.key) == image
    assert state_store.image_keys(JOB) == [image.key]


def test_image_limit_is_exact(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    outcomes = [
        state_store.record_downloads(JOB, [DownloadItem(*_image(f"{i:064x}", f"http://x/{i}"))], 2)[0].outcome
        for i in range(4)
    ]
    assert outcomes == [DownloadOutcome.STORED] * 2 + [DownloadOutcome.SKIPPED] * 2
    assert state_store.counters(JOB)["skipped:limit_reached"] == 2


def test_detections_and_distances_are_recorded_once(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    sha = "b" * 64
    image_key = keys.image_key(JOB, sha, "JPEG")
    crops = [
        Crop(job_id=JOB, key=keys.crop_key(JOB, keys.crop_id(sha, i)), crop_id=keys.crop_id(sha, i),
             image_key=image_key, box=(0, 0, 1, 1), padded_box=(0, 0, 1, 1), score=0.5, class_name="dog")
        for i in range(3)
    ]  # fmt: skip
    assert state_store.record_detections(JOB, [(image_key, crops)])[image_key]
    assert not state_store.record_detections(JOB, [(image_key, crops)])[image_key]
    assert image_key in state_store.detected_counts(JOB, [image_key])
    assert state_store.detected_counts(JOB, [image_key]).get(image_key) == 3
    assert state_store.detected_counts(JOB, ["jobs/job-state/images/none.jpg"]) == {}
    for crop, d in zip(crops, [0.2, 0.4, 0.9], strict=True):
        assert state_store.record_distances(JOB, [(crop.key, d)])[crop.key]
        assert not state_store.record_distances(JOB, [(crop.key, d)])[crop.key]
    assert state_store.counters(JOB) == {"detected": 1, "crops": 3, "compared": 3}
    assert state_store.record_compare_failure(JOB, "lost-crop")
    assert not state_store.record_compare_failure(JOB, "lost-crop")
    assert state_store.counters(JOB)["compare_failed"] == 1
    assert state_store.count_below(JOB, [0.4])[0] == 2
    assert state_store.get_crops(JOB, [crops[1].key]) == [crops[1]]
    state_store.reset_distances(JOB)
    assert state_store.counters(JOB) == {"detected": 1, "crops": 3}
    assert state_store.record_compare_failure(JOB, "lost-crop")  # forgotten with the distances
    state_store.reset_detections(JOB)
    assert state_store.counters(JOB) == {}
    assert image_key not in state_store.detected_counts(JOB, [image_key])


def test_a_batch_of_distances_is_recorded_as_one_by_one(state_store) -> None:  # type: ignore[no-untyped-def]
    """record_distances (the Siamese worker's one write per scored batch) keeps record_distance's rules:
    each crop counted once, a redelivery reports nothing new, a changed value moves its count."""
    _job(state_store)
    first = {f"jobs/{JOB}/crops/{i:03d}.jpg": 0.1 * i for i in range(6)}
    assert state_store.record_distances(JOB, list(first.items())[:4]) == dict.fromkeys(list(first)[:4], True)
    again = state_store.record_distances(JOB, list(first.items()))  # a redelivery with two new crops
    assert again == {k: i >= 4 for i, k in enumerate(first)}
    assert state_store.counters(JOB)["compared"] == 6
    assert state_store.count_below(JOB, [0.25, 0.45, 2.0]) == [3, 5, 6]
    moved = next(iter(first))
    assert state_store.record_distances(JOB, [(moved, 0.95)]) == {moved: False}  # replaced, not counted
    assert state_store.counters(JOB)["compared"] == 6
    assert state_store.count_below(JOB, [0.25, 2.0]) == [2, 6]
    assert state_store.distances_of(JOB, [moved]) == {moved: 0.95}


def test_distance_pages_walk_every_crop_once_with_ties(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    rng = random.Random(7)
    distances = {f"k{i:03d}": rng.choice([0.1, 0.25, 0.25, 0.25, 0.5, 0.75, 1.0]) for i in range(40)}
    for key, d in distances.items():
        state_store.record_distances(JOB, [(key, d)])
    bounds: list[dict[str, float]] = [{}, {"max_distance": 0.5}, {"min_distance_exclusive": 0.25}]
    for kwargs in bounds:
        for descending in (False, True):
            walked, after = [], None
            while True:
                page = state_store.distance_page(JOB, after=after, limit=3, descending=descending, **kwargs)
                walked += page.items
                if page.next_after is None:
                    break
                after = page.next_after
            expected = sorted(
                ((k, d) for k, d in distances.items()
                 if d <= kwargs.get("max_distance", 9) and d > kwargs.get("min_distance_exclusive", -1)),
                key=lambda kv: (kv[1], kv[0]), reverse=descending,
            )  # fmt: skip
            assert walked == expected


def test_frontier_leases_and_releases_on_outcome(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    urls = [Candidate(image_url=f"http://x/{i}", source=SourceKind.URLS) for i in range(5)]
    assert len(state_store.enqueue_candidates(JOB, urls)) == 5
    assert state_store.counters(JOB)["discovered"] == 5
    first = state_store.lease_candidates(JOB, 3, lease_seconds=0.2)
    rest = state_store.lease_candidates(JOB, 10, lease_seconds=0.2)
    assert len(first) == 3 and sorted(c.image_url for c in first + rest) == sorted(c.image_url for c in urls)
    assert state_store.lease_candidates(JOB, 10, lease_seconds=0.2) == []  # every URL is leased
    # An outcome takes a URL out of the frontier; the others are handed out again once
    # their lease runs out (the worker that had them died).
    record, image = _image("d" * 64, first[0].image_url)
    state_store.record_downloads(JOB, [DownloadItem(record, image)], 10)
    assert state_store.frontier_size(JOB) == 4
    time.sleep(0.3)
    again = state_store.lease_candidates(JOB, 10, lease_seconds=60)
    assert sorted(c.image_url for c in again) == sorted(c.image_url for c in urls if c != first[0])


def test_stream_state_and_locks(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    assert state_store.stream_state(JOB, "s1") is None
    state_store.save_stream_state(JOB, "s1", StreamState(cursor="2", pages=1, taken=20))
    assert state_store.stream_state(JOB, "s1") == StreamState(cursor="2", pages=1, taken=20)
    assert state_store.hold_lock(JOB, "discover", "a" * 32, ttl=0.2)
    assert state_store.hold_lock(JOB, "discover", "a" * 32, ttl=0.2)  # the holder keeps it
    assert not state_store.hold_lock(JOB, "discover", "b" * 32, ttl=0.2)
    time.sleep(0.3)
    assert state_store.hold_lock(JOB, "discover", "b" * 32, ttl=0.2)  # expired: taken over
    state_store.release_lock(JOB, "discover", "b" * 32)
    assert state_store.hold_lock(JOB, "discover", "a" * 32, ttl=0.2)
    assert state_store.get_marker(JOB, "chain") is None
    state_store.set_marker(JOB, "chain", "x")
    state_store.set_marker(JOB, "chain", "y")
    assert state_store.get_marker(JOB, "chain") == "y"


def test_progress_and_completion(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    assert compute_progress({}, set()).fraction == 0.0
    assert state_store.raise_progress(JOB, 0.4) == 0.4
    assert state_store.raise_progress(JOB, 0.3) == 0.4  # what was shown is never taken back
    assert state_store.raise_progress(JOB, 0.6) == 0.6
    state_store.set_job_state(JOB, JobState.RUNNING)
    first = Candidate(image_url="http://x/1", source=SourceKind.URLS)
    assert state_store.enqueue_candidates(JOB, [first, first]) == [first]
    assert state_store.enqueue_candidates(JOB, [first]) == []  # once per job
    assert state_store.frontier_size(JOB) == 1
    state_store.set_flag(JOB, Flag.DISCOVERY_DONE)
    assert finish_if_complete(state_store, JOB).state is JobState.RUNNING  # the URL is not handled yet
    record, image = _image("c" * 64, "http://x/1")
    state_store.record_downloads(JOB, [DownloadItem(record, image)], 10)
    progress = compute_progress(state_store.counters(JOB), state_store.flags(JOB))
    assert progress.stages["crawl"].state == "done" and progress.stages["detect"].state == "pending"
    assert 0.3 < progress.fraction < 0.7
    state_store.record_detections(JOB, [(image.key, [])])  # an image without objects
    assert finish_if_complete(state_store, JOB).state is JobState.COMPLETED
    assert compute_progress(state_store.counters(JOB), state_store.flags(JOB)).complete


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a/./b", "", "a\\b", "a b"])
def test_object_keys_cannot_escape(bad: str, local_store) -> None:  # type: ignore[no-untyped-def]
    from imgsift_common.storage import InvalidKey

    with pytest.raises(InvalidKey):
        local_store.put(bad, b"x")


def test_object_stores_round_trip(object_store) -> None:  # type: ignore[no-untyped-def]
    from imgsift_common.storage import ObjectNotFound, get_json, put_json

    object_store.put("jobs/j1/a.bin", b"\x00\x01")
    put_json(object_store, "jobs/j1/b.json", {"x": 1})
    assert object_store.get("jobs/j1/a.bin") == b"\x00\x01"
    assert get_json(object_store, "jobs/j1/b.json") == {"x": 1}
    assert object_store.exists("jobs/j1/a.bin") and not object_store.exists("jobs/j1/none")
    assert sorted(object_store.list("jobs/j1/")) == ["jobs/j1/a.bin", "jobs/j1/b.json"]
    object_store.delete("jobs/j1/a.bin")
    with pytest.raises(ObjectNotFound):
        object_store.get("jobs/j1/a.bin")


def test_object_stores_take_and_stream_files(object_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imgsift_common.storage import ObjectNotFound

    big = tmp_path / "big.bin"
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 17)  # more than one chunk, an odd tail
    big.write_bytes(data)
    object_store.put_file("jobs/j1/exports/big.zip", big, "application/zip")
    chunks = list(object_store.iter_chunks("jobs/j1/exports/big.zip", chunk_size=1 << 20))
    assert len(chunks) >= 4 and b"".join(chunks) == data
    with pytest.raises(ObjectNotFound):
        list(object_store.iter_chunks("jobs/j1/exports/none.zip"))


def test_keys_refuse_user_strings() -> None:
    with pytest.raises(ValueError):
        keys.image_key("../etc", "a" * 64, "JPEG")
    with pytest.raises(ValueError):
        keys.crop_key("job-1", "../../x")
    assert keys.image_key("job-1", "a" * 64, "PNG") == f"jobs/job-1/images/{'a' * 64}.png"


def _sized(sha: str, url: str, width: int, height: int, phash: int) -> tuple[DownloadRecord, StoredImage]:
    record, image = _image(sha, url)
    return record, image.model_copy(update={"width": width, "height": height, "phash": f"{phash:016x}"})


@pytest.mark.parametrize(
    ("distance", "flip"),
    [
        (6, 0b101),  # 2 bits in band 0: found by bands 1-3
        (6, 0b11 | 0b11 << 16 | 0b11 << 32),  # 6 bits, 2 in each of bands 0-2: only band 3 (radius 0) agrees
        (2, 1 | 1 << 16),  # 2 bits at distance 2: bands 0-2 at radius 0, band 3 not probed; band 2 agrees
    ],
)
def test_near_duplicate_smaller_copy_is_recorded_as_duplicate(state_store, distance: int, flip: int) -> None:  # type: ignore[no-untyped-def]
    from imgsift_common.neardup import NearDupQuery

    _job(state_store)
    h = 0x0123456789ABCDEF
    big = _sized("a" * 64, "http://x/big", 800, 600, h)
    small = _sized("b" * 64, "http://x/small", 400, 300, h ^ flip)
    other = _sized("c" * 64, "http://x/other", 400, 300, h ^ 0xFFFF0000)  # 16 bits away
    for record, image in (big, small, other):
        state_store.record_downloads(
            JOB, [DownloadItem(record, image, near=NearDupQuery(int(image.phash, 16), distance))], 10
        )
    kept = state_store.url_records(JOB, ["http://x/small"]).get("http://x/small")
    assert kept.outcome is DownloadOutcome.DUPLICATE and kept.duplicate_of == "http://x/big"
    assert kept.hamming == flip.bit_count()
    assert state_store.url_records(JOB, ["http://x/other"])["http://x/other"].outcome is DownloadOutcome.STORED
    assert state_store.counters(JOB) == {"downloaded": 2, "duplicates": 1}


def test_near_duplicate_beyond_the_band_radius_reads_the_jobs_hashes(state_store) -> None:  # type: ignore[no-untyped-def]
    from imgsift_common.neardup import NearDupQuery

    # 24 bits: more than MAX_BAND_RADIUS per band, so the lookup reads every hash of the job.
    _job(state_store)
    h = 0x0123456789ABCDEF
    big = _sized("a" * 64, "http://x/big", 800, 600, h)
    small = _sized("b" * 64, "http://x/small", 400, 300, h ^ 0xFFFFF0)  # 20 bits away
    other = _sized("c" * 64, "http://x/other", 400, 300, h ^ ((1 << 64) - 1))  # 64 bits away
    for record, image in (big, small, other):
        state_store.record_downloads(
            JOB, [DownloadItem(record, image, near=NearDupQuery(int(image.phash, 16), 24))], 10
        )
    kept = state_store.url_records(JOB, ["http://x/small"]).get("http://x/small")
    assert kept.outcome is DownloadOutcome.DUPLICATE and kept.duplicate_of == "http://x/big" and kept.hamming == 20
    assert state_store.url_records(JOB, ["http://x/other"])["http://x/other"].outcome is DownloadOutcome.STORED


def test_near_duplicate_larger_copy_replaces_the_kept_one_downstream_too(state_store) -> None:  # type: ignore[no-untyped-def]
    from imgsift_common.neardup import NearDupQuery

    _job(state_store)
    h = 0x0F0F0F0F0F0F0F0F
    small_record, small = _sized("a" * 64, "http://x/small", 400, 300, h)
    state_store.record_downloads(JOB, [DownloadItem(small_record, small, near=NearDupQuery(h, 6))], 10)
    # The small copy went downstream: two crops, one compared.
    crops = [
        Crop(job_id=JOB, key=keys.crop_key(JOB, keys.crop_id("a" * 64, i)), crop_id=keys.crop_id("a" * 64, i),
             image_key=small.key, box=(0, 0, 1, 1), padded_box=(0, 0, 1, 1), score=0.5, class_name="dog")
        for i in range(2)
    ]  # fmt: skip
    state_store.record_detections(JOB, [(small.key, crops)])
    state_store.record_distances(JOB, [(crops[0].key, 0.3)])
    assert state_store.counters(JOB) == {"downloaded": 1, "detected": 1, "crops": 2, "compared": 1}

    big_record, big = _sized("b" * 64, "http://x/big", 1600, 1200, h ^ 1)
    final = state_store.record_downloads(JOB, [DownloadItem(big_record, big, near=NearDupQuery(h ^ 1, 6))], 10)[0]

    assert final.outcome is DownloadOutcome.STORED
    demoted = state_store.url_records(JOB, ["http://x/small"]).get("http://x/small")
    assert demoted.outcome is DownloadOutcome.DUPLICATE and demoted.duplicate_of == "http://x/big"
    # As if the small copy never went downstream: no detection, no crop, no distance counted.
    assert state_store.counters(JOB) == {"downloaded": 1, "duplicates": 1}
    assert state_store.image_keys(JOB) == [big.key]
    assert state_store.count_below(JOB, [2.0])[0] == 0
    # Work on the small copy still in flight is dropped when it lands.
    assert not state_store.record_distances(JOB, [(crops[1].key, 0.2)])[crops[1].key]
    assert state_store.count_below(JOB, [2.0])[0] == 0
    assert state_store.counters(JOB) == {"downloaded": 1, "duplicates": 1}
    # Exact copies of the small bytes now point at the copy kept.
    copy = DownloadRecord(url="http://x/copy", outcome=DownloadOutcome.STORED, sha256="a" * 64, image_key=small.key)
    assert state_store.record_downloads(JOB, [DownloadItem(copy, small)], 10)[0].duplicate_of == "http://x/big"


def test_superseded_image_detected_later_records_nothing(state_store) -> None:  # type: ignore[no-untyped-def]
    from imgsift_common.neardup import NearDupQuery

    _job(state_store)
    h = 0x1111222233334444
    small_record, small = _sized("a" * 64, "http://x/small", 100, 100, h)
    big_record, big = _sized("b" * 64, "http://x/big", 200, 200, h)
    state_store.record_downloads(JOB, [DownloadItem(small_record, small, near=NearDupQuery(h, 6))], 10)
    state_store.record_downloads(JOB, [DownloadItem(big_record, big, near=NearDupQuery(h, 6))], 10)
    crop_id = keys.crop_id("a" * 64, 0)
    crop = Crop(
        job_id=JOB,
        key=keys.crop_key(JOB, crop_id),
        crop_id=crop_id,
        image_key=small.key,
        box=(0, 0, 1, 1),
        padded_box=(0, 0, 1, 1),
        score=0.5,
        class_name="dog",
    )
    assert not state_store.record_detections(JOB, [(small.key, [crop])])[small.key]
    assert small.key in state_store.detected_counts(JOB, [small.key])  # a redelivery stops early
    assert state_store.counters(JOB) == {"downloaded": 1, "duplicates": 1}


def test_exact_copies_across_jobs_only_when_asked(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    other = Job(
        id="job-other", spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://a/1"])], target="dog")
    )
    state_store.create_job(other)
    record, image = _image("e" * 64, "http://x/first")
    state_store.record_downloads(JOB, [DownloadItem(record, image)], 10)
    again = DownloadRecord(url="http://y/same", outcome=DownloadOutcome.STORED, sha256="e" * 64)
    other_image = image.model_copy(update={"job_id": "job-other", "key": keys.image_key("job-other", "e" * 64, "JPEG")})
    assert (
        state_store.record_downloads("job-other", [DownloadItem(again, other_image)], 10)[0].outcome
        is DownloadOutcome.STORED
    )
    third = DownloadRecord(url="http://z/same", outcome=DownloadOutcome.STORED, sha256="e" * 64)
    state_store.create_job(other.model_copy(update={"id": "job-third"}))
    third_image = image.model_copy(update={"job_id": "job-third", "key": keys.image_key("job-third", "e" * 64, "JPEG")})
    dup = state_store.record_downloads("job-third", [DownloadItem(third, third_image)], 10, across_jobs=True)[0]
    assert dup.outcome is DownloadOutcome.DUPLICATE
    assert dup.duplicate_of in (f"job {JOB} http://x/first", "job job-other http://y/same")


def test_feedback_marks_are_set_changed_and_cleared(state_store) -> None:  # type: ignore[no-untyped-def]
    _job(state_store)
    a, b = (keys.crop_key(JOB, keys.crop_id(c * 64, 0)) for c in "ab")
    state_store.set_feedback(JOB, a, True)
    state_store.set_feedback(JOB, b, False)
    assert state_store.feedback(JOB) == {a: True, b: False}
    state_store.set_feedback(JOB, a, False)
    state_store.set_feedback(JOB, b, None)
    assert state_store.feedback(JOB) == {a: False}
    assert state_store.feedback("other-job") == {}


def test_idempotency_keys_bind_once_and_expire(state_store) -> None:  # type: ignore[no-untyped-def]
    assert state_store.claim_idempotency_key("client-42", "job-a", ttl=60) == "job-a"
    assert state_store.claim_idempotency_key("client-42", "job-b", ttl=60) == "job-a"
    assert state_store.claim_idempotency_key("client-43", "job-c", ttl=0.05) == "job-c"
    time.sleep(0.1)
    assert state_store.claim_idempotency_key("client-43", "job-d", ttl=60) == "job-d"


def test_jobs_are_listed_per_owner(state_store) -> None:  # type: ignore[no-untyped-def]
    """The API lists a key's jobs only: the owner index of each store."""
    spec = JobSpec(target="dog", sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://127.0.0.1:9/a.jpg"])])
    jobs = [Job(id=f"{i:032x}", spec=spec, owner=owner) for i, owner in enumerate(["a", "b", "a", None], start=1)]
    for job in jobs:
        state_store.create_job(job)
    assert [j.id for j in state_store.list_jobs(owner="a")] == [jobs[2].id, jobs[0].id]
    assert [j.id for j in state_store.list_jobs(owner="b")] == [jobs[1].id]
    assert state_store.list_jobs(owner="c") == []
    assert len(state_store.list_jobs()) == 4
    assert [j.id for j in state_store.list_jobs(limit=1, owner="a")] == [jobs[2].id]


def _download_items(job_id: str, seed: int) -> list:  # type: ignore[type-arg]
    """A crawl's worth of outcomes that exercise every rule: exact copies, near copies smaller and
    larger (superseding, within a batch too), a URL delivered twice, failures, the image limit."""
    from imgsift_common.neardup import NearDupQuery

    rng = random.Random(seed)
    centres = [rng.getrandbits(64) for _ in range(5)]
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(1, 41)]  # apart in the 24 digits crop ids carry
    items = []
    for _ in range(60):
        url = f"http://x/{rng.randrange(55)}"
        if rng.random() < 0.15:
            record = DownloadRecord(url=url, outcome=DownloadOutcome.FAILED, reason=FailureReason.NOT_AN_IMAGE)
            items.append(DownloadItem(record))
            continue
        sha = rng.choice(shas)
        phash = rng.choice(centres) ^ (1 << rng.randrange(64)) if rng.random() < 0.4 else rng.getrandbits(64)
        side = rng.randrange(100, 1000)
        record, image = stored_image(job_id, sha, url=url, size=(side, side))
        image = image.model_copy(update={"phash": f"{phash:016x}"})
        items.append(DownloadItem(record, image, NearDupQuery(phash, 6)))
    return items


def _state_of(store, job_id: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    urls = {f"http://x/{i}" for i in range(55)}
    records = store.url_records(job_id, sorted(urls))
    return {
        "counters": store.counters(job_id),
        "records": {u: records[u].model_dump_json().replace(job_id, "J") if u in records else None for u in urls},
        "images": [key.replace(job_id, "J") for key in store.image_keys(job_id)],
        "crops": [key.replace(job_id, "J") for key in store.crop_keys(job_id)],
        "accepted": store.count_below(job_id, [0.5, 2.0]),
    }


@pytest.mark.parametrize("seed", [1, 2])
def test_batches_of_downloads_and_detections_record_as_one_by_one(state_store, seed: int) -> None:  # type: ignore[no-untyped-def]
    """record_downloads and record_detections (a download task's and a detect batch's one write)
    give every URL, counter, image and crop that recording the same outcomes one at a time gives,
    whatever the batch boundaries, including a batch delivered twice."""
    spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://a/1"])], target="dog")
    rng = random.Random(seed)
    finals = {}
    for job_id, batched in (("one-by-one", False), ("batched", True)):
        assert state_store.create_job(Job(id=job_id, spec=spec))
        items = _download_items(job_id, seed)
        got = []
        if batched:
            cuts = sorted(rng.sample(range(1, len(items)), 5))
            for lo, hi in zip([0, *cuts], [*cuts, len(items)], strict=True):
                got += state_store.record_downloads(job_id, items[lo:hi], 12)
                before = state_store.counters(job_id)
                again = state_store.record_downloads(job_id, items[lo:hi], 12)  # redelivered: the records as they are
                records = state_store.url_records(job_id, [i.record.url for i in items[lo:hi]])
                assert again == [records.get(i.record.url) for i in items[lo:hi]]
                assert state_store.counters(job_id) == before
        else:
            got = [state_store.record_downloads(job_id, [item], 12)[0] for item in items]
        finals[job_id] = [r.model_dump_json().replace(job_id, "J") for r in got]
        # Every image, stored or superseded since, goes to the detector; superseded ones record nothing.
        detections = []
        for item in items:
            if item.image is not None and item.image.key not in {key for key, _ in detections}:
                sha = item.image.sha256
                crops = [
                    Crop(job_id=job_id, key=keys.crop_key(job_id, keys.crop_id(sha, k)), crop_id=keys.crop_id(sha, k),
                         image_key=item.image.key, box=(0, 0, 1, 1), padded_box=(0, 0, 1, 1), score=0.5,
                         class_name="dog")
                    for k in range(2)
                ]  # fmt: skip
                detections.append((item.image.key, crops))
        if batched:
            recorded = {}
            for lo in range(0, len(detections), 7):
                recorded |= state_store.record_detections(job_id, detections[lo : lo + 7] * 2)  # listed twice
            assert not any(state_store.record_detections(job_id, detections).values())  # redelivered
        else:
            recorded = {key: state_store.record_detections(job_id, [(key, crops)])[key] for key, crops in detections}
        finals[job_id].append(sorted((k.replace(job_id, "J"), v) for k, v in recorded.items()))
        for key in state_store.crop_keys(job_id):
            state_store.record_distances(job_id, [(key, 0.4)])
    assert finals["batched"] == finals["one-by-one"]
    assert _state_of(state_store, "batched") == _state_of(state_store, "one-by-one")
    counters = state_store.counters("batched")
    # The rules were exercised: exact and near copies, and the limit.
    assert counters["downloaded"] == 12 and counters["duplicates"] > 3 and counters["skipped"] > 0, counters


def test_url_records_reads_the_records_of_many_urls_at_once(state_store) -> None:  # type: ignore[no-untyped-def]
    """url_records gives what url_record gives for each URL (the URLs without a record left out),
    over more URLs than one statement takes."""
    from imgsift_common.sqlstate import CHUNK

    _job(state_store)
    items = [DownloadItem(*_image(f"{i:064x}", f"http://x/{i}")) for i in range(0, CHUNK + 100, 2)]
    failed = DownloadRecord(url="http://x/bad", outcome=DownloadOutcome.FAILED, reason=FailureReason.NOT_AN_IMAGE)
    copy = DownloadItem(*_image(f"{0:064x}", "http://x/copy"))
    state_store.record_downloads(JOB, [*items, DownloadItem(failed), copy], 1000)
    asked = [f"http://x/{i}" for i in range(CHUNK + 100)] + ["http://x/bad", "http://x/copy", "http://x/never"]
    found = state_store.url_records(JOB, asked)
    assert found == {
        url: record for url in asked if (record := state_store.url_records(JOB, [url]).get(url)) is not None
    }
    assert len(found) == len(items) + 2
    assert found["http://x/copy"].outcome is DownloadOutcome.DUPLICATE
    assert state_store.url_records(JOB, []) == {}
    assert state_store.url_records("another-job", asked[:10]) == {}


def test_locks_taken_and_freed_as_a_batch_follow_the_rules_of_one(service_state) -> None:  # type: ignore[no-untyped-def]
    """The services' store takes a batch's locks in one round trip, each as hold_lock would: a free
    or expired lock is taken, a held one kept by its holder and refused to anyone else; freeing
    frees only the caller's."""
    from imgsift_common.state import BatchLocks

    assert isinstance(service_state, BatchLocks)
    _job(service_state)
    a, b = "a" * 32, "b" * 32
    assert service_state.hold_lock(JOB, "x", b, ttl=5)
    assert service_state.hold_lock(JOB, "short", b, ttl=0.2)
    assert service_state.hold_locks(JOB, ["free", "x", "short"], a, ttl=5) == [True, False, False]
    assert service_state.hold_locks(JOB, ["free", "free"], a, ttl=5) == [True, True]  # the holder keeps it
    time.sleep(0.3)
    assert service_state.hold_locks(JOB, ["short", "x"], a, ttl=5) == [True, False]  # expired: taken over
    assert not service_state.hold_lock(JOB, "short", b, ttl=5)
    service_state.release_locks(JOB, ["free", "short", "x"], a)  # "x" is b's: left alone
    assert service_state.hold_locks(JOB, ["free", "short"], b, ttl=5) == [True, True]
    assert not service_state.hold_lock(JOB, "x", a, ttl=5)
    assert service_state.hold_locks(JOB, [], a, ttl=5) == []
    service_state.release_locks(JOB, [], a)
