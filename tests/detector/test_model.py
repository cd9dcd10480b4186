"""The real yolov8n on real COCO photos: names, boxes that match the labels, batching, weights errors."""

from __future__ import annotations

import pytest
from PIL import Image

from imgsift_detector.coco import COCO_CLASSES
from imgsift_detector.detect import UnreadableImage, load_image
from imgsift_detector.model import Detector, WeightsError, get_detector, letterboxed_shape, shape_batches
from tests.support.coco import Coco128

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


# Photos of eight sizes that letterbox to three shapes (height, width) at imgsz 640, stride 32.
MIXED = {
    "000000000536": (480, 640),  # 448 x 336
    "000000000623": (640, 480),  # 375 x 500, portrait
    "000000000136": (480, 640),  # 500 x 374
    "000000000025": (448, 640),  # 640 x 426
    "000000000077": (480, 640),  # 500 x 375
    "000000000064": (640, 480),  # 480 x 640
    "000000000009": (480, 640),  # 640 x 480
    "000000000560": (448, 640),  # 460 x 312
}


def test_letterboxed_shapes_are_those_ultralytics_gives_one_image(coco128: Coco128) -> None:
    import numpy as np
    from ultralytics.data.augment import LetterBox

    for stem, shape in MIXED.items():
        with Image.open(coco128.image(stem)) as image:
            width, height = image.size
        assert letterboxed_shape(width, height, 640) == shape
        assert LetterBox(640, auto=True, stride=32)(image=np.zeros((height, width, 3), np.uint8)).shape[:2] == shape
    assert letterboxed_shape(1000, 10, 640) == (32, 640)  # a thin strip: at least one pixel, padded to the stride
    assert letterboxed_shape(300, 200, 600) == (416, 608)  # imgsz rounded up to the stride, as ultralytics does


def test_shape_batches_group_by_letterboxed_shape_in_order_of_first_sight() -> None:
    sizes = [(640, 480), (480, 640), (500, 375), (640, 426), (640, 478), (375, 500), (640, 480)]
    assert shape_batches(sizes, 640, 16) == [[0, 2, 4, 6], [1, 5], [3]]
    assert shape_batches(sizes, 640, 2) == [[0, 2], [4, 6], [1, 5], [3]]
    assert shape_batches([], 640, 16) == []
    # Few batch sizes: a group of 7 goes through as 4 + 2 + 1, a group of 19 as 16 + 2 + 1.
    assert shape_batches([(640, 480)] * 7, 640, 16) == [[0, 1, 2, 3], [4, 5], [6]]
    assert [len(b) for b in shape_batches([(640, 480)] * 19, 640, 16)] == [16, 2, 1]


def test_a_batch_finds_exactly_the_boxes_each_image_gets_alone(detector: Detector, coco128: Coco128) -> None:
    images = [load_image(coco128.image(stem).read_bytes()) for stem in MIXED]
    shapes: list[tuple[int, ...]] = []
    hook = detector._model.predictor.model.register_forward_pre_hook(lambda _, args: shapes.append(args[0].shape))
    try:
        together = detector.predict(images, batch_size=16)
    finally:
        hook.remove()
    alone = detector.predict(images, batch_size=1)

    # One forward pass per letterboxed shape, each image padded as it is alone: no 640 x 640 square.
    assert [tuple(s) for s in shapes] == [(4, 3, 480, 640), (2, 3, 640, 480), (2, 3, 448, 640)]
    assert sum(len(found) for found in alone) >= 20
    for one, batched in zip(alone, together, strict=True):
        assert [d.class_id for d in batched] == [d.class_id for d in one]
        for a, b in zip(one, batched, strict=True):
            assert max(abs(p - q) for p, q in zip(a.box, b.box, strict=True)) < 0.01, (a, b)
            assert abs(a.score - b.score) < 1e-4


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
