"""COCO128 with its YOLO-format labels, as boxes in pixels: the truth for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from PIL import Image

# COCO's 80 class names in the order of yolov8n.pt's ``names``.
COCO_NAMES = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic_light",
    "fire_hydrant",
    "stop_sign",
    "parking_meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports_ball",
    "kite",
    "baseball_bat",
    "baseball_glove",
    "skateboard",
    "surfboard",
    "tennis_racket",
    "bottle",
    "wine_glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot_dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted_plant",
    "bed",
    "dining_table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell_phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy_bear",
    "hair_drier",
    "toothbrush",
]
COCO_NAMES = tuple(n.replace("_", " ") for n in COCO_NAMES)


@dataclass(frozen=True)
class LabelledBox:
    class_id: int
    box: tuple[float, float, float, float]

    @property
    def class_name(self) -> str:
        return COCO_NAMES[self.class_id]


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Coco128:
    """COCO128 in either layout: ``images/``, ``labels/`` or ultralytics' ``images/train2017/``..."""

    def __init__(self, root: Path) -> None:
        self.root = root
        split = "train2017" if (root / "images" / "train2017").is_dir() else ""
        self.images_dir = root / "images" / split
        self.labels_dir = root / "labels" / split

    @cached_property
    def images(self) -> list[Path]:
        return sorted(self.images_dir.glob("*.jpg"))

    def image(self, stem: str) -> Path:
        return self.images_dir / f"{stem}.jpg"

    def labels(self, image: Path) -> list[LabelledBox]:
        path = self.labels_dir / f"{image.stem}.txt"
        if not path.exists():
            return []
        with Image.open(image) as im:
            w, h = im.size
        out = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            c, cx, cy, bw, bh = (float(v) for v in line.split())
            out.append(
                LabelledBox(int(c), ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
            )
        return out

    def with_class(self, class_name: str) -> list[Path]:
        cid = COCO_NAMES.index(class_name)
        return [p for p in self.images if any(b.class_id == cid for b in self.labels(p))]

    def match(self, image: Path, box: tuple[float, float, float, float], min_iou: float = 0.5) -> LabelledBox | None:
        """The labelled box this detection matches (IoU >= min_iou), if any."""
        best = max(self.labels(image), key=lambda lb: iou(lb.box, box), default=None)
        return best if best is not None and iou(best.box, box) >= min_iou else None
