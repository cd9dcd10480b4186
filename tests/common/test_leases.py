from __future__ import annotations

import threading
import time

from imgsift_common.leases import Renewal


def test_renews_while_the_block_runs_and_never_after() -> None:
    calls: list[float] = []
    with Renewal(lambda: calls.append(time.monotonic()), 0.05):
        time.sleep(0.4)
    during = len(calls)
    time.sleep(0.2)

    assert during >= 3  # every 0.05 s for 0.4 s (a loaded machine may miss some beats)
    assert len(calls) == during  # stopped with the block


def test_a_failed_renewal_does_not_stop_the_next() -> None:
    attempts = 0
    third = threading.Event()

    def flaky() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            third.set()
        raise ConnectionError("the state store went away")

    with Renewal(flaky, 0.05):
        assert third.wait(5), "renewal stopped after a failure"
