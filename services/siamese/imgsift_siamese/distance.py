"""Distances between unit-norm embeddings, and a crop's distance to a set of reference images.

A crop is compared with every reference image, as in the paper (arXiv 2410.12561), and its
distance to the set is one of:

- ``nearest`` (default): the distance to the closest reference. A crop that looks like any
  one reference is kept, so references may show the object from different sides.
- ``mean_k``: the mean distance to the ``k`` closest references (``k`` clipped to their
  number). One odd reference (a mislabelled or cluttered image) can no longer accept crops
  on its own, at the price of needing ``k`` similar references per look of the object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from imgsift_siamese.settings import DistanceMethod


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(n, m)`` between unit rows of ``a (n, d)`` and ``b (m, d)``, by one matrix product."""
    # For unit vectors ||x - y||^2 = 2 - 2 x.y. float64 because sqrt magnifies rounding near 0;
    # the clip absorbs rounding that would push identical rows just below zero.
    cosine = np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cosine))


def reference_distance(
    crops: np.ndarray,
    refs: np.ndarray,
    method: DistanceMethod | Literal["nearest_other"] = "nearest",
    k: int = 3,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Distance ``(n,)`` of each crop embedding to the reference set, by ``method``.

    ``exclude``: an ``(n, m)`` mask of pairs left out, where a crop is itself one of the
    references (an answered crop among them): its distance is to the others.
    """
    if len(refs) == 0:
        raise ValueError("no reference embeddings: a distance to an empty reference set is undefined")
    distances = pairwise_distances(crops, refs)
    if exclude is not None:
        distances[exclude] = np.inf
    if method == "nearest":
        return distances.min(axis=1)
    if method == "nearest_other":  # refs against themselves: each row's nearest other row (leave-one-out)
        np.fill_diagonal(distances, np.inf)
        return distances.min(axis=1)
    if method == "mean_k":
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, distances.shape[1])
        return np.partition(distances, k - 1, axis=1)[:, :k].mean(axis=1)
    raise ValueError(f"unknown distance method {method!r}; choose 'nearest' or 'mean_k'")


def decided_distance(positive: np.ndarray, negative: np.ndarray | None, margin: float) -> np.ndarray:
    """The distance a crop is judged by: to the references, raised when a "not this" image is as near.

    ``d + max(0, d + margin - d_not)``: a crop must be nearer the references than the nearest
    "not this" image by ``margin``, or its distance grows by the shortfall. One number per crop
    keeps the threshold a single slider, re-decided from stored distances.
    """
    if negative is None:
        return positive
    return positive + np.maximum(0.0, positive + margin - negative)


def self_mask(crop_keys: Sequence[str] | None, set_keys: Sequence[str | None]) -> np.ndarray | None:
    """Where a crop meets itself in a set (an answered crop among the references or the "not this"
    images): the ``exclude`` mask of :func:`reference_distance`, or None when no pair is one."""
    if crop_keys is None or not any(set_keys):
        return None
    position = {key: j for j, key in enumerate(set_keys) if key is not None}
    mask = np.zeros((len(crop_keys), len(set_keys)), dtype=bool)
    for i, key in enumerate(crop_keys):
        j = position.get(key)
        if j is not None:
            mask[i, j] = True
    return mask if mask.any() else None


def judged_distances(
    crops: np.ndarray,
    references: np.ndarray,
    negatives: np.ndarray | None,
    *,
    method: DistanceMethod,
    k: int,
    margin: float,
    crop_keys: Sequence[str] | None = None,
    reference_keys: Sequence[str | None] = (),
    negative_keys: Sequence[str | None] = (),
) -> np.ndarray:
    """The distances recorded for crop embeddings: to the references (the job's and the crops
    answered right), raised by the "not this" images (the job's and the crops answered wrong).

    A crop that is itself in one of the sets is measured against the rest of it (leave one
    out): the distance it would have had if it had not been answered, which is what the
    threshold's calibration needs of an answered crop.
    """
    positive = reference_distance(crops, references, method, k, exclude=self_mask(crop_keys, reference_keys))
    negative = None
    if negatives is not None and len(negatives):
        negative = reference_distance(crops, negatives, "nearest", 1, exclude=self_mask(crop_keys, negative_keys))
    return decided_distance(positive, negative, margin)
