"""Near-duplicates of real photos: resized and re-encoded copies, the largest kept, whatever the order."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imgsift_common.messages import DedupSpec, DownloadOutcome, Job, JobSpec, SourceKind, SourceSpec
from imgsift_crawler.dedup import perceptual_hash_of
from tests.crawler.test_pipeline import _run


def _jpeg(image: Image.Image, scale: float, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.resize((round(image.width * scale), round(image.height * scale))).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.mark.parametrize("order", [("small", "original", "large"), ("large", "small", "original")])
def test_the_largest_copy_is_kept_and_the_others_point_to_it(  # type: ignore[no-untyped-def]
    web, fetcher, crawler_settings, coco128, state_store, local_store, order
) -> None:
    photo = coco128.images[3]
    with Image.open(photo) as im:
        rgb = im.convert("RGB")
    copies = {"small": _jpeg(rgb, 0.5, 70), "original": photo.read_bytes(), "large": _jpeg(rgb, 1.5, 92)}
    urls = {name: web.add(f"/{name}.jpg", data, "image/jpeg") for name, data in copies.items()}
    different = web.add_image("/different.jpg", coco128.images[4])
    job = Job(
        id="job-dedup",
        spec=JobSpec(
            sources=[SourceSpec(kind=SourceKind.URLS, urls=[urls[n] for n in order] + [different])], target="any"
        ),
    )
    crawler_settings = crawler_settings.model_copy(update={"download_concurrency": 1})  # the order given
    _run(job, state_store, local_store, crawler_settings, fetcher)

    found = state_store.url_records(job.id, list(urls.values()))
    records = {name: found.get(url) for name, url in urls.items()}
    assert records["large"].outcome is DownloadOutcome.STORED
    for name in ("small", "original"):
        assert records[name].outcome is DownloadOutcome.DUPLICATE, name
        assert records[name].duplicate_of == urls["large"]
        assert records[name].hamming is not None and records[name].hamming <= 6
    assert state_store.url_records(job.id, [different])[different].outcome is DownloadOutcome.STORED
    assert state_store.counters(job.id)["downloaded"] == 2
    assert state_store.counters(job.id)["duplicates"] == 2
    kept = state_store.get_images(job.id, state_store.image_keys(job.id)).values()
    assert sorted(i.width for i in kept) == sorted([round(rgb.width * 1.5), Image.open(coco128.images[4]).width])


def test_near_duplicate_detection_can_be_turned_off(
    web, fetcher, crawler_settings, coco128, sqlite_state, local_store
) -> None:  # type: ignore[no-untyped-def]
    photo = coco128.images[3]
    with Image.open(photo) as im:
        small = _jpeg(im.convert("RGB"), 0.5, 70)
    urls = [web.add_image("/a.jpg", photo), web.add("/b.jpg", small, "image/jpeg")]
    job = Job(
        id="job-nodedup",
        spec=JobSpec(
            sources=[SourceSpec(kind=SourceKind.URLS, urls=urls)], target="any", dedup=DedupSpec(near_distance=-1)
        ),
    )
    _run(job, sqlite_state, local_store, crawler_settings, fetcher)
    assert sqlite_state.counters(job.id)["downloaded"] == 2


def test_perceptual_hash_is_stable_under_resizing_and_apart_for_other_photos(coco128) -> None:
    from imgsift_common.neardup import hamming

    photo = coco128.images[5]
    with Image.open(photo) as im:
        rgb = im.convert("RGB")
    h = perceptual_hash_of(photo.read_bytes())
    assert hamming(h, perceptual_hash_of(_jpeg(rgb, 0.5, 60))) <= 4
    assert min(hamming(h, perceptual_hash_of(p.read_bytes())) for p in coco128.images[6:40]) > 10
