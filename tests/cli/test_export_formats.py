"""`imgsift export --format` for the training and review formats, on a collect folder of real photos.

The folder is laid out as `imgsift collect` leaves it (`.imgsift/state.sqlite`, `.imgsift/objects`), filled
by the records the workers write (tests/common/test_exports_training.fill_job) rather than by a whole
collect run, which tests/cli/test_collect already makes for the first five formats.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from imgsift.cli import app
from imgsift.embedded import STATE_DIR
from imgsift_common.sqlstate import SqlStateStore
from imgsift_common.storage import LocalStore
from tests.common.test_exports_training import fill_job
from tests.support.coco import Coco128


def test_export_writes_each_new_format_with_its_options(tmp_path: Path, coco128: Coco128) -> None:
    out = tmp_path / "collected"
    (out / STATE_DIR).mkdir(parents=True)
    state = SqlStateStore.sqlite(out / STATE_DIR / "state.sqlite")
    expected = fill_job(state, LocalStore(out / STATE_DIR / "objects"), coco128, "local")
    state.close()
    accepted = {cid for cid, e in expected.items() if e["accepted"]}
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["export", "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        return result.output

    said = run("--format", "webdataset", "--samples-per-shard", "2", "--originals")
    assert f"webdataset: {len(accepted)} crops" in said and "exports/webdataset-0.5.zip" in said
    with zipfile.ZipFile(out / "exports" / "webdataset-0.5.zip") as archive:
        tars = [n for n in archive.namelist() if n.endswith(".tar")]
        assert len(tars) == -(-len(accepted) // 2)
        stats = json.loads(archive.read("00000_stats.json"))
        assert stats["successes"] == 2 and stats["imgsift"]["originals"] is True

    run("--format", "Parquet", "--embed-images", "--to", str(tmp_path / "m.parquet"))
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.num_rows == len(expected) and "jpg" in table.column_names

    run("--format", "huggingface", "--to", str(tmp_path / "hf.zip"))
    with zipfile.ZipFile(tmp_path / "hf.zip") as archive:
        assert "README.md" in archive.namelist() and "data/train-00000.parquet" in archive.namelist()

    run("--format", "fiftyone", "--to", str(tmp_path / "fo.zip"))
    with zipfile.ZipFile(tmp_path / "fo.zip") as archive:
        labels = json.loads(archive.read("labels.json"))
        assert sum(len(d) for d in labels["labels"].values()) == len(expected)

    said = run("--format", "labelstudio", "--to", str(tmp_path / "ls.json"))
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert sum(len(t["predictions"][0]["result"]) for t in tasks) == len(accepted)
    config = (tmp_path / "ls.json.label_config.xml").read_text()
    assert "Label Studio project config" in said and '<RectangleLabels name="label" toName="image">' in config

    empty = run("--format", "webdataset", "--threshold", "0.0", "--to", str(tmp_path / "e.zip"))
    assert "nothing was accepted at 0.0: the webdataset export is a valid, empty dataset" in empty

    bad = runner.invoke(app, ["export", "--out", str(out), "--format", "tfrecord"], env={"COLUMNS": "300"})
    assert bad.exit_code == 2 and "use one of imagefolder, yolo, coco, jsonl, csv, webdataset" in bad.output
