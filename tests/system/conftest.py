"""The compose topology as local processes, for the system tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import S3_TEST_CREDENTIALS, free_port
from tests.support.postgres import PostgresServer
from tests.support.stack import Stack

# The operator's first key (compose's IMGSIFT_API_BOOTSTRAP_KEY): every API call but /healthz needs a key.
TEST_API_KEY = "isk_systemtest_3f9c1a7e5b2d4c6e8a0b1c2d3e4f5a6b"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture
def stack_database(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty database of the test's own PostgreSQL: the stack's migrate step gives it its schema."""
    url = postgres_server.create_database(migrated=False)
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def stack_state(stack_database: str, redis_url: str):  # type: ignore[no-untyped-def]
    """The stack's job state, read as the services read it (PostgreSQL, with Redis for locks)."""
    from imgsift_common.servicestate import ServiceStateStore

    state = ServiceStateStore.connect(stack_database, redis_url)
    yield state
    state.close()


@pytest.fixture
def stack_env(
    redis_url: str, stack_database: str, s3_endpoint: str, yolo_weights: Path, siamese_export_dir: Path
) -> dict[str, str]:
    """The environment compose would give, with test endpoints; tests may add to it before `stack`."""
    return {
        **S3_TEST_CREDENTIALS,
        "IMGSIFT_DATABASE_URL": stack_database,
        # Compose builds the URL above from it; the test's server trusts local connections.
        "IMGSIFT_POSTGRES_PASSWORD": "unused",
        "IMGSIFT_REDIS_URL": redis_url,
        "IMGSIFT_API_BOOTSTRAP_KEY": TEST_API_KEY,
        "IMGSIFT_S3_ENDPOINT": s3_endpoint,
        "IMGSIFT_S3_BUCKET": "system-test",
        "IMGSIFT_DETECTOR_WEIGHTS": str(yolo_weights),
        "IMGSIFT_DETECTOR_DEVICE": "cpu",
        "IMGSIFT_SIAMESE_DEVICE": "cpu",
        # The distances the system tests assert (elephants against other animals at 0.8) were
        # measured with MobileNetV2; the default backbone runs end to end in tests/cli/test_verify.py,
        # and bench/quality_bench.py measures both.
        "IMGSIFT_SIAMESE_BACKBONE": "mobilenet_v2",
        # Compose's CPU default runs the trunk as an OpenVINO export: made once per session, here.
        "IMGSIFT_SIAMESE_EXPORT_DIR": str(siamese_export_dir),
        "IMGSIFT_CRAWLER_DOWNLOAD_CONCURRENCY": "4",
        # The test web and the API run on 127.0.0.1, which the crawler refuses by default.
        "IMGSIFT_CRAWLER_NETWORK_ALLOWLIST": '["127.0.0.1/32"]',
        "UVICORN_HOST": "127.0.0.1",
        "UVICORN_PORT": str(free_port()),
    }


@pytest.fixture
def stack(stack_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    """The API and one worker per stage, running; yields the stack and the API's base URL."""
    running = Stack(env=stack_env, logdir=tmp_path)
    running.start_all()
    api = f"http://127.0.0.1:{stack_env['UVICORN_PORT']}"
    try:
        running.wait_ready(api)
        yield running, api
    finally:
        running.stop_all()
