"""A job's threshold: what its references say, what its answers say, and the questions it asks next.

One place for the rule, read by the API (``GET /v1/jobs/{id}``, ``/questions``, the marks) and
by the embedded ``imgsift`` commands (``collect``, ``verify``, ``questions``, ``answer``):

- **no answers**: the label-free calibration (:mod:`imgsift_common.calibration`: held-out views
  of the references against the job's crop distances) suggests a threshold only when it
  judges that the references separate the job's crops: its estimated F1 at its suggestion
  beats its estimated F1 of accepting every crop by :data:`MIN_LABEL_FREE_GAIN`, in a job of
  :data:`MIN_LABEL_FREE_CROPS` crops or more. Otherwise
  every crop the detector kept is accepted and the job says that answers are needed: a
  guess must never make a dataset worse than no verification.
- **answers** (crops the user marked right or wrong): the calibrated probability of
  :mod:`imgsift_common.answers`, fitted on them, decides; the label-free evidence is its
  prior (a slope only where the references separate).

Distances are read as counts at a fine grid of thresholds (one round trip), never one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgsift_common import answers as ask
from imgsift_common.calibration import (
    HISTOGRAM_BINS,
    MAX_DISTANCE,
    Calibration,
    Distribution,
    calibrate,
    estimate,
    grid_for,
)

if TYPE_CHECKING:
    from imgsift_common.messages import Job
    from imgsift_common.sqlstate import StateStore

# The label-free suggestion is used only where it promises at least this much F1 over accepting
# every crop (its own estimate); bench/quality_bench.py measures the rule (docs/quality.md).
MIN_LABEL_FREE_GAIN = 0.05
# ... and only for a job of this many crops or more: the estimate of the share of positives rests
# on the shape of the crops' distances, which a few dozen crops do not show (on COCO128's tasks
# of 20 to 70 crops the judgment was no better than chance: docs/quality.md).
MIN_LABEL_FREE_CROPS = 100
QUESTION_PAGE = 64  # crops read per look for the crop nearest a question's distance


@dataclass(frozen=True)
class Estimates:
    """Estimated precision, recall and F1 at one threshold, with 80% intervals where answers give them."""

    threshold: float
    precision: float | None
    recall: float | None
    f1: float | None
    precision_interval: tuple[float, float] | None = None
    recall_interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class JobThreshold:
    suggested: float
    basis: str  # how the suggestion was made, in words
    needs_answers: bool  # the suggestion accepts everything because nothing separates the crops yet
    answers: int  # how many answers the estimate rests on
    positive_share: float | None  # estimated share of positives among the crops
    at_threshold: Estimates  # at the job's (or the given) threshold
    at_suggested: Estimates
    histogram: dict[str, list[float] | list[int]]
    marked_right: int
    marked_wrong: int
    label_free: Calibration  # what the references alone suggest
    fit: ask.Fit
    crops: Distribution
    given: tuple[ask.Answer, ...]


def decide(
    positives: list[float], crops: Distribution, given: list[ask.Answer], threshold: float
) -> tuple[ask.Fit, ask.Suggestion, ask.Suggestion, Calibration, str, bool]:
    """The rule on plain numbers (the bench calls it too): fit, suggestion, estimates at ``threshold``."""
    label_free = calibrate(positives, crops) if crops.n else Calibration(None, None, "no crops yet")
    scale = ask.Scale.of(crops)
    separates, prior = _label_free_prior(positives, crops, label_free, scale)
    fitted = ask.fit(given, scale, prior)
    suggestion = ask.suggest(fitted, crops, given)
    at = ask.at_threshold(fitted, crops, given, threshold)
    if given:
        basis = f"highest expected F1 from {len(given)} answers and {crops.n} crop distances"
        needs = suggestion.threshold >= ask.ACCEPT_ALL and fitted.b == 0.0
    elif separates and label_free.suggested is not None:
        basis = f"the references separate the crops (label-free: {label_free.basis}); highest expected F1 under it"
        needs = False
    else:
        basis = "the references do not separate this job's crops: every crop is accepted until answers settle it"
        needs = True
    return fitted, suggestion, at, label_free, basis, needs


def _label_free_prior(
    positives: list[float], crops: Distribution, label_free: Calibration, scale: ask.Scale
) -> tuple[bool, ask.Prior]:
    """Whether the references separate the crops, and the fit's prior: a slope only if they do."""
    share = label_free.positive_share
    if label_free.suggested is None or share is None or crops.n < MIN_LABEL_FREE_CROPS:
        return False, ask.flat_prior()
    gain = (estimate(label_free.suggested, positives, crops).f1 or 0.0) - (
        estimate(ask.ACCEPT_ALL, positives, crops).f1 or 0.0
    )
    if gain < MIN_LABEL_FREE_GAIN:
        return False, ask.flat_prior()
    return True, ask.label_free_prior(positives, crops, share, scale)


