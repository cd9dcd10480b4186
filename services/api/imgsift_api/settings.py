"""API settings, read from IMGSIFT_API_* (plus the shared IMGSIFT_* fields)."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from imgsift_common.settings import ImgsiftSettings


class ApiSettings(ImgsiftSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_API_", extra="ignore", populate_by_name=True)

    max_reference_bytes: int = Field(10 * 1024 * 1024, description="bytes one reference image may have")
    max_references: int = Field(50, description="reference images one job may have")
    max_reference_pixels: int = Field(40_000_000, description="pixels one reference image may decode to")
    page_size_max: int = Field(500, description="largest page of crops one request may ask for")
    max_request_bytes: int = Field(
        256 * 1024 * 1024, description="bytes one request body may have (413 beyond; uploads included)"
    )
    bootstrap_key: SecretStr | None = Field(
        None,
        description="the operator's first admin API key (any 16-200 letters, digits, '_' or '-', e.g. from "
        "`openssl rand -hex 32`): registered, hashed, at every start; more keys with POST /v1/keys",
    )
    crawler_contact: str | None = Field(
        None,
        validation_alias=AliasChoices("IMGSIFT_CRAWLER_CONTACT", "crawler_contact"),
        description="the crawler's IMGSIFT_CRAWLER_CONTACT (the same variable): a job with a 'wikimedia' source "
        "is refused without it, since Wikimedia answers 403 to clients without a contact",
    )
    rate_limit: str = Field(
        "600/minute", description="requests one API key may make, e.g. '600/minute' (a key may have its own)"
    )

    @field_validator("bootstrap_key")
    @classmethod
    def _not_the_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        # .env.example ships a placeholder so compose starts from a copy; an admin key anyone can read is refused.
        if value is not None and value.get_secret_value().startswith("change-me"):
            raise ValueError(
                "IMGSIFT_API_BOOTSTRAP_KEY is still the .env.example placeholder; set your own (openssl rand -hex 32)"
            )
        return value
