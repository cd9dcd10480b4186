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
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from imgsift_common import keys
from imgsift_common.exports import manifest_row
from imgsift_common.messages import Crop, Job, JobSpec, JobState, SiameseModel, SourceKind, StoredImage
from imgsift_common.progress import finish_if_complete
from imgsift_common.settings import StorageBackend
from imgsift_common.sqlstate import SqlStateStore
from imgsift_common.state import discovery_reason
from imgsift_common.storage import LocalStore
from imgsift_common.threshold import for_job

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


class LocalStorage(TypedDict):
    """The settings fields that keep every object in one local folder: the embedded run has no S3."""

    storage: StorageBackend
    local_storage_dir: Path


def local_storage(folder: Path) -> LocalStorage:
    return {"storage": StorageBackend.LOCAL, "local_storage_dir": folder}


@dataclass
class EmbeddedConfig:
    out: Path
    spec: JobSpec
    refs: Path
    crawler: Any  # CrawlerSettings
    detector: Any  # DetectorSettings
    siamese: Any  # SiameseSettings
    negatives: Path | None = None  # "not this" images
    threshold: float | None = None  # given by the user: fixed; None: decide at the job's suggestion
    whole_images: bool = False  # every stored image is one crop and no detector runs (imgsift verify)


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
    suggested: float | None = None  # the suggested threshold, when the job has crops
    suggested_basis: str = ""
    precision: float | None = None  # estimated at ``threshold``
    recall: float | None = None
    precision_interval: tuple[float, float] | None = None
    recall_interval: tuple[float, float] | None = None
    answers: int = 0  # answers the estimates rest on
    needs_answers: bool = False  # nothing separates the crops yet: every crop accepted


class EmbeddedError(Exception):
    """A problem with the user's input that the CLI reports without a traceback."""


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def detector_fingerprint(settings: Any, target: str, conf: float | None = None) -> str:
    """What detections depend on; when it changes, detections are redone."""
    fields = ("weights", "conf", "iou", "imgsz", "pad", "min_box_size")
    found = {f: getattr(settings, f) for f in fields}
    if conf is not None:  # the job's own confidence threshold
        found["conf"] = conf
    return _fingerprint({"target": target, **found})


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
        self.state = SqlStateStore.sqlite(self.state_dir / "state.sqlite")

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
            "detector": detector_fingerprint(
                self.config.detector, self.config.spec.target, self.config.spec.detector_conf
            ),
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
        save_siamese_settings(self.config.out, self.config.siamese)
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
                if not step.paged and not step.batches and step.wait is not None:
                    # Every open source waits out a transient failure (a 429's Retry-After, an outage).
                    time.sleep(min(step.wait, crawler.source_retry_after_max) + 0.05)
        finish_if_complete(self.state, JOB_ID)
        job = self.state.get_job(JOB_ID) or job
        threshold = settle_threshold(self.state, job, self.config.threshold)
        summary = self.write_outputs(threshold)
        summary.work_done = done
        summary.notes = self.state.notes(JOB_ID)
        summary.discovery = discovery_reason(self.state.flags(JOB_ID))
        return summary

    def _detect(self, job: Job) -> int:
        keys = self.state.image_keys(JOB_ID)
        detected = self.state.detected_counts(JOB_ID, keys)  # one read, not one per image
        todo = [k for k in keys if k not in detected]
        if not todo:
            return 0  # no model is loaded when there is nothing to detect
        from imgsift_detector.detect import detect_batch
        from imgsift_detector.model import WeightsError, detector_from_settings

        settings = self.config.detector
        try:
            detector = None if self.config.whole_images else detector_from_settings(settings)
        except WeightsError as exc:
            raise EmbeddedError(str(exc)) from None
        tick = self.progress.stage("detect", len(todo))
        for chunk in _chunks(todo, settings.batch_size):
            detect_batch(job, chunk, self.store, self.state, detector, settings)
            job = self.state.get_job(JOB_ID) or job
            tick(len(chunk))
        return len(todo)

    def detect_and_compare(self) -> dict[str, int]:
        """Detect every stored image not detected yet, then compare every crop not compared yet."""
        job = self.state.get_job(JOB_ID)
        assert job is not None
        detected = self._detect(job)
        job = self.state.get_job(JOB_ID) or job
        return {"detected": detected, "compared": self._compare(job)}

    def _compare(self, job: Job) -> int:
        crop_keys = self.state.crop_keys(JOB_ID)
        scored = self.state.distances_of(JOB_ID, crop_keys)
        todo = [k for k in crop_keys if k not in scored]
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


