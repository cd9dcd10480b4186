"""The job state in SQL: one implementation of :class:`~imgsift_common.state.StateStore` for
SQLite (the embedded ``imgsift`` command) and PostgreSQL (the services), over SQLAlchemy Core.

The rules of :mod:`imgsift_common.state`, kept by the database:

- Record once: each outcome has a unique key (a URL, an image key, a crop key), and the write
  is ``INSERT ... ON CONFLICT DO NOTHING``; the counters move in the same transaction, and only
  when that insert inserted a row, so a redelivered task changes nothing.
- Counters and histogram bins are added up during a transaction and written at its end, in a
  fixed order, so two transactions never wait for each other's rows in opposite orders.
- The decisions that read before they write (the image limit, exact and near-duplicate
  dedup, superseding) are serialised per job by a lock on the job's ``downloaded`` counter
  row; the writes that superseding takes back (detections, distances, compare failures) hold
  a shared lock on it, so a supersede never misses work that lands at the same moment.
  SQLite has one writer at a time and takes its lock at ``BEGIN``; PostgreSQL takes the row
  locks (``FOR UPDATE`` / ``FOR KEY SHARE``).
- Distances are counted at any threshold without reading them: a per-job histogram of
  :data:`~imgsift_common.calibration.GRID` bins over [0, 2] (the calibration grid), written
  with each distance, gives the count below a bin's lower edge, and an indexed range count
  covers the one bin the threshold falls in.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from bisect import bisect_right
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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
from imgsift_common.neardup import NearDupQuery, hamming, within
from imgsift_common.sqldialect import WRITE, insert, make_engine, one_of, snapshot
from imgsift_common.state import (
    OUTCOME_COUNTER,
    Counter,
    DistancePage,
    DownloadItem,
    JobNotFound,
    StreamState,
    finalised_job,
    page_of,
    reason_counter,
    sha24_of,
    updated_job,
)

CHUNK = 500  # rows or keys per statement: well under SQLite's 32,766 bound parameters

# Bin b holds the distances in [EDGES[b - 1], EDGES[b]); the first and last bins are open-ended.
EDGES = [MAX_DISTANCE * i / GRID for i in range(1, GRID)]

# Above this per-band radius (near-duplicate distances of 20 bits or more) the band lookup
# would return a third of the job or more, so the job's hashes are read instead.
MAX_BAND_RADIUS = 4


def distance_bin(distance: float) -> int:
    """The histogram bin of a distance: how many bin edges lie at or below it."""
    return bisect_right(EDGES, distance)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _duplicate_row(job_id: str, kept_url: str, url: str) -> dict[str, Any]:
    """The row that files ``url`` as a duplicate of the copy kept at ``kept_url``."""
    return {"job_id": job_id, "kept_digest": _digest(kept_url), "url_digest": _digest(url)}


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _bands(phash: int) -> list[int]:
    mask = (1 << t.PHASH_BAND_BITS) - 1
    return [(phash >> (t.PHASH_BAND_BITS * i)) & mask for i in range(t.PHASH_BANDS)]


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no offset: every time is written in UTC so that they sort.
    return moment.astimezone(UTC) if moment.tzinfo else moment


def _insert(
    conn: Connection,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    *,
    update: Sequence[str] = (),
    returning: sa.ColumnElement[Any] | None = None,
) -> list[Any]:
    """Insert ``rows`` (in the order given: callers sort them by key, a fixed lock order), leaving
    a row whose key is taken as it is, or setting its ``update`` columns to the new row's; the
    ``returning`` column of the rows inserted or updated.

    One cached statement, executed for many rows: SQLAlchemy sends them as multi-row VALUES pages
    ("insertmanyvalues"), so a batch costs a few round trips and no compile per batch size.
    """
    if not rows:
        return []
    stmt = insert(conn, table)
    keys = [col.name for col in table.primary_key.columns]
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={name: stmt.excluded[name] for name in update})
    else:
        stmt = stmt.on_conflict_do_nothing()
    # RETURNING even where the caller needs nothing back: without it SQLAlchemy hands psycopg an
    # executemany, one statement per row, instead of its multi-row pages.
    column = returning if returning is not None else table.primary_key.columns[keys[0]]
    found = list(conn.execute(stmt.returning(column), list(rows)).scalars())
    return found if returning is not None else []


RANGES_PER_QUERY = 200  # range counts per statement (PostgreSQL allows 1,664 columns)


@functools.lru_cache(maxsize=RANGES_PER_QUERY)
def _range_counts(n: int) -> sa.Select[Any]:
    """One row of ``n`` counts of a job's distances in [low{i}, high{i}]; built once per ``n``."""
    c = t.distances.c
    job_id: sa.BindParameter[str] = sa.bindparam("job_id")
    counts = (
        sa.select(sa.func.count())
        .where(c.job_id == job_id, c.distance.between(sa.bindparam(f"low{i}"), sa.bindparam(f"high{i}")))
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
    counts: Tally[str] = field(default_factory=Tally)
    bins: Tally[int] = field(default_factory=Tally)

    def incr(self, name: str, by: int = 1) -> None:
        self.counts[name] += by

    def add_distance(self, distance: float, by: int = 1) -> None:
        self.bins[distance_bin(distance)] += by

    def flush(self) -> None:
        """Write the deltas: counters, then bins, each in key order (a fixed lock order)."""
        self._add(t.job_counters, "name", "value", self.counts)
        self._add(t.distance_bins, "bin", "crops", self.bins)

    def _add(self, table: sa.Table, key: str, column: str, deltas: Tally[Any]) -> None:
        """Add ``deltas`` (key -> change) to ``table``'s ``column``, inserting the rows that are missing."""
        rows = [{"job_id": self.job_id, key: k, column: v} for k, v in sorted(deltas.items()) if v]
        if rows:
            stmt = insert(self.conn, table)
            stmt = stmt.on_conflict_do_update(
                index_elements=["job_id", key], set_={column: table.c[column] + stmt.excluded[column]}
            )
            self.conn.execute(stmt.returning(table.c[key]), rows)  # RETURNING: multi-row pages (see _insert)


@dataclass(frozen=True)
class _Kept:
    """A kept image's perceptual-hash row: what a larger near-duplicate needs to replace it."""

    sha: str
    pixels: int
    image_key: str
    url: str


class SqlStateStore:
    """Job state in SQL tables (see :mod:`imgsift_common.schema`), on SQLite or PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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
    def _write(self, job_id: str = "") -> Iterator[_Tx]:
        with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
            tx = _Tx(conn, job_id)
            yield tx
            tx.flush()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _scalar(self, query: sa.Select[Any]) -> Any:
        with self._read() as conn:
            return conn.execute(query).scalar()

    def _gate(self, tx: _Tx, *, exclusive: bool) -> int:
        """Lock the job's ``downloaded`` counter row (see the module docstring); its value."""
        c = t.job_counters.c
        tx.conn.execute(
            insert(tx.conn, t.job_counters)
            .values(job_id=tx.job_id, name=Counter.DOWNLOADED.value, value=0)
            .on_conflict_do_nothing()
        )
        query = sa.select(c.value).where(c.job_id == tx.job_id, c.name == Counter.DOWNLOADED.value)
        query = query.with_for_update() if exclusive else query.with_for_update(read=True, key_share=True)
        return int(tx.conn.execute(query).scalar_one())

    # ------------------------------------------------------------------ jobs
    def create_job(self, job: Job) -> bool:
        with self._write() as tx:
            stmt = insert(tx.conn, t.jobs).values(
                id=job.id, owner=job.owner, created_at=_utc(job.created_at), body=job.model_dump_json()
            )
            return tx.conn.execute(stmt.on_conflict_do_nothing().returning(t.jobs.c.id)).first() is not None

    def get_job(self, job_id: str) -> Job | None:
        body = self._scalar(sa.select(t.jobs.c.body).where(t.jobs.c.id == job_id))
        return Job.model_validate_json(body) if body is not None else None

    def save_job(self, job: Job) -> None:
        body = job.model_copy(update={"updated_at": utcnow()}).model_dump_json()
        with self._write() as tx:
            tx.conn.execute(sa.update(t.jobs).where(t.jobs.c.id == job.id).values(body=body, owner=job.owner))

    def _locked_job(self, tx: _Tx, job_id: str) -> Job:
        body = tx.conn.execute(sa.select(t.jobs.c.body).where(t.jobs.c.id == job_id).with_for_update()).scalar()
        if body is None:
            raise JobNotFound(job_id)
        return Job.model_validate_json(body)

    def update_job(self, job_id: str, **changes: object) -> Job:
        with self._write() as tx:
            new = updated_job(self._locked_job(tx, job_id), changes)
            tx.conn.execute(
                sa.update(t.jobs).where(t.jobs.c.id == job_id).values(body=new.model_dump_json(), owner=new.owner)
            )
            return new

    def list_jobs(self, limit: int = 100, owner: str | None = None) -> list[Job]:
        query = sa.select(t.jobs.c.body).order_by(t.jobs.c.created_at.desc(), t.jobs.c.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(t.jobs.c.owner == owner)
        with self._read() as conn:
            return [Job.model_validate_json(body) for body in conn.execute(query).scalars()]

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> Job:
        with self._write() as tx:
            job = self._locked_job(tx, job_id)
            new = finalised_job(job, state, error)
            if new is not job:
                tx.conn.execute(sa.update(t.jobs).where(t.jobs.c.id == job_id).values(body=new.model_dump_json()))
            return new

    def add_note(self, job_id: str, note: str) -> None:
        with self._write(job_id) as tx:
            row = {"job_id": job_id, "digest": _digest(note), "note": note, "noted_at": utcnow()}
            tx.conn.execute(insert(tx.conn, t.job_notes).values(row).on_conflict_do_nothing())

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
            tx.conn.execute(insert(tx.conn, t.job_flags).values(job_id=job_id, name=flag).on_conflict_do_nothing())

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
            stmt = insert(tx.conn, t.job_markers).values(job_id=job_id, name=name, value=value)
            tx.conn.execute(
                stmt.on_conflict_do_update(index_elements=["job_id", "name"], set_={"value": stmt.excluded.value})
            )

    def get_marker(self, job_id: str, name: str) -> str | None:
        c = t.job_markers.c
        value = self._scalar(sa.select(c.value).where(c.job_id == job_id, c.name == name))
        return str(value) if value is not None else None

    def markers(self, job_id: str, prefix: str) -> dict[str, str]:
        c = t.job_markers.c
        # substr, not LIKE: LIKE would read % and _ in the prefix, and SQLite's ignores case.
        query = sa.select(c.name, c.value).where(c.job_id == job_id, sa.func.substr(c.name, 1, len(prefix)) == prefix)
        with self._read() as conn:
            return {name: value for name, value in conn.execute(query)}

    def claim_idempotency_key(self, key: str, job_id: str, ttl: float) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.time()
        c = t.idempotency_keys.c
        with self._write() as tx:
            tx.conn.execute(sa.delete(t.idempotency_keys).where(c.expires_at < now))
            tx.conn.execute(
                insert(tx.conn, t.idempotency_keys)
                .values(key=digest, job_id=job_id, expires_at=now + ttl)
                .on_conflict_do_nothing()
            )
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
        new: set[bytes] = set()
        with self._write(job_id) as tx:
            # In one order, so two writers of overlapping batches wait rather than deadlock.
            for chunk in _chunks(sorted(digests.values())):
                stmt = insert(tx.conn, t.crawl_seen).values([{"job_id": job_id, "url_digest": d} for d in chunk])
                new.update(
                    tx.conn.execute(stmt.on_conflict_do_nothing().returning(t.crawl_seen.c.url_digest)).scalars()
                )
            fresh = [c for url, c in by_url.items() if digests[url] in new]
            for batch in _chunks(fresh):
                rows = [
                    {
                        "job_id": job_id,
                        "url_digest": digests[c.image_url],
                        "body": c.model_dump_json(),
                        "lease_until": 0.0,
                    }
                    for c in batch
                ]
                tx.conn.execute(sa.insert(t.crawl_frontier).values(rows))
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
        with self._write(job_id) as tx:
            stmt = insert(tx.conn, t.crawl_streams).values(
                job_id=job_id, stream_id=stream_id, body=stream.model_dump_json()
            )
            tx.conn.execute(
                stmt.on_conflict_do_update(index_elements=["job_id", "stream_id"], set_={"body": stmt.excluded.body})
            )

    def url_record(self, job_id: str, url: str) -> DownloadRecord | None:
        c = t.downloads.c
        body = self._scalar(sa.select(c.body).where(c.job_id == job_id, c.url_digest == _digest(url)))
        return DownloadRecord.model_validate_json(body) if body is not None else None

    def url_records(self, job_id: str, urls: Sequence[str]) -> dict[str, DownloadRecord]:
        """The records of those of ``urls`` that have one, in one read (a statement per CHUNK URLs)."""
        c = t.downloads.c
        by_digest = {_digest(url): url for url in urls}
        found: dict[str, DownloadRecord] = {}
        with self._read() as conn:
            for chunk in _chunks(sorted(by_digest)):
                query = sa.select(c.url_digest, c.body).where(c.job_id == job_id, one_of(conn, c.url_digest, chunk))
                for digest, body in conn.execute(query):
                    found[by_digest[bytes(digest)]] = DownloadRecord.model_validate_json(body)
        return found

    def sha_owner(self, job_id: str, sha256: str) -> str | None:
        c = t.image_shas.c
        url = self._scalar(sa.select(c.url).where(c.job_id == job_id, c.sha == sha256))
        return str(url) if url is not None else None

    def record_download(
        self,
        job_id: str,
        record: DownloadRecord,
        image: StoredImage | None,
        max_images: int,
        *,
        near: NearDupQuery | None = None,
        across_jobs: bool = False,
    ) -> DownloadRecord:
        """Record a URL's outcome once; dedupe a stored image exactly, across jobs if asked, and by near hash."""
        item = DownloadItem(record, image, near)
        return self.record_downloads(job_id, [item], max_images, across_jobs=across_jobs)[0]

    def record_downloads(
        self,
        job_id: str,
        items: Sequence[DownloadItem],
        max_images: int,
        *,
        across_jobs: bool = False,
    ) -> list[DownloadRecord]:
        """:meth:`record_download` for a batch (a download task's URLs) in one transaction.

        The outcome is what recording the items one after another would give, each seeing the
        ones before it; the reads and writes are made per batch, not per item: one claim of
        every URL, one lookup of the batch's hashes (exact, across jobs, near), one write per
        table at the end. Each item's final record, in order.
        """
        if not items:
            return []
        with self._write(job_id) as tx:
            return _Downloads(self, tx, max_images, across_jobs).record(items)

    @staticmethod
    def _file_duplicate(tx: _Tx, kept_url: str, url: str) -> None:
        row = _duplicate_row(tx.job_id, kept_url, url)
        tx.conn.execute(insert(tx.conn, t.duplicates).values(row).on_conflict_do_nothing())

    def _supersede(self, tx: _Tx, old: _Kept, url: str, distance: int) -> None:
        """The kept copy ``old`` becomes a duplicate of the larger one at ``url``, downstream included."""
        conn, job_id = tx.conn, tx.job_id
        d, dup = t.downloads.c, t.duplicates.c
        old_digest, new_digest = _digest(old.url), _digest(url)
        # It and every copy filed under it now point at the new copy: one keeper per group.
        members = sa.select(dup.url_digest).where(dup.job_id == job_id, dup.kept_digest == old_digest)
        group = conn.execute(
            sa.select(d.url_digest, d.body).where(
                d.job_id == job_id, (d.url_digest == old_digest) | d.url_digest.in_(members)
            )
        ).all()
        for row in group:
            update: dict[str, object] = {"duplicate_of": url}
            if row.url_digest == old_digest:
                update |= {"outcome": DownloadOutcome.DUPLICATE, "hamming": distance}
            moved = DownloadRecord.model_validate_json(row.body).model_copy(update=update)
            conn.execute(
                sa.update(t.downloads)
                .where(d.job_id == job_id, d.url_digest == row.url_digest)
                .values(body=moved.model_dump_json())
            )
        conn.execute(
            sa.update(t.duplicates)
            .where(dup.job_id == job_id, dup.kept_digest == old_digest)
            .values(kept_digest=new_digest)
        )
        self._file_duplicate(tx, url, old.url)
        s, i, p = t.image_shas.c, t.images.c, t.phashes.c
        conn.execute(sa.update(t.image_shas).where(s.job_id == job_id, s.sha == old.sha).values(url=url))
        conn.execute(sa.delete(t.images).where(i.job_id == job_id, i.key == old.image_key))
        conn.execute(sa.delete(t.phashes).where(p.job_id == job_id, p.sha == old.sha))
        tx.incr(Counter.DOWNLOADED, -1)
        tx.incr(Counter.DUPLICATES)
        sha24 = old.sha[:24]
        conn.execute(insert(conn, t.superseded_images).values(job_id=job_id, sha24=sha24).on_conflict_do_nothing())
        det = t.detections.c
        n = conn.execute(sa.select(det.crops).where(det.job_id == job_id, det.image_key == old.image_key)).scalar()
        if n is None:
            return
        tx.incr(Counter.DETECTED, -1)
        tx.incr(Counter.CROPS, -int(n))
        crop_keys = [f"jobs/{job_id}/crops/{sha24}-{k:03d}.jpg" for k in range(int(n))]
        dist, failed = t.distances.c, t.compare_failures.c
        for chunk in _chunks(crop_keys):
            gone = conn.execute(
                sa.delete(t.distances).where(dist.job_id == job_id, dist.crop_key.in_(chunk)).returning(dist.distance)
            ).scalars()
            for value in gone:
                tx.incr(Counter.COMPARED, -1)
                tx.add_distance(value, -1)
            lost = conn.execute(
                sa.delete(t.compare_failures)
                .where(failed.job_id == job_id, failed.crop_key.in_(chunk))
                .returning(failed.crop_key)
            ).all()
            tx.incr(Counter.COMPARE_FAILED, -len(lost))

    def get_image(self, job_id: str, key: str) -> StoredImage | None:
        c = t.images.c
        body = self._scalar(sa.select(c.body).where(c.job_id == job_id, c.key == key))
        return StoredImage.model_validate_json(body) if body is not None else None

    def image_keys(self, job_id: str) -> list[str]:
        c = t.images.c
        with self._read() as conn:
            return list(conn.execute(sa.select(c.key).where(c.job_id == job_id).order_by(c.key)).scalars())

    # ------------------------------------------------------------------ detect
    def is_detected(self, job_id: str, image_key: str) -> bool:
        return self.detected_count(job_id, image_key) is not None

    def detected_count(self, job_id: str, image_key: str) -> int | None:
        c = t.detections.c
        n = self._scalar(sa.select(c.crops).where(c.job_id == job_id, c.image_key == image_key))
        return int(n) if n is not None else None

    def _superseded(self, tx: _Tx, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` (image or crop keys) belong to an image replaced by a larger near-duplicate."""
        c = t.superseded_images.c
        keys = list(keys)
        found: set[str] = set()
        for chunk in _chunks(sorted({sha24_of(k) for k in keys})):
            query = sa.select(c.sha24).where(c.job_id == tx.job_id, one_of(tx.conn, c.sha24, chunk))
            found.update(tx.conn.execute(query).scalars())
        return {k for k in keys if sha24_of(k) in found}

    def record_detection(self, job_id: str, image_key: str, crops: list[Crop]) -> bool:
        return self.record_detections(job_id, [(image_key, crops)])[image_key]

    def record_detections(self, job_id: str, detections: Sequence[tuple[str, list[Crop]]]) -> dict[str, bool]:
        """Record each image's crops once, a batch (a detect batch's images) in one transaction; per
        image key, whether this call recorded it (an image listed twice: its first crops count)."""
        batch: dict[str, list[Crop]] = {}
        for image_key, crops in detections:
            batch.setdefault(image_key, crops)
        if not batch:
            return {}
        c = t.detections.c
        with self._write(job_id) as tx:
            self._gate(tx, exclusive=False)
            superseded = self._superseded(tx, batch)
            # A replaced image is marked detected with no crops: a redelivery stops early.
            rows = [
                {"job_id": job_id, "image_key": key, "crops": 0 if key in superseded else len(crops)}
                for key, crops in sorted(batch.items())
            ]
            inserted = set(_insert(tx.conn, t.detections, rows, returning=c.image_key))
            recorded = {key: key in inserted and key not in superseded for key in batch}
            new = {crop.key: crop for key, crops in batch.items() if recorded[key] for crop in crops}
            crop_rows = [{"job_id": job_id, "key": k, "body": new[k].model_dump_json()} for k in sorted(new)]
            _insert(tx.conn, t.crops, crop_rows, update=["body"])
            tx.incr(Counter.DETECTED, sum(recorded.values()))
            tx.incr(Counter.CROPS, sum(len(batch[key]) for key, done in recorded.items() if done))
            return recorded

    def get_crops(self, job_id: str, crop_keys: Iterable[str]) -> list[Crop]:
        keys = list(crop_keys)
        c = t.crops.c
        found: dict[str, str] = {}
        with self._read() as conn:
            for chunk in _chunks(keys):
                rows = conn.execute(sa.select(c.key, c.body).where(c.job_id == job_id, c.key.in_(chunk)))
                found.update((key, body) for key, body in rows)
        return [Crop.model_validate_json(found[key]) for key in keys if key in found]

    def crop_keys(self, job_id: str) -> list[str]:
        c = t.crops.c
        with self._read() as conn:
            return list(conn.execute(sa.select(c.key).where(c.job_id == job_id).order_by(c.key)).scalars())

    # ------------------------------------------------------------------ siamese
    def has_distance(self, job_id: str, crop_key: str) -> bool:
        c = t.distances.c
        return self._scalar(sa.select(sa.literal(1)).where(c.job_id == job_id, c.crop_key == crop_key)) is not None

    def record_distance(self, job_id: str, crop_key: str, distance: float) -> bool:
        """Record a crop's distance once (counted once); a second one replaces the value, as ZADD does."""
        return self.record_distances(job_id, [(crop_key, distance)])[crop_key]

    def record_distances(self, job_id: str, distances: Iterable[tuple[str, float]]) -> dict[str, bool]:
        """:meth:`record_distance` for a batch of crops in one transaction (a scored batch: one commit,
        one gate, one insert, one counter and histogram write instead of one each per crop); per
        crop key, whether this call recorded it first. Written in key order, so two deliveries of
        overlapping batches take their row locks in the same order."""
        values = {k: float(d) for k, d in distances}
        if not values:
            return {}
        c = t.distances.c
        recorded = dict.fromkeys(values, False)
        with self._write(job_id) as tx:
            self._gate(tx, exclusive=False)
            live = sorted(set(values) - self._superseded(tx, values))  # a replaced image's crops are dropped
            rows = [{"job_id": job_id, "crop_key": k, "distance": values[k]} for k in live]
            for key in _insert(tx.conn, t.distances, rows, returning=c.crop_key):
                recorded[key] = True
                tx.incr(Counter.COMPARED)
                tx.add_distance(values[key])
            again = [k for k in live if not recorded[k]]  # recorded before: the new value replaces it
            changed: list[dict[str, Any]] = []
            for chunk in _chunks(again):
                query = sa.select(c.crop_key, c.distance).where(c.job_id == job_id, one_of(tx.conn, c.crop_key, chunk))
                for key, old in tx.conn.execute(query.order_by(c.crop_key).with_for_update()):
                    if old != values[key]:
                        tx.add_distance(old, -1)
                        tx.add_distance(values[key])
                        changed.append({"key": key, "value": values[key]})
            if changed:
                update = (
                    sa.update(t.distances)
                    .where(c.job_id == job_id, c.crop_key == sa.bindparam("key"))
                    .values(distance=sa.bindparam("value"))
                )
                tx.conn.execute(update, changed)
        return recorded

    def record_compare_failure(self, job_id: str, crop_key: str) -> bool:
        with self._write(job_id) as tx:
            self._gate(tx, exclusive=False)
            stmt = insert(tx.conn, t.compare_failures).values(job_id=job_id, crop_key=crop_key)
            if tx.conn.execute(stmt.on_conflict_do_nothing().returning(t.compare_failures.c.crop_key)).first() is None:
                return False
            tx.incr(Counter.COMPARE_FAILED)
            return True

    def count_accepted(self, job_id: str, threshold: float) -> int:
        return self.count_below(job_id, [threshold])[0]

    def count_below(self, job_id: str, thresholds: list[float]) -> list[int]:
        """Counts from the histogram's full bins plus one indexed range count per partly covered bin."""
        b = t.distance_bins.c
        with self._read() as conn:
            snapshot(conn)  # the histogram and the range counts from one state
            hist = {k: int(n) for k, n in conn.execute(sa.select(b.bin, b.crops).where(b.job_id == job_id))}
            below = [0] * (GRID + 1)  # below[k]: distances in the bins under bin k
            for k in range(GRID):
                below[k + 1] = below[k] + int(hist.get(k, 0))
            partial: dict[float, int] = {}  # distances at or under the threshold in its own bin
            ranges: list[tuple[float, float]] = []  # (the bin's lower edge, the threshold)
            for threshold in set(thresholds):
                k = distance_bin(threshold)
                if not hist.get(k) or math.isinf(threshold):
                    partial[threshold] = hist.get(k, 0) if threshold == math.inf else 0
                else:  # bin 0 is open below, as the last bin is above
                    ranges.append((EDGES[k - 1] if k else -math.inf, threshold))
            for chunk in _chunks(ranges, RANGES_PER_QUERY):
                params: dict[str, object] = {"job_id": job_id}
                for i, (low, high) in enumerate(chunk):
                    params |= {f"low{i}": low, f"high{i}": high}
                row = conn.execute(_range_counts(len(chunk)), params).one()
                partial.update((high, int(n)) for (_, high), n in zip(chunk, row, strict=True))
        return [below[distance_bin(x)] + partial[x] for x in thresholds]

    def distances_of(self, job_id: str, crop_keys: list[str]) -> dict[str, float]:
        c = t.distances.c
        found: dict[str, float] = {}
        with self._read() as conn:
            for chunk in _chunks(crop_keys):
                rows = conn.execute(sa.select(c.crop_key, c.distance).where(c.job_id == job_id, c.crop_key.in_(chunk)))
                found.update((key, float(d)) for key, d in rows)
        return {key: found[key] for key in crop_keys if key in found}

    def distances(self, job_id: str) -> list[tuple[str, float]]:
        c = t.distances.c
        query = sa.select(c.crop_key, c.distance).where(c.job_id == job_id).order_by(c.distance, c.crop_key)
        with self._read() as conn:
            return [(key, float(d)) for key, d in conn.execute(query)]

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
        """One page in (distance, crop key) order, after the last one's cursor (keyset, never OFFSET)."""
        c = t.distances.c
        query = sa.select(c.crop_key, c.distance).where(c.job_id == job_id)
        if max_distance is not None:
            query = query.where(c.distance <= max_distance)
        if min_distance_exclusive is not None:
            query = query.where(c.distance > min_distance_exclusive)
        if after is not None:
            cursor = sa.tuple_(c.distance, c.crop_key)
            query = query.where(cursor < after if descending else cursor > after)
        order = (c.distance.desc(), c.crop_key.desc()) if descending else (c.distance, c.crop_key)
        with self._read() as conn:
            rows = conn.execute(query.order_by(*order).limit(limit + 1))
            return page_of([(key, float(d)) for key, d in rows], limit, descending)

    # ------------------------------------------------------------------ feedback and resets
    def set_feedback(self, job_id: str, crop_key: str, correct: bool | None) -> None:
        c = t.feedback.c
        with self._write(job_id) as tx:
            if correct is None:
                tx.conn.execute(sa.delete(t.feedback).where(c.job_id == job_id, c.crop_key == crop_key))
                return
            stmt = insert(tx.conn, t.feedback).values(job_id=job_id, crop_key=crop_key, correct=correct)
            tx.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["job_id", "crop_key"], set_={"correct": stmt.excluded.correct}
                )
            )

    def feedback(self, job_id: str) -> dict[str, bool]:
        c = t.feedback.c
        with self._read() as conn:
            return {key: bool(v) for key, v in conn.execute(sa.select(c.crop_key, c.correct).where(c.job_id == job_id))}

    def unfinished_work(self, job_id: str) -> tuple[list[str], list[str]]:
        i, det, cr = t.images.c, t.detections.c, t.crops.c
        dist, failed = t.distances.c, t.compare_failures.c
        images = (
            sa.select(i.key)
            .where(i.job_id == job_id, ~sa.exists().where(det.job_id == job_id, det.image_key == i.key))
            .order_by(i.key)
        )
        crops = (
            sa.select(cr.key)
            .where(
                cr.job_id == job_id,
                ~sa.exists().where(dist.job_id == job_id, dist.crop_key == cr.key),
                ~sa.exists().where(failed.job_id == job_id, failed.crop_key == cr.key),
            )
            .order_by(cr.key)
        )
        with self._read() as conn:
            snapshot(conn)
            return list(conn.execute(images).scalars()), list(conn.execute(crops).scalars())

    def reset_detections(self, job_id: str) -> None:
        with self._write(job_id) as tx:
            self._gate(tx, exclusive=True)
            tx.conn.execute(sa.delete(t.detections).where(t.detections.c.job_id == job_id))
            tx.conn.execute(sa.delete(t.crops).where(t.crops.c.job_id == job_id))
            self._forget_distances(tx, Counter.DETECTED, Counter.CROPS)

    def reset_distances(self, job_id: str) -> None:
        with self._write(job_id) as tx:
            self._gate(tx, exclusive=True)
            self._forget_distances(tx)

    @staticmethod
    def _forget_distances(tx: _Tx, *counters: Counter) -> None:
        job_id = tx.job_id
        for table in (t.distances, t.distance_bins, t.compare_failures):
            tx.conn.execute(sa.delete(table).where(table.c.job_id == job_id))
        names = [n.value for n in (*counters, Counter.COMPARED, Counter.COMPARE_FAILED)]
        c = t.job_counters.c
        tx.conn.execute(sa.delete(t.job_counters).where(c.job_id == job_id, c.name.in_(names)))


class _Downloads:
    """One batch of :meth:`SqlStateStore.record_downloads`, in its transaction.

    Its reads are made once for the batch; what the items decide is kept here (``owners``,
    ``kept``, the counters) so that each item sees the ones before it, and its writes wait in
    ``pending`` until the end, or until a supersede's SQL needs to see them.
    """

    def __init__(self, store: SqlStateStore, tx: _Tx, max_images: int, across_jobs: bool) -> None:
        self.store, self.tx, self.max_images, self.across_jobs = store, tx, max_images, across_jobs
        self.owners: dict[str, str] = {}  # sha -> the URL its exact copies are filed under
        self.elsewhere: dict[str, str] = {}  # sha -> "job <id> <url>" of another job's copy
        self.kept: dict[str, tuple[int, _Kept]] = {}  # sha -> (hash, row): near-duplicate candidates
        self.downloaded = 0
        self.superseded = False  # whether an item of the batch replaced a kept image
        self.pending: dict[sa.Table, dict[tuple[Any, ...], dict[str, Any]]] = {}
        self.bodies: dict[bytes, str] = {}  # url digest -> the final record's JSON, where it changed

    def record(self, items: Sequence[DownloadItem]) -> list[DownloadRecord]:
        tx, c = self.tx, t.downloads.c
        digests = [_digest(item.record.url) for item in items]
        unique = sorted(set(digests))  # one order, so two batches that overlap wait, never deadlock
        f = t.crawl_frontier.c
        fresh: set[bytes] = set()
        for chunk in _chunks(unique):
            tx.conn.execute(
                sa.delete(t.crawl_frontier).where(f.job_id == tx.job_id, one_of(tx.conn, f.url_digest, chunk))
            )
        first = {d: item for d, item in reversed(list(zip(digests, items, strict=True)))}
        rows = [{"job_id": tx.job_id, "url_digest": d, "body": first[d].record.model_dump_json()} for d in unique]
        fresh.update(_insert(tx.conn, t.downloads, rows, returning=c.url_digest))
        answers: dict[bytes, DownloadRecord] = {}  # recorded before: that answer, nothing moves
        for chunk in _chunks(sorted(set(unique) - fresh)):
            query = sa.select(c.url_digest, c.body).where(c.job_id == tx.job_id, one_of(tx.conn, c.url_digest, chunk))
            answers.update((d, DownloadRecord.model_validate_json(b)) for d, b in tx.conn.execute(query))
        images = [first[d] for d in unique if d in fresh and first[d].image is not None and first[d].record.sha256]
        if images:
            self._look_up(images)
        finals = []
        for digest, item in zip(digests, items, strict=True):
            if digest not in answers:
                answers[digest] = self._decide(item)
                if answers[digest] is not item.record:
                    self.bodies[digest] = answers[digest].model_dump_json()
            elif self.superseded:  # a supersede may have changed the record since: as it is now
                self._flush()
                body = tx.conn.execute(sa.select(c.body).where(c.job_id == tx.job_id, c.url_digest == digest))
                answers[digest] = DownloadRecord.model_validate_json(body.scalar_one())
            finals.append(answers[digest])
        self._flush()
        return finals

    def _look_up(self, items: list[DownloadItem]) -> None:
        """The gate, and every row the batch's decisions read: exact owners, other jobs' copies, near hashes."""
        tx = self.tx
        self.downloaded = self.store._gate(tx, exclusive=True)
        shas = sorted({item.record.sha256 for item in items if item.record.sha256})
        s, g, p = t.image_shas.c, t.global_shas.c, t.phashes.c
        for chunk in _chunks(shas):
            rows = tx.conn.execute(sa.select(s.sha, s.url).where(s.job_id == tx.job_id, one_of(tx.conn, s.sha, chunk)))
            self.owners.update((sha, url) for sha, url in rows)
            if self.across_jobs:
                query = sa.select(g.sha, g.job_id, g.url).where(one_of(tx.conn, g.sha, chunk), g.job_id != tx.job_id)
                for sha, job_id, url in tx.conn.execute(query.order_by(g.sha, g.job_id)):
                    self.elsewhere.setdefault(sha, f"job {job_id} {url}")
        queries = [item.near for item in items if item.near is not None]
        if not queries:
            return
        kept = sa.select(p.sha, p.hash, p.pixels, p.image_key, p.url).where(p.job_id == tx.job_id)
        lookups: list[sa.Select[Any]] = []
        if any(q.max_distance // t.PHASH_BANDS > MAX_BAND_RADIUS for q in queries):
            lookups = [kept]  # the bands would return a third of the job or more: read it
        else:
            # One indexed lookup per band, united: an OR of the four would let a planner without
            # statistics (SQLite) read every row of the job by its job_id instead.
            for band in range(t.PHASH_BANDS):
                values = sorted(
                    {
                        v
                        for q in queries
                        for v in within(_bands(q.hash)[band], t.PHASH_BAND_BITS, q.max_distance // t.PHASH_BANDS)
                    }
                )
                lookups += [kept.where(one_of(tx.conn, p[f"band{band}"], chunk)) for chunk in _chunks(values)]
        for start in range(0, len(lookups), t.PHASH_BANDS):
            group = lookups[start : start + t.PHASH_BANDS]
            united: sa.Select[Any] | sa.CompoundSelect[Any] = sa.union(*group) if len(group) > 1 else group[0]
            for row in tx.conn.execute(united):
                found = _Kept(row.sha, int(row.pixels), row.image_key, row.url)
                self.kept[row.sha] = (int(row.hash) & ((1 << 64) - 1), found)

    def _nearest(self, near: NearDupQuery, sha: str) -> tuple[int, _Kept] | None:
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
            if (reason := reason_counter(record)) is not None:
                tx.incr(reason)
            tx.incr(OUTCOME_COUNTER[record.outcome])
            return record
        sha, job_id = record.sha256, tx.job_id
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
        self._add(t.image_shas, {"job_id": job_id, "sha": sha, "url": record.url})
        self._add(t.images, {"job_id": job_id, "key": image.key, "body": image.model_dump_json()})
        self._add(t.global_shas, {"sha": sha, "job_id": job_id, "url": record.url})
        if near is not None:
            bands = {f"band{i}": b for i, b in enumerate(_bands(near.hash))}
            row = {"job_id": job_id, "sha": sha, "hash": _signed64(near.hash), **bands}
            self._add(t.phashes, {**row, "pixels": pixels, "image_key": image.key, "url": record.url})
            self.kept[sha] = (near.hash, _Kept(sha, pixels, image.key, record.url))
        tx.incr(Counter.DOWNLOADED)
        return record

    def _duplicate(self, kept_url: str, url: str) -> None:
        self._add(t.duplicates, _duplicate_row(self.tx.job_id, kept_url, url))

    def _add(self, table: sa.Table, row: dict[str, Any]) -> None:
        key = tuple(row[col.name] for col in table.primary_key.columns)
        self.pending.setdefault(table, {})[key] = row

    def _flush(self) -> None:
        """Write what the batch decided so far: rows in key order (a fixed lock order), then changed records."""
        conn = self.tx.conn
        for table, rows in sorted(self.pending.items(), key=lambda kv: kv[0].name):
            keys = {col.name for col in table.primary_key.columns}
            ordered = [rows[k] for k in sorted(rows)]
            rest = [] if table is t.duplicates else [name for name in ordered[0] if name not in keys]
            _insert(conn, table, ordered, update=rest)
        self.pending.clear()
        if self.bodies:
            c = t.downloads.c
            update = (
                sa.update(t.downloads)
                .where(c.job_id == self.tx.job_id, c.url_digest == sa.bindparam("digest"))
                .values(body=sa.bindparam("new_body"))
            )
            conn.execute(update, [{"digest": d, "new_body": b} for d, b in sorted(self.bodies.items())])
            self.bodies.clear()
