"""``imgsift verify``: the Siamese stage alone, over a folder of images a user already has.

Cleaning an existing dataset: every image in ``--images`` is one "crop" (no detector runs),
scored by its distance to the references (raised where a ``--negatives`` image is as near),
optionally with a head fine-tuned first (``--train``). It is an embedded job like ``imgsift
collect``'s, in ``OUT/.imgsift/``, run through the same stage functions as the workers: the
files are checked and stored as the crawler stores a download (``store_image``), cut into
whole-image crops by the detect stage without a model, compared, trained and re-scored by the
Siamese stage's own functions, and decided by the job's threshold rule
(:mod:`imgsift_common.threshold`). So ``imgsift questions`` and ``imgsift answer`` work on its
folder as on a collect folder. The output: ``manifest.jsonl`` (``crop`` names the input file
relative to ``--images``), ``accepted/`` and ``rejected/`` holding links to (or copies of) the
inputs, and ``verify.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from imgsift.embedded import (
    JOB_ID,
    EmbeddedConfig,
    EmbeddedError,
    EmbeddedRunner,
    Progress,
    RunSummary,
    local_storage,
    settle_threshold,
    train_folder,
    write_outputs,
)
from imgsift_common.messages import Candidate, DownloadOutcome, JobSpec, Limits, SourceKind, SourceSpec
from imgsift_common.state import DownloadItem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAX_FILES = 1_000_000


class VerifyError(EmbeddedError):
    """Input that cannot be verified (no references, no images); says what to fix."""


@dataclass
class VerifyResult:
    images: int
    unreadable: dict[str, str]  # path -> why it was refused
    duplicates: list[str]
    summary: RunSummary
    trained: bool


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
    backbone: str = "efficientnet_lite0",
    weights: Path | None = None,
    device: str = "cpu",
    export: str = "none",
    export_precision: str = "f32",
    epochs: int = 60,
    margin: float = 0.05,
    progress: Progress | None = None,
) -> VerifyResult:
    from imgsift_crawler.settings import CrawlerSettings
    from imgsift_detector.settings import DetectorSettings
    from imgsift_siamese.settings import SiameseSettings

    files = image_files(images)
    if not files:
        raise VerifyError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images}")
    if len(files) > MAX_FILES:
        raise VerifyError(f"{len(files)} files in {images}; verify takes {MAX_FILES} at most per folder")
    root = images.resolve() if images.is_dir() else images.resolve().parent
    spec = JobSpec(
        sources=[SourceSpec(kind=SourceKind.FILES, path=str(root))],
        target="any",
        threshold=threshold if threshold is not None else 2.0,
        limits=Limits(max_images=MAX_FILES, per_source=MAX_FILES),
    )
    local = local_storage(out / ".imgsift" / "objects")
    try:
        config = EmbeddedConfig(
            out=out,
            spec=spec,
            refs=refs,
            crawler=CrawlerSettings(**local),
            detector=DetectorSettings(**local),
            siamese=SiameseSettings(
                **local,
                backbone=backbone,
                weights=weights,
                device=device,
                export=export,
                export_precision=export_precision,
                negative_margin=margin,
                negative_bank=negative_bank,
                train_epochs=epochs,
            ),
            negatives=negatives,
            threshold=threshold,
            whole_images=True,
        )
    except ValidationError as exc:  # a bad option value: say which and why
        err = exc.errors()[0]
        raise VerifyError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    progress = progress or Progress()
    runner = EmbeddedRunner(config, progress)
    try:
        job = runner.prepare()
        unreadable, duplicates = _ingest(runner, files, root, config.crawler, progress)
        if not runner.state.image_keys(JOB_ID):
            raise VerifyError(f"no readable images in {images}")
        runner.detect_and_compare()
        job = runner.state.get_job(JOB_ID) or job
        if train:
            job, _ = train_folder(runner.state, runner.store, job, config.siamese, progress)
        summary = write_outputs(out, runner.state, runner.store, settle_threshold(runner.state, job, threshold))
    finally:
        runner.close()
    report = {
        "threshold": summary.threshold,
        "suggested_threshold": summary.suggested,
        "basis": summary.suggested_basis,
        "needs_answers": summary.needs_answers,
        "answers": summary.answers,
        "estimated_precision": summary.precision,
        "estimated_recall": summary.recall,
        "estimated_precision_interval": summary.precision_interval,
        "estimated_recall_interval": summary.recall_interval,
        "trained": train,
        "images": summary.compared,
        "accepted": summary.accepted,
        "unreadable": sorted(unreadable),
        "unreadable_reasons": unreadable,
        "duplicates": duplicates,
    }
    (out / "verify.json").write_text(json.dumps(report, indent=2))
    return VerifyResult(summary.compared, unreadable, duplicates, summary, train)


def _ingest(
    runner: EmbeddedRunner, files: list[Path], root: Path, settings: object, progress: Progress
) -> tuple[dict[str, str], list[str]]:
    """Check and store the files not stored before, as the crawler stores downloads; the files
    that are no image and those whose bytes another file already has."""
    from imgsift_crawler.pipeline import settle, store_image

    state, store = runner.state, runner.store
    job = state.get_job(JOB_ID)
    assert job is not None
    tick = progress.stage("read", len(files))
    for path in files:
        url = path.resolve().as_uri()
        if url not in state.url_records(JOB_ID, [url]):
            try:
                rel = str(path.resolve().relative_to(root))
            except ValueError:
                rel = path.name
            candidate = Candidate(image_url=url, source=SourceKind.FILES, title=rel)
            record, image = store_image(job, candidate, path.read_bytes(), store, settings)  # type: ignore[arg-type]
            final = state.record_downloads(JOB_ID, [DownloadItem(record, image)], MAX_FILES)[0]
            if image is not None:
                settle(job, state, store, image, final)
        tick(1)
    unreadable: dict[str, str] = {}
    duplicates = []
    records = state.url_records(JOB_ID, [path.resolve().as_uri() for path in files])
    for path in files:
        known = records.get(path.resolve().as_uri())
        if known is not None and known.outcome is DownloadOutcome.FAILED:
            why = known.reason.value if known.reason else "failed"
            unreadable[str(path)] = f"{why}: {known.detail}" if known.detail else why
        elif known is not None and known.outcome is DownloadOutcome.DUPLICATE:
            duplicates.append(str(path))
    return unreadable, duplicates
