"""Job state: the job record, counters, per-URL outcomes, crops and distances.

The interface and the rules shared by its one implementation,
:class:`~imgsift_common.sqlstate.SqlStateStore`: in SQL on SQLite (the embedded ``imgsift``
command) and PostgreSQL (the services, through
:class:`~imgsift_common.servicestate.ServiceStateStore`, which keeps locks and idempotency
keys in Redis). Every write that moves a counter is "record once": it is keyed by what it
records (a URL, an image key, a crop key) and a second delivery of the same work changes
nothing, so counters cannot drift when a task is redelivered. Distances are stored raw;
accepted = distance <= threshold is decided when read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

from imgsift_common.messages import (
    Candidate,
    Crop,
    DiscoveryReason,
    DownloadOutcome,
    DownloadRecord,
    Job,
    JobState,
    StoredImage,
    utcnow,
)
from imgsift_common.neardup import NearDupQuery


class Counter(StrEnum):
    DISCOVERED = "discovered"
    DOWNLOADED = "downloaded"
    DUPLICATES = "duplicates"
    FAILED = "failed"
    SKIPPED = "skipped"
    DETECTED = "detected"
    CROPS = "crops"
    COMPARED = "compared"
    COMPARE_FAILED = "compare_failed"  # crops lost or undecodable: counted so the job can finish


class Flag(StrEnum):
    DISCOVERY_DONE = "discovery_done"
    DISCOVERY_REASON = "discovery_reason:"  # followed by a DiscoveryReason


def discovery_reason(flags: set[str]) -> DiscoveryReason | None:
    """Why discovery stopped, from a job's flags (None while it goes on)."""
    for flag in flags:
        if flag.startswith(Flag.DISCOVERY_REASON):
            return DiscoveryReason(flag.removeprefix(Flag.DISCOVERY_REASON))
    return None


OUTCOME_COUNTER = {
    DownloadOutcome.STORED: Counter.DOWNLOADED,
    DownloadOutcome.DUPLICATE: Counter.DUPLICATES,
    DownloadOutcome.FAILED: Counter.FAILED,
    DownloadOutcome.SKIPPED: Counter.SKIPPED,
}


def reason_counter(record: DownloadRecord) -> str | None:
    if record.reason is None or record.outcome not in (DownloadOutcome.FAILED, DownloadOutcome.SKIPPED):
        return None
    return f"{record.outcome.value}:{record.reason.value}"


class StreamState(BaseModel):
    """Where one source stream (a source, with one query) stands: resumable by any worker."""

    cursor: str | None = None
    pages: int = 0
    taken: int = 0  # distinct candidate URLs it has given
    exhausted: bool = False
    error: str | None = None
    failures: int = 0  # transient failures in a row (a 429, a 5xx, an outage); reset by a good page
    retry_at: float | None = None  # epoch seconds before which the stream is not asked again (backoff, Retry-After)


@dataclass(frozen=True)
class DistancePage:
    items: list[tuple[str, float]]
    next_after: tuple[float, str] | None


@dataclass(frozen=True)
class DownloadItem:
    """One URL's outcome to record: the record, its stored image (if any) and the image's
    near-duplicate query (if near-duplicates are looked for)."""

    record: DownloadRecord
    image: StoredImage | None = None
    near: NearDupQuery | None = None


@runtime_checkable
class BatchLocks(Protocol):
    """A store that takes and frees many of a job's locks in one round trip, with the rules of
    ``hold_lock`` and ``release_lock`` for each (the services' store: its locks are in Redis).
    The download stage takes a batch's fetch claims so; with any other store, one by one."""

    def hold_locks(self, job_id: str, names: Sequence[str], owner: str, ttl: float) -> list[bool]:
        """``hold_lock`` for each name, in order; whether each is held now."""
        ...

    def release_locks(self, job_id: str, names: Sequence[str], owner: str) -> None: ...


class JobNotFound(KeyError):
    pass


