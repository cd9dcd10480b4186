"""Answers settle the threshold: the calibrated probability, the questions, the do-no-harm default.

On mixtures whose truth is known (Gaussian positive and negative distances, the labels
drawn with them), and through a real job-state store (SQLite and Redis) for the job-level rule.
"""

from __future__ import annotations

import math
import random

import pytest

from imgsift_common import answers as ask
from imgsift_common.calibration import Distribution, calibrate, grid_for, histogram
from imgsift_common.threshold import MIN_LABEL_FREE_CROPS, decide, for_job, questions

GRID = [i / 1000 for i in range(2001)]


def _mixture(n: int, share: float, seed: int = 0, gap: float = 0.4) -> tuple[list[float], list[bool]]:
    rng = random.Random(seed)
    labels = [rng.random() < share for _ in range(n)]
    crops = [min(2.0, max(0.0, rng.gauss(0.55, 0.08) if y else rng.gauss(0.55 + gap, 0.1))) for y in labels]
    return crops, labels


def _f1(crops: list[float], labels: list[bool], t: float) -> float:
    tp = sum(1 for d, y in zip(crops, labels, strict=True) if d <= t and y)
    accepted = sum(1 for d in crops if d <= t)
    return 2 * tp / (accepted + sum(labels))


def _best(crops: list[float], labels: list[bool]) -> float:
    return max(_f1(crops, labels, t) for t in sorted(set(crops)))


def _ask_and_answer(crops: list[float], labels: list[bool], k: int, rounds: int = 5) -> list[ask.Answer]:
    """What a user does: take the job's questions, answer them truthfully, ask again."""
    dist = Distribution.from_values(crops, GRID)
    answered: dict[int, bool] = {}
    order = sorted(range(len(crops)), key=lambda i: crops[i])
    while len(answered) < k:
        given = [ask.Answer(crops[i], y) for i, y in answered.items()]
        fitted, suggestion, *_ = decide([], dist, given, 2.0)
        for target in ask.question_targets(fitted, dist, suggestion.threshold, min(rounds, k - len(answered))):
            i = next((i for i in order if crops[i] >= target - 1e-9 and i not in answered), None)
            if i is None:
                i = next(i for i in reversed(order) if i not in answered)
            answered[i] = labels[i]
    return [ask.Answer(crops[i], y) for i, y in answered.items()]


def test_the_fit_recovers_a_known_probability() -> None:
    rng = random.Random(3)
    scale = ask.Scale(0.8, 0.1)
    truth_a, truth_b = -0.5, -2.0
    data = []
    for _ in range(3000):
        d = rng.uniform(0.4, 1.2)
        data.append(ask.Answer(d, rng.random() < 1 / (1 + math.exp(-(truth_a + truth_b * scale.z(d))))))
    fitted = ask.fit(data, scale, ask.flat_prior())
    assert fitted.a == pytest.approx(truth_a, abs=0.15) and fitted.b == pytest.approx(truth_b, abs=0.2)
    (saa, _), (_, sbb) = fitted.cov
    assert 0 < saa < 0.01 and 0 < sbb < 0.01  # 3,000 answers: a tight posterior


def test_answers_that_say_farther_is_better_leave_the_distance_out() -> None:
    scale = ask.Scale(0.8, 0.1)
    given = [ask.Answer(0.5 + 0.01 * i, i % 3 != 0 if i > 20 else i % 3 == 0) for i in range(40)]
    fitted = ask.fit(given, scale, ask.flat_prior())
    assert fitted.b == 0.0  # clamped: the distance says nothing about this job
    crops, _ = _mixture(500, 0.5)
    suggestion = ask.suggest(fitted, Distribution.from_values(crops, GRID), given)
    assert suggestion.threshold == ask.ACCEPT_ALL


def test_without_answers_a_job_whose_references_say_nothing_accepts_every_crop() -> None:
    crops, labels = _mixture(400, 0.5)
    dist = Distribution.from_values(crops, GRID)
    # No held-out positives at all: nothing to judge separation by.
    _, suggestion, _, _, basis, needs = decide([], dist, [], 0.7)
    assert suggestion.threshold == ask.ACCEPT_ALL and needs and "answers" in basis
    assert _f1(crops, labels, suggestion.threshold) == _f1(crops, labels, 2.0)


def test_without_answers_separating_references_cut_where_the_mixture_says() -> None:
    crops, labels = _mixture(2000, 0.3)
    rng = random.Random(9)
    positives = [rng.gauss(0.55, 0.08) for _ in range(45)]  # held-out views that look like the positives
    dist = Distribution.from_values(crops, grid_for(positives, *GRID))
    _, suggestion, _, _, _, needs = decide(positives, dist, [], 0.7)
    assert not needs and suggestion.threshold < 1.0
    assert _f1(crops, labels, suggestion.threshold) > _f1(crops, labels, 2.0) + 0.2
    # The same evidence in a job too small to judge it: every crop accepted.
    small = Distribution.from_values(crops[: MIN_LABEL_FREE_CROPS - 1], grid_for(positives, *GRID))
    assert decide(positives, small, [], 0.7)[5] is True


