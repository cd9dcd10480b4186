"""Job-state store at scale: what one stored image costs the store, and how fast it records.

    .venv/bin/python bench/state_bench.py --store sql --images 100000
    # today's Redis store, from the last commit before the move (its tree on PYTHONPATH):
    PYTHONPATH=<that tree's common, services...> .venv/bin/python bench/state_bench.py --store redis --images 100000

Records ``--images`` images through the store as the workers do: per image ``record_download``
(an ~100-character URL, page URL, title, licence, author, sizes, SHA-256, perceptual hash and
the crawler's near-duplicate query), ``record_detection`` with 3 crops (boxes, padded boxes,
scores, class names) and ``record_distance`` for each crop. The first ``--single-share`` of the
images is recorded by 1 writer, the rest by ``--writers`` writers (processes, each its own store
connection), so both rates come from one job. Then it reports, per stored image:

- ``--store sql``: PostgreSQL disk (``pg_database_size`` and the tables' ``pg_total_relation_size``
  after CHECKPOINT and VACUUM ANALYZE, less the empty migrated database's) and the server's
  resident memory (the sum of its processes' proportional sets), and Redis ``used_memory``
  over the job (the services' Redis keeps locks and idempotency keys only);
- ``--store redis``: Redis ``used_memory`` over the job (the whole job is in it);
- images recorded per second with 1 writer and with ``--writers``;
- re-decide latency: ``count_below`` at the calibration grid as ``threshold.for_job`` reads it,
  and ``threshold.for_job`` itself (medians of ``--repeat``);
- listing latency: a keyset page of ``distance_page`` (the first page and one from the middle);
- export memory: peak RSS of a child process streaming the job's JSONL manifest (every crop),
  less its RSS before the export (``--no-export`` skips it).

PostgreSQL and Redis are the bench's own (``crawl_bench.postgres_server`` / ``redis_server``:
a PostgreSQL 15 in a temp dir with fsync off, as the tests run it). Only what both trees have
is imported at the top, so ``--store redis`` runs against the tree before the move.
Writes ``<out>/state_bench_<store>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crawl_bench import postgres_server, redis_server

from imgsift_common import keys
from imgsift_common.messages import (
    Candidate,
    Crop,
    DownloadOutcome,
    DownloadRecord,
    Job,
    JobSpec,
    Limits,
    SourceKind,
    SourceSpec,
    StoredImage,
)
from imgsift_common.neardup import NearDupQuery
from imgsift_common.state import DownloadItem

CROPS = 3
# --per-crop: one write per crop's distance, as before the batch write (read by the spawned writers too)
PER_CROP = os.environ.get("IMGSIFT_STATE_BENCH_PER_CROP") == "1"
# --one-by-one: one write per image's download, detection and distances, as before the batch writes
ONE_BY_ONE = os.environ.get("IMGSIFT_STATE_BENCH_ONE_BY_ONE") == "1"
# The services' default batch sizes: CrawlerSettings.download_batch_size, DetectorSettings.batch_size,
# SiameseSettings.batch_size (crops per forward pass, recorded in one write).
DOWNLOAD_BATCH, DETECT_BATCH, COMPARE_BATCH = 16, 16, 32
NEAR_DISTANCE = 6  # the crawler's default (imgsift_crawler.settings)
THRESHOLD = 0.9  # JobSpec's default
JOB_ID = "state-bench"


# ============================================================================ the records


def _f32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def image_records(job_id: str, i: int) -> tuple[DownloadRecord, StoredImage, list[Crop], list[float]]:
    """Image ``i``'s download record, stored image, crops and distances: realistic sizes, seeded by ``i``."""
    rng = random.Random(i)
    sha = rng.getrandbits(256).to_bytes(32, "big").hex()
    phash = rng.getrandbits(64)
    name = f"Golden_retriever_{i:09d}_in_a_park_on_a_sunny_afternoon"
    url = f"https://upload.wikimedia.org/wikipedia/commons/thumb/{sha[0]}/{sha[:2]}/{name}.jpg"  # ~100 chars
    candidate = Candidate(
        image_url=url,
        page_url=f"https://commons.wikimedia.org/wiki/File:{name}.jpg",
        source=SourceKind.WIKIMEDIA,
        title=f"Golden retriever {i} in a park on a sunny afternoon",
        license="CC BY-SA 4.0",
        license_url="https://creativecommons.org/licenses/by-sa/4.0/",
        author=f"Photographer {rng.randrange(100_000):05d}",
    )
    width, height = rng.randrange(640, 4000), rng.randrange(480, 3000)
    key = keys.image_key(job_id, sha, "JPEG")
    image = StoredImage(
        job_id=job_id,
        key=key,
        sha256=sha,
        width=width,
        height=height,
        format="JPEG",
        bytes=rng.randrange(50_000, 2_000_000),
        fetched_at=datetime.now(UTC),
        provenance=candidate,
        phash=f"{phash:016x}",
    )
    record = DownloadRecord(url=url, outcome=DownloadOutcome.STORED, sha256=sha, image_key=key)
    crops = []
    for index in range(CROPS):
        x, y = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        w, h = rng.uniform(40, width / 2), rng.uniform(40, height / 2)
        # As the detector makes them: YOLO's float32 box and score, the padded box in whole pixels.
        box = (_f32(x), _f32(y), _f32(x + w), _f32(y + h))
        padded = (
            float(max(0, math.floor(box[0] - 8))),
            float(max(0, math.floor(box[1] - 8))),
            float(min(width, math.ceil(box[2] + 8))),
            float(min(height, math.ceil(box[3] + 8))),
        )
        crop_id = keys.crop_id(sha, index)
        crops.append(
            Crop(
                job_id=job_id,
                key=keys.crop_key(job_id, crop_id),
                crop_id=crop_id,
                image_key=key,
                box=box,
                padded_box=padded,
                score=_f32(rng.uniform(0.25, 0.99)),
                class_name="dog",
            )
        )
    distances = [min(2.0, max(0.0, rng.gauss(0.9, 0.3))) for _ in range(CROPS)]
    return record, image, crops, distances


