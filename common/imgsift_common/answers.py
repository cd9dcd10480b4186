"""Answers settle the threshold: a calibrated probability of being a positive, and the questions to ask.

Pure Python (no numpy), like :mod:`imgsift_common.calibration`, so the API answers it without
any model library, from the job's distance counts and its few answers.

What a job knows after ``n`` answers (crops the user said are right or wrong):

- the probability that a crop at distance ``d`` shows the target, ``p(d) = sigmoid(a + b z)``
  with ``z`` the distance in units of the job's own spread (median and inter-decile range of
  its crop distances), fitted to the answers by logistic regression with a Gaussian prior
  (a maximum a posteriori fit, its uncertainty the Laplace approximation: the inverse Hessian).
  Logistic regression models ``p(y | d)`` directly, so it stays right however the answered
  crops were chosen along the distances, which is what lets the job pick its questions;
- the prior: a slope of 0 (distance says nothing) and a share of one half, both loose. With
  no answers the fit *is* the prior: every crop is as likely a positive as any other, and the
  expected F1 is highest when every crop is accepted. The job never cuts recall on a guess;
  the references' evidence enters only through :func:`label_free_prior`, where
  :mod:`imgsift_common.threshold` judges it strong enough;
- the slope is kept at or below 0: answers saying that farther crops are more often right
  say the distance does not separate this job, and the fit is then flat (accept everything).

The suggested threshold maximises the *expected* F1 over every crop of the job: with ``p`` for
the crops not answered and the answers themselves for the ones that are,
``E[TP(t)] = sum p over crops <= t``, ``E[P] = sum p over all crops``, and
``F1(t) ~ 2 E[TP(t)] / (n(<= t) + E[P])``, averaged over draws of the fit's posterior once
there are answers. The estimated precision and recall carry an 80%
interval from draws of the fit's posterior.

Questions (:func:`question_targets`) are spread over the job's distances by systematic
sampling along their CDF: half of each round log-uniformly in rank (the positives of a job
crowd at its near end, where a threshold goes), half where an answer is needed most: where the
fit's ``p`` is most uncertain, and near the current suggestion (where ``p`` is about half the
best F1, the F1-optimal point of a calibrated probability, and where an answer moves it).
"""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from imgsift_common.calibration import MAX_DISTANCE, Distribution, quantile

# Accepting every crop: no crop's distance to the references exceeds 2 (unit vectors); only a
# "not this" image can raise a decided distance past it, and those crops stay rejected.
ACCEPT_ALL = MAX_DISTANCE
PRIOR_SLOPE_SD = 2.5  # the slope per unit of spread: -2.5 multiplies the odds by 12 per unit
PRIOR_SHARE_SD = 1.5  # log-odds of the positive share at the median crop
NO_SHARE = 0.5  # the prior share of positives at the median crop where the references say nothing
DRAWS = 100  # posterior draws for the precision and recall intervals
SUGGEST_DRAWS = 50  # posterior draws the suggestion's expected F1 is averaged over
INTERVAL = (0.1, 0.9)  # the 80% interval reported
QUESTION_SPREAD = 0.3
GOLDEN = 0.6180339887498949  # the share of a round of questions spread over the distances, the rest where needed


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class Answer:
    distance: float
    right: bool


@dataclass(frozen=True)
class Prior:
    """A Gaussian prior on the fit: the log-odds of the share at the median distance, and the slope."""

    intercept: float
    slope: float
    intercept_sd: float = PRIOR_SHARE_SD
    slope_sd: float = PRIOR_SLOPE_SD


@dataclass(frozen=True)
class Scale:
    """Distances in units of the job's spread: ``z = (d - centre) / spread``."""

    centre: float
    spread: float

    @classmethod
    def of(cls, crops: Distribution) -> Scale:
        """The job's median distance and its 10th-90th percentile range / 2.56 (one SD for a normal)."""
        cells = _cells(crops)
        if not cells:
            return cls(1.0, 0.1)
        centre = _cell_quantile(cells, 0.5)
        spread = (_cell_quantile(cells, 0.9) - _cell_quantile(cells, 0.1)) / 2.56
        return cls(centre, max(spread, 0.01))

    def z(self, d: float) -> float:
        return (d - self.centre) / self.spread