def for_job(job: Job, state: StateStore, threshold: float | None = None) -> JobThreshold:
    """The job's threshold from its stored distances, held-out positives and answers."""
    marks = state.feedback(job.id)
    marked = state.distances_of(job.id, list(marks))
    # A trained head saw the answered crops: their distances under heads that did not see them.
    held_out = job.model.held_out_answers if job.model else {}
    given = [ask.Answer(held_out.get(k, d), marks[k]) for k, d in marked.items()]
    positives = list(job.model.held_out if job.model else job.reference_distances)
    at = job.spec.threshold if threshold is None else threshold
    edges = [round(MAX_DISTANCE * i / HISTOGRAM_BINS, 4) for i in range(HISTOGRAM_BINS + 1)]
    grid = grid_for(positives, at, *edges)  # steps of 0.005 over [0, 2], and these
    counts = state.count_below(job.id, [*grid, float("inf")])
    crops = Distribution(counts[-1], grid, counts[:-1])
    fitted, suggestion, at_t, label_free, basis, needs = decide(positives, crops, given, at)
    below_edges = [crops.count(e) for e in edges[1:-1]]
    bins = [b - a for a, b in zip([0, *below_edges], [*below_edges, crops.n], strict=True)]
    return JobThreshold(
        suggested=round(suggestion.threshold, 4),
        basis=basis,
        needs_answers=needs,
        answers=len(given),
        positive_share=label_free.positive_share,
        at_threshold=_estimates(at_t, crops.n),
        at_suggested=_estimates(suggestion, crops.n),
        histogram={"edges": edges, "counts": bins},
        marked_right=sum(marks.values()),
        marked_wrong=len(marks) - sum(marks.values()),
        label_free=label_free,
        fit=fitted,
        crops=crops,
        given=tuple(given),
    )


def _estimates(s: ask.Suggestion, n: int) -> Estimates:
    if n == 0:
        return Estimates(s.threshold, None, None, None)
    e = s.expected
    return Estimates(
        s.threshold, round(e.precision, 4), round(e.recall, 4), round(e.f1, 4), s.precision_interval, s.recall_interval
    )


def questions(job: Job, state: StateStore, k: int, found: JobThreshold | None = None) -> list[tuple[str, float]]:
    """The ``k`` crops whose answers the job needs most, as (crop key, distance), by distance;
    never one already answered. The same state gives the same questions."""
    found = found or for_job(job, state)
    answered = set(state.feedback(job.id))
    targets = ask.question_targets(found.fit, found.crops, found.suggested, k)
    chosen: dict[str, float] = {}
    for target in targets:
        picked = _nearest_unanswered(job.id, state, target, answered | set(chosen))
        if picked is not None:
            chosen[picked[0]] = picked[1]
    return sorted(chosen.items(), key=lambda kv: (kv[1], kv[0]))


def _nearest_unanswered(job_id: str, state: StateStore, target: float, skip: set[str]) -> tuple[str, float] | None:
    """The first crop at or above ``target`` that is not in ``skip``, else the last one below it."""
    for descending in (False, True):
        after = None
        for _ in range(1 + len(skip) // QUESTION_PAGE):
            page = state.distance_page(
                job_id,
                min_distance_exclusive=None if descending else target - 1e-9,
                max_distance=target if descending else None,
                after=after,
                limit=QUESTION_PAGE,
                descending=descending,
            )
            for key, distance in page.items:
                if key not in skip:
                    return key, distance
            if page.next_after is None:
                break
            after = page.next_after
    return None
