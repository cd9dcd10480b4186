"""Dataset exports of a job at a threshold, written to a file one crop at a time.

Formats:

- ``imagefolder``: a zip of the accepted crops, ``{class}/{crop_id}.jpg`` (torchvision's
  ImageFolder layout);
- ``yolo``: a zip of a YOLO detection dataset: ``images/{sha256}.{ext}`` (the originals that
  have accepted boxes), ``labels/{sha256}.txt`` (only the accepted boxes: ``class cx cy w h``,
  normalised), ``data.yaml`` (``path``, ``train``, ``val``, ``names``);
- ``coco``: COCO detection JSON (``images``, ``annotations`` with ``bbox`` [x, y, w, h] in
  pixels, ``categories``) of the accepted boxes, with each image's provenance and licence;
- ``jsonl`` / ``csv``: the manifest of every compared crop (accepted or not) with its
  distance, box, class, provenance and licence;
- ``webdataset``, ``parquet``, ``huggingface``, ``fiftyone``, ``labelstudio``: where people train and
  review datasets (``exports_training``).

Crops are read page by page from the job state (``distance_page``) and crop or image bytes one
at a time, so memory does not grow with the job; the YOLO and COCO exports group the accepted
boxes by image in a temporary SQLite file beside the export (``exports_training.ImageGroups``),
on disk rather than in memory.
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from imgsift_common import keys
from imgsift_common.messages import Crop, ExportMessage, ExportOptions, Job, StoredImage, utcnow
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectNotFound, ObjectStore

PAGE = 500


class ExportFormat(StrEnum):
    IMAGEFOLDER = "imagefolder"
    YOLO = "yolo"
    COCO = "coco"
    JSONL = "jsonl"
    CSV = "csv"
    WEBDATASET = "webdataset"
    PARQUET = "parquet"
    HUGGINGFACE = "huggingface"
    FIFTYONE = "fiftyone"
    LABELSTUDIO = "labelstudio"

    @property
    def suffix(self) -> str:
        return {"coco": ".json", "jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet",
                "labelstudio": ".json"}.get(self.value, ".zip")  # fmt: skip

    @property
    def media_type(self) -> str:
        return {".zip": "application/zip", ".json": "application/json", ".jsonl": "application/x-ndjson",
                ".csv": "text/csv", ".parquet": "application/vnd.apache.parquet"}[self.suffix]  # fmt: skip

    @property
    def is_manifest(self) -> bool:
        """Lists every compared crop, accepted or not (the others hold the accepted crops or boxes)."""
        return self in (ExportFormat.JSONL, ExportFormat.CSV, ExportFormat.PARQUET, ExportFormat.FIFTYONE)


FORMATS_HELP = (
    "imagefolder (zip), yolo (zip), coco (json), jsonl, csv or parquet (manifest), webdataset (zip of tar "
    "shards), huggingface (zip of a datasets folder), fiftyone (zip), labelstudio (tasks json)"
)


def parse_format(name: str) -> ExportFormat:
    """The format called ``name`` (any case); a ValueError naming the known ones otherwise."""
    try:
        return ExportFormat(name.strip().lower())
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise ValueError(f"unknown format {name!r}; use one of {known}") from None


@dataclass(frozen=True)
class ExportResult:
    format: ExportFormat
    threshold: float
    crops: int  # crops written (accepted ones, or every compared one for a manifest)
    images: int  # original images written or referenced
    missing: int  # crops or images gone from the store: skipped, counted here

    @property
    def note(self) -> str | None:
        """What an empty export is, said once for the CLI, the API and the UI alike."""
        if self.crops:
            return None
        what = "no crop was compared" if self.format.is_manifest else f"nothing was accepted at {self.threshold}"
        return f"{what}: the {self.format.value} export is a valid, empty dataset"


MANIFEST_FIELDS = [
    "crop_id", "crop_key", "accepted", "distance", "threshold", "answer", "class", "score", "box", "padded_box",
    "whole_image", "image_key", "image_sha256", "image_width", "image_height", "image_url", "page_url",
    "source", "title", "license", "license_url", "author", "fetched_at",
]  # fmt: skip


def manifest_row(
    crop: Crop, image: StoredImage | None, distance: float, threshold: float, answer: bool | None = None
) -> dict[str, Any]:
    """One crop with its decision, the user's answer (right, wrong or none) and its image's provenance."""
    prov = image.provenance if image else None
    return {
        "crop_id": crop.crop_id,
        "crop_key": crop.key,
        "accepted": distance <= threshold,
        "distance": distance,
        "threshold": threshold,
        "answer": None if answer is None else ("right" if answer else "wrong"),
        "class": crop.class_name,
        "score": round(crop.score, 4),
        "box": [round(v, 2) for v in crop.box],
        "padded_box": [round(v, 2) for v in crop.padded_box],
        "whole_image": crop.whole_image,
        "image_key": crop.image_key,
        "image_sha256": image.sha256 if image else None,
        "image_width": image.width if image else None,
        "image_height": image.height if image else None,
        "image_url": prov.image_url if prov else None,
        "page_url": prov.page_url if prov else None,
        "source": prov.source.value if prov else None,
        "title": prov.title if prov else None,
        "license": prov.license if prov else None,
        "license_url": prov.license_url if prov else None,
        "author": prov.author if prov else None,
        "fetched_at": image.fetched_at.isoformat() if image else None,
    }


def scored_crops(
    job: Job, state: StateStore, threshold: float, *, accepted_only: bool
) -> Iterator[tuple[Crop, StoredImage | None, float]]:
    """The job's compared crops by ascending distance, a page at a time."""
    after = None
    while True:
        page = state.distance_page(job.id, max_distance=threshold if accepted_only else None, after=after, limit=PAGE)
        crops = {c.key: c for c in state.get_crops(job.id, [k for k, _ in page.items])}
        images = state.get_images(job.id, {c.image_key for c in crops.values()})  # one page of images at a time
        for key, distance in page.items:
            crop = crops.get(key)
            if crop is None:
                continue
            yield crop, images.get(crop.image_key), distance
        if page.next_after is None:
            return
        after = page.next_after


