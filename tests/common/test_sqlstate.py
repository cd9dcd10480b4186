"""The SQL job-state store beyond the shared contract: concurrent writers, the distance
histogram, byte-order keys, and the schema's migrations and revision check.

Each test runs on SQLite and on PostgreSQL (a server of the test session's own).
"""

from __future__ import annotations

import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from imgsift_common import keys
from imgsift_common.calibration import MAX_DISTANCE
from imgsift_common.messages import (
    Candidate,
    DownloadOutcome,
    DownloadRecord,
    FailureReason,
    Job,
    JobSpec,
    SourceKind,
    SourceSpec,
)
from imgsift_common.neardup import NearDupQuery
from imgsift_common.schema import NEAR_LOG_SLOTS, SchemaMismatch, check_schema, head_revision, metadata, migrate
from imgsift_common.sqldialect import make_engine
from imgsift_common.sqlstate import BINS, SqlStateStore
from imgsift_common.state import DownloadItem
from tests.support.records import crops, record_stored, stored_image

JOB = "job-sql"
WRITERS = 4


def _sha(*parts: int) -> str:
    """A content hash whose first 24 digits (which crop keys carry) tell ``parts`` apart."""
    return "".join(f"{p:012x}" for p in parts).ljust(64, "0")


def _job(store: SqlStateStore, job_id: str = JOB) -> None:
    spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://a/1"])], target="dog")
    assert store.create_job(Job(id=job_id, spec=spec))


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.sqlite'}"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database(migrated=False)
    yield url
    server.drop_database(url)


@pytest.fixture
def sql_url(empty_url: str) -> str:
    """The URL of a database with the job-state schema."""
    migrate(empty_url)
    return empty_url


