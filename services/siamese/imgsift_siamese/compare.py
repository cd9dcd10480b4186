"""Compare a batch of crops with the job's reference images and record their distances.

Distances are recorded raw; accepted = distance <= threshold is decided when read, so a
new threshold never recomputes anything. Recording is idempotent: a crop that already has
a distance is neither embedded nor recorded again, so a redelivered batch costs nothing.

The trunk runs once per crop. Its pooled features are stored with the batch
(:mod:`imgsift_siamese.features`): a batch redelivered before its distances were all
recorded reads them back, and a re-score after fine-tuning (:func:`score_stored_features`)
applies only the new head to them. Crops are read and decoded in a thread pool ahead of
the model; embeddings become distances by one matrix product with the references.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import Distance, Job, Stage
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectNotFound, ObjectStore
from imgsift_siamese import features as stored
from imgsift_siamese.distance import judged_distances
from imgsift_siamese.embed import Embedder, short_hash
from imgsift_siamese.features import FeatureRows, Prefetched, as_stored, prefetch, read_pool
from imgsift_siamese.preprocess import DECODE_ERRORS, decode_image, pixels, prepare
from imgsift_siamese.settings import SiameseSettings
from imgsift_siamese.train import TrainConfig, ViewSteps, apply_view, held_out_views, view_steps, views_per_reference

log = logging.getLogger(__name__)

# Reference embeddings of the jobs this process served last; a few KB each.
_REFERENCE_CACHE_SIZE = 64
_reference_cache: OrderedDict[tuple[str, str, tuple[str, ...], tuple[str, ...]], tuple[tuple[str, ...], np.ndarray]] = (
    OrderedDict()
)
SET_READ_THREADS = 4  # threads reading reference and "not this" images
RESCORE_CHUNK = 1024  # stored feature rows scored per pass of the head when re-scoring
# The source of an image whose key is its content hash (references, "not this" images): the
# key alone says what the features were computed from.
CONTENT = "content"


class ReferenceImagesError(RuntimeError):
    """The job's reference images are absent or unreadable, so no crop of it can be scored."""


@dataclass(frozen=True)
class Unreadable:
    """Why an image could not be fed to the trunk: it is missing, or it does not decode."""

    missing: bool
    detail: str


OnUnreadable = Callable[[str, Unreadable], None]


def scorer_id(embedder: Embedder, settings: SiameseSettings) -> str:
    """Short hash of what produced a distance: the embedding (backbone, weights, size) and the distance method."""
    return short_hash(embedder.embedding_id, settings.distance, settings.k)


# ============================================================================ reference sets


def reference_embeddings(job: Job, store: ObjectStore, embedder: Embedder) -> np.ndarray:
    """Embeddings ``(r, d)`` of the job's reference images: from this process, stored features, or computed once."""
    if not job.reference_keys:
        raise ReferenceImagesError(
            f"job {job.id} has no reference images, so its crops cannot be compared; "
            "create the job with at least one reference image"
        )
    return _set_embeddings(job, job.reference_keys, dict.fromkeys(job.reference_keys, CONTENT), store, embedder,
                           _required(job.id, "reference image"))[1]  # fmt: skip


def negative_embeddings(
    job: Job, store: ObjectStore, state: StateStore, embedder: Embedder, marked_wrong: Sequence[str] = ()
) -> tuple[np.ndarray | None, list[str | None]]:
    """Embeddings of the job's "not this" references and the crops answered wrong (None when
    there are none), and each row's crop key (None for an uploaded image)."""
    rows: list[np.ndarray] = []
    row_keys: list[str | None] = []
    if job.negative_keys:
        _, found = _set_embeddings(job, job.negative_keys, dict.fromkeys(job.negative_keys, CONTENT), store,
                                   embedder, _required(job.id, "'not this' image"))  # fmt: skip
        rows.append(found)
        row_keys += [None] * len(found)
    present, found = answered_embeddings(job, store, state, embedder, marked_wrong)
    rows.append(found)
    row_keys += present
    rows = [r for r in rows if len(r)]
    return (np.concatenate(rows) if rows else None), row_keys


def answered_embeddings(
    job: Job, store: ObjectStore, state: StateStore, embedder: Embedder, crop_keys: Sequence[str]
) -> tuple[list[str | None], np.ndarray]:
    """Embeddings of answered crops, and the keys of those found (a crop whose object is gone is left out).

    Kept apart from the uploaded images, which never change, so a new answer recomputes only
    the answered crops' set.
    """
    if not crop_keys:
        return [], np.zeros((0, embedder.dim), dtype=np.float32)
    marked = sorted(crop_keys)
    present, rows = _set_embeddings(job, marked, crop_sources(job.id, marked, state), store, embedder, _ignore)
    return list(present), rows