def export(
    fmt: ExportFormat,
    job: Job,
    state: StateStore,
    store: ObjectStore,
    threshold: float,
    dest: Path,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Write the ``fmt`` export of ``job`` at ``threshold`` to the file ``dest``."""
    from imgsift_common import exports_training as training

    chosen = options or ExportOptions()
    writers: dict[ExportFormat, Any] = {
        ExportFormat.IMAGEFOLDER: _imagefolder,
        ExportFormat.YOLO: _yolo,
        ExportFormat.COCO: _coco,
        ExportFormat.JSONL: _jsonl,
        ExportFormat.CSV: _csv,
    }
    trained: dict[ExportFormat, Any] = {
        ExportFormat.WEBDATASET: training.webdataset,
        ExportFormat.PARQUET: training.parquet,
        ExportFormat.HUGGINGFACE: training.huggingface,
        ExportFormat.FIFTYONE: training.fiftyone,
        ExportFormat.LABELSTUDIO: training.labelstudio,
    }
    tmp = dest.with_name(dest.name + ".part")
    try:
        if fmt in trained:
            result = trained[fmt](job, state, store, threshold, tmp, chosen)
        else:
            result = writers[fmt](job, state, store, threshold, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file is never mistaken for an export
        raise
    tmp.replace(dest)
    return ExportResult(fmt, threshold, *result)


def _imagefolder(job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path) -> tuple[int, int, int]:
    crops = missing = 0
    images: set[str] = set()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as archive:  # JPEGs do not compress
        for crop, _, _ in scored_crops(job, state, threshold, accepted_only=True):
            try:
                data = store.get(crop.key)
            except ObjectNotFound:
                missing += 1
                continue
            archive.writestr(f"{_folder(crop.class_name)}/{crop.crop_id}.jpg", data)
            crops += 1
            images.add(crop.image_key)
    return crops, len(images), missing


def _folder(class_name: str | None) -> str:
    return (class_name or "object").replace("/", "_").replace(" ", "_")


def _accepted_by_image(job: Job, state: StateStore, threshold: float, folder: Path) -> tuple[Any, list[str]]:
    """The accepted boxes grouped by image on disk (``ImageGroups``), and the class names, sorted."""
    from imgsift_common.exports_training import ImageGroups

    groups = ImageGroups(folder)
    names: set[str] = set()
    try:
        for crop, image, _ in scored_crops(job, state, threshold, accepted_only=True):
            if image is None:
                continue
            name = crop.class_name or "object"
            prov = image.provenance
            groups.add(crop.image_key, {
                "box": list(crop.box), "class": name, "score": crop.score, "crop_id": crop.crop_id,
                "sha256": image.sha256, "width": image.width, "height": image.height,
                "fetched_at": image.fetched_at.isoformat(), "image_url": prov.image_url, "page_url": prov.page_url,
                "license": prov.license, "license_url": prov.license_url, "author": prov.author,
                "title": prov.title, "source": prov.source.value,
            })  # fmt: skip
            names.add(name)
    except BaseException:
        groups.close()
        raise
    return groups, sorted(names)


def _yolo(job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path) -> tuple[int, int, int]:
    groups, names = _accepted_by_image(job, state, threshold, dest.parent)
    index = {name: i for i, name in enumerate(names)}
    crops = written = missing = 0
    try:
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
            for key, boxes in groups.groups():
                try:
                    data = store.get(key)
                except ObjectNotFound:
                    missing += len(boxes)
                    continue
                first = boxes[0]
                stem, width, height = first["sha256"], first["width"], first["height"]
                archive.writestr(f"images/{stem}.{key.rsplit('.', 1)[-1]}", data, zipfile.ZIP_STORED)
                lines = []
                for box in boxes:
                    x1, y1, x2, y2 = box["box"]
                    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
                    w, h = (x2 - x1) / width, (y2 - y1) / height
                    lines.append(f"{index[box['class']]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
                archive.writestr(f"labels/{stem}.txt", "\n".join(lines) + "\n")
                crops += len(boxes)
                written += 1
            names_yaml = "\n".join(f"  {i}: {json.dumps(name)}" for i, name in enumerate(names))
            archive.writestr(
                "data.yaml",
                f"# imgsift job {job.id}, threshold {threshold}: only the accepted boxes\n"
                f"path: .\ntrain: images\nval: images\nnames:\n{names_yaml}\n",
            )
    finally:
        groups.close()
    return crops, written, missing


def _coco(job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path) -> tuple[int, int, int]:
    groups, names = _accepted_by_image(job, state, threshold, dest.parent)
    category = {name: i + 1 for i, name in enumerate(names)}
    licences: dict[tuple[str | None, str | None], int] = {}
    crops = images = 0
    try:
        with dest.open("w", encoding="utf-8") as out:
            out.write('{"info": ' + json.dumps({"description": f"imgsift job {job.id}", "threshold": threshold}))
            out.write(',\n"images": [')
            for n, (key, boxes) in enumerate(groups.groups()):  # images, then their boxes: two passes on disk
                image = boxes[0]
                licence = licences.setdefault((image["license"], image["license_url"]), len(licences) + 1)
                entry = {
                    "id": n + 1, "file_name": key.rsplit("/", 1)[-1], "width": image["width"],
                    "height": image["height"], "license": licence, "coco_url": image["image_url"],
                    "flickr_url": image["page_url"], "date_captured": image["fetched_at"], "imgsift": {"key": key,
                    "author": image["author"], "title": image["title"], "source": image["source"]},
                }  # fmt: skip
                out.write(("," if n else "") + "\n" + json.dumps(entry))
                images += 1
            out.write('],\n"annotations": [')
            for n, (_, boxes) in enumerate(groups.groups()):
                for box in boxes:
                    x1, y1, x2, y2 = box["box"]
                    w, h = x2 - x1, y2 - y1
                    entry = {
                        "id": crops + 1, "image_id": n + 1, "category_id": category[box["class"]],
                        "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
                        "iscrowd": 0, "score": round(box["score"], 4), "imgsift": {"crop_id": box["crop_id"]},
                    }  # fmt: skip
                    out.write(("," if crops else "") + "\n" + json.dumps(entry))
                    crops += 1
            out.write('],\n"categories": ' + json.dumps([{"id": i, "name": n} for n, i in category.items()]))
            licence_list = [{"id": i, "name": k[0], "url": k[1]} for k, i in licences.items()]
            out.write(',\n"licenses": ' + json.dumps(licence_list))
            out.write("}\n")
    finally:
        groups.close()
    return crops, images, 0


def _rows(job: Job, state: StateStore, threshold: float) -> Iterator[dict[str, Any]]:
    answers = state.feedback(job.id)  # a few per job: the crops the user answered
    for crop, image, distance in scored_crops(job, state, threshold, accepted_only=False):
        yield manifest_row(crop, image, distance, threshold, answers.get(crop.key))


def _jsonl(job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path) -> tuple[int, int, int]:
    return _write_rows(dest, _rows(job, state, threshold), lambda out: _JsonLines(out))


def _csv(job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path) -> tuple[int, int, int]:
    return _write_rows(dest, _rows(job, state, threshold), lambda out: _Csv(out))


class _JsonLines:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, row: dict[str, Any]) -> None:
        self.out.write(json.dumps(row) + "\n")


class _Csv:
    def __init__(self, out: IO[str]) -> None:
        self.writer = csv.DictWriter(out, fieldnames=MANIFEST_FIELDS)
        self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})


def _write_rows(dest: Path, rows: Iterator[dict[str, Any]], make: Any) -> tuple[int, int, int]:
    count = 0
    images: set[str] = set()
    with dest.open("w", encoding="utf-8", newline="") as out:
        writer = make(out)
        for row in rows:
            writer.write(row)
            count += 1
            images.add(row["image_key"])
    return count, len(images), 0


# ---------------------------------------------------------------------------- exports as a task


class ExportState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ExportStatus(BaseModel):
    id: str
    format: ExportFormat
    threshold: float
    state: ExportState
    key: str | None = None  # object key of the finished file
    crops: int | None = None
    images: int | None = None
    missing: int | None = None
    note: str | None = None  # an empty export says so
    options: ExportOptions = ExportOptions()
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None = None


def export_marker(export_id: str) -> str:
    return f"export:{export_id}"


def save_status(state: StateStore, job_id: str, status: ExportStatus) -> None:
    state.set_marker(job_id, export_marker(status.id), status.model_dump_json())


def load_status(state: StateStore, job_id: str, export_id: str) -> ExportStatus | None:
    raw = state.get_marker(job_id, export_marker(export_id))
    return ExportStatus.model_validate_json(raw) if raw else None


def export_key(job_id: str, export_id: str, fmt: ExportFormat) -> str:
    return f"{keys.job_prefix(job_id)}exports/{export_id}{fmt.suffix}"


def run_export(message: ExportMessage, state: StateStore, store: ObjectStore, workdir: Path) -> ExportStatus | None:
    """The export task's stage: build the file in ``workdir``, upload it, record the outcome. Idempotent."""
    status = load_status(state, message.job_id, message.export_id)
    job = state.get_job(message.job_id)
    if status is None or job is None or status.state is ExportState.DONE:
        return status
    try:
        fmt = parse_format(message.format)
    except ValueError as exc:  # a message from an older or newer API: say which formats this worker knows
        failed = status.model_copy(update={"state": ExportState.FAILED, "error": str(exc), "finished_at": utcnow()})
        save_status(state, job.id, failed)
        return failed
    save_status(state, job.id, status.model_copy(update={"state": ExportState.RUNNING}))
    dest = workdir / f"{message.export_id}{fmt.suffix}"
    try:
        result = export(fmt, job, state, store, message.threshold, dest, message.options)
        key = export_key(job.id, message.export_id, fmt)
        store.put_file(key, dest, fmt.media_type)
    except (OSError, ValueError) as exc:  # a full disk, a broken record: say so, do not retry forever
        failed = status.model_copy(update={"state": ExportState.FAILED, "error": str(exc), "finished_at": utcnow()})
        save_status(state, job.id, failed)
        return failed
    finally:
        dest.unlink(missing_ok=True)
    done = status.model_copy(
        update={
            "state": ExportState.DONE,
            "key": key,
            "crops": result.crops,
            "images": result.images,
            "missing": result.missing,
            "note": result.note,
            "finished_at": utcnow(),
        }
    )
    save_status(state, job.id, done)
    return done
