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

``IMGSIFT_SIAMESE_EXPORT_PRECISION=bf16`` compiles the OpenVINO trunk in bf16 instead, on CPUs
that compute it natively (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` has ``BF16``: AVX512_BF16 or
AMX): about twice the crops per second (``bench/embed_bench.py --exports openvino,openvino-bf16``),
rows moved by percents of their norm, but by a shift most rows share, so a distance between two
bf16 rows moves by a few hundredths at most (``pytest -s tests/siamese/test_export.py -k bf16``
prints both). Such rows are not f32 rows: the runner says
``precision = "bf16"``, and the embedder gives them a ``trunk_id`` (and ``embedding_id``) of their
own, so they are stored, read back and cached apart and a job's references are embedded in the
same precision as its crops. Where the CPU has no native bf16, OpenVINO would emulate it (slower
than f32, on AVX-512 without BF16) or silently keep f32 (AVX2): the runner compiles f32 instead,
logs why, and its rows go under the f32 id like any f32 worker's. What the compiled model reports
is what ``precision`` says. ONNX Runtime has no bf16 mode on x86 CPUs: the setting refuses it.
"""

from __future__ import annotations

import hashlib
import logging
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
    "native_bf16",
    "trunk_runner",
]

log = logging.getLogger(__name__)

# Part of every cache name: raise it when the export below changes, so old exports are not reused.
# 2: uint8 pixels in, the normalisation in the graph.
EXPORT_VERSION = 2
VARIABLE = "IMGSIFT_SIAMESE_EXPORT"
INPUT, OUTPUT = "images", "features"


class TrunkRunner(Protocol):
    """Pooled trunk features ``(n, f)`` float32 of letterboxed pixels ``(n, size, size, 3)`` uint8.

    ``precision``: what the trunk computes in ("f32", "bf16", or "f16" for torch's fp16 on CUDA)."""

    name: str
    precision: str

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
        self.precision = "f16" if half else "f32"

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(_pixels(inputs)).to(self.device))
            return out.float().cpu().numpy()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, as OpenVINO sees it (AVX512_BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoTrunk:
    """An OpenVINO IR of the trunk, compiled for the CPU in fp32, or in bf16 where the CPU has it natively."""

    def __init__(self, path: Path, threads: int = 0, precision: str = "f32") -> None:
        import openvino as ov

        if precision not in ("f32", "bf16"):
            raise ValueError(f"the OpenVINO trunk runs in f32 or bf16, not {precision!r}")
        if precision == "bf16" and not native_bf16():
            capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            log.warning(
                "IMGSIFT_SIAMESE_EXPORT_PRECISION=bf16, but this CPU has no native bf16 (OpenVINO's capabilities: "
                "%s); the trunk runs in f32 and its features are stored as f32 ones",
                ", ".join(capabilities),
            )
            precision = "f32"
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.path = path
        # What OpenVINO compiled, not what was asked: the rows' ids follow it (Embedder.trunk_id).
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.name = "openvino" if self.precision == "f32" else f"openvino-{self.precision}"

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        result = self.compiled(_pixels(inputs))[0]
        return np.asarray(result, dtype=np.float32)


class OnnxTrunk:
    """An ONNX model of the trunk under ONNX Runtime on the CPU, its threads not spinning between runs
    (spinning takes the cores the decode pool needs; see the detector's ``_onnx_threads_wait_quietly``)."""

    name = "onnx"
    precision = "f32"

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
    precision: str = "f32",
) -> TrunkRunner:
    """What runs the trunk as configured: torch (fp16 with ``half``), or the export made once and cached
    (OpenVINO's compiled in ``precision``: f32, or bf16 where the CPU has it natively)."""
    export = ExportFormat(export)
    if precision != "f32" and export is not ExportFormat.OPENVINO:
        raise ExportError(f"{VARIABLE}_PRECISION={precision} is the OpenVINO trunk's; {VARIABLE}={export.value} "
                          "runs in f32")  # fmt: skip
    if export is ExportFormat.NONE:
        return TorchTrunk(network, device, half=half)
    if device.type != "cpu" or half:
        raise ExportError(f"{VARIABLE}={export.value} runs on the CPU, not on {device} (half={half})")
    path = exported_trunk(
        network, backbone=backbone, weights_id=weights_id, image_size=image_size, fmt=export,
        cache_dir=export_dir or default_export_dir(),
    )  # fmt: skip
    try:
        return OpenVinoTrunk(path, threads, precision) if export is ExportFormat.OPENVINO else OnnxTrunk(path, threads)
    except Exception as exc:  # the runtimes raise their own types for a model they cannot load
        raise ExportError(f"the {export.value} trunk {path} cannot run here: {type(exc).__name__}: {exc}") from exc
