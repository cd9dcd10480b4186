"""API settings, read from IMGSIFT_API_* (plus the shared IMGSIFT_* fields)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from imgsift_common.settings import ImgsiftSettings


class ApiSettings(ImgsiftSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_API_", extra="ignore", populate_by_name=True)

    max_reference_bytes: int = Field(10 * 1024 * 1024, description="bytes one reference image may have")
    max_references: int = Field(50, description="reference images one job may have")
    max_reference_pixels: int = Field(40_000_000, description="pixels one reference image may decode to")
    page_size_max: int = Field(500, description="largest page of crops one request may ask for")
