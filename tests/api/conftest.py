"""The API app against a real PostgreSQL, a real Redis and a real S3 endpoint (moto), signed in with an admin key."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import S3_TEST_CREDENTIALS

ADMIN_KEY = "isk_apitest_admin_0123456789abcdef"


@pytest.fixture
def api(redis_url: str, postgres_url: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for name, value in {
        **S3_TEST_CREDENTIALS,
        "IMGSIFT_DATABASE_URL": postgres_url,
        "IMGSIFT_REDIS_URL": redis_url,
        "IMGSIFT_S3_ENDPOINT": s3_endpoint,
        "IMGSIFT_S3_BUCKET": "api-tests",
        "IMGSIFT_API_BOOTSTRAP_KEY": ADMIN_KEY,
    }.items():
        monkeypatch.setenv(name, value)
    from imgsift_api.main import app

    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client
