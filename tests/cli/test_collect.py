"""`imgsift collect`, the embedded mode, run as a real command against a local web of real photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from imgsift.cli import parse_source
from tests.support.coco import COCO_NAMES, Coco128
from tests.support.web import TestWeb, build_photo_site

PERSON = COCO_NAMES.index("person")
IMGSIFT = str(Path(sys.executable).parent / "imgsift")
# The test web runs on 127.0.0.1, which the crawler refuses unless allowlisted (docs/crawler.md).
ENV = {
    **os.environ,
    "IMGSIFT_CRAWLER_NETWORK_ALLOWLIST": '["127.0.0.1/32"]',
    "IMGSIFT_CRAWLER_PER_HOST_INTERVAL": "0.05",
}


def _bundled_mobilenet_v2() -> Path:
    from imgsift_siamese.backbone import bundled_mobilenet_v2_weights

    return bundled_mobilenet_v2_weights()


@pytest.fixture(scope="module")
def web() -> Iterator[TestWeb]:
    server = TestWeb().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("collect")


@pytest.fixture(scope="module")
def first_run(web: TestWeb, workdir: Path, coco128: Coco128, yolo_weights: Path) -> dict[str, object]:
    """One real run of the exact command form from the README, with copies of the weights."""
    people = coco128.with_class("person")
    refs_dir = workdir / "refs"
    refs_dir.mkdir()
    for photo in people[:2]:  # references cut from photos the web does not serve
        with Image.open(photo) as im:
            people_boxes = [b for b in coco128.labels(photo) if b.class_id == PERSON]
            for i, box in enumerate(b for b in people_boxes if min(b.box[2] - b.box[0], b.box[3] - b.box[1]) >= 48):
                im.convert("RGB").crop(tuple(round(v) for v in box.box)).save(refs_dir / f"{photo.stem}-{i}.jpg")
    served = people[2:6] + [p for p in coco128.images if p not in people][:3]
    index = build_photo_site(web, served[:5])
    urls_file = workdir / "urls.txt"
    urls_file.write_text("\n".join(web.add_image(f"/direct/{p.name}", p) for p in served[5:]) + "\n")
    yolo_copy = workdir / "yolo.pt"
    shutil.copy(yolo_weights, yolo_copy)
    mobilenet_copy = workdir / "mobilenet_v2.pt"
    shutil.copy(_bundled_mobilenet_v2(), mobilenet_copy)
    out = workdir / "out"
    command = [
        IMGSIFT, "collect",
        "--source", f"urls:{urls_file}", "--source", f"site:{index}",
        "--target", "person", "--refs", str(refs_dir), "--threshold", "0.85", "--out", str(out),
        "--yolo-weights", str(yolo_copy), "--backbone", "mobilenet_v2", "--siamese-weights", str(mobilenet_copy),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr
    return {"out": out, "command": command, "served": served, "stdout": result.stdout, "stderr": result.stderr}


def _manifest(out: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_collect_writes_crops_and_a_manifest_with_provenance(first_run: dict, coco128: Coco128) -> None:  # type: ignore[type-arg]
    out: Path = first_run["out"]
    rows = _manifest(out)
    assert rows, first_run["stderr"]
    assert "detect" in first_run["stderr"] and "compare" in first_run["stderr"]  # progress bars
    by_name = {p.name: p for p in first_run["served"]}
    matched = 0
    for row in rows:
        for field in ("crop", "image_url", "page_url", "box", "class", "score", "distance", "accepted"):
            assert field in row
        assert row["class"] == "person"
        assert row["accepted"] == (row["distance"] <= 0.85)
        assert (out / row["crop"]).is_file()
        assert row["crop"].startswith("accepted/" if row["accepted"] else "rejected/")
        photo = by_name[row["image_url"].rsplit("/", 1)[-1]]
        with Image.open(photo) as im:
            x1, y1, x2, y2 = row["box"]
            assert 0 <= x1 < x2 <= im.width + 1 and 0 <= y1 < y2 <= im.height + 1
        with Image.open(out / row["crop"]) as crop:
            px1, py1, px2, py2 = row["padded_box"]
            assert crop.size == (round(px2 - px1), round(py2 - py1))
        matched += coco128.match(photo, tuple(row["box"])) is not None
        if "/direct/" in row["image_url"]:
            assert row["page_url"] is None and row["source"] == "urls"
        else:
            assert row["page_url"].endswith(".html") and row["source"] == "site"
    assert matched >= 0.8 * len(rows)  # YOLO's person boxes overlap labelled boxes
    assert len(list((out / "accepted").iterdir())) + len(list((out / "rejected").iterdir())) == len(rows)
    assert "accepted" in first_run["stdout"]


def test_rerun_with_another_threshold_redecides_without_downloading_or_computing(
    first_run: dict,  # type: ignore[type-arg]
    web: TestWeb,
) -> None:
    out: Path = first_run["out"]
    before = {row["crop_id"]: row["distance"] for row in _manifest(out)}
    requests = len(web.requests)
    # Remove the weights the first run used: loading a model now would fail the command.
    command = list(first_run["command"])
    for flag in ("--yolo-weights", "--siamese-weights"):
        Path(command[command.index(flag) + 1]).unlink()
    threshold = sorted(before.values())[len(before) // 2]
    command[command.index("--threshold") + 1] = str(threshold)

    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)

    assert result.returncode == 0, result.stderr
    assert len(web.requests) == requests  # nothing fetched, not even the site's pages
    rows = _manifest(out)
    assert {row["crop_id"]: row["distance"] for row in rows} == before
    assert sum(row["accepted"] for row in rows) == sum(d <= threshold for d in before.values())
    assert len(list((out / "accepted").iterdir())) == sum(row["accepted"] for row in rows)
    assert f"at threshold {threshold}" in result.stdout


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    import typer

    with pytest.raises(typer.BadParameter, match="unknown source"):
        parse_source("ftp:x", 1, 10)
    with pytest.raises(typer.BadParameter, match="existing file"):
        parse_source(f"urls:{tmp_path / 'none.txt'}", 1, 10)
    with pytest.raises(typer.BadParameter, match="http"):
        parse_source("site:example.org", 1, 10)
    assert parse_source("openverse:red fox", 1, 10).query == "red fox"

    empty_refs = tmp_path / "refs"
    empty_refs.mkdir()
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")
    result = subprocess.run(
        [IMGSIFT, "collect", "--source", f"urls:{tmp_path / 'urls.txt'}", "--target", "dog",
         "--refs", str(empty_refs), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no reference images" in result.stderr


def test_give_me_n_and_widening_options_reach_the_job(tmp_path: Path) -> None:
    base = [IMGSIFT, "collect", "--source", "openverse", "--query", "elephant", "--target", "animal",
            "--refs", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "300"}  # rich wraps the error box to the terminal's width
    missing = subprocess.run(
        [*base, "--want-accepted", "5", "--related-terms", str(tmp_path / "none.json")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    bad_language = subprocess.run([*base, "--language", "German"], capture_output=True, text=True, timeout=120)
    assert bad_language.returncode == 2 and "languages" in bad_language.stderr
    bad_distance = subprocess.run([*base, "--near-dup-distance", "99"], capture_output=True, text=True, timeout=120)
    assert bad_distance.returncode == 2 and "near_distance" in bad_distance.stderr


def test_train_fine_tunes_the_collect_job_and_rescores_it(first_run: dict, coco128: Coco128, tmp_path: Path) -> None:  # type: ignore[type-arg]
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)  # type: ignore[arg-type]
    before = _manifest(out)
    bank = tmp_path / "bank"
    bank.mkdir()
    others = [p for p in coco128.images if all(b.class_id != PERSON for b in coco128.labels(p))][10:22]
    for photo in others:
        with Image.open(photo) as im:
            im.convert("RGB").resize((160, 120)).save(bank / photo.name)
    command = [IMGSIFT, "train", "--out", str(out), "--negative-bank", str(bank), "--epochs", "20", "--quiet",
               "--siamese-weights", str(_bundled_mobilenet_v2())]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "Siamese head v1 trained" in result.stdout
    after = _manifest(out)
    assert sorted(r["crop_id"] for r in after) == sorted(r["crop_id"] for r in before)  # every crop scored again
    assert {r["distance"] for r in after} != {r["distance"] for r in before}
    threshold = after[0]["threshold"]
    assert all(r["accepted"] == (r["distance"] <= threshold) for r in after)
    assert len(list((out / "accepted").iterdir())) == sum(r["accepted"] for r in after)
    assert (out / ".imgsift" / "objects" / "jobs" / "local" / "models" / "siamese-head-v1.pt").exists()

    missing = subprocess.run([IMGSIFT, "train", "--out", str(tmp_path / "nothing")], capture_output=True, text=True,
                             timeout=120, env={**ENV, "COLUMNS": "300"})  # fmt: skip
    assert missing.returncode == 2 and "run imgsift collect" in missing.stderr


@pytest.mark.parametrize("fmt", ["imagefolder", "yolo", "coco", "jsonl", "csv"])
def test_export_writes_each_format_from_the_collect_folder(first_run: dict, tmp_path: Path, fmt: str) -> None:  # type: ignore[type-arg]
    out = first_run["out"]
    accepted = [r for r in _manifest(out) if r["accepted"]]  # type: ignore[arg-type]
    dest = tmp_path / f"export-{fmt}"
    result = subprocess.run([IMGSIFT, "export", "--out", str(out), "--format", fmt, "--to", str(dest)],
                            capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert dest.exists()
    if fmt == "imagefolder":
        import zipfile

        with zipfile.ZipFile(dest) as archive:
            assert sorted(n.rsplit("/", 1)[-1] for n in archive.namelist()) == sorted(
                f"{r['crop_id']}.jpg" for r in accepted
            )
    elif fmt == "yolo":
        import zipfile

        with zipfile.ZipFile(dest) as archive:
            lines = [
                ln
                for n in archive.namelist()
                if n.startswith("labels/")
                for ln in archive.read(n).decode().splitlines()
            ]
            assert len(lines) == len(accepted) and "data.yaml" in archive.namelist()
    elif fmt == "coco":
        from pycocotools.coco import COCO

        assert len(COCO(str(dest)).getAnnIds()) == len(accepted)
    else:
        assert f"{len(_manifest(out))} crops" in result.stdout  # type: ignore[arg-type]
    bad = subprocess.run([IMGSIFT, "export", "--out", str(out), "--format", "pdf"], capture_output=True, text=True,
                         timeout=120, env={**ENV, "COLUMNS": "300"})  # fmt: skip
    assert bad.returncode == 2 and "unknown format" in bad.stderr


def _truth(coco: Coco128, served: list[Path], row: dict) -> bool:  # type: ignore[type-arg]
    """What a user answers for a crop: does it show a person (a labelled person box, IoU >= 0.5)?"""
    photo = {p.name: p for p in served}[row["image_url"].rsplit("/", 1)[-1]]
    match = coco.match(photo, tuple(row["box"]))
    return match is not None and match.class_id == PERSON


def test_questions_and_answers_settle_the_threshold_of_a_collect_folder(
    first_run: dict,  # type: ignore[type-arg]
    coco128: Coco128,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)  # type: ignore[arg-type]
    rows = {r["crop"]: r for r in _manifest(out)}
    asked = subprocess.run([IMGSIFT, "questions", "--out", str(out), "-n", "4"], capture_output=True, text=True,
                           timeout=120, env=ENV)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    questions = asked.stdout.split()
    assert len(questions) == 4 == len(set(questions)) and set(questions) <= set(rows)  # the manifest's `crop`s

    answers = tmp_path / "answers.csv"
    truth = {q: _truth(coco128, first_run["served"], rows[q]) for q in questions}  # type: ignore[arg-type]
    answers.write_text("# crop,right|wrong\n" + "".join(f"{q},{'right' if t else 'wrong'}\n" for q, t in truth.items()))
    result = subprocess.run([IMGSIFT, "answer", "--out", str(out), "--answers", str(answers), "--quiet"],
                            capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 answers recorded" in result.stdout and "from 4 answers" in result.stdout
    after = {r["crop_id"]: r for r in _manifest(out)}
    by_id = {rows[q]["crop_id"]: t for q, t in truth.items()}
    assert {i: r["answer"] for i, r in after.items() if r["answer"]} == {
        i: "right" if t else "wrong" for i, t in by_id.items()
    }
    # The runs before gave --threshold: it stays fixed; the new suggestion is printed beside it.
    fixed = next(iter(rows.values()))["threshold"]
    assert all(r["threshold"] == fixed for r in after.values()) and "suggested threshold:" in result.stdout
    again = subprocess.run([IMGSIFT, "questions", "--out", str(out), "-n", "4"], capture_output=True, text=True,
                           timeout=120, env=ENV).stdout.split()  # fmt: skip
    assert not {rows[q]["crop_id"] for q in questions} & {_crop_id(q) for q in again}  # never asked again

    # --suggested: from now on the job follows its suggestion; a second answer replaces the first.
    flip = questions[0]
    result = subprocess.run([IMGSIFT, "answer", "--out", str(out), "--suggested", "--quiet",
                             "--right" if not truth[flip] else "--wrong", _crop_id(flip) + ".jpg"],
                            capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr
    final = {r["crop_id"]: r for r in _manifest(out)}
    assert sum(1 for r in final.values() if r["answer"]) == 4  # still four answered crops
    assert final[rows[flip]["crop_id"]]["answer"] == ("wrong" if truth[flip] else "right")
    threshold = next(iter(final.values()))["threshold"]
    assert f"threshold {threshold} is the suggested one" in result.stdout
    assert all(r["accepted"] == (r["distance"] <= threshold) for r in final.values())
    assert len(list((out / "accepted").iterdir())) == sum(r["accepted"] for r in final.values())


def _crop_id(name: str) -> str:
    return Path(name).stem


def test_bad_answers_change_nothing(first_run: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)  # type: ignore[arg-type]
    manifest = (out / "manifest.jsonl").read_bytes()
    crop = _manifest(out)[0]["crop"]
    cases = {
        "unknown crop": (["--right", crop, "--wrong", "accepted/nope-000.jpg"], "unknown crop(s) accepted/nope"),
        "malformed line": (["--answers", "bad.csv"], "line 2"),
        "another job's answers": (["--answers", "other.csv"], "another output folder"),
        "nothing to record": ([], "give --right, --wrong or --answers"),
    }
    (tmp_path / "bad.csv").write_text(f"{crop},right\n{crop};wrong\n")
    (tmp_path / "other.csv").write_text("rejected/0123456789abcdef01234567-000.jpg,right\nelephant-3.jpg,wrong\n")
    for name, (extra, message) in cases.items():
        result = subprocess.run([IMGSIFT, "answer", "--out", str(out), *extra], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path, env={**ENV, "COLUMNS": "300"})  # fmt: skip
        assert result.returncode == 2, name
        assert message in result.stderr, (name, result.stderr)
        assert (out / "manifest.jsonl").read_bytes() == manifest, name  # nothing changed
    from imgsift_common.sqlstate import SqlStateStore

    state = SqlStateStore.sqlite(out / ".imgsift" / "state.sqlite")
    try:
        assert state.feedback("local") == {}
    finally:
        state.close()
    missing = subprocess.run([IMGSIFT, "questions", "--out", str(tmp_path / "nothing")], capture_output=True,
                             text=True, timeout=120, env={**ENV, "COLUMNS": "300"})  # fmt: skip
    assert missing.returncode == 2 and "holds no imgsift job" in missing.stderr


def test_a_wikimedia_source_without_the_operators_contact_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from imgsift.cli import app

    monkeypatch.delenv("IMGSIFT_CRAWLER_CONTACT", raising=False)
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(refs / "r.jpg")
    args = ["collect", "--source", "wikimedia", "--query", "cat", "--target", "cat", "--refs", str(refs)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "IMGSIFT_CRAWLER_CONTACT" in result.output
    assert not (tmp_path / "out").exists()  # refused before a job folder was made
