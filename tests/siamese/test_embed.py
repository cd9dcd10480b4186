from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from imgsift_common.batching import forward_sizes
from imgsift_siamese.distance import pairwise_distances, reference_distance
from imgsift_siamese.embed import Embedder, get_embedder
from imgsift_siamese.network import SiameseNetwork
from imgsift_siamese.preprocess import pixels, preprocess
from imgsift_siamese.settings import SiameseSettings

OTHER_CLASSES = ("giraffe", "dog", "person", "bowl")


@pytest.fixture(scope="module")
def embeddings(embedder: Embedder, crops_by_class: dict[str, list[Image.Image]]) -> dict[str, np.ndarray]:
    return {name: embedder.embed_images(crops) for name, crops in crops_by_class.items()}


def mean_distance_within(rows: np.ndarray) -> float:
    distances = pairwise_distances(rows, rows)
    return float(distances[~np.eye(len(rows), dtype=bool)].mean())


def test_embeddings_are_unit_rows_of_float32(embeddings: dict[str, np.ndarray]) -> None:
    rows = np.vstack(list(embeddings.values()))

    assert rows.dtype == np.float32
    assert rows.shape == (40, 1280)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_crops_of_one_class_are_closer_than_crops_of_different_classes(embeddings: dict[str, np.ndarray]) -> None:
    # Measured on these COCO128 crops: elephant-elephant 0.77, elephant-other 0.98 (margin 0.21);
    # the same trunk with random weights (3 seeds): margins 0.00 to 0.05.
    elephants = embeddings["elephant"]
    others = np.vstack([embeddings[name] for name in OTHER_CLASSES])

    within = mean_distance_within(elephants)
    across = float(pairwise_distances(elephants, others).mean())

    assert across - within > 0.12, (within, across)
    for name in ("elephant", "person", "bowl"):  # measured within 0.77, 0.88, 0.84; across 0.98, 1.00, 1.02
        rest = np.vstack([rows for other, rows in embeddings.items() if other != name])
        assert mean_distance_within(embeddings[name]) < float(pairwise_distances(embeddings[name], rest).mean())


def test_three_reference_elephants_rank_elephants_before_other_classes(embeddings: dict[str, np.ndarray]) -> None:
    refs, elephants = embeddings["elephant"][:3], embeddings["elephant"][3:]
    others = np.vstack([embeddings[name] for name in OTHER_CLASSES])

    to_elephants = reference_distance(elephants, refs)
    to_others = reference_distance(others, refs)

    # Measured: elephants 0.73 to 0.85, other crops 0.83 to 1.02; 99.4% of (elephant, other) pairs in order.
    ranked_correctly = (to_elephants[:, None] < to_others[None, :]).mean()
    assert ranked_correctly >= 0.95, (to_elephants, to_others)


def test_batches_change_nothing(embedder: Embedder, crops_by_class: dict[str, list[Image.Image]]) -> None:
    crops = crops_by_class["person"][:7]
    in_threes = Embedder(
        embedder.network, backbone=embedder.backbone, weights_id=embedder.weights_id, batch_size=3
    ).embed_images(crops)

    assert np.allclose(in_threes, embedder.embed_images(crops), atol=1e-5)


def test_the_trunk_sees_few_batch_sizes_and_every_row_once(
    embedder: Embedder, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    """Every row count from 1 to 70 is cut into batches of 8 and powers of two below it (each new
    batch size costs the CPU process memory it keeps), and the rows come out as one batch gives them."""
    arrays = np.stack([pixels(im, 64) for im in crops_by_class["person"]])  # small: fast
    one_batch, k = embedder.features_of_pixels(arrays), len(arrays)
    eights = Embedder(embedder.network, backbone=embedder.backbone, weights_id=embedder.weights_id, batch_size=8)
    seen: list[int] = []
    features = embedder.network.features

    def counting(images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return features(images)

    embedder.network.features = counting  # type: ignore[method-assign]
    try:
        for n in range(1, 71):
            rows = eights.features_of_pixels(np.resize(arrays, (n, *arrays.shape[1:])))
            assert rows.shape == (n, 1280)
            assert np.allclose(rows[: min(n, k)], one_batch[: min(n, k)], atol=1e-4), n
    finally:
        del embedder.network.features
    assert set(seen) == {1, 2, 4, 8} and sum(seen) == sum(range(1, 71))
    assert forward_sizes(23, 32) == [16, 4, 2, 1] and forward_sizes(70, 32) == [32, 32, 4, 2]
    assert forward_sizes(24, 24) == [24] and forward_sizes(0, 32) == []


def test_no_images_give_no_rows(embedder: Embedder) -> None:
    assert embedder.embed_images([]).shape == (0, 1280)


def test_forward_is_the_distance_between_embeddings(
    embedder: Embedder, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    a = torch.stack([preprocess(im, 224) for im in crops_by_class["elephant"][:2]])
    b = torch.stack([preprocess(im, 224) for im in crops_by_class["dog"][:2]])

    with torch.inference_mode():
        distances = embedder.network(a, b)
        to_itself = embedder.network(a, a)
        expected = torch.linalg.vector_norm(embedder.network.embed(a) - embedder.network.embed(b), dim=1)

    assert distances.shape == (2,)
    assert torch.allclose(distances, expected, atol=1e-6)
    assert torch.all((distances > 0.5) & (distances <= 2))
    assert torch.allclose(to_itself, torch.zeros(2), atol=1e-3)


def test_embedding_id_follows_what_shapes_an_embedding(embedder: Embedder) -> None:
    network = SiameseNetwork(models.mobilenet_v2(weights=None).features)
    same = Embedder(network, backbone="mobilenet_v2", weights_id=embedder.weights_id, batch_size=5)
    other_size = Embedder(network, backbone="mobilenet_v2", weights_id=embedder.weights_id, image_size=160)
    other_weights = Embedder(network, backbone="mobilenet_v2", weights_id="file:0123456789abcdef")

    assert same.embedding_id == embedder.embedding_id  # batch size and device do not change an embedding
    assert len({embedder.embedding_id, other_size.embedding_id, other_weights.embedding_id}) == 3


def test_get_embedder_loads_the_network_once(siamese_settings: SiameseSettings, embedder: Embedder) -> None:
    assert get_embedder(siamese_settings.model_copy()) is embedder
    smaller_batches = get_embedder(siamese_settings.model_copy(update={"batch_size": 8}))
    assert smaller_batches.batch_size == 8
    assert smaller_batches.network is embedder.network
