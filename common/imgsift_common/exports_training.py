"""Exports where people train and review datasets: WebDataset shards, Parquet, Hugging Face, FiftyOne, Label Studio.

- ``webdataset``: a zip of img2dataset-style shards ``00000.tar`` (samples ``{key}.jpg``, ``{key}.json``,
  ``{key}.cls``, ``{key}.txt`` where the source gave a title), with ``00000.parquet`` (the shard's metadata)
  and ``00000_stats.json`` (img2dataset's stats keys) beside each; keys are ``{shard:05d}{index}``;
- ``parquet``: the manifest (the JSONL columns, typed), optionally with the crop JPEG in a ``jpg`` column;
- ``huggingface``: a zip of a folder ``datasets.load_dataset`` reads offline: ``data/train-NNNNN.parquet``
  (``image`` as an ``Image`` feature, ``label`` as a ``ClassLabel``, distance and provenance columns)
  and a dataset card ``README.md`` (sources, licences, authors, threshold, counts);
- ``fiftyone``: a zip of FiftyOne's ``FiftyOneImageDetectionDataset`` layout (``data/`` originals,
  ``labels.json``): every compared box, with ``distance``, ``accepted`` and ``threshold`` on each detection;
- ``labelstudio``: Label Studio tasks JSON: each original image's URL, its accepted boxes as one
  prediction (``rectanglelabels``, each region's ``score`` its distance).

Everything streams: crops come a page at a time (``scored_crops``), shards and tables are written in
batches, and the two per-image formats group their boxes in a temporary SQLite file on disk, not in
memory. The libraries that read these formats (webdataset, datasets, fiftyone, label-studio-sdk) are
only needed by the tests and the users; writing needs pyarrow and the standard library.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import sqlite3
import tarfile
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from imgsift_common.exports import PAGE, manifest_row, scored_crops
from imgsift_common.messages import Crop, ExportOptions, Job, StoredImage
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectNotFound, ObjectStore

if TYPE_CHECKING:
    import pyarrow as pa

SHARD_DIGITS = 5  # img2dataset's shard names: 00000.tar, 00001.tar, ...
AUTHORS_LISTED = 1_000  # the card names this many authors; the rest are counted, so memory stays bounded
Written = tuple[int, int, int]  # crops, images, missing


def class_names(job: Job, state: StateStore, threshold: float | None) -> list[str]:
    """The class names of the job's compared crops (accepted ones where ``threshold`` is given), sorted.

    A first pass over the crops, without their images: a class's index must be known before the first
    sample is written, and a job has a few classes, not a few per crop.
    """
    names: set[str] = set()
    after = None
    while True:
        page = state.distance_page(job.id, max_distance=threshold, after=after, limit=PAGE)
        names.update(c.class_name or "object" for c in state.get_crops(job.id, [k for k, _ in page.items]))
        if page.next_after is None:
            return sorted(names)
        after = page.next_after


def _answers(job: Job, state: StateStore) -> dict[str, bool]:
    return state.feedback(job.id)  # a few per job: the crops the user answered


# ---------------------------------------------------------------------------- typed manifest rows


def manifest_schema(embed_images: bool = False) -> pa.Schema:
    """The JSONL manifest's columns as Arrow types (``jpg``: the crop's JPEG bytes, when embedded)."""
    import pyarrow as pa

    box = pa.list_(pa.float64())
    fields = [
        ("crop_id", pa.string()), ("crop_key", pa.string()), ("accepted", pa.bool_()), ("distance", pa.float64()),
        ("threshold", pa.float64()), ("answer", pa.string()), ("class", pa.string()), ("score", pa.float64()),
        ("box", box), ("padded_box", box), ("whole_image", pa.bool_()), ("image_key", pa.string()),
        ("image_sha256", pa.string()), ("image_width", pa.int32()), ("image_height", pa.int32()),
        ("image_url", pa.string()), ("page_url", pa.string()), ("source", pa.string()), ("title", pa.string()),
        ("license", pa.string()), ("license_url", pa.string()), ("author", pa.string()),
        ("fetched_at", pa.timestamp("us", tz="UTC")),
    ]  # fmt: skip
    if embed_images:
        fields.append(("jpg", pa.binary()))
    return pa.schema(fields)


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """A manifest row with its time as a datetime, as the Arrow schema wants it."""
    fetched = row["fetched_at"]
    return {**row, "fetched_at": datetime.fromisoformat(fetched) if fetched else None}


BATCH_BYTES = 16 << 20  # a batch of rows with images is written once its images reach this many bytes


class _Batches:
    """Rows into a Parquet writer a batch at a time: memory holds one batch, never the table.

    A batch is ``PAGE`` rows, or fewer once their image bytes reach ``BATCH_BYTES`` (large photos). Image
    columns skip dictionary encoding: no two images are alike, so a dictionary would only cost memory.
    """

    def __init__(self, sink: Any, schema: pa.Schema, metadata: dict[bytes, bytes] | None = None) -> None:
        import pyarrow.parquet as pq

        self.schema = schema.with_metadata(metadata) if metadata else schema
        images = {"jpg", "image"} & set(self.schema.names)
        plain = [n for n in self.schema.names if n not in images]
        self.writer = pq.ParquetWriter(sink, self.schema, use_dictionary=plain)
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0

    def add(self, row: dict[str, Any], image_bytes: int = 0) -> None:
        self.rows.append(row)
        self.bytes += image_bytes
        if len(self.rows) >= PAGE or self.bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows, self.bytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


# ---------------------------------------------------------------------------- parquet


def parquet(
    job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path, options: ExportOptions
) -> Written:
    """Every compared crop, as the JSONL manifest, typed; the crop's bytes in ``jpg`` with ``embed_images``."""
    answers = _answers(job, state)
    rows = missing = 0
    images: set[str] = set()
    batches = _Batches(str(dest), manifest_schema(options.embed_images))
    try:
        for crop, image, distance in scored_crops(job, state, threshold, accepted_only=False):
            row = _typed(manifest_row(crop, image, distance, threshold, answers.get(crop.key)))
            if options.embed_images:
                try:
                    row["jpg"] = store.get(crop.key)
                except ObjectNotFound:
                    row["jpg"] = None
                    missing += 1
            batches.add(row, len(row.get("jpg") or b""))
            rows += 1
            images.add(crop.image_key)
    finally:
        batches.close()
    return rows, len(images), missing


