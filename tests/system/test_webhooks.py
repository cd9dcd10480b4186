"""Webhooks through the whole stack, to real receivers on loopback: signed, retried, listed, and
refused for an address outside the network allowlist (127.0.0.2 stands in for a private host)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from imgsift_client import verify_webhook
from tests.support.coco import Coco128
from tests.support.web import TestWeb
from tests.system.conftest import AUTH
from tests.system.test_pipeline import ELEPHANT_PHOTOS, _references

pytestmark = pytest.mark.system


class Receiver:
    """A webhook receiver: records every POST; answers 500 to the first ``fail_first`` ones."""

    def __init__(self, host: str, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(500 if len(receiver.received) <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def stack_env(stack_env: dict[str, str]) -> dict[str, str]:
    return {**stack_env, "IMGSIFT_CRAWLER_WEBHOOK_BACKOFF": "0.2"}


def test_webhooks_are_signed_retried_listed_and_kept_off_private_addresses(
    stack, web: TestWeb, coco128: Coco128
) -> None:  # type: ignore[no-untyped-def]
    _running, api = stack
    good = Receiver("127.0.0.1", fail_first=1)
    private = Receiver("127.0.0.2")  # outside the allowlist (127.0.0.1/32): must never be called
    try:
        urls = [web.add_image(f"/p/{s}.jpg", coco128.image(s)) for s in ELEPHANT_PHOTOS[:1]]
        spec = {
            "target": "animal", "sources": [{"kind": "urls", "urls": urls}],
            "webhooks": [{"url": good.url}, {"url": private.url, "events": ["job.completed"]}],
        }  # fmt: skip
        files = [("references", (n, d, "image/jpeg")) for n, d in _references(coco128)[:2]]
        with httpx.Client(base_url=api, timeout=30, headers=AUTH) as client:
            created = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files)
            assert created.status_code == 201, created.text
            job_id, secret = created.json()["id"], created.json()["webhook_secret"]
            assert secret and client.get(f"/v1/jobs/{job_id}").json()["webhook_secret"] is None  # shown once

            deadline = time.monotonic() + 300
            while True:
                listed = client.get(f"/v1/jobs/{job_id}/webhooks/deliveries").json()
                if len(listed) == 6 and all(d["state"] != "pending" for d in listed):
                    break
                assert time.monotonic() < deadline, listed
                time.sleep(0.5)
    finally:
        good.stop()
        private.stop()

    events = [json.loads(body)["event"] for _, body in good.received]
    assert sorted(set(events)) == sorted(
        ["job.started", "stage.crawl.done", "stage.detect.done", "stage.siamese.done", "job.completed"]
    )
    assert len(good.received) == 6  # five events, one of them twice: the first answer was a 500
    for headers, body in good.received:
        verify_webhook(secret, body, headers["X-Imgsift-Signature"])
        assert headers["X-Imgsift-Event"] == json.loads(body)["event"]
    assert private.received == []

    by_url: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for delivery in listed:
        by_url.setdefault(delivery["url"], []).append(delivery)
    assert all(d["state"] == "delivered" for d in by_url[good.url])
    assert sorted(len(d["attempts"]) for d in by_url[good.url]) == [1, 1, 1, 1, 2]
    retried = next(d for d in by_url[good.url] if len(d["attempts"]) == 2)
    assert [a["status"] for a in retried["attempts"]] == [500, 204]
    (refused,) = by_url[private.url]
    assert refused["state"] == "failed" and "blocked_address" in refused["attempts"][0]["error"]
