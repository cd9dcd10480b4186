"""``imgsift verify``: the Siamese stage alone, over a folder of images a user already has.

Cleaning an existing dataset: every image in ``--images`` is one "crop" (no detector runs),
scored by its distance to the references (raised where a ``--negatives`` image is as near),
optionally with a head fine-tuned first (``--train``: the references and their views against
``--negatives``, a ``--negative-bank`` and the folder's own far quarter). The output has the
layout of ``imgsift collect``: ``manifest.jsonl`` (``crop`` names the input file), and
``accepted/`` and ``rejected/`` holding links to (or copies of) the inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgsift_common.calibration import Calibration, calibrate, estimate

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class VerifyError(Exception):
    """Input that cannot be verified (no references, no images); says what to fix."""


@dataclass
class VerifyResult:
    images: int
    unreadable: list[str]
    accepted: int
    threshold: float
    suggested: Calibration
    trained: bool
    precision: float | None
    recall: float | None


def image_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def verify(
    refs: Path,
    images: Path,
    out: Path,
    *,
    threshold: float | None,
    train: bool,
    negatives: Path | None,
    negative_bank: Path | None,
    backbone: str = "mobilenet_v2",
    weights: Path | None = None,
    device: str = "cpu",
    epochs: int = 60,
    margin: float = 0.05,
) -> VerifyResult:
    from PIL import Image

    from imgsift_siamese.compare import decided_distance
    from imgsift_siamese.distance import reference_distance
    from imgsift_siamese.embed import get_embedder
    from imgsift_siamese.preprocess import DECODE_ERRORS, to_rgb
    from imgsift_siamese.settings import SiameseSettings
    from imgsift_siamese.train import (
        TrainConfig,
        TrainingSet,
        embed_features,
        fit,
        held_out_views,
        pooled_features,
        reference_views,
    )

    def load(paths: list[Path]) -> tuple[list[Path], list[Image.Image], list[str]]:
        ok, pixels, bad = [], [], []
        for path in paths:
            try:
                with Image.open(path) as im:
                    im.load()
                    pixels.append(to_rgb(im))
                ok.append(path)
            except DECODE_ERRORS:
                bad.append(str(path))
        return ok, pixels, bad

    _, ref_images, bad_refs = load(image_files(refs))
    if bad_refs:
        raise VerifyError(f"reference images that do not decode: {', '.join(bad_refs)}")
    if not ref_images:
        raise VerifyError(f"no reference images in {refs}")
    paths, pixels, unreadable = load(image_files(images))
    if not paths:
        raise VerifyError(f"no readable images in {images}")
    not_this = load(image_files(negatives))[1] if negatives else []
    bank = load(image_files(negative_bank))[1] if negative_bank else []

    settings = SiameseSettings(storage="local", backbone=backbone, weights=weights, device=device)  # type: ignore[arg-type]
    network = get_embedder(settings).network
    ref_rows = pooled_features(network, ref_images)
    rows = pooled_features(network, pixels)
    neg_rows = pooled_features(network, not_this) if not_this else None

    head = None
    pre_refs = embed_features(None, ref_rows)
    config = TrainConfig(epochs=epochs)
    # Augmented (detector-like) views of the references: the held-out positives the suggested
    # threshold is calibrated from, and the positives training learns from.
    views, view_group = reference_views(ref_images, config.augmentations, config.seed)
    view_rows = pooled_features(network, views) if len(ref_images) >= 2 else ref_rows[:0]
    positives = held_out_views(None, ref_rows, view_rows, view_group)
    if train:
        if len(ref_images) < 2:
            raise VerifyError("--train needs at least two reference images")
        pretrained = reference_distance(embed_features(None, rows), pre_refs)
        far = rows[pretrained >= np.quantile(pretrained, 0.75)] if len(rows) >= 20 else rows[:0]
        parts = [(pooled_features(network, bank), 1.0)] if bank else []
        parts += [(far, 1.0)] if len(far) else []
        parts += [(neg_rows, config.hard_weight)] if neg_rows is not None else []
        if not parts:
            raise VerifyError("--train needs negatives: --negatives, --negative-bank, or 20 or more images")
        data = TrainingSet(
            ref_rows,
            view_rows,
            view_group,
            np.concatenate([p for p, _ in parts]),
            np.concatenate([np.full(len(p), w) for p, w in parts]),
        )
        trained = fit(data, config)
        head, positives = trained.head, trained.held_out
    embedded = embed_features(head, rows)
    to_not_this = reference_distance(embedded, embed_features(head, neg_rows)) if neg_rows is not None else None
    distances = decided_distance(reference_distance(embedded, embed_features(head, ref_rows)), to_not_this, margin)
    values = [float(d) for d in distances]
    suggested = calibrate(positives, values)
    chosen = threshold if threshold is not None else suggested.suggested
    if chosen is None:
        raise VerifyError("give --threshold: one reference image is too few to suggest one")
    at = estimate(chosen, positives, values)
    accepted = _write(out, images, paths, values, chosen)
    summary = {
        "threshold": chosen,
        "suggested_threshold": suggested.suggested,
        "basis": suggested.basis,
        "estimated_precision": at.precision,
        "estimated_recall": at.recall,
        "trained": train,
        "images": len(paths),
        "accepted": accepted,
        "unreadable": unreadable,
    }
    (out / "verify.json").write_text(json.dumps(summary, indent=2))
    return VerifyResult(len(paths), unreadable, accepted, chosen, suggested, train, at.precision, at.recall)


def _write(out: Path, root: Path, paths: list[Path], distances: list[float], threshold: float) -> int:
    for name in ("accepted", "rejected"):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    base = root if root.is_dir() else root.parent
    accepted = 0
    tmp = out / "manifest.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as manifest:
        for path, distance in sorted(zip(paths, distances, strict=True), key=lambda pd: pd[1]):
            ok = distance <= threshold
            accepted += ok
            rel = path.relative_to(base)
            dst = out / ("accepted" if ok else "rejected") / "__".join(rel.parts)
            try:
                os.link(path, dst)
            except OSError:
                shutil.copyfile(path, dst)
            row = {"crop": str(rel), "output": str(dst.relative_to(out)), "distance": round(distance, 6)}
            manifest.write(json.dumps({**row, "threshold": threshold, "accepted": ok}) + "\n")
    tmp.replace(out / "manifest.jsonl")
    return accepted
