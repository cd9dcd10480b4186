"""detect_batch end to end: real photos, the real model, each state and object store."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import Crop, Detection, DetectMode, JobState
from imgsift_common.state import Counter
from imgsift_detector.coco import COCO_SUPERCATEGORIES
from imgsift_detector.detect import detect_batch, step_size
from imgsift_detector.model import Detector
from tests.detector.conftest import JOB_ID, add_image, add_photos, make_job
from tests.support.coco import Coco128

PERSON_STEMS = ["000000000036", "000000000061", "000000000136"]  # each has labelled persons
DOG_STEM = "000000000042"  # one dog, nobody else
ANIMALS = set(COCO_SUPERCATEGORIES["animal"])


class CountingDetector:
    """The real detector, counting the images it is asked to look at."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.names = detector.names
        self.weights_id = detector.weights_id
        self.images_seen = 0

    def predict(self, images: list[Image.Image], **options: float) -> list[list[Detection]]:
        self.images_seen += len(images)
        return self.detector.predict(images, **options)


class FixedDetector:
    """Answers every image with the same detections: the selection logic without a model."""

    def __init__(self, detections: list[Detection]) -> None:
        self.names = {0: "person", 1: "dog"}
        self.weights_id = "fixed.pt"
        self.detections = detections

    def predict(self, images: list[Image.Image], **options: float) -> list[list[Detection]]:
        return [self.detections for _ in images]


def _decoded_size(store, crop: Crop) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with Image.open(io.BytesIO(store.get(crop.key))) as image:
        assert image.format == "JPEG"
        return image.size


def _by_image(crops: list[Crop]) -> dict[str, list[Crop]]:
    grouped: dict[str, list[Crop]] = {}
    for crop in crops:
        grouped.setdefault(crop.image_key, []).append(crop)
    return grouped


def test_person_crops_are_stored_and_recorded(  # type: ignore[no-untyped-def]
    detector: Detector, detector_settings, coco128: Coco128, state_store, object_store
) -> None:
    paths = [coco128.image(stem) for stem in [*PERSON_STEMS, DOG_STEM]]
    job = make_job(state_store, "person")
    images = add_photos(state_store, object_store, paths)

    crops = detect_batch(job, [i.key for i in images], object_store, state_store, detector, detector_settings)

    counters = state_store.counters(JOB_ID)
    assert counters[Counter.DETECTED] == 4
    assert counters[Counter.CROPS] == len(crops) >= 3
    assert {c.key for c in crops} == set(state_store.crop_keys(JOB_ID))
    assert state_store.get_job(JOB_ID).detect_mode is DetectMode.BOXES
    assert state_store.notes(JOB_ID) == []
    per_image = _by_image(crops)
    assert images[3].key not in per_image  # the dog photo has no person in it
    for image, path in zip(images, paths, strict=True):
        image_crops = per_image.get(image.key, [])
        # crop ids count up from 0, best score first
        assert [c.crop_id for c in image_crops] == [keys.crop_id(image.sha256, i) for i in range(len(image_crops))]
        assert [c.score for c in image_crops] == sorted((c.score for c in image_crops), reverse=True)
        for crop in image_crops:
            assert crop.class_name == "person" and not crop.whole_image
            assert crop.key == keys.crop_key(JOB_ID, crop.crop_id)
            x1, y1, x2, y2 = crop.padded_box
            assert 0 <= x1 <= crop.box[0] and 0 <= y1 <= crop.box[1]
            assert crop.box[2] <= x2 <= image.width and crop.box[3] <= y2 <= image.height
            assert _decoded_size(object_store, crop) == (x2 - x1, y2 - y1)
        if path.stem in PERSON_STEMS:
            matches = [coco128.match(path, c.box) for c in image_crops]
            assert any(m is not None and m.class_name == "person" for m in matches), path.name


