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
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from imgsift_detector.settings import ExportFormat

# The modules each format needs, to export and to run, and the extra that installs them.
REQUIRED_MODULES: dict[ExportFormat, tuple[str, ...]] = {
    ExportFormat.ONNX: ("onnx", "onnxruntime"),
    ExportFormat.OPENVINO: ("openvino",),
}

# Part of every cache name: raise it when the export arguments below change, so old exports are not reused.
EXPORT_VERSION = 1


class ExportError(RuntimeError):
    """The weights cannot be exported to, or run in, the configured format."""


def default_export_dir() -> Path:
    """$XDG_CACHE_HOME/imgsift/detector-exports, else ~/.cache/imgsift/detector-exports."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgsift" / "detector-exports"


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
    return [name for name in REQUIRED_MODULES.get(fmt, ()) if importlib.util.find_spec(name) is None]


def require_runtime(fmt: ExportFormat) -> None:
    """Raise ExportError, naming the extra to install, if ``fmt``'s runtime is not installed."""
    if missing := missing_modules(fmt):
        raise ExportError(
            f"IMGSIFT_DETECTOR_EXPORT={fmt.value} needs the Python package(s) {', '.join(missing)}, which are not "
            f"installed: pip install 'imgsift-detector[{fmt.value}]', or set IMGSIFT_DETECTOR_EXPORT=none"
        )


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


def _artifact(folder: Path, stem: str, fmt: ExportFormat) -> Path:
    """What ultralytics writes for an export of ``stem``.pt in ``folder``, and what ``YOLO()`` loads."""
    return folder / (f"{stem}_openvino_model" if fmt is ExportFormat.OPENVINO else f"{stem}.onnx")


def exported_model(weights: Path, fmt: ExportFormat, imgsz: int, cache_dir: Path) -> Path:
    """The path of ``weights`` exported to ``fmt`` for ``imgsz``: from the cache, or exported now into it.

    The export runs in a private temporary folder (the weights are copied there, since
    ultralytics writes beside them) that is renamed into place when complete, so concurrent
    workers never see half an export; when two export at once, the first rename wins.
    """
    if fmt is ExportFormat.NONE:
        raise ValueError("no export format given")
    require_runtime(fmt)
    entry = cache_dir / export_name(weights, fmt, imgsz)
    artifact = _artifact(entry, weights.stem, fmt)
    if artifact.exists():
        return artifact
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache_dir))
    except OSError as exc:
        raise ExportError(f"cannot write exports to {cache_dir} ({exc}); set IMGSIFT_DETECTOR_EXPORT_DIR") from exc
    try:
        source = work / f"{weights.stem}.pt"
        shutil.copyfile(weights, source)
        from ultralytics import YOLO  # type: ignore[attr-defined]

        options = {"simplify": False} if fmt is ExportFormat.ONNX else {}  # onnxslim would be one more package
        produced = YOLO(str(source)).export(format=fmt.value, imgsz=imgsz, dynamic=True, device="cpu", **options)
        source.unlink()
        if Path(produced).resolve() != _artifact(work, weights.stem, fmt).resolve():
            raise ExportError(f"ultralytics exported {weights} to {produced}, not where expected")
        try:
            work.rename(entry)
        except OSError:
            if not artifact.exists():  # not a concurrent export that finished first
                raise
    except ExportError:
        raise
    except Exception as exc:  # ultralytics raises anything from its exporters
        raise ExportError(f"exporting {weights} to {fmt.value} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return artifact
