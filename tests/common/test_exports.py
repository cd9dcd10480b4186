"""Exports of a job at a threshold, from both state stores, checked with the loaders users use."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from imgsift_common.exports import ExportFormat, export
from imgsift_common.storage import LocalStore
from tests.support.coco import Coco128
from tests.support.records import EXPORT_THRESHOLD, fill_job

JOB = "job-export"
THRESHOLD = EXPORT_THRESHOLD


@pytest.fixture
def filled(state_store, tmp_path: Path, coco128: Coco128):  # type: ignore[no-untyped-def]
    """Real photos with their labelled boxes as crops (``fill_job``); every other crop is accepted."""
    store = LocalStore(tmp_path / "objects")
    crops = fill_job(state_store, store, coco128, JOB)
    expected = [(cid, e["class"] or "", e["box"], e["accepted"]) for cid, e in crops.items()]
    authors = {e["author"] for e in crops.values()}
    return state_store.get_job(JOB), state_store, store, expected, authors


def test_imagefolder_zip_holds_the_accepted_crops_by_class(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, state, store, expected, _ = filled
    result = export(ExportFormat.IMAGEFOLDER, job, state, store, THRESHOLD, tmp_path / "crops.zip")
    accepted = [e for e in expected if e[3]]
    assert result.crops == len(accepted) and result.missing == 0
    with zipfile.ZipFile(tmp_path / "crops.zip") as archive:
        names = sorted(archive.namelist())
        assert names == sorted(f"{c.replace(' ', '_')}/{cid}.jpg" for cid, c, _, _ in accepted)
        Image.open(io.BytesIO(archive.read(names[0]))).verify()


def test_yolo_dataset_labels_are_exactly_the_accepted_boxes(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, state, store, expected, _ = filled
    result = export(ExportFormat.YOLO, job, state, store, THRESHOLD, tmp_path / "yolo.zip")
    out = tmp_path / "yolo"
    with zipfile.ZipFile(tmp_path / "yolo.zip") as archive:
        archive.extractall(out)
    data = yaml.safe_load((out / "data.yaml").read_text())
    names = data["names"]
    assert data["train"] == "images" and sorted(names.values()) == sorted({c for _, c, _, ok in expected if ok})
    found = []
    for label_file in sorted((out / "labels").iterdir()):
        image = next((out / "images").glob(label_file.stem + ".*"))
        with Image.open(image) as im:
            w, h = im.size
        for line in label_file.read_text().splitlines():
            cls, cx, cy, bw, bh = line.split()
            x1, y1 = (float(cx) - float(bw) / 2) * w, (float(cy) - float(bh) / 2) * h
            x2, y2 = (float(cx) + float(bw) / 2) * w, (float(cy) + float(bh) / 2) * h
            found.append((names[int(cls)], (x1, y1, x2, y2)))
    want = [(c, box) for _, c, box, ok in expected if ok]
    assert len(found) == result.crops == len(want)
    for (got_name, got_box), (want_name, want_box) in zip(sorted(found), sorted(want), strict=True):
        assert got_name == want_name and got_box == pytest.approx(want_box, abs=0.01)


def test_coco_json_loads_with_pycocotools_and_holds_the_accepted_boxes(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pycocotools.coco import COCO

    job, state, store, expected, _ = filled
    export(ExportFormat.COCO, job, state, store, THRESHOLD, tmp_path / "coco.json")
    coco = COCO(str(tmp_path / "coco.json"))
    accepted = [e for e in expected if e[3]]
    assert len(coco.getAnnIds()) == len(accepted)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    got = sorted((names[a["category_id"]], a["bbox"]) for a in coco.loadAnns(coco.getAnnIds()))
    want = sorted((c, [b[0], b[1], b[2] - b[0], b[3] - b[1]]) for _, c, b, _ in accepted)
    for (got_name, got_box), (want_name, want_box) in zip(got, want, strict=True):
        assert got_name == want_name and got_box == pytest.approx(want_box, abs=0.01)
    image = coco.loadImgs(coco.getImgIds()[0])[0]
    assert image["coco_url"].startswith("http://127.0.0.1/") and coco.dataset["licenses"][0]["name"] == "cc-by"


@pytest.mark.parametrize("fmt", [ExportFormat.JSONL, ExportFormat.CSV])
def test_manifests_list_every_compared_crop_with_provenance(filled, tmp_path: Path, fmt: ExportFormat) -> None:  # type: ignore[no-untyped-def]
    job, state, store, expected, authors = filled
    dest = tmp_path / f"manifest{fmt.suffix}"
    result = export(fmt, job, state, store, THRESHOLD, dest)
    if fmt is ExportFormat.JSONL:
        rows = [json.loads(line) for line in dest.read_text().splitlines()]
    else:
        rows = list(csv.DictReader(dest.open()))
        for row in rows:
            row["accepted"] = row["accepted"] == "True"
    assert result.crops == len(rows) == len(expected)
    assert sorted((r["crop_id"], r["accepted"]) for r in rows) == sorted((e[0], e[3]) for e in expected)
    assert {r["license"] for r in rows} == {"cc-by"} and {r["author"] for r in rows} == authors
    assert not (tmp_path / f"manifest{fmt.suffix}.part").exists()
