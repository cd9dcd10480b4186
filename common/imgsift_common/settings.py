"""Settings shared by every service: where PostgreSQL, Redis and the object store are.

Each service subclasses :class:`ImgsiftSettings` with its own ``env_prefix``
(``IMGSIFT_CRAWLER_``, ``IMGSIFT_DETECTOR_`` ...). The shared fields below carry an
explicit alias, so they are read from the same ``IMGSIFT_...`` variables in every
service, whatever its prefix. Compose and Kubernetes pass the same variables;
``.env.example`` documents them all.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageBackend(StrEnum):
    S3 = "s3"
    LOCAL = "local"


def _env(name: str) -> AliasChoices:
    # Shared fields ignore the subclass prefix: IMGSIFT_REDIS_URL everywhere.
    return AliasChoices(f"IMGSIFT_{name}", name.lower())


# A TCP port, where "" (a variable set but empty) means none, like 0: off.
MetricsPort = Annotated[int | None, BeforeValidator(lambda v: None if v == "" else v)]
METRICS_PORT_HELP = (
    "port each Celery worker's main process serves Prometheus metrics on, at /metrics (0 or empty: off); "
    "the API serves /metrics on its own port"
)


# Why eight: imgsift_common.celery_app.retry_policy.
DEFAULT_TASK_MAX_RETRIES = 8


class ImgsiftSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_", extra="ignore", populate_by_name=True)

    database_url: SecretStr | None = Field(
        None,
        validation_alias=_env("DATABASE_URL"),
        description=(
            "PostgreSQL: the job records, e.g. postgresql://imgsift:PASSWORD@postgres:5432/imgsift "
            "(required by the services; no default)"
        ),
    )
    redis_url: str = Field(
        "redis://localhost:6379/0",
        validation_alias=_env("REDIS_URL"),
        description="Redis: the task queues, locks, fetch claims, rate limits and idempotency keys",
    )
    storage: StorageBackend = Field(
        StorageBackend.S3, validation_alias=_env("STORAGE"), description="object store: s3 (MinIO, AWS...) or local"
    )
    s3_endpoint: str = Field("localhost:9000", validation_alias=_env("S3_ENDPOINT"), description="S3 host:port")
    s3_access_key: SecretStr | None = Field(
        None, validation_alias=_env("S3_ACCESS_KEY"), description="S3 access key (required for s3; no default)"
    )
    s3_secret_key: SecretStr | None = Field(
        None, validation_alias=_env("S3_SECRET_KEY"), description="S3 secret key (required for s3; no default)"
    )
    s3_bucket: str = Field("imgsift", validation_alias=_env("S3_BUCKET"), description="bucket; created if missing")
    s3_secure: bool = Field(False, validation_alias=_env("S3_SECURE"), description="use HTTPS to reach S3")
    s3_region: str | None = Field(
        None, validation_alias=_env("S3_REGION"), description="S3 region, if the store needs one"
    )
    local_storage_dir: Path = Field(
        Path("./imgsift-data"),
        validation_alias=_env("LOCAL_STORAGE_DIR"),
        description="folder for objects when storage=local (one machine or a shared volume)",
    )
    log_level: str = Field("INFO", validation_alias=_env("LOG_LEVEL"), description="DEBUG, INFO, WARNING or ERROR")
    s3_timeout: float = Field(
        20.0,
        gt=0,
        validation_alias=_env("S3_TIMEOUT"),
        description="seconds to connect to S3, and to wait for each read, before the request is tried again",
    )
    task_max_retries: int = Field(
        DEFAULT_TASK_MAX_RETRIES,
        ge=0,
        validation_alias=_env("TASK_MAX_RETRIES"),
        description=(
            "times a task retries a transient fault (PostgreSQL, Redis or S3 unreachable), waiting up to "
            "2, 4, ... 60 s (jittered); then it fails for good: a dead letter, and the job records the loss"
        ),
    )
    metrics_port: MetricsPort = Field(
        default=9100, ge=0, le=65535, validation_alias=_env("METRICS_PORT"), description=METRICS_PORT_HELP
    )

    @model_validator(mode="after")
    def _secrets_for_s3(self) -> ImgsiftSettings:
        if self.storage is StorageBackend.S3 and (self.s3_access_key is None or self.s3_secret_key is None):
            raise ValueError(
                "IMGSIFT_S3_ACCESS_KEY and IMGSIFT_S3_SECRET_KEY must be set when "
                "IMGSIFT_STORAGE=s3 (the default); see .env.example, or set "
                "IMGSIFT_STORAGE=local with IMGSIFT_LOCAL_STORAGE_DIR for a single machine"
            )
        return self


class MetricsSettings(BaseSettings):
    """The one shared setting the worker metrics read at start (``imgsift_common.metrics``), which
    needs none of the others (no S3 secrets): the same ``IMGSIFT_METRICS_PORT`` as above."""

    model_config = SettingsConfigDict(env_prefix="IMGSIFT_", extra="ignore", populate_by_name=True)

    metrics_port: MetricsPort = Field(
        default=9100, ge=0, le=65535, validation_alias=_env("METRICS_PORT"), description=METRICS_PORT_HELP
    )
