"""Typed messages and records shared by every imgsift service.

Messages on the wire carry ids and object keys, never image bytes. Every model has a
``schema_version`` so a worker can refuse a message from a newer producer instead of
misreading it. Outcomes are data: a failed download is a record with a reason.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

JOB_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Base for everything that crosses a process boundary."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(
                f"message schema_version {value} is newer than this worker understands "
                f"({SCHEMA_VERSION}); upgrade the worker"
            )
        return value


# ---------------------------------------------------------------------------- enums


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class Stage(StrEnum):
    CRAWL = "crawl"
    DETECT = "detect"
    SIAMESE = "siamese"


class StageState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class SourceKind(StrEnum):
    URLS = "urls"
    SITE = "site"
    FILES = "files"  # a folder of local images: what ``imgsift verify`` judges (never crawled)
    OPENVERSE = "openverse"
    WIKIMEDIA = "wikimedia"
    BING = "bing"
    DUCKDUCKGO = "duckduckgo"
    FLICKR = "flickr"


KEYWORD_SOURCES = frozenset(
    {SourceKind.OPENVERSE, SourceKind.WIKIMEDIA, SourceKind.BING, SourceKind.DUCKDUCKGO, SourceKind.FLICKR}
)


class DownloadOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    SKIPPED = "skipped"


class FailureReason(StrEnum):
    """Why a candidate URL did not become a stored image (img2dataset-style status)."""

    INVALID_URL = "invalid_url"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    HTTP_ERROR = "http_error"
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_SMALL = "too_small"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_MANY_FRAMES = "too_many_frames"  # an animation longer than the crawler's frame cap
    BLOCKED_ADDRESS = "blocked_address"  # private, loopback, link-local, metadata...: refused before connecting
    ROBOTS_DISALLOWED = "robots_disallowed"  # robots.txt says no (or could not be read: RFC 9309 says no)
    OPTED_OUT = "opted_out"  # X-Robots-Tag or <meta name="robots">: noai, noimageai, noindex, none
    LIMIT_REACHED = "limit_reached"
    TARGET_REACHED = "target_reached"
    CANCELLED = "cancelled"
    # The download task failed for good (a fault outlived its bounded retries, e.g. the object
    # store unreachable for minutes): the job's notes and GET /v1/dead-letters say what happened.
    TASK_FAILED = "task_failed"


class DiscoveryReason(StrEnum):
    """Why discovery stopped: the status says which."""

    SOURCES_EXHAUSTED = "sources_exhausted"
    TARGET_REACHED = "target_reached"  # give me N: N crops accepted at the threshold
    LIMIT_REACHED = "limit_reached"  # limits.max_images stored


class DetectMode(StrEnum):
    BOXES = "boxes"
    WHOLE_IMAGE = "whole_image"


# ---------------------------------------------------------------------------- job spec


class SourceSpec(BaseModel):
    """One place candidate images come from."""

    model_config = ConfigDict(extra="forbid")

    kind: SourceKind
    # urls: the URLs themselves (API) or a local file of URLs (CLI): .txt one per line, .csv, .tsv, .parquet.
    urls: list[str] | None = None
    path: str | None = None
    # site: where the crawl starts.
    start_urls: list[str] | None = None
    max_depth: Annotated[int, Field(ge=0, le=10)] = 2
    max_pages: Annotated[int, Field(ge=1, le=100_000)] = 200
    same_host: bool = True
    # keyword sources: the job's query is used unless this overrides it.
    query: str | None = None
    limit: Annotated[int | None, Field(ge=1, le=100_000)] = None

    @model_validator(mode="after")
    def _fields_for_kind(self) -> SourceSpec:
        if self.kind is SourceKind.URLS and not (self.urls or self.path):
            raise ValueError("a 'urls' source needs 'urls' (a list) or 'path' (a file)")
        if self.kind is SourceKind.SITE and not self.start_urls:
            raise ValueError("a 'site' source needs 'start_urls'")
        if self.kind is SourceKind.FILES and not self.path:
            raise ValueError("a 'files' source needs 'path' (a folder)")
        return self

    @property
    def source_id(self) -> str:
        """Stable id of this source inside a job (used to mark discovery done)."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_images: Annotated[int, Field(ge=1, le=1_000_000)] = 500
    per_source: Annotated[int, Field(ge=1, le=1_000_000)] = 200


class DedupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    across_jobs: Annotated[bool, Field(description="also drop exact copies of images stored by earlier jobs")] = False
    near_distance: Annotated[
        int | None,
        Field(
            ge=-1,
            le=32,
            description="perceptual-hash bits within which two images are near-duplicates (the larger is "
            "kept); -1 turns near-duplicate detection off; null: the crawler's "
            "IMGSIFT_CRAWLER_NEAR_DUP_DISTANCE",
        ),
    ] = None


class WebhookEvent(StrEnum):
    STARTED = "job.started"
    CRAWL_DONE = "stage.crawl.done"
    DETECT_DONE = "stage.detect.done"
    SIAMESE_DONE = "stage.siamese.done"
    COMPLETED = "job.completed"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"


class WebhookSpec(BaseModel):
    """A URL told about the job's events: signed POSTs, retried, under the crawler's network rules."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://")]
    events: list[WebhookEvent] | None = Field(default=None, description="null: every event")


class JobSpec(BaseModel):
    """What a user asks for. Everything a stage needs to know about the job."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(default=None, max_length=500)
    sources: list[SourceSpec] = Field(min_length=1, max_length=50)
    target: str = Field(
        min_length=1,
        max_length=100,
        description="detector class (e.g. 'dog'), COCO supercategory (e.g. 'animal') or 'any'",
    )
    threshold: Annotated[float, Field(ge=0.0, le=4.0)] = 0.9
    detector_conf: Annotated[float | None, Field(ge=0.01, le=0.99)] = Field(
        default=None,
        description="the detector's confidence threshold for this job's boxes; null: the detector's "
        "IMGSIFT_DETECTOR_CONF (0.25, the default bench/quality_bench.py chose)",
    )
    limits: Limits = Field(default_factory=Limits)
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    want_accepted: Annotated[int | None, Field(ge=1, le=1_000_000)] = Field(
        default=None,
        description="give me N: keep paging and widening the query until N crops are accepted at the "
        "threshold or every source is exhausted (max_images still caps the downloads)",
    )
    related_queries: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        max_length=100,
        description="queries tried after the main one is exhausted, in order; null: imgsift's built-in "
        "related terms of the query and target (see GET /v1/related-terms)",
    )
    languages: list[Annotated[str, Field(pattern=r"^[a-z]{2}$")]] = Field(
        default_factory=list,
        max_length=10,
        description="also search translations of the query into these languages (ISO 639-1), where known",
    )
    webhooks: list[WebhookSpec] = Field(default_factory=list, max_length=5)

    @model_validator(mode="after")
    def _query_for_keyword_sources(self) -> JobSpec:
        for source in self.sources:
            if source.kind in KEYWORD_SOURCES and not (source.query or self.query):
                raise ValueError(f"source '{source.kind}' searches by keyword: give 'query'")
        return self


class SiameseModel(BaseModel):
    """A Siamese head fine-tuned on the job's references, versioned in the object store."""

    version: Annotated[int, Field(ge=1)]
    key: str  # object key of the head's weights
    trained_at: datetime
    held_out: list[float] = Field(
        default_factory=list, description="distances of references held out of training: the calibration positives"
    )
    held_out_answers: dict[str, float] = Field(
        default_factory=dict,
        description="crop key -> distance of each answered crop under a head trained without it: what the "
        "threshold's calibration reads for the crops training saw",
    )
    stats: dict[str, float] = Field(default_factory=dict)


