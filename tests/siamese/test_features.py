"""Stored trunk features: each crop through the trunk once; a re-score is the head on stored rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsift_common import keys
from imgsift_common.messages import Crop, Job, SiameseModel, utcnow
from imgsift_common.sqlstate import SqlStateStore, StateStore
from imgsift_common.storage import LocalStore, ObjectStore
from imgsift_siamese import compare, features
from imgsift_siamese.compare import compare_batch
from imgsift_siamese.distance import reference_distance
from imgsift_siamese.embed import Embedder, job_embedder
from imgsift_siamese.features import FeatureRows
from imgsift_siamese.preprocess import decode_image
from imgsift_siamese.settings import SiameseSettings
from imgsift_siamese.train import TrainConfig, TrainedHead, train_head
from imgsift_siamese.training import rescore
from tests.siamese.conftest import CountingTrunk
from tests.siamese.stored import create_job, jpeg, put_crops, put_references

OTHERS = ("giraffe", "dog", "person", "bowl")
# Rows are stored as float16: measured on these crops, distances scored from stored rows lie
# within 7e-5 of distances computed from the images in float32.
FLOAT16_TOLERANCE = 1e-3


def _job_with_crops(
    state: StateStore, store: ObjectStore, crops_by_class: dict[str, list[Image.Image]], others: int = 1
) -> tuple[Job, list[str]]:
    """A job with 3 reference elephants and, as crops, 3 other elephants and ``others`` crops of each other class."""
    elephants = crops_by_class["elephant"]
    job = create_job(state, put_references(store, elephants[:3]))
    crop_keys = put_crops(store, state, elephants[3:6], "elephant")
    crop_keys += put_crops(store, state, [crops_by_class[n][i] for n in OTHERS for i in range(others)], "animal")
    return job, crop_keys


def _crop_feature_objects(store: ObjectStore, job: Job, embedder: Embedder) -> list[str]:
    return list(store.list(keys.features_prefix(job.id, embedder.trunk_id) + "crops/"))


def test_a_batch_redelivered_before_its_distances_were_recorded_reads_its_features_back(
    object_store: ObjectStore,
    sqlite_state: SqlStateStore,
    embedder: Embedder,
    trunk: CountingTrunk,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    job, crop_keys = _job_with_crops(sqlite_state, object_store, crops_by_class)
    compare_batch(job, crop_keys, object_store, sqlite_state, embedder, siamese_settings)
    first = dict(sqlite_state.distances(job.id))
    assert (trunk.images, len(first)) == (3 + 3 * 8 + 7, 7)  # references, their calibration views, crops
    assert len(_crop_feature_objects(object_store, job, embedder)) == 1

    # The worker died after storing the features, before recording a distance; the task is
    # redelivered, to a fresh process, with its crops in another order.
    sqlite_state.reset_distances(job.id)
    compare._reference_cache.clear()
    calls = trunk.calls
    again = compare_batch(job, crop_keys[::-1], object_store, sqlite_state, embedder, siamese_settings)

    assert trunk.calls == calls  # neither crops nor references ran through the trunk
    assert {d.crop_key: d.distance for d in again} == pytest.approx(first, abs=1e-9)  # the same rows

    # Died half-way through recording: the rest is recorded from the same stored rows.
    sqlite_state.reset_distances(job.id)
    sqlite_state.record_distances(job.id, [(crop_keys[0], first[crop_keys[0]])])
    rest = compare_batch(job, crop_keys, object_store, sqlite_state, embedder, siamese_settings)

    assert trunk.calls == calls
    assert {d.crop_key for d in rest} == set(crop_keys[1:])
    assert dict(sqlite_state.distances(job.id)) == pytest.approx(first, abs=1e-9)


def _train_a_head(store: ObjectStore, state: StateStore, job: Job, embedder: Embedder, crops_by_class: dict) -> Job:  # type: ignore[type-arg]
    """A head trained (briefly, on trunk features) to pull elephants together; stored and set on the job."""
    positives = embedder.features_of_images(crops_by_class["elephant"][:3])
    negatives = embedder.features_of_images([crops_by_class[n][i] for n in OTHERS for i in range(4, 8)])
    config = TrainConfig(min_steps=60, epochs=1)
    head = train_head(positives, negatives, config)
    key = keys.model_key(job.id, 1)
    store.put(key, TrainedHead(head, config, positives.shape[1]).to_bytes())
    return state.update_job(job.id, model=SiameseModel(version=1, key=key, trained_at=utcnow()))


def _distances_from_images(store: ObjectStore, job: Job, crop_keys: list[str], embedder: Embedder) -> dict[str, float]:
    """What the job's network says, computed from the stored JPEGs in float32, nothing stored involved."""
    size = embedder.image_size  # decoded as the stage decodes them (JPEG draft where it covers the letterbox)
    crops = embedder.embed_images([decode_image(store.get(k), size) for k in crop_keys])
    refs = embedder.embed_images([decode_image(store.get(k), size) for k in job.reference_keys])
    return dict(zip(crop_keys, (float(d) for d in reference_distance(crops, refs)), strict=True))


