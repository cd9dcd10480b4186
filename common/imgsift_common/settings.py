"""Settings shared by every service: where Redis and the object store are.

Each service subclasses :class:`ImgsiftSettings` with its own ``env_prefix``
(``IMGSIFT_CRAWLER_``, ``IMGSIFT_DETECTOR_`` ...). The shared fields below carry an
explicit alias, so they are read from the same ``IMGSIFT_...`` variables in every
service, whatever its prefix. Compose and Kubernetes pass the same variables;
``.env.example`` documents them all.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageBackend(StrEnum):
    S3 = "s3"
    LOCAL = "local"


def _env(name: str) -> AliasChoices:
    # Shared fields ignore the subclass prefix: IMGSIFT_REDIS_URL everywhere.
    return AliasChoices(f"IMGSIFT_{name}", name.lower())


class ImgsiftSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_", extra="ignore", populate_by_name=True)

    redis_url: str = Field(
        "redis://localhost:6379/0", validation_alias=_env("REDIS_URL"), description="Redis: queues and job state"
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

    @model_validator(mode="after")
    def _secrets_for_s3(self) -> ImgsiftSettings:
        if self.storage is StorageBackend.S3 and (self.s3_access_key is None or self.s3_secret_key is None):
            raise ValueError(
                "IMGSIFT_S3_ACCESS_KEY and IMGSIFT_S3_SECRET_KEY must be set when "
                "IMGSIFT_STORAGE=s3 (the default); see .env.example, or set "
                "IMGSIFT_STORAGE=local with IMGSIFT_LOCAL_STORAGE_DIR for a single machine"
            )
        return self