class Job(BaseModel):
    """A job as stored: its spec plus what the system decided about it."""

    id: Annotated[str, Field(pattern=JOB_ID_PATTERN)]
    spec: JobSpec
    owner: str | None = Field(
        None, description="id of the API key that created the job (None: made in one process by the CLI)"
    )
    state: JobState = JobState.QUEUED
    reference_keys: list[str] = Field(default_factory=list)
    negative_keys: list[str] = Field(
        default_factory=list, description="'not this' references: images of what the job must not collect"
    )
    model: SiameseModel | None = None  # None: the pretrained embedding
    reference_distances: list[float] = Field(
        default_factory=list,
        description=(
            "held-out positive distances under the pretrained embedding: each reference and its augmented "
            "views against the other references"
        ),
    )
    detect_mode: DetectMode | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    error: str | None = None


# ---------------------------------------------------------------------------- records


class Candidate(BaseModel):
    """A URL a source believes is an image, with what the source knows about it."""

    image_url: str
    page_url: str | None = None
    source: SourceKind
    title: str | None = None
    license: str | None = None
    license_url: str | None = None
    author: str | None = None


class StoredImage(BaseModel):
    """An original image in the object store, with its provenance."""

    job_id: str
    key: str
    sha256: str
    width: int
    height: int
    format: str
    bytes: int
    fetched_at: datetime
    provenance: Candidate
    phash: str | None = None  # 64-bit perceptual hash, hex


class DownloadRecord(BaseModel):
    """What became of one candidate URL."""

    url: str
    outcome: DownloadOutcome
    reason: FailureReason | None = None
    detail: str | None = None
    sha256: str | None = None
    image_key: str | None = None
    duplicate_of: str | None = None  # the URL whose copy was kept ("job ID URL" when in another job)
    hamming: int | None = None  # near-duplicate: bits by which the perceptual hashes differ


Box = tuple[float, float, float, float]


class Detection(BaseModel):
    """One detector box, in the original image's pixels."""

    box: Box
    score: float
    class_id: int | None
    class_name: str | None


class Crop(BaseModel):
    """A crop stored in the object store and what it was cut from."""

    job_id: str
    key: str
    crop_id: str
    image_key: str
    box: Box
    padded_box: Box
    score: float
    class_name: str | None
    whole_image: bool = False


class Distance(BaseModel):
    job_id: str
    crop_key: str
    distance: float


# ---------------------------------------------------------------------------- task messages


class JobMessage(Message):
    job_id: Annotated[str, Field(pattern=JOB_ID_PATTERN)]


class DiscoverMessage(JobMessage):
    """One tick of a job's discovery; ``chain`` names the one chain of ticks that may run it."""

    chain: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class DownloadBatch(JobMessage):
    candidates: list[Candidate] = Field(min_length=1)


class ImageBatch(JobMessage):
    image_keys: list[str] = Field(min_length=1)


class CropBatch(JobMessage):
    crop_keys: list[str] = Field(min_length=1)


class ExportOptions(BaseModel):
    """How an export is built, where its format has a choice (the others ignore these)."""

    originals: bool = Field(
        default=False, description="webdataset: each sample's image is the original photo, not the crop"
    )
    embed_images: bool = Field(default=False, description="parquet: the crop's JPEG bytes in a `jpg` column")
    samples_per_shard: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10_000, description="webdataset and huggingface: samples in one shard (img2dataset's default)"
    )


class ExportMessage(JobMessage):
    """Build one export of a job into the object store."""

    export_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    format: str
    threshold: Annotated[float, Field(ge=0.0, le=4.0)]
    options: ExportOptions = Field(default_factory=ExportOptions)


class WebhookMessage(JobMessage):
    """Deliver one event to one webhook."""

    delivery_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    event: WebhookEvent
    url: str


class TrainMessage(JobMessage):
    """Fine-tune the job's Siamese head; ``version`` is the model version the training makes."""

    version: Annotated[int, Field(ge=1)]


# ---------------------------------------------------------------------------- helpers

_SAFE_ID = re.compile(JOB_ID_PATTERN)


def is_job_id(value: str) -> bool:
    return bool(_SAFE_ID.match(value))
