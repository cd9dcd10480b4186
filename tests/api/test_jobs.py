"""The REST API against a real Redis and a real S3 endpoint (moto), with real JPEGs."""

from __future__ import annotations

import io
import json

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import (
    Candidate,
    Crop,
    DiscoverMessage,
)
from imgsift_common.sqlstate import StateStore
from tests.support.records import record_stored

SPEC = {"target": "person", "threshold": 0.5, "sources": [{"kind": "urls", "urls": ["http://127.0.0.1:9/a.jpg"]}]}


def _jpeg(color: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (80, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def _create(api: TestClient, spec: dict | None = None, refs: list[bytes] | None = None):  # type: ignore[no-untyped-def]
    files = [("references", (f"ref{i}.jpg", data, "image/jpeg")) for i, data in enumerate(refs or [_jpeg()])]
    return api.post("/v1/jobs", data={"spec": json.dumps(spec or SPEC)}, files=files)


def test_healthz(api: TestClient) -> None:
    response = api.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": True, "redis": True, "storage": True}


def test_create_job_stores_references_and_enqueues_discovery(api: TestClient, redis_url: str, coco128) -> None:  # type: ignore[no-untyped-def]
    photo = coco128.images[0].read_bytes()
    response = _create(api, refs=[photo, _jpeg(), photo])
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["state"] == "queued"
    assert body["references"] == 2  # the same bytes twice are one reference
    assert body["counts"]["discovered"] == 0
    job = api.app.state.state.get_job(body["id"])  # type: ignore[attr-defined]
    assert api.app.state.store.get(job.reference_keys[0]) in (photo, _jpeg())  # type: ignore[attr-defined]

    queued = redis.Redis.from_url(redis_url).lrange("crawl", 0, -1)
    assert len(queued) == 1
    envelope = json.loads(queued[0])
    assert envelope["headers"]["task"] == "crawler.discover"
    assert envelope["content-type"] == "application/json"
    args = json.loads(__import__("base64").b64decode(envelope["body"]))[0]
    assert DiscoverMessage.model_validate(args[0]).job_id == body["id"]


@pytest.mark.parametrize(
    ("spec", "refs", "needle"),
    [
        ({"target": "person", "sources": []}, None, "sources"),
        ({"target": "person", "sources": [{"kind": "openverse"}]}, None, "query"),
        ({"target": "person", "sources": [{"kind": "urls", "path": "/etc/passwd"}]}, None, "not 'path'"),
        # Wikimedia answers 403 without a contact in the User-Agent: refused at creation, saying what to set.
        ({"target": "person", "query": "cat", "sources": [{"kind": "wikimedia"}]}, None, "IMGSIFT_CRAWLER_CONTACT"),
        (SPEC, [b"<html>not an image</html>"], "not an image"),
        (SPEC, [b""], "empty"),
    ],
)
def test_bad_requests_get_422_with_a_reason(api: TestClient, spec: dict, refs: list[bytes] | None, needle: str) -> None:  # type: ignore[type-arg]
    response = _create(api, spec, refs)
    assert response.status_code == 422
    assert needle in response.text


def test_spec_that_is_not_json_and_missing_references(api: TestClient) -> None:
    assert api.post("/v1/jobs", data={"spec": "{nope"}, files=[("references", ("r.jpg", _jpeg()))]).status_code == 422
    assert api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}).status_code == 422
    # JSON's non-standard literals, which pydantic's parser reads as floats: the error echoes them as text.
    for spec in ("Infinity", '{"threshold": NaN}'):
        response = api.post("/v1/jobs", data={"spec": spec}, files=[("references", ("r.jpg", _jpeg()))])
        assert response.status_code == 422 and response.json()["detail"]["field"] == "spec"


def test_unknown_and_malformed_job_ids(api: TestClient) -> None:
    assert api.get("/v1/jobs/0123456789abcdef").status_code == 404
    assert api.get("/v1/jobs/..%2F..%2Fetc").status_code in (404, 422)
    assert api.get("/v1/jobs/UPPER_case!").status_code == 422


def _fill(state: StateStore, store, job_id: str, distances: list[float]) -> list[str]:  # type: ignore[no-untyped-def]
    """Give a job one stored image with a crop per distance, as the workers would."""
    sha = "ab" * 32
    image_key = keys.image_key(job_id, sha, "JPEG")
    store.put(image_key, _jpeg(size=(200, 100)))
    candidate = Candidate(image_url="http://example.test/p.jpg", page_url="http://example.test/", source="site")
    record_stored(state, job_id, sha, size=(200, 100), nbytes=10, candidate=candidate)
    crops = []
    for i, _ in enumerate(distances):
        cid = keys.crop_id(sha, i)
        crop = Crop(
            job_id=job_id, key=keys.crop_key(job_id, cid), crop_id=cid, image_key=image_key,
            box=(i, 0, i + 10, 10), padded_box=(i, 0, i + 12, 12), score=0.9, class_name="person",
        )  # fmt: skip
        store.put(crop.key, _jpeg((i * 20 % 255, 0, 0)))
        crops.append(crop)
    state.record_detections(job_id, [(image_key, crops)])
    for crop, d in zip(crops, distances, strict=True):
        state.record_distances(job_id, [(crop.key, d)])
    return [c.crop_id for c in crops]