def test_rescore_after_training_applies_only_the_head_to_stored_features(
    state_store: StateStore,
    tmp_path: Path,
    embedder: Embedder,
    trunk: CountingTrunk,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    store = LocalStore(tmp_path / "objects")
    job, crop_keys = _job_with_crops(state_store, store, crops_by_class, others=2)
    for start in range(0, len(crop_keys), 4):  # three compare batches: three feature objects
        compare_batch(job, crop_keys[start : start + 4], store, state_store, embedder, siamese_settings)
    pretrained = dict(state_store.distances(job.id))
    (late,) = put_crops(store, state_store, crops_by_class["elephant"][6:7], "elephant")  # never compared yet
    job = _train_a_head(store, state_store, job, embedder, crops_by_class)
    trunk.calls = trunk.images = 0

    assert rescore(job, store, state_store, siamese_settings) == len(crop_keys) + 1

    assert trunk.images == 1  # the late crop alone: references and compared crops come from stored rows
    rescored = dict(state_store.distances(job.id))
    assert set(rescored) == {*crop_keys, late}
    assert state_store.counters(job.id)["compared"] == len(crop_keys) + 1
    # The trained head is applied: every distance moved, the elephants nearer than the rest.
    assert min(abs(rescored[k] - pretrained[k]) for k in crop_keys) > 1e-3
    assert max(rescored[k] for k in [*crop_keys[:3], late]) < min(rescored[k] for k in crop_keys[3:])
    tuned = job_embedder(job, store, siamese_settings)
    expected = _distances_from_images(store, job, [*crop_keys, late], tuned)
    assert rescored == pytest.approx(expected, abs=FLOAT16_TOLERANCE)

    # The old way, the trunk over every crop again (no stored crop features): the same distances.
    for key in _crop_feature_objects(store, job, embedder):
        store.delete(key)
    trunk.images = 0
    rescore(job, store, state_store, siamese_settings)
    assert trunk.images == len(crop_keys) + 1
    assert dict(state_store.distances(job.id)) == pytest.approx(rescored, abs=FLOAT16_TOLERANCE)


def _rows_of(store: ObjectStore, key: str, embedder: Embedder) -> FeatureRows:
    return features.decode(store.get(key), trunk_id=embedder.trunk_id, name=features.object_name(key), dim=1280)


def _reencoded(change: Callable[[FeatureRows], FeatureRows], trunk_id: str | None = None, name: str | None = None):  # type: ignore[no-untyped-def]
    def damage(data: bytes, key: str, embedder: Embedder) -> bytes:
        rows = features.decode(data, trunk_id=embedder.trunk_id, name=features.object_name(key), dim=1280)
        return features.encode(trunk_id or embedder.trunk_id, name or features.object_name(key), change(rows))

    return damage


DAMAGE = {
    "torn": lambda data, key, embedder: data[: len(data) // 2],
    "not an npz": lambda data, key, embedder: b"PK\x03\x04 a zip it is not",
    "another trunk's rows": _reencoded(lambda rows: rows, trunk_id="0123456789ab"),
    "copied from another batch": _reencoded(lambda rows: rows, name="f" * 32),
    "rows of another width": _reencoded(lambda rows: FeatureRows(rows.keys, rows.sources, rows.rows[:, :1000])),
    "rows that are not finite": _reencoded(lambda rows: FeatureRows(rows.keys, rows.sources, rows.rows * np.nan)),
    "rows cut from other boxes": _reencoded(lambda rows: FeatureRows(rows.keys, ["x"] * len(rows), rows.rows)),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_torn_or_foreign_features_are_recomputed_not_trusted(
    damage: Callable[[bytes, str, Embedder], bytes],
    sqlite_state: SqlStateStore,
    local_store: LocalStore,
    embedder: Embedder,
    trunk: CountingTrunk,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    job = create_job(sqlite_state, put_references(local_store, crops_by_class["elephant"][:1]))
    crop_keys = put_crops(local_store, sqlite_state, [crops_by_class["elephant"][4], crops_by_class["bowl"][0]], "x")
    compare_batch(job, crop_keys, local_store, sqlite_state, embedder, siamese_settings)
    first = dict(sqlite_state.distances(job.id))
    (key,) = _crop_feature_objects(local_store, job, embedder)
    local_store.put(key, damage(local_store.get(key), key, embedder))
    trunk.images = 0

    rescore(job, local_store, sqlite_state, siamese_settings)

    assert trunk.images == 2  # both crops through the trunk again; the reference from its own stored rows
    assert dict(sqlite_state.distances(job.id)) == pytest.approx(first, abs=1e-6)
    assert _rows_of(local_store, key, embedder).keys == crop_keys  # replaced by a sound object


def test_a_crop_cut_again_under_its_key_is_not_scored_from_the_old_rows(
    sqlite_state: SqlStateStore,
    local_store: LocalStore,
    embedder: Embedder,
    trunk: CountingTrunk,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    job = create_job(sqlite_state, put_references(local_store, crops_by_class["elephant"][:3]))
    (key,) = put_crops(local_store, sqlite_state, crops_by_class["elephant"][3:4], "elephant")
    compare_batch(job, [key], local_store, sqlite_state, embedder, siamese_settings)
    elephant = dict(sqlite_state.distances(job.id))[key]

    # Detection redone with another target: the image's first crop is now another box.
    (crop,) = sqlite_state.get_crops(job.id, [key])
    sqlite_state.reset_detections(job.id)
    local_store.put(key, jpeg(crops_by_class["bowl"][1]))
    recut = Crop(**{**crop.model_dump(), "padded_box": (10.0, 10.0, 90.0, 70.0), "class_name": "bowl"})
    sqlite_state.record_detections(job.id, [(crop.image_key, [recut])])
    images = trunk.images

    compare_batch(job, [key], local_store, sqlite_state, embedder, siamese_settings)

    assert trunk.images == images + 1
    bowl = dict(sqlite_state.distances(job.id))[key]
    assert bowl == pytest.approx(_distances_from_images(local_store, job, [key], embedder)[key], abs=FLOAT16_TOLERANCE)
    assert bowl > elephant + 0.05


class FailingReads:
    """A store whose reads of crops fail the way an unreachable S3 endpoint does."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def get(self, key: str) -> bytes:
        if "/crops/" in key:
            raise ConnectionError("store unreachable")
        return self.inner.get(key)


def test_a_store_error_in_the_decode_pool_fails_the_batch_for_a_retry(
    sqlite_state: SqlStateStore,
    local_store: LocalStore,
    embedder: Embedder,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    job = create_job(sqlite_state, put_references(local_store, crops_by_class["dog"][:1]))
    crop_keys = put_crops(local_store, sqlite_state, crops_by_class["dog"][1:3], "dog")

    with pytest.raises(ConnectionError):
        compare_batch(job, crop_keys, FailingReads(local_store), sqlite_state, embedder, siamese_settings)  # type: ignore[arg-type]

    assert sqlite_state.distances(job.id) == []
    assert sqlite_state.notes(job.id) == []  # not mistaken for a missing crop
    assert _crop_feature_objects(local_store, job, embedder) == []


def test_rows_are_stored_as_float16_unless_they_do_not_fit() -> None:
    small = np.array([[0.0, 1.5, 5.999]], dtype=np.float32)
    large = np.array([[1e6, 1.0, 2.0]], dtype=np.float32)

    assert features.storable(small).dtype == np.float16
    assert features.storable(large).dtype == np.float32
    assert features.digest(["b", "a", "a"]) == features.digest(["a", "b"]) != features.digest(["a"])
    rows = FeatureRows(["k"], ["s"], large)
    assert np.array_equal(features.decode(features.encode("abc12345", "d" * 32, rows), trunk_id="abc12345",
                                          name="d" * 32, dim=3).rows, large)  # fmt: skip


def test_prefetched_starts_at_once_keeps_order_and_drops_the_rest_on_close() -> None:
    # compare_batch starts its crops' reads and decodes before it reads the job's scorer and the
    # crops' sources from the job state: the pool must be at work before anything is asked of it.
    import threading

    started = threading.Event()
    gate = threading.Event()
    ran: list[int] = []

    def work(item: int) -> int:
        if item == 0:
            started.set()
            assert gate.wait(10)
        ran.append(item)
        return item * 10

    fetched = features.Prefetched(work, range(100), threads=2, ahead=3)
    assert started.wait(10)  # running before the first item is asked for
    gate.set()
    assert [next(fetched), next(fetched)] == [0, 10]
    fetched.close()  # what was not started is dropped; what was started is waited for
    done = len(ran)
    assert done < 100 and list(fetched) == [] and len(ran) == done
    assert list(features.prefetch(work, range(20), threads=3, ahead=2)) == [10 * i for i in range(20)]