# ---------------------------------------------------------------------------- webdataset


@dataclass
class _Shard:
    """One open img2dataset shard: the tar streamed into the zip, its metadata table in a file beside it."""

    number: int
    tar: tarfile.TarFile
    raw: IO[bytes]
    table: _Batches
    table_path: Path
    started: float = field(default_factory=time.time)
    samples: int = 0
    missing: int = 0

    @property
    def name(self) -> str:
        return f"{self.number:0{SHARD_DIGITS}d}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    tar.addfile(info, io.BytesIO(data))


def webdataset(
    job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path, options: ExportOptions
) -> Written:
    """The accepted crops as img2dataset-style WebDataset shards in a zip (stored, not compressed)."""
    names = class_names(job, state, threshold)
    index = {name: i for i, name in enumerate(names)}
    answers = _answers(job, state)
    per_shard = options.samples_per_shard
    digits = max(1, math.ceil(math.log10(per_shard)))  # img2dataset's oom_sample_per_shard
    crops = missing = 0
    images: set[str] = set()
    shard: _Shard | None = None
    schema = _shard_schema()
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:

        def open_shard(number: int) -> _Shard:
            raw = archive.open(f"{number:0{SHARD_DIGITS}d}.tar", "w", force_zip64=True)
            table_path = dest.with_name(f"{dest.name}.{number}.parquet.part")
            table = _Batches(str(table_path), schema)
            return _Shard(number, tarfile.open(fileobj=raw, mode="w|", format=tarfile.GNU_FORMAT), raw, table,
                          table_path)  # fmt: skip

        def close_shard(open_: _Shard) -> None:
            open_.tar.close()
            open_.raw.close()
            open_.table.close()
            archive.write(open_.table_path, f"{open_.name}.parquet")
            open_.table_path.unlink()
            ended = time.time()
            stats = {  # img2dataset's keys; a crop gone from the store counts as a failed download
                "count": open_.samples + open_.missing, "successes": open_.samples,
                "failed_to_download": open_.missing, "failed_to_resize": 0, "duration": ended - open_.started,
                "start_time": open_.started, "end_time": ended,
                "status_dict": {k: v for k, v in (("success", open_.samples),
                                                  ("missing_from_store", open_.missing)) if v},
                "imgsift": {"job_id": job.id, "threshold": threshold, "originals": options.originals,
                            "classes": names},
            }  # fmt: skip
            archive.writestr(f"{open_.name}_stats.json", json.dumps(stats, indent=4))

        try:
            shard = open_shard(0)
            for crop, image, distance in scored_crops(job, state, threshold, accepted_only=True):
                try:
                    data = store.get(crop.image_key if options.originals else crop.key)
                except ObjectNotFound:
                    shard.missing += 1
                    missing += 1
                    continue
                if shard.samples == per_shard:
                    close_shard(shard)
                    shard = open_shard(shard.number + 1)
                key = f"{shard.name}{shard.samples:0{digits}d}"
                row = manifest_row(crop, image, distance, threshold, answers.get(crop.key))
                class_name = crop.class_name or "object"
                meta = {"key": key, "status": "success", "url": row["image_url"], "caption": row["title"],
                        "class_index": index[class_name], "image": "original" if options.originals else "crop",
                        **row}  # fmt: skip
                mtime = time.time()
                ext = crop.image_key.rsplit(".", 1)[-1].lower() if options.originals else "jpg"
                _add_member(shard.tar, f"{key}.{'jpg' if ext == 'jpeg' else ext}", data, mtime)
                _add_member(shard.tar, f"{key}.json", json.dumps(meta, indent=1).encode(), mtime)
                _add_member(shard.tar, f"{key}.cls", str(index[class_name]).encode(), mtime)
                if row["title"]:
                    _add_member(shard.tar, f"{key}.txt", row["title"].encode(), mtime)
                shard.table.add({k: meta[k] for k in schema.names[:5]} | _typed(row))
                shard.samples += 1
                crops += 1
                images.add(crop.image_key)
            close_shard(shard)
            shard = None
        finally:
            if shard is not None:  # an error mid-shard: free the file beside the export too
                shard.table.writer.close()
                shard.table_path.unlink(missing_ok=True)
    return crops, len(images), missing


