"""Outages mid-job: PostgreSQL restarted, Redis restarted (with its append-only file, as compose
runs it) and the S3 endpoint unreachable for 30 seconds. Tasks retry with backoff, a bounded number of times; the job
completes with every image detected once and every crop compared once. An outage longer than the
retry budget ends with what it cost recorded in the job, with the reason, and in the dead letters:
never silently, never retried forever.

The stack runs as processes (the compose commands) against the tests' own PostgreSQL server
(tests/conftest.py; restarted with ``pg_ctl stop -m fast`` and ``start``), a redis-server of the
test's own with persistence on, and reaches moto's S3 through a TCP proxy the test can take down
(tests/support/faults.py). Run with ``-s`` to see the figures docs/reliability.md records.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imgsift_common.celery_app import DeadLetter, TaskName
from imgsift_common.messages import DownloadOutcome, FailureReason
from imgsift_common.sqlstate import StateStore
from tests.conftest import free_port
from tests.support.checks import assert_each_image_and_crop_handled_once
from tests.support.coco import Coco128
from tests.support.faults import PersistentRedis, TcpProxy
from tests.support.postgres import PostgresServer
from tests.support.stack import Stack
from tests.support.web import TestWeb
from tests.system.conftest import AUTH
from tests.system.test_pipeline import wait_until_final

pytestmark = pytest.mark.system

PHOTOS = 16
S3_OUTAGE = 30.0  # seconds
REDIS_OUTAGE = 5.0
POSTGRES_OUTAGE = 5.0
MID_JOB = 6  # images stored when the fault starts: downloads in flight, detections and comparisons to come
WORKERS = ("crawler", "detector", "siamese")


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = PersistentRedis(workdir, free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(persistent_redis: PersistentRedis) -> str:
    """Overrides the session's Redis: the stack of these tests uses one it may restart."""
    return persistent_redis.url


@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(s3_endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def stack_env(stack_env: dict[str, str], s3_proxy: TcpProxy, request: pytest.FixtureRequest) -> dict[str, str]:
    return {
        **stack_env,
        "IMGSIFT_S3_ENDPOINT": s3_proxy.endpoint,  # every service reaches S3 through the proxy
        "IMGSIFT_CRAWLER_DOWNLOAD_BATCH_SIZE": "4",
        # Work whose message a fault lost is handed on again after 5 s without progress (120 s by default).
        "IMGSIFT_CRAWLER_STALL_SECONDS": "5",
        **getattr(request, "param", {}),
    }


def _create_job(client: httpx.Client, web: TestWeb, coco128: Coco128) -> tuple[str, list[str]]:
    # Slow responses keep downloads in flight while the fault starts.
    urls = [web.add(f"/slow/{p.name}", p.read_bytes(), "image/jpeg", delay=0.5) for p in coco128.images[:PHOTOS]]
    spec = {"target": "any", "threshold": 0.9, "sources": [{"kind": "urls", "urls": urls}]}
    files = [("references", ("ref.jpg", coco128.images[-1].read_bytes(), "image/jpeg"))]
    created = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files)
    assert created.status_code == 201, created.text
    return str(created.json()["id"]), urls


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.1)


def _work_done(state: StateStore, job_id: str) -> int:
    c = state.counters(job_id)
    return sum(c.get(n, 0) for n in ("downloaded", "failed", "detected", "compared", "compare_failed"))


def _seconds_until_progress(state: StateStore, job_id: str, timeout: float = 180) -> float:
    """Seconds until the job's counters move again."""
    start, done = time.monotonic(), _work_done(state, job_id)
    _wait_for(lambda: _work_done(state, job_id) > done or state.get_job(job_id).state.is_final, "progress", timeout)
    return time.monotonic() - start


RETRY_LINE = re.compile(r"Task (\S+)\[[^\]]+\] retry: Retry in (\d+)s: (\w+)")


def _retries(running: Stack) -> dict[str, Any]:
    """The retries the workers logged: how many per task, and the longest wait drawn."""
    found = [m.groups() for w in WORKERS for m in RETRY_LINE.finditer(running.log(w))]
    per_task: dict[str, int] = {}
    for task, _, _ in found:
        per_task[task] = per_task.get(task, 0) + 1
    return {
        "retries": len(found),
        "per_task": per_task,
        "longest_wait_s": max((int(s) for _, s, _ in found), default=0),
    }