def _set_embeddings(
    job: Job,
    image_keys: Sequence[str],
    sources: Mapping[str, str],
    store: ObjectStore,
    embedder: Embedder,
    on_unreadable: OnUnreadable,
) -> tuple[tuple[str, ...], np.ndarray]:
    """The keys of ``image_keys`` whose rows could be had, and their embeddings."""
    cache_key = (job.id, embedder.embedding_id, tuple(image_keys), tuple(sources.get(k, "") for k in image_keys))
    if cache_key in _reference_cache:
        _reference_cache.move_to_end(cache_key)
        return _reference_cache[cache_key]
    # Stored as trunk features, not embeddings: a trained head re-embeds them without the trunk.
    object_key = keys.feature_set_key(job.id, embedder.trunk_id, stored.digest(image_keys))
    found = _read_features(store, embedder, job.id, object_key)
    rows = trunk_features(
        job.id, object_key, found, image_keys, sources, store, embedder, SET_READ_THREADS, on_unreadable
    )
    present = [k for k in image_keys if k in rows]
    if present:
        embeddings = embedder.embed_features(np.stack([rows[k] for k in present]))
    else:
        embeddings = np.zeros((0, embedder.dim), dtype=np.float32)
    embeddings.flags.writeable = False  # shared by every batch of the job in this process
    _reference_cache[cache_key] = (tuple(present), embeddings)
    if len(_reference_cache) > _REFERENCE_CACHE_SIZE:
        _reference_cache.popitem(last=False)
    return tuple(present), embeddings


def _required(job_id: str, what: str) -> OnUnreadable:
    def fail(key: str, problem: Unreadable) -> None:
        if problem.missing:
            raise ReferenceImagesError(f"{what} {key} of job {job_id} {problem.detail}; upload it again")
        raise ReferenceImagesError(f"{what} {key} of job {job_id} {problem.detail}; replace it with a JPEG or PNG")

    return fail


def _ignore(key: str, problem: Unreadable) -> None:
    return None


# ============================================================================ scoring


@dataclass(frozen=True)
class Scorer:
    """A job's crops' trunk features to recorded distances: the head, then one matrix product with
    the references (the job's and the crops answered right) and the "not this" images (the job's
    and the crops answered wrong). An answered crop is measured without itself."""

    job_id: str
    embedder: Embedder
    references: np.ndarray
    negatives: np.ndarray | None
    settings: SiameseSettings
    reference_keys: tuple[str | None, ...] = ()  # per reference row: the answered crop it is, or None
    negative_keys: tuple[str | None, ...] = ()

    def distances(self, features: np.ndarray, crop_keys: Sequence[str] | None = None) -> np.ndarray:
        settings = self.settings
        return judged_distances(
            self.embedder.embed_features(features),
            self.references,
            self.negatives,
            method=settings.distance,
            k=settings.k,
            margin=settings.negative_margin,
            crop_keys=crop_keys,
            reference_keys=self.reference_keys,
            negative_keys=self.negative_keys,
        )

    def record(self, state: StateStore, crop_keys: Sequence[str], features: np.ndarray) -> list[Distance]:
        """Record the distances of ``crop_keys`` from their feature rows; returns those this call recorded."""
        if not crop_keys:
            return []
        values = [(key, float(d)) for key, d in zip(crop_keys, self.distances(features, crop_keys), strict=True)]
        recorded = state.record_distances(self.job_id, values)  # one write for the batch
        # False when another delivery of a crop recorded it first: not ours to report.
        return [Distance(job_id=self.job_id, crop_key=key, distance=d) for key, d in values if recorded.pop(key, False)]