def _shard_schema() -> pa.Schema:
    """A shard's metadata table: img2dataset's key, status, url and caption, then the manifest's columns."""
    import pyarrow as pa

    head = pa.schema([("key", pa.string()), ("status", pa.string()), ("url", pa.string()),
                      ("caption", pa.string()), ("class_index", pa.int64())])  # fmt: skip
    return pa.unify_schemas([head, manifest_schema()])


# ---------------------------------------------------------------------------- hugging face


HF_COLUMNS = [
    "crop_id", "distance", "threshold", "score", "box", "image_key", "image_url", "page_url", "source", "title",
    "license", "license_url", "author", "fetched_at",
]  # fmt: skip


def _hf_features(names: list[str]) -> dict[str, Any]:
    """The dataset's features as ``datasets.Features.to_dict()`` writes them (datasets 4 and later)."""
    value = {"dtype": "string", "_type": "Value"}
    features: dict[str, Any] = {
        "image": {"_type": "Image"},
        "label": {"names": names, "_type": "ClassLabel"},
    }
    for column in HF_COLUMNS:
        if column in ("distance", "threshold", "score"):
            features[column] = {"dtype": "float64", "_type": "Value"}
        elif column == "box":
            features[column] = {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "List"}
        else:
            features[column] = value
    return features


def _hf_schema() -> pa.Schema:
    import pyarrow as pa

    fields: list[tuple[str, pa.DataType]] = [
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("label", pa.int64()),
    ]
    for column in HF_COLUMNS:
        if column in ("distance", "threshold", "score"):
            fields.append((column, pa.float64()))
        elif column == "box":
            fields.append((column, pa.list_(pa.float64())))
        else:
            fields.append((column, pa.string()))
    return pa.schema(fields)


