"""The threshold's own computation (`threshold.decide`) timed on synthetic jobs, and a digest of its results.

    PYTHONPATH=common .venv/bin/python bench/decide_bench.py
    PYTHONPATH=<another tree>/common .venv/bin/python bench/decide_bench.py   # the same jobs, that tree's code

Every re-decision through the API (``PATCH /v1/jobs/{id}``) runs ``threshold.decide`` on the job's
distance counts at the calibration grid, after the counts are read from the histogram; at 10
million crops most of the request is this pure-Python part. The bench builds 6 jobs of 10 million
crops (two-component distance mixtures, 45 held-out reference distances, counts at the grid of
``threshold.for_job``) and decides each with 0, 5, 20 and 60 answers, 3 times; it prints the median
and worst time of a decision and a SHA-256 of every decision's result, so two trees that decide
alike print the same digest.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import statistics
import time

from imgsift_common import answers as ask
from imgsift_common import threshold as th
from imgsift_common.calibration import Distribution, grid_for

CROPS = 10_000_000
SAMPLE = 50_000  # distances drawn per job; each stands for CROPS / SAMPLE crops


def main() -> None:
    results: list[str] = []
    times: dict[int, list[float]] = {}
    edges = [round(th.MAX_DISTANCE * i / th.HISTOGRAM_BINS, 4) for i in range(th.HISTOGRAM_BINS + 1)]
    for seed in range(6):
        rng = random.Random(seed)
        positives = [abs(rng.gauss(0.5, 0.15)) for _ in range(45)]
        share = rng.random()
        sample = sorted(
            min(2.0, abs(rng.gauss(0.6 if rng.random() < share else 1.2, 0.2))) for _ in range(SAMPLE)
        )  # fmt: skip
        at = rng.choice([0.5, 0.8, 1.0])
        grid = grid_for(positives, at, *edges)
        counts = [bisect.bisect_right(sample, g) * (CROPS // SAMPLE) for g in grid]
        crops = Distribution(CROPS, grid, counts)
        for k in (0, 5, 20, 60):
            given = [ask.Answer(d, (d < 0.9) != (rng.random() < 0.1)) for d in rng.sample(sample, k)]
            for _ in range(3):
                start = time.perf_counter()
                decided = th.decide(positives, crops, given, at)
                times.setdefault(k, []).append(time.perf_counter() - start)
            results.append(repr(decided))
    everything = [t for ts in times.values() for t in ts]
    for k, ts in times.items():
        print(f"{k:2d} answers: median {statistics.median(ts) * 1000:6.1f} ms, worst {max(ts) * 1000:6.1f} ms")
    print(f"all: median {statistics.median(everything) * 1000:.1f} ms, worst {max(everything) * 1000:.1f} ms")
    print("results sha256:", hashlib.sha256("\n".join(results).encode()).hexdigest())


if __name__ == "__main__":
    main()
