"""The Python client (sync and async) against the real API and workers, not against mocks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from imgsift_client import AsyncImgsiftClient, Forbidden, ImgsiftClient, InvalidRequest, NotFound, Unauthorized
from imgsift_client.client import _Call
from tests.support.coco import Coco128
from tests.support.web import TestWeb
from tests.system.conftest import AUTH, TEST_API_KEY
from tests.system.test_pipeline import ELEPHANT_PHOTOS, OTHER_ANIMAL_PHOTOS, _references

pytestmark = pytest.mark.system


def test_client_creates_waits_pages_rethresholds_exports_and_raises_typed_errors(
    stack, web: TestWeb, coco128: Coco128, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _running, api = stack
    urls = [web.add_image(f"/p/{s}.jpg", coco128.image(s)) for s in ELEPHANT_PHOTOS + OTHER_ANIMAL_PHOTOS[:4]]
    spec = {"target": "animal", "threshold": 0.8, "sources": [{"kind": "urls", "urls": urls}]}
    seen: list[float] = []
    with ImgsiftClient(api, api_key=TEST_API_KEY) as imgsift:
        job = imgsift.create_job(spec, references=_references(coco128), idempotency_key="system-client-1")
        assert imgsift.create_job(spec, references=_references(coco128), idempotency_key="system-client-1").id == job.id
        done = imgsift.wait(job.id, timeout=400, poll=0.5, on_progress=lambda j: seen.append(j.progress))
        assert done.state == "completed" and seen[-1] == 1.0 and seen == sorted(seen)

        accepted = list(imgsift.crops(job.id, accepted=True, page_size=3))
        assert len(accepted) == done.counts["accepted"] > 0
        assert all(c.accepted and c.distance <= done.threshold for c in accepted)
        assert [c.distance for c in accepted] == sorted(c.distance for c in accepted)
        every = list(imgsift.crops(job.id, page_size=4))
        assert len(every) == done.counts["compared"] and every[0].provenance is not None

        loose = imgsift.set_threshold(job.id, 2.0)
        assert loose.threshold == 2.0 and loose.counts["accepted"] == done.counts["compared"]
        assert imgsift.mark(job.id, every[0].crop_id, True).marked_right == 1
        asked = imgsift.questions(job.id, limit=3)
        assert len(asked.items) == min(3, len(every) - 1) and asked.calibration.answers == 1
        assert every[0].crop_id not in {c.crop_id for c in asked.items}  # an answered crop is not asked again
        answered = imgsift.mark(job.id, asked.items[0].crop_id, False)
        assert answered.answers == 2 and answered.marked_wrong == 1 and answered.at_suggested is not None

        export = imgsift.export(job.id, "jsonl", tmp_path / "manifest.jsonl", threshold=0.8)
        rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
        assert export.state == "done" and len(rows) == done.counts["compared"]
        assert sum(r["accepted"] for r in rows) == len(accepted)
        # The server's export options go through: the crops' bytes embedded in the Parquet file.
        imgsift.export(job.id, "parquet", tmp_path / "crops.parquet", threshold=2.0, embed_images=True)
        table = pq.read_table(tmp_path / "crops.parquet")
        assert table.num_rows == done.counts["compared"] and all(j[:2] == b"\xff\xd8" for j in table["jpg"].to_pylist())

        with pytest.raises(NotFound) as missing:
            imgsift.get_job("0" * 32)
        assert missing.value.status == 404 and "0" * 32 in missing.value.message
        with pytest.raises(InvalidRequest) as invalid:
            imgsift.create_job({"target": "dog", "sources": []}, references=_references(coco128)[:1])
        assert invalid.value.status == 422 and "sources" in invalid.value.message

    async def async_flow() -> tuple[str, int]:
        async with AsyncImgsiftClient(api, api_key=TEST_API_KEY) as client:
            again = await client.wait(job.id, timeout=30)
            crops = [c async for c in client.crops(job.id, threshold=0.8, accepted=True, page_size=2)]
            with pytest.raises(NotFound):
                await client.get_job("f" * 32)
            return again.state, len(crops)

    assert asyncio.run(async_flow()) == ("completed", len(accepted))

    # Keys: a wrong key is Unauthorized; another tenant's key finds no such job.
    with ImgsiftClient(api, api_key="isk_not_a_key_of_this_stack_0") as stranger, pytest.raises(Unauthorized):
        stranger.get_job(job.id)
    other = httpx.post(f"{api}/v1/keys", json={"name": "other team"}, headers=AUTH, timeout=10).json()["key"]
    with ImgsiftClient(api, api_key=other) as tenant:
        with pytest.raises(NotFound):
            tenant.get_job(job.id)
        with pytest.raises(Forbidden):
            tenant._send(_Call("GET", "/v1/dead-letters", dict))
