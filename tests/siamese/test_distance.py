from __future__ import annotations

import numpy as np
import pytest

from imgsift_siamese.distance import pairwise_distances, reference_distance


def unit_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_pairwise_distances_equal_a_naive_loop() -> None:
    a, b = unit_rows(7, 64, seed=1), unit_rows(5, 64, seed=2)
    b[0] = a[3]  # an identical pair: distance 0, not NaN from rounding below zero

    naive = np.array([[np.linalg.norm(x.astype(np.float64) - y) for y in b] for x in a])
    fast = pairwise_distances(a, b)

    assert fast.shape == (7, 5)
    assert np.allclose(fast, naive, atol=1e-3)
    assert fast[3, 0] == pytest.approx(0.0, abs=1e-3)
    assert np.all(fast >= 0) and np.all(fast <= 2)


def test_pairwise_distances_of_opposite_and_orthogonal_vectors() -> None:
    e = np.eye(3, dtype=np.float32)

    d = pairwise_distances(e, np.vstack([e[0], -e[0]]))

    assert np.allclose(d, [[0, 2], [np.sqrt(2), np.sqrt(2)], [np.sqrt(2), np.sqrt(2)]])


def on_circle(*degrees: float) -> np.ndarray:
    """Unit 2-d embeddings at the given angles: distances are chords, easy to work out by hand."""
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def chord(degrees: float) -> float:
    return float(2 * np.sin(np.radians(degrees) / 2))


# Crop A (0°) has one odd reference close by (10°); crop B (75°) sits between two (60°, 90°).
CROPS = on_circle(0, 75)
REFS = on_circle(10, 60, 90, 170)
DISTANCES = np.array(
    [
        [chord(10), chord(60), chord(90), chord(170)],
        [chord(65), chord(15), chord(15), chord(95)],
    ]
)


def test_hand_made_matrix() -> None:
    assert np.allclose(pairwise_distances(CROPS, REFS), DISTANCES)


def test_nearest_is_the_closest_reference() -> None:
    assert np.allclose(reference_distance(CROPS, REFS, "nearest"), [chord(10), chord(15)])


def test_mean_k_averages_the_k_closest_references() -> None:
    mean_2 = reference_distance(CROPS, REFS, "mean_k", k=2)

    assert np.allclose(mean_2, [(chord(10) + chord(60)) / 2, chord(15)])
    # One odd reference makes A the better match by "nearest"; "mean_k" prefers B.
    nearest = reference_distance(CROPS, REFS, "nearest")
    assert nearest[0] < nearest[1]
    assert mean_2[0] > mean_2[1]


def test_mean_k_clips_k_to_the_number_of_references() -> None:
    assert np.allclose(reference_distance(CROPS, REFS, "mean_k", k=10), DISTANCES.mean(axis=1))
    assert np.allclose(reference_distance(CROPS, REFS[:1], "mean_k", k=3), DISTANCES[:, 0])


def test_reference_distance_refuses_what_it_cannot_define() -> None:
    with pytest.raises(ValueError, match="empty reference set"):
        reference_distance(CROPS, REFS[:0])
    with pytest.raises(ValueError, match="k must be at least 1"):
        reference_distance(CROPS, REFS, "mean_k", k=0)
    with pytest.raises(ValueError, match="unknown distance method"):
        reference_distance(CROPS, REFS, "median")  # type: ignore[arg-type]