@pytest.mark.parametrize(("share", "k"), [(0.1, 40), (0.3, 20), (0.6, 20)])
def test_a_few_answers_put_the_threshold_near_the_best(share: float, k: int) -> None:
    """Twenty answers where a third or more of the crops are positives; forty where a tenth are."""
    crops, labels = _mixture(1500, share, seed=int(share * 10), gap=0.25)
    dist = Distribution.from_values(crops, GRID)
    given = _ask_and_answer(crops, labels, k)
    assert len({a.distance for a in given}) == k  # k different crops
    _, suggestion, *_ = decide([], dist, given, 2.0)
    best = _best(crops, labels)
    assert _f1(crops, labels, suggestion.threshold) >= best - 0.03
    assert _f1(crops, labels, suggestion.threshold) > _f1(crops, labels, 2.0) + 0.05


def test_the_intervals_narrow_with_answers_and_hold_the_truth() -> None:
    crops, labels = _mixture(1500, 0.4, seed=4, gap=0.25)
    dist = Distribution.from_values(crops, GRID)
    t = 0.7
    accepted = [y for d, y in zip(crops, labels, strict=True) if d <= t]
    true_precision = sum(accepted) / len(accepted)
    true_recall = sum(accepted) / sum(labels)
    widths = []
    for k in (10, 80):
        given = _ask_and_answer(crops, labels, k)
        at = decide([], dist, given, t)[2]
        (plo, phi), (rlo, rhi) = at.precision_interval, at.recall_interval
        widths.append(phi - plo)
        assert plo - 0.05 <= true_precision <= phi + 0.05 and rlo - 0.05 <= true_recall <= rhi + 0.05
    assert widths[1] < widths[0]


def test_questions_spread_over_the_distances_and_gather_at_the_threshold() -> None:
    crops, labels = _mixture(2000, 0.3)
    dist = Distribution.from_values(crops, GRID)
    ranked = sorted(crops)
    first = ask.question_targets(ask.fit([], ask.Scale.of(dist), ask.flat_prior()), dist, ask.ACCEPT_ALL, 10)
    assert first == sorted(first) and len(first) == 10
    ranks = [sum(1 for d in ranked if d <= t) / len(ranked) for t in first]
    # No answers yet: spread from the nearest crops to the farthest, most of them in the near half.
    assert min(ranks) < 0.02 and max(ranks) > 0.5 and sum(r < 0.5 for r in ranks) >= 6
    given = _ask_and_answer(crops, labels, 20)
    fitted, suggestion, *_ = decide([], dist, given, 2.0)
    later = ask.question_targets(fitted, dist, suggestion.threshold, 10)
    near = sum(1 for t in later if abs(t - suggestion.threshold) < 0.1)
    assert near >= 3  # answers are needed where the suggestion would move


def _job(state, job_id: str, positives: list[float], threshold: float = 0.7):  # type: ignore[no-untyped-def]
    from imgsift_common.messages import Job, JobSpec, SourceKind, SourceSpec

    job = Job(
        id=job_id,
        spec=JobSpec(sources=[SourceSpec(kind=SourceKind.URLS, urls=["x"])], target="dog", threshold=threshold),
        reference_distances=positives,
    )
    state.create_job(job)
    return job


def test_the_job_rule_reads_counts_marks_and_held_out_answers(state_store) -> None:  # type: ignore[no-untyped-def]
    crops, labels = _mixture(300, 0.4)
    rng = random.Random(2)
    positives = [rng.gauss(0.55, 0.08) for _ in range(40)]
    job = _job(state_store, "job-thr", positives)
    keys = [f"jobs/job-thr/crops/{i:024x}-000.jpg" for i in range(len(crops))]
    for key, d in zip(keys, crops, strict=True):
        state_store.record_distances(job.id, [(key, d)])

    found = for_job(job, state_store)
    assert found.answers == 0 and found.crops.n == 300
    lf = calibrate(positives, crops)
    assert lf.suggested is not None and found.label_free.suggested == pytest.approx(lf.suggested, abs=0.01)
    assert found.histogram == histogram(crops) and found.at_threshold.threshold == 0.7

    asked = questions(job, state_store, 5, found)
    assert len(asked) == 5 and len({k for k, _ in asked}) == 5
    assert asked == questions(job, state_store, 5)  # the same state asks the same questions
    for key, _ in asked:
        state_store.set_feedback(job.id, key, labels[keys.index(key)])
    after = for_job(job, state_store)
    assert after.answers == 5 and after.marked_right + after.marked_wrong == 5
    assert not {k for k, _ in questions(job, state_store, 10)} & {k for k, _ in asked}  # never asked again
    state_store.set_feedback(job.id, asked[0][0], not labels[keys.index(asked[0][0])])  # replaces the answer
    assert for_job(job, state_store).answers == 5

    # After a training, an answered crop is read at its held-out distance, not its recorded one.
    from imgsift_common.messages import SiameseModel, utcnow

    model = SiameseModel(
        version=1,
        key="jobs/job-thr/models/siamese-head-v1.pt",
        trained_at=utcnow(),
        held_out=positives,
        held_out_answers={asked[0][0]: 1.9},
    )
    trained = state_store.update_job(job.id, model=model)
    read = {round(a.distance, 6) for a in for_job(trained, state_store).given}
    assert 1.9 in read and round(asked[0][1], 6) not in read