@dataclass(frozen=True)
class Fit:
    """``p(d) = sigmoid(a + b z(d))`` and its posterior covariance (Laplace)."""

    a: float
    b: float
    cov: tuple[tuple[float, float], tuple[float, float]]
    scale: Scale
    answers: int

    def p(self, d: float) -> float:
        return _sigmoid(self.a + self.b * self.scale.z(d))

    def draws(self, n: int = DRAWS, seed: int = 0) -> list[tuple[float, float]]:
        """``n`` (a, b) from the Gaussian posterior, the slope kept at or below 0; reproducible."""
        (saa, sab), (_, sbb) = self.cov
        la = math.sqrt(max(saa, 0.0))
        lb_a = sab / la if la > 0 else 0.0
        lb = math.sqrt(max(sbb - lb_a * lb_a, 0.0))
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            u, v = rng.gauss(0, 1), rng.gauss(0, 1)
            out.append((self.a + la * u, min(0.0, self.b + lb_a * u + lb * v)))
        return out


def fit(answers: Sequence[Answer], scale: Scale, prior: Prior) -> Fit:
    """The maximum a posteriori logistic fit of the answers under ``prior`` (damped Newton's method).

    Fitted with a free slope first; a slope above 0 (farther crops more often right) is
    refitted at 0: the distance then says nothing about this job.
    """
    data = [(scale.z(a.distance), 1.0 if a.right else 0.0) for a in answers]
    a, b, cov = _newton(data, prior, free_slope=True)
    if b > 0:
        a, b, cov = _newton(data, prior, free_slope=False)
    return Fit(a, b, cov, scale, len(data))


def _newton(
    data: list[tuple[float, float]], prior: Prior, *, free_slope: bool
) -> tuple[float, float, tuple[tuple[float, float], tuple[float, float]]]:
    ia, ib = 1.0 / prior.intercept_sd**2, 1.0 / prior.slope_sd**2

    def objective(a: float, b: float) -> float:
        value = 0.5 * (a - prior.intercept) ** 2 * ia + 0.5 * (b - prior.slope) ** 2 * ib
        for z, y in data:
            eta = a + b * z
            value += max(eta, 0.0) + math.log1p(math.exp(-abs(eta))) - y * eta
        return value

    a, b = prior.intercept, prior.slope if free_slope else 0.0
    current = objective(a, b)
    haa = hab = hbb = 0.0
    for _ in range(100):
        ga, gb = (a - prior.intercept) * ia, (b - prior.slope) * ib
        haa, hab, hbb = ia, 0.0, ib
        for z, y in data:
            q = _sigmoid(a + b * z)
            ga += q - y
            gb += (q - y) * z
            w = q * (1 - q)
            haa += w
            hab += w * z
            hbb += w * z * z
        if free_slope:
            det = haa * hbb - hab * hab
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        else:
            da, db = ga / haa, 0.0
        step = 1.0
        while step > 1e-6:  # halve the step until the objective does not rise
            trial = objective(a - step * da, b - step * db)
            if trial <= current + 1e-12:
                break
            step /= 2
        a, b, current = a - step * da, b - step * db, objective(a - step * da, b - step * db)
        if abs(step * da) < 1e-9 and abs(step * db) < 1e-9:
            break
    if free_slope:
        det = haa * hbb - hab * hab
        return a, b, ((hbb / det, -hab / det), (-hab / det, haa / det))
    return a, 0.0, ((1.0 / haa, 0.0), (0.0, 0.0))


# ---------------------------------------------------------------------------- the job's crops as cells


def _cells(crops: Distribution) -> list[tuple[float, int]]:
    """(distance, crops) of each step of the job's distance counts: the crops between two
    thresholds sit at the upper one (exact on the fine grid the counts are read at)."""
    cells, below = [], 0
    for t, count in zip(crops.thresholds, crops.counts, strict=True):
        if count > below:
            cells.append((t, count - below))
            below = count
    if crops.n > below:  # beyond the last threshold: at the largest distance possible
        cells.append((max(crops.thresholds[-1] if crops.thresholds else 0.0, ACCEPT_ALL), crops.n - below))
    return cells


def _cell_quantile(cells: list[tuple[float, int]], q: float) -> float:
    total = sum(n for _, n in cells)
    want, seen = q * total, 0
    for d, n in cells:
        seen += n
        if seen >= want:
            return d
    return cells[-1][0]


@dataclass(frozen=True)
class Expected:
    """Expected counts at threshold ``t`` under a fit: what the suggestion and the estimates read."""

    threshold: float
    accepted: int
    true_positives: float
    positives: float

    @property
    def precision(self) -> float:
        return self.true_positives / self.accepted if self.accepted else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.positives if self.positives > 0 else 0.0

    @property
    def f1(self) -> float:
        total = self.accepted + self.positives
        return 2 * self.true_positives / total if total > 0 else 0.0