def _letters(client: httpx.Client, job_id: str) -> list[DeadLetter]:
    response = client.get("/v1/dead-letters", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return [DeadLetter.model_validate(x) for x in response.json() if x["job_id"] == job_id]


def test_redis_restart_mid_job_loses_and_duplicates_nothing(
    stack: tuple[Stack, str],
    web: TestWeb,
    coco128: Coco128,
    persistent_redis: PersistentRedis,
    redis_url: str,
    stack_state: StateStore,
) -> None:
    running, api = stack
    state = stack_state
    with httpx.Client(base_url=api, timeout=30, headers=AUTH) as client:
        job_id, _ = _create_job(client, web, coco128)
        started = time.monotonic()
        _wait_for(lambda: state.counters(job_id).get("downloaded", 0) >= MID_JOB, "downloads")
        before = dict(state.counters(job_id))

        persistent_redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        down = time.monotonic()
        during = client.get(f"/v1/jobs/{job_id}")
        assert during.status_code == 503, during.text  # said plainly, and retryable
        assert httpx.get(f"{api}/healthz", timeout=30).status_code == 503
        time.sleep(max(0.0, REDIS_OUTAGE - (time.monotonic() - down)))
        persistent_redis.start()
        outage = time.monotonic() - down

        after = dict(state.counters(job_id))
        assert all(after.get(k, 0) >= v for k, v in before.items()), (before, after)  # persisted
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        stalled = _seconds_until_progress(state, job_id)
        status = wait_until_final(client, job_id, running, timeout=240)
        total = time.monotonic() - started
        assert_each_image_and_crop_handled_once(status, state, job_id, PHOTOS)
        assert status["counts"]["compare_failed"] == 0 and status["counts"]["failed"] == 0
        assert _letters(client, job_id) == []  # nothing failed for good
    running.check_alive()  # every worker rode through the broker's restart
    print(
        f"\nRedis restart: down {outage:.1f} s at {before}; first progress {stalled:.1f} s after the restart; "
        f"job done in {total:.1f} s; {_retries(running)}; crops {status['counts']['crops']}"
    )


def test_postgres_restart_mid_job_loses_and_duplicates_nothing(
    stack: tuple[Stack, str],
    web: TestWeb,
    coco128: Coco128,
    postgres_server: PostgresServer,
    stack_state: StateStore,
) -> None:
    running, api = stack
    state = stack_state
    with httpx.Client(base_url=api, timeout=30, headers=AUTH) as client:
        job_id, _ = _create_job(client, web, coco128)
        started = time.monotonic()
        _wait_for(lambda: state.counters(job_id).get("downloaded", 0) >= MID_JOB, "downloads")
        before = dict(state.counters(job_id))

        postgres_server.stop()  # fast: every open session is ended, as in an operator's restart
        down = time.monotonic()
        try:
            during = client.get(f"/v1/jobs/{job_id}")
            assert during.status_code == 503, during.text  # said plainly, and retryable
            assert "state store is unreachable" in during.json()["detail"]
            health = httpx.get(f"{api}/healthz", timeout=30)
            assert health.status_code == 503 and health.json()["database"] is False, health.text
            time.sleep(max(0.0, POSTGRES_OUTAGE - (time.monotonic() - down)))
        finally:
            postgres_server.start()
        outage = time.monotonic() - down

        after = dict(state.counters(job_id))  # a pooled connection the restart broke is replaced (pre-ping)
        assert all(after.get(k, 0) >= v for k, v in before.items()), (before, after)  # nothing recorded was lost
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        stalled = _seconds_until_progress(state, job_id)
        status = wait_until_final(client, job_id, running, timeout=240)
        total = time.monotonic() - started
        assert_each_image_and_crop_handled_once(status, state, job_id, PHOTOS)
        assert status["counts"]["compare_failed"] == 0 and status["counts"]["failed"] == 0
        assert _letters(client, job_id) == []  # nothing failed for good
    running.check_alive()  # every worker and the API rode through the restart
    print(
        f"\nPostgreSQL restart: down {outage:.1f} s at {before}; first progress {stalled:.1f} s after the restart; "
        f"job done in {total:.1f} s; {_retries(running)}; crops {status['counts']['crops']}"
    )


def test_s3_unreachable_for_30_seconds_is_ridden_through(
    stack: tuple[Stack, str],
    web: TestWeb,
    coco128: Coco128,
    s3_proxy: TcpProxy,
    redis_url: str,
    stack_state: StateStore,
) -> None:
    running, api = stack
    state = stack_state
    with httpx.Client(base_url=api, timeout=60, headers=AUTH) as client:
        job_id, urls = _create_job(client, web, coco128)
        started = time.monotonic()
        _wait_for(lambda: state.counters(job_id).get("downloaded", 0) >= MID_JOB, "downloads")
        before = dict(state.counters(job_id))

        s3_proxy.down()
        down = time.monotonic()
        health = httpx.get(f"{api}/healthz", timeout=60)
        assert health.status_code == 503 and health.json()["storage"] is False, health.text
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # the status needs Redis only
        spec = {"target": "any", "sources": [{"kind": "urls", "urls": urls[:1]}]}
        files = [("references", ("ref.jpg", coco128.images[-1].read_bytes(), "image/jpeg"))]
        refused = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files)  # its references: S3
        assert refused.status_code == 503 and "object store" in refused.text, refused.text
        time.sleep(max(0.0, S3_OUTAGE - (time.monotonic() - down)))
        during = dict(state.counters(job_id))
        s3_proxy.up()
        outage = time.monotonic() - down

        stalled = _seconds_until_progress(state, job_id)
        status = wait_until_final(client, job_id, running, timeout=300)
        total = time.monotonic() - started
        assert_each_image_and_crop_handled_once(status, state, job_id, PHOTOS)
        assert status["counts"]["compare_failed"] == 0 and status["counts"]["failed"] == 0
        assert _letters(client, job_id) == []  # the retries outlived the outage
    retries = _retries(running)
    assert retries["retries"] > 0, "the outage must have hit tasks in flight"
    print(
        f"\nS3 outage: {outage:.1f} s, counters at the start {before}, at the end {during}; "
        f"first progress {stalled:.1f} s after the endpoint came back; job done in {total:.1f} s; {retries}"
    )