def near_query(image: StoredImage) -> Any:
    """The crawler's near-duplicate query for the image's perceptual hash, at its default settings."""
    return NearDupQuery(int(image.phash or "0", 16), NEAR_DISTANCE)


def record_image(store: Any, job_id: str, i: int, max_images: int) -> None:
    """One image as the crawler, the detector and the Siamese worker recorded it before the batch
    writes (``--one-by-one``), or as the tree before the move records it."""
    record, image, crops, distances = image_records(job_id, i)
    near = near_query(image)
    final = store.record_downloads(job_id, [DownloadItem(record, image, near=near)], max_images)[0]
    if final.outcome is not DownloadOutcome.STORED:
        return  # random hashes: a rare one lands within 6 bits of another, a near-duplicate, as in a crawl
    store.record_detections(job_id, [(image.key, crops)])
    scored = [(crop.key, distance) for crop, distance in zip(crops, distances, strict=True)]
    if hasattr(store, "record_distances") and not PER_CROP:  # the worker's one write per scored batch
        store.record_distances(job_id, scored)
    else:  # the tree before the move, or --per-crop: one write per crop
        for key, distance in scored:
            store.record_distances(job_id, [(key, distance)])


def record_images(store: Any, job_id: str, first: int, last: int, max_images: int) -> None:
    """Images [first, last) as the workers record them: one write per download task's URLs
    (``DOWNLOAD_BATCH``), per detect batch (``DETECT_BATCH``) and per scored batch of crops
    (``COMPARE_BATCH``), the services' default batch sizes; one image at a time where the tree
    has no batch writes (the one before the move) or ``--one-by-one`` is asked."""
    if ONE_BY_ONE or not hasattr(store, "record_downloads"):
        for i in range(first, last):
            record_image(store, job_id, i, max_images)
        return

    scored: list[tuple[str, float]] = []
    for start in range(first, last, DOWNLOAD_BATCH):
        batch = [image_records(job_id, i) for i in range(start, min(last, start + DOWNLOAD_BATCH))]
        items = [DownloadItem(record, image, near_query(image)) for record, image, _, _ in batch]
        finals = store.record_downloads(job_id, items, max_images)
        # A near-duplicate (a rare random hash within 6 bits of another) goes no further, as in a crawl.
        batch = [b for b, final in zip(batch, finals, strict=True) if final.outcome is DownloadOutcome.STORED]
        for lo in range(0, len(batch), DETECT_BATCH):
            detected = [(image.key, crops) for _, image, crops, _ in batch[lo : lo + DETECT_BATCH]]
            store.record_detections(job_id, detected)
        scored += [(crop.key, d) for _, _, crops, distances in batch for crop, d in zip(crops, distances, strict=True)]
        while len(scored) >= COMPARE_BATCH:
            store.record_distances(job_id, scored[:COMPARE_BATCH])
            scored = scored[COMPARE_BATCH:]
    if scored:
        store.record_distances(job_id, scored)


