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
    crops: np.ndarray, refs: np.ndarray, method: DistanceMethod | Literal["nearest_other"] = "nearest", k: int = 3
) -> np.ndarray:
    """Distance ``(n,)`` of each crop embedding to the reference set, by ``method``."""
    if len(refs) == 0:
        raise ValueError("no reference embeddings: a distance to an empty reference set is undefined")
    distances = pairwise_distances(crops, refs)
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