def write_outputs(out: Path, state: SqlStateStore, store: LocalStore, threshold: float) -> RunSummary:
    """accepted/, rejected/ and manifest.jsonl at ``threshold`` from the stored distances, and the summary.

    A collect folder links each crop's JPEG as ``accepted/{crop_id}.jpg`` (or ``rejected/``); a
    verify folder links the input files themselves, and its ``crop`` names the input file
    relative to ``--images``.
    """
    from imgsift_common.state import Counter

    job = state.get_job(JOB_ID)
    _fresh_dirs(out, ("accepted", "rejected"))
    accepted = rejected = 0
    tmp_manifest = out / "manifest.jsonl.tmp"
    with tmp_manifest.open("w", encoding="utf-8") as manifest:
        distances = state.distances(JOB_ID)
        crops = {c.key: c for c in state.get_crops(JOB_ID, [k for k, _ in distances])}
        answers = state.feedback(JOB_ID)
        for crop_key, distance in distances:
            crop = crops.get(crop_key)
            if crop is None:
                continue
            ok = distance <= threshold
            accepted += ok
            rejected += not ok
            image = state.get_images(JOB_ID, [crop.image_key]).get(crop.image_key)
            name, link, source = crop_paths(job, crop, image, store)
            output = f"{'accepted' if ok else 'rejected'}/{link}"
            _link_or_copy(source, out / output)
            row = manifest_row(crop, image, distance, threshold, answers.get(crop.key))
            where = {"crop": output} if name is None else {"crop": name, "output": output}
            manifest.write(json.dumps({**where, **row}) + "\n")
    tmp_manifest.replace(out / "manifest.jsonl")
    c = state.counters(JOB_ID)
    found = for_job(job, state, threshold) if job else None
    at = found.at_threshold if found else None
    return RunSummary(
        suggested=found.suggested if found and found.crops.n else None,
        suggested_basis=found.basis if found else "",
        precision=at.precision if at else None,
        recall=at.recall if at else None,
        precision_interval=at.precision_interval if at else None,
        recall_interval=at.recall_interval if at else None,
        answers=found.answers if found else 0,
        needs_answers=found.needs_answers if found else False,
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


def files_root(job: Job | None) -> Path | None:
    """The folder ``imgsift verify`` judged, for a verify job; None for a collect job."""
    if job is None:
        return None
    for source in job.spec.sources:
        if source.kind is SourceKind.FILES and source.path:
            return Path(source.path)
    return None


def crop_paths(
    job: Job | None, crop: Crop, image: StoredImage | None, store: LocalStore
) -> tuple[str | None, str, Path]:
    """How the outputs name a crop: the input file relative to ``--images`` (verify; None for a
    collect crop, which the manifest names by its place in accepted/ or rejected/), its link's
    name there, and the file that link points to."""
    root = files_root(job)
    if root is not None and image is not None and image.provenance.image_url.startswith("file:"):
        source = Path(urllib.parse.unquote(urllib.parse.urlsplit(image.provenance.image_url).path))
        try:
            rel = source.relative_to(root)
        except ValueError:
            rel = Path(source.name)
        return str(rel), "__".join(rel.parts), source if source.is_file() else store.path(crop.key)
    return None, f"{crop.crop_id}.jpg", store.path(crop.key)


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


# ---------------------------------------------------------------------------- a folder made earlier

THRESHOLD_MARKER = "threshold"  # "fixed": the user gave --threshold; otherwise it follows the suggestion


@contextmanager
def open_folder(out: Path) -> Iterator[tuple[SqlStateStore, LocalStore, Job]]:
    """The state, store and job of a folder made by ``imgsift collect`` or ``imgsift verify``."""
    state_path = out / STATE_DIR / "state.sqlite"
    if not state_path.exists():
        raise EmbeddedError(f"{out} holds no imgsift job; run imgsift collect or imgsift verify with --out {out} first")
    state = SqlStateStore.sqlite(state_path)
    try:
        job = state.get_job(JOB_ID)
        if job is None:
            raise EmbeddedError(f"{out} holds no imgsift job")
        yield state, LocalStore(out / STATE_DIR / "objects"), job
    finally:
        state.close()


def folder_settings(out: Path, **changes: Any) -> Any:
    """The Siamese settings the folder's job was scored with (backbone, weights), with ``changes``."""
    from imgsift_siamese.settings import SiameseSettings

    saved_path = out / STATE_DIR / "siamese.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    given = {k: v for k, v in changes.items() if v is not None}
    return SiameseSettings(
        storage="local",
        local_storage_dir=out / STATE_DIR / "objects",
        **{k: v for k, v in saved.items() if v is not None and k not in given},
        **given,
    )


def save_siamese_settings(out: Path, settings: Any) -> None:
    """What ``folder_settings`` reads back: the scorer a later train, answer or questions must match."""
    saved = {
        "backbone": settings.backbone,
        "weights": str(settings.weights) if settings.weights else None,
        "image_size": settings.image_size,
        "negative_margin": settings.negative_margin,
    }
    (out / STATE_DIR / "siamese.json").write_text(json.dumps(saved))


def settle_threshold(state: SqlStateStore, job: Job, threshold: float | None, follow: bool = False) -> float:
    """The threshold to decide at: a given one (remembered as fixed), else a fixed earlier one,
    else the job's suggestion, which follows the answers. ``follow``: forget a fixed one."""
    if follow:
        state.set_marker(JOB_ID, THRESHOLD_MARKER, "suggested")
    if threshold is not None:
        state.set_marker(JOB_ID, THRESHOLD_MARKER, "fixed")
    elif state.get_marker(JOB_ID, THRESHOLD_MARKER) == "fixed":
        threshold = job.spec.threshold
    else:
        threshold = for_job(job, state).suggested
    state.update_job(JOB_ID, spec=job.spec.model_copy(update={"threshold": threshold}))
    return threshold


def train_folder(
    state: SqlStateStore, store: LocalStore, job: Job, settings: Any, progress: Progress
) -> tuple[Job, SiameseModel]:
    """Fine-tune the job's head on its references, "not this" images and answers; re-score every crop."""
    from imgsift_siamese.backbone import WeightsError
    from imgsift_siamese.training import TrainingError, rescore, train_job

    version = (job.model.version if job.model else 0) + 1
    try:
        model = train_job(job, store, state, settings, version)
    except (TrainingError, WeightsError) as exc:
        raise EmbeddedError(str(exc)) from None
    rescore(job, store, state, settings, progress.stage("rescore", len(state.crop_keys(JOB_ID))), model=model)
    return state.get_job(JOB_ID) or job, model


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
    follow: bool = False,
) -> tuple[RunSummary, SiameseModel]:
    """Fine-tune the Siamese head of the job in ``out``, re-score its crops, rewrite the outputs."""
    progress = progress or Progress()
    with open_folder(out) as (state, store, job):
        if negatives is not None:
            added = load_references(negatives, store, negative=True)
            job = state.update_job(JOB_ID, negative_keys=sorted({*job.negative_keys, *added}))
        settings = folder_settings(
            out, weights=weights, negative_bank=negative_bank, train_epochs=epochs, device=device
        )
        job, model = train_folder(state, store, job, settings, progress)
        return write_outputs(out, state, store, settle_threshold(state, job, threshold, follow)), model