def test_crops_threshold_pagination_and_threshold_change(api: TestClient) -> None:
    job_id = _create(api).json()["id"]
    state, store = api.app.state.state, api.app.state.store  # type: ignore[attr-defined]
    distances = [0.1, 0.3, 0.3, 0.45, 0.6, 0.8, 1.2]
    _fill(state, store, job_id, distances)

    status = api.get(f"/v1/jobs/{job_id}").json()
    assert status["counts"] | {"failed_by_reason": None} == {
        "discovered": 0, "downloaded": 1, "duplicates": 0, "failed": 0, "failed_by_reason": None, "skipped": 0,
        "detected": 1, "crops": 7, "compared": 7, "compare_failed": 0, "accepted": 4, "rejected": 3,
    }  # fmt: skip

    # Walk all crops two at a time: ascending distance, every crop once.
    seen, cursor = [], None
    while True:
        page = api.get(f"/v1/jobs/{job_id}/crops", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        body = page.json()
        seen += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [c["distance"] for c in seen] == sorted(distances)
    assert len({c["crop_id"] for c in seen}) == 7
    assert [c["accepted"] for c in seen] == [d <= 0.5 for d in sorted(distances)]
    first = seen[0]
    assert first["class"] == "person" and first["provenance"]["page_url"] == "http://example.test/"
    assert api.get(first["crop_url"]).headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(api.get(first["original_url"]).content)).size == (200, 100)

    rejected = api.get(f"/v1/jobs/{job_id}/crops", params={"accepted": False, "threshold": 0.7}).json()
    assert [c["distance"] for c in rejected["items"]] == [0.8, 1.2]

    patched = api.patch(f"/v1/jobs/{job_id}", json={"threshold": 1.0})
    assert patched.json()["counts"]["accepted"] == 6 and patched.json()["threshold"] == 1.0
    assert api.get(f"/v1/jobs/{job_id}/crops", params={"accepted": True}).json()["threshold"] == 1.0

    assert api.get(f"/v1/jobs/{job_id}/crops", params={"cursor": "garbage"}).status_code == 422
    assert api.patch(f"/v1/jobs/{job_id}", json={"threshold": -1}).status_code == 422
    assert api.get(f"/v1/jobs/{job_id}/crops/{'0' * 24}-999/image").status_code == 404
    assert api.get(f"/v1/jobs/{job_id}/crops/..%2Fsecret/image").status_code == 404


def test_cancel_is_final(api: TestClient) -> None:
    job_id = _create(api).json()["id"]
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    listed = api.get("/v1/jobs").json()["items"]
    assert [j["id"] for j in listed] == [job_id]