def _expected_curve(
    p: list[float], cells: list[tuple[float, int]], answers: Sequence[Answer], thresholds: Sequence[float]
) -> list[Expected]:
    """Expected counts at each of ``thresholds`` (ascending): ``p`` per cell, the answers as they were given."""
    answered = sorted(answers, key=lambda a: a.distance)
    # The answered crops are among the cells: their p is replaced by what the user said.
    at = [c for c, _ in cells] if answered else []
    correction = [(a.distance, (1.0 if a.right else 0.0) - _p_at(p, at, a.distance)) for a in answered]
    out: list[Expected] = []
    i = j = 0
    accepted, tp, fix = 0, 0.0, 0.0
    total_p = sum(pc * n for pc, (_, n) in zip(p, cells, strict=True)) + sum(c for _, c in correction)
    for t in thresholds:
        while i < len(cells) and cells[i][0] <= t:
            accepted += cells[i][1]
            tp += p[i] * cells[i][1]
            i += 1
        while j < len(correction) and correction[j][0] <= t:
            fix += correction[j][1]
            j += 1
        out.append(Expected(t, accepted, max(0.0, tp + fix), max(total_p, 1e-9)))
    return out


def _p_at(p: list[float], at: list[float], d: float) -> float:
    """The p of the cell (at the distances ``at``) an answered crop at distance ``d`` was counted in."""
    i = bisect_left(at, d)
    return p[min(i, len(p) - 1)] if p else 0.0


@lru_cache(maxsize=4)
def _drawn(fit_: Fit, cells: tuple[tuple[float, int], ...], n: int = DRAWS, seed: int = 0) -> list[list[float]]:
    """Each posterior draw's ``p`` per cell (the suggestion's and the threshold's intervals share them)."""
    zs = [fit_.scale.z(d) for d, _ in cells]
    return [[_sigmoid(a + b * z) for z in zs] for a, b in fit_.draws(n, seed)]


@dataclass(frozen=True)
class Suggestion:
    threshold: float
    expected: Expected
    precision_interval: tuple[float, float]
    recall_interval: tuple[float, float]


def suggest(fit_: Fit, crops: Distribution, answers: Sequence[Answer] = ()) -> Suggestion:
    """The threshold of the highest expected F1, with its estimates and their intervals.

    With answers, the F1 is averaged over draws of the fit's posterior (the Bayes decision: a
    threshold that is good under every fit the answers allow, not only under the likeliest);
    with none, the fit is its prior, and the suggestion is the prior's own (accept every crop
    where the references do not separate the crops).
    """
    cells = _cells(crops)
    p = [fit_.p(d) for d, _ in cells]
    candidates = sorted({*(d for d, _ in cells), ACCEPT_ALL})
    curve = _expected_curve(p, cells, answers, candidates)
    score = [e.f1 for e in curve]
    if fit_.answers:
        score = [0.0] * len(candidates)
        for drawn in _drawn(fit_, tuple(cells), SUGGEST_DRAWS, 2):
            score = [s + e.f1 for s, e in zip(score, _expected_curve(drawn, cells, answers, candidates), strict=True)]
    best = max(range(len(candidates)), key=lambda i: (round(score[i], 9), candidates[i]))  # ties: accept more
    return Suggestion(candidates[best], curve[best], *intervals(fit_, cells, answers, candidates[best]))


def at_threshold(fit_: Fit, crops: Distribution, answers: Sequence[Answer], threshold: float) -> Suggestion:
    """The expected precision, recall and F1 of ``threshold`` under the fit, with intervals."""
    cells = _cells(crops)
    p = [fit_.p(d) for d, _ in cells]
    e = _expected_curve(p, cells, answers, [threshold])[0]
    return Suggestion(threshold, e, *intervals(fit_, cells, answers, threshold))