def crop_names(out: Path, state: SqlStateStore, store: LocalStore, job: Job) -> dict[str, str]:
    """Every name a user may give a compared crop (the manifest's ``crop``, its file in accepted/
    or rejected/, its crop id), mapped to its key."""
    names: dict[str, str] = {}
    keys_ = [k for k, _ in state.distances(JOB_ID)]
    for crop in state.get_crops(JOB_ID, keys_):
        name, link, _ = crop_paths(job, crop, state.get_images(JOB_ID, [crop.image_key]).get(crop.image_key), store)
        for alias in (name, link, f"accepted/{link}", f"rejected/{link}", crop.crop_id):
            if alias:
                names[alias] = crop.key
    return names


def manifest_names(out: Path, state: SqlStateStore, store: LocalStore, job: Job, keys_: list[str]) -> list[str]:
    """The manifest's ``crop`` of each of ``keys_``, as it stands now."""
    by_key = {c.key: c for c in state.get_crops(JOB_ID, keys_)}
    distances = state.distances_of(JOB_ID, keys_)
    names = []
    for key in keys_:
        crop = by_key[key]
        name, link, _ = crop_paths(job, crop, state.get_images(JOB_ID, [crop.image_key]).get(crop.image_key), store)
        folder = "accepted" if distances.get(key, float("inf")) <= job.spec.threshold else "rejected"
        names.append(name or f"{folder}/{link}")
    return names


