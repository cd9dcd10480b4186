"""COCO's class names and supercategories, and how a job's target string maps to detector class ids.

A job names its target in words: a class ("dog", "traffic_light", "dogs"), a COCO
supercategory ("animal", "vehicles") or every class ("any"). :func:`resolve_target` turns
that into the class ids of the loaded model; None means the model cannot find the target,
and the detector then hands whole images to the Siamese stage instead of boxes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# The 80 COCO classes in id order, spelt as ultralytics' COCO models name them.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

# COCO's 12 supercategories and their member classes, as in the official instances annotations.
COCO_SUPERCATEGORIES: dict[str, tuple[str, ...]] = {
    "person": ("person",),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "outdoor": ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "accessory": ("backpack", "umbrella", "handbag", "tie", "suitcase"),
    "sports": (
        "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
        "surfboard", "tennis racket",
    ),
    "kitchen": ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "food": ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"),
    "furniture": ("chair", "couch", "potted plant", "bed", "dining table", "toilet"),
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"),
}  # fmt: skip

EVERY_CLASS = frozenset({"any", "all", "*"})

# Plurals that dropping an "s" or "es" does not undo.
_IRREGULAR_PLURALS = {"people": "person", "mice": "mouse", "knives": "knife"}

_SEPARATORS = re.compile(r"[\s_-]+")


def _normalise(name: str) -> str:
    # "Traffic_Light", "traffic-light" and "traffic light" all mean the same class.
    return _SEPARATORS.sub("", name.strip().lower())


def _spellings(target: str) -> list[str]:
    """The normalised target, then the singulars it may be the plural of."""
    word = _normalise(target)
    forms = [word]
    if word in _IRREGULAR_PLURALS:
        forms.append(_normalise(_IRREGULAR_PLURALS[word]))
    if word.endswith("es"):
        forms.append(word[:-2])  # buses, benches
    if word.endswith("s"):
        forms.append(word[:-1])  # dogs, animals
    return forms


def resolve_target(target: str, names: Mapping[int, str]) -> frozenset[int] | None:
    """The ids in ``names`` a job target means: a class, a COCO supercategory, or every class; None if none.

    A supercategory resolves to those of its members the model knows; if it knows none of
    them, the target is no detector class and the result is None.
    """
    if target.strip().lower() in EVERY_CLASS:
        return frozenset(names)
    ids_by_name: dict[str, set[int]] = {}
    for class_id, name in names.items():
        ids_by_name.setdefault(_normalise(name), set()).add(class_id)
    supercategories = {_normalise(s): members for s, members in COCO_SUPERCATEGORIES.items()}
    forms = _spellings(target)
    for form in forms:
        if form in ids_by_name:
            return frozenset(ids_by_name[form])
    for form in forms:
        if form in supercategories:
            members = {i for member in supercategories[form] for i in ids_by_name.get(_normalise(member), ())}
            return frozenset(members) or None
    return None
