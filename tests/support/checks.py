"""Assertions the fault tests share: a job that went through a fault lost and duplicated nothing."""

from __future__ import annotations

from typing import Any

from imgsift_common.sqlstate import StateStore


def assert_each_image_and_crop_handled_once(
    status: dict[str, Any], state: StateStore, job_id: str, images: int
) -> None:
    """The job completed; each of its ``images`` was stored and detected once, each crop compared
    once, and the counters the API shows equal the records in the state store."""
    assert status["state"] == "completed", status
    counts = status["counts"]
    image_keys, crops = state.image_keys(job_id), state.crop_keys(job_id)
    assert counts["downloaded"] == len(image_keys) == images, counts
    detected = state.detected_counts(job_id, image_keys)
    assert counts["detected"] == len(image_keys) == len(detected)
    assert counts["crops"] == len(crops) == len(set(crops))  # no duplicate crop
    assert counts["compared"] + counts["compare_failed"] == len(crops) == len(state.distances(job_id)), counts
    assert sum(detected.values()) == len(crops)  # no crop counted twice
