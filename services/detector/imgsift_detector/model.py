"""The YOLO model behind the detector: loaded once per process, answering with our own records.

ultralytics is imported only when a model is loaded, so the Celery prefork parent never
imports torch or touches a GPU; each worker process loads its model on its first task.
ultralytics ``Results`` become :class:`~imgsift_common.messages.Detection` records right
after ``predict``: nothing outside this module sees them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imgsift_common.messages import Detection

if TYPE_CHECKING:
    from ultralytics.engine.results import Results

# Model tasks whose results carry axis-aligned boxes.
_BOX_TASKS = frozenset({"detect", "segment", "pose"})


class WeightsError(ValueError):
    """The configured YOLO weights cannot be used: no such file, no download, or no boxes."""


@contextmanager
def _pillow_open_kept() -> Iterator[None]:
    """Undo ultralytics' process-wide replacement of ``PIL.Image.open`` when it is imported.

    Its wrapper answers the first file Pillow cannot identify by pip-installing pi-heif, or
    offline by raising ModuleNotFoundError. A non-image must stay an UnidentifiedImageError for
    every stage in this process (the embedded command runs them all), and ultralytics gets
    decoded pixels from us, never files.
    """
    pillow_open = Image.open
    try:
        yield
    finally:
        Image.open = pillow_open


def _weights_source(weights: str) -> str:
    """What to hand ``YOLO()``: an existing file, or a model name ultralytics knows how to download."""
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    path = Path(weights).expanduser()
    if path.is_file():
        return str(path)
    if weights in GITHUB_ASSETS_NAMES:
        return weights
    raise WeightsError(
        f"YOLO weights {weights!r} are not a file and not a model name ultralytics can download; "
        "set IMGSIFT_DETECTOR_WEIGHTS to the path of a .pt file or to a name such as 'yolov8n.pt'"
    )


def _precision_args(half: bool) -> dict[str, Any]:
    """The predict argument that asks for fp16, in the spelling this ultralytics understands."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    # ultralytics 8.4 replaced `half` with `quantize` and warns on every call that passes `half`.
    if "quantize" in DEFAULT_CFG_DICT:
        return {"quantize": 16} if half else {}
    return {"half": half}


def _detections(result: Results) -> list[Detection]:
    """One image's ultralytics result as Detection records, in the image's pixels."""
    boxes = result.boxes
    if boxes is None:
        return []
    return [
        Detection(box=tuple(xyxy), score=score, class_id=int(cls), class_name=result.names[int(cls)])
        for xyxy, score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
    ]


class Detector:
    """A YOLO model on one device, predicting in batches. Not thread-safe: one per worker process."""

    def __init__(self, weights: str, device: str = "cpu", *, half: bool = False) -> None:
        with _pillow_open_kept():
            from ultralytics import YOLO

            source = _weights_source(weights)
            try:
                model = YOLO(source)
            except ConnectionError as exc:  # ultralytics raises the builtin when a download fails
                raise WeightsError(
                    f"could not download YOLO weights {weights!r} ({exc}); on a machine without internet set "
                    "IMGSIFT_DETECTOR_WEIGHTS to the path of a local .pt file"
                ) from exc
        if model.task not in _BOX_TASKS:
            raise WeightsError(
                f"YOLO weights {weights!r} are a {model.task!r} model; the detector needs boxes: "
                "use detection weights such as 'yolov8n.pt'"
            )
        self._model = model
        self.device = device
        self._precision = _precision_args(half)
        self.names: dict[int, str] = dict(model.names)
        self.weights_id = Path(weights).name

    def predict(
        self,
        images: list[Image.Image],
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        imgsz: int = 640,
        batch_size: int = 16,
    ) -> list[list[Detection]]:
        """Each image's detections, in the order given; ``batch_size`` images per forward pass."""
        found: list[list[Detection]] = []
        for start in range(0, len(images), batch_size):
            results = self._model.predict(
                images[start : start + batch_size],
                conf=conf,
                iou=iou,
                imgsz=imgsz,
                device=self.device,
                verbose=False,
                **self._precision,
            )
            found += [_detections(result) for result in results]
        return found


def get_detector(weights: str, device: str = "cpu", half: bool = False) -> Detector:
    """This process's detector for ``weights`` on ``device``, loaded on first use."""
    return _cached_detector(weights, device, half)


# Device and precision decide how the model is set up in memory (ultralytics before 8.4 fixes
# them on the first predict), so they key the cache; thresholds and image size are per call.
@functools.cache
def _cached_detector(weights: str, device: str, half: bool) -> Detector:
    return Detector(weights, device, half=half)
