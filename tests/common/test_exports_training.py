"""The training and review exports, read back with the libraries their users read them with.

Real photos (coco128) and their labelled boxes as crops, in the embedded SQLite store (the exports use
the StateStore interface only; test_exports runs that interface on every store). webdataset, pyarrow
and datasets read the files here. FiftyOne (it needs a MongoDB that does not install here) and
label-studio-sdk (it pins numpy and OpenCV against this venv's) run from an interpreter of their own
where IMGSIFT_TEST_FIFTYONE_PYTHON / IMGSIFT_TEST_LABELSTUDIO_PYTHON name one; otherwise those two
checks skip and the layout tests below check the formats as their documentation describes them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgsift_common.exports import ExportFormat, ExportStatus, export, parse_format, run_export, save_status
from imgsift_common.exports_training import label_studio_config
from imgsift_common.messages import (
    ExportMessage,
    ExportOptions,
    Job,
    utcnow,
)
from imgsift_common.sqlstate import SqlStateStore
from imgsift_common.storage import LocalStore
from tests.support.coco import Coco128
from tests.support.records import EXPORT_THRESHOLD, fill_job

JOB = "job-train-export"
THRESHOLD = EXPORT_THRESHOLD
HERE = Path(__file__).parent


@pytest.fixture
def filled(tmp_path: Path, coco128: Coco128):  # type: ignore[no-untyped-def]
    """The job of ``fill_job`` in the embedded SQLite store and a local folder."""
    store = LocalStore(tmp_path / "objects")
    state = SqlStateStore.sqlite(tmp_path / "state.sqlite")
    expected = fill_job(state, store, coco128, JOB)
    yield state.get_job(JOB), state, store, expected
    state.close()


def _accepted(expected: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {cid: e for cid, e in expected.items() if e["accepted"]}


def _unzip(path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(path) as archive:
        archive.extractall(folder)
    return folder


# ---------------------------------------------------------------------------- webdataset


def test_webdataset_shards_read_back_with_webdataset_match_the_manifest(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq
    import webdataset as wds

    job, state, store, expected = filled
    accepted = _accepted(expected)
    options = ExportOptions(samples_per_shard=3)
    result = export(ExportFormat.WEBDATASET, job, state, store, THRESHOLD, tmp_path / "wds.zip", options)
    assert result.crops == len(accepted) and result.missing == 0 and result.note is None
    out = _unzip(tmp_path / "wds.zip", tmp_path / "wds")
    shards = sorted(p.name for p in out.glob("*.tar"))
    want_shards = -(-len(accepted) // 3)
    assert shards == [f"{i:05d}.tar" for i in range(want_shards)]  # img2dataset's names
    for name in shards:
        assert (out / name.replace(".tar", "_stats.json")).exists() and (
            out / name.replace(".tar", ".parquet")
        ).exists()

    names = sorted({e["class"] for e in accepted.values()})
    urls = f"{out}/{{00000..{want_shards - 1:05d}}}.tar"
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == len(accepted)
    seen = set()
    for sample in samples:
        meta = sample["json"]
        want = accepted[meta["crop_id"]]
        assert sample["__key__"] == meta["key"] and len(meta["key"]) == 5 + 1  # 00000 + one digit for 3 per shard
        assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].size == want["crop_size"]
        assert sample["cls"] == names.index(want["class"]) == meta["class_index"]
        assert meta["class"] == want["class"] and meta["accepted"] is True
        assert meta["distance"] == pytest.approx(want["distance"]) and meta["threshold"] == THRESHOLD
        assert meta["box"] == pytest.approx(list(want["box"]), abs=0.01)
        assert meta["license"] == "cc-by" and meta["author"] == want["author"] and meta["url"] == want["image_url"]
        assert sample.get("txt") == want["title"]  # a caption only where the source gave a title
        seen.add(meta["crop_id"])
    assert seen == set(accepted)

    stats = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(want_shards)]
    assert sum(s["successes"] for s in stats) == len(accepted) and all(s["count"] <= 3 for s in stats)
    table = pq.read_table(out / "00000.parquet")
    assert table.column("key").to_pylist() == [s["__key__"] for s in samples[: table.num_rows]]
    assert str(table.schema.field("distance").type) == "double"


def test_webdataset_with_originals_holds_the_whole_photos(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import webdataset as wds

    job, state, store, expected = filled
    accepted = _accepted(expected)
    export(ExportFormat.WEBDATASET, job, state, store, THRESHOLD, tmp_path / "o.zip", ExportOptions(originals=True))
    out = _unzip(tmp_path / "o.zip", tmp_path / "o")
    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode("pil"))
    assert len(samples) == len(accepted)
    for sample in samples:
        want = accepted[sample["json"]["crop_id"]]
        assert sample["jpg"].size == want["image_size"] and sample["json"]["image"] == "original"


# ---------------------------------------------------------------------------- parquet


def test_parquet_is_the_jsonl_manifest_typed_with_optional_crop_bytes(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa
    import pyarrow.parquet as pq

    job, state, store, expected = filled
    export(ExportFormat.JSONL, job, state, store, THRESHOLD, tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    result = export(ExportFormat.PARQUET, job, state, store, THRESHOLD, tmp_path / "m.parquet")
    table = pq.read_table(tmp_path / "m.parquet")
    assert result.crops == table.num_rows == len(rows) == len(expected)
    assert table.column_names == list(rows[0])
    schema = table.schema
    assert schema.field("accepted").type == pa.bool_() and schema.field("distance").type == pa.float64()
    assert schema.field("box").type == pa.list_(pa.float64()) and schema.field("image_width").type == pa.int32()
    assert pa.types.is_timestamp(schema.field("fetched_at").type)
    for got, want in zip(table.to_pylist(), rows, strict=True):
        assert got["fetched_at"].isoformat() == want.pop("fetched_at")
        assert {k: got[k] for k in want} == want
    assert [r["answer"] for r in table.to_pylist()].count("right") == 1

    export(ExportFormat.PARQUET, job, state, store, THRESHOLD, tmp_path / "e.parquet", ExportOptions(embed_images=True))
    embedded = pq.read_table(tmp_path / "e.parquet")
    for row in embedded.select(["crop_key", "jpg"]).to_pylist():
        assert row["jpg"] == store.get(row["crop_key"])


# ---------------------------------------------------------------------------- hugging face


def _load_hf(folder: Path, cache: Path):  # type: ignore[no-untyped-def]
    """``datasets.load_dataset`` on the folder, offline, with a cache of the test's own."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    return datasets.load_dataset(str(folder), split="train", cache_dir=str(cache))


