"""Shared fixtures: real data, a real Redis, a real S3 endpoint, both state and object stores.

Real inputs come from ``../shared`` next to the checkout (override with
``IMGSIFT_TEST_COCO128`` and ``IMGSIFT_TEST_YOLO_WEIGHTS``); tests that need them are skipped
with a clear reason where they are absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.coco import Coco128
from tests.support.postgres import PostgresServer, PostgresUnavailable, running_postgres
from tests.support.web import TestWeb

# No test sends a packet beyond loopback, nor asks DNS: see tests/support/netguard.py.
pytest_plugins = ["tests.support.netguard"]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


# ---------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def coco128() -> Coco128:
    path = Path(os.environ.get("IMGSIFT_TEST_COCO128", SHARED / "data" / "coco128"))
    if not (path / "images").is_dir():
        pytest.skip(f"real COCO images not found at {path} (set IMGSIFT_TEST_COCO128)")
    return Coco128(path)


@pytest.fixture(scope="session")
def yolo_weights() -> Path:
    path = Path(os.environ.get("IMGSIFT_TEST_YOLO_WEIGHTS", SHARED / "models" / "yolov8n.pt"))
    if not path.is_file():
        pytest.skip(f"YOLO weights not found at {path} (set IMGSIFT_TEST_YOLO_WEIGHTS)")
    return path


@pytest.fixture
def web() -> Iterator[TestWeb]:
    """A local test web on 127.0.0.1 (see tests/support/web.py)."""
    server = TestWeb().start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of our own on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session's Redis, flushed after each test."""
    import redis

    yield redis_server
    redis.Redis.from_url(redis_server).flushall()


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL 15 on a free port, in a temp dir (never the machine's own server)."""
    try:
        with running_postgres(free_port()) as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A database of its own for one test, with the job-state schema; dropped after it."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


# ---------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port: the real S3 protocol, spoken to by the real minio client."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


S3_TEST_CREDENTIALS = {"IMGSIFT_S3_ACCESS_KEY": "testing", "IMGSIFT_S3_SECRET_KEY": "testing"}


# ---------------------------------------------------------------------------- stores


@pytest.fixture(params=["local", "s3"])
def object_store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Each object-store implementation in turn."""
    from imgsift_common.storage import LocalStore, S3Store

    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    store = S3Store(endpoint, "testing", "testing", f"t-{os.urandom(4).hex()}")
    store.ensure_bucket()
    return store


@pytest.fixture(params=["sqlite", "postgres", "services"])
def state_store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Each job-state store in turn: SQL on SQLite (embedded), on PostgreSQL, and the services'
    (PostgreSQL with its locks and idempotency keys in Redis)."""
    from imgsift_common.servicestate import ServiceStateStore
    from imgsift_common.sqlstate import SqlStateStore

    if request.param == "sqlite":
        store = SqlStateStore.sqlite(tmp_path / "state.sqlite")
    elif request.param == "postgres":
        store = SqlStateStore.open(request.getfixturevalue("postgres_url"))
    else:
        store = ServiceStateStore.connect(request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url"))
    yield store
    store.close()


@pytest.fixture
def service_state(postgres_url: str, redis_url: str):  # type: ignore[no-untyped-def]
    """The services' job-state store over the test's own PostgreSQL database and the session's Redis."""
    from imgsift_common.servicestate import ServiceStateStore

    store = ServiceStateStore.connect(postgres_url, redis_url)
    yield store
    store.close()


@pytest.fixture
def local_store(tmp_path: Path):  # type: ignore[no-untyped-def]
    from imgsift_common.storage import LocalStore

    return LocalStore(tmp_path / "objects")


@pytest.fixture
def sqlite_state(tmp_path: Path):  # type: ignore[no-untyped-def]
    from imgsift_common.sqlstate import SqlStateStore

    store = SqlStateStore.sqlite(tmp_path / "state.sqlite")
    yield store
    store.close()


@pytest.fixture(scope="session")
def siamese_export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of Siamese trunk exports for the session: each export is made once (seconds each)."""
    return tmp_path_factory.mktemp("siamese-exports")
