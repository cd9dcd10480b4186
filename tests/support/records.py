"""Records as the workers write them: a stored image with its download record, and its crops.

One place for the tests and benchmarks that need a job with stored images or crops without
running the crawler or the detector first.
"""

from __future__ import annotations

from imgsift_common import keys
from imgsift_common.messages import Candidate, Crop, DownloadOutcome, DownloadRecord, SourceKind, StoredImage, utcnow
from imgsift_common.state import StateStore


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
    outcome = state.record_download(job_id, record, stored, max_images).outcome
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
