"""The suggested threshold and the precision/recall estimates, on mixtures whose truth is known."""

from __future__ import annotations

import random

import pytest

from imgsift_common.calibration import calibrate, estimate, histogram, leave_one_out, positive_share


def _mixture(n: int, share: float, seed: int = 0) -> tuple[list[float], list[float], list[bool]]:
    """Held-out positives, and crops mixing positives and negatives with labels."""
    rng = random.Random(seed)
    positives = [rng.gauss(0.55, 0.07) for _ in range(30)]
    labels = [rng.random() < share for _ in range(n)]
    crops = [rng.gauss(0.55, 0.07) if pos else rng.gauss(0.95, 0.08) for pos in labels]
    return positives, crops, labels


def _true_f1(crops: list[float], labels: list[bool], t: float) -> float:
    tp = sum(1 for d, y in zip(crops, labels, strict=True) if d <= t and y)
    fp = sum(1 for d, y in zip(crops, labels, strict=True) if d <= t and not y)
    fn = sum(labels) - tp
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_suggested_threshold_is_near_the_best_and_the_share_is_estimated(share: float) -> None:
    positives, crops, labels = _mixture(2000, share)
    cal = calibrate(positives, crops)
    assert cal.positive_share is not None and abs(cal.positive_share - share) < 0.1
    assert cal.suggested is not None
    best = max(_true_f1(crops, labels, t / 100) for t in range(0, 200))
    assert _true_f1(crops, labels, cal.suggested) >= best - 0.03
    e = estimate(cal.suggested, positives, crops)
    assert e.precision is not None and e.recall is not None
    true_tp = sum(1 for d, y in zip(crops, labels, strict=True) if d <= cal.suggested and y)
    true_precision = true_tp / sum(1 for d in crops if d <= cal.suggested)
    assert abs(e.precision - true_precision) < 0.1
    assert abs(e.recall - true_tp / sum(labels)) < 0.15


def test_a_known_share_replaces_the_estimate() -> None:
    """What a study gives the estimate (bench/calibration_study.py): the share it is told is used as is."""
    rng = random.Random(1)  # overlapping positives and negatives: the share moves the F1 maximum
    positives = [rng.gauss(0.6, 0.1) for _ in range(200)]
    crops = [rng.gauss(0.6, 0.1) for _ in range(1000)] + [rng.gauss(0.8, 0.1) for _ in range(1000)]
    estimated = calibrate(positives, crops)
    told = calibrate(positives, crops, share=0.9)  # far more positives than there are
    assert told.positive_share == 0.9 and estimated.positive_share is not None
    assert abs(estimated.positive_share - 0.5) < 0.1
    # Told there are more positives, it accepts more: a looser threshold.
    assert told.suggested is not None and estimated.suggested is not None
    assert told.suggested > estimated.suggested + 0.05
    truth = calibrate(positives, crops, share=0.5)
    assert truth.suggested is not None and abs(truth.suggested - estimated.suggested) < 0.05


def test_few_crops_fall_back_to_the_positives_90th_percentile() -> None:
    positives = [i / 10 for i in range(11)]  # 0.0 .. 1.0
    cal = calibrate(positives, [0.5, 0.6])
    assert cal.suggested == pytest.approx(0.9) and cal.positive_share is None
    assert calibrate([], [0.5] * 100).suggested is None


def test_crops_marked_wrong_lower_the_estimated_precision() -> None:
    positives, crops, _ = _mixture(500, 0.5)
    t = 0.7
    plain = estimate(t, positives, crops)
    below = sorted(d for d in crops if d <= t)
    marked = estimate(t, positives, crops, marked_wrong=below[: len(below) // 2])
    assert marked.precision is not None and plain.precision is not None
    assert marked.precision <= 0.51 < plain.precision


def test_histogram_and_leave_one_out() -> None:
    h = histogram([0.0, 0.01, 1.0, 1.99, 2.0], bins=4)
    assert h["edges"] == [0.0, 0.5, 1.0, 1.5, 2.0] and h["counts"] == [2, 0, 1, 2]
    assert leave_one_out([[0, 0.2, 0.5], [0.2, 0, 0.4], [0.5, 0.4, 0]]) == [0.2, 0.2, 0.4]
    assert leave_one_out([[0.0]]) == [] and positive_share([], [1.0]) is None
