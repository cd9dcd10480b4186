"""Fine-tuning the Siamese head on real COCO crops, storing it, and re-scoring a job with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgsift_common import keys
from imgsift_common.sqlstate import StateStore
from imgsift_common.storage import LocalStore
from imgsift_siamese.compare import compare_batch
from imgsift_siamese.distance import decided_distance, reference_distance
from imgsift_siamese.embed import Embedder, job_embedder
from imgsift_siamese.settings import SiameseSettings
from imgsift_siamese.train import (
    TrainConfig,
    TrainedHead,
    TrainingSet,
    augmented_views,
    embed_features,
    fit,
    held_out_views,
    leave_one_out,
    pooled_features,
    reference_views,
)
from imgsift_siamese.training import TrainingError, rescore, train_job
from tests.siamese.stored import create_job, jpeg, put_crops, put_references

OTHERS = ("giraffe", "dog", "person", "bowl")


def _separation(pos: np.ndarray, neg: np.ndarray) -> float:
    """d': how many pooled standard deviations the negatives lie farther than the positives."""
    return float((neg.mean() - pos.mean()) / np.sqrt((pos.var() + neg.var()) / 2))


def test_fine_tuned_head_separates_better_and_reports_held_out_distances(
    embedder: Embedder, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    elephants = crops_by_class["elephant"]
    network = embedder.network
    refs = pooled_features(network, elephants[:4])
    views = pooled_features(network, [v for n, im in enumerate(elephants[:4]) for v in augmented_views(im, 8, n)])
    bank = pooled_features(network, [im for name in OTHERS for im in crops_by_class[name][:5]])
    test_pos = pooled_features(network, elephants[4:])
    test_neg = pooled_features(network, [im for name in OTHERS for im in crops_by_class[name][5:]])

    data = TrainingSet(refs, views, np.repeat(np.arange(4), 8), bank, np.ones(len(bank)))
    trained = fit(data, TrainConfig())

    def separation(head: object) -> float:
        r = embed_features(head, refs)  # type: ignore[arg-type]
        return _separation(
            reference_distance(embed_features(head, test_pos), r),  # type: ignore[arg-type]
            reference_distance(embed_features(head, test_neg), r),  # type: ignore[arg-type]
        )

    pretrained, tuned = separation(None), separation(trained.head)
    print(f"d' of unseen elephants vs other classes: pretrained {pretrained:.2f}, fine-tuned {tuned:.2f}")
    assert tuned > pretrained
    # each reference once out of a fold, measured with its 8 views: 4 x 9 held-out distances
    assert len(trained.held_out) == 4 * 9 and all(0 <= d <= 2 for d in trained.held_out)

    again = TrainedHead.from_bytes(trained.to_bytes())
    assert np.allclose(embed_features(again.head, test_pos), embed_features(trained.head, test_pos), atol=1e-6)
    assert again.held_out == trained.held_out and again.config == trained.config


def test_held_out_views_never_measure_a_reference_against_itself() -> None:
    refs = np.eye(3, dtype=np.float32)  # three orthogonal references: sqrt(2) apart
    views = np.repeat(refs, 2, axis=0)  # each reference's views equal it exactly
    group = np.repeat(np.arange(3), 2)
    held = held_out_views(None, refs, views, group)
    assert len(held) == 3 * 3 and np.allclose(held, np.sqrt(2))  # 0 if measured against their own reference
    # with known references (a fold), only the others are held out, against the known ones only
    assert np.allclose(held_out_views(None, refs, views, group, known=np.array([0])), np.sqrt(2))
    assert len(held_out_views(None, refs, views, group, known=np.array([0]))) == 2 * 3
    assert held_out_views(None, refs[:1], views[:2], group[:2]) == []


def test_held_out_views_sit_farther_than_clean_references(
    embedder: Embedder, crops_by_class: dict[str, list[Image.Image]]
) -> None:
    """Views of a reference are partial and recoloured, like detector crops: farther than the references' own LOO."""
    elephants = crops_by_class["elephant"][:5]
    refs = pooled_features(embedder.network, elephants)
    views, group = reference_views(elephants, 8)
    held = held_out_views(None, refs, pooled_features(embedder.network, views), group)
    loo = leave_one_out(embed_features(None, refs))
    print(f"median held-out distance: views {np.median(held):.3f}, references' leave-one-out {np.median(loo):.3f}")
    assert len(held) == 5 * (1 + 8)
    assert np.median(held) > np.median(loo)


def test_not_this_images_raise_the_decided_distance() -> None:
    positive = np.array([0.5, 0.5, 0.5])
    negative = np.array([1.2, 0.52, 0.3])
    assert decided_distance(positive, None, 0.05).tolist() == [0.5, 0.5, 0.5]
    assert decided_distance(positive, negative, 0.05) == pytest.approx([0.5, 0.53, 0.75])


def test_train_job_stores_a_versioned_head_and_rescoring_uses_it(
    state_store: StateStore,
    tmp_path: Path,
    embedder: Embedder,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    store = LocalStore(tmp_path / "objects")
    elephants = crops_by_class["elephant"]
    job = create_job(state_store, put_references(store, elephants[:4]))
    elephant_keys = put_crops(store, state_store, elephants[4:], "elephant")
    other_keys = put_crops(store, state_store, [crops_by_class[n][6] for n in OTHERS], "animal")
    compare_batch(job, elephant_keys + other_keys, store, state_store, embedder, siamese_settings)
    assert state_store.get_job(job.id).reference_distances  # type: ignore[union-attr]

    with pytest.raises(TrainingError, match="nothing to contrast"):
        train_job(job, store, state_store, siamese_settings, version=1)

    bank = tmp_path / "bank"
    bank.mkdir()
    for name in OTHERS:
        for i, im in enumerate(crops_by_class[name][:5]):
            (bank / f"{name}-{i}.jpg").write_bytes(jpeg(im))
    (bank / "notes.txt").write_text("not an image; ignored")
    state_store.set_feedback(job.id, other_keys[0], False)  # a giraffe marked wrong: a hard negative
    settings = siamese_settings.model_copy(update={"negative_bank": bank, "train_epochs": 20})
    model = train_job(job, store, state_store, settings, version=1)

    assert model.key == keys.model_key(job.id, 1) and store.exists(model.key)
    assert model.stats["marked_wrong"] == 1 and model.stats["negatives"] >= 20
    job = state_store.update_job(job.id, model=model)
    tuned = job_embedder(job, store, settings)
    assert tuned.embedding_id != embedder.embedding_id

    assert rescore(job, store, state_store, settings) == len(elephant_keys + other_keys)
    distances = dict(state_store.distances(job.id))
    assert set(distances) == set(elephant_keys + other_keys)
    assert state_store.counters(job.id)["compared"] == len(distances)
    assert max(distances[k] for k in elephant_keys) < min(distances[k] for k in other_keys)


def test_training_needs_two_references(
    state_store: StateStore, tmp_path: Path, siamese_settings: SiameseSettings, crops_by_class: dict
) -> None:  # type: ignore[type-arg]
    store = LocalStore(tmp_path / "objects")
    job = create_job(state_store, put_references(store, crops_by_class["elephant"][:1]))
    with pytest.raises(TrainingError, match="training needs 2 or more"):
        train_job(job, store, state_store, siamese_settings, version=1)


def test_crops_marked_wrong_join_the_not_this_images(
    state_store: StateStore,
    tmp_path: Path,
    embedder: Embedder,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    store = LocalStore(tmp_path / "objects")
    job = create_job(state_store, put_references(store, crops_by_class["elephant"][:4]))
    giraffes = put_crops(store, state_store, crops_by_class["giraffe"][:2], "giraffe")
    compare_batch(job, giraffes[1:], store, state_store, embedder, siamese_settings)
    unmarked = dict(state_store.distances(job.id))[giraffes[1]]

    state_store.set_feedback(job.id, giraffes[0], False)  # the first giraffe is not what we want
    state_store.reset_distances(job.id)
    compare_batch(job, giraffes[1:], store, state_store, embedder, siamese_settings)
    marked = dict(state_store.distances(job.id))[giraffes[1]]
    assert marked > unmarked


def test_answers_join_the_sets_and_training_gives_their_held_out_distances(
    state_store: StateStore,
    tmp_path: Path,
    embedder: Embedder,
    siamese_settings: SiameseSettings,
    crops_by_class: dict[str, list[Image.Image]],
) -> None:
    """A crop answered right becomes a reference, one answered wrong a "not this" image: crops like
    them move, and each answered crop is measured without itself (not at distance 0)."""
    store = LocalStore(tmp_path / "objects")
    job = create_job(state_store, put_references(store, crops_by_class["elephant"][:3]))
    elephants = put_crops(store, state_store, crops_by_class["elephant"][3:], "elephant")
    others = put_crops(store, state_store, [crops_by_class[n][i] for n in OTHERS for i in (6, 7)], "animal")
    compare_batch(job, elephants + others, store, state_store, embedder, siamese_settings)
    before = dict(state_store.distances(job.id))

    state_store.set_feedback(job.id, elephants[0], True)
    state_store.set_feedback(job.id, others[0], False)
    state_store.reset_distances(job.id)
    compare_batch(job, elephants + others, store, state_store, embedder, siamese_settings)
    after = dict(state_store.distances(job.id))
    assert after[elephants[0]] > 0.05  # measured against the other references, not itself
    assert after[elephants[0]] == pytest.approx(before[elephants[0]], abs=1e-6)  # the same refs bar itself
    assert after[others[1]] >= before[others[1]]  # the other giraffe is judged against the wrong one
    assert sum(after[k] for k in elephants[1:]) <= sum(before[k] for k in elephants[1:])  # a new reference

    bank = tmp_path / "bank"
    bank.mkdir()
    for name in OTHERS:
        for i, im in enumerate(crops_by_class[name][:3]):
            (bank / f"{name}-{i}.jpg").write_bytes(jpeg(im))
    settings = siamese_settings.model_copy(update={"negative_bank": bank, "train_epochs": 10})
    model = train_job(job, store, state_store, settings, version=1)
    assert set(model.held_out_answers) == {elephants[0], others[0]}  # every answered crop, by a fold head
    assert model.stats["answers"] == 2 and model.stats["marked_right"] == 1
    assert TrainedHead.from_bytes(store.get(model.key)).held_out_answers == pytest.approx(
        [model.held_out_answers[k] for k in sorted(model.held_out_answers)]
    )
    job = state_store.update_job(job.id, model=model)
    rescore(job, store, state_store, settings)
    scored = dict(state_store.distances(job.id))
    assert scored[elephants[0]] > 0.05 and len(scored) == len(elephants + others)


def test_judged_distances_leave_a_crop_out_of_the_sets_it_is_in() -> None:
    from imgsift_siamese.distance import judged_distances

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 8))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    crops, refs = rows[:4], rows[4:]
    keys = ["a", "b", "c", "d"]
    plain = judged_distances(crops, refs, None, method="nearest", k=3, margin=0.05)
    with_answers = judged_distances(
        crops, np.concatenate([refs, crops[:1]]), crops[1:2], method="nearest", k=3, margin=0.05,
        crop_keys=keys, reference_keys=[None, None, "a"], negative_keys=["b"],
    )  # fmt: skip
    assert with_answers[0] == pytest.approx(plain[0])  # "a" among the references, measured without itself
    assert with_answers[1] == pytest.approx(plain[1])  # "b" the only "not this" image: itself left out, none left
    # The others see both sets whole: nearest of the references and "a", raised by "b" where it is as near.
    d_a, d_b = np.linalg.norm(crops[2:] - crops[0], axis=1), np.linalg.norm(crops[2:] - crops[1], axis=1)
    positive = np.minimum(plain[2:], d_a)
    assert with_answers[2:] == pytest.approx(positive + np.maximum(0.0, positive + 0.05 - d_b))
    without_keys = judged_distances(crops, np.concatenate([refs, crops[:1]]), None, method="nearest", k=3, margin=0.05)
    assert without_keys[0] == pytest.approx(0.0, abs=1e-6)  # what leaving out avoids


def test_views_drawn_then_applied_are_augments_own_bit_for_bit(crops_by_class: dict[str, list[Image.Image]]) -> None:
    # The calibration's views are drawn first (view_steps) and made in threads (apply_view): the
    # same images as the composed transform makes, and torch's generator left where it leaves it.
    from imgsift_siamese.train import _AUGMENT, apply_view, view_steps

    steps_per_view: set[int] = set()
    for seed, image in enumerate([crops_by_class["elephant"][0], crops_by_class["dog"][1], crops_by_class["bowl"][2]]):
        torch.manual_seed(seed)
        expected = [_AUGMENT(image) for _ in range(8)]
        after_expected = torch.get_rng_state()
        steps = view_steps(image, 8, seed)
        assert torch.equal(torch.get_rng_state(), after_expected)
        steps_per_view.update(len(s) for s in steps)
        views = [apply_view(image, s) for s in reversed(steps)][::-1]  # in any order: applying draws nothing
        assert torch.equal(torch.get_rng_state(), after_expected)
        assert [(v.mode, v.size, v.tobytes()) for v in views] == [(e.mode, e.size, e.tobytes()) for e in expected]
        assert [v.tobytes() for v in augmented_views(image, 8, seed)] == [e.tobytes() for e in expected]
    assert len(steps_per_view) > 1  # the random-apply transforms' coins fell both ways
