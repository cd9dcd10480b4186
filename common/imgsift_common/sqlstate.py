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
from imgsift_common.sqldialect import WRITE, insert, make_engine, snapshot
from imgsift_common.state import (
    OUTCOME_COUNTER,
    Counter,
    DistancePage,
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
            stmt = insert(self.conn, table).values(rows)
            stmt = stmt.on_conflict_do_update(
                index_elements=["job_id", key], set_={column: table.c[column] + stmt.excluded[column]}
            )
            self.conn.execute(stmt)


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
        digest = _digest(record.url)
        c = t.downloads.c
        with self._write(job_id) as tx:
            f = t.crawl_frontier.c
            tx.conn.execute(sa.delete(t.crawl_frontier).where(f.job_id == job_id, f.url_digest == digest))
            claim = (
                insert(tx.conn, t.downloads)
                .values(job_id=job_id, url_digest=digest, body=record.model_dump_json())
                .on_conflict_do_nothing()
                .returning(c.url_digest)
            )
            if tx.conn.execute(claim).first() is None:  # recorded before: that answer, nothing moves
                body = tx.conn.execute(sa.select(c.body).where(c.job_id == job_id, c.url_digest == digest)).scalar_one()
                return DownloadRecord.model_validate_json(body)
            if image is None or not record.sha256:
                if (reason := reason_counter(record)) is not None:
                    tx.incr(reason)
                tx.incr(OUTCOME_COUNTER[record.outcome])
                return record
            final = self._record_image(tx, record, record.sha256, image, max_images, near, across_jobs)
            if final is not record:
                tx.conn.execute(
                    sa.update(t.downloads)
                    .where(c.job_id == job_id, c.url_digest == digest)
                    .values(body=final.model_dump_json())
                )
            return final

    def _record_image(
        self,
        tx: _Tx,
        record: DownloadRecord,
        sha: str,
        image: StoredImage,
        max_images: int,
        near: NearDupQuery | None,
        across_jobs: bool,
    ) -> DownloadRecord:
        downloaded = self._gate(tx, exclusive=True)
        job_id, conn = tx.job_id, tx.conn
        s, g = t.image_shas.c, t.global_shas.c
        owner = conn.execute(sa.select(s.url).where(s.job_id == job_id, s.sha == sha)).scalar()
        if owner is not None and owner != record.url:
            tx.incr(Counter.DUPLICATES)
            self._file_duplicate(tx, owner, record.url)
            return record.model_copy(update={"outcome": DownloadOutcome.DUPLICATE, "duplicate_of": owner})
        if across_jobs:
            elsewhere = conn.execute(sa.select(g.job_id, g.url).where(g.sha == sha, g.job_id != job_id)).first()
            if elsewhere is not None:
                tx.incr(Counter.DUPLICATES)
                of = f"job {elsewhere.job_id} {elsewhere.url}"
                return record.model_copy(update={"outcome": DownloadOutcome.DUPLICATE, "duplicate_of": of})
        if downloaded >= max_images:
            tx.incr(Counter.SKIPPED)
            tx.incr(f"{DownloadOutcome.SKIPPED.value}:{FailureReason.LIMIT_REACHED.value}")
            skipped = {"outcome": DownloadOutcome.SKIPPED, "reason": FailureReason.LIMIT_REACHED, "image_key": None}
            return record.model_copy(update=skipped)
        pixels = image.width * image.height
        if near is not None and (found := self._nearest(tx, near, sha)) is not None:
            distance, kept = found
            if pixels <= kept.pixels:
                tx.incr(Counter.DUPLICATES)
                self._file_duplicate(tx, kept.url, record.url)
                update = {"outcome": DownloadOutcome.DUPLICATE, "duplicate_of": kept.url, "hamming": distance}
                return record.model_copy(update=update)
            self._supersede(tx, kept, record.url, distance)
        self._upsert(tx, t.image_shas, {"job_id": job_id, "sha": sha, "url": record.url})
        self._upsert(tx, t.images, {"job_id": job_id, "key": image.key, "body": image.model_dump_json()})
        self._upsert(tx, t.global_shas, {"sha": sha, "job_id": job_id, "url": record.url})
        if near is not None:
            bands = {f"band{i}": b for i, b in enumerate(_bands(near.hash))}
            row = {"job_id": job_id, "sha": sha, "hash": _signed64(near.hash), **bands}
            self._upsert(tx, t.phashes, {**row, "pixels": pixels, "image_key": image.key, "url": record.url})
        tx.incr(Counter.DOWNLOADED)
        return record

    @staticmethod
    def _upsert(tx: _Tx, table: sa.Table, row: dict[str, Any]) -> None:
        stmt = insert(tx.conn, table).values(row)
        keys = [col.name for col in table.primary_key.columns]
        rest = {name: stmt.excluded[name] for name in row if name not in keys}
        tx.conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=rest))

    @staticmethod
    def _file_duplicate(tx: _Tx, kept_url: str, url: str) -> None:
        row = {"job_id": tx.job_id, "kept_digest": _digest(kept_url), "url_digest": _digest(url)}
        tx.conn.execute(insert(tx.conn, t.duplicates).values(row).on_conflict_do_nothing())

    def _nearest(self, tx: _Tx, near: NearDupQuery, sha: str) -> tuple[int, _Kept] | None:
        """The kept image nearest to ``near`` within its max distance (ties: the first URL), by its bands."""
        p = t.phashes.c
        kept = sa.select(p.sha, p.hash, p.pixels, p.image_key, p.url).where(p.job_id == tx.job_id, p.sha != sha)
        query: sa.Select[Any] | sa.CompoundSelect[Any] = kept
        radius = near.max_distance // t.PHASH_BANDS
        if radius <= MAX_BAND_RADIUS:
            # One indexed lookup per band, united: an OR of the four would let a planner without
            # statistics (SQLite) read every row of the job by its job_id instead.
            query = sa.union(
                *(
                    kept.where(p[f"band{i}"].in_(within(value, t.PHASH_BAND_BITS, radius)))
                    for i, value in enumerate(_bands(near.hash))
                )
            )
        best: tuple[int, _Kept] | None = None
        for row in tx.conn.execute(query):
            distance = hamming(near.hash, row.hash & ((1 << 64) - 1))
            if distance > near.max_distance or (best is not None and (distance, row.url) >= (best[0], best[1].url)):
                continue
            best = (distance, _Kept(row.sha, int(row.pixels), row.image_key, row.url))
        return best

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

    def _superseded(self, tx: _Tx, key: str) -> bool:
        c = t.superseded_images.c
        query = sa.select(sa.literal(1)).where(c.job_id == tx.job_id, c.sha24 == sha24_of(key))
        return tx.conn.execute(query).first() is not None

    def record_detection(self, job_id: str, image_key: str, crops: list[Crop]) -> bool:
        with self._write(job_id) as tx:
            self._gate(tx, exclusive=False)
            superseded = self._superseded(tx, image_key)
            # A replaced image is marked detected with no crops: a redelivery stops early.
            row = {"job_id": job_id, "image_key": image_key, "crops": 0 if superseded else len(crops)}
            stmt = insert(tx.conn, t.detections).values(row).on_conflict_do_nothing()
            inserted = tx.conn.execute(stmt.returning(t.detections.c.image_key)).first() is not None
            if superseded or not inserted:
                return False
            for chunk in _chunks(list({c.key: c for c in crops}.values())):
                rows = [{"job_id": job_id, "key": c.key, "body": c.model_dump_json()} for c in chunk]
                upsert = insert(tx.conn, t.crops).values(rows)
                tx.conn.execute(
                    upsert.on_conflict_do_update(index_elements=["job_id", "key"], set_={"body": upsert.excluded.body})
                )
            tx.incr(Counter.DETECTED)
            tx.incr(Counter.CROPS, len(crops))
            return True

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
        one gate, one counter and histogram write instead of one each per crop); per crop key,
        whether this call recorded it first. Written in key order, so two deliveries of
        overlapping batches take their row locks in the same order."""
        c = t.distances.c
        recorded: dict[str, bool] = {}
        with self._write(job_id) as tx:
            self._gate(tx, exclusive=False)
            for crop_key, value in sorted({k: float(d) for k, d in distances}.items()):
                recorded[crop_key] = False
                if self._superseded(tx, crop_key):  # its image was replaced
                    continue
                stmt = insert(tx.conn, t.distances).values(job_id=job_id, crop_key=crop_key, distance=value)
                if tx.conn.execute(stmt.on_conflict_do_nothing().returning(c.crop_key)).first() is not None:
                    tx.incr(Counter.COMPARED)
                    tx.add_distance(value)
                    recorded[crop_key] = True
                    continue
                where = (c.job_id == job_id, c.crop_key == crop_key)
                old = tx.conn.execute(sa.select(c.distance).where(*where).with_for_update()).scalar_one()
                if old != value:
                    tx.conn.execute(sa.update(t.distances).where(*where).values(distance=value))
                    tx.add_distance(old, -1)
                    tx.add_distance(value)
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
