"""Property-based tests of the whole API from its OpenAPI document (schemathesis): whatever
requests the schema admits, or nearly admits, the API never answers 5xx.

Real Redis and a real S3 endpoint (moto) behind the app; one job with a stored image and
crops exists, so operations on jobs reach past the 404 for some of the generated ids. No
worker runs: enqueued tasks stay in Redis.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.api.conftest import ADMIN_KEY
from tests.api.test_jobs import _create, _fill

EXAMPLES = 60  # per operation


def test_no_request_gets_a_server_error(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # The generated requests pass the default 600/minute: a 429 is not what is tested here.
    # (schemathesis runs the app's lifespan again, which reads the settings again.)
    monkeypatch.setenv("IMGSIFT_API_RATE_LIMIT", "1000000/minute")
    job_id = _create(api).json()["id"]
    crop_ids = _fill(api.app.state.state, api.app.state.store, job_id, [0.1, 0.5, 0.9])  # type: ignore[attr-defined]
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    tried: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            # Half the cases aim at the real job and crop, so the operations get past their 404.
            if case.path_parameters and tried.get(case.operation.label, 0) % 2 == 0:
                case.path_parameters.update(
                    {k: v for k, v in (("job_id", job_id), ("crop_id", crop_ids[1])) if k in case.path_parameters}
                )
            response = case.call_and_validate(headers=auth, checks=[not_a_server_error])
            tried[case.operation.label] = tried.get(case.operation.label, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        run()
    print(f"schemathesis: {sum(tried.values())} requests, {len(tried)} operations, statuses {sorted(statuses.items())}")
    assert len(tried) >= 20
    assert sum(n for code, n in statuses.items() if code < 300) > 50  # the generated requests reach real work
    assert 429 not in statuses
