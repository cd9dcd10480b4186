"""When to try a request again, and how long to wait first.

Only answers that say "later" are retried: 429, 408 and 5xx, and failures to connect. Other
4xx are final. Waits grow exponentially with *full jitter* (a uniform draw between 0 and the
exponential cap), so workers that failed together do not come back together; a server's
``Retry-After`` overrides the draw. Retries are bounded (``max_retries``): unbounded retries
amplify an outage.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))


def should_retry_status(status: int) -> bool:
    return status in RETRY_STATUSES


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)] (attempt from 0)."""
    ceiling = min(cap, base * (2.0 ** min(attempt, 32)))
    return (rng or random).uniform(0.0, ceiling)
