"""The real yolov8n on real COCO photos: names, boxes that match the labels, batching, weights errors."""

from __future__ import annotations

import pytest
from PIL import Image

from imgsift_detector.coco import COCO_CLASSES
from imgsift_detector.detect import UnreadableImage, load_image
from imgsift_detector.model import Detector, WeightsError, get_detector
from tests.support.coco import Coco128, iou

# person + umbrella (portrait), persons + giraffes, giraffes
STEMS = ["000000000036", "000000000136", "000000000025"]
CONFIDENT = 0.5


def test_names_and_identity(detector: Detector, yolo_weights) -> None:  # type: ignore[no-untyped-def]
    assert tuple(detector.names[i] for i in range(len(detector.names))) == COCO_CLASSES
    assert detector.weights_id == "yolov8n.pt"
    assert get_detector(str(yolo_weights), "cpu") is detector  # loaded once per process


def test_predict_finds_the_labelled_objects(detector: Detector, coco128: Coco128) -> None:
    paths = [coco128.image(stem) for stem in STEMS]
    images = [load_image(path.read_bytes()) for path in paths]

    found = detector.predict(images)

    assert len(found) == len(images)
    for path, image, detections in zip(paths, images, found, strict=True):
        for d in detections:
            x1, y1, x2, y2 = d.box
            assert -1 <= x1 < x2 <= image.width + 1 and -1 <= y1 < y2 <= image.height + 1
            assert 0 < d.score <= 1
            assert d.class_id is not None and d.class_name == detector.names[d.class_id]
        # every confident box is a labelled object of its class
        for d in (d for d in detections if d.score >= CONFIDENT):
            match = coco128.match(path, d.box)
            assert match is not None and match.class_name == d.class_name, (path.name, d)
    found_classes = [{d.class_name for d in detections if d.score >= CONFIDENT} for detections in found]
    assert found_classes[0] >= {"person"}
    assert found_classes[1] >= {"person", "giraffe"}
    assert found_classes[2] >= {"giraffe"}


def test_batches_of_any_size_give_each_image_its_own_boxes(detector: Detector, coco128: Coco128) -> None:
    images = [load_image(coco128.image(stem).read_bytes()) for stem in STEMS]

    one_by_one = detector.predict(images, batch_size=1)
    together = detector.predict(images, batch_size=16)

    # A mixed-shape batch is letterboxed differently, so boxes move a little, never to another image.
    for alone, batched in zip(one_by_one, together, strict=True):
        for d in (d for d in alone if d.score >= CONFIDENT):
            assert any(b.class_id == d.class_id and iou(b.box, d.box) >= 0.9 for b in batched), d


def test_loading_the_model_leaves_pillow_to_refuse_non_images(detector: Detector) -> None:
    # ultralytics replaces PIL.Image.open on import; the detector puts Pillow's own back.
    assert Image.open.__module__ == "PIL.Image"
    with pytest.raises(UnreadableImage):
        load_image(b"<html>not an image</html>")


def test_predict_on_no_images_runs_nothing(detector: Detector) -> None:
    assert detector.predict([]) == []


@pytest.mark.parametrize("weights", ["/nowhere/yolo.pt", "my-detector.pt"])
def test_weights_that_are_neither_a_file_nor_a_known_model_name(weights: str) -> None:
    with pytest.raises(WeightsError, match="IMGSIFT_DETECTOR_WEIGHTS"):
        Detector(weights)
