"""The embedded mode: every stage in one process, a local folder instead of MinIO, SQLite instead of Redis.

It calls the same stage functions the Celery workers call. The output folder keeps the
state (``.imgsift/``), so a second run over it does only what is missing: sources already
crawled, images already detected and crops already compared are not done again, and a new
threshold re-decides from stored distances alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsift_common import keys
from imgsift_common.calibration import for_job
from imgsift_common.exports import manifest_row
from imgsift_common.messages import Job, JobSpec, JobState, SiameseModel
from imgsift_common.progress import finish_if_complete
from imgsift_common.state import SqliteStateStore, discovery_reason
from imgsift_common.storage import LocalStore

log = logging.getLogger(__name__)

JOB_ID = "local"
STATE_DIR = ".imgsift"
REFERENCE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class Progress:
    """What the runner tells its caller; the CLI draws bars, tests record calls."""

    def stage(self, name: str, total: int | None) -> Callable[[int], None]:
        """A callback that advances stage ``name``; ``total`` adds to what the stage expects."""
        return lambda n: None

    def close(self) -> None:
        pass


@dataclass
class EmbeddedConfig:
    out: Path
    spec: JobSpec
    refs: Path
    crawler: Any  # CrawlerSettings
    detector: Any  # DetectorSettings
    siamese: Any  # SiameseSettings
    negatives: Path | None = None  # "not this" images
    auto_threshold: bool = False  # decide at the suggested threshold instead of spec.threshold


@dataclass
class RunSummary:
    downloaded: int
    failed: int
    duplicates: int
    crops: int
    compared: int
    accepted: int
    rejected: int
    threshold: float
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    discovery: Any = None  # why discovery stopped (DiscoveryReason)
    notes: list[str] = field(default_factory=list)
    work_done: dict[str, int] = field(default_factory=dict)  # items each stage handled in this run
    suggested: float | None = None  # the suggested threshold, when the job has one
    suggested_basis: str = ""
    precision: float | None = None  # estimated at ``threshold``
    recall: float | None = None


class EmbeddedError(Exception):
    """A problem with the user's input that the CLI reports without a traceback."""


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def detector_fingerprint(settings: Any, target: str) -> str:
    """What detections depend on; when it changes, detections are redone."""
    fields = ("weights", "conf", "iou", "imgsz", "pad", "min_box_size")
    return _fingerprint({"target": target, **{f: getattr(settings, f) for f in fields}})


def scorer_fingerprint(settings: Any, reference_keys: list[str]) -> str:
    """What distances depend on; when it changes, distances are recomputed."""
    fields = ("backbone", "weights", "image_size", "distance", "k")
    return _fingerprint({"refs": reference_keys, **{f: getattr(settings, f) for f in fields}})


def load_references(refs: Path, store: LocalStore, negative: bool = False) -> list[str]:
    """Store the reference images of ``refs`` (a folder or one file); refuse what does not decode."""
    from imgsift_crawler.validate import ImageRejected, inspect_image

    paths = [refs] if refs.is_file() else sorted(p for p in refs.rglob("*") if p.suffix.lower() in REFERENCE_SUFFIXES)
    if not paths:
        raise EmbeddedError(f"no reference images (jpg, png, webp, gif, bmp, tif) in {refs}")
    found = set()
    for path in paths:
        data = path.read_bytes()
        try:
            info = inspect_image(data, max_pixels=100_000_000, min_side=8)
        except ImageRejected as exc:
            raise EmbeddedError(f"reference {path} is not usable: {exc.detail}") from None
        make_key = keys.negative_key if negative else keys.reference_key
        key = make_key(JOB_ID, info.sha256, info.format)
        if not store.exists(key):
            store.put(key, data)
        found.add(key)
    return sorted(found)