def test_target_boxes_large_enough_are_kept_best_first(  # type: ignore[no-untyped-def]
    detector_settings, coco128: Coco128, sqlite_state, local_store
) -> None:
    def person(box: tuple[float, float, float, float], score: float) -> Detection:
        return Detection(box=box, score=score, class_id=0, class_name="person")

    fixed = FixedDetector(
        [
            person((10, 10, 60, 110), 0.4),
            Detection(box=(100, 100, 300, 300), score=0.99, class_id=1, class_name="dog"),
            person((200, 50, 207, 150), 0.95),  # 7 px wide: below min_box_size
            person((300, 20, 400, 220), 0.8),
        ]
    )
    job = make_job(sqlite_state, "person")
    [image] = add_photos(sqlite_state, local_store, [coco128.image(DOG_STEM)])

    crops = detect_batch(job, [image.key], local_store, sqlite_state, fixed, detector_settings)

    assert [(c.box, c.score) for c in crops] == [((300, 20, 400, 220), 0.8), ((10, 10, 60, 110), 0.4)]
    assert [c.padded_box for c in crops] == [(290, 0, 410, 240), (5, 0, 65, 120)]
    assert [c.crop_id for c in crops] == [keys.crop_id(image.sha256, 0), keys.crop_id(image.sha256, 1)]


def test_animal_target_keeps_only_animals(  # type: ignore[no-untyped-def]
    detector: Detector, detector_settings, coco128: Coco128, sqlite_state, local_store
) -> None:
    paths = [coco128.image(stem) for stem in ["000000000036", DOG_STEM, "000000000061", "000000000136"]]
    job = make_job(sqlite_state, "animal")
    images = add_photos(sqlite_state, local_store, paths)

    crops = detect_batch(job, [i.key for i in images], local_store, sqlite_state, detector, detector_settings)

    assert {c.class_name for c in crops} <= ANIMALS
    per_image = _by_image(crops)
    assert images[0].key not in per_image  # a person under an umbrella: no animal
    assert all(images[i].key in per_image for i in (1, 2, 3))
    giraffe_photo = paths[3]
    assert any(
        (m := coco128.match(giraffe_photo, c.box)) and m.class_name == "giraffe" for c in per_image[images[3].key]
    )
    assert sqlite_state.counters(JOB_ID)[Counter.CROPS] == len(crops)


def test_a_redelivered_batch_returns_its_crops_and_counts_nothing_twice(  # type: ignore[no-untyped-def]
    detector: Detector, detector_settings, coco128: Coco128, state_store, local_store
) -> None:
    job = make_job(state_store, "person")
    first_images = add_photos(state_store, local_store, [coco128.image(s) for s in PERSON_STEMS[::2]])
    first_keys = [i.key for i in first_images]
    counting = CountingDetector(detector)

    first = detect_batch(job, first_keys, local_store, state_store, counting, detector_settings)
    counters = state_store.counters(JOB_ID)
    counts = state_store.detected_counts(JOB_ID, [*first_keys, keys.image_key(JOB_ID, "ab" * 32, "JPEG")])
    assert set(counts) == set(first_keys) and sum(counts.values()) == len(first)  # the undetected key: absent
    objects = {c.key: local_store.get(c.key) for c in first}

    again = detect_batch(job, first_keys, local_store, state_store, counting, detector_settings)

    assert again == first
    assert state_store.counters(JOB_ID) == counters
    assert counting.images_seen == 2  # the second delivery ran no model
    assert {c.key: local_store.get(c.key) for c in again} == objects

    # A batch mixing done and new images detects only the new one.
    [dog] = add_photos(state_store, local_store, [coco128.image(DOG_STEM)])
    mixed = detect_batch(job, [*first_keys, dog.key], local_store, state_store, counting, detector_settings)
    assert counting.images_seen == 3
    assert {c.key for c in mixed} == {c.key for c in first}
    assert state_store.counters(JOB_ID)[Counter.DETECTED] == 3


