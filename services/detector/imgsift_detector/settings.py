"""Detector settings, read from IMGSIFT_DETECTOR_* (plus the shared IMGSIFT_* fields)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from imgsift_common.settings import ImgsiftSettings


class DetectorSettings(ImgsiftSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_DETECTOR_", extra="ignore", populate_by_name=True)

    weights: str = Field(
        "yolov8n.pt",
        description="YOLO weights: a local .pt file, or an ultralytics model name it downloads (needs the internet)",
    )
    device: str = Field("cpu", description="torch device the model runs on: 'cpu', 'cuda', 'cuda:1', 'mps'")
    batch_size: int = Field(16, ge=1, description="images per forward pass; lower it if the GPU runs out of memory")
    decode_threads: int = Field(4, ge=1, description="threads reading and decoding images ahead of the model")
    conf: float = Field(0.25, ge=0.0, le=1.0, description="boxes scoring below this confidence are dropped")
    iou: float = Field(0.7, ge=0.0, le=1.0, description="IoU above which non-maximum suppression merges two boxes")
    imgsz: int = Field(640, ge=32, description="side in pixels images are letterboxed to before inference")
    half: bool = Field(False, description="run the model in fp16 (GPU only; ignored on CPU)")
    pad: float = Field(
        0.1, ge=0.0, le=1.0, description="fraction of box width/height added on each side of a crop, clipped to image"
    )
    min_box_size: int = Field(8, ge=1, description="boxes narrower or lower than this many pixels are dropped")
    crop_jpeg_quality: int = Field(95, ge=1, le=95, description="JPEG quality of stored crops (Pillow scale, 1-95)")
