"""Typed views of the API's answers. Unknown fields are kept (``model_extra``), so a newer API
does not break an older client."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Estimate(_Model):
    threshold: float
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    precision_interval: tuple[float, float] | None = None
    recall_interval: tuple[float, float] | None = None


class Calibration(_Model):
    suggested_threshold: float | None = None
    basis: str = ""
    needs_answers: bool = False  # the suggestion accepts every crop until answers settle it
    answers: int = 0  # answers the estimates rest on
    positive_share: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    precision_interval: tuple[float, float] | None = None
    recall_interval: tuple[float, float] | None = None
    at_suggested: Estimate | None = None
    histogram: dict[str, list[float]] = Field(default_factory=dict)
    marked_right: int = 0
    marked_wrong: int = 0


class Job(_Model):
    id: str
    state: str  # queued, running, completed, failed, cancelled
    threshold: float
    progress: float
    counts: dict[str, Any]
    stages: dict[str, Any] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    error: str | None = None
    calibration: Calibration | None = None
    model: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def is_final(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


class Provenance(_Model):
    source: str
    image_url: str
    page_url: str | None = None
    title: str | None = None
    license: str | None = None
    license_url: str | None = None
    author: str | None = None
    fetched_at: datetime | None = None


class Crop(_Model):
    crop_id: str
    crop_url: str
    original_url: str
    box: list[float]
    padded_box: list[float]
    class_name: str | None = Field(default=None, alias="class")
    score: float
    whole_image: bool
    distance: float
    accepted: bool
    provenance: Provenance | None = None


class Export(_Model):
    id: str
    format: str
    threshold: float
    state: str  # queued, running, done, failed
    crops: int | None = None
    images: int | None = None
    missing: int | None = None
    error: str | None = None
    download_url: str | None = None
    created_at: datetime
    finished_at: datetime | None = None


class Questions(_Model):
    """The crops whose answers the job needs most, and the calibration they would refine."""

    items: list[Crop]
    calibration: Calibration
