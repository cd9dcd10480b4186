"""How the trunk runs: torch (fp32, or fp16 on CUDA), or an OpenVINO / ONNX export of it made once.

The trunk (the backbone and the global average pooling: images to the pooled feature rows
that are stored per crop) is the expensive part of the Siamese stage; the head and the
distances stay in torch and numpy whatever runs the trunk. ``IMGSIFT_SIAMESE_EXPORT=openvino``
(or ``onnx``) exports it on a worker's first load, through OpenVINO's PyTorch converter (or
torch's ONNX exporter, run by ONNX Runtime), into a cache folder named by the backbone, its
weights, the input size and the format (:mod:`imgsift_common.model_exports`, the detector's
cache too), dynamic in the batch size. Exports run on the CPU.

Every runner takes letterboxed pixels, uint8 ``(n, size, size, 3)``, and normalises them itself
(:func:`imgsift_siamese.preprocess.normalise`, traced into the exports' graphs): the host does
no float pass over the pixels, the runtime's own threads do it.

OpenVINO is told to compute in fp32 and its IR keeps fp32 weights: on CPUs with AMX or
AVX512-BF16 its default is bf16, and ``save_model``'s default compresses weights to fp16;
either moves pooled features by percents of a row's norm (bf16 the most), where the stored
features of a trunk are one thing whichever worker computed them (one ``trunk_id``). In fp32,
OpenVINO and ONNX Runtime agree with torch to about 1e-5 of a row's norm, below what storing the
rows as float16 rounds away (``tests/siamese/test_export.py``).
"""

from __future__ import annotations

import hashlib
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from imgsift_common import model_exports
from imgsift_common.model_exports import ExportError, ExportFormat, cached_export
from imgsift_siamese.network import SiameseNetwork
from imgsift_siamese.preprocess import normalise

__all__ = [
    "EXPORT_VERSION",
    "ExportError",
    "ExportFormat",
    "OnnxTrunk",
    "OpenVinoTrunk",
    "TorchTrunk",
    "TrunkRunner",
    "default_export_dir",
    "export_name",
    "exported_trunk",
    "trunk_runner",
]

# Part of every cache name: raise it when the export below changes, so old exports are not reused.
# 2: uint8 pixels in, the normalisation in the graph.
EXPORT_VERSION = 2
VARIABLE = "IMGSIFT_SIAMESE_EXPORT"
INPUT, OUTPUT = "images", "features"


class TrunkRunner(Protocol):
    """Pooled trunk features ``(n, f)`` float32 of letterboxed pixels ``(n, size, size, 3)`` uint8."""

    name: str

    def __call__(self, inputs: np.ndarray) -> np.ndarray: ...


class PooledTrunk(nn.Module):
    """Letterboxed uint8 pixels to pooled features: the normalisation, the network's trunk and
    pooling as one module. What every runner runs, and what is exported."""

    def __init__(self, network: SiameseNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalise(images)  # in fp32; an fp16 trunk gets it rounded once, as it got float inputs before
        return self.network.features(x.to(next(self.network.parameters()).dtype))


def _pixels(inputs: np.ndarray) -> np.ndarray:
    if inputs.dtype != np.uint8 or inputs.ndim != 4 or inputs.shape[3] != 3:
        raise ValueError(f"the trunk takes letterboxed pixels (n, size, size, 3) uint8, not {inputs.dtype}"
                         f"{inputs.shape}")  # fmt: skip
    return np.ascontiguousarray(inputs)


class TorchTrunk:
    """The trunk in torch on ``device``; ``half`` runs an fp16 copy of it (CUDA), features returned in fp32."""

    def __init__(self, network: SiameseNetwork, device: torch.device, *, half: bool = False) -> None:
        self.device = device
        self.half = half
        # A copy: the fp32 network stays as it is for the head, training and the reference sets.
        self.module = deepcopy(PooledTrunk(network)).half() if half else PooledTrunk(network)
        self.name = "torch-fp16" if half else "torch"

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(_pixels(inputs)).to(self.device))
            return out.float().cpu().numpy()


