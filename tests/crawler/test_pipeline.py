"""discover + download_batch over a real local site, with each state and object store."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import DownloadOutcome, FailureReason, Job, JobSpec, Limits, SourceKind, SourceSpec
from imgsift_common.state import Counter, Flag
from imgsift_common.storage import get_json
from imgsift_crawler import pipeline
from imgsift_crawler.fetch import Fetcher
from imgsift_crawler.settings import CrawlerSettings
from tests.support.web import TestWeb, build_photo_site


def _job(*sources: SourceSpec, max_images: int = 100) -> Job:
    return Job(
        id="job-crawl", spec=JobSpec(sources=list(sources), target="person", limits=Limits(max_images=max_images))
    )


def _run(job, state, store, settings, fetcher) -> list:  # type: ignore[no-untyped-def]
    """Discovery steps and downloads until discovery is over and every URL has an outcome."""
    state.create_job(job)
    stored = []
    for _ in range(1000):
        step = pipeline.crawl_step(job, state, fetcher, settings)
        for batch in step.batches:
            stored += pipeline.download_batch(job, batch, store, state, settings, fetcher)
        if step.finished:
            return stored
    raise AssertionError("discovery never finished")


def test_site_job_stores_unique_images_with_provenance(  # type: ignore[no-untyped-def]
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, coco128, state_store, object_store
) -> None:
    photos = coco128.images[:8]
    index = build_photo_site(web, photos)
    # The same bytes at a second URL, a broken file and an HTML page served as a JPEG.
    web.add_image("/copy.jpg", photos[0])
    web.add("/broken.jpg", photos[1].read_bytes()[:3000], "image/jpeg")
    web.add("/fake.jpg", "<html><body>not a photo</body></html>", "image/jpeg")
    extra = SourceSpec(kind=SourceKind.URLS, urls=[web.url(p) for p in ("/copy.jpg", "/broken.jpg", "/fake.jpg")])
    job = _job(SourceSpec(kind=SourceKind.SITE, start_urls=[index]), extra)

    stored = _run(job, state_store, object_store, crawler_settings, fetcher)

    counters = state_store.counters(job.id)
    assert len(stored) == 8 == counters[Counter.DOWNLOADED]
    assert counters[Counter.DUPLICATES] == 1
    # the srcset pages reference a missing thumbnail too: 404s are failures with a reason
    assert counters["failed:not_an_image"] == 2
    assert counters["failed:http_error"] >= 1
    assert (
        counters[Counter.DISCOVERED]
        == counters[Counter.DOWNLOADED] + counters[Counter.DUPLICATES] + counters[Counter.FAILED]
    )
    assert Flag.DISCOVERY_DONE in state_store.flags(job.id)
    pair = {web.url("/copy.jpg"), web.url(f"/img/{photos[0].name}")}
    records = state_store.url_records(job.id, list(pair))
    assert sorted(r.outcome for r in records.values()) == [DownloadOutcome.DUPLICATE, DownloadOutcome.STORED]
    dup = next(r for r in records.values() if r.outcome is DownloadOutcome.DUPLICATE)
    assert dup.duplicate_of == (pair - {dup.url}).pop()
    assert (
        state_store.url_records(job.id, [web.url("/fake.jpg")])[web.url("/fake.jpg")].reason
        is FailureReason.NOT_AN_IMAGE
    )

    image = next(i for i in stored if i.provenance.source == "site")
    assert object_store.get(image.key) == next(p for p in photos if p.name in image.provenance.image_url).read_bytes()
    meta = get_json(object_store, keys.image_meta_key(job.id, image.sha256))
    assert meta["provenance"]["page_url"].startswith(web.base + "/gallery/")
    assert meta["provenance"]["source"] == "site"
    with Image.open(photos[1]) as im:
        assert {(i.width, i.height) for i in stored if i.provenance.image_url.endswith(photos[1].name)} == {im.size}


def test_rerun_downloads_nothing_and_changes_no_counter(  # type: ignore[no-untyped-def]
    web: TestWeb, fetcher, crawler_settings, coco128, state_store, local_store
) -> None:
    index = build_photo_site(web, coco128.images[:4])
    job = _job(SourceSpec(kind=SourceKind.SITE, start_urls=[index]))
    _run(job, state_store, local_store, crawler_settings, fetcher)
    before = state_store.counters(job.id)
    requests = len(web.requests)

    # A further step finds discovery done and nothing to lease; a redelivered batch returns the same images.
    assert pipeline.crawl_step(job, state_store, fetcher, crawler_settings).finished
    candidates = list(state_store.url_records(job.id, [web.url(f"/img/{p.name}") for p in coco128.images[:4]]).values())
    assert len(candidates) == 4 and all(r.outcome is DownloadOutcome.STORED for r in candidates)
    from imgsift_common.messages import Candidate

    again = pipeline.download_batch(
        job,
        [Candidate(image_url=r.url, source=SourceKind.SITE) for r in candidates],
        local_store,
        state_store,
        crawler_settings,
        fetcher,
    )
    assert len(again) == 4
    assert state_store.counters(job.id) == before
    assert len(web.requests) == requests


def test_max_images_stops_storing_and_says_why(
    web, fetcher, crawler_settings, coco128, state_store, local_store
) -> None:  # type: ignore[no-untyped-def]
    urls = [web.add_image(f"/p{i}.jpg", p) for i, p in enumerate(coco128.images[:5])]
    job = _job(SourceSpec(kind=SourceKind.URLS, urls=urls), max_images=3)
    stored = _run(job, state_store, local_store, crawler_settings, fetcher)
    counters = state_store.counters(job.id)
    assert len(stored) == 3 == counters[Counter.DOWNLOADED]
    assert counters["skipped:limit_reached"] == 2
    assert len(list(local_store.list(keys.job_prefix(job.id) + "images/"))) == 3 * 2  # image + provenance json


def test_failing_source_is_noted_and_others_go_on(
    web, fetcher, crawler_settings, coco128, state_store, local_store
) -> None:  # type: ignore[no-untyped-def]
    good = web.add_image("/ok.jpg", coco128.images[0])
    job = _job(
        SourceSpec(kind=SourceKind.URLS, path="/nonexistent/list.txt"),
        SourceSpec(kind=SourceKind.URLS, urls=[good]),
    )
    stored = _run(job, state_store, local_store, crawler_settings, fetcher)
    assert [i.provenance.image_url for i in stored] == [good]
    assert any("urls failed" in n and "cannot read" in n for n in state_store.notes(job.id))


@pytest.mark.parametrize("per_source", [2])
def test_per_source_limit(web, fetcher, crawler_settings, coco128, sqlite_state, local_store, per_source: int) -> None:  # type: ignore[no-untyped-def]
    urls = [web.add_image(f"/q{i}.jpg", p) for i, p in enumerate(coco128.images[:4])]
    job = Job(
        id="job-limit",
        spec=JobSpec(
            sources=[SourceSpec(kind=SourceKind.URLS, urls=urls)], target="dog", limits=Limits(per_source=per_source)
        ),
    )
    stored = _run(job, sqlite_state, local_store, crawler_settings, fetcher)
    assert len(stored) == per_source


def test_a_url_another_live_task_is_fetching_is_left_to_it(  # type: ignore[no-untyped-def]
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, coco128, state_store, local_store
) -> None:
    """Two tasks hold one URL (a lease ran out while the first waited): only the claim holder fetches."""
    from imgsift_common.messages import Candidate

    urls = [web.add_image(f"/c{i}.jpg", p) for i, p in enumerate(coco128.images[:2])]
    job = _job(SourceSpec(kind=SourceKind.URLS, urls=urls))
    state_store.create_job(job)
    batch = [Candidate(image_url=u, source=SourceKind.URLS) for u in urls]
    claim = pipeline.fetch_claim(urls[0])
    assert state_store.hold_lock(job.id, claim, "task-a", 60)  # task A is fetching urls[0] right now

    stored = pipeline.download_batch(job, batch, local_store, state_store, crawler_settings, fetcher, "task-b")

    assert [i.provenance.image_url for i in stored] == [urls[1]]
    assert state_store.url_records(job.id, [urls[0]]).get(urls[0]) is None  # left to task A: no record, no request
    assert [r for r in web.requests if r.startswith("/c")] == ["/c1.jpg"]
    assert not state_store.hold_lock(job.id, claim, "task-c", 60)  # still A's
    # task B released the claim it took on urls[1] once recorded
    assert state_store.hold_lock(job.id, pipeline.fetch_claim(urls[1]), "task-c", 60)

    # A retry of task A (same task id) holds its claim again and fetches.
    again = pipeline.download_batch(job, batch[:1], local_store, state_store, crawler_settings, fetcher, "task-a")
    assert [i.provenance.image_url for i in again] == [urls[0]]
    assert state_store.hold_lock(job.id, claim, "task-c", 60)  # released after the record


def test_a_fetch_that_outlasts_the_lease_keeps_its_claim(  # type: ignore[no-untyped-def]
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, coco128, state_store, local_store
) -> None:
    """The claim lives a lease; a slow fetch renews it, so a second task holding the URL (its
    lease ran out) cannot claim it mid-fetch and fetch it again."""
    import threading

    from imgsift_common.messages import Candidate

    url = web.add("/slow.jpg", coco128.images[0].read_bytes(), "image/jpeg", delay=1.5)
    job = _job(SourceSpec(kind=SourceKind.URLS, urls=[url]))
    state_store.create_job(job)
    settings = crawler_settings.model_copy(update={"lease_seconds": 0.4})
    batch = [Candidate(image_url=url, source=SourceKind.URLS)]
    result: list[object] = []
    task_a = threading.Thread(
        target=lambda: result.append(
            pipeline.download_batch(job, batch, local_store, state_store, settings, fetcher, "task-a")
        )
    )
    task_a.start()
    deadline = time.monotonic() + 5
    while "/slow.jpg" not in web.requests:  # task A's request is in flight
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(1.0)  # well past the claim's lifetime of 0.4 s
    claim = pipeline.fetch_claim(url)
    assert not state_store.hold_lock(job.id, claim, "task-b", 0.4), "the claim ran out mid-fetch"
    task_a.join(10)

    assert [[i.provenance.image_url for i in stored] for stored in result] == [[url]]  # type: ignore[attr-defined]
    assert web.requests.count("/slow.jpg") == 1
    assert state_store.hold_lock(job.id, claim, "task-b", 0.4)  # released once recorded


class _Calls:
    """The state store, counting the calls made to it (the store itself answers them)."""

    def __init__(self, state) -> None:  # type: ignore[no-untyped-def]
        self.state = state
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        value = getattr(self.state, name)
        if not callable(value):
            return value

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls[name] = self.calls.get(name, 0) + 1
            return value(*args, **kwargs)

        return counted


def test_a_batch_asks_the_state_per_batch_not_per_url(  # type: ignore[no-untyped-def]
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, coco128, state_store, local_store
) -> None:
    """One claim, one read of the records, one of the counters, one write and one release for a
    batch, whatever its size (with a store that takes locks one by one, one call per claim)."""
    from imgsift_common.messages import Candidate
    from imgsift_common.state import BatchLocks

    urls = [web.add_image(f"/b{i}.jpg", p) for i, p in enumerate(coco128.images[:6])]
    job = _job(SourceSpec(kind=SourceKind.URLS, urls=urls))
    state_store.create_job(job)
    batch = [Candidate(image_url=u, source=SourceKind.URLS) for u in urls]
    counted = _Calls(state_store)

    stored = pipeline.download_batch(job, batch, local_store, counted, crawler_settings, fetcher)  # type: ignore[arg-type]

    assert sorted(i.provenance.image_url for i in stored) == sorted(urls)
    calls = counted.calls
    assert (calls["url_records"], calls["counters"], calls["record_downloads"]) == (1, 1, 1)
    if isinstance(state_store, BatchLocks):
        assert (calls["hold_locks"], calls.get("hold_lock")) == (1, None)
        assert (calls["release_locks"], calls.get("release_lock")) == (1, None)
    else:
        assert (calls["hold_lock"], calls["release_lock"]) == (6, 6)
    for url in urls:  # every claim was released
        assert state_store.hold_lock(job.id, pipeline.fetch_claim(url), "another-task", 60)


def test_an_exact_copy_leaves_the_kept_image_and_its_provenance_as_they_are(  # type: ignore[no-untyped-def]
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, coco128, state_store, local_store
) -> None:
    """The bytes of an exact copy land on the kept image's own object (the key is their hash);
    its provenance is written by the URL whose record kept the image only, in the same batch or later."""
    from imgsift_common.messages import Candidate

    photo = coco128.images[0]
    kept, same_batch, later = (web.add_image(f"/{name}.jpg", photo) for name in ("kept", "copy", "later"))
    job = _job(SourceSpec(kind=SourceKind.URLS, urls=[kept]))
    state_store.create_job(job)
    batches = [[kept, same_batch], [later]]
    stored = []
    for urls in batches:
        candidates = [Candidate(image_url=u, source=SourceKind.URLS) for u in urls]
        stored += pipeline.download_batch(job, candidates, local_store, state_store, crawler_settings, fetcher)

    assert [i.provenance.image_url for i in stored] == [kept]
    for url in (same_batch, later):
        record = state_store.url_records(job.id, [url]).get(url)
        assert record.outcome is DownloadOutcome.DUPLICATE and record.duplicate_of == kept
    image = stored[0]
    assert local_store.get(image.key) == photo.read_bytes()
    assert get_json(local_store, keys.image_meta_key(job.id, image.sha256))["provenance"]["image_url"] == kept
    assert len(list(local_store.list(keys.job_prefix(job.id) + "images/"))) == 2  # the image and its provenance
    assert state_store.counters(job.id)[Counter.DUPLICATES] == 2


def test_a_url_recorded_before_gets_its_provenance_again_without_a_fetch(  # type: ignore[no-untyped-def]
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, coco128, state_store, local_store
) -> None:
    """A task stopped between recording its URLs and writing their provenance: the URLs' next
    delivery finds the records, returns the images and writes the provenance, and fetches nothing."""
    from imgsift_common.messages import Candidate

    urls = [web.add_image(f"/r{i}.jpg", p) for i, p in enumerate(coco128.images[:3])]
    job = _job(SourceSpec(kind=SourceKind.URLS, urls=urls))
    state_store.create_job(job)
    batch = [Candidate(image_url=u, source=SourceKind.URLS) for u in urls]
    first = pipeline.download_batch(job, batch, local_store, state_store, crawler_settings, fetcher)
    meta = [keys.image_meta_key(job.id, i.sha256) for i in first]
    written = [get_json(local_store, key) for key in meta]
    for key in meta:
        local_store.delete(key)  # as if the task had stopped before writing them
    requests, counters = len(web.requests), state_store.counters(job.id)

    again = pipeline.download_batch(job, batch, local_store, state_store, crawler_settings, fetcher)

    assert again == first
    assert [get_json(local_store, key) for key in meta] == written
    assert len(web.requests) == requests
    assert state_store.counters(job.id) == counters
