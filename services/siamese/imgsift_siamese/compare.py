"""Compare a batch of crops with the job's reference images and record their distances.

Distances are recorded raw; accepted = distance <= threshold is decided when read, so a
new threshold never recomputes anything. Recording is idempotent: a crop that already has
a distance is neither embedded nor recorded again, so a redelivered batch costs nothing.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from PIL import Image

from imgsift_common.keys import job_prefix
from imgsift_common.messages import Distance, Job, Stage
from imgsift_common.state import StateStore
from imgsift_common.storage import ObjectNotFound, ObjectStore
from imgsift_siamese.distance import reference_distance
from imgsift_siamese.embed import Embedder, short_hash
from imgsift_siamese.preprocess import DECODE_ERRORS, decode_image
from imgsift_siamese.settings import SiameseSettings

log = logging.getLogger(__name__)

# Reference embeddings of the jobs this process served last; a few KB each.
_REFERENCE_CACHE_SIZE = 64
_reference_cache: OrderedDict[tuple[str, str, tuple[str, ...]], np.ndarray] = OrderedDict()


class ReferenceImagesError(RuntimeError):
    """The job's reference images are absent or unreadable, so no crop of it can be scored."""


def scorer_id(embedder: Embedder, settings: SiameseSettings) -> str:
    """Short hash of what produced a distance: the embedding (backbone, weights, size) and the distance method."""
    return short_hash(embedder.embedding_id, settings.distance, settings.k)


def reference_embeddings_key(job_id: str, embedding_id: str, reference_keys: Sequence[str]) -> str:
    """Object key of the job's reference embeddings made by ``embedding_id`` from exactly these references."""
    return f"{job_prefix(job_id)}refs/embeddings-{embedding_id}-{short_hash(*reference_keys)}.npy"


def reference_embeddings(job: Job, store: ObjectStore, embedder: Embedder) -> np.ndarray:
    """Embeddings ``(r, d)`` of the job's reference images: from this process, the store, or computed once."""
    if not job.reference_keys:
        raise ReferenceImagesError(
            f"job {job.id} has no reference images, so its crops cannot be compared; "
            "create the job with at least one reference image"
        )
    return _embeddings(job, job.reference_keys, "references", store, embedder)


def negative_embeddings(
    job: Job, store: ObjectStore, embedder: Embedder, marked_wrong: Sequence[str] = ()
) -> np.ndarray | None:
    """Embeddings of the job's "not this" references and the crops marked wrong; None when there are none."""
    keys = [*job.negative_keys, *sorted(marked_wrong)]
    if not keys:
        return None
    # A marked crop whose object is gone is left out (the uploaded images are required).
    return _embeddings(job, keys, "negatives", store, embedder, optional=frozenset(marked_wrong))


def _embeddings(
    job: Job,
    image_keys: list[str],
    kind: str,
    store: ObjectStore,
    embedder: Embedder,
    optional: frozenset[str] = frozenset(),
) -> np.ndarray:
    cache_key = (job.id, embedder.embedding_id, tuple(image_keys))
    if cache_key in _reference_cache:
        _reference_cache.move_to_end(cache_key)
        return _reference_cache[cache_key]
    # Keyed by embedding id (not by distance method): the embeddings do not depend on it.
    key = reference_embeddings_key(job.id, embedder.embedding_id, image_keys)
    embeddings = _read_embeddings(job.id, store, key, rows=len(image_keys), dim=embedder.dim)
    if embeddings is None:
        images = [
            image
            for ref in image_keys
            if (image := read_image_or_none(store, ref) if ref in optional else _read_reference(job.id, ref, store))
            is not None
        ]
        embeddings = embedder.embed_images(images)
        store.put(key, _npy_bytes(embeddings), "application/octet-stream")
        log.info(f"embedded {kind}", extra={"job_id": job.id, "stage": Stage.SIAMESE.value, "key": key})
    embeddings.flags.writeable = False  # shared by every batch of the job in this process
    _reference_cache[cache_key] = embeddings
    if len(_reference_cache) > _REFERENCE_CACHE_SIZE:
        _reference_cache.popitem(last=False)
    return embeddings


def decided_distance(positive: np.ndarray, negative: np.ndarray | None, margin: float) -> np.ndarray:
    """The distance a crop is judged by: to the references, raised when a "not this" image is as near.

    ``d + max(0, d + margin - d_not)``: a crop must be nearer the references than the nearest
    "not this" image by ``margin``, or its distance grows by the shortfall. One number per crop
    keeps the threshold a single slider, re-decided from stored distances.
    """
    if negative is None:
        return positive
    return positive + np.maximum(0.0, positive + margin - negative)


