"""API keys: required everywhere but health, stored hashed, each key confined to its own jobs,
rate-limited, and request bodies capped. Real Redis, real S3 endpoint (moto), real JPEGs."""

from __future__ import annotations

import json

import pytest
import redis
from fastapi.testclient import TestClient

from imgsift_common.apikeys import hash_key
from tests.api.conftest import ADMIN_KEY
from tests.api.test_jobs import SPEC, _create, _fill, _jpeg


def _key(api: TestClient, name: str, **extra: object) -> str:
    response = api.post("/v1/keys", json={"name": name, **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _every_route(job_id: str, crop_id: str, export_id: str) -> list[tuple[str, str, dict]]:  # type: ignore[type-arg]
    """(method, path, request kwargs) for every route of the API under /v1 that reads or changes a job."""
    base = f"/v1/jobs/{job_id}"
    return [
        ("GET", base, {}),
        ("PATCH", base, {"json": {"threshold": 0.9}}),
        ("POST", f"{base}/cancel", {}),
        ("POST", f"{base}/train", {}),
        ("GET", f"{base}/crops", {}),
        ("GET", f"{base}/crops/{crop_id}/image", {}),
        ("GET", f"{base}/crops/{crop_id}/original", {}),
        ("PUT", f"{base}/crops/{crop_id}/feedback", {"json": {"correct": True}}),
        ("POST", f"{base}/exports", {"json": {"format": "csv"}}),
        ("GET", f"{base}/exports/{export_id}", {}),
        ("GET", f"{base}/exports/{export_id}/download", {}),
        ("GET", f"{base}/events", {}),
        ("GET", f"{base}/webhooks/deliveries", {}),
    ]


def test_every_route_but_health_needs_a_valid_key(api: TestClient) -> None:
    job_id = _create(api).json()["id"]
    crop_id = _fill(api.app.state.state, api.app.state.store, job_id, [0.2])[0]  # type: ignore[attr-defined]
    routes = [*_every_route(job_id, crop_id, "0" * 32), ("GET", "/v1/jobs", {}), ("GET", "/v1/dead-letters", {})]
    routes += [("GET", "/v1/keys", {}), ("POST", "/v1/keys", {"json": {"name": "x"}}), ("GET", "/v1/session", {})]
    for credentials in ({}, _as("isk_not_a_key_of_this_api_000000"), {"X-API-Key": "short"}):
        for method, path, kwargs in routes:
            anonymous = TestClient(api.app)  # no default headers
            response = anonymous.request(method, path, headers=credentials, **kwargs)
            assert response.status_code == 401, (method, path, credentials, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
    created = TestClient(api.app).post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=[("references", _jpeg())])
    assert created.status_code == 401
    assert TestClient(api.app).get("/healthz").status_code == 200
    assert TestClient(api.app).get("/openapi.json").status_code == 200
    # The same key in the X-API-Key header works as well as the Bearer form.
    assert TestClient(api.app).get(f"/v1/jobs/{job_id}", headers={"X-API-Key": ADMIN_KEY}).status_code == 200


def test_keys_are_stored_only_as_hashes(api: TestClient, redis_url: str) -> None:
    key = _key(api, "team a")
    client = redis.Redis.from_url(redis_url)
    stored = b"".join(client.dump(k) or b"" for k in client.keys("*"))
    assert key.encode() not in stored and ADMIN_KEY.encode() not in stored
    assert client.exists(f"imgsift:apikey:{hash_key(key)}")
    listed = api.get("/v1/keys").json()
    assert {k["name"] for k in listed} == {"team a", "bootstrap (IMGSIFT_API_BOOTSTRAP_KEY)"}
    assert all("key" not in k for k in listed)


def test_each_key_sees_and_changes_only_its_own_jobs(api: TestClient) -> None:
    alice, bob = _key(api, "alice"), _key(api, "bob")
    client = TestClient(api.app)
    job_id = client.post(
        "/v1/jobs", data={"spec": json.dumps(SPEC)}, files=[("references", ("r.jpg", _jpeg(), "image/jpeg"))],
        headers=_as(alice),
    ).json()["id"]  # fmt: skip
    crop_id = _fill(api.app.state.state, api.app.state.store, job_id, [0.2, 0.7])[0]  # type: ignore[attr-defined]
    export_id = client.post(f"/v1/jobs/{job_id}/exports", json={"format": "csv"}, headers=_as(alice)).json()["id"]

    # Bob (and the admin key, which is not alice either) gets 404 everywhere: as if the job did not exist.
    for other in (bob, ADMIN_KEY):
        for method, path, kwargs in _every_route(job_id, crop_id, export_id):
            response = client.request(method, path, headers=_as(other), **kwargs)
            assert response.status_code == 404, (method, path, response.text)
        assert client.get("/v1/jobs", headers=_as(other)).json()["items"] == []

    # Nothing bob tried changed alice's job.
    job = client.get(f"/v1/jobs/{job_id}", headers=_as(alice)).json()
    assert job["state"] == "queued" and job["threshold"] == SPEC["threshold"]
    assert job["calibration"]["marked_right"] == 0
    assert job["model"]["training"] is False
    # Alice reaches it all.
    assert [j["id"] for j in client.get("/v1/jobs", headers=_as(alice)).json()["items"]] == [job_id]
    assert client.get(f"/v1/jobs/{job_id}/crops/{crop_id}/image", headers=_as(alice)).status_code == 200
    assert client.patch(f"/v1/jobs/{job_id}", json={"threshold": 0.9}, headers=_as(alice)).status_code == 200


def test_idempotency_keys_are_per_api_key(api: TestClient) -> None:
    alice, bob = _key(api, "alice"), _key(api, "bob")
    client = TestClient(api.app)
    files = [("references", ("r.jpg", _jpeg(), "image/jpeg"))]
    made = [
        client.post(
            "/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files, headers={**_as(k), "Idempotency-Key": "k1"}
        )
        for k in (alice, bob, alice)
    ]
    assert [r.status_code for r in made] == [201, 201, 200]
    assert made[0].json()["id"] != made[1].json()["id"]
    assert made[2].json()["id"] == made[0].json()["id"]


def test_admin_routes_need_an_admin_key_and_revoked_keys_stop_at_once(api: TestClient) -> None:
    plain = _key(api, "plain")
    client = TestClient(api.app)
    assert client.get("/v1/dead-letters", headers=_as(plain)).status_code == 403
    assert client.post("/v1/keys", json={"name": "mine"}, headers=_as(plain)).status_code == 403
    assert client.get("/v1/keys", headers=_as(plain)).status_code == 403
    second_admin = _key(api, "ops", admin=True)
    assert client.get("/v1/dead-letters", headers=_as(second_admin)).status_code == 200

    me = client.get("/v1/session", headers=_as(plain)).json()
    assert me["name"] == "plain" and me["admin"] is False
    assert api.delete(f"/v1/keys/{me['id']}").status_code == 204
    assert client.get("/v1/jobs", headers=_as(plain)).status_code == 401
    assert api.delete(f"/v1/keys/{me['id']}").status_code == 404
    own = api.get("/v1/session").json()["id"]
    assert api.delete(f"/v1/keys/{own}").status_code == 409
    assert api.post("/v1/keys", json={"name": "x", "rate_limit": "lots"}).status_code == 422
    assert api.post("/v1/keys", json={"name": ""}).status_code == 422


def test_rate_limit_per_key_answers_429_with_retry_after(api: TestClient) -> None:
    limited, other = _key(api, "limited", rate_limit="5/minute"), _key(api, "other")
    client = TestClient(api.app)
    codes = [client.get("/v1/jobs", headers=_as(limited)).status_code for _ in range(7)]
    assert codes == [200] * 5 + [429] * 2
    refused = client.get("/v1/jobs", headers=_as(limited))
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "rate limit" in refused.json()["detail"]
    assert client.get("/v1/jobs", headers=_as(other)).status_code == 200  # another key is not slowed


def test_web_ui_session_cookie(api: TestClient) -> None:
    key = _key(api, "browser")
    browser = TestClient(api.app)
    assert browser.post("/v1/session", json={"api_key": "isk_wrong_wrong_wrong_wrong"}).status_code == 401
    signed_in = browser.post("/v1/session", json={"api_key": key})
    assert signed_in.status_code == 200 and signed_in.json()["name"] == "browser"
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert browser.get("/v1/jobs").status_code == 200  # the cookie alone
    assert browser.delete("/v1/session").status_code == 204
    assert browser.get("/v1/jobs").status_code == 401


@pytest.mark.parametrize("chunked", [False, True])
def test_request_bodies_over_the_limit_get_413(api: TestClient, monkeypatch: pytest.MonkeyPatch, chunked: bool) -> None:
    monkeypatch.setattr(api.app.state.settings, "max_request_bytes", 50_000)  # type: ignore[attr-defined]
    big = _jpeg(size=(2000, 2000)) + b"\0" * 60_000
    if chunked:
        spec = json.dumps(SPEC).encode()
        boundary = b"xyz"
        body = (
            b'--xyz\r\nContent-Disposition: form-data; name="spec"\r\n\r\n' + spec + b"\r\n"
            b'--xyz\r\nContent-Disposition: form-data; name="references"; filename="r.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + big + b"\r\n--xyz--\r\n"
        )
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
        response = api.post(
            "/v1/jobs", content=chunks, headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}
        )
    else:
        response = api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=[("references", ("r.jpg", big))])
    assert response.status_code == 413, response.text
    assert "50000 bytes" in response.json()["detail"]
    assert api.get("/v1/jobs").json()["items"] == []  # nothing was created
    small = api.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=[("references", ("r.jpg", _jpeg()))])
    assert small.status_code == 201


