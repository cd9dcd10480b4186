"""The YOLO model behind the detector: loaded once per process, answering with our own records.

ultralytics is imported only when a model is loaded, on the worker's first task. The worker
runs Celery's threads pool (``--pool threads --concurrency 2``): its tasks share the process's
one model, loaded once (:func:`get_detector` holds a lock while it loads), and take turns on it
(:meth:`Detector.predict` holds the detector's lock for each forward pass), so one task's reads,
decoding and crop writes overlap the other task's forward passes.
ultralytics ``Results`` become :class:`~imgsift_common.messages.Detection` records right
after ``predict``: nothing outside this module sees them.

Batches are made of images that letterbox to the same rectangle (stride 32), each exactly as
a single-image ``predict`` letterboxes it: a batch is padded no more than one image alone,
and every image gets the boxes it would get alone. ultralytics itself pads a batch of
differently sized images to a ``imgsz`` x ``imgsz`` square, a third more pixels than a
640 x 480 photo needs. With ``export`` the model runs as an OpenVINO or ONNX export of the
weights (:mod:`imgsift_detector.export`), on the CPU.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imgsift_common.batching import in_batches
from imgsift_common.messages import Detection
from imgsift_common.threads import limit_torch_threads
from imgsift_detector.export import ExportError, default_export_dir, exported_model, no_autoinstall
from imgsift_detector.settings import DetectorSettings, ExportFormat

if TYPE_CHECKING:
    from ultralytics.engine.results import Results

# Model tasks whose results carry axis-aligned boxes.
_BOX_TASKS = frozenset({"detect", "segment", "pose"})

# The stride ultralytics' YOLO detectors pad letterboxed images to a multiple of.
STRIDE = 32


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


def letterboxed_shape(width: int, height: int, imgsz: int, stride: int = STRIDE) -> tuple[int, int]:
    """(height, width) of an image once ultralytics letterboxes it alone for ``predict``: scaled to fit
    ``imgsz`` (rounded up to the stride), then padded to a multiple of the stride (``LetterBox(auto=True)``)."""
    side = math.ceil(imgsz / stride) * stride
    ratio = min(side / height, side / width)
    new_w, new_h = max(round(width * ratio), 1), max(round(height * ratio), 1)
    return new_h + (side - new_h) % stride, new_w + (side - new_w) % stride


def shape_batches(sizes: list[tuple[int, int]], imgsz: int, batch_size: int) -> list[list[int]]:
    """Indices of the images of ``sizes`` (width, height) grouped by letterboxed shape, in the order of each
    shape's first image; each group cut into ``batch_size`` and powers of two below it
    (``imgsift_common.batching``: every new batch size costs memory the process keeps)."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, (width, height) in enumerate(sizes):
        buckets.setdefault(letterboxed_shape(width, height, imgsz), []).append(index)
    return [batch for group in buckets.values() for batch in in_batches(group, batch_size)]


@functools.cache
def _rect_batch_predictor(base: type) -> type:
    """``base`` (the model task's ultralytics predictor), letterboxing a batch as each of its images alone.

    ultralytics letterboxes a batch to the minimal rectangle only when every image has the same
    size, else to a square. Here a batch whose images all letterbox alone to one shape is given
    exactly those arrays, so its boxes are those of a single-image ``predict``. Whether the model
    takes a rectangle at all (a .pt model or a dynamic export) stays ultralytics' decision.
    """

    class RectBatchPredictor(base):  # type: ignore[misc]
        def pre_transform(self, im: list[Any]) -> list[Any]:
            letterbox = super().pre_transform  # (super() does not work inside a comprehension)
            if len(im) > 1 and len({x.shape for x in im}) > 1:
                alone = [letterbox([x])[0] for x in im]
                if len({x.shape for x in alone}) == 1:
                    return alone
            return letterbox(im)

    return RectBatchPredictor