# ============================================================================ the stores


def open_store(kind: str, database_url: str, redis_url: str) -> Any:
    if kind == "redis":
        from imgsift_common.state import RedisStateStore  # only in the tree before the move

        return RedisStateStore.from_url(redis_url)
    from imgsift_common.servicestate import ServiceStateStore

    return ServiceStateStore.connect(database_url, redis_url)


def close_store(store: Any) -> None:
    if hasattr(store, "close"):
        store.close()


def writer(kind: str, database_url: str, redis_url: str, first: int, last: int, max_images: int, start: Any) -> None:
    store = open_store(kind, database_url, redis_url)
    try:
        store.get_job(JOB_ID)  # connected before the clock starts
        start.wait()
        record_images(store, JOB_ID, first, last, max_images)
    finally:
        close_store(store)


def record_range(args: argparse.Namespace, urls: tuple[str, str], first: int, last: int, writers: int) -> float:
    """Record images [first, last) with ``writers`` processes; images per second (wall time of the phase)."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(writers + 1)
    bounds = [first + (last - first) * w // writers for w in range(writers + 1)]
    procs = [
        ctx.Process(target=writer, args=(args.store, *urls, bounds[w], bounds[w + 1], args.images, start))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    start.wait()
    began = time.perf_counter()
    sample = (began, sampled(urls[0]))
    for p in procs:
        while p.is_alive():
            p.join(args.progress or None)
            if args.progress and p.is_alive() and time.perf_counter() - sample[0] >= args.progress:
                sample = progress(urls[0], began, sample)
        if p.exitcode != 0:
            raise SystemExit(f"a writer failed (exit {p.exitcode})")
    return (last - first) / (time.perf_counter() - began)


def sampled(database_url: str) -> tuple[int, int]:
    """Images stored so far and the database's size now (unvacuumed), read from the side; (0, 0) without SQL."""
    if not database_url:
        return 0, 0
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM kept_images), pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def progress(database_url: str, began: float, last: tuple[float, tuple[int, int]]) -> tuple[float, tuple[int, int]]:
    """Print a progress line (``--progress`` seconds apart): images, their rate since the last line, disk per image."""
    now, (images, size) = time.perf_counter(), sampled(database_url)
    rate = (images - last[1][0]) / (now - last[0])
    per_image = f"{size / images:,.0f} B" if images else "-"
    stamp = time.strftime("%H:%M:%S")
    print(f"  {stamp} +{now - began:,.0f} s: {images:,} images, {rate:,.0f}/s since the last line, "
          f"database {per_image} an image (unvacuumed), load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return now, (images, size)


def median_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


# ============================================================================ what it costs


def redis_memory(redis_url: str) -> dict[str, int]:
    import redis

    info = redis.Redis.from_url(redis_url).info("memory")
    return {"used_memory": int(info["used_memory"]), "used_memory_rss": int(info["used_memory_rss"])}


def postgres_disk(database_url: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        conn.execute("VACUUM ANALYZE")
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        tables = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname = 'public' ORDER BY 2 DESC"
        ).fetchall()
        data = conn.execute("SHOW data_directory").fetchone()
    assert size is not None and data is not None
    postmaster = int((Path(data[0]) / "postmaster.pid").read_text().split()[0])
    return {"database": int(size[0]), "tables": {name: int(n) for name, n in tables}, "postmaster": postmaster}


def postgres_memory(pid: int) -> dict[str, int]:
    """The server's resident memory: the postmaster and its children, proportional sets summed (and RSS)."""
    import psutil

    postmaster = psutil.Process(pid)
    pss = rss = 0
    for proc in [postmaster, *postmaster.children()]:
        try:
            full = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        pss += full.pss
        rss += full.rss
    return {"pss": pss, "rss": rss}


def export_memory(args: argparse.Namespace, urls: tuple[str, str]) -> dict[str, Any]:
    """Peak RSS of a child process streaming the job's JSONL manifest, and its RSS before it started."""
    cmd = [sys.executable, __file__, "--export-child", "--store", args.store, "--database-url", urls[0]]
    out = subprocess.run([*cmd, "--redis-url", urls[1]], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def export_child(args: argparse.Namespace) -> None:
    from imgsift_common.exports import ExportFormat, export

    def rss() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    store = open_store(args.store, args.database_url, args.redis_url)
    job = store.get_job(JOB_ID)
    before = rss()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "manifest.jsonl"
        result = export(ExportFormat.JSONL, job, store, None, 4.0, dest)  # type: ignore[arg-type]
        size = dest.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - began
    close_store(store)
    print(json.dumps({"rss_before": before, "peak_rss": peak, "rows": result.crops, "bytes": size, "s": seconds}))


# ============================================================================ the run


@contextmanager
def stores(kind: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """(database URL, Redis URL): a PostgreSQL database of the bench's own where the store needs one."""
    with redis_server(workdir) as redis_url:
        if kind == "redis":
            yield "", redis_url
            return
        with postgres_server() as server:
            yield server.create_database(migrated=True), redis_url


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.images
    single = max(1, min(n, round(n * args.single_share)))
    with tempfile.TemporaryDirectory() as tmp, stores(args.store, Path(tmp)) as urls:
        database_url, redis_url = urls
        store = open_store(args.store, database_url, redis_url)
        spec = JobSpec(
            sources=[SourceSpec(kind=SourceKind.URLS, urls=["https://example.org/a.jpg"])],
            target="dog",
            limits=Limits(max_images=n, per_source=n),
        )
        job = Job(id=JOB_ID, spec=spec, reference_distances=[0.3, 0.35, 0.4, 0.5, 0.55])
        store.create_job(job)
        empty = postgres_disk(database_url) if database_url else None
        redis_before = redis_memory(redis_url)
        print(f"recording {single:,} images with 1 writer, {n - single:,} with {args.writers} ...", flush=True)
        rate_1 = record_range(args, urls, 0, single, 1)
        rate_w = record_range(args, urls, single, n, args.writers) if n > single else math.nan
        redis_after = redis_memory(redis_url)
        counters = store.counters(JOB_ID)
        stored = counters.get("downloaded", 0)
        # Random 64-bit hashes: about 2 pairs in a million images fall within the crawler's 6 bits.
        if n - stored > max(2, n // 100_000) or counters.get("compared") != stored * CROPS:
            raise SystemExit(f"counters do not add up: {counters}")

        from imgsift_common import threshold
        from imgsift_common.calibration import HISTOGRAM_BINS, MAX_DISTANCE, grid_for

        edges = [round(MAX_DISTANCE * i / HISTOGRAM_BINS, 4) for i in range(HISTOGRAM_BINS + 1)]
        grid = [*grid_for(job.reference_distances, THRESHOLD, *edges), math.inf]
        middle = store.distance_page(JOB_ID, max_distance=THRESHOLD, limit=1, descending=True).items[0]
        latency = {
            "count_below_grid": median_ms(lambda: store.count_below(JOB_ID, grid), args.repeat),
            "threshold_for_job": median_ms(lambda: threshold.for_job(job, store), args.repeat),
            "distance_page_first": median_ms(lambda: store.distance_page(JOB_ID, limit=100), args.repeat),
            "distance_page_middle": median_ms(
                lambda: store.distance_page(JOB_ID, after=(middle[1], middle[0]), limit=100), args.repeat
            ),
        }
        result: dict[str, Any] = {
            "store": args.store,
            "writes": "per crop" if PER_CROP else "one by one" if ONE_BY_ONE else "batched as the workers",
            "images": n,
            "crops": stored * CROPS,
            "writers": args.writers,
            "images_per_s_1_writer": rate_1,
            "images_per_s_n_writers": rate_w,
            "single_writer_images": single,
            "redis_used_memory_before": redis_before["used_memory"],
            "redis_used_memory_after": redis_after["used_memory"],
            "redis_used_memory_rss_after": redis_after["used_memory_rss"],
            "stored_images": stored,
            "redis_bytes_per_image": (redis_after["used_memory"] - redis_before["used_memory"]) / stored,
            "latency_ms": latency,
            "grid_thresholds": len(grid),
            "imgsift_common": str(Path(keys.__file__).resolve().parent),
        }
        if database_url and empty is not None:
            disk = postgres_disk(database_url)
            grown = disk["database"] - empty["database"]
            tables = {k: v - empty["tables"].get(k, 0) for k, v in disk["tables"].items()}
            result |= {
                "pg_database_bytes": disk["database"],
                "pg_empty_database_bytes": empty["database"],
                "pg_disk_bytes_per_image": grown / stored,
                "pg_tables_bytes_per_image": sum(tables.values()) / stored,
                "pg_tables_grown": {k: v for k, v in tables.items() if v > 0},
                "pg_memory": postgres_memory(disk["postmaster"]),
            }
        close_store(store)
        if not args.no_export:
            result["export"] = export_memory(args, urls)
    return result


def table(r: dict[str, Any]) -> str:
    mb = 1024 * 1024
    rows = [
        ("store", r["store"]),
        ("images (crops)", f"{r['images']:,} ({r['crops']:,})"),
        ("images/s, 1 writer", f"{r['images_per_s_1_writer']:,.0f}"),
        (f"images/s, {r['writers']} writers", f"{r['images_per_s_n_writers']:,.0f}"),
        ("Redis used_memory per image (B)", f"{r['redis_bytes_per_image']:,.0f}"),
    ]
    if "pg_disk_bytes_per_image" in r:
        rows += [
            ("PostgreSQL disk per image (B), database", f"{r['pg_disk_bytes_per_image']:,.0f}"),
            ("PostgreSQL disk per image (B), tables", f"{r['pg_tables_bytes_per_image']:,.0f}"),
            ("PostgreSQL server PSS (MB)", f"{r['pg_memory']['pss'] / mb:,.0f}"),
        ]
    rows += [(f"{k} (ms, median)", f"{v:.2f}") for k, v in r["latency_ms"].items()]
    if "export" in r:
        e = r["export"]
        rows += [
            ("export JSONL rows", f"{e['rows']:,} in {e['s']:.1f} s"),
            ("export peak RSS (MB) / before (MB)", f"{e['peak_rss'] / mb:,.0f} / {e['rss_before'] / mb:,.0f}"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["sql", "redis"], default="sql")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--single-share", type=float, default=0.2, help="share of the images recorded by 1 writer")
    parser.add_argument("--repeat", type=int, default=9, help="runs of each latency measurement (median)")
    parser.add_argument("--no-export", action="store_true", help="skip the export memory measurement")
    parser.add_argument("--out", type=Path, default=Path(".bench"))
    parser.add_argument("--per-crop", action="store_true", help="one by one, and each crop's distance in its own write")
    parser.add_argument(
        "--one-by-one", action="store_true", help="one write per image's download, detection and distances"
    )
    parser.add_argument(
        "--progress", type=float, default=0.0, help="print images, rate and disk per image every this many seconds"
    )
    parser.add_argument("--export-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.per_crop:
        os.environ["IMGSIFT_STATE_BENCH_PER_CROP"] = "1"  # the spawned writers read it at import
    if args.one_by_one or args.per_crop:
        os.environ["IMGSIFT_STATE_BENCH_ONE_BY_ONE"] = "1"
    if args.export_child:
        export_child(args)
        return
    began = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "-per-crop" if args.per_crop else "-one-by-one" if args.one_by_one else ""
    path = args.out / f"state_bench_{args.store}{mode}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
