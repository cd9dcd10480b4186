"""Stored trunk features: each image's pooled MobileNet features, computed once per trunk.

The trunk (backbone, weights, input size, preprocessing) is frozen; only the head changes
when a job is fine-tuned. So the trunk's pooled features (1280 numbers for MobileNetV2,
stored as float16: 2.5 KB a crop) are kept in the object store, and scoring a crop again,
with a new head or after a redelivery, is the head and a matrix product on stored rows.

Layout (see docs/siamese.md for the reasons):

- ``jobs/{job}/features/{trunk_id}/crops/{digest}.npz``: the rows of one compare batch, named
  by the hash of the batch's crop keys, so a redelivered batch finds them with one read, and
  a re-score lists the prefix (one object per batch: about 3,000 objects for 100,000 crops).
- ``jobs/{job}/features/{trunk_id}/sets/{digest}.npz``: the rows of a set of images (the
  references, the "not this" images, the crops marked wrong), named by the hash of their keys.

Each object is an ``.npz`` (no pickle) holding its format tag, the trunk id, the digest it is
named by, the keys, each row's source (what the crop was cut from; see ``compare``) and the
rows. A reader trusts an object only if all of these agree with what it expects; anything
else (torn, foreign, another trunk's, copied under another name) is recomputed and replaced.
Writes are whole objects (S3 PUT, or rename in the local store), so a reader never sees half
of one; two workers writing the same batch write equivalent rows, and either copy is right.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import zipfile
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from imgsift_common.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

FORMAT = "imgsift-features-1"
# Part of every trunk id: raise it when preprocessing changes what the trunk sees.
PREPROCESSING_VERSION = "letterbox-imagenet-2"  # 2: JPEGs decoded at a reduced scale (draft)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FeatureRows:
    """Feature rows ``(n, f)`` float32 of ``keys``, each with the source it was computed from."""

    keys: list[str]
    sources: list[str]
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def digest(keys: Iterable[str]) -> str:
    """The name of the object holding the features of ``keys``: a hash of the set of keys, in any order."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:32]


def storable(rows: np.ndarray) -> np.ndarray:
    """``rows`` as they are stored: float16 (half the bytes; rows of pooled ReLU6 features lose
    about 1e-4 in a distance), float32 where a value does not fit float16."""
    with np.errstate(over="ignore"):
        half = np.asarray(rows, dtype=np.float32).astype(np.float16)
    return half if np.isfinite(half).all() else np.asarray(rows, dtype=np.float32)


def as_stored(rows: np.ndarray) -> np.ndarray:
    """``rows`` rounded as storing them rounds them, in float32: a crop scores the same whether
    its features were just computed or read back."""
    return storable(rows).astype(np.float32)


def encode(trunk_id: str, name: str, features: FeatureRows) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.array(FORMAT),
        trunk_id=np.array(trunk_id),
        digest=np.array(name),
        keys=np.array(features.keys, dtype=str),
        sources=np.array(features.sources, dtype=str),
        rows=storable(features.rows),
    )
    return buffer.getvalue()


def decode(data: bytes, *, trunk_id: str, name: str, dim: int) -> FeatureRows:
    """The rows in ``data``; ValueError says why they cannot be trusted."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            fields = {field: saved[field] for field in ("format", "trunk_id", "digest", "keys", "sources", "rows")}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if str(fields["format"]) != FORMAT:
        raise ValueError(f"format {fields['format']!s:.40} is not {FORMAT}")
    if str(fields["trunk_id"]) != trunk_id:
        raise ValueError(f"made by trunk {fields['trunk_id']!s:.40}, not {trunk_id}")
    if str(fields["digest"]) != name:
        raise ValueError("named for other keys")
    keys, sources, rows = fields["keys"], fields["sources"], fields["rows"]
    if keys.ndim != 1 or keys.dtype.kind != "U" or sources.shape != keys.shape or sources.dtype.kind != "U":
        raise ValueError("keys or sources of the wrong type")
    if rows.dtype not in (np.float16, np.float32) or rows.shape != (len(keys), dim):
        raise ValueError(f"rows {rows.dtype}{rows.shape} where float16 ({len(keys)}, {dim}) was expected")
    if not np.isfinite(rows).all():
        raise ValueError("rows that are not finite")
    return FeatureRows([str(k) for k in keys], [str(s) for s in sources], rows.astype(np.float32))


def read(store: ObjectStore, key: str, *, trunk_id: str, dim: int, job_id: str) -> FeatureRows | None:
    """The rows stored at ``key``; None when there are none or they cannot be trusted (logged)."""
    try:
        data = store.get(key)
    except ObjectNotFound:
        return None
    try:
        return decode(data, trunk_id=trunk_id, name=object_name(key), dim=dim)
    except ValueError as exc:
        log.warning("stored features not trusted; recomputed", extra={"job_id": job_id, "key": key, "reason": str(exc)})
        return None


def write(store: ObjectStore, key: str, trunk_id: str, features: FeatureRows) -> None:
    store.put(key, encode(trunk_id, object_name(key), features), "application/octet-stream")


def object_name(key: str) -> str:
    """The digest an object key is named by (``.../{digest}.npz``)."""
    return key.rsplit("/", 1)[-1].removesuffix(".npz")


# The process's read pools, by thread count: started once, not per batch (starting four threads
# took a compare batch milliseconds on a loaded 2-core machine). Keyed by process id too, so a
# forked worker child starts its own rather than using threads it did not inherit.
_pools: dict[tuple[int, int, str], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def read_pool(threads: int, purpose: str = "read") -> ThreadPoolExecutor:
    """The process's pool of ``threads`` threads for ``purpose`` (work of another purpose, queued
    in its own pool, does not wait behind this one's)."""
    key = (os.getpid(), max(1, threads), purpose)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(max_workers=key[1], thread_name_prefix=f"imgsift-siamese-{purpose}")
        return pool


def prefetch(
    function: Callable[[T], R], items: Iterable[T], threads: int, ahead: int | None = None
) -> Generator[R, None, None]:
    """``function`` of each item, in order, computed by ``threads`` threads up to ``ahead`` items in advance.

    An exception of ``function`` is raised where its item comes; work not yet started is dropped,
    and work started is waited for, so nothing of it runs on once the generator is closed.
    """
    fetched = Prefetched(function, items, threads, ahead)
    try:
        yield from fetched
    finally:
        fetched.close()


class Prefetched(Iterator[R]):
    """:func:`prefetch` started at once: the first ``ahead`` items are submitted when it is made, so
    the pool works on them while its maker does something else. ``close`` it when done."""

    def __init__(self, function: Callable[[T], R], items: Iterable[T], threads: int, ahead: int | None = None) -> None:
        self.ahead = max(1, ahead if ahead is not None else 2 * threads)
        self.pool = read_pool(threads)
        self.function: Callable[[Any], R] = function
        self.items: Iterator[Any] = iter(items)
        self.pending: deque[Future[R]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) <= self.ahead:
            item = next(self.items, _END)
            if item is _END:
                return
            self.pending.append(self.pool.submit(self.function, item))

    def __next__(self) -> R:
        if not self.pending:
            raise StopIteration
        result = self.pending.popleft().result()
        self._fill()
        return result

    def close(self) -> None:
        """Drop the work not yet started, and wait for the work started."""
        for future in self.pending:
            future.cancel()
        wait(self.pending)
        self.pending.clear()
        self.items = iter(())


_END = object()
