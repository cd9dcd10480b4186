"""The job state in SQL: the store (:class:`SqlStateStore`, named :data:`StateStore` by its callers),
one implementation for SQLite (the embedded ``imgsift`` command) and PostgreSQL (the services), over
SQLAlchemy Core.

The rules of :mod:`imgsift_common.state`, kept by the database:

- Record once: each outcome has a unique key (a URL, an image key, a crop key), and the write
  is ``INSERT ... ON CONFLICT DO NOTHING``; the counters move in the same transaction, and only
  when that insert inserted a row, so a redelivered task changes nothing.
- Counters and histogram bins are added up during a transaction and written at its end, in a
  fixed order, so two transactions never wait for each other's rows in opposite orders.
- The decisions that read before they write (the image limit, exact and near-duplicate
  dedup, superseding) are serialised per job by a lock on the job's ``downloaded`` counter
  row (``FOR NO KEY UPDATE``); the writes that superseding takes back (detections, distances,
  compare failures) hold a shared lock on it (``FOR KEY SHARE``), which does not wait for a
  download batch, and a supersede takes the row alone (``FOR UPDATE``), so it never misses work
  that lands at the same moment. SQLite has one writer at a time and takes its lock at ``BEGIN``.
- Distances are counted at any threshold without reading them: a per-job histogram of
  :data:`BINS` bins over [0, 2] (ten per step of the calibration grid, whose thresholds are bin
  edges), written with each distance, gives the count below a bin's lower edge, and an indexed
  range count covers the one bin the threshold falls in (at 10 million crops, a few thousand
  index entries).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
import time
import zlib
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from imgsift_common import keys
from imgsift_common import schema as t
from imgsift_common.calibration import GRID, MAX_DISTANCE
from imgsift_common.messages import (
    Candidate,
    Crop,
    DownloadOutcome,
    DownloadRecord,
    FailureReason,
    Job,
    JobState,
    StoredImage,
    utcnow,
)
from imgsift_common.neardup import NearDupQuery, band_radii, hamming, within
from imgsift_common.sqldialect import WRITE, insert, insert_rows, make_engine, one_of, rows_params, snapshot
from imgsift_common.state import Counter, DownloadItem, StreamState

CHUNK = 500  # rows or keys per statement: well under SQLite's 32,766 bound parameters

BINS = 10 * GRID
# Bin b holds the distances in (EDGES[b - 1], EDGES[b]]; the first and last bins are open-ended.
# Closed above, so the count at a threshold that is an edge (every calibration grid threshold)
# is the bins' sum alone.
EDGES = [MAX_DISTANCE * i / BINS for i in range(1, BINS)]

# Above this per-band radius (near-duplicate distances of 20 bits or more) the band lookup
# would return a third of the job or more, so the job's hashes are read instead.
MAX_BAND_RADIUS = 4


class JobNotFound(KeyError):
    pass


@dataclass(frozen=True)
class DistancePage:
    items: list[tuple[str, float]]
    next_after: tuple[float, str] | None


def distance_bin(distance: float) -> int:
    """The histogram bin of a distance: how many bin edges lie below it."""
    return bisect_left(EDGES, distance)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _url_id(url: str) -> bytes:
    """A URL's id in the per-image tables: the first 16 bytes of its SHA-256 (no collision in any
    job's lifetime: 2^64 URLs would give one even odds)."""
    return _digest(url)[:16]


def _duplicate_row(job: int, kept_url: str, url: str) -> dict[str, Any]:
    """The row that files ``url`` as a duplicate of the copy kept at ``kept_url``."""
    return {"job": job, "kept_digest": _url_id(kept_url), "url_digest": _url_id(url)}


# ---------------------------------------------------------------------------- compact ids
#
# An image's or a crop's key is kept as bytes that rebuild it: for keys laid out as keys.py lays
# them out (the only ones the workers write), the image hash's first 12 bytes (and for a crop
# its index as 2 bytes), so that bytes order is key order; any other key as FOREIGN + its UTF-8
# bytes (never 12 or 14 bytes long, so the two kinds never meet).

FOREIGN = b"\xff" * 15
_HEX_RE = r"[0-9a-f]"


@functools.lru_cache(maxsize=64)
def _patterns(job_id: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    job = re.escape(job_id)
    image = re.compile(rf"jobs/{job}/images/({_HEX_RE}{{64}})\.([a-z]+)")
    crop = re.compile(rf"jobs/{job}/crops/({_HEX_RE}{{24}})-(\d{{3}})\.jpg")
    return image, crop


def image_id(job_id: str, key: str) -> tuple[bytes, bytes | None]:
    """An image key's id and the tail that rebuilds the key with it (None: the id holds the key)."""
    if m := _patterns(job_id)[0].fullmatch(key):
        sha = bytes.fromhex(m[1])
        return sha[:12], sha[12:] + m[2].encode()
    return FOREIGN + key.encode(), None


def image_key_of(job_id: str, image: bytes, tail: bytes | None) -> str:
    if tail is None:
        return image[len(FOREIGN) :].decode()
    return f"jobs/{job_id}/images/{(image + tail[:20]).hex()}.{tail[20:].decode()}"


def crop_id(job_id: str, key: str) -> bytes:
    """A crop key's id (see above); a crop of keys.py's layout: its image's id + its index."""
    if m := _patterns(job_id)[1].fullmatch(key):
        return bytes.fromhex(m[1]) + int(m[2]).to_bytes(2, "big")
    return FOREIGN + key.encode()


def crop_key_of(job_id: str, crop: bytes) -> str:
    if crop.startswith(FOREIGN):
        return crop[len(FOREIGN) :].decode()
    return f"jobs/{job_id}/crops/{crop[:12].hex()}-{int.from_bytes(crop[12:], 'big'):03d}.jpg"


def _prefix(job_id: str, key: str) -> bytes | None:
    """The image hash prefix (12 bytes) an image or crop key of keys.py's layout names."""
    ident = crop_id(job_id, key) if "/crops/" in key else image_id(job_id, key)[0]
    return None if ident.startswith(FOREIGN) else ident[:12]


# The record types the compact rows rebuild: a new field must get a column here too.
assert set(StoredImage.model_fields) == {
    "job_id", "key", "sha256", "width", "height", "format", "bytes", "fetched_at", "provenance", "phash"
}, "StoredImage changed: add its new fields to schema.kept_images"  # fmt: skip
assert set(Candidate.model_fields) == {
    "image_url", "page_url", "source", "title", "license", "license_url", "author"
}, "Candidate changed: add its new fields to schema.kept_images"  # fmt: skip
assert set(Crop.model_fields) == {
    "job_id", "key", "crop_id", "image_key", "box", "padded_box", "score", "class_name", "whole_image"
}, "Crop changed: add its new fields to schema.detected_images (sqlstate.pack_crops)"  # fmt: skip


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _bands(phash: int) -> list[int]:
    mask = (1 << t.PHASH_BAND_BITS) - 1
    return [(phash >> (t.PHASH_BAND_BITS * i)) & mask for i in range(t.PHASH_BANDS)]


@functools.cache
def _flips(radius: int) -> list[int]:
    """The masks that flip at most ``radius`` of a band's bits (none for -1: the band is not probed)."""
    return within(0, t.PHASH_BAND_BITS, radius) if radius >= 0 else []


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _by_ids(conn: Connection, query: Any, ids: Iterable[Any], **params: Any) -> list[Any]:
    """The rows of ``query`` for ``ids`` (its ``:ids`` parameter): a statement per CHUNK of them, in id order."""
    return [row for chunk in _chunks(sorted(set(ids))) for row in conn.execute(query, {"ids": chunk, **params})]


def _put_job(conn: Connection, job: Job) -> Job:
    conn.execute(sa.update(t.jobs).where(t.jobs.c.id == job.id).values(body=job.model_dump_json(), owner=job.owner))
    return job


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no offset: every time is written in UTC so that they sort.
    return moment.astimezone(UTC) if moment.tzinfo else moment


def _insert(
    conn: Connection,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    *,
    update: Sequence[str] = (),
    add: str = "",
    returning: sa.ColumnElement[Any] | None = None,
) -> list[Any]:
    """Insert ``rows`` (in the order given: callers sort them by key, a fixed lock order; the first
    column the same in every row), leaving a row whose key is taken as it is, or setting its
    ``update`` columns to the new row's, or adding its ``add`` column to its own; the ``returning``
    column (by default the key's first) of the rows inserted or updated. One statement for any
    number of rows (:func:`sqldialect.insert_rows`), built once."""
    if not rows:
        return []
    dialect = conn.dialect.name
    name = returning.name if returning is not None else ""
    stmt = _insert_statement(dialect, table, tuple(rows[0]), tuple(update), add, name)
    return list(conn.execute(stmt, rows_params(dialect, rows)).scalars())


@functools.cache
def _insert_statement(
    dialect: str, table: sa.Table, names: tuple[str, ...], update: tuple[str, ...], add: str, returning: str
) -> Any:
    stmt = insert_rows(dialect, table, names)
    keys = [col.name for col in table.primary_key.columns]
    if add:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={add: table.c[add] + stmt.excluded[add]})
    elif update:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={name: stmt.excluded[name] for name in update})
    else:
        stmt = stmt.on_conflict_do_nothing()
    # RETURNING even where the caller needs nothing back: without it SQLAlchemy hands SQLite's
    # driver an executemany, one statement per row, instead of its multi-row pages.
    return stmt.returning(table.c[returning or keys[0]])