@dataclass
class _Tally:
    """What the dataset card says: counts per source and licence, and the authors (a bounded list)."""

    sources: Counter[str] = field(default_factory=Counter)
    licences: Counter[tuple[str, str]] = field(default_factory=Counter)
    authors: Counter[str] = field(default_factory=Counter)
    other_authors: int = 0  # crops whose author is past the first AUTHORS_LISTED names

    def add(self, image: StoredImage | None) -> None:
        prov = image.provenance if image else None
        self.sources[prov.source.value if prov else "unknown"] += 1
        self.licences[(prov.license or "unknown", prov.license_url or "") if prov else ("unknown", "")] += 1
        author = (prov.author if prov else None) or "unknown"
        if author in self.authors or len(self.authors) < AUTHORS_LISTED:
            self.authors[author] += 1
        else:
            self.other_authors += 1


def huggingface(
    job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path, options: ExportOptions
) -> Written:
    """The accepted crops as a Hugging Face dataset folder (Parquet shards and a card), zipped."""
    names = class_names(job, state, threshold) or ["object"]  # a ClassLabel needs a name, even with no crop
    index = {name: i for i, name in enumerate(names)}
    features = _hf_features(names)
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = _hf_schema()
    tally = _Tally()
    crops = missing = shards = 0
    images: set[str] = set()
    part = dest.with_name(dest.name + ".shard.part")
    batches: _Batches | None = None
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:

        def close_shard() -> None:
            nonlocal batches, shards
            if batches is not None:
                batches.close()
                archive.write(part, f"data/train-{shards:05d}.parquet")
                part.unlink()
                batches, shards = None, shards + 1

        try:
            rows_in_shard = 0
            for crop, image, distance in scored_crops(job, state, threshold, accepted_only=True):
                try:
                    data = store.get(crop.key)
                except ObjectNotFound:
                    missing += 1
                    continue
                if batches is None or rows_in_shard == options.samples_per_shard:
                    close_shard()
                    batches, rows_in_shard = _Batches(str(part), schema, metadata), 0
                row = manifest_row(crop, image, distance, threshold)
                row.update(image={"bytes": data, "path": f"{crop.crop_id}.jpg"},
                           label=index[crop.class_name or "object"])  # fmt: skip
                batches.add({k: row[k] for k in schema.names}, len(data))
                rows_in_shard += 1
                crops += 1
                images.add(crop.image_key)
                tally.add(image)
            if batches is None:  # nothing accepted: one empty shard, so the dataset still has its features
                batches = _Batches(str(part), schema, metadata)
            close_shard()
        finally:
            if batches is not None:
                batches.writer.close()
            part.unlink(missing_ok=True)
        card = dataset_card(job, threshold, names, features, tally, crops, len(images), missing)
        archive.writestr("README.md", card)
    return crops, len(images), missing


def _yaml(value: Any) -> str:
    return json.dumps(value)  # a JSON string or number is a YAML scalar