def test_not_this_images_marks_calibration_and_train_requests(api: TestClient, redis_url: str) -> None:
    files = [
        ("references", ("r0.jpg", _jpeg((200, 10, 10)), "image/jpeg")),
        ("references", ("r1.jpg", _jpeg((10, 200, 10)), "image/jpeg")),
        ("negatives", ("n0.jpg", _jpeg((10, 10, 200)), "image/jpeg")),
    ]
    created = api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["references"] == 2 and body["negatives"] == 1
    assert body["model"] == {"version": 0, "trained_at": None, "training": False, "stats": {}}
    assert body["calibration"]["suggested_threshold"] is None  # no held-out distances yet
    job_id = body["id"]
    state = api.app.state.state  # type: ignore[attr-defined]
    assert state.get_job(job_id).negative_keys[0].startswith(f"jobs/{job_id}/negatives/")

    # What the Siamese worker records: held-out reference distances, then crop distances.
    state.update_job(job_id, reference_distances=[0.3, 0.35, 0.4, 0.45, 0.5])
    distances = [0.2 + 0.02 * i for i in range(15)] + [0.9 + 0.02 * i for i in range(15)]
    crop_ids = _fill(state, api.app.state.store, job_id, distances)  # type: ignore[attr-defined]
    cal = api.get(f"/v1/jobs/{job_id}").json()["calibration"]
    # 30 crops are too few to trust the references alone: every crop accepted until answers come.
    assert cal["suggested_threshold"] == 2.0 and cal["needs_answers"] is True and cal["answers"] == 0
    assert sum(cal["histogram"]["counts"]) == 30 and len(cal["histogram"]["edges"]) == 41
    assert cal["precision"] is not None and cal["at_suggested"]["threshold"] == 2.0

    # Questions: spread over the crops, never one already answered; the answers settle the threshold.
    asked = api.get(f"/v1/jobs/{job_id}/questions", params={"limit": 6}).json()
    ids = [c["crop_id"] for c in asked["items"]]
    assert len(set(ids)) == 6 and asked["calibration"]["answers"] == 0
    assert [c["distance"] for c in asked["items"]] == sorted(c["distance"] for c in asked["items"])
    assert min(c["distance"] for c in asked["items"]) < 0.5 < max(c["distance"] for c in asked["items"])
    for crop in asked["items"]:
        right = crop["distance"] < 0.6
        answer = api.put(f"/v1/jobs/{job_id}/crops/{crop['crop_id']}/feedback", json={"correct": right})
        assert answer.status_code == 200
    cal = answer.json()
    assert cal["answers"] == 6 and cal["needs_answers"] is False
    assert 0.45 <= cal["suggested_threshold"] < 0.9  # between the two groups the answers told apart
    lo, hi = cal["at_suggested"]["precision_interval"]
    assert 0 <= lo <= cal["at_suggested"]["precision"] <= hi <= 1
    again = api.get(f"/v1/jobs/{job_id}/questions", params={"limit": 10}).json()
    assert not {c["crop_id"] for c in again["items"]} & set(ids) and again["calibration"]["answers"] == 6

    # A mark below the threshold that says wrong lowers the estimated precision at once.
    before = api.get(f"/v1/jobs/{job_id}").json()["calibration"]
    marked = api.put(f"/v1/jobs/{job_id}/crops/{crop_ids[2]}/feedback", json={"correct": False})
    assert marked.status_code == 200 and marked.json()["marked_wrong"] == before["marked_wrong"] + 1
    assert marked.json()["precision"] < before["precision"]
    # A second answer for a crop replaces the first; null takes it back.
    assert api.put(f"/v1/jobs/{job_id}/crops/{crop_ids[2]}/feedback", json={"correct": True}).json()["answers"] == 7
    assert api.put(f"/v1/jobs/{job_id}/crops/{crop_ids[2]}/feedback", json={"correct": None}).json()["answers"] == 6
    assert api.put(f"/v1/jobs/{job_id}/crops/{'0' * 24}-999/feedback", json={"correct": True}).status_code == 404
    assert api.put(f"/v1/jobs/{job_id}/crops/{crop_ids[1]}/feedback", json={"correct": "x"}).status_code == 422
    assert api.get(f"/v1/jobs/{job_id}/questions", params={"limit": 0}).status_code == 422

    # Train: queued once on the train queue, with the next model version.
    first = api.post(f"/v1/jobs/{job_id}/train")
    again = api.post(f"/v1/jobs/{job_id}/train")
    assert first.status_code == again.status_code == 202
    assert first.json()["model"]["training"] is True
    queued = redis.Redis.from_url(redis_url).lrange("train", 0, -1)
    assert len(queued) == 1
    envelope = json.loads(queued[0])
    assert envelope["headers"]["task"] == "siamese.train"
    args = json.loads(__import__("base64").b64decode(envelope["body"]))[0]
    assert args[0]["job_id"] == job_id and args[0]["version"] == 1

    one_ref = _create(api).json()["id"]
    assert api.post(f"/v1/jobs/{one_ref}/train").status_code == 409