def _in_parallel(url: str, work: Callable[[SqlStateStore, int], None]) -> None:
    """Run ``work(store, writer)`` in WRITERS threads at once, each with its own connections."""
    stores = [SqlStateStore.open(url) for _ in range(WRITERS)]
    start = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def run(writer: int) -> None:
        try:
            start.wait()
            work(stores[writer], writer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for store in stores:
        store.close()
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "a writer hung"


def test_counters_do_not_drift_under_concurrent_writers(sql_url: str) -> None:
    """Four workers record the same and different outcomes at once: every counter is exact."""
    store = SqlStateStore.open(sql_url)
    _job(store)
    sha = [_sha(i) for i in range(1, 60)]
    shared_crops = [keys.crop_key(JOB, keys.crop_id(_sha(i), 0)) for i in range(100, 160)]
    distance_of = {key: random.Random(key).random() * MAX_DISTANCE for key in shared_crops}
    max_images = 45

    def work(state: SqlStateStore, writer: int) -> None:
        rng = random.Random(writer)
        steps: list[Callable[[], object]] = []
        for i in range(30):  # the same failures, redelivered to every worker, and some of its own
            url = f"http://f/{i}" if i < 20 else f"http://f{writer}/{i}"
            failed = DownloadRecord(url=url, outcome=DownloadOutcome.FAILED, reason=FailureReason.NOT_AN_IMAGE)
            steps.append(lambda r=failed: state.record_downloads(JOB, [DownloadItem(r)], max_images)[0])
        for i in range(40):  # the same bytes under a URL per worker: exact duplicates
            record, image = stored_image(JOB, sha[i], url=f"http://s{writer}/{i}")
            steps.append(lambda r=record, im=image: state.record_downloads(JOB, [DownloadItem(r, im)], max_images)[0])
        for i in range(40, 50):  # one URL, redelivered to every worker
            record, image = stored_image(JOB, sha[i], url=f"http://same/{i}")
            steps.append(lambda r=record, im=image: state.record_downloads(JOB, [DownloadItem(r, im)], max_images)[0])
        for key in shared_crops:  # the same distances, and some of its own
            steps.append(lambda k=key: state.record_distances(JOB, [(k, distance_of[k])])[k])
        for i in range(20):
            own = keys.crop_key(JOB, keys.crop_id(_sha(1000 + writer * 100 + i), 0))
            steps.append(lambda k=own: state.record_distances(JOB, [(k, rng.random())])[k])
            steps.append(lambda k=own: state.record_compare_failure(JOB, f"{k}.lost"))
        candidates = [Candidate(image_url=f"http://c/{i}", source=SourceKind.URLS) for i in range(40)]
        candidates += [Candidate(image_url=f"http://c{writer}/{i}", source=SourceKind.URLS) for i in range(10)]
        for start in range(0, len(candidates), 7):
            steps.append(lambda batch=candidates[start : start + 7]: state.enqueue_candidates(JOB, batch))
        rng.shuffle(steps)
        for step in steps:
            step()

    _in_parallel(sql_url, work)

    counters = store.counters(JOB)
    # 50 distinct contents for 45 places: 45 kept, whatever the order; the rest skipped.
    assert counters["downloaded"] == max_images == len(store.image_keys(JOB))
    image_urls = WRITERS * 40 + 10
    assert counters["downloaded"] + counters["duplicates"] + counters["skipped"] == image_urls
    assert counters["skipped"] == counters["skipped:limit_reached"] > 0
    assert counters["failed"] == counters["failed:not_an_image"] == 20 + WRITERS * 10
    assert counters["compared"] == len(shared_crops) + WRITERS * 20 == len(store.distances(JOB))
    assert counters["compare_failed"] == WRITERS * 20
    assert counters["discovered"] == 40 + WRITERS * 10 == store.frontier_size(JOB)
    assert store.count_below(JOB, [float("inf")]) == [counters["compared"]]
    assert {k: d for k, d in store.distances(JOB) if k in distance_of} == pytest.approx(distance_of)
    stored = list(store.url_records(JOB, [f"http://s{w}/{i}" for w in range(WRITERS) for i in range(40)]).values())
    for i in range(40):  # one copy of each content kept; the others name it
        copies = [r for r in stored if r.sha256 == sha[i]]
        kept = [r for r in copies if r.outcome is DownloadOutcome.STORED]
        if kept:
            assert len(kept) == 1 and all(r.duplicate_of == kept[0].url for r in copies if r is not kept[0])
    store.close()


def test_concurrent_leases_hand_each_url_to_one_worker(sql_url: str) -> None:
    store = SqlStateStore.open(sql_url)
    _job(store)
    urls = [f"http://c/{i}" for i in range(120)]
    store.enqueue_candidates(JOB, [Candidate(image_url=u, source=SourceKind.URLS) for u in urls])
    leased: list[list[str]] = [[] for _ in range(WRITERS)]

    def work(state: SqlStateStore, writer: int) -> None:
        while batch := state.lease_candidates(JOB, 7, lease_seconds=60):
            leased[writer] += [c.image_url for c in batch]

    _in_parallel(sql_url, work)
    every = [u for batch in leased for u in batch]
    assert sorted(every) == sorted(urls)  # each once: none lost, none handed out twice
    store.close()


def test_concurrent_near_duplicates_keep_the_largest_and_take_back_the_rest(sql_url: str) -> None:
    """Each worker stores its own size of the same pictures and works on them downstream at
    once; whatever the interleaving, the largest copy is kept and only its work is counted."""
    store = SqlStateStore.open(sql_url)
    _job(store)
    groups = 12
    bases = [random.Random(g).getrandbits(64) for g in range(groups)]

    def work(state: SqlStateStore, writer: int) -> None:
        order = list(range(groups))
        random.Random(writer).shuffle(order)
        for g in order:
            sha = _sha(g + 1, writer + 1)
            side = 100 * (writer + 1)  # the last writer's copies are the largest
            phash = bases[g] ^ (1 << writer)  # within 2 bits of the other copies
            record, image = stored_image(JOB, sha, url=f"http://n{writer}/{g}", size=(side, side))
            image = image.model_copy(update={"phash": f"{phash:016x}"})
            outcome = state.record_downloads(JOB, [DownloadItem(record, image, near=NearDupQuery(phash, 6))], 1000)[0]
            if outcome.outcome is DownloadOutcome.STORED:
                (crop,) = crops(JOB, sha, 1)
                state.record_detections(JOB, [(image.key, [crop])])
                state.record_distances(JOB, [(crop.key, 0.1 * (writer + 1))])

    _in_parallel(sql_url, work)

    largest = WRITERS - 1
    for g in range(groups):
        kept = store.url_records(JOB, [f"http://n{largest}/{g}"]).get(f"http://n{largest}/{g}")
        assert kept is not None and kept.outcome is DownloadOutcome.STORED
        for writer in range(largest):
            copy = store.url_records(JOB, [f"http://n{writer}/{g}"]).get(f"http://n{writer}/{g}")
            assert copy is not None and copy.outcome is DownloadOutcome.DUPLICATE, (g, writer, copy)
            assert copy.duplicate_of == kept.url
    assert store.counters(JOB) == {
        "downloaded": groups,
        "duplicates": groups * largest,
        "detected": groups,
        "crops": groups,
        "compared": groups,
    }
    assert [d for _, d in store.distances(JOB)] == pytest.approx([0.1 * WRITERS] * groups)
    assert store.count_below(JOB, [MAX_DISTANCE]) == [groups]
    store.close()


@pytest.mark.parametrize("table", ["detected_images", "crop_distances"])
def test_a_supersede_waits_for_downstream_work_in_flight(sql_url: str, table: str) -> None:
    """A detection or distance of the small copy is being written when the larger copy
    arrives: the supersede waits for it and takes it back, so nothing of the small copy counts."""
    worker, crawler = SqlStateStore.open(sql_url), SqlStateStore.open(sql_url)
    _job(worker)
    phash = 0x0F0F0F0F0F0F0F0F
    small_record, small = stored_image(JOB, _sha(1), url="http://x/small", size=(100, 100))
    small = small.model_copy(update={"phash": f"{phash:016x}"})
    worker.record_downloads(JOB, [DownloadItem(small_record, small, near=NearDupQuery(phash, 6))], 10)
    (crop,) = crops(JOB, _sha(1), 1)
    if table == "crop_distances":
        worker.record_detections(JOB, [(small.key, [crop])])
    inside, proceed = threading.Event(), threading.Event()

    def pause(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith(f"INSERT INTO {table}"):
            inside.set()
            proceed.wait(10)

    sa.event.listen(worker.engine, "before_cursor_execute", pause)
    if table == "detected_images":
        downstream = threading.Thread(target=worker.record_detections, args=(JOB, [(small.key, [crop])]))
    else:
        downstream = threading.Thread(target=worker.record_distances, args=(JOB, [(crop.key, 0.2)]))
    downstream.start()
    assert inside.wait(10)
    big_record, big = stored_image(JOB, _sha(2), url="http://x/big", size=(400, 400))
    big = big.model_copy(update={"phash": f"{phash ^ 1:016x}"})
    supersede = threading.Thread(
        target=crawler.record_downloads,
        args=(JOB, [DownloadItem(big_record, big, near=NearDupQuery(phash ^ 1, 6))], 10),
    )
    supersede.start()
    supersede.join(0.5)
    assert supersede.is_alive()  # it waits for the write in flight
    proceed.set()
    downstream.join(10)
    supersede.join(10)
    assert crawler.url_records(JOB, ["http://x/small"])["http://x/small"].outcome is DownloadOutcome.DUPLICATE
    assert crawler.counters(JOB) == {"downloaded": 1, "duplicates": 1}
    assert crawler.distances(JOB) == []
    worker.close()
    crawler.close()


def test_histogram_counts_equal_exact_counts(sql_url: str) -> None:
    store = SqlStateStore.open(sql_url)
    _job(store)
    rng = random.Random(5)
    edges = [MAX_DISTANCE * i / BINS for i in range(BINS + 1)]
    values = [rng.random() * 1.2 for _ in range(400)] + rng.sample(edges, 40) + [0.0, 0.0, 1.2, 2.0, 2.5, -0.01]
    keys_ = [f"jobs/{JOB}/crops/{i:024x}-000.jpg" for i in range(len(values))]
    for key, value in zip(keys_, values, strict=True):
        assert store.record_distances(JOB, [(key, value)])[key]
    for key in rng.sample(keys_, 60):  # a second score replaces the first: the value moves bins
        assert not store.record_distances(JOB, [(key, rng.random() * MAX_DISTANCE)])[key]
    recorded = [d for _, d in store.distances(JOB)]
    thresholds = [rng.random() * 1.3 for _ in range(300)] + rng.sample(edges, 60) + [recorded[7], recorded[-3]]
    thresholds += [-1.0, -0.01, 0.0, 1.995, 2.0, 2.4, 9.0, float("inf"), float("-inf")]
    exact = [sum(d <= t for d in recorded) for t in thresholds]
    assert store.count_below(JOB, thresholds) == exact
    assert [store.count_below(JOB, [t])[0] for t in thresholds[:20]] == exact[:20]
    store.reset_distances(JOB)
    assert store.count_below(JOB, [0.5, float("inf")]) == [0, 0]
    store.close()


def test_keys_sort_by_bytes_whatever_the_database_collation(sql_url: str) -> None:
    """Keys sort as Python sorts them (and as Redis does): the PostgreSQL server runs a
    language collation, under which "a-b" would sort between "aB" and "a_c"."""
    store = SqlStateStore.open(sql_url)
    _job(store)
    names = ["a-b", "aB", "a_b", "Ab", "a.b", "ab", "a b", "b", "B", "ä"]
    for name in names:
        store.record_distances(JOB, [(name, 0.5)])
    assert [k for k, _ in store.distances(JOB)] == sorted(names)
    walked, after = [], None
    while True:
        page = store.distance_page(JOB, after=after, limit=3, descending=True)
        walked += [k for k, _ in page.items]
        if page.next_after is None:
            break
        after = page.next_after
    assert walked == sorted(names, reverse=True)
    store.close()


def test_migration_creates_exactly_the_tables_and_indexes_of_the_code(empty_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(empty_url)
    with pytest.raises(SchemaMismatch, match="has no imgsift schema"):
        check_schema(engine)
    migrate(empty_url)
    migrate(empty_url)  # at head already: nothing to do
    check_schema(engine)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert tables == {*metadata.tables, "alembic_version"}
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


def test_a_database_at_another_revision_is_refused(sql_url: str) -> None:
    engine = make_engine(sql_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff0000'"))
    with pytest.raises(SchemaMismatch, match=r"ffff0000, which this code does not know.*migrate"):
        SqlStateStore.open(sql_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :head"), {"head": head_revision()})
    SqlStateStore.open(sql_url).close()
    engine.dispose()


def test_a_state_file_of_an_older_imgsift_is_refused_with_how_to_go_on(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with sqlite3.connect(path) as db:  # what the hand-written SQLite store left behind
        db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, created REAL, body TEXT NOT NULL)")
    with pytest.raises(SchemaMismatch, match=r"older imgsift.*new --out folder"):
        SqlStateStore.sqlite(path)


def test_revisions_0002_to_0004_upgrade_and_carry_the_kept_images_over(empty_url: str) -> None:
    """0002 replaces the per-image tables without carrying their rows over: it says so rather than
    drop them. 0003 changes only kept_images' band indexes, 0004 adds the near log: a job's kept
    images, taken down to 0002 (its near log dropped) and up again, are found as near duplicates,
    and 0003 and 0004 go back and forth."""
    from alembic import command

    from imgsift_common.schema import alembic_config

    engine = make_engine(empty_url)

    def upgrade(target: str, how: Callable[..., None] = command.upgrade) -> None:
        with engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            how(config, target)

    upgrade("0001")
    with engine.begin() as conn:  # a job of the old layout, with one URL outcome
        conn.execute(sa.text("INSERT INTO downloads (job_id, url_digest, body) VALUES ('j', :d, '{}')"), {"d": b"x"})
    with pytest.raises(SchemaMismatch, match=r"does not carry job records over, and downloads hold some.*--out"):
        upgrade("head")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM downloads"))
    upgrade("head")
    phash = 0x8123456789ABCDEF  # negative as a signed 64-bit value, as half the hashes are
    big_record, big = stored_image(JOB, _sha(1), url="http://x/big", size=(400, 300))
    big = big.model_copy(update={"phash": f"{phash:016x}"})
    old = SqlStateStore(engine)  # the code at 0002 and 0003 wrote the same rows, less the near log's
    _job(old)
    assert old.record_downloads(JOB, [DownloadItem(big_record, big, near=NearDupQuery(phash, 6))], 10)[0] == big_record
    upgrade("0003", command.downgrade)
    with engine.connect() as conn:
        assert "near_log" not in sa.inspect(conn).get_table_names()
    upgrade("0002", command.downgrade)
    upgrade("head")
    check_schema(engine)
    with engine.connect() as conn:
        bands = [ix["column_names"] for ix in sa.inspect(conn).get_indexes("kept_images")]
        if conn.dialect.name == "postgresql":
            options = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'kept_images'")).scalar()
            assert options == ["autovacuum_vacuum_insert_scale_factor=0.02"]
    assert sorted(bands) == [["job", f"band{i}", "near"] for i in range(4)]
    engine.dispose()
    store = SqlStateStore.open(empty_url)
    small_record, small = stored_image(JOB, _sha(2), url="http://x/small", size=(40, 30))
    small = small.model_copy(update={"phash": f"{phash ^ 0b101:016x}"})
    copy = store.record_downloads(JOB, [DownloadItem(small_record, small, near=NearDupQuery(phash ^ 0b101, 6))], 10)[0]
    assert (copy.outcome, copy.duplicate_of, copy.hamming) == (DownloadOutcome.DUPLICATE, "http://x/big", 2)
    assert (
        store.url_records(JOB, ["http://x/big"]).get("http://x/big") == big_record
        and store.get_images(JOB, [big.key]).get(big.key) == big
    )
    store.close()


def test_packed_crops_and_provenance_give_back_exactly_what_was_recorded() -> None:
    """Crops packed into a detection row (float32 only where that is exact) and a kept image's
    deflated provenance come back equal, whatever their values."""
    import struct

    from imgsift_common import keys
    from imgsift_common.messages import Candidate, Crop, SourceKind
    from imgsift_common.sqlstate import (
        _provenance,
        crop_ids,
        image_id,
        kept_url,
        pack_crops,
        pack_provenance,
        unpack_crops,
    )

    rng = random.Random(3)
    sha = _sha(7)
    image_key = keys.image_key(JOB, sha, "PNG")
    ident = image_id(JOB, image_key)[0]

    def f32(v: float) -> float:
        return float(struct.unpack("<f", struct.pack("<f", v))[0])

    for _ in range(50):
        crops = []
        for index in rng.sample(range(300), rng.randrange(0, 6)):
            exact = rng.random() < 0.5
            value = f32 if exact else float
            box = tuple(value(rng.uniform(0, 5000)) for _ in range(4))
            crops.append(Crop(
                job_id=JOB, key=keys.crop_key(JOB, keys.crop_id(sha, index)), crop_id=keys.crop_id(sha, index),
                image_key=image_key if rng.random() < 0.8 else "elsewhere/ä.jpg", box=box,
                padded_box=tuple(float(round(v)) for v in box), score=value(rng.random()),
                class_name=rng.choice([None, "dog", "dog", "Hund ä"]), whole_image=rng.random() < 0.2,
            ))  # fmt: skip
        packed = pack_crops(JOB, image_key, ident, crops)
        assert list(unpack_crops(packed, JOB, ident, image_key).values()) == crops
        assert [int.from_bytes(i[12:], "big") for i in crop_ids(ident, packed)] == [
            int(c.crop_id.rsplit("-", 1)[1]) for c in crops
        ]
    cid = keys.crop_id(sha, 0)
    detector_crop = Crop(job_id=JOB, key=keys.crop_key(JOB, cid), crop_id=cid, image_key=image_key,
                         box=(f32(10.3), f32(20.7), f32(300.1), f32(400.9)), padded_box=(0.0, 5.0, 320.0, 430.0),
                         score=f32(0.87), class_name="dog")  # fmt: skip
    narrow = pack_crops(JOB, image_key, ident, [detector_crop])
    assert len(narrow) < 60  # one detector crop (float32 values): a few dozen bytes
    assert list(unpack_crops(narrow, JOB, ident, image_key).values()) == [detector_crop]
    cid = keys.crop_id(_sha(8), 0)
    other = Crop(job_id=JOB, key=keys.crop_key(JOB, cid), crop_id=cid, image_key=image_key, box=(0, 0, 1, 1),
                 padded_box=(0, 0, 1, 1), score=0.5, class_name="dog")  # fmt: skip
    with pytest.raises(ValueError, match=r"keys\.crop_key"):
        pack_crops(JOB, image_key, ident, [other])  # not a crop of this image's hash
    for candidate, url in [
        (Candidate(image_url="http://x/a.jpg", source=SourceKind.URLS), "http://x/a.jpg"),
        (Candidate(image_url="http://x/a.jpg", page_url="http://x/", source=SourceKind.SITE, title="ä " * 40,
                   license="CC0", license_url="https://l/", author="Ann"), "http://x/a.jpg?size=large"),
    ]:  # fmt: skip
        packed = pack_provenance(url, candidate)
        assert kept_url(packed) == url
        got = _provenance(packed)
        c = candidate
        expected = [url, c.image_url, c.page_url, c.title, c.license, c.license_url, c.author]
        assert [got[0], got[1] or got[0], *got[2:]] == expected


def test_downstream_writes_do_not_wait_for_a_download_batch_deciding(sql_url: str) -> None:
    """A download batch holds the job's dedup and limit decisions (other batches wait), but the
    detector's and the Siamese worker's writes go on beside it; only a supersede stops them."""
    if sql_url.startswith("sqlite"):
        pytest.skip("SQLite has one writer at a time")
    worker, crawler = SqlStateStore.open(sql_url), SqlStateStore.open(sql_url)
    _job(worker)
    record_stored(worker, JOB, _sha(1))
    (crop,) = crops(JOB, _sha(1), 1)
    worker.record_detections(JOB, [(keys.image_key(JOB, _sha(1), "JPEG"), [crop])])
    inside, proceed = threading.Event(), threading.Event()

    def pause(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("INSERT INTO kept_images"):  # the batch has taken its decision lock
            inside.set()
            proceed.wait(10)

    sa.event.listen(crawler.engine, "before_cursor_execute", pause)
    record, image = stored_image(JOB, _sha(2), url="http://x/2")
    batch = threading.Thread(target=crawler.record_downloads, args=(JOB, [DownloadItem(record, image)], 10))
    batch.start()
    assert inside.wait(10)
    scored = threading.Thread(target=worker.record_distances, args=(JOB, [(crop.key, 0.3)]))
    scored.start()
    scored.join(5)
    assert not scored.is_alive()  # it did not wait for the batch
    third = SqlStateStore.open(sql_url)
    blocked = threading.Thread(
        target=third.record_downloads, args=(JOB, [DownloadItem(*stored_image(JOB, _sha(3), url="http://x/3"))], 10)
    )
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # a second batch waits for the first one's decisions
    proceed.set()
    batch.join(10)
    blocked.join(10)
    assert worker.distances(JOB) == [(crop.key, 0.3)]
    assert worker.counters(JOB)["downloaded"] == 3
    for store in (worker, crawler, third):
        store.close()


@pytest.mark.parametrize("between", [1, 1 + NEAR_LOG_SLOTS])
@pytest.mark.parametrize("first_larger", [False, True])
def test_a_near_copy_kept_while_a_batch_looks_up_is_seen_under_the_gate(
    sql_url: str, first_larger: bool, between: int
) -> None:
    """A batch has run its band lookup (before the gate) when a near copy of its image is kept by
    another batch: under the gate it still finds it (in the near log, or, once the log has moved on
    past what it read, by looking up again), so exactly one copy is kept whichever is larger."""
    if sql_url.startswith("sqlite"):
        pytest.skip("SQLite has one writer at a time: its batches look up under their write lock")
    slow, fast = SqlStateStore.open(sql_url), SqlStateStore.open(sql_url)
    _job(slow)
    phash = 0x0123456789ABCDEF
    sides = (400, 100) if first_larger else (100, 400)
    looked, proceed = threading.Event(), threading.Event()

    def pause(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "FOR NO KEY UPDATE" in statement:  # the gate: the band lookup is done
            looked.set()
            proceed.wait(10)

    sa.event.listen(slow.engine, "before_cursor_execute", pause)
    record, image = stored_image(JOB, _sha(1), url="http://x/slow", size=(sides[0], sides[0]))
    image = image.model_copy(update={"phash": f"{phash:016x}"})
    done: list[DownloadRecord] = []
    batch = threading.Thread(
        target=lambda: done.extend(
            slow.record_downloads(JOB, [DownloadItem(record, image, near=NearDupQuery(phash, 6))], 1000)
        )
    )
    batch.start()
    assert looked.wait(10)
    rng = random.Random(5)
    for i in range(between):  # the near copy, then batches of far images that fill the log's ring
        other = phash ^ 0b11 if i == 0 else rng.getrandbits(64)
        near_record, near_image = stored_image(JOB, _sha(2 + i), url=f"http://x/{i}", size=(sides[1], sides[1]))
        near_image = near_image.model_copy(update={"phash": f"{other:016x}"})
        near = DownloadItem(near_record, near_image, near=NearDupQuery(other, 6))
        assert fast.record_downloads(JOB, [near], 1000) == [near_record]
    proceed.set()
    batch.join(10)
    small, large = ("http://x/0", "http://x/slow") if first_larger else ("http://x/slow", "http://x/0")
    records = fast.url_records(JOB, [small, large])
    copy = records[small]
    assert (copy.outcome, copy.duplicate_of, copy.hamming) == (DownloadOutcome.DUPLICATE, large, 2)
    assert records[large].outcome is DownloadOutcome.STORED
    assert fast.counters(JOB) == {"downloaded": between, "duplicates": 1}
    assert done[0].outcome is (DownloadOutcome.STORED if first_larger else DownloadOutcome.DUPLICATE)
    slow.close()
    fast.close()