def dataset_card(
    job: Job,
    threshold: float,
    names: list[str],
    features: dict[str, Any],
    tally: _Tally,
    crops: int,
    images: int,
    missing: int,
) -> str:
    """The dataset card: YAML (config, features, split size) and what the data is, where it came from."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
             "    path: data/train-*.parquet", "dataset_info:", "  features:"]  # fmt: skip
    for name, feature in features.items():
        lines.append(f"  - name: {name}")
        if feature["_type"] == "Image":
            lines.append("    dtype: image")
        elif feature["_type"] == "ClassLabel":
            lines += ["    dtype:", "      class_label:", "        names:"]
            lines += [f"          {_yaml(str(i))}: {_yaml(n)}" for i, n in enumerate(names)]
        elif feature["_type"] == "List":
            lines.append(f"    list: {feature['feature']['dtype']}")
        else:
            lines.append(f"    dtype: {feature['dtype']}")
    lines += ["tags:", "- imgsift",
              "task_categories:", "- image-classification", "---", ""]  # fmt: skip
    spec = job.spec
    described = spec.query or spec.target
    lines += [
        f"# imgsift job {job.id}: {described}",
        "",
        f"Crops that imgsift's detector cut from web images (target class: `{spec.target}`) and its Siamese "
        f"network accepted: distance to the job's references <= **{threshold}**. "
        "Lower distances look more like the references.",
        "",
        "## Counts",
        "",
        f"- accepted crops in this dataset: {crops}",
        f"- original images they come from: {images}",
        f"- accepted crops left out because their file was gone from storage: {missing}",
        f"- classes: {', '.join(names) if crops else 'none'}",
        "",
    ]
    if not crops:
        lines += [f"Nothing was accepted at threshold {threshold}: the dataset is empty.", ""]
    lines += ["## Sources", "", "| source | crops |", "| --- | --- |"]
    lines += [f"| {_cell(s)} | {n} |" for s, n in tally.sources.most_common()]
    lines += ["", "## Licences", "", "Each row's `license`, `license_url` and `author` columns hold its own; "
              "check them before you redistribute.", "", "| licence | url | crops |",
              "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| {_cell(lic)} | {_cell(url)} | {n} |" for (lic, url), n in tally.licences.most_common()]
    lines += ["", "## Authors", "", "| author | crops |", "| --- | --- |"]
    lines += [f"| {_cell(a)} | {n} |" for a, n in tally.authors.most_common()]
    if tally.other_authors:
        lines.append(f"| (other authors, see the `author` column) | {tally.other_authors} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("path/to/this/folder", split="train")',
        "```",
        "",
        "Publishing it is your step (it needs the network and your token): "
        "`huggingface-cli upload --repo-type dataset YOUR_NAME/DATASET path/to/this/folder`.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


# ---------------------------------------------------------------------------- grouped by image (on disk)


class ImageGroups:
    """Rows grouped by their image in a temporary SQLite file: the grouping costs disk, not memory."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f".imgsift-group-{uuid.uuid4().hex}.sqlite"
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE row (image_key TEXT NOT NULL, payload TEXT NOT NULL)")

    def add(self, image_key: str, payload: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO row VALUES (?, ?)", (image_key, json.dumps(payload)))

    def groups(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """Each image's rows (images by key, rows in the order added); one image's rows in memory at a time."""
        self.db.execute("CREATE INDEX IF NOT EXISTS row_image ON row (image_key)")
        cursor = self.db.execute("SELECT image_key, payload FROM row ORDER BY image_key, rowid")
        for key, rows in itertools.groupby(cursor, key=lambda r: r[0]):
            yield key, [json.loads(payload) for _, payload in rows]

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)


def _image_payload(crop: Crop, image: StoredImage, distance: float, threshold: float) -> dict[str, Any]:
    prov = image.provenance
    return {
        "crop_id": crop.crop_id, "class": crop.class_name or "object", "box": list(crop.box), "score": crop.score,
        "distance": distance, "accepted": distance <= threshold, "width": image.width, "height": image.height,
        "sha256": image.sha256, "image_url": prov.image_url, "page_url": prov.page_url,
        "source": prov.source.value, "title": prov.title, "license": prov.license,
        "license_url": prov.license_url, "author": prov.author,
    }  # fmt: skip


# ---------------------------------------------------------------------------- fiftyone


def fiftyone(
    job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path, options: ExportOptions
) -> Written:
    """Every compared box on its original, in FiftyOne's ``FiftyOneImageDetectionDataset`` layout, zipped."""
    answers = _answers(job, state)
    grouped = ImageGroups(dest.parent)
    labels_path = dest.with_name(dest.name + ".labels.part")
    names: set[str] = set()
    crops = written = missing = 0
    try:
        for crop, image, distance in scored_crops(job, state, threshold, accepted_only=False):
            if image is None:
                missing += 1
                continue
            payload = _image_payload(crop, image, distance, threshold)
            payload["answer"] = None if crop.key not in answers else ("right" if answers[crop.key] else "wrong")
            grouped.add(crop.image_key, payload)
        with (
            zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
            labels_path.open("w", encoding="utf-8") as labels,
        ):
            archive.writestr(zipfile.ZipInfo("data/"), b"")  # the folder FiftyOne looks in, even when empty
            labels.write('{"labels": {')
            for key, rows in grouped.groups():
                try:
                    data = store.get(key)
                except ObjectNotFound:
                    missing += len(rows)
                    continue
                stem = rows[0]["sha256"]
                archive.writestr(f"data/{stem}.{key.rsplit('.', 1)[-1].lower()}", data)
                detections = [_fiftyone_detection(row, threshold) for row in rows]
                labels.write(("," if written else "") + "\n" + json.dumps(stem) + ": " + json.dumps(detections))
                names.update(row["class"] for row in rows)
                crops += len(rows)
                written += 1
            labels.write('\n}, "classes": ' + json.dumps(sorted(names)) + "}\n")
            labels.close()
            archive.write(labels_path, "labels.json", zipfile.ZIP_DEFLATED)
    finally:
        grouped.close()
        labels_path.unlink(missing_ok=True)
    return crops, written, missing


def _fiftyone_detection(row: dict[str, Any], threshold: float) -> dict[str, Any]:
    """One box as FiftyOne's detection dict: relative [x, y, w, h], the detector's confidence, our fields."""
    x1, y1, x2, y2 = row["box"]
    w, h = row["width"], row["height"]
    return {
        "label": row["class"],
        "bounding_box": [x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h],
        "confidence": round(row["score"], 4),
        "attributes": {
            "distance": row["distance"],
            "accepted": row["accepted"],
            "threshold": threshold,
            "crop_id": row["crop_id"],
            "answer": row["answer"],
        },
    }


# ---------------------------------------------------------------------------- label studio

LABEL_STUDIO_FROM, LABEL_STUDIO_TO = "label", "image"


def label_studio_config(names: list[str]) -> str:
    """The labelling config the tasks are made for: one image, rectangles with the job's classes."""
    from xml.sax.saxutils import quoteattr

    labels = "".join(f"\n    <Label value={quoteattr(n)}/>" for n in names)
    return (
        f'<View>\n  <Image name="{LABEL_STUDIO_TO}" value="$image"/>\n'
        f'  <RectangleLabels name="{LABEL_STUDIO_FROM}" toName="{LABEL_STUDIO_TO}">{labels}\n'
        "  </RectangleLabels>\n</View>\n"
    )


def labelstudio(
    job: Job, state: StateStore, store: ObjectStore, threshold: float, dest: Path, options: ExportOptions
) -> Written:
    """Label Studio tasks: each original's URL, its accepted boxes as a prediction scored by distance."""
    grouped = ImageGroups(dest.parent)
    crops = tasks = missing = 0
    try:
        for crop, image, distance in scored_crops(job, state, threshold, accepted_only=True):
            if image is None:
                missing += 1
                continue
            grouped.add(crop.image_key, _image_payload(crop, image, distance, threshold))
        with dest.open("w", encoding="utf-8") as out:
            out.write("[")
            for key, rows in grouped.groups():
                out.write(("," if tasks else "") + "\n" + json.dumps(_label_studio_task(key, rows, job, threshold)))
                crops += len(rows)
                tasks += 1
            out.write("\n]\n")
    finally:
        grouped.close()
    return crops, tasks, missing


def _label_studio_task(key: str, rows: list[dict[str, Any]], job: Job, threshold: float) -> dict[str, Any]:
    first = rows[0]
    w, h = first["width"], first["height"]
    results = []
    for row in rows:
        x1, y1, x2, y2 = row["box"]
        results.append({
            "id": row["crop_id"], "type": "rectanglelabels", "from_name": LABEL_STUDIO_FROM,
            "to_name": LABEL_STUDIO_TO, "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                      "height": 100 * (y2 - y1) / h, "rotation": 0, "rectanglelabels": [row["class"]]},
            "score": row["distance"],
        })  # fmt: skip
    data = {"image": first["image_url"], "page_url": first["page_url"], "source": first["source"],
            "title": first["title"], "license": first["license"], "license_url": first["license_url"],
            "author": first["author"], "imgsift_job": job.id, "imgsift_image_key": key}  # fmt: skip
    # The prediction's score is its least certain box's distance: sorting tasks by it, highest first,
    # puts the boxes nearest the threshold (the likeliest mistakes) at the top of the review.
    prediction = {"model_version": f"imgsift threshold {threshold}", "score": max(r["distance"] for r in rows),
                  "result": results}  # fmt: skip
    return {"data": data, "predictions": [prediction]}