def test_a_target_the_detector_cannot_find_compares_whole_images(  # type: ignore[no-untyped-def]
    detector: Detector, detector_settings, coco128: Coco128, sqlite_state, local_store
) -> None:
    job = make_job(sqlite_state, "golden retriever")
    images = add_photos(sqlite_state, local_store, [coco128.image(s) for s in ["000000000036", DOG_STEM]])
    counting = CountingDetector(detector)

    crops = detect_batch(job, [i.key for i in images], local_store, sqlite_state, counting, detector_settings)

    assert counting.images_seen == 0
    assert [c.image_key for c in crops] == [i.key for i in images]
    for crop, image in zip(crops, images, strict=True):
        assert crop.whole_image and crop.class_name is None and crop.score == 1.0
        assert crop.box == crop.padded_box == (0, 0, image.width, image.height)
        assert crop.crop_id == keys.crop_id(image.sha256, 0)
        assert _decoded_size(local_store, crop) == (image.width, image.height)
    stored_job = sqlite_state.get_job(JOB_ID)
    assert stored_job.detect_mode is DetectMode.WHOLE_IMAGE
    assert stored_job.state is JobState.RUNNING
    [note] = sqlite_state.notes(JOB_ID)
    assert "'golden retriever'" in note and "yolov8n.pt" in note and "whole images" in note
    assert sqlite_state.counters(JOB_ID)[Counter.CROPS] == 2


def test_missing_and_broken_images_are_recorded_without_crops(  # type: ignore[no-untyped-def]
    detector: Detector, detector_settings, coco128: Coco128, sqlite_state, local_store
) -> None:
    job = make_job(sqlite_state, "person")
    [photo] = add_photos(sqlite_state, local_store, [coco128.image("000000000036")])
    broken = add_image(sqlite_state, local_store, b"\xff\xd8\xff\xe0 a JPEG header, then nothing", (640, 480))
    html = add_image(sqlite_state, local_store, b"<html>an error page</html>", (640, 480))
    missing = add_image(sqlite_state, local_store, b"never stored", (640, 480), store_object=False)
    stranger = keys.image_key(JOB_ID, "ab" * 32, "JPEG")  # not one of the job's images
    batch = [broken.key, photo.key, html.key, missing.key, stranger]

    crops = detect_batch(job, batch, local_store, sqlite_state, detector, detector_settings)

    assert crops and {c.image_key for c in crops} == {photo.key}
    counters = sqlite_state.counters(JOB_ID)
    assert counters[Counter.DETECTED] == 4
    assert counters[Counter.CROPS] == len(crops)
    detected = sqlite_state.detected_counts(JOB_ID, [i.key for i in (broken, html, missing)] + [stranger])
    assert detected.keys() == {broken.key, html.key, missing.key}
    notes = sqlite_state.notes(JOB_ID)
    assert any(broken.key in n and "decode" in n for n in notes)
    assert any(html.key in n and "decode" in n for n in notes)
    assert any(missing.key in n and "missing" in n for n in notes)


class FailingPuts:
    """A store whose writes fail from the ``fail_from``-th on; reads go to the real one."""

    def __init__(self, store, fail_from: int) -> None:  # type: ignore[no-untyped-def]
        self.store, self.fail_from, self.puts = store, fail_from, 0

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.puts += 1
        if self.puts >= self.fail_from:
            raise OSError("the object store is down")
        self.store.put(key, data, content_type)


def test_a_failed_crop_write_fails_the_batch_and_records_nothing_unstored(  # type: ignore[no-untyped-def]
    detector_settings, coco128: Coco128, sqlite_state, local_store
) -> None:
    # Crops are written on a writer thread while the model runs on: its failure still fails the batch.
    fixed = FixedDetector([Detection(box=(10, 10, 110, 110), score=0.9, class_id=0, class_name="person")])
    job = make_job(sqlite_state, "person")
    images = add_photos(sqlite_state, local_store, [coco128.image(s) for s in [*PERSON_STEMS, DOG_STEM]])
    settings = detector_settings.model_copy(update={"batch_size": 2})
    failing = FailingPuts(local_store, fail_from=3)  # the second model batch's first crop fails

    with pytest.raises(OSError, match="the object store is down"):
        detect_batch(job, [i.key for i in images], failing, sqlite_state, fixed, settings)

    # Each model batch's images are recorded in one write after all their crops are stored: the
    # first batch is, the failed one records nothing (its stored crop is overwritten on redelivery).
    found = sqlite_state.detected_counts(JOB_ID, [i.key for i in images])
    detected = [i.key in found for i in images]
    assert detected == [True, True] + [False] * (len(images) - 2)
    assert sqlite_state.counters(JOB_ID)[Counter.CROPS] == 2

    # The redelivered batch detects the rest.
    crops = detect_batch(job, [i.key for i in images], local_store, sqlite_state, fixed, settings)
    assert len(crops) == 4 and len(sqlite_state.detected_counts(JOB_ID, [i.key for i in images])) == len(images)