class Detector:
    """A YOLO model on one device, predicting in batches; one per worker process.

    Threads may share it: its forward passes run one at a time (ultralytics' predictor keeps the
    call's arguments and its buffers on the model, and an export's runtime has one inference request).

    ``export`` runs an OpenVINO or ONNX export of the weights, made once for ``imgsz`` and
    cached in ``export_dir``, instead of the .pt weights (CPU only); ``imgsz`` matters for nothing else.
    """

    def __init__(
        self,
        weights: str,
        device: str = "cpu",
        *,
        half: bool = False,
        export: ExportFormat = ExportFormat.NONE,
        export_dir: str | Path | None = None,
        imgsz: int = 640,
        threads: int = 0,
    ) -> None:
        export = ExportFormat(export)
        self._lock = threading.Lock()  # one forward pass at a time (predict)
        if export is not ExportFormat.NONE and device != "cpu":
            raise WeightsError(f"exported {export.value} models run on the CPU, not on {device!r}")
        with _pillow_open_kept():
            from ultralytics import YOLO  # type: ignore[attr-defined]

            no_autoinstall()
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
            task = model.task
            if export is not ExportFormat.NONE:
                try:
                    path = exported_model(
                        Path(getattr(model, "ckpt_path", None) or source),
                        export,
                        imgsz,
                        Path(export_dir or default_export_dir()),
                    )
                except ExportError as exc:
                    raise WeightsError(str(exc)) from exc
                model = YOLO(str(path), task=task)
                source = str(path)
            self._model = model
            self.model_path = source  # what ultralytics loaded: the weights, or their export
            self._predictor = _rect_batch_predictor(model.task_map[task]["predictor"])
            self.device = device
            self._precision = _precision_args(half) if export is ExportFormat.NONE else {}
            self.export = export
            self._warm_up(imgsz)
            if export is ExportFormat.ONNX:
                self._onnx_threads_wait_quietly(threads)
            elif export is ExportFormat.OPENVINO and threads:
                self._openvino_threads(threads)
        self.threads = threads
        self.names: dict[int, str] = dict(model.names)
        self.weights_id = Path(weights).name

    def _warm_up(self, imgsz: int) -> None:
        """Set the model up now (load an export's runtime, fuse the layers), so that a problem shows at load."""
        try:
            self.predict([Image.new("RGB", (imgsz, imgsz))], imgsz=imgsz, batch_size=1)
        except ImportError as exc:  # a runtime missing, and ultralytics not let to install it
            raise WeightsError(f"the {self.export.value} model cannot run here: {exc}") from exc

    def _openvino_threads(self, threads: int) -> None:
        """Recompile the OpenVINO model to run on ``threads`` threads instead of one per core.

        ultralytics compiles it for latency on every core. On a host shared with other workers (the
        Siamese stage, the object store) the threads of one forward pass wait for each other whenever
        one of them is descheduled, and OpenVINO's idle threads yield in a loop meanwhile (about a tenth
        of the detector's CPU in the 2-core end-to-end job); a worker given N cores runs N threads.
        """
        import openvino as ov

        predictor: Any = self._model.predictor  # exists once predict() has run (the warm-up)
        backend = getattr(predictor.model, "backend", None)
        compile_model = getattr(backend, "compile_model", None)
        if backend is None or not isinstance(compile_model, functools.partial):
            return
        config = {**compile_model.keywords.get("config", {}), "INFERENCE_NUM_THREADS": threads}
        backend.compile_model = functools.partial(compile_model.func, **{**compile_model.keywords, "config": config})
        xml = Path(self.model_path)
        xml = xml if xml.is_file() else next(xml.glob("*.xml"))
        backend.ov_compiled_model = backend.compile_model(ov.Core().read_model(str(xml)))

    def _onnx_threads_wait_quietly(self, threads: int = 0) -> None:
        """Reopen the ONNX Runtime session with its threads told not to spin between runs (and ``threads``
        of them, if not 0).

        By default ONNX Runtime's threads busy-wait for the next run, taking the cores the decode
        pool and the pre- and post-processing need: on 2 cores this halved the stage's throughput.
        ultralytics passes no session options, so the session it opened (on the CPU) is replaced.
        """
        import onnxruntime

        predictor: Any = self._model.predictor  # ultralytics types it None: it exists once predict() has run
        backend = getattr(predictor.model, "backend", None)
        session = getattr(backend, "session", None)
        if (
            backend is None
            or not isinstance(session, onnxruntime.InferenceSession)
            or session.get_providers() != ["CPUExecutionProvider"]
        ):
            return
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        backend.session = onnxruntime.InferenceSession(self.model_path, options, providers=["CPUExecutionProvider"])

    def predict(
        self,
        images: list[Image.Image],
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        imgsz: int = 640,
        batch_size: int = 16,
    ) -> list[list[Detection]]:
        """Each image's detections, in the order given; at most ``batch_size`` images per forward pass,
        each pass of images that letterbox to the same shape."""
        found: list[list[Detection]] = [[] for _ in images]
        for indices in shape_batches([image.size for image in images], imgsz, batch_size):
            # One pass at a time: another task's thread waits here while this one runs the model.
            with self._lock:
                # Without stream=True predict() returns a list of Results (its hint also allows a Tensor).
                results: list[Results] = self._model.predict(  # type: ignore[assignment]
                    [images[i] for i in indices],
                    conf=conf,
                    iou=iou,
                    imgsz=imgsz,
                    device=self.device,
                    verbose=False,
                    predictor=self._predictor,
                    **self._precision,
                )
            for index, result in zip(indices, results, strict=True):
                found[index] = _detections(result)
        return found


def get_detector(
    weights: str,
    device: str = "cpu",
    half: bool = False,
    *,
    export: ExportFormat = ExportFormat.NONE,
    export_dir: Path | None = None,
    imgsz: int = 640,
    threads: int = 0,
) -> Detector:
    """This process's detector for ``weights`` on ``device``, loaded on first use; ``threads``: those of an
    exported model's runtime (0: one per core; torch's are set apart, by :func:`limit_torch_threads`)."""
    if ExportFormat(export) is ExportFormat.NONE:
        imgsz, export_dir, threads = 640, None, 0  # they choose an export only: one torch model whatever they are
    # Two tasks of a threads-pool worker starting together load one model, not one each (functools.cache
    # would run both loads); a task that finds the model loading waits for it.
    with _loading:
        return _cached_detector(weights, device, half, ExportFormat(export), export_dir, imgsz, threads)


def detector_from_settings(settings: DetectorSettings) -> Detector:
    """This process's detector as ``settings`` configure it (weights, device, precision, export)."""
    detector = get_detector(
        settings.weights,
        settings.device,
        settings.half,
        export=settings.export,
        export_dir=settings.export_dir,
        imgsz=settings.imgsz,
        threads=settings.torch_threads,
    )
    # After loading: ultralytics sets torch's threads itself (to cores - 1, at most 8) when it
    # sets the model up, which the detector does once, at its warm-up.
    limit_torch_threads(settings.torch_threads)
    return detector


_loading = threading.Lock()


# Device, precision and export decide how the model is set up in memory (ultralytics before 8.4
# fixes them on the first predict), so they key the cache; thresholds and image size are per call.
@functools.cache
def _cached_detector(
    weights: str, device: str, half: bool, export: ExportFormat, export_dir: Path | None, imgsz: int, threads: int
) -> Detector:
    return Detector(weights, device, half=half, export=export, export_dir=export_dir, imgsz=imgsz, threads=threads)
