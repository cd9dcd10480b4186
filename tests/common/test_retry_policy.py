"""The default retry policy rides through a 30-second outage (docs/reliability.md, "Outages").

The waits are drawn by Celery's own formula (``get_exponential_backoff_interval``, full jitter),
for tasks whose every attempt fails at once: the worst case, as the attempts themselves take no time.
"""

from __future__ import annotations

import random

from celery.utils import time as celery_time

from imgsift_common.celery_app import retry_policy
from imgsift_common.settings import DEFAULT_TASK_MAX_RETRIES

DRAWS = 20_000


def _share_waiting_less_than(seconds: float, max_retries: int) -> float:
    policy = retry_policy(max_retries)
    saved = random.getstate()
    random.seed(7)  # Celery draws from the random module
    try:
        short = 0
        for _ in range(DRAWS):
            waited = sum(
                celery_time.get_exponential_backoff_interval(
                    policy["retry_backoff"], retries, policy["retry_backoff_max"], policy["retry_jitter"]
                )
                for retries in range(policy["max_retries"])
            )
            short += waited < seconds
        return short / DRAWS
    finally:
        random.setstate(saved)


def test_the_default_retries_outlast_a_30_second_outage_where_five_would_not() -> None:
    assert DEFAULT_TASK_MAX_RETRIES == 8
    assert _share_waiting_less_than(30, DEFAULT_TASK_MAX_RETRIES) < 0.002  # 0.08% in 200,000 draws
    assert _share_waiting_less_than(60, DEFAULT_TASK_MAX_RETRIES) < 0.04  # 2.9%
    assert _share_waiting_less_than(30, 5) > 0.4  # 45%: why not five