def job_scorer(
    job: Job, store: ObjectStore, state: StateStore, embedder: Embedder, settings: SiameseSettings
) -> tuple[Job, Scorer]:
    """The job (its calibration positives recorded) and the scorer of its crops under ``embedder``."""
    if _calibrates(job):
        job = state.get_job(job.id) or job  # another batch may have recorded them since this job was read
    # The calibration's positives under the pretrained embedding (a trained head brings its own):
    # detector-like views of each reference against the other references, computed once per job.
    # Their images are made in threads (:class:`_ReferenceViews`) while the references
    # themselves go through the trunk.
    views = _ReferenceViews(store, job.reference_keys, embedder.image_size) if _calibrates(job) else None
    try:
        refs = reference_embeddings(job, store, embedder)
        # Answers join the sets: a crop answered right is a reference of its own (from the job's own
        # crops, as the others are not), one answered wrong a "not this" image.
        marks = state.feedback(job.id)
        right = [k for k, ok in marks.items() if ok]
        right_keys, right_rows = answered_embeddings(job, store, state, embedder, right)
        negatives, negative_keys = negative_embeddings(
            job, store, state, embedder, [k for k in marks if k not in right]
        )
        if views is not None:
            # ``refs`` are the pretrained embeddings of the same images (every one was read above).
            made = views.pixels()
            if made is not None and len(refs) == len(job.reference_keys):
                view_pixels, group = made
                held_out = held_out_views(None, refs, embedder.features_of_pixels(view_pixels), group)
                job = state.update_job(job.id, reference_distances=held_out)
    finally:
        if views is not None:
            views.cancel()
    references = np.concatenate([refs, right_rows]) if len(right_rows) else refs
    reference_keys = (*([None] * len(refs)), *right_keys)
    return job, Scorer(job.id, embedder, references, negatives, settings, reference_keys, tuple(negative_keys))


def _calibrates(job: Job) -> bool:
    """Whether the job still needs its calibration's views: pretrained, at least two references, none recorded."""
    return job.model is None and not job.reference_distances and len(job.reference_keys) >= 2


class _ReferenceViews:
    """The calibration's augmented views of a job's references, as the trunk's input, made in a thread
    pool of their own: per reference, a thread reads and decodes it and draws its views' parameters
    (:func:`imgsift_siamese.train.view_steps`, from the reference's seed as before), then each view
    is cropped, recoloured and letterboxed in a thread of its own. The same pixels as
    ``reference_views`` and ``pixels`` one after the other, in the same order."""

    def __init__(self, store: ObjectStore, reference_keys: Sequence[str], size: int) -> None:
        self.per_reference = views_per_reference(len(reference_keys))
        self.size = size
        self.pool = read_pool(SET_READ_THREADS, "views")
        self.lock = threading.Lock()
        self.futures: list[Future[np.ndarray]] = []  # the views' pixels, once drawn
        self.cancelled = False
        self.references = [
            self.pool.submit(self._draw, store, key, TrainConfig.seed + i) for i, key in enumerate(reference_keys)
        ]

    def _draw(self, store: ObjectStore, key: str, seed: int) -> list[Future[np.ndarray]] | None:
        image = read_image_or_none(store, key)
        if image is None:
            return None
        steps = view_steps(image, self.per_reference, seed)
        with self.lock:  # not queued once the scorer is done with them
            if self.cancelled:
                return []
            made = [self.pool.submit(self._view, image, s) for s in steps]
            self.futures += made
        return made

    def _view(self, image: Image.Image, steps: ViewSteps) -> np.ndarray:
        return pixels(apply_view(image, steps), self.size)

    def pixels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Every view's pixels ``(r * v, size, size, 3)`` uint8, reference by reference, and the
        reference each comes from; None when a reference is missing or does not decode."""
        per_reference = [future.result() for future in self.references]
        if any(views is None for views in per_reference):
            return None
        arrays = [view.result() for views in per_reference for view in views or ()]
        return np.stack(arrays), np.repeat(np.arange(len(per_reference)), self.per_reference)

    def cancel(self) -> None:
        """Drop what has not started (the scorer failed, or is done with them)."""
        with self.lock:
            self.cancelled = True
            for reference in self.references:
                reference.cancel()
            for view in self.futures:
                view.cancel()


def compare_batch(
    job: Job,
    crop_keys: Sequence[str],
    store: ObjectStore,
    state: StateStore,
    embedder: Embedder,
    settings: SiameseSettings,
) -> list[Distance]:
    """Record each crop's distance to the job's references; returns the distances recorded by this call."""
    batch = list(dict.fromkeys(crop_keys))
    scored = state.distances_of(job.id, batch)
    pending = [key for key in batch if key not in scored]
    if not pending:
        return []
    # Named by the whole batch, so a redelivery of it, however many of its distances were
    # recorded before, finds the rows with one read.
    object_key = keys.crop_features_key(job.id, embedder.trunk_id, stored.digest(batch))
    found = _read_features(store, embedder, job.id, object_key)
    # The crops without stored rows are read and decoded from now on, while the job's scorer and
    # the crops' sources are read from the job state (a few round trips, and on a job's first
    # batch its references and calibration views through the trunk).
    absent = [key for key in pending if found is None or key not in found.keys]
    inputs = _prepare_ahead(absent, store, embedder, settings.decode_threads)
    try:
        job, scorer = job_scorer(job, store, state, embedder, settings)
        rows = trunk_features(
            job.id,
            object_key,
            found,
            pending,
            crop_sources(job.id, batch, state),
            store,
            embedder,
            settings.decode_threads,
            lambda key, problem: _note_skipped_crop(job.id, key, problem.detail, state),
            (absent, inputs),
        )
    finally:
        inputs.close()
    loaded = [key for key in pending if key in rows]
    recorded = scorer.record(state, loaded, np.stack([rows[k] for k in loaded])) if loaded else []
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


def score_stored_features(
    job: Job,
    crop_keys: Sequence[str],
    store: ObjectStore,
    state: StateStore,
    embedder: Embedder,
    settings: SiameseSettings,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Record the distance of each of ``crop_keys`` whose trunk features are stored; returns the others, in order.

    Lists the job's feature objects and reads them in a thread pool: for 100,000 crops, about
    3,000 reads and the head over 1,024 rows at a time, instead of 100,000 passes of the trunk.
    """
    todo = dict.fromkeys(crop_keys)
    prefix = keys.features_prefix(job.id, embedder.trunk_id) + "crops/"
    object_keys = [key for key in store.list(prefix) if key.endswith(".npz")]
    if not todo or not object_keys:
        return list(todo)
    job, scorer = job_scorer(job, store, state, embedder, settings)
    read = partial(_read_features, store, embedder, job.id)
    chunk_keys: list[str] = []
    chunk_rows: list[np.ndarray] = []

    def flush() -> None:
        scored = state.distances_of(job.id, chunk_keys)  # a compare task may have scored one meanwhile
        fresh = [i for i, key in enumerate(chunk_keys) if key not in scored]
        if fresh:
            scorer.record(state, [chunk_keys[i] for i in fresh], np.stack([chunk_rows[i] for i in fresh]))
        if progress:
            progress(len(chunk_keys))
        chunk_keys.clear()
        chunk_rows.clear()

    with closing(prefetch(read, object_keys, settings.decode_threads)) as objects:
        for found in objects:
            wanted = [i for i, key in enumerate(found.keys) if key in todo] if found is not None else []
            if found is None or not wanted:
                continue
            sources = crop_sources(job.id, [found.keys[i] for i in wanted], state)
            for i in wanted:
                key = found.keys[i]
                if key in todo and sources.get(key) == found.sources[i]:
                    del todo[key]
                    chunk_keys.append(key)
                    chunk_rows.append(found.rows[i])
            if len(chunk_keys) >= RESCORE_CHUNK:
                flush()
    if chunk_keys:
        flush()
    return list(todo)