class OpenVinoTrunk:
    """An OpenVINO IR of the trunk, compiled for the CPU in fp32."""

    name = "openvino"

    def __init__(self, path: Path, threads: int = 0) -> None:
        import openvino as ov

        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.path = path

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        result = self.compiled(_pixels(inputs))[0]
        return np.asarray(result, dtype=np.float32)


class OnnxTrunk:
    """An ONNX model of the trunk under ONNX Runtime on the CPU, its threads not spinning between runs
    (spinning takes the cores the decode pool needs; see the detector's ``_onnx_threads_wait_quietly``)."""

    name = "onnx"

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        (result,) = self.session.run([OUTPUT], {INPUT: _pixels(inputs)})
        return np.asarray(result, dtype=np.float32)


def default_export_dir() -> Path:
    """$XDG_CACHE_HOME/imgsift/siamese-exports, else ~/.cache/imgsift/siamese-exports."""
    return model_exports.default_export_dir("siamese")


def export_name(backbone: str, weights_id: str, image_size: int, fmt: ExportFormat) -> str:
    """The cache folder's name for an export: backbone, weights identity, input size, format."""
    weights = hashlib.sha256(weights_id.encode()).hexdigest()[:16]
    return f"{backbone}-{weights}-{image_size}-{fmt.value}-v{EXPORT_VERSION}"


def _artifact(fmt: ExportFormat) -> str:
    return "trunk.xml" if fmt is ExportFormat.OPENVINO else "trunk.onnx"


def exported_trunk(
    network: SiameseNetwork, *, backbone: str, weights_id: str, image_size: int, fmt: ExportFormat, cache_dir: Path
) -> Path:
    """The path of the network's trunk exported to ``fmt`` for ``image_size``: from the cache, or exported now."""
    if fmt is ExportFormat.NONE:
        raise ValueError("no export format given")
    model_exports.require_runtime(fmt, variable=VARIABLE, package="imgsift-siamese")
    module = PooledTrunk(network).eval()
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)

    def make(work: Path) -> Path:
        target = work / _artifact(fmt)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: the export is checked by its tests
            if fmt is ExportFormat.OPENVINO:
                import openvino as ov

                shape = (-1, image_size, image_size, 3)
                model = ov.convert_model(module, example_input=example, input=[(shape, ov.Type.u8)])
                ov.save_model(model, str(target), compress_to_fp16=False)  # fp16 weights move the features
            else:
                torch.onnx.export(
                    module, (example,), str(target), input_names=[INPUT], output_names=[OUTPUT],
                    dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False,
                )  # fmt: skip
        return target

    return cached_export(
        cache_dir, export_name(backbone, weights_id, image_size, fmt), _artifact(fmt), make, variable=VARIABLE
    )


def trunk_runner(
    network: SiameseNetwork,
    *,
    backbone: str,
    weights_id: str,
    image_size: int,
    device: torch.device,
    half: bool = False,
    export: ExportFormat = ExportFormat.NONE,
    export_dir: Path | None = None,
    threads: int = 0,
) -> TrunkRunner:
    """What runs the trunk as configured: torch (fp16 with ``half``), or the export made once and cached."""
    export = ExportFormat(export)
    if export is ExportFormat.NONE:
        return TorchTrunk(network, device, half=half)
    if device.type != "cpu" or half:
        raise ExportError(f"{VARIABLE}={export.value} runs on the CPU in fp32, not on {device} (half={half})")
    path = exported_trunk(
        network, backbone=backbone, weights_id=weights_id, image_size=image_size, fmt=export,
        cache_dir=export_dir or default_export_dir(),
    )  # fmt: skip
    try:
        return OpenVinoTrunk(path, threads) if export is ExportFormat.OPENVINO else OnnxTrunk(path, threads)
    except Exception as exc:  # the runtimes raise their own types for a model they cannot load
        raise ExportError(f"the {export.value} trunk {path} cannot run here: {type(exc).__name__}: {exc}") from exc
