"""No route blocks the event loop: a slow state store in one request must not hold up another.

FastAPI runs a plain ``def`` route in its thread pool; an ``async def`` route that calls the
synchronous state store, object store or broker directly stalls every other request meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN_KEY
from tests.api.test_jobs import SPEC, _jpeg

SLOW = 1.0  # seconds each slowed state call takes; the cheap request needs milliseconds


def test_a_slow_state_store_in_create_job_does_not_stall_healthz(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = api.app
    state = app.state.state  # type: ignore[attr-defined]
    entered = threading.Event()
    create_job = state.create_job

    def slow_create_job(*args: object, **kwargs: object) -> object:
        entered.set()
        time.sleep(SLOW)
        return create_job(*args, **kwargs)

    monkeypatch.setattr(state, "create_job", slow_create_job)
    finished: list[str] = []

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=headers, timeout=30) as client:

            async def slow() -> httpx.Response:
                files = [("references", ("ref.jpg", _jpeg(), "image/jpeg"))]
                response = await client.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files)
                finished.append("create")
                return response

            async def cheap() -> httpx.Response:
                # Asked once the slow call is under way (waited for off the loop, so a blocked loop cannot hide it).
                assert await asyncio.to_thread(entered.wait, 30)
                response = await client.get("/healthz")
                finished.append("healthz")
                return response

            return await asyncio.gather(slow(), cheap())

    created, health = asyncio.run(scenario())
    assert created.status_code == 201, created.text
    assert health.status_code == 200, health.text
    assert finished == ["healthz", "create"], "a route held the event loop while the state store was slow"