_S = TypeVar("_S")
_JOB: sa.BindParameter[int] = sa.bindparam("job")  # the job's number, in the statements built once
_STATEMENTS: dict[tuple[str, Any], Any] = {}


def _cached(conn: Connection, key: Any, build: Callable[[], _S]) -> _S:
    """The statement ``build`` makes, built once per database kind and ``key`` (its values are all
    named bind parameters, given when it runs): SQLAlchemy then neither builds it nor its cache key
    again, most of its client CPU per statement."""
    found = _STATEMENTS.get((conn.dialect.name, key))
    if found is None:
        found = _STATEMENTS[conn.dialect.name, key] = build()
    return found


OUTCOME_COUNTER = {
    DownloadOutcome.STORED: Counter.DOWNLOADED,
    DownloadOutcome.DUPLICATE: Counter.DUPLICATES,
    DownloadOutcome.FAILED: Counter.FAILED,
    DownloadOutcome.SKIPPED: Counter.SKIPPED,
}
RANGES_PER_QUERY = 200  # range counts per statement (PostgreSQL allows 1,664 columns)


@functools.lru_cache(maxsize=RANGES_PER_QUERY)
def _range_counts(n: int) -> sa.Select[Any]:
    """One row of ``n`` counts of a job's distances in (low{i}, high{i}]; built once per ``n``."""
    c = t.crop_distances.c
    counts = (
        sa.select(sa.func.count())
        .where(c.job == _JOB, c.distance > sa.bindparam(f"low{i}"), c.distance <= sa.bindparam(f"high{i}"))
        .scalar_subquery()
        .label(f"n{i}")
        for i in range(n)
    )
    return sa.select(*counts)


@dataclass
class _Tx:
    """One write transaction of one job: its connection, and the counter and bin deltas it makes."""

    conn: Connection
    job_id: str
    job: int = 0  # the job's number, where the transaction writes per-image tables
    counts: Tally[str] = field(default_factory=Tally)
    bins: Tally[int] = field(default_factory=Tally)

    def incr(self, name: str, by: int = 1) -> None:
        self.counts[name] += by

    def add_distance(self, distance: float, by: int = 1) -> None:
        self.bins[distance_bin(distance)] += by

    def flush(self) -> None:
        """Add the deltas to the rows (inserting those missing): counters, then bins, each in key order (a
        fixed lock order)."""
        for table, key, column, deltas in (
            (t.job_counters, "name", "value", self.counts),
            (t.distance_bins, "bin", "crops", self.bins),
        ):
            rows = [{"job_id": self.job_id, key: k, column: v} for k, v in sorted(deltas.items()) if v]
            _insert(self.conn, table, rows, add=column)


@dataclass(frozen=True)
class _Kept:
    """A kept image's perceptual-hash row: what a larger near-duplicate needs to replace it."""

    sha: bytes
    pixels: int
    image_key: str
    url: str


