"""`imgsift verify --siamese-export`: a real job decides the same with the exported trunk as with torch.

The folder is real COCO128 crops (elephant references; elephants and six other animals to
judge). The job runs in-process through the command's own function, once per trunk; the
suggested threshold and every accept/reject decision at it (and at the median distance, a
threshold that splits the crops) are compared. A crop may decide otherwise only if its distance
is within the exports' distance bound of the threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgsift.verify import verify
from imgsift_common.model_exports import ExportFormat, missing_modules
from tests.cli.test_verify import OTHERS, _crops
from tests.support.coco import Coco128

# An export's rows are within 1e-4 of torch's (tests/siamese/test_export.py); a distance, a
# difference of unit vectors, moves by at most about twice that.
DISTANCE_BOUND = 2e-4


@pytest.fixture(scope="module")
def folders(coco128: Coco128, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify-export")
    refs, images = root / "refs", root / "images"
    refs.mkdir()
    images.mkdir()
    for i, im in enumerate(_crops(coco128, "elephant", 4)):
        im.save(refs / f"ref-{i}.jpg")
    for i, im in enumerate(_crops(coco128, "elephant", 6, skip=4)):
        im.save(images / f"elephant-{i}.jpg")
    for name in OTHERS:
        for i, im in enumerate(_crops(coco128, name, 3)):
            im.save(images / f"{name}-{i}.jpg")
    return {"refs": refs, "images": images, "root": root}


def _decisions(
    folders: dict[str, Path], export: str, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> tuple[dict, dict]:  # type: ignore[type-arg]
    monkeypatch.setenv("IMGSIFT_SIAMESE_EXPORT_DIR", str(cache))
    out = folders["root"] / f"out-{export}"
    verify(folders["refs"], folders["images"], out, threshold=None, train=False, negatives=None,
           negative_bank=None, export=export)  # fmt: skip
    rows = {r["crop"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    return rows, json.loads((out / "verify.json").read_text())


@pytest.mark.parametrize("export", [ExportFormat.OPENVINO])
def test_the_exported_trunk_decides_a_real_job_as_torch_does(
    folders: dict[str, Path], export: ExportFormat, monkeypatch: pytest.MonkeyPatch, siamese_export_dir: Path
) -> None:
    if missing := missing_modules(export):
        pytest.skip(f"no {', '.join(missing)}: pip install 'imgsift-siamese[{export.value}]'")
    torch_rows, torch_summary = _decisions(folders, "none", monkeypatch, siamese_export_dir)
    rows, summary = _decisions(folders, export.value, monkeypatch, siamese_export_dir)
    assert any((siamese_export_dir / d.name).is_dir() for d in siamese_export_dir.iterdir()), "no export was made"
    assert set(rows) == set(torch_rows) and len(rows) >= 15
    threshold = torch_summary["suggested_threshold"]
    assert threshold is not None and summary["suggested_threshold"] == pytest.approx(threshold, abs=DISTANCE_BOUND)
    worst = max(abs(rows[k]["distance"] - torch_rows[k]["distance"]) for k in rows)
    print(f"{export.value}: largest distance difference {worst:.1e}; threshold {threshold:.4f}")
    assert worst <= DISTANCE_BOUND
    # At the suggested threshold (here the label-free suggestion may accept everything: then also at
    # the median distance, where half the crops are on each side), the same decisions.
    median = sorted(r["distance"] for r in torch_rows.values())[len(torch_rows) // 2]
    for at in (threshold, median):
        differ = [k for k in rows if (rows[k]["distance"] <= at) != (torch_rows[k]["distance"] <= at)]
        assert all(abs(torch_rows[k]["distance"] - at) <= DISTANCE_BOUND for k in differ), (at, differ)
    flipped = [k for k in rows if rows[k]["accepted"] != torch_rows[k]["accepted"]]  # as each run wrote it
    assert all(abs(torch_rows[k]["distance"] - threshold) <= DISTANCE_BOUND for k in flipped), flipped
