"""`imgsift verify`: the Siamese stage alone over a folder of real COCO crops, with and without training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support.coco import Coco128

IMGSIFT = str(Path(sys.executable).parent / "imgsift")
ENV = {**os.environ, "COLUMNS": "300"}
OTHERS = ("giraffe", "zebra", "dog", "horse", "cow", "bear")


def _crops(coco: Coco128, name: str, n: int, skip: int = 0) -> list[Image.Image]:
    found = []
    for photo in coco.images:
        for box in coco.labels(photo):
            x0, y0, x1, y1 = box.box
            if box.class_name == name and min(x1 - x0, y1 - y0) >= 40:
                with Image.open(photo) as im:
                    found.append(im.convert("RGB").crop((round(x0), round(y0), round(x1), round(y1))))
    return found[skip : skip + n]


@pytest.fixture(scope="module")
def folders(coco128: Coco128, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    refs, images, bank = root / "refs", root / "images", root / "bank"
    for d in (refs, images / "sub", bank):
        d.mkdir(parents=True)
    for i, im in enumerate(_crops(coco128, "elephant", 4)):
        im.save(refs / f"ref-{i}.jpg")
    for i, im in enumerate(_crops(coco128, "elephant", 5, skip=4)):
        im.save(images / f"elephant-{i}.jpg")
    for name in OTHERS:
        for i, im in enumerate(_crops(coco128, name, 2)):
            im.save(images / "sub" / f"{name}-{i}.jpg")
        for i, im in enumerate(_crops(coco128, name, 3, skip=2)):
            im.save(bank / f"{name}-{i}.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("ignored: not an image suffix")
    return {"refs": refs, "images": images, "bank": bank, "root": root}


def _run(folders: dict[str, Path], out: Path, *extra: str) -> tuple[list[dict], dict]:  # type: ignore[type-arg]
    command = [IMGSIFT, "verify", "--refs", str(folders["refs"]), "--images", str(folders["images"]),
               "--out", str(out), *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "verify.json").read_text())


def _separated(rows: list[dict]) -> float:  # type: ignore[type-arg]
    """Share of (elephant, other) pairs where the elephant is nearer the references."""
    eleph = [r["distance"] for r in rows if r["crop"].startswith("elephant")]
    other = [r["distance"] for r in rows if not r["crop"].startswith("elephant")]
    return sum(e < o for e in eleph for o in other) / (len(eleph) * len(other))


def test_verify_writes_the_collect_layout_and_suggests_a_threshold(folders: dict[str, Path]) -> None:
    out = folders["root"] / "out-plain"
    rows, summary = _run(folders, out)
    written = [p for p in folders["images"].rglob("*.jpg") if p.name != "broken.jpg"]
    assert len(rows) == len(written) >= 10  # the broken file is reported, not scored
    assert summary["unreadable"] == [str(folders["images"] / "broken.jpg")]
    assert {r["crop"] for r in rows} >= {"elephant-0.jpg", "sub/giraffe-0.jpg"}
    assert summary["threshold"] == summary["suggested_threshold"] is not None
    accepted = [r for r in rows if r["accepted"]]
    assert all(r["distance"] <= summary["threshold"] for r in accepted)
    assert sorted(p.name for p in (out / "accepted").iterdir()) == sorted(r["output"].split("/")[-1] for r in accepted)
    assert len(list((out / "rejected").iterdir())) == len(rows) - len(accepted)
    assert (out / "rejected" / "sub__giraffe-0.jpg").exists() or (out / "accepted" / "sub__giraffe-0.jpg").exists()
    assert _separated(rows) >= 0.8

    fixed, summary = _run(folders, folders["root"] / "out-fixed", "--threshold", "2.0")
    assert summary["threshold"] == 2.0 and all(r["accepted"] for r in fixed)


def test_verify_with_training_and_not_this_images(folders: dict[str, Path]) -> None:
    plain, _ = _run(folders, folders["root"] / "out-a")
    trained, summary = _run(folders, folders["root"] / "out-b", "--train", "--negative-bank", str(folders["bank"]))
    assert summary["trained"] is True and summary["suggested_threshold"] is not None
    print(f"elephant-before-other pairs: pretrained {_separated(plain):.2f}, fine-tuned {_separated(trained):.2f}")
    # Fine-tuning on 4 references and 18 bank images is a small sample: this checks the
    # mechanics; bench/quality_bench.py measures whether training pays (docs/quality.md).
    assert _separated(trained) >= 0.7 and any(r["accepted"] for r in trained)

    # A giraffe as "not this": giraffes move away from the references.
    not_this = folders["root"] / "not-this"
    not_this.mkdir()
    (not_this / "g.jpg").write_bytes((folders["images"] / "sub" / "giraffe-0.jpg").read_bytes())
    moved, _ = _run(folders, folders["root"] / "out-c", "--negatives", str(not_this))
    before = {r["crop"]: r["distance"] for r in plain}
    after = {r["crop"]: r["distance"] for r in moved}
    assert after["sub/giraffe-0.jpg"] > before["sub/giraffe-0.jpg"]
    assert after["elephant-0.jpg"] == pytest.approx(before["elephant-0.jpg"], abs=1e-4) or (
        after["elephant-0.jpg"] >= before["elephant-0.jpg"]
    )


def test_verify_refuses_bad_input_with_a_reason(folders: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [IMGSIFT, "verify", "--refs", str(empty), "--images", str(folders["images"]), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert result.returncode == 2 and "no reference images" in result.stderr
    result = subprocess.run(
        [IMGSIFT, "verify", "--refs", str(tmp_path / "none"), "--images", str(empty), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_questions_and_answers_on_a_verify_folder(folders: dict[str, Path]) -> None:
    out = folders["root"] / "out-answers"
    rows, summary = _run(folders, out)
    assert summary["needs_answers"] is True and summary["threshold"] == 2.0  # 14 crops: too few to trust alone
    asked = subprocess.run([IMGSIFT, "questions", "--out", str(out), "-n", "6"], capture_output=True, text=True,
                           timeout=120, env=ENV)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    questions = asked.stdout.split()
    assert len(questions) == 6 and set(questions) <= {r["crop"] for r in rows}  # input files, relative to --images
    flags = [arg for q in questions for arg in ("--right" if q.startswith("elephant") else "--wrong", q)]
    result = subprocess.run([IMGSIFT, "answer", "--out", str(out), "--quiet", *flags],
                            capture_output=True, text=True, timeout=600, env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "6 answers recorded" in result.stdout and "from 6 answers" in result.stdout
    after = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["crop"] for r in after} == {r["crop"] for r in rows}
    assert {r["crop"]: r["distance"] for r in after} == {r["crop"]: r["distance"] for r in rows}  # no re-score
    assert {r["crop"]: r["answer"] for r in after if r["answer"]} == {
        q: "right" if q.startswith("elephant") else "wrong" for q in questions
    }
    threshold = after[0]["threshold"]
    assert threshold < 2.0  # the answers settled a threshold below "accept everything"
    assert all(r["accepted"] == (r["distance"] <= threshold) for r in after)
    assert sorted(p.name for p in (out / "accepted").iterdir()) == sorted(
        r["output"].split("/")[-1] for r in after if r["accepted"]
    )
    # Training on them: the answered crops join the positives and the hard negatives, every crop is
    # scored again. (Whether that pays is bench/quality_bench.py's question: 14 crops say little.)
    trained = subprocess.run([IMGSIFT, "answer", "--out", str(out), "--train", "--quiet", *flags[:2]],
                             capture_output=True, text=True, timeout=600, env=ENV)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "Siamese head v1 trained on the answers" in trained.stdout and "from 6 answers" in trained.stdout
    final = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["crop"] for r in final} == {r["crop"] for r in rows}
    assert {r["crop"]: r["distance"] for r in final} != {r["crop"]: r["distance"] for r in after}
    assert sum(1 for r in final if r["answer"]) == 6  # answering a crop again replaced its answer
