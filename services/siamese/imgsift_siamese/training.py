"""Training a job's Siamese head, and re-scoring the job with it: the stage behind ``siamese.train``.

Free of Celery, so the worker's task and ``imgsift train`` run the same code.

- positives: the job's references and augmented views of them, plus crops the user answered right;
- negatives: the generic negative bank (``IMGSIFT_SIAMESE_NEGATIVE_BANK``, a folder of images
  of other things), the job's own crops that the current network puts in the far quarter of
  its distances, and, counted ``hard_weight`` times, the "not this" references and the crops
  the user answered wrong (``train.training_set``: the same rule ``imgsift verify`` and the
  quality bench use).

Every answered crop also gets a held-out distance from a fold head that did not see it
(``SiameseModel.held_out_answers``): the threshold is calibrated from those, since the final
head has learnt the answered crops themselves.

The head is stored as ``jobs/{job}/models/siamese-head-v{n}.pt``; the job records it (and the
held-out distances calibration needs), and every crop is scored again with it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import Job, SiameseModel, Stage, utcnow
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectStore
from imgsift_siamese.compare import compare_batch, read_image_or_none, score_stored_features
from imgsift_siamese.embed import get_embedder, job_embedder
from imgsift_siamese.preprocess import DECODE_ERRORS, decode_image
from imgsift_siamese.settings import SiameseSettings
from imgsift_siamese.train import (
    MAX_BANK,
    TrainConfig,
    far_crops,
    fit,
    pooled_features,
    reference_views,
    training_set,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class TrainingError(RuntimeError):
    """The job cannot be trained as it stands (too few references, no negatives); says what to do."""


def train_job(job: Job, store: ObjectStore, state: StateStore, settings: SiameseSettings, version: int) -> SiameseModel:
    """Train the job's head on its references, negatives and answers; store it; return what the job records."""
    if len(job.reference_keys) < 2:
        raise TrainingError(f"job {job.id} has {len(job.reference_keys)} reference image(s); training needs 2 or more")
    network = get_embedder(settings).network
    size, batch = settings.image_size, settings.batch_size
    config = TrainConfig(epochs=settings.train_epochs)

    def rows(images: list[Image.Image]) -> np.ndarray | None:
        return pooled_features(network, images, image_size=size, batch_size=batch) if images else None

    read = [read_image_or_none(store, k) for k in job.reference_keys]
    refs = [im for im in read if im is not None]
    if len(refs) < 2:
        raise TrainingError(f"job {job.id}: fewer than 2 of its reference images could be read")
    views, group = reference_views(refs, config.augmentations, config.seed)
    marks = state.feedback(job.id)
    answered = [(k, im, ok) for k, ok in sorted(marks.items()) if (im := read_image_or_none(store, k)) is not None]
    not_this = [im for k in job.negative_keys if (im := read_image_or_none(store, k)) is not None]
    far = _crop_images(store, far_crops([k for k, _ in state.distances(job.id)]))
    bank = _bank_features(settings.negative_bank, settings) if settings.negative_bank is not None else None
    try:
        data = training_set(
            rows(refs),  # type: ignore[arg-type]
            rows(views),  # type: ignore[arg-type]
            group,
            bank=bank,
            far=rows(far),
            not_this=rows(not_this),
            answers=rows([im for _, im, _ in answered]),
            answer_right=np.array([ok for _, _, ok in answered], dtype=bool),
            config=config,
        )
    except ValueError:
        raise TrainingError(
            f"job {job.id} has nothing to contrast its references with: set IMGSIFT_SIAMESE_NEGATIVE_BANK to a "
            "folder of images of other things, give 'not this' images, answer crops, or train after the job has crops"
        ) from None
    trained = fit(data, config, method=settings.distance, k=settings.k, margin=settings.negative_margin)
    right = sum(ok for _, _, ok in answered)
    trained.stats.update(
        marked_right=float(right), marked_wrong=float(len(answered) - right), not_this=float(len(not_this))
    )
    key = keys.model_key(job.id, version)
    store.put(key, trained.to_bytes(), "application/octet-stream")
    log.info("trained", extra={"job_id": job.id, "stage": Stage.SIAMESE.value, "key": key, **trained.stats})
    held_out_answers = {k: d for (k, _, _), d in zip(answered, trained.held_out_answers, strict=True) if np.isfinite(d)}
    return SiameseModel(
        version=version,
        key=key,
        trained_at=utcnow(),
        held_out=trained.held_out,
        held_out_answers=held_out_answers,
        stats=trained.stats,
    )


def rescore(
    job: Job,
    store: ObjectStore,
    state: StateStore,
    settings: SiameseSettings,
    progress: Callable[[int], None] | None = None,
    *,
    model: SiameseModel | None = None,
) -> int:
    """Forget every distance of the job and score all its crops again with its current network,
    or with ``model``, a head just trained, which is put in place after the old distances are
    gone: no reader sees the new version beside the old head's distances (a status that looks
    re-scored while it is not yet).

    The trunk is frozen, so crops whose trunk features are stored are scored from them: the
    head and one matrix product. Only crops without stored features run through the trunk
    (and their features are stored then).
    """
    state.reset_distances(job.id)
    if model is not None:
        job = state.update_job(job.id, model=model)
    embedder = job_embedder(job, store, settings)
    crop_keys = state.crop_keys(job.id)
    rest = score_stored_features(job, crop_keys, store, state, embedder, settings, progress)
    size = max(1, settings.batch_size)
    for start in range(0, len(rest), size):
        compare_batch(job, rest[start : start + size], store, state, embedder, settings)
        if progress:
            progress(min(size, len(rest) - start))
    return len(crop_keys)


def _crop_images(store: ObjectStore, crop_keys: list[str]) -> list[Image.Image]:
    return [im for k in crop_keys if (im := read_image_or_none(store, k)) is not None]


def _bank_features(folder: Path, settings: SiameseSettings) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_BANK]
    if not files:
        raise TrainingError(f"the negative bank {folder} holds no images")
    digest = hashlib.sha256(
        f"{settings.backbone}:{settings.image_size}\n".encode()
        + "\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()
    ).hexdigest()
    if digest not in _bank_cache:  # the bank is the same for every job: its features once per process
        images = []
        for path in files:
            try:
                images.append(decode_image(path.read_bytes(), settings.image_size))  # as crops are
            except DECODE_ERRORS:
                log.warning("negative bank image skipped", extra={"path": str(path)})
        network = get_embedder(settings).network
        _bank_cache.clear()
        _bank_cache[digest] = pooled_features(
            network, images, image_size=settings.image_size, batch_size=settings.batch_size
        )
    return _bank_cache[digest]


_bank_cache: dict[str, np.ndarray] = {}
