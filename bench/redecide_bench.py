"""Re-deciding a job of 100,000 crops at a new threshold, through the real API, timed.

    .venv/bin/python bench/redecide_bench.py          # --crops 100000

Starts the services' stores of its own (a PostgreSQL in a temp dir, migrated by the services'
migrate step, and a redis-server for the API's rate limits and locks), fills one job with
``--crops`` crops and distances in the store's tables (its histogram bins and counters written
by the store's own transaction code, as the workers' writes leave them), serves the API with
uvicorn on loopback, then times, over 20 thresholds:
``PATCH /v1/jobs/{id}`` (the re-decision: new counts, estimates and histogram in the answer,
counted from the histogram bins plus one indexed range count per partly covered bin),
``GET /v1/jobs/{id}/crops?accepted=true&limit=50`` (the first page of the new partition) and
the same listing from a cursor halfway through the accepted crops (a keyset page: its cost
must not grow with its depth). The baseline in the same run: one bare SQL count of the
accepted crops on the (job, distance) index. Goal (issue 8): under 100 ms through the API.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
from crawl_bench import free_port, service_stores, wait_for_port  # bench/ is on the path of a bench script

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "isk_redecidebench_0123456789abcdef0123456789ab"
FILL_CHUNK = 5000  # rows per transaction while filling


def fill(database_url: str, job_id: str, owner: str, n: int) -> None:
    """One running job of ``owner`` with ``n`` crops and distances, written in the store's transactions."""
    from imgsift_common import keys, sqlstate
    from imgsift_common import schema as t
    from imgsift_common.messages import Crop, Job, JobSpec, JobState, SourceKind, SourceSpec
    from imgsift_common.sqlstate import SqlStateStore
    from imgsift_common.state import Counter

    state = SqlStateStore.open(database_url)
    spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://127.0.0.1/x"])], target="dog")
    distances = [0.5, 0.55, 0.6, 0.7]
    state.create_job(Job(id=job_id, spec=spec, owner=owner, state=JobState.RUNNING, reference_distances=distances))
    rng = random.Random(0)
    for start in range(0, n, FILL_CHUNK):
        detected, distances = [], []
        # The store's own write transaction: it adds up the counters and histogram bins the
        # rows below move, and writes them at its end, as record_detections/record_distances do.
        with state._write(job_id, numbered=True) as tx:
            for i in range(start, min(start + FILL_CHUNK, n)):
                sha = hashlib.sha256(str(i).encode()).hexdigest()  # crop ids take the hash's first 24 digits
                crop_id = keys.crop_id(sha, 0)
                key = keys.crop_key(job_id, crop_id)
                image_key = keys.image_key(job_id, sha, "JPEG")
                crop = Crop(job_id=job_id, key=key, crop_id=crop_id, image_key=image_key,
                            box=(0, 0, 10, 10), padded_box=(0, 0, 11, 11), score=0.9, class_name="dog")  # fmt: skip
                image, tail = sqlstate.image_id(job_id, image_key)
                packed = sqlstate.pack_crops(job_id, image_key, image, [crop])
                detected.append({"job": tx.job, "image": image, "tail": tail, "crops": 1, "packed": packed})
                distance = rng.random() * 1.5
                distances.append({"job": tx.job, "crop": sqlstate.crop_id(job_id, key), "distance": distance})
                tx.add_distance(distance)
            tx.conn.execute(t.detected_images.insert(), detected)
            tx.conn.execute(t.crop_distances.insert(), distances)
            for counter in (Counter.DETECTED, Counter.CROPS, Counter.COMPARED):
                tx.incr(counter, len(detected))
    state.close()


def api_key_id(redis_url: str) -> str:
    """The bench's admin key, registered as the API registers its bootstrap key; its id (a job's owner)."""
    import redis

    from imgsift_common.apikeys import ApiKeyStore

    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        return ApiKeyStore(client).add(API_KEY, "bootstrap (IMGSIFT_API_BOOTSTRAP_KEY)", admin=True).id


def halfway_cursor(conn: psycopg.Connection, job_id: str, threshold: float) -> tuple[str, int]:
    """The API's cursor after the middle accepted crop, and how many accepted crops follow it."""
    from imgsift_api.views import encode_cursor
    from imgsift_common.sqlstate import crop_key_of

    accepted = count_accepted(conn, job_id, threshold)
    middle = accepted // 2
    row = conn.execute(
        "SELECT distance, crop FROM crop_distances WHERE job = (SELECT num FROM job_numbers WHERE job_id = %s)"
        " AND distance <= %s ORDER BY distance, crop OFFSET %s LIMIT 1",
        (job_id, threshold, middle),
    ).fetchone()
    assert row is not None
    return encode_cursor((float(row[0]), crop_key_of(job_id, bytes(row[1])))), accepted - middle - 1


