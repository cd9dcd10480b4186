"""The detect stage, free of Celery: find the job's target in a batch of stored images and crop it.

Boxes are in the pixels of the upright image: :func:`load_image` applies the EXIF
orientation before the model sees the pixels, so a box drawn on the image a browser shows
lands where it should, and crops are cut from the same pixels.

The stage is idempotent. Crop keys come from the image's content hash and the crop's rank,
crop objects are stored before the detection is recorded, and the record is written once
per image; a redelivered batch stores nothing twice, moves no counter, and returns the
crops recorded the first time so that they are sent downstream again.
"""

from __future__ import annotations

import io
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor

from PIL import Image, ImageOps

from imgsift_common import keys
from imgsift_common.messages import Box, Crop, Detection, DetectMode, Job, Stage, StoredImage
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectNotFound, ObjectStore
from imgsift_detector.coco import resolve_target
from imgsift_detector.model import Detector
from imgsift_detector.settings import DetectorSettings

log = logging.getLogger(__name__)


def _register_heif() -> None:
    """HEIC/HEIF originals (the crawler stores them where pillow-heif is installed)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener(thumbnails=False)


_register_heif()


class UnreadableImage(ValueError):
    """Bytes that do not decode to an image."""


def load_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB pixels, turned upright by their EXIF orientation."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            upright = ImageOps.exif_transpose(opened)
            if upright.has_transparency_data:
                # Transparent pixels often hide garbage colours; show them as a page would, on white.
                rgba = upright.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            return upright.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot decode the image: {exc}") from exc


def padded_box(box: Box, pad: float, width: int, height: int) -> Box:
    """``box`` grown by ``pad`` times its width and height on each side, out to whole pixels, inside the image."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * pad, (y2 - y1) * pad
    return (
        float(max(0, math.floor(x1 - dx))),
        float(max(0, math.floor(y1 - dy))),
        float(min(width, math.ceil(x2 + dx))),
        float(min(height, math.ceil(y2 + dy))),
    )


