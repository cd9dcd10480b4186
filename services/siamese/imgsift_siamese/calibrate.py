"""Where to put the threshold: a suggestion, and estimated precision and recall at any threshold.

A user cannot know the right distance threshold, and the job has almost no labels. What it
has:

- held-out positive distances ``P``: what unseen views of the object score. Without a trained
  head, each reference's distance to the nearest *other* reference (leave-one-out); with one,
  the distances of references held out of a fold's training (``train.fit``). Crops the user
  marked right join them.
- the job's crop distances ``D``: a mix of positives, distributed like ``P``, and negatives,
  in an unknown proportion ``pi``. Crops the user marked wrong are known negatives.

The estimate (mixture proportion estimation, as in Elkan & Noto 2008 / Blanchard et al. 2010):
the crops below any threshold ``t`` include at least ``pi * F_P(t)`` of them, so
``pi <= F_D(t) / F_P(t)`` for every ``t``; its smallest value over the thresholds where
``F_P`` is well measured is the estimate. Then, at threshold ``t``:

    recall(t) = F_P(t)          precision(t) = pi * F_P(t) / F_D(t)

and the suggested threshold maximises the estimated F1 over the observed distances. With
fewer than ``min_crops`` crops there is nothing to mix, and the suggestion is the 90th
percentile of ``P`` (a recall of about 0.9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HISTOGRAM_BINS = 40
HISTOGRAM_RANGE = (0.0, 2.0)  # unit-norm embeddings: distances lie in [0, 2]


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


def _cdf(sorted_values: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_values, t, side="right") / max(1, len(sorted_values))


def calibrate(
    positives: Sequence[float],
    crops: Sequence[float],
    *,
    marked_wrong: Sequence[float] = (),
    min_crops: int = 20,
) -> Calibration:
    """Suggest a threshold from held-out positive distances and the job's crop distances."""
    p = np.sort(np.asarray(positives, dtype=np.float64))
    d = np.sort(np.asarray(crops, dtype=np.float64))
    if len(p) == 0:
        return Calibration(None, None, "no held-out positive distances (give at least two references)")
    if len(d) < min_crops:
        return Calibration(float(np.quantile(p, 0.9)), None, f"90th percentile of {len(p)} held-out positives")
    pi = _positive_share(p, d)
    grid = np.unique(np.concatenate([d, p]))
    f1 = _f1(grid, p, d, pi, np.sort(np.asarray(marked_wrong, dtype=np.float64)))
    best = float(grid[int(np.argmax(f1))])
    return Calibration(best, pi, f"estimated F1 maximum ({len(p)} held-out positives, {len(d)} crops)")


def _positive_share(p: np.ndarray, d: np.ndarray) -> float:
    # Only where F_P is well measured (at least half the positives below t): ratios at the
    # far left rest on one or two positives and would swing the estimate.
    t = p[len(p) // 2 :]
    ratios = _cdf(d, t) / np.maximum(_cdf(p, t), 1e-9)
    return float(np.clip(ratios.min(), 1.0 / len(d), 1.0))


def _f1(t: np.ndarray, p: np.ndarray, d: np.ndarray, pi: float, wrong: np.ndarray) -> np.ndarray:
    recall = _cdf(p, t)
    below = _cdf(d, t)
    precision = np.where(below > 0, np.minimum(1.0, pi * recall / np.maximum(below, 1e-12)), 1.0)
    if len(wrong):
        # Crops the user marked wrong are negatives for certain: at least that many are below t.
        known_bad = np.searchsorted(wrong, t, side="right") / len(d)
        precision = np.minimum(precision, np.where(below > 0, 1 - known_bad / np.maximum(below, 1e-12), 1.0))
    return np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)


def estimate(
    threshold: float, positives: Sequence[float], crops: Sequence[float], calibration: Calibration
) -> Estimate:
    """Estimated precision, recall and F1 of accepting crops with distance <= ``threshold``."""
    p = np.sort(np.asarray(positives, dtype=np.float64))
    d = np.sort(np.asarray(crops, dtype=np.float64))
    if len(p) == 0:
        return Estimate(threshold, None, None, None)
    recall = float(_cdf(p, np.array([threshold]))[0])
    if calibration.positive_share is None or len(d) == 0:
        return Estimate(threshold, None, recall, None)
    below = float(_cdf(d, np.array([threshold]))[0])
    precision = min(1.0, calibration.positive_share * recall / below) if below > 0 else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Estimate(threshold, precision, recall, f1)


def histogram(crops: Sequence[float], bins: int = HISTOGRAM_BINS) -> dict[str, list[float] | list[int]]:
    """Counts of crop distances in equal bins over [0, 2]: ``edges`` (bins + 1) and ``counts``."""
    counts, edges = np.histogram(np.asarray(crops, dtype=np.float64), bins=bins, range=HISTOGRAM_RANGE)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}
