"""`imgsift verify --siamese-export`: a real job decides the same with the exported trunk as with torch.

The folder is real COCO128 crops (elephant references; elephants and six other animals to
judge). The job runs in-process through the command's own function, once with torch (shared by
the cases) and once per exported trunk; the suggested threshold and every accept/reject decision
at it (and between the two middle distances, a threshold that splits the crops) are compared. A
crop may decide otherwise only if its distance is within the trunk's distance bound of the
threshold, and only MAX_FLIPS crops at most.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgsift.verify import verify
from imgsift_common.model_exports import ExportFormat, missing_modules
from tests.cli.test_verify import OTHERS, _crops
from tests.siamese.test_export import BF16_DISTANCE, require_native_bf16
from tests.support.coco import Coco128

# An f32 export's rows are within 1e-4 of torch's (tests/siamese/test_export.py); a distance, a
# difference of unit vectors, moves by at most about twice that. A bf16 trunk's distances (crops
# and references both in bf16) move by up to BF16_DISTANCE (measured there on real crops).
DISTANCE_BOUND = {"f32": 2e-4, "bf16": BF16_DISTANCE}
# Decisions that may flip at a threshold: only crops within the bound of it. In bf16 that band is
# wide enough to hold a few of this job's crops; more than this many flipping would mean distances
# move further than the row test measured, or crops crowd the threshold as they do not here.
MAX_FLIPS = {"f32": 0, "bf16": 2}


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


def _decisions(folders: dict[str, Path], export: str, precision: str, cache: Path) -> tuple[dict, dict]:  # type: ignore[type-arg]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("IMGSIFT_SIAMESE_EXPORT_DIR", str(cache))
        out = folders["root"] / f"out-{export}-{precision}"
        verify(folders["refs"], folders["images"], out, threshold=None, train=False, negatives=None,
               negative_bank=None, export=export, export_precision=precision)  # fmt: skip
    rows = {r["crop"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    return rows, json.loads((out / "verify.json").read_text())


@pytest.fixture(scope="module")
def torch_decisions(folders: dict[str, Path], siamese_export_dir: Path) -> tuple[dict, dict]:  # type: ignore[type-arg]
    return _decisions(folders, "none", "f32", siamese_export_dir)


@pytest.mark.parametrize(
    ("export", "precision"), [(ExportFormat.OPENVINO, "f32"), (ExportFormat.OPENVINO, "bf16")], ids=["f32", "bf16"]
)
def test_the_exported_trunk_decides_a_real_job_as_torch_does(
    folders: dict[str, Path],
    export: ExportFormat,
    precision: str,
    torch_decisions: tuple[dict, dict],  # type: ignore[type-arg]
    siamese_export_dir: Path,
) -> None:
    if missing := missing_modules(export):
        pytest.skip(f"no {', '.join(missing)}: pip install 'imgsift-siamese[{export.value}]'")
    if precision == "bf16":
        require_native_bf16()
    bound = DISTANCE_BOUND[precision]
    torch_rows, torch_summary = torch_decisions
    rows, summary = _decisions(folders, export.value, precision, siamese_export_dir)
    assert any((siamese_export_dir / d.name).is_dir() for d in siamese_export_dir.iterdir()), "no export was made"
    assert set(rows) == set(torch_rows) and len(rows) >= 15
    threshold = torch_summary["suggested_threshold"]
    assert threshold is not None and summary["suggested_threshold"] == pytest.approx(threshold, abs=bound)
    worst = max(abs(rows[k]["distance"] - torch_rows[k]["distance"]) for k in rows)
    print(f"{export.value} {precision}: largest distance difference {worst:.1e}; threshold {threshold:.4f}, "
          f"suggested {summary['suggested_threshold']:.4f}")  # fmt: skip
    assert worst <= bound
    # At the suggested threshold (here the label-free suggestion may accept everything: then also
    # between the two middle distances, where half the crops are on each side), the same decisions
    # but for crops within the bound of it, and few of those.
    ordered = sorted(r["distance"] for r in torch_rows.values())
    middle = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    for at in (threshold, middle):
        differ = [k for k in rows if (rows[k]["distance"] <= at) != (torch_rows[k]["distance"] <= at)]
        near = sum(abs(r["distance"] - at) <= bound for r in torch_rows.values())
        print(f"  at {at:.4f}: {len(differ)} decisions differ, {near} crops within {bound:g} of it")
        assert all(abs(torch_rows[k]["distance"] - at) <= bound for k in differ), (at, differ)
        assert len(differ) <= MAX_FLIPS[precision], (at, differ)
    # As each run wrote them, at its own suggested threshold (within the bound of torch's): a crop may
    # flip only within twice the bound of torch's threshold.
    flipped = [k for k in rows if rows[k]["accepted"] != torch_rows[k]["accepted"]]
    assert all(abs(torch_rows[k]["distance"] - threshold) <= 2 * bound for k in flipped), flipped
    assert len(flipped) <= MAX_FLIPS[precision], flipped