def _read_features(store: ObjectStore, embedder: Embedder, job_id: str, key: str) -> FeatureRows | None:
    return stored.read(store, key, trunk_id=embedder.trunk_id, dim=embedder.feature_dim, job_id=job_id)


# ============================================================================ trunk features


def crop_sources(job_id: str, crop_keys: Sequence[str], state: StateStore) -> dict[str, str]:
    """What each crop was cut from (its image and padded box), as recorded by the detector.

    A crop key names an image and a rank, not a box: a job re-detected with another target
    cuts another box under the same key. Stored rows are used only where their source matches;
    a key with no recorded crop has no source, so its rows are never reused.
    """
    return {
        crop.key: short_hash(crop.image_key, *crop.padded_box, crop.whole_image)
        for crop in state.get_crops(job_id, crop_keys)
    }


def trunk_features(
    job_id: str,
    object_key: str,
    rows: FeatureRows | None,
    wanted: Sequence[str],
    sources: Mapping[str, str],
    store: ObjectStore,
    embedder: Embedder,
    threads: int,
    on_unreadable: OnUnreadable,
    started: tuple[Sequence[str], Prefetched[np.ndarray | Unreadable]] | None = None,
) -> dict[str, np.ndarray]:
    """Trunk feature rows of the ``wanted`` images: the ``rows`` stored at ``object_key`` (read by
    the caller) where stored from the same source, the rest computed and stored there with them.
    Unreadable images get no row. ``started``: the trunk inputs of some images already being
    prepared (their keys, in order), used when they are the images to compute (as they are unless a
    stored row's source moved)."""
    kept: dict[str, tuple[str, np.ndarray]] = {}
    if rows is not None:
        for key, source, row in zip(rows.keys, rows.sources, rows.rows, strict=True):
            if sources.get(key) == source:  # still cut from the same place; other keys are not ours
                kept[key] = (source, row)
    found = {key: kept[key][1] for key in wanted if key in kept}
    missing = [key for key in wanted if key not in found]
    if not missing:
        return found
    inputs = started[1] if started is not None and list(started[0]) == missing else None
    computed = compute_features(missing, store, embedder, threads, on_unreadable, inputs)
    found.update(computed)
    new = {key: (sources[key], row) for key, row in computed.items() if key in sources}
    if new:
        # Rewritten whole with the rows it held: a reader sees the old object or the new one.
        kept.update(new)
        features = FeatureRows(list(kept), [s for s, _ in kept.values()], np.stack([r for _, r in kept.values()]))
        stored.write(store, object_key, embedder.trunk_id, features)
        log.info(
            "stored trunk features",
            extra={"job_id": job_id, "stage": Stage.SIAMESE.value, "key": object_key, "rows": len(features)},
        )
    return found


