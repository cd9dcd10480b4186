"""Target resolution: class names in any spelling, supercategories, every class, and targets no model knows."""

from __future__ import annotations

import pytest

from imgsift_detector.coco import COCO_CLASSES, COCO_SUPERCATEGORIES, resolve_target
from tests.support.coco import COCO_NAMES

COCO_IDS = dict(enumerate(COCO_CLASSES))


def _names(ids: frozenset[int] | None, names: dict[int, str] = COCO_IDS) -> set[str] | None:
    return None if ids is None else {names[i] for i in ids}


def test_coco_classes_are_the_label_order_of_coco128() -> None:
    assert COCO_CLASSES == COCO_NAMES


def test_supercategories_split_the_80_classes_into_12_groups() -> None:
    members = [m for group in COCO_SUPERCATEGORIES.values() for m in group]
    assert len(COCO_SUPERCATEGORIES) == 12
    assert sorted(members) == sorted(COCO_CLASSES)  # each class in exactly one group


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("dog", "dog"),
        ("  DOG ", "dog"),
        ("dogs", "dog"),
        ("horses", "horse"),
        ("buses", "bus"),
        ("people", "person"),
        ("knives", "knife"),
        ("skis", "skis"),
        ("traffic light", "traffic light"),
        ("traffic_light", "traffic light"),
        ("Traffic-Light", "traffic light"),
        ("Traffic_Lights", "traffic light"),
        ("sports_ball", "sports ball"),
        ("hot dogs", "hot dog"),
        ("cellphone", "cell phone"),
    ],
)
def test_class_names_match_in_any_spelling(target: str, expected: str) -> None:
    assert _names(resolve_target(target, COCO_IDS)) == {expected}


@pytest.mark.parametrize(
    ("target", "group"),
    [("animal", "animal"), ("Animals", "animal"), ("vehicles", "vehicle"), ("sports", "sports"), ("indoor", "indoor")],
)
def test_supercategory_means_its_member_classes(target: str, group: str) -> None:
    assert _names(resolve_target(target, COCO_IDS)) == set(COCO_SUPERCATEGORIES[group])


@pytest.mark.parametrize("target", ["any", "ALL", "*", " any "])
def test_any_means_every_class(target: str) -> None:
    assert resolve_target(target, COCO_IDS) == frozenset(range(80))


@pytest.mark.parametrize("target", ["golden retriever", "dogs and cats", "s", "es", "animalss", "tvs set"])
def test_a_target_the_model_cannot_find_resolves_to_none(target: str) -> None:
    assert resolve_target(target, COCO_IDS) is None


def test_custom_model_names_and_its_share_of_a_supercategory() -> None:
    names = {0: "golden_retriever", 1: "dog", 7: "cat"}
    assert _names(resolve_target("Golden Retrievers", names), names) == {"golden_retriever"}
    assert _names(resolve_target("animal", names), names) == {"dog", "cat"}
    assert resolve_target("any", names) == frozenset({0, 1, 7})
    # none of the vehicle classes is in this model: nothing to detect, not "detect nothing"
    assert resolve_target("vehicle", names) is None
