"""The services' start-up against PostgreSQL: a worker refuses a schema it does not know, and
the wait for an unreachable server retries, then gives up with the driver's error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy.exc

from imgsift_common.servicestate import wait_for_database
from imgsift_common.sqldialect import make_engine
from tests.conftest import free_port
from tests.support.postgres import PostgresServer


def test_a_worker_refuses_to_start_against_a_database_without_its_schema(
    postgres_server: PostgresServer, redis_url: str, tmp_path: Path
) -> None:
    empty = postgres_server.create_database(migrated=False)
    env = {
        **os.environ,
        "IMGSIFT_DATABASE_URL": empty,
        "IMGSIFT_REDIS_URL": redis_url,
        "IMGSIFT_STORAGE": "local",
        "IMGSIFT_LOCAL_STORAGE_DIR": str(tmp_path),
        "IMGSIFT_METRICS_PORT": "0",
    }
    command = [sys.executable, "-m", "celery", "-A", "imgsift_crawler.worker", "worker", "-Q", "crawl"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    finally:
        postgres_server.drop_database(empty)
    assert done.returncode != 0
    assert "refuses to start" in done.stderr and "python -m imgsift_common.migrate" in done.stderr, done.stderr


def test_the_wait_for_an_unreachable_postgres_retries_then_raises(caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(f"postgresql://imgsift@127.0.0.1:{free_port()}/imgsift")
    with pytest.raises(sqlalchemy.exc.OperationalError):
        wait_for_database(engine, attempts=3, interval=0.01)
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 2  # logged before each new try