def _prepare_ahead(
    image_keys: Sequence[str], store: ObjectStore, embedder: Embedder, threads: int
) -> Prefetched[np.ndarray | Unreadable]:
    """The trunk inputs of ``image_keys``, read, decoded and letterboxed in ``threads`` threads, two
    batches ahead of the model, starting now."""
    read = partial(_prepared, store, embedder.image_size)
    return Prefetched(read, image_keys, threads, ahead=2 * embedder.batch_size)


def compute_features(
    image_keys: Sequence[str],
    store: ObjectStore,
    embedder: Embedder,
    threads: int,
    on_unreadable: OnUnreadable,
    inputs: Prefetched[np.ndarray | Unreadable] | None = None,
) -> dict[str, np.ndarray]:
    """Trunk features of stored images, rounded as stored. A thread pool reads, decodes and
    letterboxes the images a batch ahead of the model (Pillow releases the GIL, and so does the
    trunk's runner), so the next batch is ready when a forward pass ends. Up to a batch of
    images go through the trunk in two passes (:func:`pipeline_step`), so the pool prepares the
    second while the first runs instead of the trunk waiting for the whole batch. ``inputs``: the
    images' inputs, in order, when their preparation was started already (:class:`Prefetched`)."""
    out: dict[str, np.ndarray] = {}
    batch_keys: list[str] = []
    batch_inputs: list[np.ndarray] = []
    step = pipeline_step(len(image_keys), embedder.batch_size)

    def forward() -> None:
        rows = as_stored(embedder.features_of_pixels(np.stack(batch_inputs)))
        out.update(zip(batch_keys, rows, strict=True))
        batch_keys.clear()
        batch_inputs.clear()

    if inputs is None:
        inputs = _prepare_ahead(image_keys, store, embedder, threads)
    with closing(inputs):
        for key, prepared in zip(image_keys, inputs, strict=True):
            if isinstance(prepared, Unreadable):
                on_unreadable(key, prepared)
                continue
            batch_keys.append(key)
            batch_inputs.append(prepared)
            if len(batch_keys) == step:
                forward()
    if batch_keys:
        forward()
    return out


PIPELINE_MIN = 8  # images per forward pass below which a batch is not cut in two


def pipeline_step(images: int, batch_size: int) -> int:
    """Images per forward pass for ``images`` images: the batch size when there are more, else the
    largest power of two up to half of them (a few batch sizes: ``imgsift_common.batching``), not
    below PIPELINE_MIN. 32 images run as 16 and 16; 20 as 8, 8 and 4; 64 as 32 and 32."""
    if images > batch_size:
        return batch_size
    half = images // 2
    if half < PIPELINE_MIN:
        return batch_size
    return min(batch_size, 1 << (half.bit_length() - 1))


def _prepared(store: ObjectStore, size: int, key: str) -> np.ndarray | Unreadable:
    # A lost or broken image is reported, not raised, so it cannot sink the rest of its batch.
    # Any other store error propagates so the task retries a transient one; the read stays
    # outside the decode guard because a socket error is an OSError too.
    try:
        data = store.get(key)
    except ObjectNotFound:
        return Unreadable(missing=True, detail="is missing from the object store")
    try:
        return prepare(data, size)
    except DECODE_ERRORS as exc:
        return Unreadable(missing=False, detail=f"cannot be decoded ({exc})")


def read_image_or_none(store: ObjectStore, key: str) -> Image.Image | None:
    """An image from the store, or None when it is missing or does not decode."""
    try:
        return decode_image(store.get(key))
    except (ObjectNotFound, *DECODE_ERRORS):
        return None


def _note_skipped_crop(job_id: str, key: str, reason: str, state: StateStore) -> None:
    # A lost or broken crop must not sink the rest of its batch: it is skipped and the job
    # carries a note.
    log.warning("crop skipped", extra={"job_id": job_id, "stage": Stage.SIAMESE.value, "key": key, "reason": reason})
    state.add_note(job_id, f"siamese: crop {key} {reason}; it has no distance")
    state.record_compare_failure(job_id, key)  # counted, so the job can still complete
