"""The API's export task builds the training and review formats with their options, on the services' stores
(PostgreSQL, Redis, S3); the download is read back with the loader its users use."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import redis
from fastapi.testclient import TestClient

from imgsift_common.exports import run_export
from imgsift_common.messages import ExportMessage
from tests.api.test_jobs import _create, _fill


def _run_queued(redis_url: str, state, store, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    """The crawler worker's export task, run here on each queued message itself."""
    client = redis.Redis.from_url(redis_url)
    while (raw := client.lpop("export")) is not None:
        envelope = json.loads(raw)  # type: ignore[arg-type]
        message = ExportMessage.model_validate(json.loads(base64.b64decode(envelope["body"]))[0][0])
        run_export(message, state, store, workdir)


def test_training_formats_with_options_through_the_export_task(api: TestClient, redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import webdataset as wds

    job_id = _create(api).json()["id"]
    state, store = api.app.state.state, api.app.state.store  # type: ignore[attr-defined]
    crop_ids = _fill(state, store, job_id, [0.1, 0.2, 0.3, 0.7])
    requests = {
        "webdataset": {"samples_per_shard": 2, "originals": True},
        "parquet": {"embed_images": True},
        "huggingface": {},
        "fiftyone": {},
        "labelstudio": {},
    }
    created = {}
    for fmt, options in requests.items():
        answer = api.post(f"/v1/jobs/{job_id}/exports", json={"format": fmt, **options})
        assert answer.status_code == 202, answer.text
        assert answer.json()["options"]["samples_per_shard"] == options.get("samples_per_shard", 10_000)
        created[fmt] = answer.json()["id"]
    _run_queued(redis_url, state, store, tmp_path)

    files = {}
    for fmt, export_id in created.items():
        done = api.get(f"/v1/jobs/{job_id}/exports/{export_id}").json()
        assert done["state"] == "done", done
        download = api.get(done["download_url"])
        assert download.status_code == 200
        assert f"-{fmt}-0.5." in download.headers["content-disposition"]
        files[fmt] = download.content

    with zipfile.ZipFile(io.BytesIO(files["webdataset"])) as archive:
        archive.extractall(tmp_path / "wds")
    samples = list(wds.WebDataset(f"{tmp_path}/wds/{{00000..00001}}.tar", shardshuffle=False).decode("pil"))
    assert sorted(s["json"]["crop_id"] for s in samples) == sorted(crop_ids[:3])
    assert all(s["jpg"].size == (200, 100) for s in samples)  # the originals, as asked
    table = pq.read_table(io.BytesIO(files["parquet"]))
    assert table.num_rows == 4 and all(r["jpg"] for r in table.select(["jpg"]).to_pylist())
    with zipfile.ZipFile(io.BytesIO(files["huggingface"])) as archive:
        assert "README.md" in archive.namelist()
    with zipfile.ZipFile(io.BytesIO(files["fiftyone"])) as archive:
        assert len(next(iter(json.loads(archive.read("labels.json"))["labels"].values()))) == 4
    tasks = json.loads(files["labelstudio"])
    assert tasks[0]["data"]["image"] == "http://example.test/p.jpg" and len(tasks[0]["predictions"][0]["result"]) == 3

    empty = api.post(f"/v1/jobs/{job_id}/exports", json={"format": "huggingface", "threshold": 0.0}).json()
    _run_queued(redis_url, state, store, tmp_path)
    done = api.get(f"/v1/jobs/{job_id}/exports/{empty['id']}").json()
    assert done["state"] == "done" and done["crops"] == 0 and "valid, empty dataset" in done["note"]

    unknown = api.post(f"/v1/jobs/{job_id}/exports", json={"format": "tfrecord"})
    assert unknown.status_code == 422 and "webdataset" in unknown.text and "labelstudio" in unknown.text