class StepWatchingDetector(FixedDetector):
    """Answers as FixedDetector, noting each call's image count; from the second call on it first
    waits (10 s at most) until the previous call's images are recorded, as they are when a step's
    crops are stored while the model runs on the next step, and never when they wait for the last."""

    def __init__(self, detections: list[Detection], keys_in_order: list[str], state) -> None:  # type: ignore[no-untyped-def]
        super().__init__(detections)
        self.keys, self.state = keys_in_order, state
        self.calls: list[int] = []
        self.recorded_before: list[bool] = []

    def predict(self, images: list[Image.Image], **options: float) -> list[list[Detection]]:
        if self.calls:
            done = sum(self.calls)
            previous = self.keys[done - self.calls[-1] : done]
            deadline = time.monotonic() + 10
            while len(self.state.detected_counts(JOB_ID, previous)) < len(previous) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.recorded_before.append(len(self.state.detected_counts(JOB_ID, previous)) == len(previous))
        self.calls.append(len(images))
        return super().predict(images, **options)


# Steps of pipeline_step images, never more than a forward pass (batch_size); 0: whole batches.
@pytest.mark.parametrize(("step", "batch_size", "calls"), [(2, 16, [2, 2, 1]), (4, 3, [3, 2]), (0, 4, [4, 1])])
def test_a_batch_runs_in_pipeline_steps_whose_crops_are_stored_while_the_model_runs_on(  # type: ignore[no-untyped-def]
    step: int, batch_size: int, calls: list[int], detector_settings, coco128: Coco128, sqlite_state, local_store
) -> None:
    job = make_job(sqlite_state, "person")
    stems = [*PERSON_STEMS, DOG_STEM, "000000000009"]
    images = add_photos(sqlite_state, local_store, [coco128.image(s) for s in stems])
    batch = [i.key for i in images]
    box = Detection(box=(10, 10, 110, 110), score=0.9, class_id=0, class_name="person")
    settings = detector_settings.model_copy(update={"pipeline_step": step, "batch_size": batch_size})
    watching = StepWatchingDetector([box], batch, sqlite_state)

    crops = detect_batch(job, batch, local_store, sqlite_state, watching, settings)

    assert step_size(settings) == calls[0]
    assert watching.calls == calls
    # Each step's crops were stored and recorded before the model was done with the next step.
    assert watching.recorded_before == [True] * (len(calls) - 1)
    assert [c.image_key for c in crops] == batch
    assert sqlite_state.counters(JOB_ID)[Counter.DETECTED] == len(batch)


def test_a_job_sets_its_own_detector_confidence(  # type: ignore[no-untyped-def]
    detector: Detector, detector_settings, coco128: Coco128, state_store, object_store
) -> None:
    """``JobSpec.detector_conf`` replaces the detector's setting for that job: the real model on real
    photos keeps more boxes at 0.05 than at the default 0.25, and only boxes that sure."""
    paths = [coco128.image(stem) for stem in PERSON_STEMS]
    job = make_job(state_store, "person")
    images = [i.key for i in add_photos(state_store, object_store, paths)]
    default = detect_batch(job, images, object_store, state_store, detector, detector_settings)
    state_store.reset_detections(job.id)
    job = state_store.update_job(job.id, spec=job.spec.model_copy(update={"detector_conf": 0.05}))
    low = detect_batch(job, images, object_store, state_store, detector, detector_settings)
    assert detector_settings.conf == 0.25
    assert all(c.score >= 0.25 for c in default)
    assert len(low) > len(default) and min(c.score for c in low) < 0.25
    assert all(c.score >= 0.05 for c in low)