def test_user_strings_never_reach_object_keys(api: TestClient) -> None:
    job_id = _create(api).json()["id"]
    _fill(api.app.state.state, api.app.state.store, job_id, [0.2])  # type: ignore[attr-defined]
    for crop in ("..%2F..%2Freferences", "%2e%2e", "a/../../b", "..", "x" * 300):
        for suffix in ("image", "original"):
            response = api.get(f"/v1/jobs/{job_id}/crops/{crop}/{suffix}")
            assert response.status_code in (404, 422), (crop, response.status_code)
    for export in ("..%2F..", "../../etc/passwd", "0" * 31 + "/"):
        assert api.get(f"/v1/jobs/{job_id}/exports/{export}/download").status_code in (404, 422)
    # Reference file names are not used: objects are named by content hash.
    named = api.post(
        "/v1/jobs", data={"spec": json.dumps(SPEC)}, files=[("references", ("../../../x.jpg", _jpeg((1, 2, 3))))]
    )
    job = api.app.state.state.get_job(named.json()["id"])  # type: ignore[attr-defined]
    assert all(".." not in k and k.startswith(f"jobs/{job.id}/") for k in job.reference_keys)


def test_the_env_example_placeholder_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from imgsift_api.settings import ApiSettings

    monkeypatch.setenv("IMGSIFT_STORAGE", "local")
    monkeypatch.setenv("IMGSIFT_API_BOOTSTRAP_KEY", "change-me-admin-api-key-0123456789")
    with pytest.raises(ValidationError, match="placeholder"):
        ApiSettings()
    monkeypatch.setenv("IMGSIFT_API_BOOTSTRAP_KEY", "0123456789abcdef0123456789abcdef")
    assert ApiSettings().bootstrap_key is not None