class EmbeddedRunner:
    def __init__(self, config: EmbeddedConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or Progress()
        self.state_dir = config.out / STATE_DIR
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = LocalStore(self.state_dir / "objects")
        self.state = SqliteStateStore(self.state_dir / "state.sqlite")

    def close(self) -> None:
        self.state.close()

    # ------------------------------------------------------------------ the job
    def prepare(self) -> Job:
        """Create or update the job in this output folder; drop results its new settings invalidate."""
        reference_keys = load_references(self.config.refs, self.store)
        negative_keys = (
            load_references(self.config.negatives, self.store, negative=True) if self.config.negatives else []
        )
        fingerprints_path = self.state_dir / "fingerprints.json"
        old = json.loads(fingerprints_path.read_text()) if fingerprints_path.exists() else {}
        new = {
            "detector": detector_fingerprint(self.config.detector, self.config.spec.target),
            "scorer": scorer_fingerprint(self.config.siamese, reference_keys + negative_keys),
        }
        job = self.state.get_job(JOB_ID)
        if job is None:
            job = Job(
                id=JOB_ID,
                spec=self.config.spec,
                reference_keys=reference_keys,
                negative_keys=negative_keys,
                state=JobState.RUNNING,
            )
            self.state.create_job(job)
        else:
            if old.get("detector") != new["detector"]:
                self.state.reset_detections(JOB_ID)
                job = job.model_copy(update={"detect_mode": None})
            changes: dict[str, Any] = {}
            if old.get("scorer") != new["scorer"]:
                # New references or backbone: a head trained on the old ones no longer applies.
                self.state.reset_distances(JOB_ID)
                changes = {"model": None, "reference_distances": []}
            job = job.model_copy(
                update={
                    "spec": self.config.spec,
                    "reference_keys": reference_keys,
                    "negative_keys": negative_keys,
                    "state": JobState.RUNNING,
                    **changes,
                }
            )
            self.state.save_job(job)
        fingerprints_path.write_text(json.dumps(new))
        siamese = self.config.siamese
        saved = {"backbone": siamese.backbone, "weights": str(siamese.weights) if siamese.weights else None}
        (self.state_dir / "siamese.json").write_text(json.dumps(saved))
        return job

    def run(self) -> RunSummary:
        """Discovery steps, each followed by downloads, detection and comparison of what it found.

        Running detection and comparison after every step is what lets "give me N" stop as soon
        as enough crops are accepted.
        """
        from imgsift_crawler import pipeline
        from imgsift_crawler.fetch import Fetcher

        job = self.prepare()
        done = {"downloaded": 0, "detected": 0, "compared": 0}
        # One process handles every URL it leases before the next step, so a lease needs no
        # time: a URL left without an outcome by an interrupted run is simply leased again.
        crawler = self.config.crawler.model_copy(update={"lease_seconds": 0.0})
        download_bar = self.progress.stage("download", None)
        with Fetcher(crawler) as fetcher:
            while True:
                step = pipeline.crawl_step(job, self.state, fetcher, crawler)
                for batch in step.batches:
                    pipeline.download_batch(job, batch, self.store, self.state, crawler, fetcher)
                    done["downloaded"] += len(batch)
                    download_bar(len(batch))
                job = self.state.get_job(JOB_ID) or job
                done["detected"] += self._detect(job)
                job = self.state.get_job(JOB_ID) or job
                done["compared"] += self._compare(job)
                if step.finished:
                    break
        finish_if_complete(self.state, JOB_ID)
        job = self.state.get_job(JOB_ID) or job
        threshold = job.spec.threshold
        if self.config.auto_threshold:
            suggested = for_job(job, self.state).calibration.suggested
            if suggested is not None:
                threshold = suggested
                job = self.state.update_job(JOB_ID, spec=job.spec.model_copy(update={"threshold": threshold}))
        summary = self.write_outputs(threshold)
        summary.work_done = done
        summary.notes = self.state.notes(JOB_ID)
        summary.discovery = discovery_reason(self.state.flags(JOB_ID))
        return summary

    def _detect(self, job: Job) -> int:
        todo = [k for k in self.state.image_keys(JOB_ID) if not self.state.is_detected(JOB_ID, k)]
        if not todo:
            return 0  # no model is loaded when there is nothing to detect
        from imgsift_detector.detect import detect_batch
        from imgsift_detector.model import WeightsError, detector_from_settings

        settings = self.config.detector
        try:
            detector = detector_from_settings(settings)
        except WeightsError as exc:
            raise EmbeddedError(str(exc)) from None
        tick = self.progress.stage("detect", len(todo))
        for chunk in _chunks(todo, settings.batch_size):
            detect_batch(job, chunk, self.store, self.state, detector, settings)
            job = self.state.get_job(JOB_ID) or job
            tick(len(chunk))
        return len(todo)

    def _compare(self, job: Job) -> int:
        todo = [k for k in self.state.crop_keys(JOB_ID) if not self.state.has_distance(JOB_ID, k)]
        if not todo:
            return 0
        from imgsift_siamese.backbone import WeightsError
        from imgsift_siamese.compare import ReferenceImagesError, compare_batch
        from imgsift_siamese.embed import job_embedder

        settings = self.config.siamese
        try:
            embedder = job_embedder(job, self.store, settings)
        except WeightsError as exc:
            raise EmbeddedError(str(exc)) from None
        tick = self.progress.stage("compare", len(todo))
        for chunk in _chunks(todo, max(settings.batch_size, 1)):
            try:
                compare_batch(job, chunk, self.store, self.state, embedder, settings)
            except ReferenceImagesError as exc:
                raise EmbeddedError(str(exc)) from None
            tick(len(chunk))
        return len(todo)

    # ------------------------------------------------------------------ outputs
    def write_outputs(self, threshold: float) -> RunSummary:
        """accepted/, rejected/ and manifest.jsonl for ``threshold``, from stored distances only."""
        return write_outputs(self.config.out, self.state, self.store, threshold)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def write_outputs(out: Path, state: SqliteStateStore, store: LocalStore, threshold: float) -> RunSummary:
    from imgsift_common.state import Counter

    _fresh_dirs(out, ("accepted", "rejected"))
    accepted = rejected = 0
    tmp_manifest = out / "manifest.jsonl.tmp"
    with tmp_manifest.open("w", encoding="utf-8") as manifest:
        distances = state.distances(JOB_ID)
        crops = {c.key: c for c in state.get_crops(JOB_ID, [k for k, _ in distances])}
        for crop_key, distance in distances:
            crop = crops.get(crop_key)
            if crop is None:
                continue
            ok = distance <= threshold
            accepted += ok
            rejected += not ok
            rel = f"{'accepted' if ok else 'rejected'}/{crop.crop_id}.jpg"
            _link_or_copy(store.path(crop.key), out / rel)
            image = state.get_image(JOB_ID, crop.image_key)
            manifest.write(json.dumps({"crop": rel, **manifest_row(crop, image, distance, threshold)}) + "\n")
    tmp_manifest.replace(out / "manifest.jsonl")
    c = state.counters(JOB_ID)
    job = state.get_job(JOB_ID)
    found = for_job(job, state, threshold) if job else None
    return RunSummary(
        suggested=found.calibration.suggested if found else None,
        suggested_basis=found.calibration.basis if found else "",
        precision=found.at_threshold.precision if found else None,
        recall=found.at_threshold.recall if found else None,
        downloaded=c.get(Counter.DOWNLOADED, 0),
        failed=c.get(Counter.FAILED, 0),
        duplicates=c.get(Counter.DUPLICATES, 0),
        crops=c.get(Counter.CROPS, 0),
        compared=c.get(Counter.COMPARED, 0),
        accepted=accepted,
        rejected=rejected,
        threshold=threshold,
        failed_by_reason={k.split(":", 1)[1]: v for k, v in sorted(c.items()) if ":" in k},
    )


def _fresh_dirs(out: Path, names: tuple[str, ...]) -> None:
    """Empty the output folders: they are rebuilt from the stored distances on every run."""
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        target.mkdir(parents=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def train_collected(
    out: Path,
    *,
    negatives: Path | None,
    negative_bank: Path | None,
    threshold: float | None,
    epochs: int,
    device: str,
    progress: Progress | None = None,
    weights: Path | None = None,
) -> tuple[RunSummary, SiameseModel]:
    """Fine-tune the Siamese head of the collect job in ``out``, re-score its crops, rewrite the outputs."""
    from imgsift_siamese.backbone import WeightsError
    from imgsift_siamese.settings import SiameseSettings
    from imgsift_siamese.training import TrainingError, rescore, train_job

    state_dir = out / STATE_DIR
    if not (state_dir / "state.sqlite").exists():
        raise EmbeddedError(f"{out} holds no imgsift collect job; run imgsift collect --out {out} first")
    progress = progress or Progress()
    store = LocalStore(state_dir / "objects")
    state = SqliteStateStore(state_dir / "state.sqlite")
    try:
        job = state.get_job(JOB_ID)
        if job is None:
            raise EmbeddedError(f"{out} holds no imgsift collect job")
        if negatives is not None:
            added = load_references(negatives, store, negative=True)
            job = state.update_job(JOB_ID, negative_keys=sorted({*job.negative_keys, *added}))
        saved_path = state_dir / "siamese.json"
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
        settings = SiameseSettings(
            storage="local",
            local_storage_dir=state_dir / "objects",
            backbone=saved.get("backbone", "mobilenet_v2"),
            weights=weights or saved.get("weights"),
            negative_bank=negative_bank,
            train_epochs=epochs,
            device=device,
        )
        version = (job.model.version if job.model else 0) + 1
        try:
            model = train_job(job, store, state, settings, version)
        except (TrainingError, WeightsError) as exc:
            raise EmbeddedError(str(exc)) from None
        job = state.update_job(JOB_ID, model=model)
        rescore(job, store, state, settings, progress.stage("rescore", len(state.crop_keys(JOB_ID))))
        if threshold is None:
            threshold = for_job(job, state).calibration.suggested or job.spec.threshold
        state.update_job(JOB_ID, spec=job.spec.model_copy(update={"threshold": threshold}))
        return write_outputs(out, state, store, threshold), model
    finally:
        state.close()