def intervals(
    fit_: Fit, cells: list[tuple[float, int]], answers: Sequence[Answer], threshold: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """80% intervals of the precision and recall at ``threshold`` over draws of the fit's posterior."""
    precisions, recalls = [], []
    for p in _drawn(fit_, tuple(cells)):
        e = _expected_curve(p, cells, answers, [threshold])[0]
        precisions.append(e.precision)
        recalls.append(e.recall)
    precisions.sort()
    recalls.sort()
    lo, hi = INTERVAL
    return (
        (round(quantile(precisions, lo), 4), round(quantile(precisions, hi), 4)),
        (round(quantile(recalls, lo), 4), round(quantile(recalls, hi), 4)),
    )


# ---------------------------------------------------------------------------- questions


def question_targets(fit_: Fit, crops: Distribution, threshold: float, k: int) -> list[float]:
    """``k`` distances to ask about, ascending: systematic sampling along the crops' CDF.

    A crop's weight is half a spread (log-uniform in its rank by distance: as many questions
    among the nearest 1% as among the next 9%, the next 90%, since a job's positives crowd at
    the near end and that is where a threshold goes) and half the need for its answer: the
    posterior spread of its ``p`` (where the fit is unsure) plus its closeness to ``threshold``
    (where an answer moves the suggestion; not while the suggestion accepts everything, when
    there is no threshold to be near yet).
    """
    cells = _cells(crops)
    if k <= 0 or not cells:
        return []
    total = sum(n for _, n in cells)
    ranks, seen = [], 0
    for _, n in cells:
        ranks.append((seen + n / 2) / total)  # the rank of the cell's middle crop, in (0, 1)
        seen += n
    nearest = max(0.5 / total, 0.002)
    spread = [1.0 / max(r, nearest) for r in ranks]
    need = _need(fit_, cells, ranks, None if threshold >= ACCEPT_ALL else threshold)
    weights = _blend(spread, need, cells)
    cumulative, acc = [], 0.0
    for w, (_, n) in zip(weights, cells, strict=True):
        acc += w * n
        cumulative.append(acc)
    # A new offset each round (the golden ratio's low-discrepancy sequence over the answers given),
    # so that rounds of a few questions do not come back to the same quantiles, next to the
    # crops answered last time.
    offset = (0.5 + fit_.answers * GOLDEN) % 1.0
    targets = []
    for j in range(k):
        i = min(bisect_right(cumulative, (j + offset) / k * acc), len(cells) - 1)
        targets.append(cells[i][0])
    return targets


def _blend(spread: list[float], need: list[float], cells: list[tuple[float, int]]) -> list[float]:
    """Per-crop weights: ``QUESTION_SPREAD`` of the round by ``spread``, the rest by ``need``."""
    total_spread = sum(w * n for w, (_, n) in zip(spread, cells, strict=True))
    total_need = sum(w * n for w, (_, n) in zip(need, cells, strict=True))
    share = QUESTION_SPREAD if total_need > 0 else 1.0
    return [
        share * s / total_spread + (1 - share) * (w / total_need if total_need > 0 else 0.0)
        for s, w in zip(spread, need, strict=True)
    ]


def _need(fit_: Fit, cells: list[tuple[float, int]], ranks: list[float], threshold: float | None) -> list[float]:
    """Per cell: the posterior spread of ``p`` and the closeness to ``threshold``, each scaled to at most 1."""
    draws = fit_.draws(64, seed=1)
    unsure = []
    for d, _ in cells:
        z = fit_.scale.z(d)
        ps = [_sigmoid(a + b * z) for a, b in draws]
        mean = sum(ps) / len(ps)
        unsure.append(math.sqrt(sum((q - mean) ** 2 for q in ps) / len(ps)))
    top = max(unsure) or 1.0
    need = [u / top for u in unsure]
    if threshold is not None:
        total = sum(n for _, n in cells)
        rank_t = sum(n for d, n in cells if d <= threshold) / total
        # Within about a tenth of the crops of the threshold, by rank.
        need = [w + math.exp(-(((r - rank_t) / 0.1) ** 2)) for w, r in zip(need, ranks, strict=True)]
    return need


def flat_prior() -> Prior:
    """The loose prior where the references do not separate the crops: a slope of 0 and a share
    of one half, its log-odds within 1.5 either way (the label-free share is not trusted there;
    measured: bench/quality_bench.py)."""
    return Prior(_logit(NO_SHARE), 0.0)


def label_free_prior(positives: Sequence[float], crops: Distribution, share: float, scale: Scale) -> Prior:
    """The prior where the references separate the crops: the label-free estimate of ``p(d)``.

    Over the deciles of the crops, ``p = share * (share of held-out positives in the decile) /
    (share of crops in it)`` (the mixture the label-free calibration assumes), clipped to
    [0.02, 0.98]; a least-squares line through its log-odds against ``z`` gives the prior's
    intercept and slope (kept at or below 0).
    """
    cells = _cells(crops)
    p = sorted(positives)
    if not cells or not p:
        return flat_prior()
    bounds = [_cell_quantile(cells, q / 10) for q in range(11)]
    xs, ys = [], []
    for lo, hi in itertools.pairwise(bounds):
        if hi <= lo:
            continue
        crop_share = (crops.count(hi) - crops.count(lo)) / crops.n
        positive_share = (bisect_right(p, hi) - bisect_right(p, lo)) / len(p)
        if crop_share <= 0:
            continue
        xs.append(scale.z((lo + hi) / 2))
        ys.append(_logit(min(0.98, max(0.02, share * positive_share / crop_share))))
    if len(xs) < 2:
        return flat_prior()
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = min(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx) if sxx > 0 else 0.0
    return Prior(my - slope * mx, slope)
