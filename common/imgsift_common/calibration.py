"""Where to put the threshold: a suggestion, and estimated precision and recall at any threshold.

Pure Python (no numpy), so the API can answer it without any model library.

A user cannot know the right distance threshold, and a job has almost no labels. What it has:

- held-out positive distances ``P``: what unseen views of the object score. Each reference
  and its augmented views (partial, flipped, recoloured: like detector crops) measured
  against the *other* references; with a trained head, references held out of a fold's
  training, measured with that fold's head. Crops the user marked right join them.
- the job's crop distances ``D``: a mix of positives, distributed like ``P``, and negatives,
  in an unknown proportion ``pi``. Crops the user marked wrong are negatives for certain.

The estimate is mixture proportion estimation (Elkan & Noto 2008; Blanchard et al. 2010):
the crops below a threshold ``t`` hold ``pi * F_P(t)`` positives, so ``pi ~ F_D(t) / F_P(t)``
where few negatives lie below ``t``. The estimate is the median of that ratio over the upper
half of ``P`` (where ``F_P`` is well measured: the smallest ratio, the classic bound, follows
the noise of a few held-out positives too closely). Then at ``t``

    recall(t) = F_P(t)          precision(t) = pi * F_P(t) / F_D(t)

(capped by what the wrong marks prove), and the suggested threshold maximises the estimated
F1. With fewer than ``min_crops`` crops there is nothing to mix yet, and the suggestion is
the 90th percentile of ``P`` (an expected recall of 0.9).

This is the label-free part of a job's threshold. :mod:`imgsift_common.threshold` decides
whether to trust it (the references must be judged to separate the crops) and combines it
with the user's answers (:mod:`imgsift_common.answers`).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

HISTOGRAM_BINS = 40
MAX_DISTANCE = 2.0  # distances between unit vectors lie in [0, 2]
GRID = 400  # thresholds tried, evenly over [0, 2], plus every positive distance


@dataclass(frozen=True)
class Estimate:
    threshold: float
    precision: float | None
    recall: float | None
    f1: float | None


@dataclass(frozen=True)
class Calibration:
    suggested: float | None  # None: no held-out positives to calibrate from
    positive_share: float | None  # estimated fraction of positives among the crops (pi)
    basis: str  # how the suggestion was made, in words


def _cdf(sorted_values: Sequence[float], t: float) -> float:
    return bisect_right(sorted_values, t) / len(sorted_values) if sorted_values else 0.0


class Distribution:
    """The job's crop distances as a CDF: from the values, or from counts at known thresholds.

    A job of 100,000 crops is calibrated from a few hundred counts (one Redis round trip of
    ZCOUNTs), never by reading every distance.
    """

    def __init__(self, n: int, thresholds: Sequence[float], counts: Sequence[int]) -> None:
        self.n = n
        self.thresholds = list(thresholds)  # ascending
        self.counts = list(counts)

    @classmethod
    def from_values(cls, values: Sequence[float], grid: Sequence[float]) -> Distribution:
        ordered = sorted(values)
        points = sorted(set(grid))
        return cls(len(ordered), points, [bisect_right(ordered, t) for t in points])

    def count(self, t: float) -> int:
        """Crops with distance <= t (exact on the grid; the nearest grid point below otherwise)."""
        i = bisect_right(self.thresholds, t) - 1
        return self.counts[i] if i >= 0 else 0

    def cdf(self, t: float) -> float:
        return self.count(t) / self.n if self.n else 0.0


def grid_for(positives: Sequence[float], *extra: float) -> list[float]:
    """The thresholds a calibration looks at: an even grid over [0, 2], the positives, the extras."""
    return sorted({*(MAX_DISTANCE * i / GRID for i in range(GRID + 1)), *positives, *extra})


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def positive_share(positives: Sequence[float], crops: Sequence[float] | Distribution) -> float | None:
    p = sorted(positives)
    d = crops if isinstance(crops, Distribution) else Distribution.from_values(crops, grid_for(p))
    if not p or not d.n:
        return None
    ratios = sorted(d.cdf(t) / max(_cdf(p, t), 1e-9) for t in p[len(p) // 2 :])
    return min(1.0, max(1.0 / d.n, ratios[len(ratios) // 2]))


def calibrate(
    positives: Sequence[float],
    crops: Sequence[float] | Distribution,
    *,
    marked_wrong: Sequence[float] = (),
    min_crops: int = 20,
    share: float | None = None,
) -> Calibration:
    """Suggest a threshold from held-out positive distances and the job's crop distances.

    ``share``: the share of positives among the crops where it is known (a study
    giving the estimate the truth); None: estimated from the distances, as for every job.
    """
    p = sorted(positives)
    if not p:
        return Calibration(None, None, "no held-out positive distances (give at least two references)")
    grid = grid_for(p)
    d = crops if isinstance(crops, Distribution) else Distribution.from_values(crops, grid)
    if d.n < min_crops:
        return Calibration(round(quantile(p, 0.9), 4), None, f"90th percentile of {len(p)} held-out positives")
    pi = positive_share(p, d) if share is None else share
    assert pi is not None
    wrong = sorted(marked_wrong)
    best_t, best_f1 = grid[0], -1.0
    for t in grid:
        f1 = _estimate(t, p, d, pi, wrong).f1 or 0.0
        if f1 > best_f1:
            best_t, best_f1 = t, f1
    basis = f"estimated F1 maximum ({len(p)} held-out positives, {d.n} crops"
    basis += f", {len(wrong)} marked wrong)" if wrong else ")"
    return Calibration(round(best_t, 4), round(pi, 4), basis)


def _estimate(t: float, p: Sequence[float], d: Distribution, pi: float, wrong: Sequence[float]) -> Estimate:
    recall = _cdf(p, t)
    below = d.cdf(t)
    if below == 0:
        precision = 1.0
    else:
        precision = min(1.0, pi * recall / below)
        if wrong:  # marked wrong: negatives for certain, so at most this share is right
            precision = min(precision, max(0.0, 1.0 - bisect_right(wrong, t) / (below * d.n)))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Estimate(t, precision, recall, f1)


def estimate(
    threshold: float,
    positives: Sequence[float],
    crops: Sequence[float] | Distribution,
    *,
    marked_wrong: Sequence[float] = (),
) -> Estimate:
    """Estimated precision, recall and F1 of accepting crops with distance <= ``threshold``."""
    p = sorted(positives)
    if not p:
        return Estimate(threshold, None, None, None)
    d = crops if isinstance(crops, Distribution) else Distribution.from_values(crops, grid_for(p, threshold))
    pi = positive_share(p, d)
    if pi is None:
        return Estimate(threshold, None, round(_cdf(p, threshold), 4), None)
    e = _estimate(threshold, p, d, pi, sorted(marked_wrong))
    return Estimate(threshold, *(round(v, 4) if v is not None else None for v in (e.precision, e.recall, e.f1)))


def histogram(crops: Sequence[float], bins: int = HISTOGRAM_BINS) -> dict[str, list[float] | list[int]]:
    """Counts of crop distances in equal bins over [0, 2]: ``edges`` (bins + 1) and ``counts``."""
    counts = [0] * bins
    for v in crops:
        counts[min(bins - 1, max(0, int(v / MAX_DISTANCE * bins)))] += 1
    return {"edges": [round(MAX_DISTANCE * i / bins, 4) for i in range(bins + 1)], "counts": counts}


def leave_one_out(distance_matrix: Sequence[Sequence[float]]) -> list[float]:
    """Each reference's distance to its nearest other reference, from the reference-by-reference matrix."""
    n = len(distance_matrix)
    if n < 2:
        return []
    return [min(distance_matrix[i][j] for j in range(n) if j != i) for i in range(n)]