class SqlStateStore:
    """Job state in SQL tables (see :mod:`imgsift_common.schema`), on SQLite or PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._numbers: dict[str, int] = {}  # job id -> number, once given (never changes)

    @classmethod
    def open(cls, url: str | sa.URL, *, migrate: bool = False) -> SqlStateStore:
        """The store at ``url``; migrated first if asked, and refused unless at this code's schema."""
        engine = make_engine(url)
        try:
            if migrate:
                t.migrate(engine)
            t.check_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @classmethod
    def sqlite(cls, path: str | Path) -> SqlStateStore:
        """The embedded mode's store: one SQLite file, created or migrated on open."""
        return cls.open(sa.URL.create("sqlite", database=str(path)), migrate=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self, job_id: str = "", *, numbered: bool = False) -> Iterator[_Tx]:
        """A write transaction of ``job_id``; ``numbered``: it writes per-image tables (``tx.job``)."""
        job = self._number(job_id, create=True) or 0 if numbered else 0
        with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
            tx = _Tx(conn, job_id, job)
            yield tx
            tx.flush()

    def _number(self, job_id: str, *, create: bool = False) -> int | None:
        """The job's number in the per-image tables (None: the job has recorded none), given on first use."""
        if (known := self._numbers.get(job_id)) is not None:
            return known
        n = t.job_numbers.c
        with self.engine.connect().execution_options(**(WRITE if create else {})) as conn, conn.begin():
            if create:
                conn.execute(insert(conn, t.job_numbers).values(job_id=job_id).on_conflict_do_nothing())
            found = conn.execute(sa.select(n.num).where(n.job_id == job_id)).scalar()
        if found is not None:
            self._numbers[job_id] = int(found)
        return found

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _scalar(self, query: sa.Select[Any]) -> Any:
        with self._read() as conn:
            return conn.execute(query).scalar()

    @staticmethod
    def _gate(tx: _Tx, mode: str) -> int:
        """Lock the job's ``downloaded`` counter row (see the module docstring); its value.

        ``share``: a write downstream of the crawl (detections, distances, compare failures);
        ``decide``: a download batch's dedup and limit decisions, one batch of the job at a time,
        beside the shared holders; ``exclusive``: a supersede or a reset, alone (it waits for the
        shared holders and makes new ones wait). A batch that supersedes goes from ``decide`` to
        ``exclusive`` in its transaction."""
        c = t.job_counters.c
        read, key_share = {"share": (True, True), "decide": (False, True), "exclusive": (False, False)}[mode]
        query = _cached(
            tx.conn,
            ("gate", mode),
            lambda: (
                sa.select(c.value)
                .where(c.job_id == sa.bindparam("job_id"), c.name == Counter.DOWNLOADED.value)
                .with_for_update(read=read, key_share=key_share)
            ),
        )
        if (value := tx.conn.execute(query, {"job_id": tx.job_id}).scalar()) is None:  # the job's first write
            row = {"job_id": tx.job_id, "name": Counter.DOWNLOADED.value, "value": 0}
            tx.conn.execute(insert(tx.conn, t.job_counters).values(row).on_conflict_do_nothing())
            value = tx.conn.execute(query, {"job_id": tx.job_id}).scalar_one()
        return int(value)

    # ------------------------------------------------------------------ jobs
    def create_job(self, job: Job) -> bool:
        row = {"id": job.id, "owner": job.owner, "created_at": _utc(job.created_at), "body": job.model_dump_json()}
        with self._write() as tx:
            return bool(_insert(tx.conn, t.jobs, [row], returning=t.jobs.c.id))

    def get_job(self, job_id: str) -> Job | None:
        body = self._scalar(sa.select(t.jobs.c.body).where(t.jobs.c.id == job_id))
        return Job.model_validate_json(body) if body is not None else None

    def save_job(self, job: Job) -> None:
        with self._write() as tx:
            _put_job(tx.conn, job.model_copy(update={"updated_at": utcnow()}))

    def _locked_job(self, tx: _Tx, job_id: str) -> Job:
        body = tx.conn.execute(sa.select(t.jobs.c.body).where(t.jobs.c.id == job_id).with_for_update()).scalar()
        if body is None:
            raise JobNotFound(job_id)
        return Job.model_validate_json(body)

    def update_job(self, job_id: str, **changes: object) -> Job:
        # The state has its own rules (set_job_state); an update never rewrites it.
        if "state" in changes or "id" in changes:
            raise ValueError("update_job changes neither the state nor the id; use set_job_state")
        with self._write() as tx:
            new = self._locked_job(tx, job_id).model_copy(update={**changes, "updated_at": utcnow()})
            return _put_job(tx.conn, new)

    def list_jobs(self, limit: int = 100, owner: str | None = None) -> list[Job]:
        """The newest jobs first; with ``owner``, only the jobs that API key created."""
        query = sa.select(t.jobs.c.body).order_by(t.jobs.c.created_at.desc(), t.jobs.c.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(t.jobs.c.owner == owner)
        with self._read() as conn:
            return [Job.model_validate_json(body) for body in conn.execute(query).scalars()]

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> Job:
        with self._write() as tx:
            job = self._locked_job(tx, job_id)
            # A final state is final: a late task cannot turn "cancelled" back into "completed".
            if job.state.is_final and state is not job.state:
                return job
            return _put_job(
                tx.conn, job.model_copy(update={"state": state, "error": error or job.error, "updated_at": utcnow()})
            )

    def add_note(self, job_id: str, note: str) -> None:
        row = {"job_id": job_id, "digest": _digest(note), "note": note, "noted_at": utcnow()}
        with self._write(job_id) as tx:
            _insert(tx.conn, t.job_notes, [row])

    def notes(self, job_id: str) -> list[str]:
        c = t.job_notes.c
        with self._read() as conn:
            query = sa.select(c.note).where(c.job_id == job_id).order_by(c.noted_at, c.digest)
            return list(conn.execute(query).scalars())

    def counters(self, job_id: str) -> dict[str, int]:
        c = t.job_counters.c
        with self._read() as conn:
            rows = conn.execute(sa.select(c.name, c.value).where(c.job_id == job_id, c.value != 0))
            return {name: int(value) for name, value in rows}

    def set_flag(self, job_id: str, flag: str) -> None:
        with self._write(job_id) as tx:
            _insert(tx.conn, t.job_flags, [{"job_id": job_id, "name": flag}])

    def flags(self, job_id: str) -> set[str]:
        with self._read() as conn:
            return set(conn.execute(sa.select(t.job_flags.c.name).where(t.job_flags.c.job_id == job_id)).scalars())

    def hold_lock(self, job_id: str, name: str, owner: str, ttl: float) -> bool:
        """Take a free or expired lock, or keep one we hold (one conditional upsert)."""
        now = time.time()
        with self._write(job_id) as tx:
            stmt = insert(tx.conn, t.job_locks).values(job_id=job_id, name=name, owner=owner, expires_at=now + ttl)
            held = t.job_locks.c
            stmt = stmt.on_conflict_do_update(
                index_elements=["job_id", "name"],
                set_={"owner": stmt.excluded.owner, "expires_at": stmt.excluded.expires_at},
                where=(held.owner == owner) | (held.expires_at <= now),
            )
            return tx.conn.execute(stmt.returning(held.name)).first() is not None

    def release_lock(self, job_id: str, name: str, owner: str) -> None:
        c = t.job_locks.c
        with self._write(job_id) as tx:
            tx.conn.execute(sa.delete(t.job_locks).where(c.job_id == job_id, c.name == name, c.owner == owner))

    def set_marker(self, job_id: str, name: str, value: str) -> None:
        with self._write(job_id) as tx:
            _insert(tx.conn, t.job_markers, [{"job_id": job_id, "name": name, "value": value}], update=["value"])

    def get_marker(self, job_id: str, name: str) -> str | None:
        c = t.job_markers.c
        value = self._scalar(sa.select(c.value).where(c.job_id == job_id, c.name == name))
        return str(value) if value is not None else None

    def markers(self, job_id: str, prefix: str) -> dict[str, str]:
        """Every marker of the job whose name starts with ``prefix``."""
        c = t.job_markers.c
        # substr, not LIKE: LIKE would read % and _ in the prefix, and SQLite's ignores case.
        query = sa.select(c.name, c.value).where(c.job_id == job_id, sa.func.substr(c.name, 1, len(prefix)) == prefix)
        with self._read() as conn:
            return {name: value for name, value in conn.execute(query)}

    def claim_idempotency_key(self, key: str, job_id: str, ttl: float) -> str:
        """Bind ``key`` to ``job_id`` unless it is bound already; the job id it is bound to."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.time()
        c = t.idempotency_keys.c
        with self._write() as tx:
            tx.conn.execute(sa.delete(t.idempotency_keys).where(c.expires_at < now))
            _insert(tx.conn, t.idempotency_keys, [{"key": digest, "job_id": job_id, "expires_at": now + ttl}])
            return str(tx.conn.execute(sa.select(c.job_id).where(c.key == digest)).scalar_one())

    def raise_progress(self, job_id: str, fraction: float) -> float:
        with self._write(job_id) as tx:
            stmt = insert(tx.conn, t.job_progress).values(job_id=job_id, fraction=float(fraction))
            held = t.job_progress.c.fraction
            highest = sa.case((stmt.excluded.fraction > held, stmt.excluded.fraction), else_=held)
            stmt = stmt.on_conflict_do_update(index_elements=["job_id"], set_={"fraction": highest})
            return float(tx.conn.execute(stmt.returning(held)).scalar_one())

    # ------------------------------------------------------------------ crawl
    def enqueue_candidates(self, job_id: str, candidates: Iterable[Candidate]) -> list[Candidate]:
        by_url = {c.image_url: c for c in candidates}
        if not by_url:
            return []
        digests = {url: _digest(url) for url in by_url}
        with self._write(job_id) as tx:
            # In one order, so two writers of overlapping batches wait rather than deadlock.
            seen = [{"job_id": job_id, "url_digest": d} for d in sorted(digests.values())]
            new = set(_insert(tx.conn, t.crawl_seen, seen, returning=t.crawl_seen.c.url_digest))
            fresh = [c for url, c in by_url.items() if digests[url] in new]
            rows = [
                {"job_id": job_id, "url_digest": digests[c.image_url], "body": c.model_dump_json(), "lease_until": 0.0}
                for c in fresh
            ]
            _insert(tx.conn, t.crawl_frontier, rows)  # in discovery order: the ids lease oldest first
            tx.incr(Counter.DISCOVERED, len(fresh))
        return fresh

    def lease_candidates(self, job_id: str, limit: int, lease_seconds: float) -> list[Candidate]:
        now = time.time()
        c = t.crawl_frontier.c
        with self._write(job_id) as tx:
            # SKIP LOCKED: two PostgreSQL workers leasing at once take different URLs.
            query = (
                sa.select(c.id, c.body)
                .where(c.job_id == job_id, c.lease_until <= now)
                .order_by(c.lease_until, c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            rows = tx.conn.execute(query).all()
            for chunk in _chunks([row.id for row in rows]):
                tx.conn.execute(
                    sa.update(t.crawl_frontier).where(c.id.in_(chunk)).values(lease_until=now + lease_seconds)
                )
        return [Candidate.model_validate_json(row.body) for row in rows]

    def frontier_size(self, job_id: str) -> int:
        c = t.crawl_frontier.c
        return int(self._scalar(sa.select(sa.func.count()).select_from(t.crawl_frontier).where(c.job_id == job_id)))

    def stream_state(self, job_id: str, stream_id: str) -> StreamState | None:
        c = t.crawl_streams.c
        body = self._scalar(sa.select(c.body).where(c.job_id == job_id, c.stream_id == stream_id))
        return StreamState.model_validate_json(body) if body is not None else None

    def save_stream_state(self, job_id: str, stream_id: str, stream: StreamState) -> None:
        row = {"job_id": job_id, "stream_id": stream_id, "body": stream.model_dump_json()}
        with self._write(job_id) as tx:
            _insert(tx.conn, t.crawl_streams, [row], update=["body"])

    def url_records(self, job_id: str, urls: Sequence[str]) -> dict[str, DownloadRecord]:
        """The records of those of ``urls`` that have one, in one read (a statement per CHUNK URLs)."""
        if not urls or (job := self._number(job_id)) is None:
            return {}
        by_id = {_url_id(url): url for url in urls}
        with self._read() as conn:
            return {by_id[ident]: record for ident, record in _outcomes(conn, job, job_id, by_id).items()}

    def record_downloads(
        self,
        job_id: str,
        items: Sequence[DownloadItem],
        max_images: int,
        *,
        across_jobs: bool = False,
    ) -> list[DownloadRecord]:
        """Record each URL's outcome once, a batch (a download task's URLs) in one transaction; dedupe a
        stored image exactly, across jobs if asked, and by near hash (the item's ``near``).

        The outcome is what recording the items one after another would give, each seeing the
        ones before it; the reads and writes are made per batch, not per item: one claim of
        every URL, one lookup of the batch's hashes (exact, across jobs, near), one write per
        table at the end. Each item's final record, in order.
        """
        if not items:
            return []
        with self._write(job_id, numbered=True) as tx:
            return _Downloads(self, tx, max_images, across_jobs).record(items)

    @staticmethod
    def _supersede(tx: _Tx, old: _Kept, url: str, distance: int) -> None:
        """The kept copy ``old`` becomes a duplicate of the larger one at ``url``, downstream included."""
        SqlStateStore._gate(tx, "exclusive")  # work downstream in flight on the old copy ends first
        conn, job_id, job = tx.conn, tx.job_id, tx.job
        dup = t.duplicates.c
        old_digest, new_digest = _url_id(old.url), _url_id(url)
        # It and every copy filed under it now point at the new copy: one keeper per group.
        members = conn.execute(sa.select(dup.url_digest).where(dup.job == job, dup.kept_digest == old_digest))
        group = _outcomes(conn, job, job_id, [old_digest, *members.scalars()])
        moved = {"outcome": DownloadOutcome.DUPLICATE, "hamming": distance}  # the old copy's own record
        for digest, record in group.items():
            group[digest] = record.model_copy(update={"duplicate_of": url} | (moved if digest == old_digest else {}))
        _rewrite(conn, job, group)
        conn.execute(
            sa.update(t.duplicates).where(dup.job == job, dup.kept_digest == old_digest).values(kept_digest=new_digest)
        )
        _insert(conn, t.duplicates, [_duplicate_row(job, url, old.url)])
        k = t.kept_images.c
        conn.execute(sa.delete(t.kept_images).where(k.sha == old.sha, k.job == job))
        replaced = {"job": job, "prefix": old.sha[:12], "sha": old.sha, "url": url}
        _insert(conn, t.superseded, [replaced], update=["sha", "url"])
        tx.incr(Counter.DOWNLOADED, -1)
        tx.incr(Counter.DUPLICATES)
        det = t.detected_images.c
        found = conn.execute(sa.select(det.crops, det.packed).where(det.job == job, det.image == old.sha[:12])).first()
        if found is None:
            return
        tx.incr(Counter.DETECTED, -1)
        tx.incr(Counter.CROPS, -int(found.crops))
        crops = crop_ids(old.sha, found.packed)
        cd, failed = t.crop_distances.c, t.compare_failures.c
        scored = sa.delete(t.crop_distances).where(cd.job == job, one_of(conn, cd.crop, "ids"))
        for (value,) in _by_ids(conn, scored.returning(cd.distance), crops):
            tx.incr(Counter.COMPARED, -1)
            tx.add_distance(value, -1)
        lost = sa.delete(t.compare_failures).where(failed.job == job, one_of(conn, failed.crop, "ids"))
        tx.incr(Counter.COMPARE_FAILED, -len(_by_ids(conn, lost.returning(failed.crop), crops)))

    def get_images(self, job_id: str, keys_: Iterable[str]) -> dict[str, StoredImage]:
        """The kept images of those keys that have one, in one read (a statement per CHUNK keys)."""
        wanted = set(keys_)
        if not wanted or (job := self._number(job_id)) is None:
            return {}
        k = t.kept_images.c
        ids = {key: image_id(job_id, key) for key in wanted}
        shas = [ident + tail[:20] for ident, tail in ids.values() if tail is not None]  # keys.py's layout
        foreign = [key for key, (_, tail) in ids.items() if tail is None]
        with self._read() as conn:
            by_sha = sa.select(t.kept_images).where(one_of(conn, k.sha, "ids"), k.job == job)
            by_key = sa.select(t.kept_images).where(k.job == job, one_of(conn, k.key, "ids"))
            rows = _by_ids(conn, by_sha, shas) + _by_ids(conn, by_key, foreign)
        images = (_stored_image(job_id, row) for row in rows)
        return {image.key: image for image in images if image.key in wanted}

    def image_keys(self, job_id: str) -> list[str]:
        if (job := self._number(job_id)) is None:
            return []
        k = t.kept_images.c
        with self._read() as conn:
            rows = conn.execute(sa.select(k.sha, k.format, k.key).where(k.job == job))
            return sorted(_image_key(job_id, row) for row in rows)

    # ------------------------------------------------------------------ detect
    def detected_counts(self, job_id: str, image_keys: Iterable[str]) -> dict[str, int]:
        """The crop count of each of ``image_keys`` recorded as detected, in one read (a statement per CHUNK)."""
        wanted = {image_id(job_id, key)[0]: key for key in image_keys}
        if not wanted or (job := self._number(job_id)) is None:
            return {}
        c = t.detected_images.c
        with self._read() as conn:
            query = sa.select(c.image, c.crops).where(c.job == job, one_of(conn, c.image, "ids"))
            return {wanted[bytes(image)]: int(crops) for image, crops in _by_ids(conn, query, wanted)}

    @staticmethod
    def _superseded(tx: _Tx, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` (image or crop keys) belong to an image replaced by a larger near-duplicate."""
        c = t.superseded.c
        prefixes = {k: _prefix(tx.job_id, k) for k in keys}
        query = _cached(
            tx.conn, "superseded", lambda: sa.select(c.prefix).where(c.job == _JOB, one_of(tx.conn, c.prefix, "ids"))
        )
        found = {p for (p,) in _by_ids(tx.conn, query, {p for p in prefixes.values() if p is not None}, job=tx.job)}
        return {k for k, p in prefixes.items() if p in found}

    def record_detections(self, job_id: str, detections: Sequence[tuple[str, list[Crop]]]) -> dict[str, bool]:
        """Record each image's crops once, a batch (a detect batch's images) in one transaction; per
        image key, whether this call recorded it (an image listed twice: its first crops count)."""
        batch: dict[str, list[Crop]] = {}
        for image_key, crops in detections:
            batch.setdefault(image_key, crops)
        if not batch:
            return {}
        ids = {key: image_id(job_id, key) for key in batch}
        packed = {key: pack_crops(job_id, key, ids[key][0], crops) for key, crops in batch.items()}
        c = t.detected_images.c
        with self._write(job_id, numbered=True) as tx:
            self._gate(tx, "share")
            superseded = self._superseded(tx, batch)
            # A replaced image is marked detected with no crops: a redelivery stops early.
            rows = [
                {"job": tx.job, "image": ident, "tail": tail}
                | (
                    {"crops": 0, "packed": None}
                    if key in superseded
                    else {"crops": len(batch[key]), "packed": packed[key]}
                )
                for key, (ident, tail) in sorted(ids.items(), key=lambda kv: kv[1][0])
            ]
            inserted = set(_insert(tx.conn, t.detected_images, rows, returning=c.image))
            recorded = {key: ids[key][0] in inserted and key not in superseded for key in batch}
            tx.incr(Counter.DETECTED, sum(recorded.values()))
            tx.incr(Counter.CROPS, sum(len(batch[key]) for key, done in recorded.items() if done))
            return recorded

    def get_crops(self, job_id: str, crop_keys: Iterable[str]) -> list[Crop]:
        keys = list(crop_keys)
        if not keys or (job := self._number(job_id)) is None:
            return []
        det = t.detected_images.c
        found: dict[bytes, Crop] = {}
        ids = [crop_id(job_id, key) for key in keys]
        images = {ident[:12] for ident in ids if len(ident) == 14}
        with self._read() as conn:
            query = sa.select(det.image, det.tail, det.packed).where(
                det.job == job, one_of(conn, det.image, "ids"), det.packed.is_not(None)
            )
            for row in _by_ids(conn, query, images):
                found.update(unpack_crops(row.packed, job_id, row.image, image_key_of(job_id, row.image, row.tail)))
        return [crop for ident in ids if (crop := found.get(ident)) is not None]

    def crop_keys(self, job_id: str) -> list[str]:
        if (job := self._number(job_id)) is None:
            return []
        det = t.detected_images.c
        with self._read() as conn:
            rows = conn.execute(sa.select(det.image, det.packed).where(det.job == job, det.packed.is_not(None)))
            return sorted(crop_key_of(job_id, ident) for image, packed in rows for ident in crop_ids(image, packed))

    # ------------------------------------------------------------------ siamese
    def record_distances(self, job_id: str, distances: Iterable[tuple[str, float]]) -> dict[str, bool]:
        """Record each crop's distance once (counted once; a second one replaces the value), a batch (a
        scored batch) in one transaction; per crop key, whether this call recorded it first. Written in
        id order, so two deliveries of overlapping batches take their row locks in the same order."""
        values = {k: float(d) for k, d in distances}
        if not values:
            return {}
        c = t.crop_distances.c
        recorded = dict.fromkeys(values, False)
        with self._write(job_id, numbered=True) as tx:
            self._gate(tx, "share")
            ids = {crop_id(job_id, k): k for k in set(values) - self._superseded(tx, values)}
            rows = [{"job": tx.job, "crop": i, "distance": values[ids[i]]} for i in sorted(ids)]
            for ident in _insert(tx.conn, t.crop_distances, rows, returning=c.crop):
                key = ids[ident]
                recorded[key] = True
                tx.incr(Counter.COMPARED)
                tx.add_distance(values[key])
            again = [i for i, k in ids.items() if not recorded[k]]  # scored before: the new value replaces it
            changed: list[dict[str, Any]] = []
            query = sa.select(c.crop, c.distance).where(c.job == tx.job, one_of(tx.conn, c.crop, "ids"))
            for ident, old in _by_ids(tx.conn, query.order_by(c.crop).with_for_update(), again):
                new = values[ids[ident]]
                if old != new:
                    tx.add_distance(old, -1)
                    tx.add_distance(new)
                    changed.append({"ident": ident, "value": new})
            if changed:
                update = (
                    sa.update(t.crop_distances)
                    .where(c.job == tx.job, c.crop == sa.bindparam("ident"))
                    .values(distance=sa.bindparam("value"))
                )
                tx.conn.execute(update, changed)
        return recorded

    def record_compare_failure(self, job_id: str, crop_key: str) -> bool:
        with self._write(job_id, numbered=True) as tx:
            self._gate(tx, "share")
            if not _insert(tx.conn, t.compare_failures, [{"job": tx.job, "crop": crop_id(job_id, crop_key)}]):
                return False
            tx.incr(Counter.COMPARE_FAILED)
            return True

    def count_below(self, job_id: str, thresholds: list[float]) -> list[int]:
        """For each threshold, how many crops have a distance <= it: the histogram's bins, plus one indexed
        range count for a threshold inside a bin that holds distances (none for an edge: every calibration
        grid threshold is one)."""
        b = t.distance_bins.c
        job = self._number(job_id) or 0
        with self._read() as conn:
            snapshot(conn)  # the histogram and the range counts from one state
            hist = {k: int(n) for k, n in conn.execute(sa.select(b.bin, b.crops).where(b.job_id == job_id))}
            below = [0] * (BINS + 1)  # below[k]: distances in the bins under bin k
            for k in range(BINS):
                below[k + 1] = below[k] + int(hist.get(k, 0))
            counts: dict[float, int] = {}
            ranges: list[tuple[float, float]] = []  # (the lower edge of the threshold's bin, the threshold)
            for x in set(thresholds):
                k = distance_bin(x)  # EDGES[k - 1] < x <= EDGES[k]
                if math.isinf(x):
                    counts[x] = below[BINS] if x > 0 else 0
                elif k < len(EDGES) and EDGES[k] == x:  # an edge: the bins up to it hold the count
                    counts[x] = below[k + 1]
                elif not hist.get(k):  # nothing in its bin
                    counts[x] = below[k]
                else:  # bin 0 is open below, as the last bin is above
                    ranges.append((EDGES[k - 1] if k else -math.inf, x))
            for chunk in _chunks(ranges, RANGES_PER_QUERY):
                params: dict[str, object] = {"job": job}
                for i, (low, high) in enumerate(chunk):
                    params |= {f"low{i}": low, f"high{i}": high}
                row = conn.execute(_range_counts(len(chunk)), params).one()
                counts.update(
                    (high, below[distance_bin(high)] + int(n)) for (_, high), n in zip(chunk, row, strict=True)
                )
        return [counts[x] for x in thresholds]

    def distances_of(self, job_id: str, crop_keys: list[str]) -> dict[str, float]:
        if not crop_keys or (job := self._number(job_id)) is None:
            return {}
        c = t.crop_distances.c
        ids = {crop_id(job_id, k): k for k in crop_keys}
        with self._read() as conn:
            query = sa.select(c.crop, c.distance).where(c.job == job, one_of(conn, c.crop, "ids"))
            found = {ids[ident]: float(d) for ident, d in _by_ids(conn, query, ids)}
        return {key: found[key] for key in crop_keys if key in found}

    def distances(self, job_id: str) -> list[tuple[str, float]]:
        if (job := self._number(job_id)) is None:
            return []
        c = t.crop_distances.c
        query = sa.select(c.crop, c.distance).where(c.job == job).order_by(c.distance, c.crop)
        with self._read() as conn:
            return [(crop_key_of(job_id, crop), float(d)) for crop, d in conn.execute(query)]

    def distance_page(
        self,
        job_id: str,
        *,
        max_distance: float | None = None,
        min_distance_exclusive: float | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> DistancePage:
        """One page in (distance, crop id) order, after the last one's cursor (keyset, never OFFSET).

        Crop ids order as the keys of keys.py's layout do (other keys follow them, in their order)."""
        if (job := self._number(job_id)) is None:
            return DistancePage([], None)
        c = t.crop_distances.c
        query = sa.select(c.crop, c.distance).where(c.job == job)
        if max_distance is not None:
            query = query.where(c.distance <= max_distance)
        if min_distance_exclusive is not None:
            query = query.where(c.distance > min_distance_exclusive)
        if after is not None:
            cursor, position = sa.tuple_(c.distance, c.crop), (after[0], crop_id(job_id, after[1]))
            # The distance bound alone lets the (job, distance) index start at the cursor.
            if descending:
                query = query.where(c.distance <= after[0], cursor < position)
            else:
                query = query.where(c.distance >= after[0], cursor > position)
        order = (c.distance.desc(), c.crop.desc()) if descending else (c.distance, c.crop)
        with self._read() as conn:
            rows = conn.execute(query.order_by(*order).limit(limit + 1)).all()
        items = [(crop_key_of(job_id, crop), float(d)) for crop, d in rows[:limit]]
        more = len(rows) > limit and items
        return DistancePage(items, (items[-1][1], items[-1][0]) if more else None)

    # ------------------------------------------------------------------ feedback and resets
    def set_feedback(self, job_id: str, crop_key: str, correct: bool | None) -> None:
        """A user's mark on a crop: right (True), wrong (False), or no mark (None)."""
        c, row = t.feedback.c, {"job_id": job_id, "crop_key": crop_key, "correct": correct}
        with self._write(job_id) as tx:
            if correct is None:
                tx.conn.execute(sa.delete(t.feedback).where(c.job_id == job_id, c.crop_key == crop_key))
            else:
                _insert(tx.conn, t.feedback, [row], update=["correct"])

    def feedback(self, job_id: str) -> dict[str, bool]:
        c = t.feedback.c
        with self._read() as conn:
            return {key: bool(v) for key, v in conn.execute(sa.select(c.crop_key, c.correct).where(c.job_id == job_id))}

    def unfinished_work(self, job_id: str) -> tuple[list[str], list[str]]:
        """Stored images not yet detected, and crops with neither a distance nor a failure."""
        if (job := self._number(job_id)) is None:
            return [], []
        k, det = t.kept_images.c, t.detected_images.c
        todo_images: list[str] = []
        ended: set[bytes] = set()  # crops with a distance or a failure
        with self._read() as conn:
            snapshot(conn)
            done = set(conn.execute(sa.select(det.image).where(det.job == job)).scalars())
            for row in conn.execute(sa.select(k.sha, k.format, k.key).where(k.job == job)):
                ident = bytes(row.sha)[:12] if row.key is None else image_id(job_id, row.key)[0]
                if ident not in done:
                    todo_images.append(_image_key(job_id, row))
            detected = conn.execute(sa.select(det.image, det.packed).where(det.job == job, det.packed.is_not(None)))
            crops = [ident for image, packed in detected for ident in crop_ids(image, packed)]
            for c in (t.crop_distances.c, t.compare_failures.c):
                query = sa.select(c.crop).where(c.job == job, one_of(conn, c.crop, "ids"))
                ended.update(crop for (crop,) in _by_ids(conn, query, crops))
        return sorted(todo_images), sorted(crop_key_of(job_id, crop) for crop in crops if crop not in ended)

    def reset_detections(self, job_id: str) -> None:
        self.reset_distances(job_id, detections=True)

    def reset_distances(self, job_id: str, *, detections: bool = False) -> None:
        """Forget the job's distances and compare failures (and with ``detections``, its detections)."""
        with self._write(job_id, numbered=True) as tx:
            self._gate(tx, "exclusive")
            per_image = (t.crop_distances, t.compare_failures) + ((t.detected_images,) if detections else ())
            for table in per_image:
                tx.conn.execute(sa.delete(table).where(table.c.job == tx.job))
            tx.conn.execute(sa.delete(t.distance_bins).where(t.distance_bins.c.job_id == job_id))
            names = [Counter.COMPARED, Counter.COMPARE_FAILED] + (
                [Counter.DETECTED, Counter.CROPS] if detections else []
            )
            c = t.job_counters.c
            tx.conn.execute(sa.delete(t.job_counters).where(c.job_id == job_id, c.name.in_(names)))


# ---------------------------------------------------------------------------- rows and records

# A packed crop: index and flags, its box, padded box and score as float32 where that keeps each
# value exactly (the detector's boxes and scores are float32, padded boxes whole pixels; else
# float64, flag 4), then its class name unless it is the previous crop's (flag 8) and, where it
# is not the row's image (flag 2), its image key: each text a 2-byte length and UTF-8 (a length
# of NO_TEXT: None). Flag 1: the crop is the whole image.
_HEAD = struct.Struct("<HB")
_NARROW, _WIDE = struct.Struct("<9f"), struct.Struct("<9d")
_TEXT = struct.Struct("<H")
NO_TEXT = 0xFFFF
WHOLE, OTHER_IMAGE, WIDE, SAME_CLASS = 1, 2, 4, 8


def _float32_exact(values: Sequence[float]) -> bool:
    return _NARROW.unpack(_NARROW.pack(*values)) == tuple(values)


def _text(value: str | None) -> bytes:
    if value is None:
        return _TEXT.pack(NO_TEXT)
    raw = value.encode()
    return _TEXT.pack(len(raw)) + raw


def pack_crops(job_id: str, image_key: str, image: bytes, crops: Sequence[Crop]) -> bytes:
    """An image's crops as bytes; refused unless each crop's key is keys.crop_key(job, crop_id) of this image."""
    out = bytearray()
    previous: tuple[str | None] | None = None
    for crop in crops:
        ident = crop_id(job_id, crop.key)
        if crop.job_id != job_id or len(ident) != 14 or ident[:12] != image[:12]:
            raise ValueError(
                f"crop {crop.key!r} of job {crop.job_id!r}: crops are recorded under keys.crop_key(job, crop_id) "
                f"of their image's hash ({image_key!r})"
            )
        if crop.crop_id != crop.key.rsplit("/", 1)[-1].removesuffix(".jpg"):
            raise ValueError(f"crop {crop.key!r}: its crop_id {crop.crop_id!r} is not its key's")
        values = (*crop.box, *crop.padded_box, crop.score)
        narrow = _float32_exact(values)
        flags = (WHOLE if crop.whole_image else 0) | (0 if crop.image_key == image_key else OTHER_IMAGE)
        flags |= (0 if narrow else WIDE) | (SAME_CLASS if previous == (crop.class_name,) else 0)
        out += _HEAD.pack(int.from_bytes(ident[12:], "big"), flags)
        out += (_NARROW if narrow else _WIDE).pack(*values)
        if not flags & SAME_CLASS:
            out += _text(crop.class_name)
        if flags & OTHER_IMAGE:
            out += _text(crop.image_key)
        previous = (crop.class_name,)
    return bytes(out)


def _unpacked(packed: bytes) -> Iterator[tuple[int, int, tuple[float, ...], str | None, str | None]]:
    """Per packed crop: index, flags, the 9 floats, class name, other image key."""
    at, class_name = 0, None

    def text() -> str | None:
        nonlocal at
        (n,) = _TEXT.unpack_from(packed, at)
        at += _TEXT.size
        if n == NO_TEXT:
            return None
        at += n
        return packed[at - n : at].decode()

    while at < len(packed):
        index, flags = _HEAD.unpack_from(packed, at)
        at += _HEAD.size
        floats = _WIDE if flags & WIDE else _NARROW
        values = floats.unpack_from(packed, at)
        at += floats.size
        if not flags & SAME_CLASS:
            class_name = text()
        other = text() if flags & OTHER_IMAGE else None
        yield index, flags, values, class_name, other


def crop_ids(image: bytes, packed: bytes | None) -> list[bytes]:
    """The ids of the crops packed into ``image``'s detection row (none where it has none)."""
    return [image[:12] + index.to_bytes(2, "big") for index, *_ in _unpacked(packed or b"")]


def unpack_crops(packed: bytes, job_id: str, image: bytes, image_key: str) -> dict[bytes, Crop]:
    """Per crop id, the crops packed into the detection row of ``image`` (key ``image_key``)."""
    crops: dict[bytes, Crop] = {}
    for index, flags, values, class_name, other in _unpacked(packed):
        ident = image[:12] + index.to_bytes(2, "big")
        key = crop_key_of(job_id, ident)
        crops[ident] = Crop(
            job_id=job_id,
            key=key,
            crop_id=key.rsplit("/", 1)[-1].removesuffix(".jpg"),
            image_key=other if other is not None else image_key,
            box=values[0:4],
            padded_box=values[4:8],
            score=values[8],
            class_name=class_name,
            whole_image=bool(flags & WHOLE),
        )
    return crops


def _image_key(job_id: str, row: Any) -> str:
    """A kept image's object key: its own column where it does not follow keys.py's layout."""
    return str(row.key) if row.key is not None else keys.image_key(job_id, bytes(row.sha).hex(), row.format)


def _image_row(job_id: str, url: str, image: StoredImage, near: NearDupQuery | None) -> dict[str, Any]:
    """A kept image's row (its job number set by the caller)."""
    try:
        derived = keys.image_key(job_id, image.sha256, image.format) == image.key
    except ValueError:
        derived = False
    if image.phash is not None and not re.fullmatch(r"[0-9a-f]{16}", image.phash):
        raise ValueError(f"image {image.key!r}: perceptual hash {image.phash!r} is not 16 hex digits")
    p = image.provenance
    return {
        "sha": bytes.fromhex(image.sha256),
        "fetched_at": _utc(image.fetched_at),
        "bytes": image.bytes,
        "phash": _signed64(int(image.phash, 16)) if image.phash is not None else None,
        "near": _signed64(near.hash) if near is not None else None,
        "width": image.width,
        "height": image.height,
        **{f"band{i}": (b if near is not None else None) for i, b in enumerate(_bands(near.hash if near else 0))},
        "format": image.format,
        "source": p.source.value,
        "key": None if derived else image.key,
        "provenance": pack_provenance(url, p),
    }


PROVENANCE_TEXTS = ("page_url", "title", "license", "license_url", "author")  # packed after the two URLs


def pack_provenance(url: str, p: Candidate) -> bytes:
    """The URL kept and the provenance's texts as compact JSON, deflated where that is shorter (first byte: 1)."""
    texts = [url, None if p.image_url == url else p.image_url, *(getattr(p, name) for name in PROVENANCE_TEXTS)]
    raw = json.dumps(texts, separators=(",", ":")).encode()
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no header or checksum per row
    packed = squeeze.compress(raw) + squeeze.flush()
    return b"\x01" + packed if len(packed) < len(raw) else b"\x00" + raw


def _provenance(packed: bytes) -> list[Any]:
    body = packed[1:] if packed[:1] == b"\x00" else zlib.decompress(packed[1:], -15)
    return list(json.loads(body))


def kept_url(packed: bytes) -> str:
    """The URL whose copy the job keeps, from a kept image's packed provenance."""
    return str(_provenance(packed)[0])


def _stored_image(job_id: str, row: Any) -> StoredImage:
    fetched = row.fetched_at
    url, image_url, *texts = _provenance(row.provenance)
    return StoredImage(
        job_id=job_id,
        key=_image_key(job_id, row),
        sha256=bytes(row.sha).hex(),
        width=row.width,
        height=row.height,
        format=row.format,
        bytes=row.bytes,
        fetched_at=fetched.replace(tzinfo=UTC) if fetched.tzinfo is None else fetched.astimezone(UTC),
        provenance=Candidate(
            image_url=image_url or url, source=row.source, **dict(zip(PROVENANCE_TEXTS, texts, strict=True))
        ),
        phash=f"{row.phash & ((1 << 64) - 1):016x}" if row.phash is not None else None,
    )


def _outcome_row(job: int, digest: bytes, record: DownloadRecord, image: StoredImage | None) -> dict[str, Any]:
    # A URL whose image the job keeps: its image's hash, no body (the record is rebuilt from that row).
    if image is not None and record.sha256:
        kept = DownloadRecord(url=record.url, outcome=DownloadOutcome.STORED, sha256=record.sha256, image_key=image.key)
        if record == kept:
            return {"job": job, "url_digest": digest, "sha": bytes.fromhex(record.sha256), "body": None}
    return {"job": job, "url_digest": digest, "sha": None, "body": record.model_dump_json()}


def _outcomes(conn: Connection, job: int, job_id: str, ids: Iterable[bytes]) -> dict[bytes, DownloadRecord]:
    """The records of those URLs (by :func:`_url_id`) that have one: a kept image's rebuilt from its row."""
    c, k = t.url_outcomes.c, t.kept_images.c
    query = sa.select(c.url_digest, c.sha, c.body).where(c.job == job, one_of(conn, c.url_digest, "ids"))
    rows = _by_ids(conn, query, ids)
    query = sa.select(k.sha, k.provenance, k.format, k.key).where(one_of(conn, k.sha, "ids"), k.job == job)
    kept = {bytes(row.sha): row for row in _by_ids(conn, query, [bytes(row.sha) for row in rows if row.body is None])}
    found: dict[bytes, DownloadRecord] = {}
    for row in rows:
        if row.body is not None:
            found[bytes(row.url_digest)] = DownloadRecord.model_validate_json(row.body)
        else:
            image, sha = kept[bytes(row.sha)], bytes(row.sha).hex()
            key = _image_key(job_id, image)
            found[bytes(row.url_digest)] = DownloadRecord(
                url=kept_url(image.provenance), outcome=DownloadOutcome.STORED, sha256=sha, image_key=key
            )
    return found


def _rewrite(conn: Connection, job: int, records: dict[bytes, DownloadRecord]) -> None:
    """Write ``records`` (by URL id) over those URLs' records, in id order."""
    if not records:
        return
    c = t.url_outcomes.c
    update = sa.update(t.url_outcomes).where(c.job == job, c.url_digest == sa.bindparam("ident"))
    bodies = [{"ident": d, "new_body": r.model_dump_json()} for d, r in sorted(records.items())]
    conn.execute(update.values(sha=None, body=sa.bindparam("new_body")), bodies)


def _owners(conn: Connection, job: int, shas: Sequence[bytes]) -> dict[bytes, str]:
    """Per hash, the URL the job's exact copies of it are filed under (a kept or a replaced image's)."""
    k, s = t.kept_images.c, t.superseded.c
    query = _cached(
        conn,
        "owners",
        lambda: sa.union_all(
            sa.select(k.sha, k.provenance, sa.null().label("url")).where(one_of(conn, k.sha, "ids"), k.job == _JOB),
            sa.select(s.sha, sa.null(), s.url).where(s.job == _JOB, one_of(conn, s.sha, "ids")),
        ),
    )
    rows = _by_ids(conn, query, shas, job=job)
    found = {bytes(sha): kept_url(packed) for sha, packed, url in rows if url is None}
    found.update((bytes(sha), url) for sha, _, url in rows if url is not None)  # over a kept copy
    return found


def band_candidates(conn: Connection, bands: tuple[int | None, ...]) -> Any:
    """The near-duplicate lookup's statement: the near value of each kept image of job ``:job`` whose
    band ``bands[i]`` is one of the values ``:v{i}`` (None: every hashed image of the job), labelled
    with the band that found it; one indexed lookup per band, united (an OR of the bands would let a
    planner without statistics, SQLite, read every row of the job instead). The band indexes end
    with the near value, so the candidates come from the indexes alone."""
    k = t.kept_images.c

    def kept(band: int | None, i: int) -> sa.Select[Any]:
        query = sa.select(k.near, sa.literal(band, sa.Integer)).where(k.job == _JOB)
        if band is None:
            return query.where(k.near.is_not(None))
        return query.where(one_of(conn, k[f"band{band}"], f"v{i}"))

    arms = [kept(band, i) for i, band in enumerate(bands)]
    return sa.union_all(*arms) if len(arms) > 1 else arms[0]


class _Downloads:
    """One batch of :meth:`SqlStateStore.record_downloads`, in its transaction.

    Its reads are made once for the batch; what the items decide is kept here (``owners``,
    ``kept``, the counters) so that each item sees the ones before it, and its writes wait in
    ``pending`` until the end, or until a supersede's SQL needs to see them.
    """

    def __init__(self, store: SqlStateStore, tx: _Tx, max_images: int, across_jobs: bool) -> None:
        self.store, self.tx, self.max_images, self.across_jobs = store, tx, max_images, across_jobs
        self.owners: dict[bytes, str] = {}  # sha -> the URL its exact copies are filed under
        self.elsewhere: dict[bytes, str] = {}  # sha -> "job <id> <url>" of another job's copy
        self.kept: dict[bytes, tuple[int, _Kept]] = {}  # sha -> (hash, row): near-duplicate candidates
        self.seq = 0  # the job's last near log number, read under the gate
        self.logged: list[int] = []  # the near hashes the batch keeps, for the log
        self.downloaded = 0
        self.superseded = False  # whether an item of the batch replaced a kept image
        self.pending: dict[sa.Table, dict[tuple[Any, ...], dict[str, Any]]] = {}
        self.changed: dict[bytes, DownloadRecord] = {}  # url id -> the final record, where the claim's differs

    def record(self, items: Sequence[DownloadItem]) -> list[DownloadRecord]:
        tx, c = self.tx, t.url_outcomes.c
        digests = [_digest(item.record.url) for item in items]
        ids = [digest[:16] for digest in digests]  # _url_id
        f = t.crawl_frontier.c
        leave = _cached(
            tx.conn,
            "leave frontier",
            lambda: sa.delete(t.crawl_frontier).where(
                f.job_id == sa.bindparam("job_id"), one_of(tx.conn, f.url_digest, "ids")
            ),
        )
        for chunk in _chunks(sorted(set(digests))):
            tx.conn.execute(leave, {"job_id": tx.job_id, "ids": chunk})
        unique = sorted(set(ids))  # one order, so two batches that overlap wait, never deadlock
        first = {d: item for d, item in reversed(list(zip(ids, items, strict=True)))}
        rows = [_outcome_row(tx.job, d, first[d].record, first[d].image) for d in unique]
        fresh = set(_insert(tx.conn, t.url_outcomes, rows, returning=c.url_digest))
        answers = _outcomes(tx.conn, tx.job, tx.job_id, set(unique) - fresh)  # recorded before: that, nothing moves
        images = [first[d] for d in unique if d in fresh and first[d].image is not None and first[d].record.sha256]
        if images:
            self._look_up(images)
        finals = []
        for ident, item in zip(ids, items, strict=True):
            if ident not in answers:
                answers[ident] = self._decide(item)
                if answers[ident] is not item.record:  # its claim row holds the record as given
                    self.changed[ident] = answers[ident]
            elif self.superseded:  # a supersede may have changed the record since: as it is now
                self._flush()
                answers[ident] = _outcomes(tx.conn, tx.job, tx.job_id, [ident])[ident]
            finals.append(answers[ident])
        if self.logged:
            seq, nears = self.seq + 1, struct.pack(f">{len(self.logged)}Q", *self.logged)
            self._add(t.near_log, {"job": tx.job, "slot": seq % t.NEAR_LOG_SLOTS, "seq": seq, "nears": nears})
        self._flush()
        return finals

    def _look_up(self, items: list[DownloadItem]) -> None:
        """The gate, and every row the batch's decisions read: exact owners, other jobs' copies, near hashes.

        The band lookup, the costly read, runs before the gate, beside the batch deciding; under it,
        the near hashes kept since are read from the job's near log (schema.near_log): every batch
        that decided after the log number read first (``seen``) logged what it kept, and every other
        one had committed before the lookup began. Rows are read in full under the gate."""
        tx = self.tx
        queries = [item.near for item in items if item.near is not None]
        g, seen, near = t.near_log.c, 0, set()
        if queries:
            last = _cached(tx.conn, "near seen", lambda: sa.select(sa.func.max(g.seq)).where(g.job == _JOB))
            seen, near = tx.conn.execute(last, {"job": tx.job}).scalar() or 0, self._band_lookup(queries)
        self.downloaded = self.store._gate(tx, "decide")
        shas = sorted({bytes.fromhex(item.record.sha256) for item in items if item.record.sha256})
        self.owners.update(_owners(tx.conn, tx.job, shas))
        if self.across_jobs:
            k, s, n = t.kept_images.c, t.superseded.c, t.job_numbers.c
            held = sa.select(k.sha, n.job_id, k.provenance).join(t.job_numbers, n.num == k.job)
            held = held.where(one_of(tx.conn, k.sha, "ids"), k.job != tx.job)
            replaced = sa.select(s.sha, n.job_id, s.url).join(t.job_numbers, n.num == s.job)
            replaced = replaced.where(one_of(tx.conn, s.sha, "ids"), s.job != tx.job)
            for chunk in _chunks(shas):
                copies = [
                    (sha, job_id, kept_url(packed)) for sha, job_id, packed in tx.conn.execute(held, {"ids": chunk})
                ]
                copies += [(sha, job_id, url) for sha, job_id, url in tx.conn.execute(replaced, {"ids": chunk})]
                for sha, job_id, url in sorted(copies, key=lambda c: (bytes(c[0]), c[1])):
                    self.elsewhere.setdefault(bytes(sha), f"job {job_id} {url}")
        if not queries:
            return
        since = _cached(
            tx.conn, "near log", lambda: sa.select(g.seq, g.nears).where(g.job == _JOB, g.seq > sa.bindparam("seen"))
        )
        logged = sorted(tx.conn.execute(since, {"job": tx.job, "seen": seen}).all())
        self.seq = logged[-1].seq if logged else seen
        if [entry.seq for entry in logged] != list(range(seen + 1, self.seq + 1)):  # some left the ring: look up again
            near = self._band_lookup(queries)
        for entry in logged:
            values = struct.unpack(f">{len(entry.nears) // 8}Q", entry.nears)
            near.update(
                _signed64(v) for v in values if any((q.hash ^ v).bit_count() <= q.max_distance for q in queries)
            )
        k = t.kept_images.c
        mask = (1 << t.PHASH_BAND_BITS) - 1
        full = _cached(
            tx.conn,
            "near rows",
            lambda: sa.select(k.sha, k.near, k.width, k.height, k.format, k.key, k.provenance).where(
                k.job == _JOB, one_of(tx.conn, k.band0, "b0"), one_of(tx.conn, k.near, "near")
            ),
        )
        for chunk in _chunks(sorted(near)):
            b0 = sorted({value & mask for value in chunk})
            for row in tx.conn.execute(full, {"job": tx.job, "b0": b0, "near": chunk}):
                sha, pixels = bytes(row.sha), int(row.width) * int(row.height)
                value = row.near & (1 << 64) - 1
                self.kept[sha] = (value, _Kept(sha, pixels, _image_key(tx.job_id, row), kept_url(row.provenance)))

    def _band_lookup(self, queries: list[NearDupQuery]) -> set[int]:
        """The near values (as stored: signed) of the job's kept images within a query's reach, by band."""
        tx = self.tx
        # Candidates by band are many more than matches (a 16-bit band value is shared by one image
        # in 65,536: at a million images some thousand candidates per image), so they are read as
        # near value and the band that found them, from the band's index alone ((job, bandN, near):
        # no heap read per candidate), checked here against the queries that band reaches, and the
        # few within reach read in full, by the same index: (job, band0, near).
        lookups: list[tuple[int | None, Sequence[int]]] = [(None, [])]  # every hash of the job
        # band -> value -> (hash, max distance) of each query whose band is within its radius of it
        reach: list[dict[int, list[tuple[int, int]]]] = [{} for _ in range(t.PHASH_BANDS)]
        radii = {q.max_distance: band_radii(q.max_distance, t.PHASH_BANDS) for q in queries}
        if all(max(r) <= MAX_BAND_RADIUS for r in radii.values()):
            # Else the bands would return a third of the job or more (band_candidates: one lookup per band).
            lookups = []
            for band in range(t.PHASH_BANDS):
                for q in queries:
                    value = _bands(q.hash)[band]
                    for flip in _flips(radii[q.max_distance][band]):  # none where the band's radius is -1
                        reach[band].setdefault(value ^ flip, []).append((q.hash, q.max_distance))
                lookups += [(band, chunk) for chunk in _chunks(sorted(reach[band]))]
        everyone = [(q.hash, q.max_distance) for q in queries]
        mask = (1 << t.PHASH_BAND_BITS) - 1
        near: set[int] = set()  # the near values within a query's reach, as stored (signed)
        for start in range(0, len(lookups), t.PHASH_BANDS):
            group = lookups[start : start + t.PHASH_BANDS]
            bands = tuple(band for band, _ in group)
            query = _cached(tx.conn, ("near", bands), functools.partial(band_candidates, tx.conn, bands))
            params = {f"v{i}": values for i, (band, values) in enumerate(group) if band is not None}
            for stored, band in tx.conn.execute(query, {"job": tx.job, **params}).all():
                value = stored & (1 << 64) - 1
                asking = (
                    everyone
                    if band is None
                    else reach[band].get((value >> (t.PHASH_BAND_BITS * band)) & mask, everyone)
                )
                if any((h ^ value).bit_count() <= d for h, d in asking):
                    near.add(stored)
        return near

    def _nearest(self, near: NearDupQuery, sha: bytes) -> tuple[int, _Kept] | None:
        """The kept image nearest to ``near`` within its max distance (ties: the first URL)."""
        best: tuple[int, _Kept] | None = None
        for other, (value, row) in self.kept.items():
            distance = hamming(near.hash, value)
            if other == sha or distance > near.max_distance:
                continue
            if best is None or (distance, row.url) < (best[0], best[1].url):
                best = (distance, row)
        return best

    def _decide(self, item: DownloadItem) -> DownloadRecord:
        tx, record, image, near = self.tx, item.record, item.image, item.near
        if image is None or not record.sha256:
            if record.reason is not None and record.outcome in (DownloadOutcome.FAILED, DownloadOutcome.SKIPPED):
                tx.incr(f"{record.outcome.value}:{record.reason.value}")
            tx.incr(OUTCOME_COUNTER[record.outcome])
            return record
        sha = bytes.fromhex(record.sha256)
        owner = self.owners.get(sha)
        if owner is not None and owner != record.url:
            tx.incr(Counter.DUPLICATES)
            self._duplicate(owner, record.url)
            return record.model_copy(update={"outcome": DownloadOutcome.DUPLICATE, "duplicate_of": owner})
        if sha in self.elsewhere:
            tx.incr(Counter.DUPLICATES)
            return record.model_copy(update={"outcome": DownloadOutcome.DUPLICATE, "duplicate_of": self.elsewhere[sha]})
        if self.downloaded + tx.counts[Counter.DOWNLOADED] >= self.max_images:
            tx.incr(Counter.SKIPPED)
            tx.incr(f"{DownloadOutcome.SKIPPED.value}:{FailureReason.LIMIT_REACHED.value}")
            skipped = {"outcome": DownloadOutcome.SKIPPED, "reason": FailureReason.LIMIT_REACHED, "image_key": None}
            return record.model_copy(update=skipped)
        pixels = image.width * image.height
        if near is not None and (found := self._nearest(near, sha)) is not None:
            distance, kept = found
            if pixels <= kept.pixels:
                tx.incr(Counter.DUPLICATES)
                self._duplicate(kept.url, record.url)
                update = {"outcome": DownloadOutcome.DUPLICATE, "duplicate_of": kept.url, "hamming": distance}
                return record.model_copy(update=update)
            self._flush()  # the supersede's SQL reads and moves rows this batch may have made
            self.store._supersede(tx, kept, record.url, distance)
            self.superseded = True
            del self.kept[kept.sha]
            self.owners[kept.sha] = record.url
        self.owners[sha] = record.url
        self._add(t.kept_images, {"job": tx.job, **_image_row(tx.job_id, record.url, image, near)})
        if near is not None:
            self.kept[sha] = (near.hash, _Kept(sha, pixels, image.key, record.url))
            self.logged.append(near.hash)
        tx.incr(Counter.DOWNLOADED)
        return record

    def _duplicate(self, kept_url: str, url: str) -> None:
        self._add(t.duplicates, _duplicate_row(self.tx.job, kept_url, url))

    def _add(self, table: sa.Table, row: dict[str, Any]) -> None:
        key = tuple(row[col.name] for col in table.primary_key.columns)
        self.pending.setdefault(table, {})[key] = row

    def _flush(self) -> None:
        """Write what the batch decided so far: rows in key order (a fixed lock order), then changed records."""
        conn = self.tx.conn
        for table, rows in sorted(self.pending.items(), key=lambda kv: kv[0].name):
            keys_ = {col.name for col in table.primary_key.columns}
            ordered = [rows[k] for k in sorted(rows)]
            rest = [] if table is t.duplicates else [name for name in ordered[0] if name not in keys_]
            _insert(conn, table, ordered, update=rest)
        self.pending.clear()
        _rewrite(conn, self.tx.job, self.changed)
        self.changed.clear()


StateStore = SqlStateStore  # the store's type, as its callers name it: the one implementation
