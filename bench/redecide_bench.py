"""Re-deciding a job of 100,000 crops at a new threshold, through the real API, timed.

    .venv/bin/python bench/redecide_bench.py          # --crops 100000

Starts its own redis-server, fills one job with ``--crops`` crops and distances (as the
workers record them), serves the API with uvicorn on loopback, then times, over 20 thresholds:
``PATCH /v1/jobs/{id}`` (the re-decision: new counts, estimates and histogram in the answer)
and ``GET /v1/jobs/{id}/crops?accepted=true&limit=50`` (the first page of the new partition).
The baseline in the same run: one bare Redis ZCOUNT of the accepted crops. Goal (issue 8):
under 100 ms through the API.
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
import redis
from crawl_bench import free_port, wait_for_port  # bench/ is on the path of a bench script

ROOT = Path(__file__).resolve().parents[1]


def fill(redis_url: str, job_id: str, n: int) -> None:
    from imgsift_common import keys
    from imgsift_common.messages import Crop, Job, JobSpec, JobState, SourceKind, SourceSpec
    from imgsift_common.state import RedisStateStore

    state = RedisStateStore.from_url(redis_url)
    spec = JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["http://127.0.0.1/x"])], target="dog")
    state.create_job(Job(id=job_id, spec=spec, state=JobState.RUNNING, reference_distances=[0.5, 0.55, 0.6, 0.7]))
    client = redis.Redis.from_url(redis_url)
    rng = random.Random(0)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        sha = hashlib.sha256(str(i).encode()).hexdigest()  # crop ids take the hash's first 24 digits
        crop_id = keys.crop_id(sha, 0)
        key = keys.crop_key(job_id, crop_id)
        crop = Crop(job_id=job_id, key=key, crop_id=crop_id, image_key=keys.image_key(job_id, sha, "JPEG"),
                    box=(0, 0, 10, 10), padded_box=(0, 0, 11, 11), score=0.9, class_name="dog")  # fmt: skip
        pipe.hset(f"imgsift:job:{job_id}:crops", key, crop.model_dump_json())
        pipe.zadd(f"imgsift:job:{job_id}:dist", {key: rng.random() * 1.5})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.hset(f"imgsift:job:{job_id}:counters", mapping={"detected": n, "crops": n, "compared": n})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=100_000)
    args = parser.parse_args()
    redis_port, api_port = free_port(), free_port()
    job_id = "f" * 32
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        api = None
        try:
            wait_for_port(redis_port)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            print(f"filling {args.crops} crops ...", flush=True)
            fill(redis_url, job_id, args.crops)
            env = {**os.environ, "IMGSIFT_REDIS_URL": redis_url, "IMGSIFT_STORAGE": "local",
                   "IMGSIFT_LOCAL_STORAGE_DIR": str(Path(tmp) / "objects"), "IMGSIFT_LOG_LEVEL": "WARNING"}  # fmt: skip
            api = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "imgsift_api.main:app", "--host", "127.0.0.1",
                 "--port", str(api_port), "--log-level", "warning"],
                env=env, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            wait_for_port(api_port)
            client = redis.Redis.from_url(redis_url)
            thresholds = [0.3 + 0.04 * i for i in range(20)]
            bare, patch, page = [], [], []
            with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
                http.get(f"/v1/jobs/{job_id}")  # warm-up
                for t in thresholds:
                    start = time.perf_counter()
                    client.zcount(f"imgsift:job:{job_id}:dist", "-inf", t)
                    bare.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    answer = http.patch(f"/v1/jobs/{job_id}", json={"threshold": t})
                    patch.append(time.perf_counter() - start)
                    assert answer.status_code == 200, answer.text
                    start = time.perf_counter()
                    listed = http.get(f"/v1/jobs/{job_id}/crops", params={"accepted": "true", "limit": 50})
                    page.append(time.perf_counter() - start)
                    assert listed.status_code == 200 and len(listed.json()["items"]) == 50, listed.text[:500]
        finally:
            if api:
                api.terminate()
            server.terminate()

    def ms(values: list[float]) -> str:
        ordered = sorted(values)
        return f"median {statistics.median(values) * 1000:6.1f} ms, worst {ordered[-1] * 1000:6.1f} ms"

    print(f"{args.crops} crops, 20 thresholds")
    print(f"bare Redis ZCOUNT:                         {ms(bare)}")
    print(f"PATCH threshold (re-decide, full status):  {ms(patch)}")
    print(f"GET first page of accepted crops:          {ms(page)}")
    worst = max(max(patch), max(page))
    print(f"goal: under 100 ms through the API -> {'met' if worst < 0.1 else 'NOT met'} (worst {worst * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