def test_huggingface_folder_loads_offline_with_image_and_class_label(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import datasets

    job, state, store, expected = filled
    accepted = _accepted(expected)
    result = export(ExportFormat.HUGGINGFACE, job, state, store, THRESHOLD, tmp_path / "hf.zip",
                    ExportOptions(samples_per_shard=4))  # fmt: skip
    folder = _unzip(tmp_path / "hf.zip", tmp_path / "hf")
    assert len(list((folder / "data").glob("train-*.parquet"))) == -(-len(accepted) // 4)
    ds = _load_hf(folder, tmp_path / "cache")
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.ClassLabel)
    names = sorted({e["class"] for e in accepted.values()})
    assert ds.features["label"].names == names and len(ds) == result.crops == len(accepted)
    for row in ds:
        want = accepted[row["crop_id"]]
        assert isinstance(row["image"], Image.Image) and row["image"].size == want["crop_size"]
        assert ds.features["label"].int2str(row["label"]) == want["class"]
        assert row["distance"] == pytest.approx(want["distance"]) and row["license"] == "cc-by"
        assert row["image_url"] == want["image_url"] and row["author"] == want["author"]
    card = (folder / "README.md").read_text()
    assert f"<= **{THRESHOLD}**" in card and f"accepted crops in this dataset: {len(accepted)}" in card
    assert "| cc-by | https://cc/by |" in card and "| Author 0 |" in card and "| site |" in card
    assert "huggingface-cli upload" in card


# ---------------------------------------------------------------------------- fiftyone


def test_fiftyone_export_has_fiftyones_documented_detection_layout(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """FiftyOneImageDetectionDataset: ``data/<uuid>.<ext>`` and ``labels.json`` {classes, labels: {uuid:
    [{label, bounding_box: relative [x, y, w, h], confidence, attributes}]}} (FiftyOne's dataset-types docs)."""
    job, state, store, expected = filled
    result = export(ExportFormat.FIFTYONE, job, state, store, THRESHOLD, tmp_path / "fo.zip")
    folder = _unzip(tmp_path / "fo.zip", tmp_path / "fo")
    labels = json.loads((folder / "labels.json").read_text())
    assert labels["classes"] == sorted({e["class"] for e in expected.values()})
    assert result.crops == sum(len(d) for d in labels["labels"].values()) == len(expected)
    by_crop = {}
    for uuid, detections in labels["labels"].items():
        image = next((folder / "data").glob(f"{uuid}.*"))
        with Image.open(image) as im:
            w, h = im.size
        for d in detections:
            x, y, bw, bh = d["bounding_box"]
            assert 0 <= x <= 1 and 0 <= y <= 1 and 0 < bw <= 1 and 0 < bh <= 1
            by_crop[d["attributes"]["crop_id"]] = (d, (x * w, y * h, (x + bw) * w, (y + bh) * h))
    assert set(by_crop) == set(expected)
    for cid, (d, box) in by_crop.items():
        want = expected[cid]
        assert d["label"] == want["class"] and box == pytest.approx(want["box"], abs=0.01)
        assert d["attributes"]["accepted"] is want["accepted"] and d["attributes"]["distance"] == pytest.approx(
            want["distance"]
        )


def _other_python(variable: str, module: str) -> str:
    """The interpreter that has ``module``: the one ``variable`` names, else this one if it has it."""
    named = os.environ.get(variable)
    if named:
        return named
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    pytest.skip(f"{module} is not installed here; set {variable} to a Python that has it")


def test_fiftyone_reads_the_export_with_its_own_importer(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    python = _other_python("IMGSIFT_TEST_FIFTYONE_PYTHON", "fiftyone")
    job, state, store, expected = filled
    export(ExportFormat.FIFTYONE, job, state, store, THRESHOLD, tmp_path / "fo.zip")
    folder = _unzip(tmp_path / "fo.zip", tmp_path / "fo")
    run = subprocess.run([python, str(HERE / "fiftyone_check.py"), str(folder)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HOME": str(tmp_path)})  # fmt: skip
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(found) == sorted(expected)
    for cid, (label, distance, accepted) in found.items():
        want = expected[cid]
        assert label == want["class"] and distance == pytest.approx(want["distance"]) and accepted is want["accepted"]


# ---------------------------------------------------------------------------- label studio


def test_labelstudio_tasks_hold_urls_and_accepted_boxes_as_predictions(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Label Studio's import format: [{data: {image: URL}, predictions: [{model_version, score, result:
    [{id, type: rectanglelabels, from_name, to_name, original_width, original_height, value: {x, y, width,
    height (percent), rectanglelabels}}]}]}]."""
    job, state, store, expected = filled
    accepted = _accepted(expected)
    result = export(ExportFormat.LABELSTUDIO, job, state, store, THRESHOLD, tmp_path / "ls.json")
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert result.images == len(tasks) == len({e["sha"] for e in accepted.values()})
    seen = {}
    for task in tasks:
        assert task["data"]["image"].startswith("http://127.0.0.1/")
        (prediction,) = task["predictions"]
        scores = []
        for region in prediction["result"]:
            v, w, h = region["value"], region["original_width"], region["original_height"]
            box = (
                v["x"] * w / 100,
                v["y"] * h / 100,
                (v["x"] + v["width"]) * w / 100,
                (v["y"] + v["height"]) * h / 100,
            )
            want = accepted[region["id"]]
            assert (w, h) == want["image_size"] and task["data"]["image"] == want["image_url"]
            assert v["rectanglelabels"] == [want["class"]] and box == pytest.approx(want["box"], abs=0.01)
            assert region["score"] == pytest.approx(want["distance"]) and region["type"] == "rectanglelabels"
            scores.append(region["score"])
            seen[region["id"]] = True
        assert prediction["score"] == max(scores)
    assert set(seen) == set(accepted)


def test_label_studio_sdk_accepts_the_predictions(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    python = _other_python("IMGSIFT_TEST_LABELSTUDIO_PYTHON", "label_studio_sdk")
    job, state, store, expected = filled
    export(ExportFormat.LABELSTUDIO, job, state, store, THRESHOLD, tmp_path / "ls.json")
    config = tmp_path / "config.xml"
    config.write_text(label_studio_config(sorted({e["class"] for e in expected.values()})))
    run = subprocess.run([python, str(HERE / "labelstudio_check.py"), str(config), str(tmp_path / "ls.json")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "tasks": len(json.loads((tmp_path / "ls.json").read_text())),
        "errors": [],
    }


# ---------------------------------------------------------------------------- empty jobs, unknown formats


def test_nothing_accepted_gives_a_valid_empty_dataset_in_every_format(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq
    import webdataset as wds

    job, state, store, expected = filled
    low = 0.0  # every crop is farther than this
    for fmt in ExportFormat:
        dest = tmp_path / f"empty-{fmt.value}{fmt.suffix}"
        result = export(fmt, job, state, store, low, dest)
        if fmt.is_manifest:
            assert result.crops == len(expected)  # a manifest lists the rejected crops too
            continue
        assert result.crops == 0 and result.note and "valid, empty dataset" in result.note
    with zipfile.ZipFile(tmp_path / "empty-imagefolder.zip") as archive:
        assert archive.namelist() == []
    with zipfile.ZipFile(tmp_path / "empty-yolo.zip") as archive:
        assert "data.yaml" in archive.namelist()
    assert json.loads((tmp_path / "empty-coco.json").read_text())["annotations"] == []
    assert json.loads((tmp_path / "empty-labelstudio.json").read_text()) == []
    out = _unzip(tmp_path / "empty-webdataset.zip", tmp_path / "w")
    assert list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False, empty_check=False)) == []
    assert json.loads((out / "00000_stats.json").read_text())["count"] == 0
    # datasets 5.2's load_dataset refuses any empty split ("corresponds to no data"), even the Parquet file
    # its own Dataset.to_parquet writes for an empty dataset; the export is that file: its schema still
    # carries the features, which datasets reads back.
    import datasets

    shard = _unzip(tmp_path / "empty-huggingface.zip", tmp_path / "h") / "data" / "train-00000.parquet"
    assert pq.read_table(shard).num_rows == 0
    features = datasets.Features.from_arrow_schema(pq.read_schema(shard))
    assert isinstance(features["image"], datasets.Image) and isinstance(features["label"], datasets.ClassLabel)
    assert "Nothing was accepted at threshold 0.0" in (tmp_path / "h" / "README.md").read_text()
    # The manifests of a job with no compared crop at all are empty too, and keep their columns.
    other = Job(id="job-none", spec=job.spec)
    state.create_job(other)
    for fmt in (ExportFormat.PARQUET, ExportFormat.FIFTYONE, ExportFormat.JSONL):
        result = export(fmt, other, state, store, THRESHOLD, tmp_path / f"none{fmt.suffix}")
        assert result.crops == 0 and "no crop was compared" in (result.note or "")
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    labels = json.loads(_unzip(tmp_path / "none.zip", tmp_path / "n").joinpath("labels.json").read_text())
    assert labels == {"labels": {}, "classes": []}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".imgsift-group-") or p.suffix == ".part"]
    assert leftovers == []  # the on-disk grouping and the partial files are gone


def test_an_unknown_format_names_the_known_ones(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"unknown format 'pdf'; use one of .*webdataset.*labelstudio"):
        parse_format("pdf")
    assert parse_format(" HuggingFace ") is ExportFormat.HUGGINGFACE
    job, state, store, _ = filled
    status = ExportStatus(id="a" * 32, format=ExportFormat.JSONL, threshold=0.5, state="queued", created_at=utcnow())
    save_status(state, job.id, status)
    message = ExportMessage(job_id=job.id, export_id="a" * 32, format="tfrecord", threshold=0.5)
    failed = run_export(message, state, store, tmp_path)
    assert failed is not None and failed.state == "failed" and "use one of" in (failed.error or "")
