"""Request and response bodies of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field, SecretStr

from imgsift_common.apikeys import ApiKey
from imgsift_common.exports import FORMATS_HELP, ExportFormat, ExportState
from imgsift_common.messages import (
    Box,
    DetectMode,
    DiscoveryReason,
    ExportOptions,
    JobSpec,
    JobState,
    SourceKind,
    Stage,
)
from imgsift_common.progress import StageProgress


class Counts(BaseModel):
    discovered: int = Field(description="distinct candidate URLs the sources found")
    downloaded: int = Field(description="images stored (decoded, new content)")
    duplicates: int = Field(description="downloads whose bytes were already stored for this job")
    failed: int = Field(description="downloads refused or failed; see failed_by_reason")
    failed_by_reason: dict[str, int] = Field(description="failures and skips by reason, e.g. not_an_image")
    skipped: int = Field(description="candidates not downloaded (limit reached, job cancelled)")
    detected: int = Field(description="stored images the detector has handled")
    crops: int = Field(description="crops the detector cut")
    compared: int = Field(description="crops with a distance to the references")
    compare_failed: int = Field(description="crops that could not be compared (lost or undecodable); see notes")
    accepted: int = Field(description="compared crops with distance <= threshold")
    rejected: int = Field(description="compared crops with distance > threshold")


class Discovery(BaseModel):
    done: bool
    reason: DiscoveryReason | None = Field(
        description="sources_exhausted, target_reached (give me N) or limit_reached (max_images)"
    )
    want_accepted: int | None = Field(description="give me N: the accepted crops the job asked for")


class EstimateOut(BaseModel):
    """Estimated precision, recall and F1 of one threshold, with 80% intervals once answers give them."""

    threshold: float
    precision: float | None
    recall: float | None
    f1: float | None
    precision_interval: tuple[float, float] | None = Field(description="80% interval of the precision")
    recall_interval: tuple[float, float] | None = Field(description="80% interval of the recall")


class CalibrationOut(BaseModel):
    """Where to put the threshold, and what the current one is estimated to give."""

    suggested_threshold: float | None = Field(
        description="the threshold of the highest expected F1; 2.0 (every crop) until the references are judged "
        "to separate the crops or answers settle it; null before the job has any crop"
    )
    basis: str = Field(description="how the suggestion was made")
    needs_answers: bool = Field(
        description="true while nothing separates the job's crops: the suggestion accepts every crop, and "
        "answers to GET /v1/jobs/{id}/questions would settle the threshold"
    )
    answers: int = Field(description="answers (crops marked right or wrong) the estimates rest on")
    positive_share: float | None = Field(description="estimated fraction of the crops that show the target")
    precision: float | None = Field(description="estimated precision at the job's threshold")
    recall: float | None = Field(description="estimated recall at the job's threshold")
    f1: float | None = Field(description="estimated F1 at the job's threshold")
    precision_interval: tuple[float, float] | None = Field(description="80% interval of the precision at the threshold")
    recall_interval: tuple[float, float] | None = Field(description="80% interval of the recall at the threshold")
    at_suggested: EstimateOut | None = Field(description="the same estimates at the suggested threshold")
    histogram: dict[str, list[float] | list[int]] = Field(
        description="crop distances in 40 equal bins over [0, 2]: edges (41) and counts (40)"
    )
    marked_right: int
    marked_wrong: int


class ModelOut(BaseModel):
    version: int = Field(description="0: the pretrained embedding; 1, 2...: heads fine-tuned on this job")
    trained_at: datetime | None
    training: bool = Field(description="a training of this job is queued or running")
    stats: dict[str, float]


class JobStatus(BaseModel):
    id: str
    state: JobState
    spec: JobSpec
    threshold: float = Field(description="the job's current threshold (accepted = distance <= threshold)")
    detect_mode: DetectMode | None = Field(description="boxes, or whole_image when the target is no detector class")
    references: int
    negatives: int = Field(description="'not this' reference images")
    counts: Counts
    calibration: CalibrationOut
    model: ModelOut
    discovery: Discovery
    stages: dict[Stage, StageProgress]
    progress: float = Field(ge=0, le=1)
    notes: list[str] = Field(description="what the pipeline wants you to know: failed sources, fallbacks")
    error: str | None
    created_at: datetime
    updated_at: datetime
    webhook_secret: str | None = Field(
        default=None,
        description="in the creation answer only, when the spec has webhooks: the key that signs every delivery",
    )


class JobList(BaseModel):
    items: list[JobStatus]


class ThresholdUpdate(BaseModel):
    threshold: Annotated[float, Field(ge=0.0, le=4.0)]


class Provenance(BaseModel):
    source: SourceKind
    image_url: str
    page_url: str | None
    title: str | None
    license: str | None
    license_url: str | None
    author: str | None
    fetched_at: datetime | None


class CropOut(BaseModel):
    crop_id: str
    crop_url: str = Field(description="API path of the crop JPEG")
    original_url: str = Field(description="API path of the stored original image")
    box: Box = Field(description="[x1, y1, x2, y2] in the original image's pixels")
    padded_box: Box
    class_name: str | None = Field(alias="class")
    score: float
    whole_image: bool
    distance: float
    accepted: bool
    provenance: Provenance | None

    model_config = {"populate_by_name": True}


class CropPage(BaseModel):
    threshold: float
    items: list[CropOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class QuestionsOut(BaseModel):
    """The crops whose answers the job needs most; answer each with PUT .../crops/{crop_id}/feedback."""

    items: list[CropOut]
    calibration: CalibrationOut


class Health(BaseModel):
    status: str
    database: bool
    redis: bool
    storage: bool


class Feedback(BaseModel):
    correct: bool | None = Field(description="true: the crop shows the target; false: it does not; null: unmark")


class ExportRequest(BaseModel):
    format: ExportFormat = Field(description=FORMATS_HELP)
    threshold: Annotated[float | None, Field(ge=0.0, le=4.0, description="default: the job's threshold")] = None
    originals: bool = Field(default=False, description="webdataset: each sample's image is the original photo")
    embed_images: bool = Field(default=False, description="parquet: the crops' JPEG bytes in a `jpg` column")
    samples_per_shard: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10_000, description="webdataset and huggingface: samples in one shard"
    )

    def options(self) -> ExportOptions:
        return ExportOptions(
            originals=self.originals, embed_images=self.embed_images, samples_per_shard=self.samples_per_shard
        )


class ExportOut(BaseModel):
    id: str
    format: ExportFormat
    threshold: float
    state: ExportState
    crops: int | None = Field(description="crops written (accepted crops, or every compared crop for a manifest)")
    images: int | None
    missing: int | None = Field(description="crops or images gone from storage, skipped")
    note: str | None = Field(default=None, description="set when the export is empty: why, and that it is valid")
    options: ExportOptions
    error: str | None
    download_url: str | None = Field(description="API path that streams the file once the export is done")
    created_at: datetime
    finished_at: datetime | None


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="who or what the key is for")
    admin: bool = Field(False, description="may manage keys and read operator views")
    rate_limit: str | None = Field(
        None, max_length=50, description="e.g. '120/minute'; default: the API's IMGSIFT_API_RATE_LIMIT"
    )


class KeyCreated(ApiKey):
    key: str = Field(description="the API key: shown this once, stored only as a hash")


class Login(BaseModel):
    api_key: SecretStr = Field(description="an API key")
