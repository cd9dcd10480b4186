"""Exported models for CPU workers: the .pt weights exported once through ultralytics, cached, reused.

``IMGSIFT_DETECTOR_EXPORT=openvino`` (or ``onnx``) makes the detector run an OpenVINO IR (or an
ONNX model under ONNX Runtime) instead of torch. The export is made on a worker's first load
and kept in a cache folder under a name made of the weights' content hash, the image size and
the format, so new weights, another ``imgsz`` or another format export again and nothing else
does. Exports are dynamic (any batch size, any height and width), so a batch is letterboxed
to the same minimal rectangle a single-image ``predict`` uses, as with the .pt weights.

Nothing is downloaded or installed here: the export runtimes come from the detector's extras
(``pip install 'imgsift-detector[openvino]'`` or ``[onnx]``). ultralytics would pip-install a
missing one by itself; the detector turns that off (see :func:`no_autoinstall`) and names the
extra instead.
"""

from __future__ import annotations

import hashlib
import importlib.util  # noqa: F401  # tests hide a runtime by patching find_spec through this module
import shutil
from pathlib import Path

from imgsift_common import model_exports
from imgsift_common.model_exports import ExportError, cached_export
from imgsift_detector.settings import ExportFormat

__all__ = ["EXPORT_VERSION", "ExportError", "default_export_dir", "export_name", "exported_model"]

# The modules each format needs, to export and to run (ultralytics exports ONNX through the onnx package).
REQUIRED_MODULES: dict[ExportFormat, tuple[str, ...]] = model_exports.RUNTIME_MODULES

# Part of every cache name: raise it when the export arguments below change, so old exports are not reused.
EXPORT_VERSION = 1


def default_export_dir() -> Path:
    """$XDG_CACHE_HOME/imgsift/detector-exports, else ~/.cache/imgsift/detector-exports."""
    return model_exports.default_export_dir("detector")


def no_autoinstall() -> None:
    """Stop ultralytics from pip-installing packages it finds missing, in this process.

    Left on, a worker would install export runtimes from the internet on its first task (or
    fail obscurely offline). Off, a missing runtime is an ImportError that the detector reports
    with the extra to install.
    """
    from ultralytics.utils import checks

    checks.AUTOINSTALL = False  # type: ignore[attr-defined]


def missing_modules(fmt: ExportFormat) -> list[str]:
    """The Python modules ``fmt`` needs that this environment lacks."""
    return model_exports.missing_modules(fmt, REQUIRED_MODULES)


def require_runtime(fmt: ExportFormat) -> None:
    """Raise ExportError, naming the extra to install, if ``fmt``'s runtime is not installed."""
    model_exports.require_runtime(fmt, variable="IMGSIFT_DETECTOR_EXPORT", package="imgsift-detector")


def weights_digest(weights: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the weights file."""
    digest = hashlib.sha256()
    with weights.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def export_name(weights: Path, fmt: ExportFormat, imgsz: int) -> str:
    """The cache folder's name for an export: weights name and content, image size, format."""
    return f"{weights.stem}-{weights_digest(weights)}-{imgsz}-{fmt.value}-v{EXPORT_VERSION}"


def _artifact(stem: str, fmt: ExportFormat) -> str:
    """What ultralytics writes for an export of ``stem``.pt, and what ``YOLO()`` loads."""
    return f"{stem}_openvino_model" if fmt is ExportFormat.OPENVINO else f"{stem}.onnx"


def exported_model(weights: Path, fmt: ExportFormat, imgsz: int, cache_dir: Path) -> Path:
    """The path of ``weights`` exported to ``fmt`` for ``imgsz``: from the cache, or exported now into it.

    The export runs in a private temporary folder (the weights are copied there, since
    ultralytics writes beside them) that is renamed into place when complete
    (:func:`imgsift_common.model_exports.cached_export`).
    """
    if fmt is ExportFormat.NONE:
        raise ValueError("no export format given")
    require_runtime(fmt)

    def make(work: Path) -> Path:
        source = work / f"{weights.stem}.pt"
        shutil.copyfile(weights, source)
        from ultralytics import YOLO  # type: ignore[attr-defined]

        options = {"simplify": False} if fmt is ExportFormat.ONNX else {}  # onnxslim would be one more package
        produced = YOLO(str(source)).export(format=fmt.value, imgsz=imgsz, dynamic=True, device="cpu", **options)
        source.unlink()
        return Path(produced)

    try:
        return cached_export(
            cache_dir, export_name(weights, fmt, imgsz), _artifact(weights.stem, fmt), make,
            variable="IMGSIFT_DETECTOR_EXPORT",
        )  # fmt: skip
    except ExportError as exc:
        if exc.__cause__ is not None and not isinstance(exc.__cause__, ExportError):
            cause = exc.__cause__
            raise ExportError(f"exporting {weights} to {fmt.value} failed: {type(cause).__name__}: {cause}") from cause
        raise