def count_accepted(conn: psycopg.Connection, job_id: str, threshold: float) -> int:
    query = (
        "SELECT count(*) FROM crop_distances WHERE job = (SELECT num FROM job_numbers WHERE job_id = %s)"
        " AND distance <= %s"
    )
    row = conn.execute(query, (job_id, threshold)).fetchone()
    assert row is not None
    return int(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=100_000)
    parser.add_argument(
        "--measure-when",
        type=Path,
        help="after the fill, wait until this file exists before measuring (to fill while the machine is busy "
        "and measure once it is quiet)",
    )
    args = parser.parse_args()
    api_port = free_port()
    job_id = "f" * 32
    with tempfile.TemporaryDirectory() as tmp, service_stores(Path(tmp)) as (database_url, redis_url):
        print(f"filling {args.crops} crops ...", flush=True)
        fill(database_url, job_id, api_key_id(redis_url), args.crops)
        # What autovacuum does to a table after bulk inserts, done now: statistics, and the
        # visibility map that lets a range count read the index alone.
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
        if args.measure_when is not None:
            print(f"filled; waiting for {args.measure_when} to measure", flush=True)
            while not args.measure_when.exists():
                time.sleep(5)
        env = {**os.environ, "IMGSIFT_DATABASE_URL": database_url, "IMGSIFT_REDIS_URL": redis_url,
               "IMGSIFT_API_BOOTSTRAP_KEY": API_KEY, "IMGSIFT_API_RATE_LIMIT": "100000/minute",
               "IMGSIFT_STORAGE": "local", "IMGSIFT_LOCAL_STORAGE_DIR": str(Path(tmp) / "objects"),
               "IMGSIFT_LOG_LEVEL": "WARNING"}  # fmt: skip
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "imgsift_api.main:app", "--host", "127.0.0.1",
             "--port", str(api_port), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_port(api_port)
            thresholds = [0.3 + 0.04 * i for i in range(20)]
            bare, patch, page, deep = [], [], [], []
            headers = {"Authorization": f"Bearer {API_KEY}"}
            with (
                httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=headers, timeout=30) as http,
                psycopg.connect(database_url, autocommit=True) as conn,
            ):
                http.get(f"/v1/jobs/{job_id}").raise_for_status()  # warm-up
                for t in thresholds:
                    start = time.perf_counter()
                    accepted = count_accepted(conn, job_id, t)
                    bare.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    answer = http.patch(f"/v1/jobs/{job_id}", json={"threshold": t})
                    patch.append(time.perf_counter() - start)
                    assert answer.status_code == 200, answer.text
                    # The counts from the histogram bins the fill wrote are the rows' own.
                    assert answer.json()["counts"]["accepted"] == accepted, (answer.json()["counts"], accepted)
                    start = time.perf_counter()
                    listed = http.get(f"/v1/jobs/{job_id}/crops", params={"accepted": "true", "limit": 50})
                    page.append(time.perf_counter() - start)
                    assert listed.status_code == 200 and len(listed.json()["items"]) == 50, listed.text[:500]
                    cursor, after = halfway_cursor(conn, job_id, t)
                    start = time.perf_counter()
                    params = {"accepted": "true", "limit": 50, "cursor": cursor}
                    listed = http.get(f"/v1/jobs/{job_id}/crops", params=params)
                    deep.append(time.perf_counter() - start)
                    assert listed.status_code == 200, listed.text[:500]
                    assert len(listed.json()["items"]) == min(50, after), listed.text[:500]
        finally:
            api.terminate()
            api.wait(10)

    def ms(values: list[float]) -> str:
        ordered = sorted(values)
        return f"median {statistics.median(values) * 1000:6.1f} ms, worst {ordered[-1] * 1000:6.1f} ms"

    print(f"{args.crops} crops, 20 thresholds")
    print(f"bare SQL count of accepted (index range):  {ms(bare)}")
    print(f"PATCH threshold (re-decide, full status):  {ms(patch)}")
    print(f"GET first page of accepted crops:          {ms(page)}")
    print(f"GET a page halfway in (keyset cursor):     {ms(deep)}")
    worst = max(max(patch), max(page), max(deep))
    print(f"goal: under 100 ms through the API -> {'met' if worst < 0.1 else 'NOT met'} (worst {worst * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