# One retry keeps the test short; a longer stall period keeps the supervisor from queueing the same
# doomed detections again and again in front of the detector's retry.
ONE_RETRY = {"IMGSIFT_TASK_MAX_RETRIES": "1", "IMGSIFT_CRAWLER_STALL_SECONDS": "30"}


@pytest.mark.parametrize("stack_env", [ONE_RETRY], indirect=True, ids=["1-retry"])
def test_outage_past_the_retry_budget_is_recorded_not_silent(
    stack: tuple[Stack, str],
    web: TestWeb,
    coco128: Coco128,
    s3_proxy: TcpProxy,
    redis_url: str,
    stack_state: StateStore,
) -> None:
    """S3 gone for good, tasks allowed one retry: each task fails for good once, is dead-lettered,
    and its job records what it cost (URLs failed with reason task_failed, images with no crops,
    crops in compare_failed) with a note naming the task and the error; the job ends."""
    running, api = stack
    state = stack_state
    with httpx.Client(base_url=api, timeout=60, headers=AUTH) as client:
        job_id, urls = _create_job(client, web, coco128)
        started = time.monotonic()
        _wait_for(lambda: state.counters(job_id).get("downloaded", 0) >= 4, "downloads")
        s3_proxy.down()  # for good
        status = wait_until_final(client, job_id, running, timeout=240)
        ended = time.monotonic() - started
        time.sleep(3)  # a task retried forever would add letters or move counters: it must not
        letters = _letters(client, job_id)
        final = client.get(f"/v1/jobs/{job_id}").json()

    assert final["counts"] == status["counts"] and final["state"] == status["state"] == "completed", final
    counts, notes = final["counts"], final["notes"]
    assert letters, "the outage must have cost the job something"
    assert all(x.retries == 1 and "MaxRetryError" in x.error for x in letters), letters
    # Every URL has an outcome, every stored image is detected, every crop scored or counted lost.
    found = state.url_records(job_id, urls)
    assert all(u in found for u in urls)
    assert counts["downloaded"] + counts["failed"] == PHOTOS
    image_keys = state.image_keys(job_id)
    assert len(state.detected_counts(job_id, image_keys)) == len(image_keys)
    assert counts["compared"] + counts["compare_failed"] == counts["crops"]
    # What each lost task cost is in the status, with its reason: the URLs of the download tasks
    # given up that had no outcome yet are failed with reason task_failed.
    in_lost_batches = {
        c["image_url"] for x in letters if x.task == TaskName.DOWNLOAD for c in json.loads(x.args)[0]["candidates"]
    }
    records = {u: found.get(u) for u in urls}
    failed = {u for u, r in records.items() if r is not None and r.outcome is DownloadOutcome.FAILED}
    assert failed and failed <= in_lost_batches, (failed, in_lost_batches)
    assert all(r is not None and r.reason is FailureReason.TASK_FAILED for u, r in records.items() if u in failed)
    assert counts["failed_by_reason"] == {"task_failed": len(failed)} and counts["failed"] == len(failed)
    for letter in letters:
        assert any(n.startswith(f"{letter.task} failed for good after 1 retries: MaxRetryError") for n in notes), notes
    by_task = {t: sum(x.task == t for x in letters) for t in {x.task for x in letters}}
    print(
        f"\nS3 down for good, 1 retry: job ended {ended:.1f} s after it started; dead letters {by_task}; "
        f"counts {counts}; notes {len(notes)}; {_retries(running)}"
    )
