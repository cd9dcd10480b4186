"""The services' job state: durable records in PostgreSQL, what is ephemeral in Redis.

:class:`ServiceStateStore` is :class:`~imgsift_common.sqlstate.SqlStateStore` on PostgreSQL,
the one implementation of the job-state rules, with three operations moved to Redis because
what they keep is meant to expire, not to last: the locks and fetch claims (``hold_lock``, a
key with a TTL that a killed worker's claim runs out of) and the ``Idempotency-Key`` bindings
of ``POST /jobs`` (a key with a TTL). What Redis holds for a job is therefore a handful of
short-lived keys, whatever the number of its images (docs/architecture.md, "Stores").

A service opens the store lazily (nothing connects until the first call), then
:func:`wait_for_database` at start: it retries while PostgreSQL cannot be reached, as
Celery does for the broker, and refuses to go on against a schema it does not know.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from imgsift_common import schema
from imgsift_common.settings import ImgsiftSettings
from imgsift_common.sqldialect import make_engine
from imgsift_common.sqlstate import SqlStateStore

log = logging.getLogger(__name__)

PREFIX = "imgsift"

_HOLD_LOCKS = """
-- KEYS: locks ; ARGV: owner, ttl_ms ; take each free lock, or keep one we hold; 1 or 0 for each
local held = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder and holder ~= ARGV[1] then
    held[i] = 0
  else
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[i] = 1
  end
end
return held
"""

_RELEASE_LOCKS = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""


def database_url(settings: ImgsiftSettings) -> str:
    """The PostgreSQL URL a service keeps its records in; a clear error when it is not set."""
    if settings.database_url is None:
        raise ValueError(
            "IMGSIFT_DATABASE_URL must be set for the services (e.g. "
            "postgresql://imgsift:PASSWORD@postgres:5432/imgsift); see .env.example"
        )
    return settings.database_url.get_secret_value()


class ServiceStateStore(SqlStateStore):
    """Job records in PostgreSQL (SqlStateStore); locks, fetch claims and idempotency keys in Redis
    (a download batch's fetch claims taken and freed in one round trip: :class:`~imgsift_common.state.BatchLocks`)."""

    def __init__(self, engine: sa.Engine, client: object) -> None:
        import redis

        super().__init__(engine)
        assert isinstance(client, redis.Redis)
        # Any: redis-py's hints do not know that decode_responses=True returns str.
        self.r: Any = client
        self._hold_locks = self.r.register_script(_HOLD_LOCKS)
        self._release_locks = self.r.register_script(_RELEASE_LOCKS)

    @classmethod
    def connect(cls, database_url: str, redis_url: str) -> ServiceStateStore:
        """The store over both; lazy: nothing connects until the first call."""
        import redis

        return cls(make_engine(database_url), redis.Redis.from_url(redis_url, decode_responses=True))

    @classmethod
    def from_settings(cls, settings: ImgsiftSettings) -> ServiceStateStore:
        return cls.connect(database_url(settings), settings.redis_url)

    def close(self) -> None:
        super().close()
        self.r.close()

    def ping_database(self) -> None:
        """Raise unless PostgreSQL answers (the API's /healthz)."""
        with self._read() as conn:
            conn.execute(sa.text("SELECT 1"))

    def _lock_key(self, job_id: str, name: str) -> str:
        return f"{PREFIX}:job:{job_id}:lock:{name}"

    def hold_lock(self, job_id: str, name: str, owner: str, ttl: float) -> bool:
        return self.hold_locks(job_id, [name], owner, ttl)[0]

    def release_lock(self, job_id: str, name: str, owner: str) -> None:
        self.release_locks(job_id, [name], owner)

    def hold_locks(self, job_id: str, names: Sequence[str], owner: str, ttl: float) -> list[bool]:
        """``hold_lock`` for each name, in one round trip (a download batch's fetch claims)."""
        if not names:
            return []
        keys = [self._lock_key(job_id, name) for name in names]
        return [held == 1 for held in self._hold_locks(keys=keys, args=[owner, max(1, int(ttl * 1000))])]

    def release_locks(self, job_id: str, names: Sequence[str], owner: str) -> None:
        if names:
            self._release_locks(keys=[self._lock_key(job_id, name) for name in names], args=[owner])

    def claim_idempotency_key(self, key: str, job_id: str, ttl: float) -> str:
        name = f"{PREFIX}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"
        if self.r.set(name, job_id, nx=True, px=max(1, int(ttl * 1000))):
            return job_id
        return str(self.r.get(name) or job_id)


DATABASE_RETRY_SECONDS = 2.0


def wait_for_database(
    engine: sa.Engine, *, attempts: int | None = None, interval: float = DATABASE_RETRY_SECONDS
) -> None:
    """Wait until PostgreSQL answers, logging each failed try, then check its schema revision.

    Retries forever by default (``attempts=None``), as a worker does for its broker; a
    :class:`~imgsift_common.schema.SchemaMismatch` is raised at once: no wait fixes it.
    """
    from imgsift_common.celery_app import DATABASE_ERRORS

    tried = 0
    while True:
        tried += 1
        try:
            schema.check_schema(engine)
            return
        except DATABASE_ERRORS as exc:
            if attempts is not None and tried >= attempts:
                raise
            where = engine.url.render_as_string(hide_password=True)
            log.warning("PostgreSQL at %s is unreachable (%s); trying again in %.0f s", where, exc, interval)
            time.sleep(interval)