def cut_crop(image: Image.Image, box: Box, quality: int) -> bytes:
    """The pixels inside ``box`` as JPEG bytes."""
    left, top, right, bottom = (round(v) for v in box)
    buffer = io.BytesIO()
    image.crop((left, top, right, bottom)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def detect_batch(
    job: Job,
    image_keys: list[str],
    store: ObjectStore,
    state: StateStore,
    detector: Detector | None,
    settings: DetectorSettings,
) -> list[Crop]:
    """Detect and crop every image of the batch once; return the batch's crops, earlier deliveries' included.

    When the job's target is no class of the detector, each image becomes one whole-image crop;
    with no detector at all (``imgsift verify``: the images are the crops) too, and no model runs.
    """
    if detector is None:
        targets = None
        if job.detect_mode is not DetectMode.WHOLE_IMAGE:
            state.update_job(job.id, detect_mode=DetectMode.WHOLE_IMAGE)
    else:
        targets = resolve_target(job.spec.target, detector.names)
        _record_detect_mode(job, targets, detector.weights_id, state)

    crops: list[Crop] = []
    pending: list[StoredImage] = []
    wanted = list(dict.fromkeys(image_keys))  # a key listed twice is handled once
    # Two reads for the batch, not two per image (16 round trips to the database before any image loaded).
    images = state.get_images(job.id, wanted)
    detected = state.detected_counts(job.id, [key for key in wanted if key in images])
    for key in wanted:
        image = images.get(key)
        if image is None:
            # Recording it would count an image the crawler never counted and could end the job early.
            log.warning("image is not one of the job's; skipped", extra=_log_fields(job.id, key))
        elif key in detected:
            crops += _recorded_crops(job.id, image, state, detected[key])
        else:
            pending.append(image)

    # Images are read and decoded in a thread pool, ahead of the model: while it runs on one step's
    # images, the next steps' are fetched and decoded (Pillow releases the GIL). A writer thread cuts,
    # encodes, stores and records each step's crops while the model runs on the next step. A task
    # (a crawler's download batch, 16 images) is cut into steps smaller than a forward pass
    # (pipeline_step), so the model waits only for the first step's reads and the last step's writes:
    # in one step per task it waited for all of the task's reads and all of its crop writes.
    size = step_size(settings)
    with (
        ThreadPoolExecutor(max_workers=max(1, settings.decode_threads)) as pool,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        futures = [pool.submit(_load_one, image, store) for image in pending]
        written: list[Future[list[Crop]]] = []
        for start in range(0, len(futures), size):
            loaded = []
            for future in futures[start : start + size]:
                image, pixels, problem = future.result()
                if pixels is None:
                    _record_unreadable(job.id, image, problem, state)
                else:
                    loaded.append((image, pixels))
            for done in written:
                if done.done():
                    done.result()  # a write that failed raises here: no point detecting on
            if loaded:
                cuts = _find_cuts(loaded, targets, detector, settings, job.spec.detector_conf)
                written.append(
                    writer.submit(_store_loaded, job.id, loaded, cuts, targets is None, store, state, settings)
                )
        for done in written:
            crops += done.result()
    return crops


def step_size(settings: DetectorSettings) -> int:
    """Images per pipeline step: ``pipeline_step``, at most ``batch_size``; 0 means ``batch_size``."""
    batch = max(1, settings.batch_size)
    return min(settings.pipeline_step, batch) if settings.pipeline_step > 0 else batch


def _find_cuts(
    loaded: list[tuple[StoredImage, Image.Image]],
    targets: frozenset[int] | None,
    detector: Detector | None,
    settings: DetectorSettings,
    conf: float | None = None,
) -> list[list[tuple[Detection, Box]]]:
    """Each loaded image's detections to crop, with their padded boxes; the whole image if no target.

    ``conf``: the job's own confidence threshold (``JobSpec.detector_conf``); None: the detector's setting.
    """
    if targets is None or detector is None:
        return [[_whole_image(pixels)] for _, pixels in loaded]
    found = detector.predict(
        [pixels for _, pixels in loaded],
        conf=settings.conf if conf is None else conf,
        iou=settings.iou,
        imgsz=settings.imgsz,
        batch_size=settings.batch_size,
    )
    return [
        _target_cuts(detections, targets, pixels, settings)
        for (_, pixels), detections in zip(loaded, found, strict=True)
    ]


def _store_loaded(
    job_id: str,
    loaded: list[tuple[StoredImage, Image.Image]],
    cuts: list[list[tuple[Detection, Box]]],
    whole_image: bool,
    store: ObjectStore,
    state: StateStore,
    settings: DetectorSettings,
) -> list[Crop]:
    """Store the crops of a batch's images, then record them in one write; run on the writer thread."""
    cut = [
        (image, _store_crops(job_id, image, pixels, image_cuts, whole_image, store, settings))
        for (image, pixels), image_cuts in zip(loaded, cuts, strict=True)
    ]
    # Objects first, records second: a crash in between leaves objects that the redelivered
    # task overwrites, never a recorded crop without its JPEG.
    recorded = state.record_detections(job_id, [(image.key, crops) for image, crops in cut])
    crops: list[Crop] = []
    for image, image_crops in cut:
        # Not recorded by this call: a concurrent delivery recorded the image first; its crops count.
        crops += image_crops if recorded[image.key] else _recorded_crops(job_id, image, state)
    return crops


def _log_fields(job_id: str, image_key: str) -> dict[str, str]:
    return {"job_id": job_id, "stage": Stage.DETECT.value, "image_key": image_key}


def _record_detect_mode(job: Job, targets: frozenset[int] | None, weights_id: str, state: StateStore) -> None:
    """Save on the job whether it is cropped to boxes or compared whole, and note why if whole."""
    mode = DetectMode.BOXES if targets is not None else DetectMode.WHOLE_IMAGE
    if job.detect_mode is mode:
        return
    if mode is DetectMode.WHOLE_IMAGE:
        state.add_note(
            job.id,
            f"target {job.spec.target!r} is not a class of the detector ({weights_id}); "
            "whole images are compared with the references",
        )
    # An atomic field update: a cancel landing meanwhile is kept.
    state.update_job(job.id, detect_mode=mode)


def _recorded_crops(job_id: str, image: StoredImage, state: StateStore, count: int | None = None) -> list[Crop]:
    """The crops recorded for an image earlier (their indices count up from 0); ``count``: how many, if known."""
    count = (state.detected_counts(job_id, [image.key]).get(image.key) or 0) if count is None else count
    return state.get_crops(job_id, [keys.crop_key(job_id, keys.crop_id(image.sha256, i)) for i in range(count)])


def _load_one(image: StoredImage, store: ObjectStore) -> tuple[StoredImage, Image.Image | None, str]:
    """An image's pixels, or None and why; run in the decode pool."""
    try:
        return image, load_image(store.get(image.key)), ""
    except ObjectNotFound:
        return image, None, "its object is missing from the store"
    except UnreadableImage as exc:
        return image, None, str(exc)


def _record_unreadable(job_id: str, image: StoredImage, problem: str, state: StateStore) -> None:
    """A missing or broken image is recorded with no crops and a note, so the job can finish."""
    log.warning("image unreadable; recorded with no crops", extra=_log_fields(job_id, image.key))
    state.add_note(job_id, f"image {image.key} has no crops: {problem}")
    state.record_detections(job_id, [(image.key, [])])


def _whole_image(pixels: Image.Image) -> tuple[Detection, Box]:
    """The whole image as a box of its own, not padded."""
    box = (0.0, 0.0, float(pixels.width), float(pixels.height))
    return Detection(box=box, score=1.0, class_id=None, class_name=None), box


def _target_cuts(
    detections: list[Detection], targets: frozenset[int], pixels: Image.Image, settings: DetectorSettings
) -> list[tuple[Detection, Box]]:
    """The target boxes large enough to keep, best first, each with the padded box to cut."""
    kept = [
        d
        for d in detections
        if d.class_id in targets
        and d.box[2] - d.box[0] >= settings.min_box_size
        and d.box[3] - d.box[1] >= settings.min_box_size
    ]
    kept.sort(key=lambda d: d.score, reverse=True)
    return [(d, padded_box(d.box, settings.pad, pixels.width, pixels.height)) for d in kept]


def _store_crops(
    job_id: str,
    image: StoredImage,
    pixels: Image.Image,
    cuts: list[tuple[Detection, Box]],
    whole_image: bool,
    store: ObjectStore,
    settings: DetectorSettings,
) -> list[Crop]:
    """Cut and store one image's crops (their JPEGs); the caller records them."""
    crops = []
    for index, (detection, cut) in enumerate(cuts):
        crop_id = keys.crop_id(image.sha256, index)
        crop = Crop(
            job_id=job_id,
            key=keys.crop_key(job_id, crop_id),
            crop_id=crop_id,
            image_key=image.key,
            box=detection.box,
            padded_box=cut,
            score=detection.score,
            class_name=detection.class_name,
            whole_image=whole_image,
        )
        store.put(crop.key, cut_crop(pixels, cut, settings.crop_jpeg_quality), "image/jpeg")
        crops.append(crop)
    return crops