def folder_questions(out: Path, k: int) -> list[str]:
    """The ``k`` crops the job in ``out`` most needs answered, as the manifest names them."""
    from imgsift_common.threshold import questions

    with open_folder(out) as (state, store, job):
        asked = questions(job, state, k)
        return manifest_names(out, state, store, job, [key for key, _ in asked])


class AnswersError(EmbeddedError):
    """Answers that cannot be recorded: nothing was changed."""


def read_answers_file(path: Path) -> list[tuple[str, bool]]:
    """``crop,right`` or ``crop,wrong`` lines (blank lines and ``#`` comments skipped); a clear error
    naming the line where one is malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnswersError(f"cannot read the answers file {path}: {exc}") from None
    found = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        crop, comma, verdict = line.rpartition(",")
        verdict = verdict.strip().lower()
        if not comma or not crop.strip() or verdict not in ("right", "wrong"):
            raise AnswersError(
                f"{path}, line {number}: {raw!r} is not 'crop,right' or 'crop,wrong'; nothing was recorded"
            )
        found.append((crop.strip(), verdict == "right"))
    return found


def answer_folder(
    out: Path,
    answers: list[tuple[str, bool]],
    *,
    threshold: float | None,
    train: bool = False,
    follow: bool = False,
    source: str = "the command line",
    progress: Progress | None = None,
) -> tuple[RunSummary, SiameseModel | None]:
    """Record answers for crops of the job in ``out`` (a second answer for a crop replaces the
    first), re-decide at the updated suggestion unless a threshold is fixed, rewrite the outputs.

    Every crop is looked up before anything is recorded: an unknown crop changes nothing.
    """
    progress = progress or Progress()
    with open_folder(out) as (state, store, job):
        names = crop_names(out, state, store, job)
        unknown = [crop for crop, _ in answers if crop not in names]
        if unknown and len(unknown) == len(answers) and len(answers) > 1:
            raise AnswersError(
                f"none of the {len(answers)} crops in {source} is a crop of the job in {out}: are these answers "
                "for another output folder? Nothing was recorded"
            )
        if unknown:
            listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise AnswersError(
                f"unknown crop(s) {listed}: give the 'crop' of a line of {out / 'manifest.jsonl'} (or its crop id, "
                "or its file in accepted/ or rejected/); nothing was recorded"
            )
        for crop, right in answers:
            state.set_feedback(JOB_ID, names[crop], right)
        model = None
        if train:
            job, model = train_folder(state, store, job, folder_settings(out), progress)
        return write_outputs(out, state, store, settle_threshold(state, job, threshold, follow)), model
