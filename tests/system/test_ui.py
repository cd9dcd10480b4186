"""The web UI in a real browser: Playwright driving Debian's Chromium against the whole stack.

A job is created through the form (URL list of real COCO photos on the local test web,
reference images given to the file input), its progress is watched until it completes, the
threshold slider is moved and the gallery's accepted count checked against the API, questions of
the "Ask me" panel are answered by key and by button (each answer counted at once, the API agreeing,
no crop asked twice), a crop is marked in the gallery, and every export is downloaded through its
button and validated. Screenshots of the main pages go to ``test-artifacts/ui/``.

Chromium is told to resolve no name but loopback (``--host-resolver-rules``) and to keep its
background services off, so the browser sends nothing beyond this machine either.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.coco import Coco128
from tests.support.web import TestWeb
from tests.system.conftest import AUTH, TEST_API_KEY
from tests.system.test_pipeline import ELEPHANT_PHOTOS, OTHER_ANIMAL_PHOTOS, _references

pytestmark = pytest.mark.system

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
LOOPBACK_ONLY = [
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-first-run",
    "--no-sandbox",  # the test runs as root
]


def _crops(client: httpx.Client, job_id: str, threshold: float, accepted: bool | None = None) -> list[dict]:  # type: ignore[type-arg]
    items, cursor = [], None
    while True:
        params: dict[str, object] = {"threshold": threshold, "limit": 500}
        if accepted is not None:
            params["accepted"] = accepted
        if cursor:
            params["cursor"] = cursor
        body = client.get(f"/v1/jobs/{job_id}/crops", params=params).json()  # type: ignore[arg-type]
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_ui_creates_a_job_watches_it_moves_the_threshold_marks_and_exports(
    stack, web: TestWeb, coco128: Coco128, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    _running, api = stack
    photos = [coco128.image(s) for s in ELEPHANT_PHOTOS + OTHER_ANIMAL_PHOTOS[:6]]
    urls = [web.add_image(f"/photos/{p.name}", p) for p in photos]
    refs = []
    for name, data in _references(coco128):
        path = tmp_path / name
        path.write_bytes(data)
        refs.append(str(path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as pw, httpx.Client(base_url=api, timeout=30, headers=AUTH) as client:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LOOPBACK_ONLY)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        question_fetches: list[str] = []
        page.on("request", lambda r: question_fetches.append(r.url) if "/questions" in r.url else None)
        page.goto(f"{api}/")
        # Not signed in: the UI asks for a key, refuses a wrong one, then keeps a right one in its cookie.
        expect(page.locator("#signin")).to_be_visible()
        page.fill("input[name=api_key]", "isk_not_a_key_of_this_stack_0")
        page.click("#signin button[type=submit]")
        expect(page.locator("#signin-error")).to_contain_text("not known")
        page.fill("input[name=api_key]", TEST_API_KEY)
        page.click("#signin button[type=submit]")
        expect(page.locator("#new-job")).to_be_visible()
        expect(page.locator("#who")).to_contain_text("admin")
        page.fill("textarea[name=urls]", "\n".join(urls))
        page.fill("input[name=target]", "animal")
        page.fill("input[name=threshold]", "0.8")
        page.set_input_files("#refs", refs)
        expect(page.locator("#refs-list")).to_contain_text(Path(refs[0]).name)
        page.screenshot(path=ARTIFACTS / "1-new-job.png", full_page=True)
        page.click("button[type=submit]")

        page.wait_for_url("**/ui/#/jobs/*")
        job_id = page.url.rsplit("/", 1)[-1]
        expect(page.locator(".stage")).to_have_count(3)
        expect(page.locator("#job-state")).to_have_text("completed", timeout=400_000)
        status = client.get(f"/v1/jobs/{job_id}").json()
        compared = status["counts"]["compared"]
        assert compared > 0
        expect(page.locator("#gallery .crop")).to_have_count(compared, timeout=30_000)
        expect(page.locator(".stage[data-stage=siamese]")).to_contain_text("done")
        page.screenshot(path=ARTIFACTS / "2-job-completed.png", full_page=True)

        # The slider re-partitions the gallery at once; its count is what the API says for that threshold.
        distances = sorted(c["distance"] for c in _crops(client, job_id, 2.0))
        for value in (0.75, (distances[0] + distances[-1]) / 2, 0.9):
            threshold = round(value, 3)
            page.locator("#threshold").fill(str(threshold))
            shown = float(page.locator("#threshold").input_value())
            expected = len(_crops(client, job_id, shown, accepted=True))
            expect(page.locator("#accepted-count")).to_have_text(str(expected))
            expect(page.locator("#gallery .crop.accepted")).to_have_count(expected)
        assert client.get(f"/v1/jobs/{job_id}").json()["threshold"] == shown  # saved on release
        expect(page.locator("#threshold-line")).to_have_count(1)
        page.screenshot(path=ARTIFACTS / "3-threshold-moved.png", full_page=True)

        # "Ask me": one question at a time, answered by key (y, n) or button. Each answer is counted at
        # once and the API agrees; the suggestion and estimates follow; no crop is asked twice; the
        # questions come in batches of 5, so five answers use up at least one batch.
        image = page.locator("#ask-image")
        count = page.locator("#ask-count")
        calibration = client.get(f"/v1/jobs/{job_id}").json()["calibration"]
        assert calibration["answers"] == 0
        expect(count).to_have_text("0")
        expect(image).to_be_visible()
        expect(image).to_have_attribute("data-crop-id", re.compile(r"\S"))
        page.wait_for_function("() => document.getElementById('ask-image').naturalWidth > 0")
        _check_ask_panel(page, expect, calibration)
        asked: list[str] = []
        right = wrong = 0
        for how, correct in (("y", True), ("n", False), ("#ask-wrong", False), ("#ask-right", True), ("y", True)):
            expect(image).to_have_attribute("data-crop-id", re.compile(r"\S"))  # the next question is up
            crop_id = image.get_attribute("data-crop-id")
            assert crop_id and crop_id not in asked
            asked.append(crop_id)
            if how.startswith("#"):
                page.click(how)
            else:
                page.keyboard.press(how)
            right, wrong = right + correct, wrong + (not correct)
            expect(count).to_have_text(str(len(asked)))
            calibration = client.get(f"/v1/jobs/{job_id}").json()["calibration"]
            assert (calibration["answers"], calibration["marked_right"], calibration["marked_wrong"]) == (
                len(asked),
                right,
                wrong,
            )
            _check_ask_panel(page, expect, calibration)
            mark = "marked-right" if correct else "marked-wrong"
            expect(page.locator(f"#gallery .crop[data-crop-id='{crop_id}']")).to_have_class(re.compile(mark))
        expect(image).to_have_attribute("data-crop-id", re.compile(r"\S"))
        assert image.get_attribute("data-crop-id") not in asked
        still_asked = client.get(f"/v1/jobs/{job_id}/questions", params={"limit": 100}).json()["items"]
        assert still_asked and not {c["crop_id"] for c in still_asked} & set(asked)
        assert len(question_fetches) >= 2 and all("limit=5" in url for url in question_fetches)
        page.locator("#ask").scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / "3b-ask-me.png", full_page=True)

        # A click marks a crop right; the estimates follow. The tile is the nearest one not answered above.
        before = client.get(f"/v1/jobs/{job_id}").json()["calibration"]
        crop_id = page.locator("#gallery .crop:not(.marked-right):not(.marked-wrong)").first.get_attribute(
            "data-crop-id"
        )
        tile = page.locator(f"#gallery .crop[data-crop-id='{crop_id}']")
        side = "accepted" if float(tile.get_attribute("data-distance") or "nan") <= shown else "rejected"
        tile.click()
        expect(tile).to_have_class(f"crop {side} marked-right")
        expect(page.locator("#details")).to_contain_text("licence")
        after = client.get(f"/v1/jobs/{job_id}").json()["calibration"]
        assert (after["marked_right"], after["marked_wrong"], after["answers"]) == (
            before["marked_right"] + 1,
            before["marked_wrong"],
            before["answers"] + 1,
        )
        expect(count).to_have_text(str(after["answers"]))

        # Every export through its button, then validated.
        accepted = _crops(client, job_id, shown, accepted=True)
        downloads = {}
        for fmt in ("imagefolder", "yolo", "coco", "jsonl", "csv", "webdataset", "parquet", "huggingface",
                    "fiftyone", "labelstudio"):  # fmt: skip
            with page.expect_download(timeout=60_000) as info:
                page.click(f"#export-{fmt}")
            target = tmp_path / f"export-{fmt}"
            info.value.save_as(target)
            downloads[fmt] = target
        page.screenshot(path=ARTIFACTS / "4-exports.png", full_page=True)

        # The list of jobs links to the job.
        page.goto(f"{api}/ui/#/")
        expect(page.locator("#jobs tbody tr")).to_have_count(1)
        expect(page.locator("#jobs tbody tr")).to_contain_text("completed")
        page.screenshot(path=ARTIFACTS / "5-jobs.png", full_page=True)
        page.click(f"a[href='#/jobs/{job_id}']")
        expect(page.locator("#job-id")).to_have_text(job_id)
        browser.close()

    _check_exports(downloads, accepted, compared)


def _check_ask_panel(page, expect, calibration: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    """The "Ask me" panel and the Threshold card show the calibration the API gives."""
    suggested = calibration["suggested_threshold"]
    assert float(page.locator("#ask-suggested").inner_text()) == suggested
    assert float(page.locator("#suggested").inner_text()) == suggested
    expect(page.locator("#suggested-line")).to_have_count(1)
    expect(page.locator("#ask-basis")).to_have_text(calibration["basis"])
    needs = page.locator("#ask-needs")
    if calibration["needs_answers"]:
        expect(needs).to_be_visible()
        expect(needs).to_contain_text("answers needed")
    else:
        expect(needs).to_be_hidden()
    at = calibration["at_suggested"]
    estimates = page.locator("#ask-estimates")
    for name in ("precision", "recall"):
        if at[name] is None:
            continue
        # e.g. "precision 0.82 (0.70–0.90)": the value, and its 80% interval once the API gives one.
        pattern = rf"{name} \d\.\d\d"
        if at[f"{name}_interval"] is not None:
            pattern += r" \(\d\.\d\d–\d\.\d\d\)"
        expect(estimates).to_contain_text(re.compile(pattern))


def _check_exports(files: dict[str, Path], accepted: list[dict], compared: int) -> None:  # type: ignore[type-arg]
    from pycocotools.coco import COCO

    with zipfile.ZipFile(files["imagefolder"]) as archive:
        assert sorted(n.rsplit("/", 1)[-1] for n in archive.namelist()) == sorted(
            f"{c['crop_id']}.jpg" for c in accepted
        )
    want = sorted((c["class"], tuple(round(v) for v in c["box"])) for c in accepted)
    with zipfile.ZipFile(files["yolo"]) as archive:
        from PIL import Image

        names = yaml.safe_load(archive.read("data.yaml"))["names"]
        found = []
        for name in archive.namelist():
            if not name.startswith("labels/"):
                continue
            stem = name.removeprefix("labels/").removesuffix(".txt")
            image_name = next(n for n in archive.namelist() if n.startswith(f"images/{stem}."))
            w, h = Image.open(io.BytesIO(archive.read(image_name))).size
            for line in archive.read(name).decode().splitlines():
                cls, cx, cy, bw, bh = (float(v) for v in line.split())
                box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                found.append((names[int(cls)], tuple(round(v) for v in box)))
        assert sorted(found) == want
    coco = COCO(str(files["coco"]))
    assert len(coco.getAnnIds()) == len(accepted)
    rows = [json.loads(line) for line in files["jsonl"].read_text().splitlines()]
    assert len(rows) == compared and sum(r["accepted"] for r in rows) == len(accepted)
    assert len(list(csv.DictReader(files["csv"].open()))) == compared
    _check_training_exports(files, accepted, compared)


def _check_training_exports(files: dict[str, Path], accepted: list[dict], compared: int) -> None:  # type: ignore[type-arg]
    """The buttons' training and review exports hold the crops the API calls accepted (or compared)."""
    import pyarrow.parquet as pq

    want = sorted(c["crop_id"] for c in accepted)
    with zipfile.ZipFile(files["webdataset"]) as archive:
        stats = [json.loads(archive.read(n)) for n in archive.namelist() if n.endswith("_stats.json")]
        tables = [pq.read_table(io.BytesIO(archive.read(n))) for n in archive.namelist() if n.endswith(".parquet")]
    assert sum(s["successes"] for s in stats) == len(accepted)
    assert sorted(c for t in tables for c in t.column("crop_id").to_pylist()) == want
    assert pq.read_table(files["parquet"]).num_rows == compared
    with zipfile.ZipFile(files["huggingface"]) as archive:
        shards = [n for n in archive.namelist() if n.startswith("data/train-")]
        rows = [r for n in shards for r in pq.read_table(io.BytesIO(archive.read(n))).column("crop_id").to_pylist()]
        assert sorted(rows) == want and "README.md" in archive.namelist()
    with zipfile.ZipFile(files["fiftyone"]) as archive:
        labels = json.loads(archive.read("labels.json"))["labels"]
    assert sum(len(d) for d in labels.values()) == compared
    tasks = json.loads(files["labelstudio"].read_text())
    assert sorted(r["id"] for t in tasks for r in t["predictions"][0]["result"]) == want
