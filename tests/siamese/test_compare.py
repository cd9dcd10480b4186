from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgsift_common import keys
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import ObjectStore
from imgsift_siamese import compare, features
from imgsift_siamese.compare import ReferenceImagesError, compare_batch, reference_embeddings
from imgsift_siamese.distance import judged_distances
from imgsift_siamese.embed import Embedder
from imgsift_siamese.preprocess import prepare
from imgsift_siamese.settings import SiameseSettings
from tests.siamese.conftest import CountingTrunk
from tests.siamese.stored import JOB_ID, create_job, new_job, put_crops, put_references


def reference_features_key(job_id: str, embedder: Embedder, reference_keys: list[str]) -> str:
    return keys.feature_set_key(job_id, embedder.trunk_id, features.digest(reference_keys))


def test_compare_batch_records_distances_once(
    state_store: StateStore,
    object_store: ObjectStore,
    embedder: Embedder,
    trunk: CountingTrunk,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    elephants = crops_by_class["elephant"]
    job = create_job(state_store, put_references(object_store, elephants[:3]))
    elephant_keys = put_crops(object_store, state_store, elephants[3:6], "elephant")
    other_keys = put_crops(object_store, state_store, [crops_by_class[n][0] for n in ("giraffe", "dog", "bowl")], "x")

    recorded = compare_batch(job, elephant_keys + other_keys, object_store, state_store, embedder, siamese_settings)

    # references once, the calibration's views of them once per job (8 each), then every crop
    assert trunk.images == 3 + 3 * 8 + 6
    assert len(state_store.get_job(job.id).reference_distances) == 3 * (1 + 8)  # type: ignore[union-attr]
    assert {d.crop_key for d in recorded} == set(elephant_keys + other_keys)
    distances = dict(state_store.distances(job.id))
    assert distances == pytest.approx({d.crop_key: d.distance for d in recorded})
    # Measured: these elephants lie 0.76 to 0.81 from the references, the others 0.88 to 0.99.
    assert max(distances[k] for k in elephant_keys) < min(distances[k] for k in other_keys)
    assert all(0 < d < 2 for d in distances.values())

    # The threshold is applied when read: moving it changes the count, nothing is recomputed.
    between = (max(distances[k] for k in elephant_keys) + min(distances[k] for k in other_keys)) / 2
    assert state_store.count_below(job.id, [0.0])[0] == 0
    assert state_store.count_below(job.id, [between])[0] == 3
    assert state_store.count_below(job.id, [2.0])[0] == 6
    assert state_store.counters(job.id)["compared"] == 6

    # Redelivery of the same batch: nothing embedded, nothing recorded, counters unchanged.
    again = compare_batch(job, elephant_keys + other_keys, object_store, state_store, embedder, siamese_settings)

    assert again == []
    assert trunk.images == 3 + 3 * 8 + 6
    assert state_store.counters(job.id)["compared"] == 6

    # A batch that overlaps with done work: only its new crop is embedded and recorded.
    (new_key,) = put_crops(object_store, state_store, elephants[6:7], "elephant")
    overlapping = compare_batch(job, [*elephant_keys, new_key], object_store, state_store, embedder, siamese_settings)

    assert [d.crop_key for d in overlapping] == [new_key]
    assert trunk.images == 3 + 3 * 8 + 7
    assert state_store.counters(job.id)["compared"] == 7

    # The references' trunk features are stored once for the job, under the trunk's id.
    stored_refs = reference_features_key(job.id, embedder, job.reference_keys)
    assert stored_refs.startswith(f"jobs/{job.id}/features/{embedder.trunk_id}/sets/")
    rows = features.decode(
        object_store.get(stored_refs), trunk_id=embedder.trunk_id, name=features.object_name(stored_refs), dim=1280
    )
    assert rows.keys == job.reference_keys and rows.rows.shape == (3, 1280)


def test_another_process_reads_the_stored_reference_features(
    local_store: ObjectStore, embedder: Embedder, trunk: CountingTrunk, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    job = new_job(put_references(local_store, crops_by_class["dog"][:2]))
    first = reference_embeddings(job, local_store, embedder)
    assert trunk.images == 2
    compare._reference_cache.clear()  # what a fresh worker process starts with

    second = reference_embeddings(job, local_store, embedder)

    assert trunk.images == 2
    assert np.array_equal(first, second)
    assert np.allclose(np.linalg.norm(second, axis=1), 1.0, atol=1e-5)

    # A changed reference set is embedded anew, under its own key.
    more = job.model_copy(
        update={"reference_keys": [*job.reference_keys, *put_references(local_store, [crops_by_class["dog"][2]])]}
    )
    assert reference_embeddings(more, local_store, embedder).shape == (3, 1280)
    assert trunk.images == 5
    assert len(list(local_store.list(keys.features_prefix(JOB_ID, embedder.trunk_id) + "sets/"))) == 2


def test_a_torn_reference_features_file_is_recomputed(
    local_store: ObjectStore, embedder: Embedder, trunk: CountingTrunk, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    job = new_job(put_references(local_store, crops_by_class["dog"][:2]))
    expected = reference_embeddings(job, local_store, embedder)
    compare._reference_cache.clear()
    key = reference_features_key(job.id, embedder, job.reference_keys)
    local_store.put(key, local_store.get(key)[:-100])

    embeddings = reference_embeddings(job, local_store, embedder)

    assert trunk.images == 4
    assert np.array_equal(embeddings, expected)
    assert features.read(local_store, key, trunk_id=embedder.trunk_id, dim=1280, job_id=job.id) is not None


def test_missing_and_corrupt_crops_are_skipped_with_a_note(
    sqlite_state: StateStore,
    local_store: ObjectStore,
    embedder: Embedder,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    job = create_job(sqlite_state, put_references(local_store, crops_by_class["person"][:2]))
    good, missing, corrupt = put_crops(local_store, sqlite_state, crops_by_class["person"][2:5], "person")
    local_store.delete(missing)
    local_store.put(corrupt, b"\xff\xd8\xff\xe0 truncated jpeg")

    recorded = compare_batch(job, [good, missing, corrupt], local_store, sqlite_state, embedder, siamese_settings)

    assert [d.crop_key for d in recorded] == [good]
    assert [key for key, _ in sqlite_state.distances(job.id)] == [good]
    notes = sqlite_state.notes(job.id)
    assert any(missing in note and "missing" in note for note in notes)
    assert any(corrupt in note and "cannot be decoded" in note for note in notes)


def test_mean_k_records_the_mean_of_the_k_nearest(
    sqlite_state: StateStore,
    local_store: ObjectStore,
    embedder: Embedder,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    references = crops_by_class["giraffe"][:4]
    job = create_job(sqlite_state, put_references(local_store, references))
    crop_keys = put_crops(local_store, sqlite_state, crops_by_class["giraffe"][4:6], "giraffe")
    settings = siamese_settings.model_copy(update={"distance": "mean_k", "k": 2})

    recorded = compare_batch(job, crop_keys, local_store, sqlite_state, embedder, settings)

    to_refs = np.sqrt(
        np.maximum(
            0, 2 - 2 * embedder.embed_images(crops_by_class["giraffe"][4:6]) @ embedder.embed_images(references).T
        )
    )
    expected = np.sort(to_refs, axis=1)[:, :2].mean(axis=1)
    # The crops went through a JPEG round trip, the direct embeddings did not.
    assert [d.distance for d in recorded] == pytest.approx(list(expected), abs=0.02)


def test_a_job_without_references_cannot_be_compared(
    sqlite_state: StateStore,
    local_store: ObjectStore,
    embedder: Embedder,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    job = create_job(sqlite_state, [])
    crop_keys = put_crops(local_store, sqlite_state, crops_by_class["dog"][:1], "dog")

    with pytest.raises(ReferenceImagesError, match="no reference images"):
        compare_batch(job, crop_keys, local_store, sqlite_state, embedder, siamese_settings)
    assert sqlite_state.distances(job.id) == []


def test_a_missing_reference_image_is_named(local_store: ObjectStore, embedder: Embedder) -> None:
    reference = keys.reference_key(JOB_ID, "ab" * 32, "JPEG")
    job = new_job([reference])

    with pytest.raises(ReferenceImagesError, match=f"{reference} .* missing"):
        reference_embeddings(job, local_store, embedder)


def test_a_batch_runs_the_trunk_in_two_halves_and_scores_as_one_pass(
    state_store: StateStore,
    local_store: ObjectStore,
    embedder: Embedder,
    trunk: CountingTrunk,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    """16 crops go through the trunk as 8 and 8 (the pool prepares the second half while the first
    runs), and their distances are those of the trunk over all 16 at once."""
    assert [compare.pipeline_step(n, 32) for n in (64, 33, 32, 20, 16, 15, 5)] == [32, 32, 16, 8, 8, 32, 32]
    elephants = crops_by_class["elephant"]
    job = create_job(state_store, put_references(local_store, elephants[:2]))
    images = [crops_by_class[name][i] for name in ("elephant", "giraffe", "dog", "person") for i in range(2, 6)]
    crop_keys = put_crops(local_store, state_store, images, "x")
    compare.reference_embeddings(job, local_store, embedder)  # the references' pass, before counting
    job = state_store.update_job(job.id, reference_distances=[0.5])  # no calibration views: only the crops' passes
    trunk.calls = trunk.images = 0

    recorded = compare_batch(job, crop_keys, local_store, state_store, embedder, siamese_settings)

    assert (trunk.calls, trunk.images) == (2, 16)
    one_pass = embedder.embed_features(features.as_stored(embedder.features_of_pixels(
        np.stack([prepare(local_store.get(k), embedder.image_size) for k in crop_keys]))))  # fmt: skip
    refs = compare.reference_embeddings(job, local_store, embedder)
    expected = judged_distances(one_pass, refs, None, method=siamese_settings.distance, k=siamese_settings.k,
                                margin=siamese_settings.negative_margin)  # fmt: skip
    wanted = dict(zip(crop_keys, expected.tolist(), strict=True))
    assert {d.crop_key: d.distance for d in recorded} == pytest.approx(wanted, abs=1e-5)


def test_calibration_views_made_in_threads_are_the_serial_ones(
    object_store: ObjectStore, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    # The job's first batch makes its calibration's views in a thread pool while its references go
    # through the trunk: the same pixels, in the same order, as the views made one after the other.
    from imgsift_siamese.preprocess import pixels
    from imgsift_siamese.train import reference_views, views_per_reference

    reference_keys = put_references(object_store, crops_by_class["elephant"][:3])
    images = [compare.read_image_or_none(object_store, k) for k in reference_keys]
    views, group = reference_views(images, views_per_reference(3))  # type: ignore[arg-type]
    made = compare._ReferenceViews(object_store, reference_keys, 224).pixels()
    assert made is not None
    assert np.array_equal(made[0], np.stack([pixels(v, 224) for v in views])) and np.array_equal(made[1], group)

    # a reference that is gone: no views, so no calibration is recorded (as before)
    object_store.delete(reference_keys[1])
    assert compare._ReferenceViews(object_store, reference_keys, 224).pixels() is None
