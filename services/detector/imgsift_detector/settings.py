"""Detector settings, read from IMGSIFT_DETECTOR_* (plus the shared IMGSIFT_* fields)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from imgsift_common.model_exports import ExportFormat, OptionalDir
from imgsift_common.settings import ImgsiftSettings

__all__ = ["DetectorSettings", "ExportFormat", "OptionalDir"]


class DetectorSettings(ImgsiftSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_DETECTOR_", extra="ignore", populate_by_name=True)

    weights: str = Field(
        "yolov8n.pt",
        description="YOLO weights: a local .pt file, or an ultralytics model name it downloads (needs the internet)",
    )
    device: str = Field("cpu", description="torch device the model runs on: 'cpu', 'cuda', 'cuda:1', 'mps'")
    batch_size: int = Field(16, ge=1, description="images per forward pass; lower it if the GPU runs out of memory")
    pipeline_step: int = Field(
        4,
        ge=0,
        description=(
            "images per step of a task's pipeline (at most batch_size): while the model runs on one step, the next "
            "steps' images are read and decoded and the last step's crops are stored; small steps leave the model "
            "idle only for the first step's reads and the last step's writes; 0: batch_size (a GPU's whole batches)"
        ),
    )
    decode_threads: int = Field(4, ge=1, description="threads reading and decoding images ahead of the model")
    torch_threads: int = Field(
        0,
        ge=0,
        description=(
            "threads the model may use: torch's math in this process, or an export's runtime (OpenVINO, ONNX "
            "Runtime); 0: the libraries' choice (torch: ultralytics' cores - 1, at most 8; an export: every core)"
        ),
    )
    conf: float = Field(0.25, ge=0.0, le=1.0, description="boxes scoring below this confidence are dropped")
    iou: float = Field(0.7, ge=0.0, le=1.0, description="IoU above which non-maximum suppression merges two boxes")
    imgsz: int = Field(640, ge=32, description="side in pixels images are letterboxed to before inference")
    half: bool = Field(False, description="run the model in fp16 (GPU only; ignored on CPU)")
    export: ExportFormat = Field(
        ExportFormat.NONE,
        description=(
            "CPU workers: 'openvino' or 'onnx' exports the weights once (cached) and runs the export instead of torch; "
            "needs imgsift-detector[openvino] or [onnx]; 'none' runs the .pt weights"
        ),
    )
    export_dir: OptionalDir = Field(
        None,
        description=(
            "folder of cached exports, one per weights content, imgsz and format "
            "(empty: $XDG_CACHE_HOME/imgsift/detector-exports, else ~/.cache/imgsift/detector-exports)"
        ),
    )
    pad: float = Field(
        0.1, ge=0.0, le=1.0, description="fraction of box width/height added on each side of a crop, clipped to image"
    )
    min_box_size: int = Field(8, ge=1, description="boxes narrower or lower than this many pixels are dropped")
    crop_jpeg_quality: int = Field(95, ge=1, le=95, description="JPEG quality of stored crops (Pillow scale, 1-95)")

    @model_validator(mode="after")
    def _export_runs_on_cpu(self) -> DetectorSettings:
        if self.export is not ExportFormat.NONE and self.device != "cpu":
            raise ValueError(
                f"IMGSIFT_DETECTOR_EXPORT={self.export.value} runs on the CPU; set IMGSIFT_DETECTOR_DEVICE=cpu, or "
                "IMGSIFT_DETECTOR_EXPORT=none to run the .pt weights on the GPU (with IMGSIFT_DETECTOR_HALF=true)"
            )
        return self