class StateStore(Protocol):
    # jobs
    def create_job(self, job: Job) -> bool: ...
    def get_job(self, job_id: str) -> Job | None: ...
    def save_job(self, job: Job) -> None: ...
    def update_job(self, job_id: str, **changes: object) -> Job: ...
    def list_jobs(self, limit: int = 100, owner: str | None = None) -> list[Job]:
        """The newest jobs first; with ``owner``, only the jobs that API key created."""
        ...

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> Job: ...
    def add_note(self, job_id: str, note: str) -> None: ...
    def notes(self, job_id: str) -> list[str]: ...
    def counters(self, job_id: str) -> dict[str, int]: ...
    def set_flag(self, job_id: str, flag: str) -> None: ...
    def raise_progress(self, job_id: str, fraction: float) -> float: ...
    def hold_lock(self, job_id: str, name: str, owner: str, ttl: float) -> bool: ...
    def set_marker(self, job_id: str, name: str, value: str) -> None: ...
    def get_marker(self, job_id: str, name: str) -> str | None: ...
    def claim_idempotency_key(self, key: str, job_id: str, ttl: float) -> str:
        """Bind ``key`` to ``job_id`` unless it is bound already; the job id it is bound to."""
        ...

    def markers(self, job_id: str, prefix: str) -> dict[str, str]:
        """Every marker of the job whose name starts with ``prefix``."""
        ...

    def release_lock(self, job_id: str, name: str, owner: str) -> None: ...
    def flags(self, job_id: str) -> set[str]: ...
    # crawl
    def enqueue_candidates(self, job_id: str, candidates: Iterable[Candidate]) -> list[Candidate]: ...
    def lease_candidates(self, job_id: str, limit: int, lease_seconds: float) -> list[Candidate]: ...
    def frontier_size(self, job_id: str) -> int: ...
    def stream_state(self, job_id: str, stream_id: str) -> StreamState | None: ...
    def save_stream_state(self, job_id: str, stream_id: str, stream: StreamState) -> None: ...
    def url_record(self, job_id: str, url: str) -> DownloadRecord | None: ...
    def url_records(self, job_id: str, urls: Sequence[str]) -> dict[str, DownloadRecord]:
        """``url_record`` for many URLs in one read: the record of each URL that has one."""
        ...

    def record_download(
        self,
        job_id: str,
        record: DownloadRecord,
        image: StoredImage | None,
        max_images: int,
        *,
        near: NearDupQuery | None = None,
        across_jobs: bool = False,
    ) -> DownloadRecord: ...
    def record_downloads(
        self,
        job_id: str,
        items: Sequence[DownloadItem],
        max_images: int,
        *,
        across_jobs: bool = False,
    ) -> list[DownloadRecord]:
        """``record_download`` for a batch in one write, in order; each item's final record."""
        ...

    def get_image(self, job_id: str, key: str) -> StoredImage | None: ...
    def get_images(self, job_id: str, keys: Iterable[str]) -> dict[str, StoredImage]:
        """``get_image`` for many keys in one read: the image of each key that has one."""
        ...

    def image_keys(self, job_id: str) -> list[str]: ...
    # detect
    def is_detected(self, job_id: str, image_key: str) -> bool: ...
    def detected_count(self, job_id: str, image_key: str) -> int | None: ...
    def detected_counts(self, job_id: str, image_keys: Iterable[str]) -> dict[str, int]:
        """``detected_count`` for many keys in one read: the count of each key recorded as detected."""
        ...

    def record_detection(self, job_id: str, image_key: str, crops: list[Crop]) -> bool: ...
    def record_detections(self, job_id: str, detections: Sequence[tuple[str, list[Crop]]]) -> dict[str, bool]:
        """``record_detection`` for a batch of images in one write; per image key, whether this call recorded it."""
        ...

    def get_crops(self, job_id: str, crop_keys: Iterable[str]) -> list[Crop]: ...
    def crop_keys(self, job_id: str) -> list[str]: ...
    # siamese
    def has_distance(self, job_id: str, crop_key: str) -> bool: ...
    def record_distance(self, job_id: str, crop_key: str, distance: float) -> bool: ...
    def record_distances(self, job_id: str, distances: Iterable[tuple[str, float]]) -> dict[str, bool]:
        """``record_distance`` for a batch in one write; per crop key, whether this call recorded it."""
        ...

    def record_compare_failure(self, job_id: str, crop_key: str) -> bool: ...
    def count_accepted(self, job_id: str, threshold: float) -> int: ...
    def count_below(self, job_id: str, thresholds: list[float]) -> list[int]:
        """For each threshold, how many crops have a distance <= it (one round trip)."""
        ...

    def distances_of(self, job_id: str, crop_keys: list[str]) -> dict[str, float]: ...
    def distances(self, job_id: str) -> list[tuple[str, float]]: ...
    def distance_page(
        self,
        job_id: str,
        *,
        max_distance: float | None = None,
        min_distance_exclusive: float | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> DistancePage: ...
    # reset (embedded re-runs with another detector or scorer)
    def unfinished_work(self, job_id: str) -> tuple[list[str], list[str]]:
        """Stored images not yet detected, and crops with neither a distance nor a failure."""
        ...

    def set_feedback(self, job_id: str, crop_key: str, correct: bool | None) -> None:
        """A user's mark on a crop: right (True), wrong (False), or no mark (None)."""
        ...

    def feedback(self, job_id: str) -> dict[str, bool]: ...

    def reset_detections(self, job_id: str) -> None: ...
    def reset_distances(self, job_id: str) -> None: ...


def updated_job(job: Job, changes: dict[str, object]) -> Job:
    # The state has its own rules (set_job_state); an update never rewrites it.
    if "state" in changes or "id" in changes:
        raise ValueError("update_job changes neither the state nor the id; use set_job_state")
    return job.model_copy(update={**changes, "updated_at": utcnow()})


def finalised_job(job: Job, state: JobState, error: str | None) -> Job:
    # A final state is final: a late task cannot turn "cancelled" back into "completed".
    if job.state.is_final and state is not job.state:
        return job
    return job.model_copy(update={"state": state, "error": error or job.error, "updated_at": utcnow()})