def test_exports_are_queued_built_into_storage_and_streamed(api: TestClient, redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import zipfile

    from imgsift_common.exports import run_export
    from imgsift_common.messages import ExportMessage

    job_id = _create(api).json()["id"]
    state, store = api.app.state.state, api.app.state.store  # type: ignore[attr-defined]
    crop_ids = _fill(state, store, job_id, [0.1, 0.3, 0.7])

    created = api.post(f"/v1/jobs/{job_id}/exports", json={"format": "imagefolder"})
    assert created.status_code == 202, created.text
    export = created.json()
    assert export["state"] == "queued" and export["threshold"] == 0.5 and export["download_url"] is None
    assert api.get(f"/v1/jobs/{job_id}/exports/{export['id']}/download").status_code == 409

    # The crawler worker's export task, run here on the queued message itself.
    queued = redis.Redis.from_url(redis_url).lrange("export", 0, -1)
    assert len(queued) == 1
    envelope = json.loads(queued[0])
    assert envelope["headers"]["task"] == "crawler.export"
    message = ExportMessage.model_validate(json.loads(__import__("base64").b64decode(envelope["body"]))[0][0])
    assert run_export(message, state, store, tmp_path).state == "done"  # type: ignore[union-attr]
    assert run_export(message, state, store, tmp_path).state == "done"  # type: ignore[union-attr]  # idempotent

    done = api.get(f"/v1/jobs/{job_id}/exports/{export['id']}").json()
    assert done["state"] == "done" and done["crops"] == 2 and done["images"] == 1
    download = api.get(done["download_url"])
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    assert "attachment" in download.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert sorted(n.rsplit("/", 1)[-1] for n in archive.namelist()) == sorted(f"{c}.jpg" for c in crop_ids[:2])

    assert api.post(f"/v1/jobs/{job_id}/exports", json={"format": "pdf"}).status_code == 422
    assert api.get(f"/v1/jobs/{job_id}/exports/{'0' * 32}").status_code == 404
    assert api.get(f"/v1/jobs/{job_id}/exports/..%2Fx").status_code == 404


def test_a_retried_post_with_the_same_idempotency_key_returns_the_first_job(api: TestClient, redis_url: str) -> None:
    files = [("references", ("r.jpg", _jpeg(), "image/jpeg"))]
    headers = {"Idempotency-Key": "client-order-7"}
    first = api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files, headers=headers)
    again = api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files, headers=headers)
    other = api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files, headers={"Idempotency-Key": "other"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] != other.json()["id"]
    assert len(redis.Redis.from_url(redis_url).lrange("crawl", 0, -1)) == 2  # two jobs started, not three
    # A refused request binds no key: fixing it and retrying with the same key creates the job.
    bad = api.post("/v1/jobs", data={"spec": "{}"}, files=files, headers={"Idempotency-Key": "k3"})
    fixed = api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files, headers={"Idempotency-Key": "k3"})
    assert bad.status_code == 422 and fixed.status_code == 201


def test_crop_listing_filters_and_sorts(api: TestClient) -> None:
    job_id = _create(api).json()["id"]
    state, store = api.app.state.state, api.app.state.store  # type: ignore[attr-defined]
    distances = [0.1, 0.3, 0.3, 0.45, 0.6, 0.8, 1.2]
    _fill(state, store, job_id, distances)

    def walk(**params: object) -> list[float]:
        seen, cursor = [], None
        while True:
            query = {"limit": 2, **params, **({"cursor": cursor} if cursor else {})}
            body = api.get(f"/v1/jobs/{job_id}/crops", params=query).json()  # type: ignore[arg-type]
            seen += [c["distance"] for c in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                return seen

    assert walk(order="-distance") == sorted(distances, reverse=True)
    assert walk(min_distance=0.3, max_distance=0.8) == [0.3, 0.3, 0.45, 0.6, 0.8]
    assert walk(min_distance=0.3, max_distance=0.8, order="-distance") == [0.8, 0.6, 0.45, 0.3, 0.3]
    assert walk(accepted=True, threshold=0.5, order="-distance") == [0.45, 0.3, 0.3, 0.1]
    assert walk(**{"class": "person"}) == sorted(distances)
    assert walk(**{"class": "dog"}) == []
    assert walk(source="site") == sorted(distances) and walk(source="openverse") == []
    assert api.get(f"/v1/jobs/{job_id}/crops", params={"source": "ftp"}).status_code == 422
    assert api.get(f"/v1/jobs/{job_id}/crops", params={"order": "score"}).status_code == 422


def test_a_crop_without_a_distance_cannot_be_answered_yet(api: TestClient) -> None:
    job_id = _create(api).json()["id"]
    state, store = api.app.state.state, api.app.state.store  # type: ignore[attr-defined]
    crop_ids = _fill(state, store, job_id, [0.4, 0.6])
    state.reset_distances(job_id)  # as if the Siamese stage had not compared them yet
    refused = api.put(f"/v1/jobs/{job_id}/crops/{crop_ids[0]}/feedback", json={"correct": True})
    assert refused.status_code == 409 and "no distance yet" in refused.json()["detail"]
    assert state.feedback(job_id) == {}  # nothing recorded
    assert api.get(f"/v1/jobs/{job_id}/questions").json()["items"] == []  # nothing to ask either
    assert api.put(f"/v1/jobs/{job_id}/crops/{crop_ids[0]}/feedback", json={"correct": None}).status_code == 200


def test_the_api_refuses_to_start_against_a_database_without_its_schema(
    redis_url: str, postgres_server, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from imgsift_api.main import app
    from imgsift_common.schema import SchemaMismatch

    empty = postgres_server.create_database(migrated=False)
    try:
        for name, value in {
            "IMGSIFT_DATABASE_URL": empty,
            "IMGSIFT_REDIS_URL": redis_url,
            "IMGSIFT_STORAGE": "local",
            "IMGSIFT_LOCAL_STORAGE_DIR": str(tmp_path),
        }.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SchemaMismatch, match="migrate it first"), TestClient(app):
            pass
    finally:
        postgres_server.drop_database(empty)
