"""Per-stage progress derived from a job's counters: one definition for API, workers and CLI."""

from __future__ import annotations

from pydantic import BaseModel

from imgsift_common.messages import Job, JobState, Stage, StageState
from imgsift_common.sqlstate import StateStore
from imgsift_common.state import Counter, Flag


class StageProgress(BaseModel):
    state: StageState
    done: int
    total: int | None


class Progress(BaseModel):
    stages: dict[Stage, StageProgress]
    fraction: float
    complete: bool


def compute_progress(counters: dict[str, int], flags: set[str]) -> Progress:
    """A stage is done when its upstream is done and it has handled everything upstream produced."""
    c = {name: counters.get(name, 0) for name in Counter}
    discovered = c[Counter.DISCOVERED]
    handled = c[Counter.DOWNLOADED] + c[Counter.DUPLICATES] + c[Counter.FAILED] + c[Counter.SKIPPED]
    crawl_done = Flag.DISCOVERY_DONE in flags and handled >= discovered
    detect_done = crawl_done and c[Counter.DETECTED] >= c[Counter.DOWNLOADED]
    scored = c[Counter.COMPARED] + c[Counter.COMPARE_FAILED]
    siamese_done = detect_done and scored >= c[Counter.CROPS]

    def state(done: bool, started: bool) -> StageState:
        return StageState.DONE if done else StageState.RUNNING if started else StageState.PENDING

    stages = {
        Stage.CRAWL: StageProgress(
            state=state(crawl_done, discovered > 0 or Flag.DISCOVERY_DONE in flags),
            done=handled,
            total=discovered if Flag.DISCOVERY_DONE in flags else None,
        ),
        Stage.DETECT: StageProgress(
            state=state(detect_done, c[Counter.DETECTED] > 0),
            done=c[Counter.DETECTED],
            total=c[Counter.DOWNLOADED] if crawl_done else None,
        ),
        Stage.SIAMESE: StageProgress(
            state=state(siamese_done, scored > 0),
            done=scored,
            total=c[Counter.CROPS] if detect_done else None,
        ),
    }

    def part(stage_done: bool, done: int, total: int, upstream_done: bool) -> float:
        # A stage whose upstream still produces work can only claim half: its total may grow.
        if stage_done:
            return 1.0
        if total == 0:
            return 0.0
        return min(done / total, 1.0) * (0.95 if upstream_done else 0.5)

    fraction = (
        part(crawl_done, handled, discovered, Flag.DISCOVERY_DONE in flags)
        + part(detect_done, c[Counter.DETECTED], c[Counter.DOWNLOADED], crawl_done)
        + part(siamese_done, scored, c[Counter.CROPS], detect_done)
    ) / 3
    return Progress(stages=stages, fraction=round(fraction, 4), complete=siamese_done)


def reported_progress(state: StateStore, job_id: str, progress: Progress) -> float:
    """The fraction to show: never lower than what was shown before, though totals keep growing."""
    return 1.0 if progress.complete else state.raise_progress(job_id, progress.fraction)


def finish_if_complete(state: StateStore, job_id: str) -> Job | None:
    """Mark a running job completed once every stage is done; idempotent, safe from any worker."""
    job = state.get_job(job_id)
    if job is None or job.state is not JobState.RUNNING:
        return job
    if compute_progress(state.counters(job_id), state.flags(job_id)).complete:
        return state.set_job_state(job_id, JobState.COMPLETED)
    return job
