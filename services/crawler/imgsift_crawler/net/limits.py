"""Per-host politeness: at most N requests in flight to a host, and a minimum interval between them.

One interface, :meth:`HostLimiter.slot`, a context manager that waits for the host's turn.
Two implementations:

- :class:`LocalHostLimiter` for one process (the embedded ``imgsift collect``): the threads of
  a download batch share it;
- :class:`RedisHostLimiter` for the services: every worker process on every machine shares
  the host's state in Redis, so four Celery processes with eight download threads each still
  send a host no more than the limit. One Lua script takes a slot atomically; it reads the
  clock of the Redis server, so the workers' clocks need not agree. Slots are leases that
  are renewed while held, so a killed worker frees its slots within seconds.

A wait that cannot end in time (a host that asked, through ``Retry-After`` or ``Crawl-delay``,
for more patience than the request has) fails at once with :class:`HostBusy` instead of
sleeping first.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

log = logging.getLogger(__name__)


class HostBusy(Exception):
    """No slot for the host within the time the request may wait."""


class HostLimiter(Protocol):
    def slot(self, host: str, interval: float, timeout: float) -> AbstractContextManager[None]:
        """Wait (up to ``timeout`` seconds) until a request to ``host`` may start, then hold a slot.

        ``interval`` is the minimum time between the starts of two requests to ``host``.
        """
        ...

    def defer(self, host: str, seconds: float) -> None:
        """Start no request to ``host`` for ``seconds`` (the host said ``Retry-After``)."""
        ...


class LocalHostLimiter:
    """Per-host limits shared by the threads of one process."""

    _PRUNE_ABOVE = 4096  # hosts remembered before idle ones are forgotten

    def __init__(self, concurrency: int) -> None:
        self.concurrency = max(1, concurrency)
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._next: dict[str, float] = {}  # host -> monotonic time the next request may start

    @contextmanager
    def slot(self, host: str, interval: float, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                ready_at = self._next.get(host, 0.0)
                if ready_at <= now and self._active.get(host, 0) < self.concurrency:
                    break
                if ready_at > deadline or now >= deadline:
                    raise HostBusy(_busy(host, ready_at - now, timeout))
                # Woken by a release; or at ready_at when only the interval holds us back.
                self._cond.wait(max(ready_at - now, 0.001) if ready_at > now else deadline - now)
            self._active[host] = self._active.get(host, 0) + 1
            self._next[host] = now + interval
        try:
            yield
        finally:
            with self._cond:
                self._active[host] -= 1
                if not self._active[host]:
                    del self._active[host]
                if len(self._next) > self._PRUNE_ABOVE:
                    now = time.monotonic()
                    self._next = {h: t for h, t in self._next.items() if t > now or h in self._active}
                self._cond.notify_all()

    def defer(self, host: str, seconds: float) -> None:
        with self._cond:
            self._next[host] = max(self._next.get(host, 0.0), time.monotonic() + seconds)
            self._cond.notify_all()


# KEYS: the host's slot set, the host's next-allowed time. ARGV: token, limit, interval ms, lease ms.
# Returns 0 (slot taken), -1 (all slots busy) or the milliseconds until the interval has passed.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ready = tonumber(redis.call('GET', KEYS[2]) or '0')
if ready > now then return ready - now end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], string.format('%.0f', now + interval), 'PX', interval + 60000)
return 0
"""

# KEYS: the host's next-allowed time. ARGV: delay ms. Moves the time later, never earlier.
_DEFER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay = tonumber(ARGV[1])
local ready = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + delay > ready then
  redis.call('SET', KEYS[1], string.format('%.0f', now + delay), 'PX', delay + 60000)
end
return 0
"""


# KEYS: a host's slot set. ARGV: token, lease ms. Extends a held slot's lease; a lost one stays lost.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now + lease), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 0
"""


class RedisHostLimiter:
    """Per-host limits shared by every process that talks to the same Redis.

    A slot is a lease of ``lease`` seconds that a heartbeat thread renews while the request
    runs: a worker killed mid-download stops renewing, and its slots are free again within
    ``lease`` seconds, however long requests may take.
    """

    def __init__(self, client: Any, concurrency: int, lease: float = 15.0, prefix: str = "imgsift:host") -> None:
        self.client = client
        self.concurrency = max(1, concurrency)
        self.lease_ms = max(1000, int(lease * 1000))
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._defer = client.register_script(_DEFER)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # token -> the slot set holding it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_pid = 0

    @classmethod
    def from_url(cls, url: str, concurrency: int, lease: float = 15.0) -> RedisHostLimiter:
        import redis

        return cls(redis.Redis.from_url(url), concurrency, lease)

    def _keys(self, host: str) -> tuple[str, str]:
        base = f"{self.prefix}:{{{host}}}"  # one hash slot per host on a Redis Cluster
        return f"{base}:slots", f"{base}:next"

    @contextmanager
    def slot(self, host: str, interval: float, timeout: float) -> Iterator[None]:
        slots, ready = self._keys(host)
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        while True:
            wait_ms = int(
                self._acquire(keys=[slots, ready], args=[token, self.concurrency, int(interval * 1000), self.lease_ms])
            )
            if wait_ms == 0:
                break
            left = deadline - time.monotonic()
            # All slots busy: poll soon (with jitter, so waiters do not stampede); else wait
            # exactly until the interval has passed.
            wait = random.uniform(0.005, 0.03) if wait_ms < 0 else wait_ms / 1000
            if wait > left:
                raise HostBusy(_busy(host, wait if wait_ms > 0 else left, timeout))
            time.sleep(wait)
        self._hold(token, slots)
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(token, None)
            self.client.zrem(slots, token)

    def defer(self, host: str, seconds: float) -> None:
        self._defer(keys=[self._keys(host)[1]], args=[int(seconds * 1000)])

    def _hold(self, token: str, slots: str) -> None:
        with self._lock:
            self._held[token] = slots
            # Started on first use, in the process that uses it (a Celery child, not the parent it forked from).
            if self._heartbeat is None or self._heartbeat_pid != os.getpid() or not self._heartbeat.is_alive():
                self._heartbeat_pid = os.getpid()
                self._heartbeat = threading.Thread(target=self._renew_leases, name="host-slot-leases", daemon=True)
                self._heartbeat.start()

    def _renew_leases(self) -> None:
        while not self._stop.wait(self.lease_ms / 3000):
            with self._lock:
                held = list(self._held.items())
            for token, slots in held:
                try:
                    self._renew(keys=[slots], args=[token, self.lease_ms])
                except Exception:  # Redis away for a moment: the next beat tries again
                    log.warning("could not renew a host slot lease", exc_info=True, extra={"slots": slots})

    def close(self) -> None:
        """Stop renewing leases (what a killed worker does, too)."""
        self._stop.set()


def _busy(host: str, wait: float, timeout: float) -> str:
    return (
        f"no request slot for {host} within {timeout:g}s (the host's rate or concurrency limit, "
        f"or its Retry-After, needs {max(wait, 0):.1f}s more)"
    )
