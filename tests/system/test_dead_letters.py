"""Poison messages to each worker land in the dead-letter list the API shows, once, and the
workers go on: a job sent after them completes."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from imgsift_common.celery_app import TaskName, create_celery_app
from tests.support.coco import Coco128
from tests.support.web import TestWeb
from tests.system.conftest import AUTH
from tests.system.test_pipeline import ELEPHANT_PHOTOS, _references, wait_until_final

pytestmark = pytest.mark.system


def test_poison_messages_are_dead_lettered_not_retried_forever(
    stack, web: TestWeb, coco128: Coco128, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    running, api = stack
    producer = create_celery_app("poison-test", redis_url)
    poison = {
        TaskName.DOWNLOAD: {"job_id": "not a job id!", "candidates": "nope"},
        TaskName.DETECT: {"job_id": "0" * 32},  # no image_keys
        TaskName.COMPARE: {"crop_keys": ["x"]},  # no job_id
    }
    for task, payload in poison.items():
        producer.send_task(str(task), args=[payload])
    with httpx.Client(base_url=api, timeout=30, headers=AUTH) as client:
        deadline = time.monotonic() + 120
        while len(letters := client.get("/v1/dead-letters").json()) < len(poison):
            assert time.monotonic() < deadline, letters
            time.sleep(0.5)
        time.sleep(3)  # a message retried forever would add letters or come back: it must not
        letters = client.get("/v1/dead-letters").json()
        assert sorted(letter["task"] for letter in letters) == sorted(str(t) for t in poison)
        assert all("ValidationError" in letter["error"] and letter["retries"] == 0 for letter in letters)
        assert "not a job id!" in next(x for x in letters if x["task"] == TaskName.DOWNLOAD)["args"]

        # The workers survived: a real job after the poison completes.
        urls = [web.add_image(f"/p/{s}.jpg", coco128.image(s)) for s in ELEPHANT_PHOTOS[:1]]
        spec = {"target": "animal", "sources": [{"kind": "urls", "urls": urls}]}
        files = [("references", (n, d, "image/jpeg")) for n, d in _references(coco128)[:2]]
        job_id = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files).json()["id"]
        assert wait_until_final(client, job_id, running)["state"] == "completed"
        assert len(client.get("/v1/dead-letters").json()) == len(poison)
