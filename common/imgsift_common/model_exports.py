"""Exported models for CPU workers, made once and cached: what the detector and the Siamese stage share.

A model stage with ``IMGSIFT_<STAGE>_EXPORT=openvino`` (or ``onnx``) runs an OpenVINO IR (or an
ONNX model under ONNX Runtime) instead of torch. Each stage says how to make its export (the
detector through ultralytics, the Siamese trunk through OpenVINO's or torch's converter); this
module holds the rest, once: the formats, the runtime check that names the extra to install,
the cache folder and the atomic making of an entry in it, so concurrent workers never see half
an export. Nothing here imports torch or a runtime.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator


class ExportFormat(StrEnum):
    """The model a stage runs: its torch weights, or an export of them made once."""

    NONE = "none"
    ONNX = "onnx"
    OPENVINO = "openvino"


# The modules each format needs to run (a stage may need more to make it: see ``require_runtime``).
RUNTIME_MODULES: dict[ExportFormat, tuple[str, ...]] = {
    ExportFormat.ONNX: ("onnx", "onnxruntime"),
    ExportFormat.OPENVINO: ("openvino",),
}


# A settings field naming the cache folder, where "" (a variable set but empty) means the default one.
OptionalDir = Annotated[Path | None, BeforeValidator(lambda v: None if v == "" else v)]


class ExportError(RuntimeError):
    """A model cannot be exported to, or run in, the configured format."""


def default_export_dir(stage: str) -> Path:
    """$XDG_CACHE_HOME/imgsift/{stage}-exports, else ~/.cache/imgsift/{stage}-exports."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgsift" / f"{stage}-exports"


def missing_modules(fmt: ExportFormat, modules: dict[ExportFormat, tuple[str, ...]] = RUNTIME_MODULES) -> list[str]:
    """The Python modules ``fmt`` needs that this environment lacks."""
    return [name for name in modules.get(fmt, ()) if importlib.util.find_spec(name) is None]


def require_runtime(
    fmt: ExportFormat,
    *,
    variable: str,
    package: str,
    modules: dict[ExportFormat, tuple[str, ...]] = RUNTIME_MODULES,
) -> None:
    """Raise ExportError, naming the extra of ``package`` to install, if ``fmt``'s runtime is missing."""
    if missing := missing_modules(fmt, modules):
        raise ExportError(
            f"{variable}={fmt.value} needs the Python package(s) {', '.join(missing)}, which are not "
            f"installed: pip install '{package}[{fmt.value}]', or set {variable}=none"
        )


def cached_export(
    cache_dir: Path,
    name: str,
    artifact: str,
    make: Callable[[Path], Path],
    *,
    variable: str,
) -> Path:
    """``cache_dir/name/artifact``: from the cache, or made now by ``make(folder)`` into it.

    ``make`` writes the export into an empty private folder and returns the path it wrote,
    which must be ``folder/artifact``; the folder is renamed into place when complete, so
    concurrent workers never see half an export (when two export at once, the first rename
    wins). Any error of ``make`` becomes an ExportError; nothing half-made is left behind.
    """
    entry = cache_dir / name
    path = entry / artifact
    if path.exists():
        return path
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    except OSError as exc:
        raise ExportError(f"cannot write exports to {cache_dir} ({exc}); set {variable}_DIR") from exc
    try:
        produced = make(work)
        if Path(produced).resolve() != (work / artifact).resolve():
            raise ExportError(f"the export of {name} was written to {produced}, not where expected")
        try:
            work.rename(entry)
        except OSError:
            if not path.exists():  # not a concurrent export that finished first
                raise
    except ExportError:
        raise
    except Exception as exc:  # exporters raise anything
        raise ExportError(f"exporting {name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