def compare_batch(
    job: Job,
    crop_keys: Sequence[str],
    store: ObjectStore,
    state: StateStore,
    embedder: Embedder,
    settings: SiameseSettings,
) -> list[Distance]:
    """Record each crop's distance to the job's references; returns the distances recorded by this call."""
    pending = [key for key in dict.fromkeys(crop_keys) if not state.has_distance(job.id, key)]
    if not pending:
        return []
    refs = reference_embeddings(job, store, embedder)
    # Crops the user marked wrong join the "not this" images: crops like them are judged farther.
    marked_wrong = [k for k, ok in state.feedback(job.id).items() if not ok]
    negatives = negative_embeddings(job, store, embedder, marked_wrong)
    if job.model is None and not job.reference_distances and len(refs) >= 2:
        # The calibration's positives under the pretrained embedding (a trained head brings its own).
        loo = [float(v) for v in reference_distance(refs, refs, "nearest_other", settings.k)]
        job = state.update_job(job.id, reference_distances=loo)
    loaded = [(key, image) for key in pending if (image := _read_crop(job.id, key, store, state)) is not None]
    if not loaded:
        return []
    crops = embedder.embed_images([image for _, image in loaded])
    distances = decided_distance(
        reference_distance(crops, refs, settings.distance, settings.k),
        reference_distance(crops, negatives, "nearest", 1) if negatives is not None else None,
        settings.negative_margin,
    )
    recorded = [
        Distance(job_id=job.id, crop_key=key, distance=float(distance))
        for (key, _), distance in zip(loaded, distances, strict=True)
        # False when another delivery of this crop recorded it first: not ours to report.
        if state.record_distance(job.id, key, float(distance))
    ]
    log.info(
        "recorded distances",
        extra={
            "job_id": job.id,
            "stage": Stage.SIAMESE.value,
            "scorer_id": scorer_id(embedder, settings),
            "recorded": len(recorded),
            "skipped": len(pending) - len(loaded),
        },
    )
    return recorded


def read_image_or_none(store: ObjectStore, key: str) -> Image.Image | None:
    """An image from the store, or None when it is missing or does not decode."""
    try:
        return decode_image(store.get(key))
    except (ObjectNotFound, *DECODE_ERRORS):
        return None


def _read_reference(job_id: str, key: str, store: ObjectStore) -> Image.Image:
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise ReferenceImagesError(
            f"reference image {key} of job {job_id} is missing from the object store; upload it again"
        ) from None
    try:
        return decode_image(data)
    except DECODE_ERRORS as exc:
        raise ReferenceImagesError(
            f"reference image {key} of job {job_id} cannot be decoded ({exc}); replace it with a JPEG or PNG"
        ) from exc


def _read_crop(job_id: str, key: str, store: ObjectStore, state: StateStore) -> Image.Image | None:
    # A lost or broken crop must not sink the rest of its batch: it is skipped and the job
    # carries a note. Any other store error propagates so the task retries a transient one;
    # the read stays outside the decode guard because a socket error is an OSError too.
    try:
        data = store.get(key)
    except ObjectNotFound:
        _note_skipped_crop(job_id, key, "is missing from the object store", state)
        return None
    try:
        return decode_image(data)
    except DECODE_ERRORS as exc:
        _note_skipped_crop(job_id, key, f"cannot be decoded ({exc})", state)
        return None


def _note_skipped_crop(job_id: str, key: str, reason: str, state: StateStore) -> None:
    log.warning("crop skipped", extra={"job_id": job_id, "stage": Stage.SIAMESE.value, "key": key, "reason": reason})
    state.add_note(job_id, f"siamese: crop {key} {reason}; it has no distance")
    state.record_compare_failure(job_id, key)  # counted, so the job can still complete


def _read_embeddings(job_id: str, store: ObjectStore, key: str, *, rows: int, dim: int) -> np.ndarray | None:
    try:
        data = store.get(key)
    except ObjectNotFound:
        return None
    try:
        embeddings = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):  # a torn or foreign file: recompute and overwrite it
        log.warning(
            "unreadable reference embeddings; recomputing",
            extra={"job_id": job_id, "stage": Stage.SIAMESE.value, "key": key},
        )
        return None
    if embeddings.shape != (rows, dim) or embeddings.dtype != np.float32:
        log.warning(
            "reference embeddings of the wrong shape; recomputing",
            extra={"job_id": job_id, "stage": Stage.SIAMESE.value, "key": key},
        )
        return None
    return embeddings


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
