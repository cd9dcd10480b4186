"""Keeping short leases alive while work runs: a renewal thread as a context manager.

A lease (a Redis key with a TTL: a fetch claim, the lock of a job's training) lives a short
time so that a killed worker's lease runs out soon and another worker takes the work over. A
live worker renews it while it works, however long the work takes: ``with Renewal(renew,
ttl / 3):`` calls ``renew`` every third of the lease time until the block ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Renewal:
    """Call ``renew`` every ``interval`` seconds in a daemon thread while the ``with`` block runs.

    An exception from ``renew`` (the state store away for a moment) is logged and the next
    beat tries again: the lease still runs out by itself if the store stays away.
    """

    def __init__(self, renew: Callable[[], object], interval: float, name: str = "lease-renewal") -> None:
        self.renew = renew
        self.interval = max(0.05, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and wait for a renewal under way to end."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Renewal:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except Exception:
                log.warning("lease not renewed", extra={"renewal": self._thread.name}, exc_info=True)
