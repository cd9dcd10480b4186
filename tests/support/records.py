"""Records as the workers write them: a stored image with its download record, and its crops.

One place for the tests and benchmarks that need a job with stored images or crops without
running the crawler or the detector first.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image

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
from imgsift_common.sqlstate import StateStore
from imgsift_common.state import DownloadItem
from imgsift_common.storage import ObjectStore
from tests.support.coco import Coco128


def stored_image(
    job_id: str,
    sha: str,
    *,
    url: str | None = None,
    size: tuple[int, int] = (10, 10),
    nbytes: int = 1,
    candidate: Candidate | None = None,
) -> tuple[DownloadRecord, StoredImage]:
    """The download record and stored-image record the crawler writes for one fetched JPEG."""
    candidate = candidate or Candidate(image_url=url or f"http://127.0.0.1/{sha[:12]}.jpg", source=SourceKind.URLS)
    key = keys.image_key(job_id, sha, "JPEG")
    image = StoredImage(
        job_id=job_id, key=key, sha256=sha, width=size[0], height=size[1], format="JPEG", bytes=nbytes,
        fetched_at=utcnow(), provenance=candidate,
    )  # fmt: skip
    record = DownloadRecord(url=candidate.image_url, outcome=DownloadOutcome.STORED, sha256=sha, image_key=key)
    return record, image


def record_stored(state: StateStore, job_id: str, sha: str, *, max_images: int = 100, **image: object) -> str:
    """Record a stored image with the job (its object is the caller's to put); returns its key."""
    record, stored = stored_image(job_id, sha, **image)  # type: ignore[arg-type]
    outcome = state.record_downloads(job_id, [DownloadItem(record, stored)], max_images)[0].outcome
    assert outcome is DownloadOutcome.STORED, f"{sha[:12]} was not recorded as stored: {outcome}"
    return stored.key


def crops(job_id: str, sha: str, n: int, *, class_name: str = "dog", score: float = 0.9) -> list[Crop]:
    """``n`` crop records of the stored image ``sha``, with 1-pixel boxes."""
    image_key = keys.image_key(job_id, sha, "JPEG")
    return [
        Crop(job_id=job_id, key=keys.crop_key(job_id, keys.crop_id(sha, i)), crop_id=keys.crop_id(sha, i),
             image_key=image_key, box=(0, 0, 1, 1), padded_box=(0, 0, 1, 1), score=score, class_name=class_name)
        for i in range(n)
    ]  # fmt: skip


EXPORT_THRESHOLD = 0.5  # fill_job's job accepts every other crop at it


def fill_job(state: StateStore, store: ObjectStore, coco128: Coco128, job_id: str) -> dict[str, dict[str, Any]]:
    """Four real photos with their labelled boxes as crops; every other crop accepted; titles on two.

    Returns what each crop should be in an export, by crop id.
    """
    spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="any", threshold=EXPORT_THRESHOLD)
    state.create_job(Job(id=job_id, spec=spec))
    expected: dict[str, dict[str, Any]] = {}
    n = 0
    for i, photo in enumerate(coco128.images[:4]):
        data = photo.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        with Image.open(photo) as im:
            width, height = im.size
            rgb = im.convert("RGB")
        image_key = keys.image_key(job_id, sha, "JPEG")
        store.put(image_key, data)
        candidate = Candidate(
            image_url=f"http://127.0.0.1/{photo.name}", page_url="http://127.0.0.1/", source=SourceKind.SITE,
            title=f"photo {photo.stem}" if i % 2 == 0 else None, license="cc-by", license_url="https://cc/by",
            author=f"Author {i % 2}",
        )  # fmt: skip
        record_stored(state, job_id, sha, size=(width, height), nbytes=len(data), candidate=candidate)
        crops = []
        for j, label in enumerate(coco128.labels(photo)):
            cid = keys.crop_id(sha, j)
            name = label.class_name.replace("_", " ")
            crop = Crop(job_id=job_id, key=keys.crop_key(job_id, cid), crop_id=cid, image_key=image_key,
                        box=label.box, padded_box=label.box, score=0.8, class_name=name)  # fmt: skip
            buffer = io.BytesIO()
            rgb.crop(tuple(round(v) for v in label.box)).save(buffer, "JPEG")
            store.put(crop.key, buffer.getvalue())
            crops.append(crop)
        state.record_detections(job_id, [(image_key, crops)])
        for crop in crops:
            distance = 0.1 + 0.01 * n if n % 2 == 0 else 0.7 + 0.01 * n
            state.record_distances(job_id, [(crop.key, distance)])
            accepted = distance <= EXPORT_THRESHOLD
            expected[crop.crop_id] = {
                "class": crop.class_name, "box": crop.box, "distance": distance, "accepted": accepted,
                "title": candidate.title, "image_size": (width, height), "crop_size": rgb.crop(
                    tuple(round(v) for v in crop.box)).size, "image_url": candidate.image_url, "sha": sha,
                "author": candidate.author,
            }  # fmt: skip
            n += 1
    first = next(iter(expected))
    state.set_feedback(job_id, keys.crop_key(job_id, first), True)
    return expected
