"""Job state: the names and records shared by the store and its callers.

The store is :class:`~imgsift_common.sqlstate.SqlStateStore` (its type is named
:data:`~imgsift_common.sqlstate.StateStore`): in SQL on SQLite (the embedded ``imgsift``
command) and PostgreSQL (the services, through
:class:`~imgsift_common.servicestate.ServiceStateStore`, which keeps locks and idempotency
keys in Redis). Every write that moves a counter is "record once": it is keyed by what it
records (a URL, an image key, a crop key) and a second delivery of the same work changes
nothing, so counters cannot drift when a task is redelivered. Distances are stored raw;
accepted = distance <= threshold is decided when read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

from imgsift_common.messages import DiscoveryReason, DownloadRecord, StoredImage
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
